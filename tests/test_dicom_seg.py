"""DICOM SEG out and back on the embedded sample: frame references, segment identity, exact masks, UIDs and
refusals. Runs on synthetic organ blobs always, and on TotalSegmentator's real organ labels when fetched."""

import copy
import dataclasses

import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from ctzoo.datasets import samples
from ctzoo.io.dicom_seg import read_dicom_seg_labels, source_headers, write_dicom_seg
from ctzoo.io.dicom_seg_codes import segment_coding

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
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == segment_coding(item.SegmentLabel).type.value
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


ANATOMICAL, ABNORMAL, TISSUE = (codes.cid7150.AnatomicalStructure, codes.cid7150.MorphologicallyAbnormalStructure,
                                codes.cid7150.Tissue)


@pytest.mark.parametrize(("name", "category", "type_", "modifier", "region"), [
    ("liver", ANATOMICAL, codes.SCT.Liver, None, None),
    ("vertebrae", ANATOMICAL, codes.SCT.Vertebra, None, None),
    ("kidney_left", ANATOMICAL, codes.SCT.Kidney, codes.SCT.Left, None),
    ("urinary_bladder", ANATOMICAL, codes.SCT.Bladder, None, None),
    ("Vessel", ANATOMICAL, codes.SCT.BloodVessel, None, None),  # MSD Task08
    ("cancer", ABNORMAL, codes.SCT.Neoplasm, None, None),  # MSD Task03, 06, 07
    ("Tumour", ABNORMAL, codes.SCT.Neoplasm, None, None),  # MSD Task08
    ("colon cancer primaries", ABNORMAL, codes.cid7194.NeoplasmPrimary, None, codes.SCT.Colon),  # MSD Task10
    ("liver metastases", ABNORMAL, codes.cid7194.NeoplasmSecondary, None, codes.SCT.Liver),
    ("lung nodules", ABNORMAL, codes.SCT.Nodule, None, codes.SCT.Lung),
    ("subcutaneous_fat", TISSUE, codes.cid7191.AdiposeTissue, None, None),
    ("Anterior", TISSUE, codes.SCT.Tissue, None, None),  # a qualifier, not a structure: neutral, not Organ
])
def test_segment_codes_match_category_and_type(name, category, type_, modifier, region):
    coding = segment_coding(name)
    assert (coding.category, coding.type, coding.modifier, coding.anatomic_region) == (category, type_, modifier,
                                                                                      region)
    assert coding.known == (name != "Anterior")


def test_msd_class_names_are_coded_as_what_they_are_and_pass_dciodvfy(sample_volume, tmp_path, caplog):
    """MSD label names (as configs/template_seg_msd_example.yaml trains on them) and an unknown one in a SEG: the
    category matches the type, tumours are not organs, laterality and region are coded, the unknown one is neutral
    Tissue with a warning, and the object conforms."""
    import highdicom as hd
    from dicom_validation import assert_dciodvfy_clean

    names = ["liver", "cancer", "Vessel", "colon cancer primaries", "kidney_left", "blorp"]
    labels = np.zeros(sample_volume.array.shape, np.uint8)
    for value in range(1, len(names) + 1):
        labels[5, 40 * value:40 * value + 20, 100:140] = value
    with caplog.at_level("WARNING", logger="ctzoo.io.dicom_seg_codes"):
        path = write_dicom_seg(labels, sample_volume, names, tmp_path / "msd.dcm", "template-seg-msd", "0.1.0")
    assert [r.getMessage() for r in caplog.records if "blorp" in r.getMessage()]
    seg = hd.seg.segread(path)
    found = {}
    for number in seg.segment_numbers:
        described = seg.get_segment_description(number)
        found[described.segment_label] = (described.segmented_property_category.value,
                                          described.segmented_property_type.value)
    assert found == {"liver": ("91723000", "10200004"), "cancer": ("49755003", "108369006"),
                     "Vessel": ("91723000", "59820001"), "colon cancer primaries": ("49755003", "372087000"),
                     "kidney_left": ("91723000", "64033007"), "blorp": ("85756007", "85756007")}
    items = {item.SegmentLabel: item for item in pydicom.dcmread(path).SegmentSequence}
    kidney_type = items["kidney_left"].SegmentedPropertyTypeCodeSequence[0]
    assert kidney_type.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Left"
    assert items["colon cancer primaries"].AnatomicRegionSequence[0].CodeValue == codes.SCT.Colon.value
    assert_dciodvfy_clean(path)


def test_series_number_and_equipment(sample_volume, tmp_path):
    """The series number is the source's plus 1000, or a fixed valid one where that overflows IS (2**31 - 1); the
    versions are in Software Versions, not in the Device Serial Number (type 1: the algorithm's name)."""
    labels = synthetic_labels(sample_volume.array.shape)

    def written(series_number):
        volume = dataclasses.replace(sample_volume, dicom=dataclasses.replace(sample_volume.dicom,
                                                                              series_number=series_number))
        return pydicom.dcmread(write_dicom_seg(labels, volume, CLASSES, tmp_path / f"{series_number}.dcm",
                                               "template-seg-abdomen", "0.1.0"))

    assert [int(written(n).SeriesNumber) for n in (None, 7, 2**31 - 1001, 2**31 - 1000, 2147483000)] == [
        1000, 1007, 2**31 - 1, 9101, 9101]
    seg = written(7)
    assert seg.DeviceSerialNumber == "template-seg-abdomen" and seg.ManufacturerModelName == "template-seg-abdomen"
    assert seg.SoftwareVersions[0] == "0.1.0" and seg.SoftwareVersions[1].startswith("ctzoo ")


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


def test_header_values_highdicom_refuses_are_left_empty_in_the_seg_and_named_without_their_value(sample_volume,
                                                                                                  tmp_path):
    """A PatientBirthDate as '1970-01-31', a PatientSex holding a name, a StudyTime as '12:00': highdicom refused
    each, and the SEG was lost for an optional (type-2) attribute."""
    import warnings

    from ctzoo.io.dicom_scan import DicomWarning

    headers = copy.deepcopy(sample_volume.dicom.headers)
    for ds in headers:
        ds["PatientBirthDate"].value, ds["PatientSex"].value, ds["StudyTime"].value = "1970-01-31", "ZZTOP", "12:00"
    volume = dataclasses.replace(sample_volume, dicom=dataclasses.replace(sample_volume.dicom, headers=headers))
    labels = synthetic_labels(sample_volume.array.shape)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = write_dicom_seg(labels, volume, CLASSES, tmp_path / "seg.dcm", "m", "1.0.0")
    seg = pydicom.dcmread(path)
    assert (seg.PatientBirthDate, seg.PatientSex, seg.StudyTime) == ("", "", "")
    assert seg.PatientID == sample_volume.dicom.headers[0].PatientID and seg.StudyDate == headers[0].StudyDate
    [said] = [str(w.message) for w in caught if issubclass(w.category, DicomWarning)]
    assert said.startswith("PatientBirthDate, PatientSex, StudyTime: not a valid DICOM value")
    assert "1970" not in said and "ZZTOP" not in said
    assert headers[0].PatientSex == "ZZTOP"  # the volume's own headers are untouched


def test_headers_are_reread_from_files_when_not_kept(sample_volume, tmp_path):
    bare = dataclasses.replace(sample_volume, dicom=dataclasses.replace(sample_volume.dicom, headers=[]))
    completed = source_headers(bare)
    assert [ds.SOPInstanceUID for ds in completed] == sample_volume.dicom.sop_instance_uids
    assert {ds.StudyInstanceUID for ds in completed} == {sample_volume.dicom.study_instance_uid}  # repaired UIDs
