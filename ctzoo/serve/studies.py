"""Study endpoints of ``ctzoo serve``: POST a whole CT volume, get the model's result for it.

``POST /studies/{model}`` with the file as the request body (``curl --data-binary @ct.nii.gz``): a NIfTI
(``.nii``/``.nii.gz``), NRRD or MHA file, or a zipped DICOM series (the CT series chosen by the selection rules).
The format is recognised from the bytes, not a file name. Query parameters:

* ``format``: ``json`` (default; detectors: the ``detections.json`` document of docs/recistnet.md; segmenters:
  ``segmentation.json``, mL per class), ``nifti`` (segmenters: the label map on the input grid, ``.nii.gz``), or
  ``dicom`` (zipped DICOM input only: the DICOM SR measurement report of a detector, the DICOM SEG of a segmenter);
* ``score_threshold`` (detectors; default: the model's operating point, from its card).

One code path with ``ctzoo infer``: the upload is written to a private folder under the service's state folder
(``STATE/studies/``) and run through :func:`ctzoo.inference.pipeline.run_pipeline` with the
:class:`~ctzoo.inference.tasks.ModelTask` of the served folder's own bundle on the backend the tensor endpoint
uses, so a study runs exactly what ``/v2/models/<m>/infer`` runs: the exported graph in ONNX Runtime (fp16
included, and models exported from a user's checkpoint too), or with ``ctzoo serve --backend torch`` the bundle's
network on the same device in the same precision. One backend per model, built on first use; the score threshold
is applied when decoding, so any number of thresholds share it. A JSON reply names what produced it (its
``"runtime"``: backend, device, precision; and ``"graph": {"file", "precision", "sha256", "opset"}``, null for
torch). Study requests do not go through the tensor endpoint's micro-batcher: a study is already a
batch of slices.

A zipped series' JPEG 2000 is decoded as ``ctzoo serve --decode`` chose at start (``auto``: nvImageCodec on the
GPU where its check passes, else GDCM; the reply's ``runtime.decoder`` says which), as ``ctzoo infer --decode``.

Bounds (:mod:`ctzoo.serve.budget`): the body is read, and the study run, inside the request deadline; past it the
client gets 504 and the worker is told to stop (as when the client disconnects): it stops at the pipeline's next
check (:attr:`~ctzoo.inference.pipeline.PipelineOptions.cancel`) and removes its folder, and the request's slot and
memory reservation are given back only then. Before any voxel is read,
the upload's headers are checked (voxels, decoded bytes, inflation, voxel spacing; MHA/NRRD must carry their own
voxels) and the memory they declare (voxels and slices: :func:`ctzoo.serve.budget.study_bytes`) is reserved from
the server's in-flight budget. Study folders left by a killed server
are removed when the service starts, and any older than twice the deadline whenever a study arrives.

Latency anomalies (``ctzoo serve --perf``, the service's :class:`~ctzoo.perf.PerfMonitor` in ``app.state.perf``):
a study's pipeline records its ``read``, ``preprocess``, ``predict``, ``finish`` and ``write`` events
(:mod:`ctzoo.inference.stage_events`), and the request one ``upload`` event: receiving the body, writing it to the
study folder and checking its headers, keyed like the pipeline's events and bucketed by the study's slices (``-``
when the run ended before they were known). Its context never names the upload: ``series_hash`` (the pipeline's
keyed hash, so it groups with the study's other events), bytes, format, declared voxels, and ``request``, the hash
(:func:`ctzoo.perf.request_hash`) of an ``X-Request-ID`` header when the client sends one.

Errors: a ``format`` that cannot answer (``nifti`` of a detector, ``dicom`` of an upload that is not a zipped DICOM
series) is 400 before the upload is stored or the study run; an unrecognised body is 415; a volume over a size
limit is 413 naming the limit and the option that raises
it; an MHA/NRRD header naming another file is 400; a busy server is 503 with ``Retry-After``; anything wrong with
the volume (corrupt or truncated file, a zip without a DICOM series, a zip that inflates beyond the limit, a voxel
spacing no CT has, NaN voxels) is 400 with the reader's message; a model whose folder is not a whole bundle
(written by an older ctzoo export) has no study endpoint (404).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ctzoo.perf import event_key, request_hash
from ctzoo.serve.app import read_body
from ctzoo.serve.budget import study_bytes
from ctzoo.serve.v2_codec import ServeError

logger = logging.getLogger(__name__)

#: (leading bytes, offset) -> the suffix the readers need: NIfTI-1 has its magic at byte 344, NIfTI-2 at byte 4.
_SIGNATURES = [(b"\x1f\x8b", 0, ".nii.gz"), (b"PK\x03\x04", 0, ".zip"), (b"NRRD", 0, ".nrrd"),
               (b"ObjectType", 0, ".mha"), (b"n+1\x00", 344, ".nii"), (b"n+2\x00", 4, ".nii")]
FORMATS = ("json", "nifti", "dicom")
#: The status of a study whose client disconnected (nginx's "client closed request"): only the access log sees it.
CLIENT_CLOSED = 499
STUDY_PREFIX = "study-"


def upload_suffix(body: bytes) -> str:
    """The file suffix for an uploaded volume, from its magic bytes; 415 for anything else."""
    for magic, offset, suffix in _SIGNATURES:
        if body[offset:offset + len(magic)] == magic:
            return suffix
    raise ServeError("unsupported upload: send a NIfTI (.nii or .nii.gz), NRRD or MHA file, or a zip of a DICOM "
                     "series, as the request body", status=415)


class StudyTasks:
    """One backend per served bundle, built on first use, of the kind, device and precision the model's tensor
    endpoint runs (its :class:`~ctzoo.serve.engines.Runtime`); a ModelTask per request on it with the request's
    threshold (decoding only). Thread-safe; at most one entry per served model."""

    def __init__(self, device: str = "auto", threads: int | None = None):
        self.device, self.threads = device, threads
        self._backends: dict[str, Any] = {}
        self._bundles: dict[str, Any] = {}
        self._lock = threading.Lock()

    def bundle(self, model):
        """The served model's bundle, read from its folder once."""
        with self._lock:
            if model.name not in self._bundles:
                self._bundles[model.name] = served_bundle(model)
            return self._bundles[model.name]

    def get(self, model, bundle, score_threshold: float | None):
        from ctzoo.inference.backends import make_backend
        from ctzoo.inference.tasks import bundle_task

        key, runtime = str(bundle.folder), model.runtime
        with self._lock:
            if key not in self._backends:
                if runtime.kind == "torch":  # the tensor endpoint's own backend: its network, device, precision
                    self._backends[key] = model.engine.backend
                else:
                    self._backends[key] = make_backend(bundle, "onnx", self.device, threads=self.threads)
            backend = self._backends[key]
        return bundle_task(bundle, backend, score_threshold)

    @property
    def sessions(self) -> int:
        return len(self._backends)


def canvas_pixels(bundle) -> int:
    """Pixels of a segmenter's input slice (its preprocessing's canvas), which it holds for every slice of a
    volume at once; 0 for a detector (:func:`ctzoo.serve.budget.study_bytes`)."""
    if bundle.task != "segmentation":
        return 0
    height, width = bundle.preprocessing.size
    return int(height) * int(width)


def served_bundle(model):
    """The bundle of a served model's folder (the one the torch backend loaded, if it did); 404 when the folder is
    not a whole bundle."""
    from ctzoo.models.bundle import BundleError, load_bundle

    if model.bundle is not None:
        return model.bundle

    try:
        bundle = load_bundle(model.folder)
    except BundleError as exc:
        raise ServeError(f"model {model.name!r} has tensor inference only (/v2/models/.../infer): its folder is not "
                         f"a whole model bundle ({exc}); export it again with this version of ctzoo",
                         status=404) from None
    if bundle.graphs is None:
        raise ServeError(f"model {model.name!r}: its folder has no exported graph", status=404)
    return bundle


class StudyFolders:
    """The private folders of running studies, under ``root`` (the service's ``STATE/studies``)."""

    def __init__(self, root: Path, max_age_s: float):
        self.root, self.max_age_s = Path(root), max_age_s
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def remove_all(self) -> int:
        """Remove every study folder (at start-up: whatever a killed server left); how many there were."""
        return self._remove(lambda folder: True)

    def remove_stale(self) -> int:
        """Remove study folders older than ``max_age_s`` (their worker died or hung)."""
        oldest = time.time() - self.max_age_s
        return self._remove(lambda folder: folder.stat().st_mtime < oldest)

    def _remove(self, select) -> int:
        removed = 0
        for folder in self.root.glob(f"{STUDY_PREFIX}*"):
            try:
                if select(folder):
                    shutil.rmtree(folder, ignore_errors=True)
                    removed += 1
            except FileNotFoundError:
                continue  # its own worker removed it meanwhile
        return removed

    def new(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=STUDY_PREFIX, dir=self.root))


def declared_study_size(upload: Path, limits) -> tuple[int, int]:
    """``(voxels, slices)`` the upload declares (headers only), as ServeError: 413 past a size limit, 400
    otherwise (an implausible voxel spacing included)."""
    from ctzoo.io import LimitExceeded
    from ctzoo.io.image_files import declared_size

    try:
        return declared_size(upload, limits)
    except LimitExceeded as exc:
        raise ServeError(str(exc).replace(str(upload), "the upload").replace(upload.name, "the upload"),
                         status=413) from None
    except Exception as exc:  # any parser's error on an upload is the upload's fault (nibabel, SimpleITK, zipfile)
        text = " ".join(str(exc).replace(str(upload), "the upload").replace(upload.name, "the upload").split())
        text = text or type(exc).__name__
        raise ServeError(f"the upload cannot be read: {text[:300]}") from None


@dataclass
class UploadTiming:
    """The ``upload`` stage of one study request (for ``--perf``): when it started, how long it took, what explains
    it (bytes, format, declared voxels, the request id's hash)."""

    started: float
    seconds: float
    context: dict[str, Any] = field(default_factory=dict)

    def record(self, perf, task, upload: Path, slices: int | None) -> None:
        from ctzoo.inference.stage_events import series_hash

        context = {**self.context, "series_hash": series_hash(upload), "slices": slices}
        perf.record(event_key(task.model_name, task.model_version, "upload", task.runtime.get("device", "-"), slices),
                    self.seconds, self.started, context)


def run_study(task, folder: Path, suffix: str, output_format: str, limits, cancel: threading.Event, perf=None,
              upload_timing: UploadTiming | None = None, decoder: str | None = None) -> Response:
    """Run the pipeline on ``folder/upload<suffix>``, answer in ``output_format``; ``folder`` is removed at the
    end, however the run ends (this worker owns it). ``perf``: the service's PerfMonitor, which times the
    pipeline's stages and, once the study's slices are known, ``upload_timing``; ``decoder``: how a zipped
    series' JPEG 2000 is decoded (:attr:`~ctzoo.inference.pipeline.PipelineOptions.decoder`)."""
    from ctzoo.inference.inputs import CaseInput
    from ctzoo.inference.pipeline import Cancelled, PipelineOptions, run_pipeline

    upload, row = folder / f"upload{suffix}", None
    try:
        out = folder / "out"
        try:
            [row] = run_pipeline([CaseInput("study", upload)], task,
                                 PipelineOptions(out=out, workers=0, overlay=False, progress=False, limits=limits,
                                                 cancel=cancel, perf=perf, decoder=decoder))
        except Cancelled:  # the deadline passed (the client has its 504) or the client disconnected
            raise ServeError("the study was cancelled: the client disconnected or the deadline passed",
                             status=CLIENT_CLOSED) from None
        if row["status"] != "ok":
            message = row["error"].replace(str(upload), "the upload")
            raise ServeError(message, status=500 if message.startswith("model failed") else 400)
        return _answer(task, out / "study", output_format, row.get("dicom_error", ""))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if perf is not None and upload_timing is not None:  # the upload completed, whatever the run did
            slices = row["slices"] if row is not None and row["status"] == "ok" else None
            upload_timing.record(perf, task, upload, slices)


def check_output_format(output_format: str, task: str, suffix: str | None = None) -> None:
    """400 before any work where ``output_format`` cannot answer a ``task`` model (``detection``,
    ``segmentation``) or, once the upload's ``suffix`` is known, that upload."""
    if output_format == "nifti" and task != "segmentation":
        raise ServeError("format=nifti is for segmentation models; a detector answers json or dicom")
    if output_format == "dicom" and suffix not in (None, ".zip"):
        raise ServeError("format=dicom answers a zipped DICOM series only (a DICOM SR or SEG refers to its slices); "
                         "the upload is not one: ask for json" + (" or nifti" if task == "segmentation" else ""))


def _answer(task, folder: Path, output_format: str, dicom_error: str = "") -> Response:
    detector = task.task == "detection"
    if output_format == "json":
        name = "detections.json" if detector else "segmentation.json"
        return JSONResponse({**json.loads((folder / name).read_text()), "graph": task.runtime.get("graph")})
    if output_format == "nifti":  # a segmenter's (check_output_format)
        return Response((folder / "labels.nii.gz").read_bytes(), media_type="application/gzip")
    dicom = folder / ("sr.dcm" if detector else "seg.dcm")  # DICOM input (check_output_format)
    if dicom_error:  # the DICOM writer failed (the JSON and NIfTI answers stand)
        raise ServeError(f"no DICOM result: {dicom_error}", status=500)
    if not dicom.is_file():
        raise ServeError("no DICOM result: no class was found", status=404)
    return Response(dicom.read_bytes(), media_type="application/dicom")


def study_router(device: str = "auto", threads: int | None = None, state_dir: str | Path | None = None,
                 request_timeout_s: float = 60.0, decoder: str | None = None) -> APIRouter:
    """The study routes, for ``create_app(..., extra_routers=[study_router()])``. Study folders live under
    ``state_dir/studies`` (default: a new private temporary folder); leftovers there are removed now.
    ``decoder``: how zipped series' JPEG 2000 is decoded (None: GDCM; ``nvimgcodec:DEVICE`` as
    :func:`ctzoo.inference.decoding.choose_decoder` resolved it)."""
    router = APIRouter()
    tasks = StudyTasks(device, threads)
    if state_dir is None:  # embedded use (tests, notebooks): a private folder, removed when the process exits
        state_dir = tempfile.mkdtemp(prefix="ctzoo-serve-")
        atexit.register(shutil.rmtree, state_dir, True)
    root = Path(state_dir)
    folders = StudyFolders(root / "studies", max_age_s=2 * request_timeout_s + 60)
    if removed := folders.remove_all():
        logger.warning("removed %d study folder(s) left by an earlier run of the service", removed)
    router.tasks, router.folders = tasks, folders  # for tests and operators

    @router.post("/studies/{model_name}")
    async def study(model_name: str, request: Request, format: str = "json", score_threshold: float | None = None):
        models = request.app.state.repository
        if model_name not in models:
            raise ServeError(f"unknown model {model_name!r}; served: {', '.join(sorted(models))}", status=404)
        if format not in FORMATS:
            raise ServeError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
        if score_threshold is not None and not 0.0 <= score_threshold <= 1.0:
            raise ServeError(f"score_threshold must lie in [0, 1], got {score_threshold}")
        settings = request.app.state.settings
        cancel = threading.Event()
        job = asyncio.ensure_future(_study(request, models[model_name], format, score_threshold, cancel))
        job.add_done_callback(_retrieve)
        try:
            return await asyncio.wait_for(asyncio.shield(job), settings.request_timeout_s)
        except asyncio.TimeoutError:
            # an upload still arriving stops now; a running study is told to stop, and keeps its slot and memory
            # until its worker has (_held_until_done)
            job.cancel()
            raise ServeError(f"the study took longer than the {settings.request_timeout_s:g} s request timeout",
                             status=504) from None
        except asyncio.CancelledError:  # the service is stopping
            job.cancel()
            raise

    async def _study(request: Request, model, output_format: str, score_threshold: float | None,
                     cancel: threading.Event) -> Response:
        settings, budget, perf = request.app.state.settings, request.app.state.budget, request.app.state.perf
        limits = settings.limits.volume
        bundle = await run_in_threadpool(tasks.bundle, model)
        check_output_format(output_format, bundle.task)
        # the upload is read before the model's slot is taken (a client still uploading holds no slot, so slow
        # uploads cannot lock the model out), under a memory reservation of the bytes it has sent
        async with budget.growing("the upload") as received:
            started, clock = time.time(), time.perf_counter()  # the upload stage: not the wait for a slot
            body = await read_body(request, settings.max_upload_bytes, received)
            suffix = upload_suffix(body)
            check_output_format(output_format, bundle.task, suffix)
            size = len(body)
            upload_s = time.perf_counter() - clock
            async with budget.slot(model.name):
                stored_clock = time.perf_counter()  # storing it and reading its header count as the upload too
                folders.remove_stale()
                folder = folders.new()
                handed_over = False
                watcher = asyncio.ensure_future(_cancel_when_gone(request.receive, cancel))
                try:
                    await run_in_threadpool((folder / f"upload{suffix}").write_bytes, body)
                    del body
                    voxels, slices = await run_in_threadpool(declared_study_size, folder / f"upload{suffix}",
                                                             limits)
                    upload_timing = None if perf is None else UploadTiming(
                        started, upload_s + time.perf_counter() - stored_clock,
                        _upload_context(request, size, suffix, voxels))
                    # the upload's bytes are on disk now: the study's reservation replaces theirs
                    async with budget.reserve(study_bytes(voxels, slices, canvas_pixels(bundle)), "the study",
                                              held=received.nbytes):
                        task = await run_in_threadpool(tasks.get, model, bundle, score_threshold)
                        handed_over = True  # from here the worker thread owns the folder, even if we are cancelled
                        return await _held_until_done(asyncio.ensure_future(run_in_threadpool(
                            run_study, task, folder, suffix, output_format, limits, cancel, perf, upload_timing,
                            decoder)), cancel)
                finally:
                    watcher.cancel()
                    if not handed_over:
                        shutil.rmtree(folder, ignore_errors=True)

    return router


async def _held_until_done(worker: asyncio.Future, cancel: threading.Event) -> Response:
    """The study worker's answer. Should the request be cancelled meanwhile (its deadline passed), the worker is
    told to stop (``cancel``) and still awaited before the cancellation goes on: what the request holds (its place
    among the model's ``--max-requests-per-model``, the memory reserved for it) is given back when the work has
    stopped, not when the client got its 504."""
    try:
        return await asyncio.shield(worker)
    except asyncio.CancelledError:
        cancel.set()
        await asyncio.wait([worker])
        _retrieve(worker)  # the client has its 504: whatever the worker ended with goes nowhere
        raise


async def _cancel_when_gone(receive, cancel: threading.Event) -> None:
    """Set ``cancel`` when the client disconnects: once the body has been read, the ASGI server's ``receive``
    answers ``http.disconnect`` when the connection closes (or the response has been sent)."""
    while (await receive())["type"] != "http.disconnect":
        continue
    cancel.set()


def _retrieve(future: asyncio.Future) -> None:
    """Mark a background future's exception as seen (asyncio logs those never retrieved)."""
    if future.done() and not future.cancelled():
        future.exception()


#: The header whose value names a study request in its perf events (hashed: clients choose it).
REQUEST_ID_HEADER = "x-request-id"


def _upload_context(request: Request, size: int, suffix: str, voxels: int) -> dict[str, Any]:
    context: dict[str, Any] = {"bytes": size, "format": suffix.lstrip("."), "voxels": voxels}
    if request_id := request.headers.get(REQUEST_ID_HEADER):
        context["request"] = request_hash(request_id)
    return context
