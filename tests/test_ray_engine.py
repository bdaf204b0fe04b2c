"""``ctzoo infer --engine ray`` gives the local engine's files, errors and summary, and resumes like it."""

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from bundle_edits import halve_weights
from series_variants import lowest_slices

from ctzoo.datasets.samples import sample_ct_dicom
from ctzoo.inference import ray_engine
from ctzoo.inference.inputs import discover_cases
from ctzoo.inference.pipeline import SUMMARY_FILE, PipelineOptions, run_pipeline, status_path
from ctzoo.inference.tasks import model_task
from ctzoo.io import write_volume

MODEL = "recistnet-mini"


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance for the module (run_ray joins it instead of starting its own)."""
    ray = pytest.importorskip("ray")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("RAY_ADDRESS", raising=False)
        started = ray_engine.connect(workers=1)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def cases(tmp_path_factory, sample_volume):
    """A DICOM series (the sample's 6 lowest slices, where the model finds a lesion), a small NIfTI (8 slices: both
    keep CPU time low) and a corrupt NIfTI, given by paths relative to the working folder (which Ray's workers do
    not share)."""
    root = tmp_path_factory.mktemp("work")
    lowest_slices(sample_ct_dicom(), 6, root / "in" / "patient" / "ct")
    small = sample_volume.with_array(sample_volume.array)
    small.array, small.dicom = np.ascontiguousarray(sample_volume.array[6:14]), None
    write_volume(small, root / "in" / "small.nii.gz")
    (root / "in" / "broken.nii.gz").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        yield discover_cases(["in"])


@pytest.fixture(scope="module")
def both(ray_instance, cases):  # Ray first: its workers never saw the working folder
    """(local rows, ray rows, local out, ray out) over the same cases."""
    local_out, ray_out = Path("local-out"), Path("ray-out")
    local = run_pipeline(cases, model_task(MODEL, "torch", "cpu"),
                         PipelineOptions(out=local_out, workers=1, progress=False))
    ray_rows = ray_engine.run_ray(cases, MODEL, PipelineOptions(out=ray_out, workers=1, progress=False),
                                  device="cpu", threads=1)
    return local, ray_rows, local_out, ray_out


def read_summary(out):
    with open(out / SUMMARY_FILE, newline="") as handle:
        return list(csv.DictReader(handle))


def test_ray_matches_local_engine(both, cases):
    local, ray_rows, local_out, ray_out = both
    assert [r["case"] for r in ray_rows] == [c.name for c in cases] == [r["case"] for r in local]
    assert [(r["case"], r["status"], r["error"], r["slices"]) for r in ray_rows] == \
        [(r["case"], r["status"], r["error"], r["slices"]) for r in local]
    assert [(r["case"], r["status"], r["error"]) for r in read_summary(ray_out)] == \
        [(r["case"], r["status"], r["error"]) for r in read_summary(local_out)]
    statuses = {r["case"]: r["status"] for r in ray_rows}
    assert statuses == {"broken": "error", "small": "ok", "patient_ct": "ok"}
    assert ray_rows[0]["error"] == ("in/broken.nii.gz: not a readable NIfTI file (damaged or truncated?): File "
                                    "in/broken.nii.gz is not a gzip file")
    assert next(r for r in ray_rows if r["case"] == "patient_ct")["findings"] > 0  # the comparison below is not empty

    for row in (r for r in ray_rows if r["status"] == "ok"):
        assert row["outputs"] == next(r for r in local if r["case"] == row["case"])["outputs"]
        expected, got = (json.loads((out / row["case"] / "detections.json").read_text())
                         for out in (local_out, ray_out))
        # what predicted the case is recorded by the model actor, not by the writer that wrote it
        assert got["runtime"] == expected["runtime"] == {"backend": "torch", "device": "cpu", "precision": "fp32",
                                                         "compiled": False, "decoder": "gdcm",
                                                         "preprocessing": "cpu"}
        expected, got = expected["lesions"], got["lesions"]
        assert len(got) == len(expected) == row["findings"]
        for a, b in zip(got, expected):
            assert a["slice"] == b["slice"]
            assert a["score"] == pytest.approx(b["score"], abs=1.5e-5)  # both rounded to 5 decimals
            assert np.allclose(a["points_voxel"], b["points_voxel"], atol=1.5e-3)
            assert np.allclose(a["points_mm"], b["points_mm"], atol=1.5e-3)
        status = json.loads(status_path(ray_out, next(c for c in cases if c.name == row["case"]), MODEL).read_text())
        # the row, and what --resume compares (ctzoo.inference.resume)
        assert {name: status.pop(name) for name in row} == row and set(status) == {"settings", "input_identity"}


def test_resume_redoes_only_failed_cases(both, cases):
    _, ray_rows, _, ray_out = both
    stamps = {c.name: status_path(ray_out, c, MODEL).stat().st_mtime_ns for c in cases}
    options = PipelineOptions(out=ray_out, workers=1, progress=False, resume=True)
    again = ray_engine.run_ray(cases, MODEL, options, device="cpu", threads=1, other_rows=[{"case": "earlier"}])
    assert again == ray_rows  # the finished rows as saved, the corrupt case failing again with the same message
    for case in cases:
        touched = status_path(ray_out, case, MODEL).stat().st_mtime_ns != stamps[case.name]
        assert touched == (case.name == "broken")
    assert [r["case"] for r in read_summary(ray_out)] == ["earlier", *(c.name for c in cases)]


def test_ray_runs_the_bundle_folder_it_is_given(both, cases, tmp_path):
    """A user's bundle under the zoo model's name and version (``ctzoo infer --model ./mine --engine ray``), its
    weights halved and its operating point lowered: the actors predict with its weights, the writers report from its
    threshold, and the case's lesions and the settings --resume compares (weights, precision) are the local engine's
    with that bundle, not the zoo copy's."""
    from ctzoo.models.bundle import load_bundle

    mine = tmp_path / "mine"
    shutil.copytree(load_bundle(MODEL).folder, mine)
    halve_weights(mine)
    card = json.loads((mine / "card.json").read_text())
    card["operating_point"]["score_threshold"] = 0.05
    (mine / "card.json").write_text(json.dumps(card))
    case = [c for c in cases if c.name == "patient_ct"]
    outs = {"local": tmp_path / "local", "ray": tmp_path / "ray"}
    run_pipeline(case, model_task(mine, "torch", "cpu"), PipelineOptions(out=outs["local"], workers=0, progress=False))
    ray_engine.run_ray(case, mine, PipelineOptions(out=outs["ray"], workers=1, progress=False), device="cpu", threads=1)
    local, ray = ({name: json.loads((out / "patient_ct" / name).read_text())
                   for name in ("detections.json", f"status-{MODEL}.json")} for out in outs.values())
    assert ray["detections.json"]["score_threshold"] == local["detections.json"]["score_threshold"] == 0.05
    found = {engine: (np.array([d["slice"] for d in files["detections.json"]["lesions"]]),
                      np.array([d["score"] for d in files["detections.json"]["lesions"]]))
             for engine, files in (("local", local), ("ray", ray))}
    assert len(found["ray"][0]) > 0 and np.array_equal(found["ray"][0], found["local"][0])
    assert np.allclose(found["ray"][1], found["local"][1], atol=1.5e-5)
    zoo = json.loads((both[2] / "patient_ct" / "detections.json").read_text())["lesions"]
    assert len(zoo) != len(found["ray"][0]) or not np.allclose([d["score"] for d in zoo], found["ray"][1], atol=1e-3)
    assert ray[f"status-{MODEL}.json"]["settings"] == local[f"status-{MODEL}.json"]["settings"]
    assert ray[f"status-{MODEL}.json"]["settings"]["weights"] == load_bundle(mine).weights_digest()


def test_model_stage_failure_fails_the_batch_cases_only():
    """A batch whose forward pass raises: its slice rows carry the local engine's message, end rows pass."""
    from ctzoo.inference.tasks import ModelTask

    def predict(batch):
        raise RuntimeError("CUDA out of memory")

    stage = ray_engine._Predictor.__new__(ray_engine._Predictor)
    stage.task = ModelTask(MODEL, "0", "detection", None, predict, None, None)
    images = np.empty(3, dtype=object)
    images[:] = [np.zeros((3, 32, 32), np.float32), np.zeros((3, 32, 32), np.float32), ray_engine._NO_IMAGE]
    out = stage({"case": np.array([0, 1, 1]), "slice": np.array([0, 0, -1]), "image": images,
                 "payload": np.array([b"", b"", b"end"], dtype=object), "error": np.array(["", "", ""], dtype=object)})
    assert list(out["error"]) == ["model failed: RuntimeError: CUDA out of memory"] * 2 + [""]
    assert list(out["payload"]) == [b"", b"", b"end"]
    assert list(out["batch_cases"]) == ["0,1"] * 3  # the cases of its slices: the driver's predict event names them


def test_placement():
    assert ray_engine._placement("auto", 0) == ("cpu", 1, {"num_cpus": 1})
    assert ray_engine._placement("cpu", 4) == ("cpu", 1, {"num_cpus": 1})
    assert ray_engine._placement("auto", 2) == ("cuda", 2, {"num_gpus": 1, "num_cpus": 1})
    assert ray_engine._placement("cuda:1", 1)[:2] == ("cuda", 1)
    with pytest.raises(RuntimeError, match="no GPU"):
        ray_engine._placement("cuda", 0)
    with pytest.raises(ValueError, match="unknown device"):
        ray_engine._placement("tpu", 0)


def test_missing_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'ctzoo\[ray\]'"):
        ray_engine._import_ray()
