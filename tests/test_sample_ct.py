"""The embedded real CT series: geometry, HU to the voxel, and UID repair."""

import numpy as np
import pydicom
import pytest

from ctzoo.io import read_volume


def test_sample_geometry(sample_volume):
    assert sample_volume.array.shape == (20, 512, 512)
    assert sample_volume.size == (512, 512, 20)
    assert sample_volume.spacing == pytest.approx((0.9765625, 0.9765625, 2.0), abs=1e-6)
    # SliceThickness says 3 mm; the slices are 2 mm apart: spacing must come from positions
    assert float(sample_volume.dicom.headers[0].SliceThickness) == 3.0
    assert sample_volume.orientation == "LPS"
    assert sample_volume.origin == pytest.approx((-249.51171875, -437.51171875, -804.5))


def test_sample_hu_equals_independent_pydicom_read(sample_dir, sample_volume):
    """Every voxel equals pydicom's decode (pylibjpeg-openjpeg for JPEG 2000) plus its modality LUT."""
    datasets = [pydicom.dcmread(p) for p in sorted(sample_dir.iterdir()) if p.name.startswith("CT.")]
    assert all(ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90" for ds in datasets)
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))  # axial, so z orders them
    expected = np.stack([pydicom.pixels.apply_modality_lut(ds.pixel_array, ds) for ds in datasets])
    assert np.array_equal(sample_volume.array, expected.astype(np.float32))
    assert -1024 <= sample_volume.array.min() and sample_volume.array.max() > 1000  # bone present
    for k, ds in enumerate(datasets):
        assert sample_volume.index_to_lps([0, 0, k]) == pytest.approx([float(v) for v in ds.ImagePositionPatient])


def test_sample_uids_are_repaired_deterministically(sample_dir, sample_volume):
    source = sample_volume.dicom
    assert source.uids_repaired
    assert source.frame_of_reference_uid == "1.3.12.2.1107.5.1.4.60064.30000022120807274275100000041"
    assert source.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    # the instance UIDs come from the file meta, which still names each object
    for uid, header in zip(source.sop_instance_uids, source.headers):
        assert uid == header.file_meta.MediaStorageSOPInstanceUID
    assert len(set(source.sop_instance_uids)) == 20
    for uid in (source.study_instance_uid, source.series_instance_uid):
        assert uid.startswith("2.25.") and len(uid) <= 64
        assert pydicom.uid.UID(uid).is_valid
    again = read_volume(sample_dir, progress=False).dicom
    assert (again.study_instance_uid, again.series_instance_uid) == (source.study_instance_uid,
                                                                     source.series_instance_uid)
    repairs = [w for w in sample_volume.warnings if "empty in" in w]
    assert len(repairs) == 1 and "SeriesInstanceUID" in repairs[0]  # one warning line, not one per UID
