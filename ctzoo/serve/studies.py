"""Study endpoints of ``ctzoo serve``: POST a whole CT volume, get the model's result for it.

``POST /studies/{model}`` with the file as the request body (``curl --data-binary @ct.nii.gz``): a NIfTI
(``.nii``/``.nii.gz``), NRRD or MHA file, or a zipped DICOM series (the CT series chosen by the selection rules).
The format is recognised from the bytes, not a file name. Query parameters:

* ``format``: ``json`` (default; detectors: the ``detections.json`` document of docs/recistnet.md; segmenters:
  ``segmentation.json``, mL per class), ``nifti`` (segmenters: the label map on the input grid, ``.nii.gz``), or
  ``dicom`` (zipped DICOM input only: the DICOM SR measurement report of a detector, the DICOM SEG of a segmenter);
* ``score_threshold`` (detectors; default: the model's operating point, from its card).

One code path with ``ctzoo infer``: the upload is written to a private temporary folder and run through
:func:`ctzoo.inference.pipeline.run_pipeline` with the :class:`~ctzoo.inference.tasks.ModelTask` of the served
folder's own bundle on the ONNX Runtime backend, so a study runs exactly the graph ``/v2/models/<m>/infer`` runs
(fp16 included, and models exported from a user's checkpoint too); the task is built once per model and
threshold, the first time it is asked for, and the folder is deleted afterwards. A JSON reply names the graph
that produced it (``"graph": {"file", "precision", "sha256", "opset"}``). Study requests do not go through the
tensor endpoint's micro-batcher: a study is already a batch of slices. They run in a worker thread under the
service's request timeout.

Errors: an unrecognised body is 415; anything wrong with the volume (corrupt or truncated file, a zip without a
DICOM series, a zip that inflates beyond the limit, NaN voxels) is 400 with the reader's message; a model that is
folder that is not a whole bundle (written by an older ctzoo export) has no study endpoint (404).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from ctzoo.serve.app import read_body
from ctzoo.serve.v2_codec import ServeError

#: (leading bytes, offset) -> the suffix the readers need.
_SIGNATURES = [(b"\x1f\x8b", 0, ".nii.gz"), (b"PK\x03\x04", 0, ".zip"), (b"NRRD", 0, ".nrrd"),
               (b"ObjectType", 0, ".mha"), (b"n+1\x00", 344, ".nii")]
FORMATS = ("json", "nifti", "dicom")


def upload_suffix(body: bytes) -> str:
    """The file suffix for an uploaded volume, from its magic bytes; 415 for anything else."""
    for magic, offset, suffix in _SIGNATURES:
        if body[offset:offset + len(magic)] == magic:
            return suffix
    raise ServeError("unsupported upload: send a NIfTI (.nii or .nii.gz), NRRD or MHA file, or a zip of a DICOM "
                     "series, as the request body", status=415)


class StudyTasks:
    """The ModelTask of each served bundle (ONNX backend, its own graphs), built on first use; thread-safe."""

    def __init__(self, device: str = "auto", threads: int | None = None):
        self.device, self.threads = device, threads
        self._tasks: dict[tuple[str, float], Any] = {}
        self._bundles: dict[str, Any] = {}
        self._lock = threading.Lock()

    def bundle(self, model):
        """The served model's bundle, read from its folder once."""
        with self._lock:
            if model.name not in self._bundles:
                self._bundles[model.name] = served_bundle(model)
            return self._bundles[model.name]

    def get(self, bundle, score_threshold: float):
        from ctzoo.inference.tasks import model_task

        key = (str(bundle.folder), score_threshold)
        with self._lock:
            if key not in self._tasks:
                self._tasks[key] = model_task(bundle, "onnx", self.device, score_threshold, self.threads)
            return self._tasks[key]


def served_bundle(model):
    """The bundle of a served model's folder; 404 when the folder is not a whole bundle."""
    from ctzoo.models.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(model.folder)
    except BundleError as exc:
        raise ServeError(f"model {model.name!r} has tensor inference only (/v2/models/.../infer): its folder is not "
                         f"a whole model bundle ({exc}); export it again with this version of ctzoo",
                         status=404) from None
    if bundle.graphs is None:
        raise ServeError(f"model {model.name!r}: its folder has no exported graph", status=404)
    return bundle


def run_study(task, body: bytes, suffix: str, output_format: str) -> Response:
    """Write ``body`` to a private temporary folder, run the pipeline on it, answer in ``output_format``."""
    from ctzoo.inference.inputs import CaseInput
    from ctzoo.inference.pipeline import PipelineOptions, run_pipeline

    with tempfile.TemporaryDirectory(prefix="ctzoo-study-") as tmp:
        upload = Path(tmp) / f"upload{suffix}"
        upload.write_bytes(body)
        out = Path(tmp) / "out"
        [row] = run_pipeline([CaseInput("study", upload)], task,
                             PipelineOptions(out=out, workers=0, overlay=False, progress=False))
        if row["status"] != "ok":
            message = row["error"].replace(str(upload), "the upload")
            raise ServeError(message, status=500 if message.startswith("model failed") else 400)
        folder = out / "study"
        detector = task.task == "detection"
        if output_format == "json":
            name = "detections.json" if detector else "segmentation.json"
            return JSONResponse({**json.loads((folder / name).read_text()), "graph": task.runtime.get("graph")})
        if output_format == "nifti":
            if detector:
                raise ServeError("format=nifti is for segmentation models; a detector answers json or dicom")
            return Response((folder / "labels.nii.gz").read_bytes(), media_type="application/gzip")
        dicom = folder / ("sr.dcm" if detector else "seg.dcm")
        if not dicom.is_file():
            reason = "no class was found" if suffix == ".zip" else "the upload was not a DICOM series"
            raise ServeError(f"no DICOM result: {reason}", status=404 if suffix == ".zip" else 400)
        return Response(dicom.read_bytes(), media_type="application/dicom")


def study_router(device: str = "auto", threads: int | None = None) -> APIRouter:
    """The study routes, for ``create_app(..., extra_routers=[study_router()])``."""
    router = APIRouter()
    tasks = StudyTasks(device, threads)

    @router.post("/studies/{model_name}")
    async def study(model_name: str, request: Request, format: str = "json", score_threshold: float | None = None):
        models = request.app.state.repository
        if model_name not in models:
            raise ServeError(f"unknown model {model_name!r}; served: {', '.join(sorted(models))}", status=404)
        if format not in FORMATS:
            raise ServeError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
        if score_threshold is not None and not 0.0 <= score_threshold <= 1.0:
            raise ServeError(f"score_threshold must lie in [0, 1], got {score_threshold}")
        bundle = await run_in_threadpool(tasks.bundle, models[model_name])
        settings = request.app.state.settings
        body = await read_body(request, settings.max_upload_bytes)
        suffix = upload_suffix(body)
        task = await run_in_threadpool(tasks.get, bundle, score_threshold)
        try:
            return await asyncio.wait_for(run_in_threadpool(run_study, task, body, suffix, format),
                                          settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise ServeError(f"the study took longer than {settings.request_timeout_s:.0f} s", status=504) from None

    return router
