"""Synthetic DICOM series with known truth: order, geometry, rescale, and every refusal naming its file."""

import shutil
import zipfile

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_factory import SeriesSpec, make_slices, write_series

from ctzoo.io import DicomError, DicomWarning, SeriesRules, read_volume, scan_folder
from ctzoo.io.image_files import volume_from_sitk


def assert_matches_spec(volume, spec):
    """Each slice of the spec sits at its position, holds its HU, in order along the slice normal."""
    normal = np.cross(spec.orientation[:3], spec.orientation[3:])
    truth = sorted(spec.slices, key=lambda s: float(np.dot(s.position, normal)))
    assert volume.array.shape == (len(truth), *truth[0].stored.shape)
    for k, s in enumerate(truth):
        np.testing.assert_allclose(volume.array[k], s.hu, rtol=0, atol=1e-4)
        np.testing.assert_allclose(volume.index_to_lps([0, 0, k]), s.position, atol=1e-4)
    row_mm, column_mm = spec.pixel_spacing
    np.testing.assert_allclose(volume.index_to_lps([1, 0, 0]) - volume.index_to_lps([0, 0, 0]),
                               np.asarray(spec.orientation[:3]) * column_mm, atol=1e-6)
    np.testing.assert_allclose(volume.index_to_lps([0, 1, 0]) - volume.index_to_lps([0, 0, 0]),
                               np.asarray(spec.orientation[3:]) * row_mm, atol=1e-6)


def sitk_series(folder):
    """An independent read: SimpleITK's own series reader and GDCM's own sorting."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return volume_from_sitk(reader.Execute())


def test_shuffled_files_are_sorted_by_position(tmp_path):
    spec = SeriesSpec(make_slices(7))
    write_series(tmp_path, spec, shuffle_seed=3)
    volume = read_volume(tmp_path, progress=False)
    assert_matches_spec(volume, spec)
    assert volume.spacing == pytest.approx((0.8, 0.7, 2.5))
    assert not volume.warnings
    reference = sitk_series(tmp_path)
    np.testing.assert_allclose(volume.affine_lps, reference.affine_lps, atol=1e-5)
    np.testing.assert_array_equal(volume.array, reference.array)


def test_negative_direction_cosine(tmp_path):
    orientation = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # rows run to patient right; normal points inferior
    spec = SeriesSpec(make_slices(6, orientation=orientation), orientation=orientation)
    write_series(tmp_path, spec, shuffle_seed=1)
    volume = read_volume(tmp_path, progress=False)
    assert_matches_spec(volume, spec)
    assert volume.orientation == "RPI"
    np.testing.assert_allclose(volume.direction, [[-1, 0, 0], [0, 1, 0], [0, 0, -1]], atol=1e-9)
    reference = sitk_series(tmp_path)
    np.testing.assert_allclose(volume.affine_lps, reference.affine_lps, atol=1e-5)
    np.testing.assert_array_equal(volume.array, reference.array)


def test_mixed_rescale_slopes_are_applied_per_slice_in_float(tmp_path):
    slopes = [1.0, 0.5, 2.0, 0.25, 1.0]
    spec = SeriesSpec(make_slices(5, slopes=slopes))
    write_series(tmp_path, spec)
    volume = read_volume(tmp_path, progress=False)
    assert_matches_spec(volume, spec)
    assert not np.array_equal(volume.array[3], np.round(volume.array[3]))  # quarter-HU values survived


def test_missing_slice_warns_and_keeps_true_positions(tmp_path):
    spec = SeriesSpec(make_slices(8))
    spec.slices.pop(4)
    write_series(tmp_path, spec)
    # named as slices (InstanceNumber, centre z, index), never by file: file and folder names may name the patient
    with pytest.warns(DicomWarning, match=r"about 1 missing slice\(s\) between InstanceNumber 4, z 107.5 mm "
                                          r"\(index 3\) and InstanceNumber 5, z 112.5 mm \(index 4\) "
                                          r"\(5.000 mm apart, usual step 2.500 mm\)"):
        volume = read_volume(tmp_path, progress=False)
    assert volume.spacing[2] == pytest.approx(2.5)
    assert volume.array.shape[0] == 7  # nothing interpolated
    assert volume.dicom.image_positions[4] == pytest.approx(spec.slices[4].position)
    assert any("missing slice" in w for w in volume.warnings)
    assert volume.slice_label(3) in volume.warnings[0] and volume.slice_label(4) in volume.warnings[0]
    assert not any("IMG" in w or str(tmp_path) in w for w in volume.warnings)


def test_instance_numbers_follow_slice_order_and_name_slices(tmp_path):
    """InstanceNumber is read per slice in the volume's order (not used to sort); slices are named by it and by
    their own position's z, which differs from the grid's beside a missing slice."""
    import dataclasses

    spec = SeriesSpec(make_slices(6, step=-2.5))  # acquired head to feet: InstanceNumber 1 is the top slice
    spec.slices.pop(2)  # a gap: z 100, 97.5, 92.5, 90, 87.5 as InstanceNumber 1..5
    for path in write_series(tmp_path, spec, shuffle_seed=2):
        ds = pydicom.dcmread(path)
        if ds.InstanceNumber == 1:
            del ds.InstanceNumber
            ds.save_as(path, enforce_file_format=True)
    with pytest.warns(DicomWarning, match="missing slice"):
        volume = read_volume(tmp_path, progress=False)
    assert volume.dicom.instance_numbers == [5, 4, 3, 2, None]
    assert [volume.slice_position(k)["z_mm"] for k in range(5)] == [87.5, 90.0, 92.5, 97.5, 100.0]
    assert volume.index_to_lps([0, 0, 3])[2] == pytest.approx(95.0)  # the grid (median step) is off there
    assert volume.slice_position(1) == {"index": 1, "z_mm": 90.0, "instance_number": 4,
                                        "label": "InstanceNumber 4, z 90.0 mm (index 1)"}
    assert volume.slice_label(4) == "z 100.0 mm (index 4)"  # no InstanceNumber in that file
    plain = dataclasses.replace(volume, dicom=None)  # NIfTI-like: the grid only
    assert plain.slice_position(3) == {"index": 3, "z_mm": 95.0, "instance_number": None,
                                       "label": "z 95.0 mm (index 3)"}
    with pytest.raises(IndexError):
        volume.slice_position(5)


def test_points_are_placed_from_their_own_slice_beside_a_gap(tmp_path):
    """Beside a missing slice the grid (median step) is off by the gap; ``index_to_lps_per_slice`` puts a point of
    slice k where that slice's ImagePositionPatient says, in-plane offsets from the grid, between two slices
    linearly. Without DICOM positions (NIfTI) the grid is the truth."""
    import dataclasses

    spec = SeriesSpec(make_slices(6))  # z 100, 102.5, ... 112.5
    spec.slices.pop(2)  # z 100, 102.5, 107.5, 110, 112.5
    write_series(tmp_path, spec)
    with pytest.warns(DicomWarning, match="missing slice"):
        volume = read_volume(tmp_path, progress=False)
    points = np.array([[0.0, 0.0, 2.0], [4.0, 5.0, 3.0], [1.0, 2.0, 1.5]])
    placed = volume.index_to_lps_per_slice(points)
    row_mm, column_mm = spec.pixel_spacing
    np.testing.assert_allclose(placed[0], spec.slices[2].position, atol=1e-6)
    np.testing.assert_allclose(placed[1], np.add(spec.slices[3].position, [4 * column_mm, 5 * row_mm, 0]), atol=1e-6)
    np.testing.assert_allclose(placed[2, 2], 105.0, atol=1e-6)  # half way from 102.5 to 107.5
    assert volume.index_to_lps(points)[0, 2] == pytest.approx(105.0)  # the grid's slice 2: 2.5 mm off
    plain = dataclasses.replace(volume, dicom=None)
    np.testing.assert_allclose(plain.index_to_lps_per_slice(points), plain.index_to_lps(points))


def test_uneven_spacing_warns(tmp_path):
    spec = SeriesSpec(make_slices(6))
    spec.slices[3].position = (spec.slices[3].position[0], spec.slices[3].position[1],
                               spec.slices[3].position[2] + 0.4)
    write_series(tmp_path, spec)
    with pytest.warns(DicomWarning, match="uneven slice spacing"):
        read_volume(tmp_path, progress=False)


def test_truncated_pixel_data_names_the_file(tmp_path):
    paths = write_series(tmp_path, SeriesSpec(make_slices(5)))
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) - 20])
    with pytest.raises(DicomError, match=rf"{paths[2].name}: cannot decode pixel data"):
        read_volume(tmp_path, progress=False)


@pytest.mark.parametrize("damage", ["truncated-header", "overwritten-meta"])
def test_corrupt_header_names_the_file(tmp_path, damage):
    spec = SeriesSpec(make_slices(4))
    paths = write_series(tmp_path, spec)
    data = bytearray(paths[2].read_bytes())
    if damage == "truncated-header":
        data = data[:600]  # an interrupted copy: pydicom parses what is there and stops quietly
    else:
        data[300:340] = b"\xff" * 40
    paths[2].write_bytes(bytes(data))
    with pytest.raises(DicomError, match=rf"{paths[2].name}: corrupt or truncated DICOM file"):
        read_volume(tmp_path, progress=False)


def test_corrupt_file_of_another_series_only_warns(tmp_path):
    spec = SeriesSpec(make_slices(4))
    write_series(tmp_path / "good", spec)
    other = write_series(tmp_path / "other", SeriesSpec(make_slices(3, seed=9)))
    other[0].write_bytes(other[0].read_bytes()[:700])
    with pytest.warns(DicomWarning, match=rf"{other[0].name}: corrupt or truncated .*another series"):
        assert_matches_spec(read_volume(tmp_path, series=spec.series_uid, progress=False), spec)


def test_non_dicom_files_are_ignored(tmp_path):
    spec = SeriesSpec(make_slices(3))
    write_series(tmp_path, spec)
    (tmp_path / "README.txt").write_text("not an image")
    assert_matches_spec(read_volume(tmp_path, progress=False), spec)


def test_two_series_both_found_right_one_chosen(tmp_path):
    axial = SeriesSpec(make_slices(6, seed=1), description="axial body")
    coronal_orientation = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    coronal = SeriesSpec(make_slices(9, orientation=coronal_orientation, seed=2), orientation=coronal_orientation,
                         description="coronal reformat")
    write_series(tmp_path / "a", axial, prefix="AX")
    write_series(tmp_path / "b", coronal, prefix="COR")
    scan = scan_folder(tmp_path, progress=False)
    assert {s.description for s in scan.series} == {"axial body", "coronal reformat"}
    assert [len(s.slices) for s in scan.series] == [9, 6]  # numbered by size
    assert scan.series[0].rejection(SeriesRules()).startswith("not axial (coronal")

    assert_matches_spec(read_volume(tmp_path, progress=False), axial)  # axial wins despite fewer slices
    assert_matches_spec(read_volume(tmp_path, series=coronal.series_uid, progress=False), coronal)
    assert_matches_spec(read_volume(tmp_path, series="1", progress=False), coronal)
    assert_matches_spec(read_volume(tmp_path, rules=SeriesRules(orientation="any"), progress=False), coronal)
    with pytest.raises(DicomError, match="no series '9.9.9'"):
        read_volume(tmp_path, series="9.9.9", progress=False)


def test_localizer_is_skipped_by_rules_and_refused_by_name(tmp_path):
    ct = SeriesSpec(make_slices(4, seed=1))
    scout = SeriesSpec(make_slices(6, seed=2), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    write_series(tmp_path, ct, prefix="CT")
    write_series(tmp_path, scout, prefix="SCOUT")
    assert_matches_spec(read_volume(tmp_path, progress=False), ct)
    with pytest.raises(DicomError, match=r"SCOUT000\d.dcm: a localizer/scout image"):
        read_volume(tmp_path, series=scout.series_uid, progress=False)


def test_mixed_orientations_refused_naming_the_file(tmp_path):
    spec = SeriesSpec(make_slices(5))
    write_series(tmp_path, spec)
    odd = pydicom.dcmread(tmp_path / "IMG0003.dcm")
    odd.ImageOrientationPatient = [1, 0, 0, 0, 0.8, -0.6]
    odd.save_as(tmp_path / "IMG0003.dcm")
    with pytest.raises(DicomError, match="no series matches the selection rules.*mixed orientations"):
        read_volume(tmp_path, progress=False)
    with pytest.raises(DicomError, match="IMG0003.dcm: ImageOrientationPatient .* differs"):
        read_volume(tmp_path, series=spec.series_uid, progress=False)


def test_non_image_object_in_series_refused_naming_it(tmp_path):
    spec = SeriesSpec(make_slices(4))
    write_series(tmp_path, spec)
    report = pydicom.Dataset()
    report.file_meta = pydicom.dataset.FileMetaDataset()
    report.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    report.SOPInstanceUID = report.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    report.SeriesInstanceUID, report.Modality = pydicom.uid.generate_uid(), "SR"
    report.save_as(tmp_path / "NOTE.dcm", enforce_file_format=True)
    assert_matches_spec(read_volume(tmp_path, progress=False), spec)  # a report in its own series is no bother
    report.SeriesInstanceUID = spec.series_uid
    report.save_as(tmp_path / "NOTE.dcm", enforce_file_format=True)
    for series in (None, spec.series_uid):  # inside the CT series it is refused, by rule or by name
        with pytest.raises(DicomError, match=r"NOTE.dcm: not an image slice \(Basic Text SR Storage\): missing"):
            read_volume(tmp_path, series=series, progress=False)


def test_monochrome1_keeps_hu(tmp_path):
    spec = SeriesSpec(make_slices(3), photometric="MONOCHROME1")
    write_series(tmp_path, spec)
    volume = read_volume(tmp_path, progress=False)
    assert_matches_spec(volume, spec)  # display polarity does not change HU
    assert volume.dicom.photometric_interpretation == "MONOCHROME1"


def test_zip_and_single_file_inputs(tmp_path):
    spec = SeriesSpec(make_slices(4))
    paths = write_series(tmp_path / "series", spec, shuffle_seed=5)
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in paths:
            zf.write(p, f"nested/{p.name}")
    volume = read_volume(archive, progress=False)
    assert_matches_spec(volume, spec)
    assert volume.dicom.files[0].startswith(str(archive))
    assert_matches_spec(read_volume(paths[0], progress=False), spec)


def test_zip_slip_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../outside.dcm", b"x")
    with pytest.raises(DicomError, match="would extract outside"):
        read_volume(archive, progress=False)


def test_duplicate_file_ignored_and_conflicting_slice_refused(tmp_path):
    spec = SeriesSpec(make_slices(4))
    paths = write_series(tmp_path, spec)
    shutil.copy(paths[1], tmp_path / "COPY.dcm")
    with pytest.warns(DicomWarning, match="duplicate"):
        assert_matches_spec(read_volume(tmp_path, progress=False), spec)
    other = pydicom.dcmread(paths[1])
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    other.save_as(tmp_path / "COPY.dcm")
    with pytest.raises(DicomError, match="different slices at the same position"):
        read_volume(tmp_path, progress=False)


def _blank_instance_uids(path, also_file_meta=False):
    """Blank the file's SOPInstanceUID as the sample's anonymiser did (and its file meta's copy too if asked)."""
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ""
    if also_file_meta:
        ds.file_meta.MediaStorageSOPInstanceUID = ""
    ds.save_as(path)


@pytest.mark.parametrize("also_file_meta", [False, True], ids=["uid-in-file-meta", "no-uid-at-all"])
def test_copies_of_anonymised_files_are_one_series_and_a_different_slice_there_is_refused(tmp_path, also_file_meta):
    """SOPInstanceUID blank (the sample's anonymisation): a file's instance is the file meta's
    MediaStorageSOPInstanceUID, or without one its bytes. Every file copied once under another name reads as the
    series with one note; another slice moved onto a taken position is still refused, naming both files."""
    spec = SeriesSpec(make_slices(4))
    paths = write_series(tmp_path, spec)
    for path in paths:
        _blank_instance_uids(path, also_file_meta)
        shutil.copy(path, path.with_name(f"{path.stem}_copy.dcm"))
    with pytest.warns(DicomWarning, match=r"4 duplicate file\(s\) ignored \(the same instance stored again at a "
                                          r"slice's position\): at InstanceNumber 1, z .* mm \(index 0\), and 3 more "
                                          r"slice\(s\)$"):
        volume = read_volume(tmp_path, progress=False)
    assert not any("IMG" in w or str(tmp_path) in w for w in volume.warnings)
    assert_matches_spec(volume, spec)
    assert volume.dicom.files == [str(path) for path in paths]
    assert len(set(volume.dicom.sop_instance_uids)) == 4
    other = pydicom.dcmread(paths[2])
    other.ImagePositionPatient = pydicom.dcmread(paths[1]).ImagePositionPatient
    other.save_as(tmp_path / "OTHER.dcm")
    with pytest.raises(DicomError, match=r"OTHER.dcm and .*IMG0001.dcm are different slices at the same position"):
        read_volume(tmp_path, progress=False)


def test_patient_identity_kept_for_seg_but_not_described(tmp_path):
    write_series(tmp_path, SeriesSpec(make_slices(3)))
    volume = read_volume(tmp_path, progress=False)
    assert volume.dicom.headers[0].PatientID == "SECRET-ID-42"  # highdicom will need it
    text = repr(volume.describe()) + repr(volume.dicom)
    assert "SECRET" not in text and "Secret" not in text
    assert volume.dicom.patient_age == "061Y" and volume.dicom.patient_sex == "F"


def test_repair_uids_fills_only_empty_ones_and_copies(tmp_path):
    from ctzoo.io import repair_uids

    spec = SeriesSpec(make_slices(3))
    paths = write_series(tmp_path, spec)
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    datasets[0].SeriesInstanceUID = datasets[1].SeriesInstanceUID = datasets[2].SeriesInstanceUID = ""
    datasets[1].SOPInstanceUID = ""
    repaired, notes = repair_uids(datasets, "key")
    assert datasets[1].SOPInstanceUID == "" and datasets[0].SeriesInstanceUID == ""  # inputs untouched
    assert len({ds.SeriesInstanceUID for ds in repaired}) == 1 and repaired[0].SeriesInstanceUID.startswith("2.25.")
    assert repaired[1].SOPInstanceUID == datasets[1].file_meta.MediaStorageSOPInstanceUID
    assert repaired[0].StudyInstanceUID == spec.study_uid  # present UIDs are kept
    assert repair_uids(datasets, "key")[0][0].SeriesInstanceUID == repaired[0].SeriesInstanceUID  # deterministic
    assert repair_uids(datasets, "other")[0][0].SeriesInstanceUID != repaired[0].SeriesInstanceUID
    assert len(notes) == 2
