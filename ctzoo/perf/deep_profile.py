"""On-demand deep profiles of anomalous model runs: ONNX Runtime's per-operator profile, or ``torch.profiler``'s.

A latency anomaly says *which* stage was slow, on *which* input; a deep profile says *where in the model* the time
goes. Profiling every run would cost far more than the detector (ONNX Runtime writes an event per node per run),
so it is **armed on demand** with a budget: ``--perf-profile N`` when a process starts, ``POST /v2/perf/profile``
in a running service. While the budget lasts, each ``model`` event judged anomalous has its inputs run **again**
under the profiler, on the profiler's own thread, one at a time, and the profile is stored with the anomaly (the
provenance store's ``profiles`` table).

The anomalous run itself cannot be profiled after the fact. What the rerun says is where a run of that input
spends its time now, and whether the slowness **reproduces**: a rerun as slow as the anomaly points at the input
or the model; a rerun as fast as the key's median points at the moment (contention, a stall, a noisy neighbour).
Both are what an operator needs before reaching for a bigger machine.

A profile is ``{"tool", "rerun_s", "anomaly_s", "ops": [{"op", "seconds", "calls"}...] (slowest first),
"trace"}``: ``trace`` is the profiler's Chrome-trace JSON (chrome://tracing, https://ui.perfetto.dev), kept
gzip-compressed up to :data:`MAX_TRACE_BYTES`.
"""

from __future__ import annotations

import gzip
import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

logger = logging.getLogger("ctzoo.perf")

#: The largest compressed trace kept with a profile; a larger one is dropped (the op summary is kept).
MAX_TRACE_BYTES = 8 * 1024 * 1024
#: Ops listed in a profile's summary (the slowest).
TOP_OPS = 25

#: What a profiling rerun returns: (tool, seconds of the profiled run, ops slowest first, Chrome trace JSON).
ProfiledRun = tuple[str, float, list[dict[str, Any]], bytes]


def summarize_onnxruntime_trace(events: list[dict[str, Any]]) -> tuple[float, list[dict[str, Any]]]:
    """The last ``model_run`` of an ONNX Runtime profile (``SessionOptions.enable_profiling``): its seconds, and
    the seconds and calls of each operator type (``args.op_name`` of its ``Node`` events, ``*_kernel_time``
    only: ORT also times each node's fence and input copies) within it, slowest first."""
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    if not runs:
        raise ValueError("the ONNX Runtime profile holds no model_run event")
    run = max(runs, key=lambda e: e["ts"])  # the last: earlier runs warm the session's arenas
    start, end = run["ts"], run["ts"] + run["dur"]
    ops: dict[str, list] = {}
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        if start <= event["ts"] <= end:
            entry = ops.setdefault(event.get("args", {}).get("op_name", "?"), [0.0, 0])
            entry[0] += event["dur"] / 1e6
            entry[1] += 1
    return run["dur"] / 1e6, _ranked(ops)


def _ranked(ops: dict[str, list]) -> list[dict[str, Any]]:
    rows = [{"op": op, "seconds": seconds, "calls": calls} for op, (seconds, calls) in ops.items()]
    return sorted(rows, key=lambda row: -row["seconds"])[:TOP_OPS]


def profile_onnxruntime(make_session: Callable[[Any], Any], inputs: dict[str, Any], warmup: int = 1) -> ProfiledRun:
    """Run ``inputs`` through a fresh session made by ``make_session(options)`` with profiling on (ONNX Runtime
    profiles a session from its creation to ``end_profiling``, never a single run of a live session): ``warmup``
    runs, then the profiled one. The profile file is read and deleted."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="ctzoo-ort-profile-") as folder:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "ort")
        session = make_session(options)
        for _ in range(warmup + 1):
            session.run(None, inputs)
        trace = Path(session.end_profiling()).read_bytes()
    seconds, ops = summarize_onnxruntime_trace(json.loads(trace))
    return "onnxruntime", seconds, ops, trace


def profile_torch(run: Callable[[], Any], warmup: int = 1) -> ProfiledRun:
    """``run()`` (a model call on the anomalous inputs) under ``torch.profiler`` after ``warmup`` plain calls:
    the seconds of the profiled call and each operator's own time (``self_cpu_time_total``, and the device's
    where the run used one), slowest first."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.inference_mode():
        for _ in range(warmup):
            run()
        with profile(activities=activities) as profiler:
            started = time.perf_counter()
            run()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
    ops = {}
    for row in profiler.key_averages():
        own = row.self_cpu_time_total + getattr(row, "self_device_time_total", 0.0)
        ops[row.key] = [own / 1e6, row.count]
    with tempfile.TemporaryDirectory(prefix="ctzoo-torch-profile-") as folder:
        path = Path(folder) / "trace.json"
        profiler.export_chrome_trace(str(path))
        trace = path.read_bytes()
    return "torch", seconds, _ranked(ops), trace


class DeepProfiler:
    """Profiles anomalous model runs while its budget lasts, one at a time on its own thread, and stores each
    profile with its anomaly (``store``: a :class:`~ctzoo.perf.provenance.ProvenanceStore`, or None to only keep
    them in :attr:`profiles`). Thread-safe."""

    def __init__(self, store, budget: int = 0) -> None:
        self.store, self.budget = store, int(budget)
        self.done = self.failed = self.skipped_busy = 0
        self.profiles: list[dict[str, Any]] = []  # without a store: the profiles taken (newest last)
        self._busy = False
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    @property
    def armed(self) -> bool:
        return self.budget > 0

    @property
    def busy(self) -> bool:
        """Whether a profile is being taken now (its rerun competes with the work for the machine)."""
        return self._busy

    def arm(self, count: int) -> int:
        """Profile the next ``count`` anomalous model runs (on top of what is armed); the budget now."""
        if count < 0:
            raise ValueError(f"a profile budget cannot be negative, got {count}")
        with self._lock:
            self.budget += int(count)
            return self.budget

    def offer(self, anomaly_id: int | None, anomaly_s: float, rerun: Callable[[], ProfiledRun]) -> bool:
        """Profile an anomaly's inputs with ``rerun`` (a :func:`profile_onnxruntime` or :func:`profile_torch`
        call bound to them) if the budget allows and no profile is running; whether it was taken on."""
        with self._lock:
            if self.budget <= 0:
                return False
            if self._busy:  # one at a time: a burst of anomalies must not turn into a burst of profiling
                self.skipped_busy += 1
                return False
            self.budget -= 1
            self._busy = True
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="ctzoo-perf-profile")
        self._executor.submit(self._profile, anomaly_id, anomaly_s, rerun)
        return True

    def _profile(self, anomaly_id: int | None, anomaly_s: float, rerun: Callable[[], ProfiledRun]) -> None:
        try:
            tool, seconds, ops, trace = rerun()
            packed = gzip.compress(trace)
            profile = {"anomaly_id": anomaly_id, "tool": tool, "rerun_s": seconds, "anomaly_s": anomaly_s,
                       "ops": ops, "trace": packed if len(packed) <= MAX_TRACE_BYTES else None}
            if self.store is not None and anomaly_id is not None:
                self.store.save_profile(profile)
            else:
                self.profiles.append(profile)
            with self._lock:
                self.done += 1
        except Exception:  # a profile is a bonus: its failure must never touch the work it watches
            logger.exception("perf: the deep profile of anomaly %s failed", anomaly_id)
            with self._lock:
                self.failed += 1
        finally:
            with self._lock:
                self._busy = False

    def status(self) -> dict[str, int]:
        with self._lock:
            return {"budget": self.budget, "done": self.done, "failed": self.failed,
                    "skipped_busy": self.skipped_busy}

    def close(self) -> None:
        """Wait for the profile being taken (its store must still be open)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
