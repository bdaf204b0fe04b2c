"""RECIST SR (TID 1500, Comprehensive 3D SR) out and back on the embedded sample CT series: measurements, key-slice
references, patient/study identity, dciodvfy conformance (of the SR and of the existing SEG writer), the
zero-lesion report, refusals and atomic writes."""

import copy
import dataclasses

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_validation import assert_dciodvfy_clean, dciodvfy_errors
from pydicom.sr.codedict import codes

from ctzoo.io import Volume
from ctzoo.io.dicom_seg import write_dicom_seg
from ctzoo.io.dicom_sr import COMPREHENSIVE_3D_SR, read_recist_sr, write_recist_sr

MODEL, VERSION = "recist-net", "0.1.0"
#: A made-up identity on copies of the (anonymised, identity-less) sample headers, to see the patient module copied.
PATIENT = {"PatientName": "Test^Phantom", "PatientID": "CTZOO-TEST-0001", "PatientBirthDate": "19700101",
           "PatientSex": "O"}


def lesion(volume, k, centre, half_long, half_short, score):
    """A RECIST lesion on slice ``k``: horizontal long axis, vertical short axis, through ``centre`` (i, j)."""
    i, j = centre
    voxel = np.array([[i - half_long, j, k], [i + half_long, j, k], [i, j - half_short, k], [i, j + half_short, k],
                      [i, j, k]], dtype=float)
    mm = volume.index_to_lps(voxel)
    return {"score": score, "slice": k, "slices": [k - 1, k, k + 1], "points_voxel": voxel.tolist(),
            "points_mm": mm.round(3).tolist(), "long_axis_mm": round(float(np.linalg.norm(mm[1] - mm[0])), 2),
            "short_axis_mm": round(float(np.linalg.norm(mm[3] - mm[2])), 2),
            "box_voxel": [i - half_long, j - half_short, i + half_long, j + half_short]}


def detections(volume, lesions):
    return {"model": MODEL, "model_version": VERSION,
            "input": {"series_instance_uid": volume.dicom.series_instance_uid}, "lesions": lesions}


@pytest.fixture(scope="module")
def volume(sample_volume):
    """The sample series with a test patient identity set on copies of its headers."""
    headers = copy.deepcopy(sample_volume.dicom.headers)
    for ds in headers:
        for keyword, value in PATIENT.items():
            setattr(ds, keyword, value)
    return dataclasses.replace(sample_volume, dicom=dataclasses.replace(sample_volume.dicom, headers=headers))


@pytest.fixture(scope="module")
def document(volume):
    return detections(volume, [lesion(volume, 4, (210.5, 250.0), 20, 11.5, 0.91234),
                               lesion(volume, 12, (300.0, 280.25), 14.5, 9, 0.40001)])


@pytest.fixture(scope="module")
def written(volume, document, tmp_path_factory):
    path = tmp_path_factory.mktemp("sr") / "recist.dcm"
    assert write_recist_sr(document, volume, path, MODEL, VERSION) == path
    return path


def test_measurements_and_key_slices_read_back(written, volume, document):
    found = read_recist_sr(written)
    assert [f["tracking_id"] for f in found] == ["lesion 1", "lesion 2"]
    assert len({f["tracking_uid"] for f in found}) == 2
    for got, expected in zip(found, document["lesions"]):
        assert got["long_axis_mm"] == pytest.approx(expected["long_axis_mm"])
        assert got["short_axis_mm"] == pytest.approx(expected["short_axis_mm"])
        assert got["score"] == pytest.approx(expected["score"])
        assert got["referenced_sop_instance_uid"] == volume.dicom.sop_instance_uids[expected["slice"]]
        assert np.allclose(got["points_mm"], expected["points_mm"][:4])
        # the stored end points measure what the report says
        ends = np.asarray(got["points_mm"])
        assert np.linalg.norm(ends[1] - ends[0]) == pytest.approx(got["long_axis_mm"], abs=0.01)


def test_report_structure_and_identity(written, volume):
    ds = pydicom.dcmread(written)
    source = volume.dicom
    assert ds.SOPClassUID == COMPREHENSIVE_3D_SR and ds.Modality == "SR"
    assert ds.StudyInstanceUID == source.study_instance_uid and ds.SeriesInstanceUID != source.series_instance_uid
    assert all(str(ds[k].value) == v for k, v in PATIENT.items())  # patient module copied from the source
    assert ds.StudyDate == source.headers[0].StudyDate
    assert (ds.CompletionFlag, ds.VerificationFlag, ds.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED", "PRELIMINARY")
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == source.series_instance_uid
    assert {i.ReferencedSOPInstanceUID for i in evidence.ReferencedSOPSequence} == set(source.sop_instance_uids)
    report = hd.sr.srread(written).content
    device = report.get_observer_contexts(observer_type=codes.DCM.Device)[0]
    assert device.observer_identifying_attributes.name == "ctzoo"
    # versions are in Software Versions, not in serial numbers (both optional here: none written)
    assert device.observer_identifying_attributes.serial_number is None and "DeviceSerialNumber" not in ds
    assert ds.SoftwareVersions[0] == VERSION and ds.SoftwareVersions[1].startswith("ctzoo ")
    for group in report.get_image_measurement_groups():
        assert group.finding_type.value == "52988006"  # SCT Lesion
        assert {m.unit.value for m in group.get_measurements()} == {"mm", "%"}
        for measurement in group.get_measurements()[:2]:
            assert measurement.referenced_coordinates[0].frame_of_reference_uid == source.frame_of_reference_uid


def test_uids_are_deterministic(written, volume, document, tmp_path):
    again = pydicom.dcmread(write_recist_sr(document, volume, tmp_path / "again.dcm", MODEL, VERSION))
    newer = pydicom.dcmread(write_recist_sr(document, volume, tmp_path / "newer.dcm", MODEL, "0.2.0"))
    first = pydicom.dcmread(written)
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    assert first.SOPInstanceUID != newer.SOPInstanceUID
    assert [f["tracking_uid"] for f in read_recist_sr(written)] == [f["tracking_uid"] for f in
                                                                     read_recist_sr(tmp_path / "again.dcm")]


def test_other_findings_get_other_uids_and_the_same_findings_the_same(written, volume, document, tmp_path):
    """A higher score threshold keeps fewer lesions (here: only the first; then none): each report is another
    object, since a PACS keeps the first content it stored under a UID. Identical findings share their UIDs."""
    first = pydicom.dcmread(written)
    fewer, none = (pydicom.dcmread(write_recist_sr(detections(volume, kept), volume, tmp_path / f"{len(kept)}.dcm",
                                                   MODEL, VERSION)) for kept in (document["lesions"][:1], []))
    uids = {(sr.SOPInstanceUID, sr.SeriesInstanceUID) for sr in (first, fewer, none)}
    assert len(uids) == 3 and len({uid for pair in uids for uid in pair}) == 6
    rescored = detections(volume, [dict(document["lesions"][0], score=0.5), document["lesions"][1]])
    assert pydicom.dcmread(write_recist_sr(rescored, volume, tmp_path / "rescored.dcm", MODEL,
                                           VERSION)).SOPInstanceUID != first.SOPInstanceUID
    same = copy.deepcopy(document)  # equal findings, another document object
    again = pydicom.dcmread(write_recist_sr(same, volume, tmp_path / "same.dcm", MODEL, VERSION))
    assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (first.SOPInstanceUID, first.SeriesInstanceUID)
    # lesion 1 keeps its tracking UID across reports, so a viewer follows it
    assert read_recist_sr(tmp_path / "1.dcm")[0]["tracking_uid"] == read_recist_sr(written)[0]["tracking_uid"]


def test_sr_passes_dciodvfy(written):
    assert_dciodvfy_clean(written)


def test_zero_lesions_still_make_a_valid_report(volume, tmp_path):
    path = write_recist_sr(detections(volume, []), volume, tmp_path / "none.dcm", MODEL, VERSION)
    assert_dciodvfy_clean(path)
    assert read_recist_sr(path) == []
    texts = [item for container in pydicom.dcmread(path).ContentSequence if container.ValueType == "CONTAINER"
             for item in container.ContentSequence if item.ValueType == "TEXT"]
    assert [t.TextValue for t in texts] == [f"No lesion detected by {MODEL} {VERSION}"]


def test_dciodvfy_reports_errors(written, tmp_path):
    """The helper must see real errors, or a clean result would mean nothing."""
    ds = pydicom.dcmread(written)
    del ds.StudyInstanceUID
    ds.CompletionFlag = "MAYBE"
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken)
    errors = dciodvfy_errors(broken)
    assert any("StudyInstanceUID" in e for e in errors) and any("Completion Flag" in e for e in errors)
    assert dciodvfy_errors(tmp_path / "missing.dcm")  # dciodvfy aborts: an error, not a pass


def test_refusals_leave_no_file(volume, document, tmp_path):
    out = tmp_path / "x.dcm"
    by_hand = Volume(np.zeros((3, 8, 8), np.float32), (1.0, 1.0, 2.0))
    with pytest.raises(ValueError, match=r"DICOM SR needs DICOM input.*volume\.dicom is None"):
        write_recist_sr(document, by_hand, out, MODEL, VERSION)
    with pytest.raises(ValueError, match="DICOM SR needs DICOM input"):
        write_recist_sr(document, dataclasses.replace(volume, dicom=None), out, MODEL, VERSION)
    slices = volume.array.shape[0]
    for k in (slices, -1):
        bad = detections(volume, [dict(document["lesions"][0], slice=k)])
        expected = rf"lesion 1: key slice {k} is outside the volume's slices 0\.\.{slices - 1}"
        with pytest.raises(ValueError, match=expected):
            write_recist_sr(bad, volume, out, MODEL, VERSION)
    with pytest.raises(ValueError, match="points_mm"):
        write_recist_sr(detections(volume, [dict(document["lesions"][0], points_mm=[[0, 0, 0]])]), volume, out,
                        MODEL, VERSION)
    with pytest.raises(ValueError, match="not on the volume's series"):
        write_recist_sr(dict(document, input={"series_instance_uid": "1.2.3"}), volume, out, MODEL, VERSION)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("how", ["beside", "parallel"])
def test_axes_that_are_not_recist_diameters_are_refused(volume, document, tmp_path, how):
    """The short axis of the audit's sample lesion lay 6.5 deg from the long one and did not cross it: not a
    RECIST short axis, so no report may call it one."""
    good = document["lesions"][0]
    voxel = np.asarray(good["points_voxel"], dtype=float)
    if how == "beside":  # perpendicular, but beyond the long axis's end
        voxel[2:4, 0] = voxel[1, 0] + 5
    else:  # crossing, but nearly parallel to the long axis
        voxel[2:4] = voxel[[0, 1]] + [[2, -1, 0], [-2, 1, 0]]
    mm = volume.index_to_lps(voxel)
    bad = dict(good, points_voxel=voxel.tolist(), points_mm=mm.round(3).tolist(),
               short_axis_mm=round(float(np.linalg.norm(mm[3] - mm[2])), 2))
    with pytest.raises(ValueError, match="lesion 2: its long and short axes do not cross within 60 deg"):
        write_recist_sr(detections(volume, [document["lesions"][1], bad]), volume, tmp_path / "x.dcm", MODEL,
                        VERSION)
    assert not list(tmp_path.iterdir())


def test_failing_write_leaves_no_partial_file(volume, document, tmp_path, monkeypatch):
    out = tmp_path / "recist.dcm"
    out.write_bytes(b"previous report")

    def fail_midway(self, filename, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"DICM half written")
        raise OSError("disk full")

    monkeypatch.setattr(hd.sr.Comprehensive3DSR, "save_as", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        write_recist_sr(document, volume, out, MODEL, VERSION)
    assert [p.name for p in tmp_path.iterdir()] == ["recist.dcm"] and out.read_bytes() == b"previous report"


def test_dicom_seg_passes_dciodvfy(volume, tmp_path):
    labels = np.zeros(volume.array.shape, np.uint8)
    labels[2:9, 150:260, 60:200] = 1
    labels[5:7, 180:230, 300:360] = 2
    path = write_dicom_seg(labels, volume, ["liver", "spleen"], tmp_path / "seg.dcm", "template-seg", "0.1.0")
    assert_dciodvfy_clean(path)


def all_texts(dataset) -> list[str]:
    """Every TEXT content item's value in an SR, depth first."""
    found = []
    for item in getattr(dataset, "ContentSequence", []):
        if item.ValueType == "TEXT":
            found.append(item.TextValue)
        found += all_texts(item)
    return found


def test_the_weights_digest_is_in_the_report(volume, document, tmp_path):
    """The digest of the weights that ran: every lesion's algorithm parameter, and the zero-lesion finding."""
    digest = "ab" * 32
    path = write_recist_sr(document, volume, tmp_path / "weights.dcm", MODEL, VERSION, weights_sha256=digest)
    assert_dciodvfy_clean(path)
    assert all_texts(pydicom.dcmread(path)).count(f"weights sha256 {digest}") == len(document["lesions"])
    assert read_recist_sr(path)[0]["long_axis_mm"] == pytest.approx(document["lesions"][0]["long_axis_mm"])
    none = write_recist_sr(detections(volume, []), volume, tmp_path / "none.dcm", MODEL, VERSION, weights_sha256=digest)
    assert f"No lesion detected by {MODEL} {VERSION} (weights sha256 {digest})" in all_texts(pydicom.dcmread(none))
