"""``ctzoo infer`` stopped from outside: SIGTERM (systemd, kill, Slurm, Kubernetes) stops it as Ctrl-C does, its
worker processes never outlive it, and what a killed run half wrote is swept by the next."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from infer_runs import stop_after_first_case
from stub_tasks import stub_task

from ctzoo.inference.inputs import CaseInput
from ctzoo.inference.pipeline import PipelineOptions, run_pipeline
from ctzoo.inference.start_method import end_with_parent
from ctzoo.io import Volume, write_volume
from ctzoo.io.atomic import atomic_path, remove_partial_files

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; prctl is Linux's")


def _children(pid: int) -> set[int]:
    children = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children |= {int(c) for c in (task / "children").read_text().split()}
    return children


def _gone(pids: set[int], seconds: float) -> bool:
    """Whether every process of ``pids`` ended within ``seconds`` (a zombie, dead but not yet reaped, counts)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists()
                 and Path(f"/proc/{p}/stat").read_text().split(") ")[-1][0] != "Z"]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def test_a_killed_runs_partial_files_are_swept_before_the_case_and_summary_are_written(tmp_path):
    """``kill -9`` mid-write leaves ``.detections.<hex>.partial.json`` beside the case's files (an exception removes
    its own; a killed process cannot); the next run of the case, and of OUT's summary, removes them."""
    out = tmp_path / "out"
    case = CaseInput("ct", write_volume(Volume(np.zeros((2, 8, 8), np.float32), spacing=(1.0, 1.0, 2.0)),
                                        tmp_path / "ct.nii.gz"))
    stale = [out / "ct" / ".detections.0123abcd.partial.json", out / "ct" / ".labels.89abcdef.partial.nii.gz",
             out / ".summary.fedcba98.partial.csv"]
    kept = [out / "ct" / "notes.partial.txt", out / "ct" / ".hidden"]
    for path in (*stale, *kept):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("half")
    with atomic_path(tmp_path / "names" / "labels.nii.gz") as temporary:  # the names atomic_path writes under
        temporary.write_text("half")
        assert remove_partial_files(temporary.parent) == [temporary]
        temporary.write_text("whole")
    [row] = run_pipeline([case], stub_task(), PipelineOptions(out=out, workers=0, progress=False))
    assert row["status"] == "ok"
    assert not [p for p in stale if p.exists()] and all(p.exists() for p in kept)


def _sleep_as_worker(run_pid: int) -> None:
    end_with_parent(run_pid)
    time.sleep(120)


def _run_with_a_worker(pid_file: str) -> None:
    """A run's process: starts a worker as the pipeline does, says its pid, and waits to be killed."""
    worker = multiprocessing.get_context("fork").Process(target=_sleep_as_worker, args=(os.getpid(),))
    worker.start()
    Path(pid_file).write_text(str(worker.pid))
    time.sleep(120)


@linux_only
def test_a_worker_ends_with_its_run_however_the_run_ends(tmp_path):
    """The run killed outright (``kill -9``, the OOM killer) cannot shut its workers down: the kernel ends them
    (prctl PR_SET_PDEATHSIG). Before, a model copy waited for ever on its pipe, holding about a GB."""
    pid_file = tmp_path / "worker.pid"
    run = multiprocessing.get_context("fork").Process(target=_run_with_a_worker, args=(str(pid_file),))
    run.start()
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and run.is_alive()
            time.sleep(0.05)
        worker = int(pid_file.read_text())
        os.kill(run.pid, signal.SIGKILL)
        run.join()
        assert _gone({worker}, 10), "the worker outlived its run"
    finally:
        if run.is_alive():
            run.kill()


@linux_only
def test_sigterm_stops_a_real_run_as_ctrl_c_does_and_leaves_no_worker(tmp_path, sample_volume):
    """``ctzoo infer`` with a model copy in a worker process, sent SIGTERM once its first case is written (to the
    main process alone, as ``kill PID`` does): exit 143 with the interrupted message, summary.csv lists the cases
    that finished, no partial file, and its worker gone with it. Before, SIGTERM killed the main process where it
    stood: the worker lived on, holding its memory, half-written files stayed and no summary said what finished."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_volume(dataclasses.replace(sample_volume, array=np.ascontiguousarray(sample_volume.array[:4]), dicom=None),
                 inputs / "case0.nii.gz")
    for k in range(1, 4):
        shutil.copyfile(inputs / "case0.nii.gz", inputs / f"case{k}.nii.gz")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "ctzoo", "infer", str(inputs), "--out", str(out), "--workers", "1",
               "--layout", "copies", "--no-overlay", "--batch-size", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    workers = []

    def sigterm() -> None:
        workers.extend(_children(process.pid))
        assert workers
        process.send_signal(signal.SIGTERM)

    stderr = stop_after_first_case(process, out, sigterm)
    assert process.returncode == 143, stderr
    assert "interrupted (SIGTERM)" in stderr and "--resume runs the rest" in stderr and "Traceback" not in stderr
    assert _gone(workers, 10), "a worker outlived the run"
    assert not [p for p in out.rglob("*") if ".partial" in p.name]
    finished = {p.parent.name for p in out.glob("*/status-recistnet-mini.json")}
    assert (out / "summary.csv").read_text().count("\n") - 1 == len(finished) >= 1
