"""Study endpoints of ctzoo serve: a whole volume in, the same result as ``ctzoo infer --backend onnx`` out, and a
precise 4xx for every kind of bad upload while the service keeps serving. The module's service runs with a
PerfMonitor: every study's stages are timed, and no event names the patient or the upload."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from fastapi.responses import Response
from fastapi.testclient import TestClient
from orthanc_server import free_port
from perf_checks import assert_no_identifiers
from upload_builders import held_open, zip_bytes

from ctzoo.datasets.samples import sample_ct_dicom
from ctzoo.io import read_volume, write_volume

TOKEN = "study-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: What the zipped DICOM study says about its patient; no perf event may hold any of it.
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "PAT-0042"}
CASE_STAGES = {"upload", "read", "preprocess", "finish", "write"}  # keyed by the study's slices; predict by a batch's


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    from ctzoo.export.repository import export_model

    repo = tmp_path_factory.mktemp("repo")
    for name in ("recistnet-mini", "template-seg-abdomen"):
        export_model(name, repo)
    export_model("recistnet-mini", repo, fp16=True)
    return repo


@pytest.fixture(scope="module")
def perf_events() -> list:
    """Every perf event of the module's service, in the order recorded."""
    return []


@pytest.fixture(scope="module")
def client(repository, perf_events, tmp_path_factory):
    from ctzoo.perf import PerfMonitor
    from ctzoo.serve.app import create_app
    from ctzoo.serve.studies import study_router

    monitor = PerfMonitor(tmp_path_factory.mktemp("perf") / "perf.sqlite", role="serve")
    app = create_app(repository, [TOKEN], device="cpu", max_upload_mb=16, perf=monitor,
                     extra_routers=[study_router("cpu")])
    count = monitor.on_event  # the service's own handler (its Prometheus counters) stays in place

    def keep(event, label) -> None:
        perf_events.append(event)
        count(event, label)

    monitor.on_event = keep
    with TestClient(app) as test_client:
        yield test_client
    monitor.close()


@pytest.fixture(scope="module")
def small_nifti(tmp_path_factory) -> Path:
    volume = read_volume(sample_ct_dicom(), progress=False)
    path = tmp_path_factory.mktemp("ct") / "small.nii.gz"
    return write_volume(dataclasses.replace(volume, array=volume.array[4:10].copy(), dicom=None), path)


@pytest.fixture(scope="module")
def dicom_zip(sent_files) -> bytes:
    """The sample series (UIDs repaired) with a patient name and id, zipped as a client sends it."""
    return _patient_zip(sent_files, PATIENT)


def _patient_zip(sent_files: list[Path], attributes: dict[str, str]) -> bytes:
    """The sample series with ``attributes`` set in every header, zipped."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sent_files:
            dataset = pydicom.dcmread(file)
            for keyword, value in attributes.items():
                setattr(dataset, keyword, value)
            member = io.BytesIO()
            dataset.save_as(member, enforce_file_format=True)
            archive.writestr(f"series/{dataset.PatientID}-{file.name}", member.getvalue())
    return buffer.getvalue()


def _infer_reference(path: Path, bundle: Path, tmp_path: Path, backend: str = "onnx") -> Path:
    """What ``ctzoo infer --backend BACKEND --model BUNDLE`` writes for ``path``."""
    from ctzoo.inference.inputs import CaseInput
    from ctzoo.inference.pipeline import PipelineOptions, run_pipeline
    from ctzoo.inference.tasks import model_task

    [row] = run_pipeline([CaseInput("ref", path)], model_task(bundle, backend, "cpu"),
                         PipelineOptions(out=tmp_path, workers=0, overlay=False, progress=False))
    assert row["status"] == "ok", row
    return tmp_path / "ref"


def test_detector_study_equals_ctzoo_infer(client, repository, small_nifti, tmp_path):
    response = client.post("/studies/recistnet-mini", content=small_nifti.read_bytes(), headers=AUTH)
    assert response.status_code == 200, response.text
    reference = _infer_reference(small_nifti, repository / "recistnet-mini", tmp_path) / "detections.json"
    answer = response.json()
    assert {k: v for k, v in answer.items() if k != "graph"} == json.loads(reference.read_text())
    assert answer["model"] == "recistnet-mini"
    assert answer["graph"]["file"] == "recistnet-mini/1/model.onnx" and answer["graph"]["precision"] == "fp32"


def test_an_uncompressed_nifti2_upload_is_read_as_ctzoo_infer_reads_it(client, small_nifti, tmp_path):
    """Only NIfTI-1's magic (byte 344) was known: an uncompressed NIfTI-2 (magic at byte 4) got 415, though a
    gzipped one was read."""
    import nibabel as nib

    nifti1 = nib.load(str(small_nifti))
    nifti2 = tmp_path / "ct.nii"
    nib.save(nib.Nifti2Image(np.asanyarray(nifti1.dataobj), nifti1.affine), str(nifti2))
    assert nifti2.read_bytes()[4:8] == b"n+2\x00"
    response = client.post("/studies/recistnet-mini", content=nifti2.read_bytes(), headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["lesions"] == client.post("/studies/recistnet-mini", content=small_nifti.read_bytes(),
                                                     headers=AUTH).json()["lesions"]


def test_torch_backend_study_equals_ctzoo_infer_with_torch(repository, small_nifti, tmp_path):
    """ctzoo serve --backend torch runs studies on the bundle's network, as ctzoo infer --backend torch does."""
    from ctzoo.serve.app import create_app
    from ctzoo.serve.studies import study_router

    app = create_app(repository, [TOKEN], device="cpu", backend="torch", extra_routers=[study_router("cpu")])
    with TestClient(app) as client:
        response = client.post("/studies/recistnet-mini", content=small_nifti.read_bytes(), headers=AUTH)
    assert response.status_code == 200, response.text
    reference = _infer_reference(small_nifti, repository / "recistnet-mini", tmp_path, "torch") / "detections.json"
    answer = response.json()
    assert answer.pop("graph") is None and answer == json.loads(reference.read_text())
    assert answer["runtime"]["backend"] == "torch" and answer["runtime"]["precision"] == "fp32"


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fp16_study_runs_the_served_fp16_graph_and_matches_v2(client, repository, sample_volume, tmp_path):
    """/studies/<m>-fp16 answers from the fp16 graph /v2/models/<m>-fp16 serves, and on one slice both agree."""
    from ctzoo.inference.recist_volume import canvas_size, decode_heads, slice_inputs
    from ctzoo.io import reorient_lps
    from ctzoo.models import load_bundle

    one_slice = dataclasses.replace(sample_volume, array=sample_volume.array[9:10].copy(), dicom=None)
    path = write_volume(one_slice, tmp_path / "one.nii.gz")
    study = client.post("/studies/recistnet-mini-fp16?score_threshold=0.05", content=path.read_bytes(), headers=AUTH)
    assert study.status_code == 200, study.text
    graph = study.json()["graph"]
    served = repository / "recistnet-mini-fp16" / "1" / "model.onnx"
    assert graph["precision"] == "fp16" and graph["file"] == "recistnet-mini-fp16/1/model.onnx"
    assert graph["sha256"] == _sha256(served)
    # the same slice through /v2, prepared as the pipeline prepares it, decoded as the pipeline decodes it
    prep = load_bundle(repository / "recistnet-mini-fp16").preprocessing
    [(image, _)] = list(slice_inputs(reorient_lps(read_volume(path, progress=False)), prep, canvas=canvas_size(prep)))
    raw = np.ascontiguousarray(image.numpy(), np.float32).tobytes()  # KServe v2 binary tensor extension
    header = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, *image.shape],
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    reply = client.post("/v2/models/recistnet-mini-fp16/infer", content=header + raw,
                        headers={**AUTH, "Inference-Header-Content-Length": str(len(header)),
                                 "Content-Type": "application/octet-stream"})
    assert reply.status_code == 200, reply.text
    heads = {o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"]) for o in reply.json()["outputs"]}
    [(scores, _)] = decode_heads(heads, 4, 20, 0.05)
    study_scores = sorted(lesion["score"] for lesion in study.json()["lesions"])
    assert len(study_scores) == len(scores) >= 1
    np.testing.assert_allclose(study_scores, sorted(scores.tolist()), atol=1e-4)
    # and it really is the fp16 graph: the fp32 model's scores on the same slice differ beyond fp32 rounding
    fp32 = client.post("/studies/recistnet-mini?score_threshold=0.05", content=path.read_bytes(), headers=AUTH)
    fp32_scores = sorted(lesion["score"] for lesion in fp32.json()["lesions"])
    assert fp32.json()["graph"]["precision"] == "fp32"
    assert len(fp32_scores) != len(study_scores) or np.abs(np.subtract(fp32_scores, study_scores)).max() > 1e-6


def test_score_thresholds_never_open_another_onnx_session(client, small_nifti, monkeypatch):
    """The threshold is applied when decoding the heads: five thresholds over the range, no new ONNX Runtime
    session (each would cost its own arena, ~28 MB after one 512 x 512 run of this graph)."""
    import onnxruntime as ort

    first = client.post("/studies/recistnet-mini", content=small_nifti.read_bytes(), headers=AUTH)
    assert first.status_code == 200, first.text  # the study graph's session is opened at its first study
    opened = []

    class CountedSession(ort.InferenceSession):
        def __init__(self, *args, **kwargs) -> None:
            opened.append(args[0] if args else kwargs.get("path_or_bytes"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", CountedSession)
    counts = set()
    for threshold in (0.05, 0.25, 0.45, 0.65, 0.85):
        reply = client.post(f"/studies/recistnet-mini?score_threshold={threshold}",
                            content=small_nifti.read_bytes(), headers=AUTH)
        assert reply.status_code == 200, reply.text
        counts.add(len(reply.json()["lesions"]))
    assert opened == []
    assert len(counts) > 1  # the thresholds did reach the decoding


def test_segmenter_study_gives_nifti_json_and_dicom_seg(client, repository, dicom_zip, small_nifti, tmp_path,
                                                       perf_events, sent_files):
    """Also: each study's stages are perf events keyed by the study's slices, naming neither patient nor upload."""
    import highdicom as hd
    import nibabel as nib

    from ctzoo.perf import request_hash

    first_event = len(perf_events)
    labels = client.post("/studies/template-seg-abdomen?format=nifti", content=small_nifti.read_bytes(), headers=AUTH)
    assert labels.status_code == 200, labels.text
    (tmp_path / "labels.nii.gz").write_bytes(labels.content)
    reference = _infer_reference(small_nifti, repository / "template-seg-abdomen", tmp_path / "ref")
    np.testing.assert_array_equal(nib.load(tmp_path / "labels.nii.gz").get_fdata(),
                                  nib.load(reference / "labels.nii.gz").get_fdata())
    summary = client.post("/studies/template-seg-abdomen", content=dicom_zip, headers=AUTH)
    assert summary.status_code == 200 and "liver" in summary.json()["classes"]
    seg = client.post("/studies/template-seg-abdomen?format=dicom", content=dicom_zip, headers=AUTH)
    assert seg.status_code == 200 and seg.headers["content-type"] == "application/dicom"
    (tmp_path / "seg.dcm").write_bytes(seg.content)
    assert hd.seg.segread(tmp_path / "seg.dcm").number_of_segments >= 1
    sr = client.post("/studies/recistnet-mini?format=dicom&score_threshold=0.05", content=dicom_zip,
                     headers={**AUTH, "X-Request-ID": "ward-7-PAT-0042"})
    assert sr.status_code == 200 and sr.content[128:132] == b"DICM"

    events = perf_events[first_event:]
    by_study: dict[str, list] = {}
    for event in events:
        if event.stage != "predict":  # a batch, not a study: it has no series
            by_study.setdefault(event.context["series_hash"], []).append(event)
    assert len(by_study) == 4  # the upload's events and the pipeline's group under one keyed hash per study
    for study in by_study.values():
        assert {e.stage for e in study} == CASE_STAGES and len({e.key[4] for e in study}) == 1
    buckets = sorted((study[0].model, study[0].key[4]) for study in by_study.values())
    assert buckets == [("recistnet-mini", "17-32"), ("template-seg-abdomen", "17-32"),
                       ("template-seg-abdomen", "17-32"), ("template-seg-abdomen", "5-8")]  # 20 and 6 slices
    assert {e.key[4] for e in events if e.stage == "predict"} == {"3-4", "5-8"}  # batches of 8, then the rest
    [tagged] = [e for e in events if e.stage == "upload" and "request" in e.context]
    assert tagged.context["request"] == request_hash("ward-7-PAT-0042") and tagged.context["format"] == "zip"
    assert_no_identifiers(events, sent_files, *PATIENT.values(), "upload", "study-", "ctzoo-serve-")  # no path


def test_each_score_threshold_gets_its_own_sr_and_a_rerun_the_same_one(client, dicom_zip):
    """The thresholds find different lesions: each SR is its own object (a PACS keeps the first content it stored
    under a UID, and would drop the others); the same request again gives the same SR UIDs (a resend replaces)."""
    found = {}
    for threshold in (0.05, 0.3, 0.9, 0.05):
        reply = client.post(f"/studies/recistnet-mini?format=dicom&score_threshold={threshold}", content=dicom_zip,
                            headers=AUTH)
        assert reply.status_code == 200, reply.text
        sr = pydicom.dcmread(io.BytesIO(reply.content))
        uids = (sr.SOPInstanceUID, sr.SeriesInstanceUID)
        assert found.setdefault(threshold, uids) == uids
        found[threshold, "groups"] = sum(item.ConceptNameCodeSequence[0].CodeValue == "125007"  # Measurement Group
                                         for container in sr.ContentSequence if container.ValueType == "CONTAINER"
                                         for item in container.get("ContentSequence", []))
    assert found[0.05, "groups"] > found[0.3, "groups"] > found[0.9, "groups"]  # the thresholds changed findings
    assert len({found[t] for t in (0.05, 0.3, 0.9)}) == 3


def test_a_failing_dicom_writer_still_answers_json_and_says_why_there_is_no_dicom(client, dicom_zip, monkeypatch,
                                                                                 caplog):
    """The SR writer refuses the series (as it refused Japanese character sets): format=json still answers with the
    detections, format=dicom says why there is no SR; the server's log names the attribute, never its value (the
    writer's message quoted it: a birth date, a name typed into PatientSex)."""
    import ctzoo.io.dicom_sr

    def refuse(*args, **kwargs):
        raise ValueError("'ZZTOPNAME' is not a valid PatientSexValues")

    monkeypatch.setattr(ctzoo.io.dicom_sr, "write_recist_sr", refuse)
    caplog.set_level(logging.WARNING)
    reply = client.post("/studies/recistnet-mini?format=json", content=dicom_zip, headers=AUTH)
    assert reply.status_code == 200 and "lesions" in reply.json(), reply.text
    reply = client.post("/studies/recistnet-mini?format=dicom", content=dicom_zip, headers=AUTH)
    assert reply.status_code == 500 and "sr.dcm not written: 'ZZTOPNAME' is not a valid" in reply.text
    logged = [record.getMessage() for record in caplog.records]
    assert "study: sr.dcm not written (ValueError on PatientSex)" in logged, logged
    assert not [line for line in logged if "ZZTOPNAME" in line], logged


def test_a_header_value_no_dicom_writer_takes_is_left_empty_and_never_logged(client, sent_files, tmp_path, caplog):
    """A birth date as '1970-01-31' (pydicom writes it with a warning) made highdicom refuse the SR: a 500, and the
    value in the server's log. Now the SR is written with that type-2 attribute empty, the others as they were."""
    body = _patient_zip(sent_files, {**PATIENT, "PatientBirthDate": "1970-01-31", "PatientSex": "ZZTOPNAME"})
    caplog.clear()  # pydicom's warnings on writing those values here
    caplog.set_level(logging.DEBUG)
    reply = client.post("/studies/recistnet-mini?format=dicom", content=body, headers=AUTH)
    assert reply.status_code == 200, reply.text
    (tmp_path / "sr.dcm").write_bytes(reply.content)
    sr = pydicom.dcmread(tmp_path / "sr.dcm")
    assert (sr.PatientBirthDate, sr.PatientSex) == ("", "")
    assert (str(sr.PatientName), sr.PatientID) == (PATIENT["PatientName"], PATIENT["PatientID"])
    assert not [r.getMessage() for r in caplog.records if "1970-01-31" in r.getMessage() or "ZZTOP" in r.getMessage()]


def _twice_named_slice_zip() -> bytes:
    """The 20 sample slices as s/000.dcm to s/019.dcm, then slice 1 once more as s/000.dcm."""
    import warnings

    files = sorted(Path(sample_ct_dicom()).iterdir())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile's "Duplicate name" warning
        for k, file in enumerate(files):
            archive.write(file, f"s/{k:03d}.dcm")
        archive.write(files[1], "s/000.dcm")
    return buffer.getvalue()


def test_bad_uploads_get_a_precise_4xx_and_the_service_keeps_serving(client, small_nifti):
    good = small_nifti.read_bytes()
    cases = [
        ("recistnet-mini", b"\x1f\x8b" + bytes(2000), 400, "file type"),  # corrupt NIfTI
        ("recistnet-mini", good[: len(good) // 2], 400, ""),  # truncated NIfTI
        ("recistnet-mini", zip_bytes({"notes.txt": b"hello"}), 400, "no DICOM files"),  # a zip that is not DICOM
        ("recistnet-mini", zip_bytes({"s": b"x", "s/000.dcm": b"y"}), 400,  # a member both file and folder
         "cannot extract 's/000.dcm': another member of the archive has the same path"),
        ("recistnet-mini", _twice_named_slice_zip(), 400,  # the second 000.dcm replaced slice 0: 200, 19 slices
         "the upload: the archive holds two members named 's/000.dcm'"),
        ("recistnet-mini", zip_bytes({"a/bomb.dcm": bytes(80 << 20)}), 413, "--max-inflate-ratio"),  # zip bomb
        ("recistnet-mini", b"just some bytes that are not a volume", 415, "unsupported upload"),
        ("no-such-model", good, 404, "unknown model"),
        ("recistnet-mini", bytes(17 << 20), 413, "upload limit"),  # over max_upload_mb
    ]
    for model, body, status, message in cases:
        response = client.post(f"/studies/{model}", content=body, headers=AUTH)
        assert response.status_code == status, (message, response.text)
        assert message in response.json()["error"]
        assert "upload.nii" not in response.json()["error"] and "/tmp" not in response.json()["error"]
        assert "ctzoo-zip-" not in response.json()["error"] and "studies/" not in response.json()["error"]
    assert client.post("/studies/recistnet-mini?format=nifti", content=good, headers=AUTH).status_code == 400
    assert client.post("/studies/recistnet-mini?format=xml", content=good, headers=AUTH).status_code == 400
    assert client.post("/studies/recistnet-mini", content=good).status_code == 401
    assert client.post("/studies/recistnet-mini", content=good, headers=AUTH).status_code == 200


def _nifti_bytes(tmp_path: Path, shape: tuple[int, int, int], spacing: float) -> bytes:
    import nibabel as nib

    array = np.random.default_rng(0).integers(-500, 500, shape).astype(np.int16)
    path = tmp_path / "upload.nii.gz"
    nib.save(nib.Nifti1Image(array, np.diag([spacing, spacing, spacing, 1.0])), str(path))
    return path.read_bytes()


def _never_run(monkeypatch) -> list:
    """Replace the study worker by one that records its calls: what a test expects to be refused before it."""
    from ctzoo.serve import studies

    ran = []
    monkeypatch.setattr(studies, "run_study", lambda *args, **kwargs: ran.append(args) or Response(b"{}"))
    return ran


def test_implausible_spacing_is_a_400_before_anything_is_reserved(client, tmp_path, monkeypatch):
    """A 1.7 KB NIfTI of 32 x 32 x 1 voxels at 1875 mm made the segmenter allocate ~5 GB (a raw torch allocation
    error at 1e6 mm, a TypeError at 1e30 mm): refused from its header now, naming neither path nor file."""
    ran = _never_run(monkeypatch)
    for spacing in (1875.0, 1e6, 1e30):
        response = client.post("/studies/template-seg-abdomen", content=_nifti_bytes(tmp_path, (32, 32, 1), spacing),
                               headers=AUTH)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert "voxel spacing" in error and "is not a CT's" in error and "the upload" in error
        assert "upload.nii" not in error and "/" not in error.split("mm")[0]
    assert ran == []


def test_a_format_that_cannot_answer_is_refused_before_the_study_runs(client, small_nifti, monkeypatch):
    """format=nifti of a detector and format=dicom of a NIfTI upload were refused only once the whole study had run."""
    ran = _never_run(monkeypatch)
    for model, output_format, words in (("recistnet-mini", "nifti", "format=nifti is for segmentation models"),
                                        ("template-seg-abdomen", "dicom", "format=dicom answers a zipped DICOM")):
        response = client.post(f"/studies/{model}?format={output_format}", content=small_nifti.read_bytes(),
                               headers=AUTH)
        assert response.status_code == 400 and words in response.json()["error"], response.text
    assert ran == []


def test_a_segmenter_study_reserves_its_canvas_for_every_slice(client, tmp_path, monkeypatch):
    """A 1 x 1 x 30000 NIfTI (a few KB; 30000 voxels, 360 KB at 12 bytes a voxel) puts 30000 slices of 128 x 128 on
    the segmenter's canvas (~8 GB): the reservation counts them, so it is a 413 before any work; the detector,
    which prepares its slices a few at a time, takes it."""
    ran = _never_run(monkeypatch)
    thin = _nifti_bytes(tmp_path, (1, 1, 30000), 1.0)
    response = client.post("/studies/template-seg-abdomen", content=thin, headers=AUTH)
    assert response.status_code == 413 and "--max-inflight-mb" in response.json()["error"], response.text
    assert ran == []
    assert client.post("/studies/recistnet-mini", content=thin, headers=AUTH).status_code == 200
    assert len(ran) == 1


def test_warnings_name_slices_never_members_or_server_paths(client, caplog):
    """Member names often hold the patient's name or record number: the warnings on a gapped series with a
    duplicate file, logged by the server and returned in input.warnings, used to name them with the server's
    state path (state/studies/study-.../upload.zip/DOE^JOHN_MRN1234567/IMG0011.dcm). They name slices now."""
    import logging

    files = sorted(Path(sample_ct_dicom()).iterdir())
    members = {f"DOE^JOHN_MRN1234567/IMG{k:04d}.dcm": file.read_bytes() for k, file in enumerate(files) if k != 10}
    members["DOE^JOHN_MRN1234567/copy_of_IMG0003.dcm"] = files[3].read_bytes()
    caplog.set_level(logging.WARNING, logger="ctzoo.inference.tasks")
    response = client.post("/studies/recistnet-mini", content=zip_bytes(members), headers=AUTH)
    assert response.status_code == 200, response.text
    warnings = response.json()["input"]["warnings"]
    logged = [record.getMessage() for record in caplog.records if record.name == "ctzoo.inference.tasks"]
    assert any("missing slice" in w for w in warnings) and any("duplicate" in w for w in warnings), warnings
    assert any("missing slice" in line for line in logged) and len(logged) == len(warnings)
    for text in warnings + logged:
        for secret in ("DOE", "MRN1234567", "IMG00", "upload", "study-", "/"):
            assert secret not in text, text
    assert any("InstanceNumber" in w and "(index 9)" in w for w in warnings)


def test_nan_volume_is_refused(client, tmp_path):
    volume = read_volume(sample_ct_dicom(), progress=False)
    array = volume.array[:4].copy()
    array[1, 10, 10] = np.nan
    path = write_volume(dataclasses.replace(volume, array=array, dicom=None), tmp_path / "nan.nii.gz")
    response = client.post("/studies/recistnet-mini", content=path.read_bytes(), headers=AUTH)
    assert response.status_code == 400 and "NaN" in response.json()["error"]


def test_folders_without_a_whole_bundle_have_no_study_endpoint(repository, tmp_path):
    """A repository folder written by an older ctzoo export (a graph, no weights or bundle.json) still serves /v2."""
    from ctzoo.serve.app import create_app
    from ctzoo.serve.studies import study_router

    repo = tmp_path / "repo"
    shutil.copytree(repository / "recistnet-mini", repo / "my-run")
    config = json.loads((repo / "my-run" / "ctzoo.json").read_text())
    config.update(name="my-run", source="runs/my-run/best.pt")
    (repo / "my-run" / "ctzoo.json").write_text(json.dumps(config))
    (repo / "my-run" / "bundle.json").unlink()
    with TestClient(create_app(repo, [TOKEN], device="cpu", extra_routers=[study_router("cpu")])) as client:
        response = client.post("/studies/my-run", content=b"\x1f\x8b", headers=AUTH)
    assert response.status_code == 404 and "tensor inference only" in response.json()["error"]
    with pytest.raises(ValueError, match="--backend torch runs the bundle's own network, but .* is not a whole bundle"):
        create_app(repo, [TOKEN], device="cpu", backend="torch")


def test_a_study_past_its_deadline_is_cancelled_and_its_folder_removed(repository, dicom_zip, tmp_path):
    """504 at the deadline; the worker stops at its next stage boundary and removes its folder; one ONNX Runtime
    session serves every threshold."""
    import time

    from ctzoo.serve.app import create_app
    from ctzoo.serve.studies import study_router

    router = study_router("cpu", state_dir=tmp_path / "state", request_timeout_s=0.3)
    app = create_app(repository, [TOKEN], device="cpu", request_timeout_s=0.3, extra_routers=[router])
    with TestClient(app) as client:
        # the session exists before the clock starts: on a slow machine, building it could take the whole 0.3 s,
        # and the request would then end before its worker started (CI once saw no session at all)
        model = app.state.repository["recistnet-mini"]
        router.tasks.get(model, router.tasks.bundle(model), None)
        response = client.post("/studies/recistnet-mini", content=dicom_zip, headers=AUTH,
                               params={"score_threshold": 0.9})
        assert response.status_code == 504, response.text
        deadline = time.monotonic() + 60
        while list((tmp_path / "state" / "studies").iterdir()):
            assert time.monotonic() < deadline, "the cancelled study's folder is still there"
            time.sleep(0.1)
    assert router.tasks.sessions == 1


def _held_worker(monkeypatch) -> tuple[threading.Event, list]:
    """Replace the study worker by one in a stage that never looks at its cancel event (reading a large series)
    until the returned event is set; the list gets each call's cancel event."""
    from ctzoo.serve import studies

    release, calls = threading.Event(), []

    def worker(task, folder, suffix, output_format, limits, cancel, *rest):
        calls.append(cancel)
        release.wait(60)
        shutil.rmtree(folder, ignore_errors=True)
        return Response(b"{}", media_type="application/json")

    monkeypatch.setattr(studies, "run_study", worker)
    return release, calls


def _wait_until(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_a_timed_out_study_keeps_its_slot_and_memory_until_its_worker_returns(repository, small_nifti, tmp_path,
                                                                             monkeypatch):
    """With one request per model, three studies past their deadline used to run at once: the 504 gave back the
    slot and the memory reservation while the worker thread went on. Now the worker is told to stop and both are
    held until it has returned: meanwhile the next study is refused as busy (503), afterwards it is served."""
    from ctzoo.serve.app import create_app
    from ctzoo.serve.budget import ServeLimits
    from ctzoo.serve.studies import study_router

    release, calls = _held_worker(monkeypatch)
    router = study_router("cpu", state_dir=tmp_path / "state", request_timeout_s=0.5)
    app = create_app(repository, [TOKEN], device="cpu", request_timeout_s=0.5, extra_routers=[router],
                     limits=ServeLimits(max_requests_per_model=1, queue_wait_s=0.1))
    body = small_nifti.read_bytes()
    with TestClient(app) as client:
        assert client.post("/studies/recistnet-mini", content=body, headers=AUTH).status_code == 504
        assert len(calls) == 1 and calls[0].is_set()  # told to stop
        assert app.state.budget.reserved > 0
        busy = client.post("/studies/recistnet-mini", content=body, headers=AUTH)
        assert busy.status_code == 503 and busy.headers["Retry-After"], busy.text
        assert len(calls) == 1
        release.set()
        _wait_until(lambda: app.state.budget.reserved == 0)
        assert client.post("/studies/recistnet-mini", content=body, headers=AUTH).status_code == 200
    assert not list((tmp_path / "state" / "studies").iterdir())


def test_a_client_that_disconnects_cancels_its_study(repository, small_nifti, tmp_path, monkeypatch):
    """A client that goes away after its upload no longer keeps its slot until the study ends: the worker is told
    to stop (and the slot is free once it has)."""
    import socket

    import uvicorn

    from ctzoo.serve.app import create_app
    from ctzoo.serve.budget import ServeLimits
    from ctzoo.serve.studies import study_router

    release, calls = _held_worker(monkeypatch)
    app = create_app(repository, [TOKEN], device="cpu", limits=ServeLimits(max_requests_per_model=1),
                     extra_routers=[study_router("cpu", state_dir=tmp_path / "state")])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _wait_until(lambda: server.started)
        body = small_nifti.read_bytes()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            connection.sendall(f"POST /studies/recistnet-mini HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}"
                               f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            _wait_until(lambda: calls)
        _wait_until(lambda: calls[0].is_set(), 10)  # the disconnect reached the study
        release.set()
        _wait_until(lambda: app.state.budget.reserved == 0)
    finally:
        release.set()
        server.should_exit = True
        thread.join(10)


def test_ctzoo_serve_perf_keeps_the_study_stages_in_its_store(repository, small_nifti, tmp_path):
    """The CLI's wiring: ``ctzoo serve --perf`` times a study's stages into STATE/perf.sqlite, whose totals and key
    statistics are written when SIGTERM stops the service."""
    from ctzoo.perf import ProvenanceStore

    port, state = free_port(), tmp_path / "state"
    with (tmp_path / "serve.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "ctzoo", "serve", "--repository", str(repository), "--port", str(port),
             "--threads", "1", "--state-dir", str(state), "--no-access-log", "--perf"],
            stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "CTZOO_SERVE_TOKENS": TOKEN, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _ready(url):
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        for _ in range(2):  # the detector skips each key's first event: the second is what its statistics keep
            response = httpx.post(f"{url}/studies/recistnet-mini", content=small_nifti.read_bytes(), headers=AUTH,
                                  timeout=60)
            assert response.status_code == 200, response.text
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, (tmp_path / "serve.log").read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    store = ProvenanceStore(state / "perf.sqlite", read_only=True)
    assert store.reduction()["seen"] == 2 * (len(CASE_STAGES) + 1)  # and one batch a study: its 6 slices
    keys = {(row["model"], row["stage"], row["bucket"]) for row in store.key_states()}
    assert keys == {("recistnet-mini", stage, "5-8") for stage in CASE_STAGES | {"predict"}}


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/v2/health/ready").status_code == 200
    except httpx.TransportError:
        return False


def test_uploads_held_open_mid_body_do_not_lock_other_studies_out(repository, small_nifti, tmp_path):
    """The model's slot was taken before the upload was read: max-requests-per-model clients trickling their
    uploads held every slot and everyone else got 503. Now an upload holds memory only, the slot once it is in."""
    import asyncio

    from ctzoo.serve.app import create_app
    from ctzoo.serve.budget import ServeLimits
    from ctzoo.serve.studies import study_router

    app = create_app(repository, [TOKEN], device="cpu", extra_routers=[study_router("cpu", state_dir=tmp_path)],
                     limits=ServeLimits(max_requests_per_model=1, queue_wait_s=1.0))
    body = small_nifti.read_bytes()

    async def scenario():
        release = asyncio.Event()


        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as http:
            slow = asyncio.ensure_future(http.post("/studies/recistnet-mini", content=held_open(body, release),
                                                   headers={**AUTH, "Content-Length": str(len(body))}))
            await asyncio.sleep(0.3)
            assert not slow.done()  # still uploading
            response = await http.post("/studies/recistnet-mini", content=body, headers=AUTH)
            assert response.status_code == 200, response.text
            release.set()
            assert (await slow).status_code == 200
        assert app.state.budget.reserved == 0

    asyncio.run(scenario())
