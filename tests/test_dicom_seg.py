"""DICOM SEG out and back on the embedded sample: frame references, segment identity, exact masks, UIDs and
refusals. Runs on synthetic organ blobs always, and on TotalSegmentator's real organ labels when fetched."""

import copy
import dataclasses

import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from ctzoo.datasets import samples
from ctzoo.io.dicom_seg import read_dicom_seg_labels, segment_property_type, source_headers, write_dicom_seg

CLASSES = ["liver", "spleen", "stomach", "aorta", "vertebrae"]


def synthetic_labels(shape):
    """Boxes for liver (1), stomach (3) and vertebrae (5) on some slices; spleen and aorta absent."""
    labels = np.zeros(shape, np.uint8)
    labels[2:9, 150:260, 60:200] = 1
    labels[5:7, 180:230, 300:360] = 3
    labels[0:20:3, 330:380, 230:280] = 5
    return labels


@pytest.fixture(scope="module", params=["synthetic", "totalsegmentator"])
def labels(request, sample_volume):
    if request.param == "synthetic":
        return synthetic_labels(sample_volume.array.shape)
    from ctzoo.datasets.segmentation import totalsegmentator_cases
    try:
        case = totalsegmentator_cases()["test"][0]
    except samples.SampleError as exc:
        pytest.skip(f"TotalSegmentator samples not fetched: {exc}")
    assert case.image.dicom.sop_instance_uids == sample_volume.dicom.sop_instance_uids
    return case.labels


@pytest.fixture(scope="module")
def written(labels, sample_volume, tmp_path_factory):
    path = tmp_path_factory.mktemp("seg") / "organs.dcm"
    assert write_dicom_seg(labels, sample_volume, CLASSES, path, "template-seg-abdomen", "0.1.0") == path
    return path


def test_round_trip_is_exact(written, labels, sample_volume):
    assert np.array_equal(read_dicom_seg_labels(written, sample_volume, CLASSES), labels)


def test_frames_reference_their_source_slices_and_empty_frames_are_omitted(written, labels, sample_volume):
    seg = pydicom.dcmread(written)
    present = [v for v in range(1, len(CLASSES) + 1) if (labels == v).any()]
    uids = sample_volume.dicom.sop_instance_uids
    expected = sorted((uids[k], number) for number, v in enumerate(present, 1)
                      for k in np.flatnonzero((labels == v).any(axis=(1, 2))))
    found = []
    for frame, item in zip(seg.pixel_array.reshape(-1, seg.Rows, seg.Columns), seg.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        k = uids.index(uid)
        # the frame sits where its source slice does, and holds exactly that slice's class
        assert np.allclose([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
                           sample_volume.dicom.image_positions[k])
        assert np.array_equal(frame.astype(bool), labels[k] == present[number - 1])
        found.append((uid, number))
    assert sorted(found) == expected and int(seg.NumberOfFrames) == len(expected)


def test_segments_identity_and_uids(written, labels, sample_volume):
    seg = pydicom.dcmread(written)
    source = sample_volume.dicom
    present = [CLASSES[v - 1] for v in range(1, len(CLASSES) + 1) if (labels == v).any()]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == present
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == list(range(1, len(present) + 1))
    for item in seg.SegmentSequence:
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Anatomical Structure"
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == segment_property_type(item.SegmentLabel).value
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("template-seg-abdomen", "0.1.0")
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == source.study_instance_uid
    assert seg.FrameOfReferenceUID == source.frame_of_reference_uid
    assert seg.SeriesInstanceUID != source.series_instance_uid
    assert {r.SeriesInstanceUID for r in seg.ReferencedSeriesSequence} == {source.series_instance_uid}


def test_uids_are_deterministic_and_versioned(labels, sample_volume, tmp_path):
    first, again, newer = (pydicom.dcmread(write_dicom_seg(labels, sample_volume, CLASSES, tmp_path / f"{n}.dcm",
                                                           "template-seg-abdomen", version))
                           for n, version in (("a", "0.1.0"), ("b", "0.1.0"), ("c", "0.2.0")))
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    assert first.SOPInstanceUID != newer.SOPInstanceUID and first.SeriesInstanceUID != newer.SeriesInstanceUID


def test_another_segmentation_gets_other_uids(labels, sample_volume, tmp_path):
    """Other weights or precision change some voxels: that SEG is another object (a PACS keeps the first content
    stored under a UID), and so is one whose class names differ; the same labels again give the same UIDs."""
    def uids(values, classes, name):
        seg = pydicom.dcmread(write_dicom_seg(values, sample_volume, classes, tmp_path / name, "template-seg-abdomen",
                                              "0.1.0"))
        return seg.SOPInstanceUID, seg.SeriesInstanceUID

    changed = labels.copy()
    changed[tuple(np.argwhere(labels > 0)[0])] = 0  # one voxel fewer
    renamed = ["liver-v2", *CLASSES[1:]]
    first, again = uids(labels, CLASSES, "a.dcm"), uids(labels.copy(), CLASSES, "b.dcm")
    found = {first, uids(changed, CLASSES, "c.dcm"), uids(labels, renamed, "d.dcm")}
    assert first == again and len(found) == 3 and len({uid for pair in found for uid in pair}) == 6


def test_property_type_codes():
    assert segment_property_type("liver") == codes.SCT.Liver
    assert segment_property_type("vertebrae") == codes.SCT.Vertebra
    assert segment_property_type("urinary_bladder_wall_thing") == codes.SCT.Organ


def test_refusals(sample_volume, tmp_path):
    labels = synthetic_labels(sample_volume.array.shape)
    out = tmp_path / "x.dcm"
    with pytest.raises(ValueError, match="shape"):
        write_dicom_seg(labels[:-1], sample_volume, CLASSES, out, "m", "1.0.0")
    with pytest.raises(ValueError, match="not read from DICOM"):
        write_dicom_seg(labels, dataclasses.replace(sample_volume, dicom=None), CLASSES, out, "m", "1.0.0")
    with pytest.raises(ValueError, match=r"0\.\.2"):
        write_dicom_seg(labels, sample_volume, CLASSES[:2], out, "m", "1.0.0")
    with pytest.raises(ValueError, match="empty"):
        write_dicom_seg(np.zeros_like(labels), sample_volume, CLASSES, out, "m", "1.0.0")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_missing_header_attributes_are_supplied_without_touching_the_volume(sample_volume, tmp_path):
    headers = copy.deepcopy(sample_volume.dicom.headers)  # Dataset(h) would share (and strip) h's elements
    for ds in headers:
        for keyword in ("PatientID", "AccessionNumber", "StudyID", "SliceThickness"):
            delattr(ds, keyword)
    source = dataclasses.replace(sample_volume.dicom, headers=headers)
    stripped = dataclasses.replace(sample_volume, dicom=source)
    completed = source_headers(stripped)
    assert "PatientID" not in headers[0] and completed[0].PatientID == ""  # completed on a copy
    assert float(completed[0].SliceThickness) == pytest.approx(sample_volume.spacing[2])
    labels = synthetic_labels(sample_volume.array.shape)
    path = write_dicom_seg(labels, stripped, CLASSES, tmp_path / "seg.dcm", "m", "1.0.0")
    assert np.array_equal(read_dicom_seg_labels(path, sample_volume, CLASSES), labels)
    assert "PatientID" in sample_volume.dicom.headers[0]


def test_headers_are_reread_from_files_when_not_kept(sample_volume, tmp_path):
    bare = dataclasses.replace(sample_volume, dicom=dataclasses.replace(sample_volume.dicom, headers=[]))
    completed = source_headers(bare)
    assert [ds.SOPInstanceUID for ds in completed] == sample_volume.dicom.sop_instance_uids
    assert {ds.StudyInstanceUID for ds in completed} == {sample_volume.dicom.study_instance_uid}  # repaired UIDs
