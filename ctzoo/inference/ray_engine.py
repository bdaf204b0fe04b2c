"""``ctzoo infer --engine ray``: the stages of :mod:`ctzoo.inference.pipeline` as Ray Data operators.

::

    case rows --flat_map--> row per slice --map_batches--> output per slice --> driver --> write tasks
              read_case:     (+ an end or   actor pool:     (pickled, small)    groups     re-read the volume,
              read, decode,  error row)     the ModelTask,  + the end/error     by case    finish, write the
              preprocess                    built once      row                            files
              (--workers)                   per actor

Why this shape:

* Grouping by case happens on the driver, not with ``groupby().map_groups()``: a groupby is an all-to-all
  barrier that holds every prediction of the job before the first case is written. The driver holds only the
  small outputs of the cases in flight and starts a case's write task as soon as its last slice is predicted;
  at most ``MAX_PENDING_WRITES`` writes run before the driver stops pulling rows (Ray Data then backpressures).
* The write task re-reads the volume instead of the dataset carrying it: carried in a column, every volume
  (150-600 MB for a full CT in float32) would cross the object store four times (reader, model actor, driver,
  writer) and sit in the driver while its slices wait for the model. Re-reading costs one more read + decode per
  case (about ``read_s`` of CPU, on a writer) and keeps the object store to the slices in flight. The small
  ``context`` of ``preprocess`` travels in the case's end row. Reads are deterministic, so the files are the
  local engine's.
* The model: on CPU one actor (the backend's threads already use the node's cores; more actors would fight
  over them). It reserves one Ray CPU, but Ray also pins its OMP threads to that, so it asks the backend for
  ``threads`` or every core of its node, as the local engine's backend uses. On CUDA one actor per GPU of the cluster
  (``num_gpus=1``; Ray sets CUDA_VISIBLE_DEVICES, so ``cuda:N`` means "a GPU" here).
* Inputs and OUT must be on storage every node sees (a shared filesystem); on a local instance they are.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pickle
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from ctzoo.inference.inputs import CaseInput
from ctzoo.inference.pipeline import (
    MAX_PENDING_WRITES,
    PipelineOptions,
    RunBook,
    case_seconds,
    error_message,
    read_case,
    summary_row,
    write_case,
)
from ctzoo.inference.stage_events import batch_context, case_context, record_batch, record_case_stages

OBJECT_STORE_BYTES = 1 << 30  # a local instance's shared memory: slices in flight, not volumes (see above)
_NO_IMAGE = np.zeros((0, 0, 0), np.float32)  # the image of a case's end/error row


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise RuntimeError("the Ray engine needs Ray Data: pip install 'ctzoo[ray]'") from exc
    return ray


def connect(address: str | None = None, workers: int = 1) -> bool:
    """Join the Ray cluster at ``address`` or ``$RAY_ADDRESS`` (or the one already joined), else start a local
    instance. True when this call started one (whoever started it shuts it down)."""
    ray = _import_ray()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    # ray.init makes SIGTERM exit the driver at once: the caller's handler (ctzoo infer's stops the run in order,
    # its finished cases recorded) is put back
    on_sigterm = signal.getsignal(signal.SIGTERM)
    if address:
        ray.init(address=address, log_to_driver=False, ignore_reinit_error=True)
    else:
        # CPUs for the model actor, `workers` readers and a writer even on a small machine (Ray's CPUs only schedule)
        ray.init(num_cpus=max(os.cpu_count() or 1, workers + 2), include_dashboard=False, log_to_driver=False,
                 object_store_memory=OBJECT_STORE_BYTES, ignore_reinit_error=True)
    if on_sigterm is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)
    return not address


def _read_rows(row: dict[str, Any], task, chunk: int, series: str | None, rules: Any, limits: Any = None):
    """Reader stage: the messages of :func:`read_case` as rows, one per slice, then one end or error row."""
    index = int(row["case"])
    control = {"case": index, "slice": -1, "image": _NO_IMAGE, "payload": b"", "error": ""}  # one row's columns
    case = CaseInput(row["name"], Path(row["source"]), recursive=bool(row["recursive"]), series=row["series"] or None)
    for message in read_case(index, case, task, chunk, series, rules, limits):
        if message["kind"] == "slices":
            for k, image in enumerate(message["images"].numpy()):
                yield {**control, "slice": message["start"] + k, "image": image}
        elif message["kind"] == "end":  # the voxels stay behind: the write task re-reads the volume
            end = {key: message[key] for key in ("slices", "context", "read_s", "started_at", "stage_s", "spacing")}
            end["worker"] = os.getpid()
            yield {**control, "payload": pickle.dumps(end)}
        else:
            yield {**control, "error": message["error"].replace(row["source"], row["path"])}  # the path as given


class _Predictor:
    """Model stage: one backend per actor; end/error rows pass through untouched."""

    batches = 0  # batches this actor ran: with its pid, the id of a batch (its rows carry its model time)

    def __init__(self, bundle_folder: str, backend: str, device: str, score_threshold: float | None,
                 threads: int | None, precision: str = "fp32", compile: bool = False):
        from ctzoo.inference.backends import resolve_device
        from ctzoo.inference.precision import choose_precision
        from ctzoo.inference.tasks import model_task
        from ctzoo.models.bundle import load_bundle

        # Ray pins OMP threads to the actor's 1 CPU: on CPU, the backend's own default is every core
        threads = threads or (os.cpu_count() if device == "cpu" else None)
        bundle, device = load_bundle(bundle_folder), resolve_device(device)
        # checked on the actor's own device: bf16 numerics are the device's
        choice = choose_precision(bundle, precision, backend, device)
        self.task = model_task(bundle, backend, device, score_threshold, threads, precision=choice.precision,
                               compile=compile)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        clock = time.perf_counter()
        outputs = np.full(len(batch["case"]), b"", dtype=object)
        errors = np.array(batch["error"], dtype=object)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i in np.flatnonzero(batch["slice"] >= 0):
            by_shape.setdefault(batch["image"][i].shape, []).append(i)
        for rows in by_shape.values():
            try:
                for i, output in zip(rows, self.task.predict(np.stack([batch["image"][i] for i in rows]))):
                    outputs[i] = pickle.dumps(output)
            except Exception as exc:  # as in the local engine: every case of the failed batch fails with the message
                errors[rows] = f"model failed: {error_message(exc)}"
        # the batch's model time travels on its rows: the driver records one predict event per batch id
        self.batches += 1
        rows = len(batch["case"])
        members = ",".join(str(case) for case in sorted(set(batch["case"][batch["slice"] >= 0].tolist())))
        return {"case": batch["case"], "slice": batch["slice"], "output": outputs, "payload": batch["payload"],
                "error": errors, "batch_id": np.full(rows, f"{os.getpid()}:{self.batches}", dtype=object),
                # what predicted the rows: the writer records it in the case's outputs
                "runtime": np.full(rows, json.dumps(self.task.runtime), dtype=object),
                "batch_rows": np.full(rows, int((batch["slice"] >= 0).sum())),
                # the cases the batch's slices came from: the driver's predict event names them
                "batch_cases": np.full(rows, members, dtype=object),
                "predict_s": np.full(rows, time.perf_counter() - clock)}


@functools.lru_cache(maxsize=4)
def _finisher(bundle_folder: str, weights_digest: str, score_threshold: float | None):
    """The ModelTask of a write worker, built once per process (finish and write never touch the backend) from the
    bundle at ``bundle_folder`` (``weights_digest``: a bundle rewritten in place between runs is loaded again); a
    detector's with the actors' ``score_threshold``, which its detections.json records."""
    from ctzoo.inference.tasks import model_task

    return model_task(bundle_folder, "torch", "cpu", score_threshold, threads=1)


def _write(bundle_key: tuple[str, str], case: CaseInput, source: str, context: Any, outputs: list[bytes],
           options: PipelineOptions, runtime: str, score_threshold: float | None = None):
    """Write stage (a Ray task): re-read the volume (from ``source``, absolute), then :func:`write_case` with the
    stages of the bundle ``bundle_key`` names (its folder and weights digest), recording ``runtime`` (JSON: the
    model actor's, which predicted the case); returns the summary row and the finish/write seconds."""
    from ctzoo.io import read_volume
    from ctzoo.io.limits import DEFAULT_LIMITS

    task = _finisher(*bundle_key, score_threshold)
    try:
        volume = read_volume(source, series=case.series or options.series, rules=options.rules, progress=False,
                             limits=options.limits or DEFAULT_LIMITS, recursive=case.recursive)
    except Exception as exc:  # the input changed since it was read: this case fails, the batch goes on
        return summary_row(case, task, "error", slices=len(outputs),
                           error=error_message(exc).replace(source, str(case.path))), {}
    writer_s: dict[str, float] = {}
    row = write_case(task, case, volume, context, [pickle.loads(o) for o in outputs], options, writer_s,
                     json.loads(runtime))
    return row, writer_s


def _placement(device: str, gpus: int) -> tuple[str, int, dict[str, float]]:
    """(the backend's device, actors, Ray resources of each) for ``device`` on a cluster with ``gpus`` GPUs. A CPU
    actor reserves one CPU whatever its threads: a reservation larger than any node would never be scheduled."""
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        if not gpus:  # Ray would wait for a GPU forever
            raise RuntimeError(f"device {device!r}, but the Ray cluster has no GPU")
        return "cuda", gpus, {"num_gpus": 1, "num_cpus": 1}
    if device != "cpu":
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    return "cpu", 1, {"num_cpus": 1}


def _pool(ray, size: int, actors: bool) -> dict[str, Any]:
    """A fixed pool of ``size`` actors or at most ``size`` tasks: ``compute`` from Ray 2.51 on (``concurrency``,
    the older spelling, is deprecated there)."""
    if tuple(int(p) for p in ray.__version__.split(".")[:2]) < (2, 51):
        return {"concurrency": size}
    return {"compute": (ray.data.ActorPoolStrategy if actors else ray.data.TaskPoolStrategy)(size=size)}


def run_ray(cases: list[CaseInput], model: str | Path, options: PipelineOptions, backend: str = "torch",
            device: str = "auto", threads: int | None = None, score_threshold: float | None = None,
            other_rows: list[dict[str, Any]] = (), address: str | None = None,
            precision: str = "auto", compile: bool = False) -> list[dict[str, Any]]:
    """:func:`ctzoo.inference.pipeline.run_pipeline` on Ray for ``model`` (a zoo name or a bundle folder, whose
    weights every actor and writer loads): same files, status files, summary and rows; each model actor resolves
    ``precision`` on its own device (:func:`ctzoo.inference.precision.choose_precision`) and compiles its network
    with ``compile``."""
    ray = _import_ray()
    from ctzoo.inference.backends import KINDS
    from ctzoo.inference.precision import check_request
    from ctzoo.inference.tasks import model_task
    from ctzoo.models.bundle import load_bundle

    if backend not in KINDS:  # fail here, not as a dead actor once Ray has started
        raise ValueError(f"unknown backend kind {backend!r}: use one of {', '.join(KINDS)}")
    check_request(precision, backend, compile=compile)
    # on the driver (CPU): the readers' preprocess, the rows' model version; an unknown model fails here, early
    bundle = load_bundle(model)
    task = model_task(bundle, "torch", "cpu", score_threshold)
    # what --resume compares: the actors' backend and precision, as the local engine records them
    task.settings.update(backend=backend, precision=_recorded_precision(bundle, precision, backend, device, address))
    book = RunBook(cases, task, options, other_rows)  # resume, status files and summary as the local engine
    todo = book.todo
    if todo:
        started = connect(address, options.workers)
        # absolute: a worker's working folder is not the driver's. The digest: a bundle rewritten in place since a
        # writer process last built it is built again
        bundle_key = (str(bundle.folder.absolute()), task.settings["weights"])
        try:
            _stream(ray, todo, task, bundle_key, options, backend, device, threads, score_threshold,
                    (precision, compile), book.record)
        finally:
            if started:
                ray.shutdown()
    return book.rows()


def _recorded_precision(bundle, precision: str, backend: str, device: str, address: str | None) -> str:
    """The precision the model actors will predict in, as the local engine records it in the settings --resume
    compares, where the driver can tell before they start: an ONNX graph's own; fp32 or bf16 as asked (bf16 fails
    its check otherwise); auto's fp32 on a CPU. ``"auto"`` where a GPU's bf16 check decides, on the actors."""
    from ctzoo.inference.backends import resolve_device

    if backend != "torch":
        return bundle.graphs.precision if bundle.graphs is not None else "fp32"
    if precision != "auto":
        return precision
    joins_cluster = address or os.environ.get("RAY_ADDRESS") or _import_ray().is_initialized()
    if device == "auto" and not joins_cluster:  # a local instance: this machine's GPUs are the actors'
        device = resolve_device(device)
    return "fp32" if device == "cpu" else "auto"


def _stream(ray, todo: list[CaseInput], task, bundle_key: tuple[str, str], options: PipelineOptions, backend: str,
            device: str, threads: int | None, score_threshold: float | None, torch_options: tuple[str, bool],
            record) -> None:
    ray.data.DataContext.get_current().enable_progress_bars = options.progress
    device, actors, resources = _placement(device, int(ray.cluster_resources().get("GPU", 0)))
    # readers need only preprocess (deep profiles: the local engine's)
    reader = dataclasses.replace(task, predict=None, finish=None, write=None, profile=None)
    # paths absolute: a worker's working folder is not the driver's; rows keep the paths as given
    perf = options.perf  # the driver's: events are recorded here, from the timings the stages send back
    options = dataclasses.replace(options, out=options.out.absolute(), perf=None)
    sources = [str(case.path.absolute()) for case in todo]
    paths = [case.path for case in todo]  # as the case events hash them
    items = [{"case": i, "name": c.name, "path": str(c.path), "source": sources[i], "recursive": c.recursive,
              "series": c.series or ""} for i, c in enumerate(todo)]
    dataset = (ray.data.from_items(items, override_num_blocks=len(items))  # a block per case: read in parallel
               .flat_map(_read_rows, fn_kwargs={"task": reader, "chunk": options.chunk, "series": options.series,
                                                "rules": options.rules, "limits": options.limits},
                         **_pool(ray, max(1, options.workers), False))
               .map_batches(_Predictor, fn_constructor_args=(bundle_key[0], backend, device, score_threshold, threads,
                                                             *torch_options),
                            batch_size=options.batch_size,
                            batch_format="numpy", **_pool(ray, actors, True), **resources))
    write = ray.remote(num_cpus=1)(_write)
    states: dict[int, dict[str, Any]] = {}  # cases in flight: outputs by slice, end row
    done: set[int] = set()  # cases failed or handed to a writer: their remaining rows are dropped
    pending: dict[Any, tuple[CaseInput, dict[str, Any]]] = {}  # write task -> its case
    batches_seen: deque[str] = deque(maxlen=256)  # model batches already recorded (rows arrive in batch order)

    def collect(keep: int) -> None:
        """Record the finished writes; wait while more than ``keep`` still run."""
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=None if len(pending) > keep else 0)
            if not ready:
                return
            case, state = pending.pop(ready[0])
            row, writer_s = ray.get(ready[0])
            end = state["end"]
            row.update(read_s=round(end["read_s"], 2), seconds=case_seconds(end["started_at"], end["read_s"]))
            if perf is not None:
                record_case_stages(perf, task.model_name, task.model_version, device,
                                   case_context(state["index"], case.path, end, {"backend": backend}),
                                   end["stage_s"], end["started_at"], writer_s)
            record(row, case)

    try:
        for row in dataset.iter_rows():
            index = int(row["case"])
            if index in done:
                continue
            state = states.setdefault(index, {"outputs": {}, "end": None, "index": index})
            if row["error"]:
                done.add(index)
                del states[index]
                record(summary_row(todo[index], task, "error", error=row["error"]), todo[index])
            else:
                if row["slice"] >= 0:
                    state["outputs"][int(row["slice"])] = row["output"]
                    state.setdefault("runtime", row["runtime"])
                    if perf is not None and row["batch_id"] not in batches_seen:
                        batches_seen.append(row["batch_id"])
                        members = [int(case) for case in row["batch_cases"].split(",") if case]
                        record_batch(perf, task.model_name, task.model_version, device, int(row["batch_rows"]),
                                     float(row["predict_s"]), batch_context(members, paths, backend))
                else:
                    state["end"] = pickle.loads(row["payload"])
                if state["end"] is not None and len(state["outputs"]) == state["end"]["slices"]:
                    done.add(index)
                    del states[index]
                    outputs = [state["outputs"][k] for k in range(state["end"]["slices"])]
                    ref = write.remote(bundle_key, todo[index], sources[index], state["end"]["context"], outputs,
                                       options, state.get("runtime", json.dumps(task.runtime)), score_threshold)
                    pending[ref] = (todo[index], state)
            collect(MAX_PENDING_WRITES)
    finally:
        collect(0)  # on Ctrl-C or a failed job too: the writes already running finish and are recorded
