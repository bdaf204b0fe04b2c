"""How ``ctzoo infer`` lays out its work (``ctzoo.inference.schedule``) and the pipeline's ``copies`` layout: worker
processes each running whole cases on their own copy of the model give the same files as one process."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from stub_tasks import STAND_IN_ERROR, stub_task

from ctzoo.cli import main
from ctzoo.datasets.samples import sample_ct_dicom
from ctzoo.inference.inputs import CaseInput
from ctzoo.inference.pipeline import PipelineOptions, run_pipeline
from ctzoo.inference.schedule import MAX_COPIES, MAX_GPU_READERS, Schedule, choose_schedule
from ctzoo.io import read_volume, write_volume


def test_the_cpu_gets_copies_sharing_out_the_cores_and_a_gpu_one_fed_model():
    assert choose_schedule("cpu", cases=6, cores=2) == Schedule("copies", 2, 1)
    assert choose_schedule("cpu", cases=3, cores=8) == Schedule("copies", 3, 2)  # 2 cores idle: 8 // 3 threads
    assert choose_schedule("cpu", cases=100, cores=32) == Schedule("copies", MAX_COPIES, 4)
    # one case: one copy on every core in this process, the serial rate exactly
    assert choose_schedule("cpu", cases=1, cores=4) == Schedule("copies", 0, 4)
    # a GPU: a reader per case, up to every core but this process's (the model does not use the cores)
    assert choose_schedule("cuda", cases=6, cores=16) == Schedule("shared", 6, None)
    assert choose_schedule("cuda", cases=100, cores=16) == Schedule("shared", 15, None)
    assert choose_schedule("cuda", cases=1000, cores=128) == Schedule("shared", MAX_GPU_READERS, None)
    assert choose_schedule("cuda:1", cases=6, cores=2) == Schedule("shared", 1, None)
    # a placed network cannot be copied: the shared layout, whatever the device
    assert choose_schedule("cpu", cases=6, cores=2, can_copy=False) == Schedule("shared", 1, None)


def test_what_the_user_gives_is_kept_and_the_rest_follows():
    assert choose_schedule("cpu", cases=10, cores=8, threads=4) == Schedule("copies", 2, 4)
    assert choose_schedule("cpu", cases=10, cores=8, workers=2) == Schedule("copies", 2, 4)
    assert choose_schedule("cpu", cases=10, cores=8, workers=0) == Schedule("copies", 0, 8)
    assert choose_schedule("cpu", cases=10, cores=8, threads=16) == Schedule("copies", 0, 16)
    assert choose_schedule("cpu", cases=10, cores=8, layout="shared", workers=3, threads=5) == Schedule("shared", 3, 5)
    with pytest.raises(ValueError, match="on cuda use layout shared"):
        choose_schedule("cuda", cases=2, layout="copies")
    with pytest.raises(ValueError, match="placed network"):
        choose_schedule("cpu", cases=2, layout="copies", can_copy=False)
    with pytest.raises(ValueError, match="unknown layout 'fast'"):
        choose_schedule("cpu", cases=2, layout="fast")


def _nifti(path: Path, first: int, slices: int, nan: bool = False) -> Path:
    volume = read_volume(sample_ct_dicom(), progress=False)
    array = volume.array[first:first + slices].astype(np.float32)
    if nan:
        array[1, :4, :4] = np.nan
    return write_volume(dataclasses.replace(volume, array=array, dicom=None), path)


@pytest.fixture(scope="module")
def four_cases(tmp_path_factory) -> list[CaseInput]:
    """Four cases of different sizes (so copies finish at different times) and one that cannot be read."""
    root = tmp_path_factory.mktemp("cases")
    cases = [CaseInput(f"part{k}", _nifti(root / f"part{k}.nii.gz", 2 * k, 6 + 4 * k)) for k in range(3)]
    cases.append(CaseInput("dicom", sample_ct_dicom()))
    (root / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    cases.insert(2, CaseInput("broken", root / "broken.nii.gz"))
    return cases


def _lesions(out: Path, case: str) -> list[dict]:
    return json.loads((out / case / "detections.json").read_text())["lesions"]


@pytest.fixture(scope="module")
def one_process_runs(four_cases, tmp_path_factory):
    """Per backend, the shared layout's run in this process (out folder, rows, task), made once for the module."""
    from ctzoo.export.repository import ensure_graphs
    from ctzoo.inference.tasks import model_task
    from ctzoo.models import load_bundle

    runs = {}

    def run(backend: str):
        if backend not in runs:
            bundle = load_bundle("recistnet-mini")
            task = model_task(ensure_graphs(bundle) if backend == "onnx" else bundle, backend, "cpu",
                              score_threshold=0.05, threads=1)
            out = tmp_path_factory.mktemp(f"one-{backend}")
            runs[backend] = out, run_pipeline(four_cases, task, PipelineOptions(out=out, workers=0, overlay=False,
                                                                                progress=False)), task
        return runs[backend]

    return run


@pytest.mark.parametrize("backend,threads", [("torch", 1), ("onnx", 1), ("torch", 2)])
def test_copies_in_worker_processes_write_what_one_process_writes(four_cases, one_process_runs, tmp_path, backend,
                                                                  threads):
    """Two copies (each a fresh backend in a forked worker: ONNX Runtime sessions do not survive a fork; PyTorch on
    2 threads in a spawned one, as a forked child would hang in OpenMP) take the cases in turn: every case's
    detections equal those of the shared layout run in this process, the unreadable case fails alone with its
    message, and every batch is accounted for in the batch log."""
    one, reference, task = one_process_runs(backend)
    log: list = []
    rows = run_pipeline(four_cases, task, PipelineOptions(out=tmp_path / "copies", layout="copies", workers=2,
                                                          copy_threads=threads, batch_size=4, overlay=False,
                                                          progress=False, batch_log=log))
    assert [r["case"] for r in rows] == [c.name for c in four_cases]
    assert {r["case"]: r["status"] for r in rows} == {c.name: "error" if c.name == "broken" else "ok"
                                                      for c in four_cases}
    broken = next(r for r in rows if r["case"] == "broken")
    assert broken["error"] == next(r for r in reference if r["case"] == "broken")["error"] != ""
    for row, theirs in zip(rows, reference):
        if row["status"] == "ok":
            assert row["slices"] == theirs["slices"] and row["findings"] == theirs["findings"]
            ours, expected = _lesions(tmp_path / "copies", row["case"]), _lesions(one, row["case"])
            assert len(ours) == len(expected)
            for a, b in zip(ours, expected):
                assert a["slice"] == b["slice"] and abs(a["score"] - b["score"]) < 1e-4
                np.testing.assert_allclose(a["points_mm"], b["points_mm"], atol=1e-2)
    # batches of 4 from one case each (copies never mix cases), from two worker processes other than this one
    slices = {r["case"]: int(r["slices"]) for r in rows if r["status"] == "ok"}
    assert sum(count for _, _, count, _ in log) == sum(slices.values())
    assert len(log) == sum(-(-n // 4) for n in slices.values()) and max(count for _, _, count, _ in log) == 4
    processes = {pid for _, _, _, pid in log}
    assert len(processes) == 2 and os.getpid() not in processes
    assert not [p for p in (tmp_path / "copies").rglob("*") if ".partial" in p.name]


def test_a_case_the_model_fails_on_in_a_copy_fails_alone(tmp_path):
    """A NaN volume fails at reading; a model error in a copy fails that case with the message; the rest finish."""
    root = tmp_path / "in"
    root.mkdir()
    cases = [CaseInput("nan", _nifti(root / "nan.nii.gz", 0, 5, nan=True)),
             CaseInput("big", _nifti(root / "big.nii.gz", 0, 9)), CaseInput("ok", _nifti(root / "ok.nii.gz", 0, 3))]

    stub = stub_task(fails_over=4)
    rows = run_pipeline(cases, stub, PipelineOptions(out=tmp_path / "out", layout="copies", workers=2, batch_size=8,
                                                     progress=False))
    by_case = {r["case"]: r for r in rows}
    assert by_case["ok"]["status"] == "ok" and by_case["ok"]["slices"] == 3
    assert by_case["nan"]["status"] == "error" and "voxels are NaN" in by_case["nan"]["error"]
    assert by_case["big"]["error"] == f"model failed: RuntimeError: {STAND_IN_ERROR}"
    assert json.loads((tmp_path / "out" / "big" / "status-stub-model.json").read_text())["status"] == "error"


def test_a_cancelled_run_stops_between_model_batches_and_writes_nothing(tmp_path):
    """The service's deadline sets ``cancel``: a run used to look at it only between the reader's messages, so a
    message holding many slices ran all its batches, and the case was written. Now it stops at the next batch."""
    import threading

    from ctzoo.inference.pipeline import Cancelled

    cancel, batches = threading.Event(), []
    stub = stub_task()

    def predict(batch):
        batches.append(len(batch))
        cancel.set()  # the deadline passes while the first batch runs
        return [None] * len(batch)

    task = dataclasses.replace(stub, predict=predict)
    case = CaseInput("long", _nifti(tmp_path / "long.nii.gz", 0, 20))  # 20 slices in one message
    with pytest.raises(Cancelled):
        run_pipeline([case], task, PipelineOptions(out=tmp_path / "out", workers=0, batch_size=8, chunk=32,
                                                   progress=False, cancel=cancel))
    assert batches == [8]
    assert not (tmp_path / "out" / "long" / "status-stub-model.json").exists()


def test_copies_need_a_model_that_can_be_copied(tmp_path):
    from ctzoo.inference.tasks import model_task

    task = model_task("recistnet-mini", "torch", "cpu")
    task.replicate = None
    with pytest.raises(ValueError, match="can be copied"):
        run_pipeline([CaseInput("a", sample_ct_dicom())], task,
                     PipelineOptions(out=tmp_path, layout="copies", workers=2))
    with pytest.raises(ValueError, match="unknown layout 'fast'"):
        run_pipeline([CaseInput("a", sample_ct_dicom())], task, PipelineOptions(out=tmp_path, layout="fast"))


def test_workers_are_forked_only_where_forking_is_safe():
    """ctzoo.inference.start_method: fork (the default) only from a process without other threads; a fork server
    otherwise; spawned where a child could not use what it would inherit (OpenMP, a decoder, a GPU context)."""
    from ctzoo.inference.start_method import worker_start_method

    assert worker_start_method(0, False, 1, "onnx", None, None, other_threads=3) is None  # no workers
    assert worker_start_method(2, False, 1, "onnx", None, None, other_threads=0) is None  # the CLI: forked
    assert worker_start_method(2, False, 1, "onnx", None, None, other_threads=1) == "forkserver"
    assert worker_start_method(2, True, 1, "torch", None, None, other_threads=2) == "forkserver"
    assert worker_start_method(2, True, 2, "torch", None, None, other_threads=0) == "spawn"
    assert worker_start_method(2, True, 2, "onnx", None, None, other_threads=0) is None
    assert worker_start_method(1, False, 1, "onnx", "nvimgcodec:cpu", None, other_threads=0) == "spawn"
    assert worker_start_method(1, False, 1, "torch", None, "cuda", other_threads=0) == "spawn"


def test_infer_says_which_layout_it_chose(tmp_path):
    case = str(_nifti(tmp_path / "small.nii.gz", 0, 4))
    result = CliRunner().invoke(main, ["infer", case, "--out", str(tmp_path / "a"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "recistnet-mini: layout copies: 1 model copy(ies) in this process" in result.output
    result = CliRunner().invoke(main, ["infer", case, "--out", str(tmp_path / "b"), "--device", "cpu", "--layout",
                                       "shared", "--workers", "1", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "recistnet-mini: layout shared: one model (1 thread(s)) fed by 1 reader process(es)" in result.output
    assert _lesions(tmp_path / "a", "small") == _lesions(tmp_path / "b", "small")
    # deep profiles rerun batches where the model runs: in this process, so one model, not copies
    result = CliRunner().invoke(main, ["infer", case, "--out", str(tmp_path / "c"), "--device", "cpu", "--perf",
                                       "--perf-profile", "1"])
    assert result.exit_code == 0, result.output
    assert "recistnet-mini: layout shared: one model (the backend's default thread(s))" in result.output


_FAULTS_PER_BATCH = """
import resource, sys
import numpy as np
from ctzoo.inference.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "kept" else None

def batch():  # buffers of a batch's sizes (MB), each page written once, all freed at the end
    held = []
    for mb in (3, 9, 17, 40, 5, 70):
        held.append(np.empty(mb << 18, np.float32))
        held[-1][::1024] = 1.0
batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    batch()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def test_kept_freed_memory_spares_each_batch_its_page_faults():
    """By default glibc gives a batch's large freed buffers back to the kernel, and the next batch faults their pages
    in again (about 3,100 faults a batch here; fewer where the kernel always uses huge pages); with
    ``keep_freed_memory`` (what ``ctzoo infer`` does) the next batch reuses them. Each mode in a process of its
    own: the setting lasts for the process's life."""
    import subprocess
    import sys

    runs = {mode: subprocess.run([sys.executable, "-c", _FAULTS_PER_BATCH, mode], capture_output=True, text=True,
                                 check=True).stdout.split() for mode in ("default", "kept")}
    assert runs["kept"][0] == "True"
    default, kept = float(runs["default"][1]), float(runs["kept"][1])
    assert default >= 50 and kept < 0.05 * default, runs
