"""The batch inference pipeline behind ``ctzoo infer``: readers -> batched model -> writer.

Stages (the model's parts are :class:`ctzoo.inference.tasks.ModelTask`), in the ``shared`` layout::

    reader processes (--workers)          main process                       writer thread
    read + decode + preprocess a case --> batches of slices from any     --> finish + write the case
    (chunks of slices, shared memory)     volume -> backend -> decode         (atomic files, status, summary)

and in the ``copies`` layout (the CPU's; :mod:`ctzoo.inference.schedule` says why and picks the counts)::

    worker processes (--workers), each with its own model copy         main process + writer thread
    read + preprocess + predict whole cases, taken in turn          --> finish + write the case
    (only the outputs and the volume cross processes)

* Workers are ``torch.utils.data`` workers over an iterable of cases (``in_order=False``: a worker done with a
  small case never waits behind one reading a large case). Shared: slices travel in chunks through shared memory,
  each reader taking every ``workers``-th case. Copies: each worker takes the next case not yet taken.
* Shared: the model never waits for one volume: slices of consecutive volumes fill the same batch. With
  ``preprocess_device`` (``ctzoo infer --preprocess-on model``) the readers only read and decode, and the main
  process computes each slice's input on the model's device (a GPU), where the batch stays.
* The reader stage's functions are :mod:`ctzoo.inference.reader`.
* A case that fails to read, preprocess, predict or write is recorded with its error in ``summary.csv``
  and ``OUT/<case>/status-<model>.json``; the batch goes on. One whose DICOM result alone (SR, SEG) could not be
  written is ok with the writer's error in ``dicom_error``: its JSON and NIfTI results stand.
* Every file is written under a temporary name and renamed; the status file is written last, so ``--resume``
  skips exactly the cases whose outputs are complete, and only where they were made with the same settings from
  the same input (:mod:`ctzoo.inference.resume`). Ctrl-C lets the case being written finish, records it
  in ``summary.csv`` with the others that finished, leaves no partial file and re-raises KeyboardInterrupt
  (``ctzoo infer`` then exits 130).
* ``seconds`` in ``summary.csv`` is each case's own wall time, from when its reader started reading it to
  when its outputs were written (:func:`case_seconds`); ``read_s`` is the reader's own work on it (read, decode,
  preprocess; not the time it waited for the model to take its slices).
* ``perf``: every stage is an event of the latency anomaly detector (:mod:`ctzoo.inference.stage_events`).
* Progress (:class:`ctzoo.inference.progress.Progress`): a bar over cases on a terminal; off one, INFO lines of
  logger ``ctzoo.inference.pipeline`` every ``progress_interval_s`` seconds (slices done, slices/s, ETA) and
  one per finished case.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import inspect
import io
import json
import logging
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ctzoo.inference.allocator import keep_freed_memory
from ctzoo.inference.inputs import CaseInput
from ctzoo.inference.progress import Progress
from ctzoo.inference.reader import (  # noqa: F401 (axial_slices, read_case: for the PACS bridge and Ray)
    axial_slices,
    error_message,
    predict_case,
    preprocessed_here,
    read_case,
)
from ctzoo.inference.resume import REUSABLE, input_identity, output_settings, read_status, rerun_reason, resume_summary
from ctzoo.inference.stage_events import batch_context, case_context, record_batch, record_case_stages
from ctzoo.inference.start_method import end_with_parent, worker_start_method
from ctzoo.inference.tasks import ModelTask, preprocess_on
from ctzoo.io import Volume
from ctzoo.io.atomic import atomic_path, remove_partial_files

SUMMARY_FILE = "summary.csv"
#: ``dicom_error``: why a case that is ok lacks its DICOM result (the SR or SEG writer failed; ctzoo.inference.tasks)
SUMMARY_FIELDS = ["case", "input", "model", "model_version", "status", "error", "slices", "findings", "detail",
                  "read_s", "seconds", "outputs", "dicom_error"]
#: Cases read but not yet written that the main process may hold (their volumes stay in memory).
MAX_PENDING_WRITES = 4

log = logging.getLogger(__name__)


@dataclass
class PipelineOptions:
    out: Path
    batch_size: int = 8
    workers: int = 1
    chunk: int = 8  # slices per message from a reader
    resume: bool = False
    overlay: bool = True
    series: str | None = None
    rules: Any = None  # SeriesRules or None
    progress: bool = True  # a bar on a terminal, log lines off one; False: neither (service, PACS bridge)
    progress_interval_s: float = 10.0  # off a terminal: seconds between two progress lines
    limits: Any = None  # ResourceLimits for reading each case (None: ctzoo.io's defaults)
    # a threading.Event: once set, the run stops (Cancelled) at its next check: between the reader's messages (chunks
    # of slices), between model batches, and before a case is written; reading and preprocessing a case run to
    # their end (see check_cancel)
    cancel: Any = None
    perf: Any = None  # a ctzoo.perf.PerfMonitor judging every stage (ctzoo.inference.stage_events), or None
    # "shared": one model here, fed by `workers` reader processes; "copies": `workers` processes each running
    # whole cases on a copy of the model with `copy_threads` threads (0 workers: one copy, here); see
    # ctzoo.inference.schedule. The service and the PACS bridge keep their one model: shared.
    layout: str = "shared"
    copy_threads: int = 1
    # a list, or None: every model batch appends (start, end, slices, process id), wall clock (time.time()):
    # how busy the model was (benchmarks/infer.py)
    batch_log: list | None = None
    # how the readers decode DICOM's JPEG 2000: None (GDCM) or an nvImageCodec spec, "nvimgcodec:cuda:0"
    # (ctzoo.inference.decoding.choose_decoder); with one, worker processes are spawned, not forked
    decoder: str | None = None
    # where the model's inputs are computed: None, in the readers on the CPU; a device ("cuda"), in this process on
    # that device, the readers (spawned) only reading (ctzoo infer --preprocess-on model; shared layout, torch)
    preprocess_device: str | None = None


class Cancelled(RuntimeError):
    """The run's ``cancel`` event was set (the service's deadline passed): it stopped between two stages."""


def check_cancel(options: PipelineOptions) -> None:
    """:class:`Cancelled` once ``options.cancel`` is set."""
    if options.cancel is not None and options.cancel.is_set():
        raise Cancelled("the run was cancelled")


def status_path(out: Path, case: CaseInput, model_name: str) -> Path:
    return out / case.name / f"status-{model_name}.json"


# ------------------------------------------------------------------------------------------------ reader


class CaseStream(IterableDataset):
    """The workers' stage as a PyTorch iterable dataset. Shared layout: each worker reads every
    ``num_workers``-th case. Copies (``copy_threads`` set): each worker makes its own copy of the model and runs the
    next case no worker has taken yet (a counter in shared memory), so a worker done early takes more cases."""

    def __init__(self, cases: list[CaseInput], task: ModelTask, chunk: int, series: str | None, rules: Any,
                 limits: Any = None, copy_threads: int | None = None, start_method: str | None = None,
                 decoder: str | None = None, read_only: bool = False):
        self.cases, self.task, self.chunk, self.series, self.rules = cases, task, chunk, series, rules
        self.decoder, self.read_only = decoder, read_only
        self.limits, self.copy_threads, self.replicate = limits, copy_threads, task.replicate
        # the workers' start method (None: the default) must also make the counter they share
        context = multiprocessing.get_context(start_method)
        self.taken = context.Value("q", 0) if copy_threads is not None else None

    def __getstate__(self) -> dict[str, Any]:
        # to a spawned worker: a copy builds its model with `replicate` (which pickles: the bundle and the backend's
        # kind); a reader needs `preprocess` alone (it pickles). The other stage functions are closures: they stay
        reader = dataclasses.replace(self.task, predict=None, finish=None, write=None, profile=None, replicate=None)
        return {**self.__dict__, "task": None if self.copy_threads is not None else reader}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        if self.copy_threads is None:
            share, step = (worker.id, worker.num_workers) if worker else (0, 1)
            for index in range(share, len(self.cases), step):
                yield from read_case(index, self.cases[index], self.task, self.chunk, self.series, self.rules,
                                     self.limits, decoder=self.decoder, preprocess=not self.read_only)
            return
        task = None
        while (index := self._take()) < len(self.cases):
            if task is None and worker is None:
                task = self.task
            elif task is None:  # a model of its own: a forked ONNX Runtime session has no thread pool
                keep_freed_memory()  # a spawned copy does not inherit the main process's setting
                task = self.replicate(self.copy_threads)
            yield from predict_case(index, self.cases[index], task, self.chunk, self.series, self.rules, self.limits,
                                    self.decoder)

    def _take(self) -> int:
        with self.taken.get_lock():
            index = self.taken.value
            self.taken.value += 1
        return index


def _keep(message: dict[str, Any]) -> dict[str, Any]:
    return message  # no collation: tensors still travel through shared memory


# ------------------------------------------------------------------------------------------------ writer


@dataclass
class CaseState:
    case: CaseInput
    outputs: dict[int, Any] = field(default_factory=dict)
    end: dict[str, Any] | None = None
    error: str = ""

    @property
    def complete(self) -> bool:
        return self.end is not None and len(self.outputs) == self.end["slices"]


def write_case(task: ModelTask, case: CaseInput, volume: Volume, context: Any, outputs: list[Any],
               options: PipelineOptions, seconds: dict[str, float] | None = None,
               runtime: dict[str, Any] | None = None) -> dict[str, Any]:
    """Finish and write one case; returns its summary row (status ok, or error with the message). ``seconds``,
    if given, receives the time of each stage that completed (``finish``, ``write``); ``runtime``: what predicted
    the case (default ``task.runtime``), recorded in its outputs with the ``decoder`` its JPEG 2000 DICOM took and
    the device its ``preprocessing`` ran on. What an earlier run of ``task`` left for the case goes first
    (:func:`discard_outputs`)."""
    row = summary_row(case, task, "ok", slices=len(outputs))
    seconds = {} if seconds is None else seconds
    discard_outputs(options.out, case, task)
    try:
        clock = time.perf_counter()
        result = task.finish(volume, context, outputs)
        seconds["finish"], clock = time.perf_counter() - clock, time.perf_counter()
        check_cancel(options)  # writing (a DICOM SEG, an overlay) is the slowest part left: not for a cancelled run
        runtime = {**(task.runtime if runtime is None else runtime), "decoder": options.decoder or "gdcm",
                   "preprocessing": options.preprocess_device or "cpu"}
        written, info = task.write(volume, result, options.out / case.name, options.overlay, runtime)
        seconds["write"] = time.perf_counter() - clock
        row.update(info, outputs=" ".join(str(p.relative_to(options.out)) for p in written))
    except Exception as exc:
        row.update(status="error", error=error_message(exc))
    return row


def summary_row(case: CaseInput, task: ModelTask, status: str, **values: Any) -> dict[str, Any]:
    row = {name: "" for name in SUMMARY_FIELDS}
    row.update(case=case.name, input=str(case.path), model=task.model_name, model_version=task.model_version,
               status=status, **values)
    return row


def save_status(row: dict[str, Any], out: Path, case: CaseInput, made_with: dict[str, Any] | None = None) -> None:
    """The case's status file: its summary row, and ``made_with`` (settings and input identity, for --resume)."""
    with atomic_path(status_path(out, case, row["model"])) as partial:
        partial.write_text(json.dumps({**row, **(made_with or {})}, indent=2))


def discard_outputs(out: Path, case: CaseInput, task: ModelTask) -> None:
    """Remove what an earlier run of ``task`` left in the case's folder, before the case is written or recorded as
    failed: its status file first (stopped part way, no status claims files that are gone), then its files
    (``task.output_files``), and the half-written temporary files of a run that was killed. Another model's files
    in the same folder stay."""
    status_path(out, case, task.model_name).unlink(missing_ok=True)
    for name in task.output_files:
        (out / case.name / name).unlink(missing_ok=True)
    remove_partial_files(out / case.name)  # a run writes one case at a time: none of them is a live write


def write_summary(rows: list[dict[str, Any]], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as partial:
        partial.write_text(buffer.getvalue())


class RunBook:
    """The rows of one model's run over ``cases``: resumed cases (``options.resume``: finished ok with the same
    settings from the same input, :mod:`ctzoo.inference.resume`) first, then each case as it finishes. Every
    :meth:`record` saves the case's status file and rewrites ``OUT/summary.csv`` (``other_rows``, rows of earlier
    models of the same run, first). Shared by the local and Ray engines."""

    def __init__(self, cases: list[CaseInput], task: ModelTask, options: PipelineOptions,
                 other_rows: list[dict[str, Any]] = ()):
        options.out.mkdir(parents=True, exist_ok=True)
        remove_partial_files(options.out)  # a summary.csv half written by a killed run
        self.cases, self.task, self.out, self.other_rows = cases, task, options.out, list(other_rows)
        self.settings = output_settings(task, options)
        # each input's files are looked at (stat) only when needed, not all before the first case: a batch of
        # 50,000 series would wait minutes for it. Under --resume they are looked at before the case is read;
        # otherwise when it is recorded
        self.identities: dict[str, dict[str, Any] | None] = {}
        self.done: dict[str, dict[str, Any]] = {}
        self.todo: list[CaseInput] = []
        reasons = []
        for case in cases:
            saved = read_status(status_path(options.out, case, task.model_name)) if options.resume else None
            if saved is not None:
                self.identities[case.name] = input_identity(case)
            reason = rerun_reason(saved, task.model_version, case, self.settings, self.identities.get(case.name))
            if reason == REUSABLE:
                self.done[case.name] = {name: saved.get(name, "") for name in SUMMARY_FIELDS}
            else:
                self.todo.append(case)
            reasons.append(reason)
        if options.resume:
            log.info(resume_summary(task.model_name, reasons))
        write_summary([*self.other_rows, *self.rows()], self.out / SUMMARY_FILE)

    def record(self, row: dict[str, Any], case: CaseInput) -> None:
        if row["status"] != "ok":  # a failed case holds its status alone, not an earlier run's files beside it
            discard_outputs(self.out, case, self.task)
        identity = self.identities[case.name] if case.name in self.identities else input_identity(case)
        save_status(row, self.out, case, {"settings": self.settings, "input_identity": identity})
        self.done[case.name] = row
        write_summary([*self.other_rows, *self.rows()], self.out / SUMMARY_FILE)

    def rows(self) -> list[dict[str, Any]]:
        return [self.done[c.name] for c in self.cases if c.name in self.done]


# ------------------------------------------------------------------------------------------------ engine


class _Batcher:
    """Slices waiting for the model, grouped by shape; full batches go to ``task.predict``."""

    def __init__(self, task: ModelTask, batch_size: int, perf: Any = None, log: list | None = None,
                 paths: list[Path] = ()):
        self.task, self.batch_size, self.perf, self.log = task, batch_size, perf, log
        self.paths = paths  # every case's path, by position: a predict event names its cases' series hashes
        self.waiting: dict[tuple[int, ...], deque] = {}
        self.slices_done = 0

    def add(self, case: int, start: int, images: torch.Tensor) -> None:
        queue = self.waiting.setdefault(tuple(images.shape[1:]), deque())
        queue.extend((case, start + i, images[i]) for i in range(images.shape[0]))

    def ready(self, flush: bool = False) -> Iterator[list[tuple[int, int, torch.Tensor]]]:
        for queue in self.waiting.values():
            while len(queue) >= self.batch_size or (flush and queue):
                yield [queue.popleft() for _ in range(min(self.batch_size, len(queue)))]

    def run(self, items: list[tuple[int, int, torch.Tensor]]) -> list[tuple[int, int, Any]]:
        started = time.time()
        batch = torch.stack([image for _, _, image in items])
        batch = batch.numpy() if batch.device.type == "cpu" else batch  # preprocessed on the GPU: it stays there
        outputs = self.task.predict(batch)
        # armed deep profiles: the batch again under the profiler, should this run be judged anomalous
        rerun = None
        if self.perf is not None and self.task.profile is not None and self.perf.profiler.armed:
            rerun = functools.partial(self.task.profile, batch)
        self.account(len(items), [case for case, _, _ in items], (started, time.time()), rerun)
        return [(case, k, output) for (case, k, _), output in zip(items, outputs)]

    def account(self, slices: int, cases: list[int], span: tuple[float, float], rerun: Any = None,
                pid: int | None = None) -> None:
        """A batch of ``slices`` from the cases at positions ``cases`` ran from ``span[0]`` to ``span[1]`` (here, or
        in a model copy ``pid``): a predict event for ``perf``, a line of the batch log."""
        if self.perf is not None:
            runtime = self.task.runtime
            record_batch(self.perf, self.task.model_name, self.task.model_version, runtime.get("device", "-"),
                         slices, span[1] - span[0], batch_context(cases, self.paths, runtime.get("backend")), rerun)
        if self.log is not None:
            self.log.append((span[0], span[1], slices, os.getpid() if pid is None else pid))
        self.slices_done += slices


def run_pipeline(cases: list[CaseInput], task: ModelTask, options: PipelineOptions,
                 other_rows: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Run ``task`` over ``cases``; returns its summary rows in case order. ``OUT/summary.csv`` holds
    ``other_rows`` (earlier models of the same run) followed by these, rewritten as each case finishes."""
    book = RunBook(cases, task, options, other_rows)
    todo = book.todo
    copies = options.layout == "copies"
    # chosen before this run starts threads of its own (the progress ticker, the writer)
    start_method = worker_start_method(options.workers, copies, options.copy_threads, task.runtime.get("backend"),
                                       options.decoder, options.preprocess_device)
    progress = Progress(task.model_name, len(todo), options.progress_interval_s, enabled=options.progress)
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctzoo-writer")
    pending: deque[tuple[Future, CaseInput, int]] = deque()
    batcher = _Batcher(task, options.batch_size, options.perf, options.batch_log, [case.path for case in todo])
    states = {i: CaseState(case) for i, case in enumerate(todo)}

    def record(row: dict[str, Any], case: CaseInput, index: int) -> None:
        book.record(row, case)
        progress.case_done(index, case.name, row["status"], row["seconds"] if row["seconds"] != "" else None)

    def collect(block: bool) -> None:
        while pending and (block or pending[0][0].done() or len(pending) > MAX_PENDING_WRITES):
            future, case, index = pending.popleft()
            record(future.result(), case, index)

    def settle(index: int) -> None:
        state = states[index]
        if state.error:
            states.pop(index)
            row = summary_row(state.case, task, "error", error=state.error)
            pending.append((_done_future(row), state.case, index))
        elif state.complete:
            states.pop(index)
            end = state.end
            volume = end["volume"]
            volume.array = end["voxels"].numpy()
            outputs = [state.outputs[k] for k in range(end["slices"])]
            future = writer.submit(_timed_write, task, state.case, index, volume, outputs, options, end)
            pending.append((future, state.case, index))
        collect(block=False)

    def run_batches(flush: bool = False) -> None:
        for items in batcher.ready(flush):
            check_cancel(options)
            try:
                results = batcher.run(items)
            except Exception as exc:  # a batch may mix cases: each of them fails with the message
                for case in {c for c, _, _ in items}:
                    if case in states:
                        states[case].error = f"model failed: {error_message(exc)}"
                results = []
            progress.slices_done(len(items))
            for case, k, output in results:
                if case in states:
                    states[case].outputs[k] = output
            for case in {c for c, _, _ in items}:
                if case in states:
                    settle(case)

    if options.layout not in ("shared", "copies"):
        raise ValueError(f"unknown layout {options.layout!r}: use shared or copies")
    if copies and options.workers > 0 and task.replicate is None:
        raise ValueError("layout copies needs a model that can be copied into worker processes (task.replicate)")
    parallel = ({"prefetch_factor": 2, "worker_init_fn": functools.partial(end_with_parent, os.getpid())}
                if options.workers > 0 else {})
    if options.workers > 1 and "in_order" in inspect.signature(DataLoader).parameters:  # torch >= 2.6
        parallel["in_order"] = False
    if start_method is not None:  # fork, unless that is unsafe here (ctzoo.inference.start_method)
        parallel["multiprocessing_context"] = start_method
    if options.preprocess_device and copies:
        raise ValueError("preprocessing on the model's device needs the shared layout (copies preprocess in their "
                         "own processes)")
    stream = CaseStream(todo, task, options.batch_size if copies else options.chunk, options.series, options.rules,
                        options.limits, copy_threads=options.copy_threads if copies else None,
                        start_method=parallel.get("multiprocessing_context"), decoder=options.decoder,
                        read_only=bool(options.preprocess_device))
    loader = DataLoader(stream, batch_size=None, num_workers=options.workers, collate_fn=_keep, **parallel)
    here = preprocess_on(task, options.preprocess_device) if options.preprocess_device else None

    def handle(message: dict[str, Any]) -> None:
        index = message["case"]
        state = states.get(index)
        if state is None:
            return  # a case that already failed (its remaining messages are dropped)
        if message["kind"] == "volume":  # read by a reader: its slices are computed here, on the model's device
            for local in preprocessed_here(message, state.case, here, options.chunk):
                handle(local)
            return
        if message["kind"] == "slices":
            batcher.add(index, message["start"], message["images"])
            progress.case_slices(index, message["images"].shape[0], message.get("expected"))
        elif message["kind"] == "outputs":  # a batch a model copy ran
            outputs = message["outputs"]
            state.outputs.update(enumerate(outputs, start=message["start"]))
            progress.case_slices(index, len(outputs), message.get("expected"))
            progress.slices_done(len(outputs))
            batcher.account(len(outputs), [index], message["batch_s"], pid=message.get("pid"))
        elif message["kind"] == "end":
            state.end = message
            progress.case_slices(index, expected=message["slices"])
        else:
            state.error = message["error"]
            progress.case_slices(index)
        run_batches()
        if message["kind"] not in ("slices", "outputs"):
            settle(index)

    try:
        for message in loader if todo else ():
            check_cancel(options)
            handle(message)
        run_batches(flush=True)
        collect(block=True)
    except Cancelled:
        writer.shutdown(wait=True, cancel_futures=True)  # the case being written stops at its check; queued ones go
        raise
    except KeyboardInterrupt:
        writer.shutdown(wait=True, cancel_futures=True)  # the case being written finishes; queued ones do not
        for future, case, index in pending:
            if future.done() and not future.cancelled():
                record(future.result(), case, index)
        raise
    finally:
        writer.shutdown(wait=True)
        progress.close()
    return book.rows()


def _done_future(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _timed_write(task: ModelTask, case: CaseInput, index: int, volume: Volume, outputs: list[Any],
                 options: PipelineOptions, end: dict[str, Any]) -> dict[str, Any]:
    writer_s: dict[str, float] = {}
    row = write_case(task, case, volume, end["context"], outputs, options, writer_s)
    row.update(read_s=round(end["read_s"], 2), seconds=case_seconds(end["started_at"], end["read_s"]))
    if options.perf is not None:
        runtime = task.runtime
        record_case_stages(options.perf, task.model_name, task.model_version, runtime.get("device", "-"),
                           case_context(index, case.path, end, runtime), end["stage_s"], end["started_at"], writer_s)
    return row


def case_seconds(started_at: float, read_s: float) -> float:
    """The ``seconds`` of a case's summary row: its own wall time, from when its reader started reading it
    (``started_at``, ``time.time()`` in the reader's process) to now, its outputs written. The wall clock
    because reader and writer are different processes (or Ray nodes); never less than ``read_s``, should the
    clock have been set back in between."""
    return round(max(time.time() - started_at, read_s), 2)
