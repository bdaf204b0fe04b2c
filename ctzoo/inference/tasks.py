"""What one zoo model needs from the batch pipeline, split by where each part runs.

The pipeline (:mod:`ctzoo.inference.pipeline`) moves every volume through four stages; a model plugs in one
function per stage, so the detector and the segmenter share the pipeline, the local and the Ray engines:

``preprocess(volume) -> (context, slices)``
    in a reader process: the network input of every slice (an iterator of float32 ``(C, H, W)`` arrays, all of
    one shape for a model, so slices of different volumes batch together) and a small picklable context;
``predict(batch) -> [output per slice]``
    in the process holding the backend (PyTorch or ONNX Runtime): one forward pass over ``(B, C, H, W)``
    and whatever per-slice decoding is cheap enough to keep there (the keypoint grouping);
``finish(volume, context, outputs) -> result``
    in the writer: the per-volume result (merged lesions, or the label map on the input grid);
``write(volume, result, folder, overlay, runtime) -> (paths, summary)``
    in the writer: the files of the case, each written under a temporary name and renamed; its JSON document
    records ``runtime``, what predicted the case (backend, device, precision, compiled, the ONNX graph).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ctzoo.io import Volume
from ctzoo.io.atomic import atomic_path
from ctzoo.models.bundle import ModelBundle, load_bundle
from ctzoo.models.registry import WEIGHTS_FILE

log = logging.getLogger(__name__)


@dataclass
class ModelTask:
    """The four stage functions of one zoo model (see the module docstring). ``preprocess`` must pickle."""

    model_name: str
    model_version: str
    task: str
    preprocess: Callable[[Volume], tuple[Any, Iterator[np.ndarray]]]
    predict: Callable[[np.ndarray], list[Any]]
    finish: Callable[[Volume, Any, list[Any]], Any]
    write: Callable[[Volume, Any, Path, bool, dict[str, Any]], tuple[list[Path], dict[str, Any]]]
    # what ran: backend, device, precision, compiled (torch) or the graph (ONNX); recorded in the outputs
    runtime: dict[str, Any] = field(default_factory=dict)
    # a batch's predict rerun under a profiler (ctzoo.perf.deep_profile), for deep profiles of anomalous batches;
    # None where the backend has none here (ONNX: ctzoo serve profiles its graphs)
    profile: Callable[[np.ndarray], Any] | None = None
    # the same stages on a new CPU backend of their own with N threads, built where it is called: each worker of
    # the pipeline's "copies" layout runs one; None where the model cannot be copied (a placed network)
    replicate: Callable[[int], ModelTask] | None = None
    # what besides the model version decides its outputs (backend, precision, a detector's score threshold):
    # recorded in each case's status file, where --resume compares it (ctzoo.inference.resume)
    settings: dict[str, Any] = field(default_factory=dict)
    # every file `write` may put in a case folder: removed before the case is run again, so a rerun that fails or
    # writes fewer files (no overlay, no SEG) leaves none of an earlier run's beside its status
    output_files: tuple[str, ...] = ()


def preprocess_on(task: ModelTask, device: str) -> ModelTask:
    """``task`` with its preprocessing computed on ``device`` and its slices left there as tensors, for the process
    that holds the model (:attr:`ctzoo.inference.pipeline.PipelineOptions.preprocess_device`). ValueError where
    that cannot be: an ONNX Runtime backend takes host arrays, and a preprocessing without a device runs on the CPU."""
    if task.runtime.get("backend") != "torch":
        raise ValueError("preprocessing on the model's device feeds the PyTorch backend: ONNX Runtime takes its "
                         "inputs from the CPU")
    if not hasattr(task.preprocess, "device"):
        raise ValueError(f"{task.model_name}: its preprocessing runs on the CPU only")
    return dataclasses.replace(task, preprocess=dataclasses.replace(task.preprocess, device=device))


def _log_input_warnings(volume: Volume, folder: Path) -> None:
    """The reader's warnings on the case (missing slices...), which its JSON document also carries: ``ctzoo infer``
    silences Python warnings, and a result on a gapped series must not pass unremarked. The case's name and the
    warning, which names slices (InstanceNumber, z, index) and counts, never a file or folder: those names may
    carry the patient's (the service's case is ``study``)."""
    for warning in volume.warnings:
        log.warning("%s: %s", folder.name, warning)


def error_message(exc: BaseException) -> str:
    """One line for the summary: the exception type (when it adds something) and its message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, (ValueError, FileNotFoundError)) else f"{type(exc).__name__}: {text}"


def _write_dicom_result(written: list[Path], path: Path, write: Callable[[], Path]) -> str:
    """Write a case's DICOM result (SR, SEG) with ``write``, appending its path to ``written``; returns "" or, where
    the DICOM writer fails, the error (the summary row's ``dicom_error``, for the user who ran the case or uploaded
    it): the case keeps the JSON and NIfTI results already written, which do not depend on DICOM encoding. The
    log line has the exception's type and the DICOM attributes its message names, never the message itself: the
    writers quote header values (a birth date, a name in PatientSex)."""
    try:
        written.append(write())
        return ""
    except Exception as exc:
        named = dicom_keywords_named(str(exc))
        log.warning("%s: %s not written (%s%s)", path.parent.name, path.name, type(exc).__name__,
                    f" on {', '.join(named)}" if named else "")
        return f"{path.name} not written: {error_message(exc)}"


def dicom_keywords_named(text: str) -> list[str]:
    """The DICOM attribute keywords ``text`` names (pydicom's dictionary; highdicom's enumerations too, as
    ``PatientSexValues``), outside quotes, where the writers put the values: words safe to log."""
    from pydicom.datadict import keyword_dict

    named = []
    for word in re.findall(r"[A-Z][A-Za-z0-9]+", re.sub(r"'[^']*'|\"[^\"]*\"", " ", text)):
        keyword = word.removesuffix("Values") if word.endswith("Values") else word
        if keyword in keyword_dict and keyword not in named:
            named.append(keyword)
    return named


def _write_json(document: dict, path: Path) -> Path:
    import json

    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(document, indent=2))
    return path


# ------------------------------------------------------------------------------------------ RECIST-Net


@dataclass
class DetectorPreprocess:
    """Reader side of the detector: LPS-reorient, then each slice's 2.5D input on a fixed square canvas.
    ``device``: resample and window there and yield tensors there (the model's device: ``ctzoo infer
    --preprocess-on model``); None: NumPy arrays computed on the CPU."""

    prep: Any  # SlicePreprocessing
    device: str | None = None

    def __call__(self, volume: Volume):
        from ctzoo.inference.recist_volume import canvas_size, slice_inputs
        from ctzoo.io import reorient_lps

        axial = reorient_lps(volume)
        scales: list[np.ndarray] = []

        def images() -> Iterator[np.ndarray]:
            for image, scale in slice_inputs(axial, self.prep, canvas=canvas_size(self.prep), device=self.device):
                scales.append(scale)
                yield image.numpy() if self.device is None else image

        # every slice of a volume has the same in-plane scale; the context carries it once it is known
        return scales, images()


def detector_task(backend, prep, model_name: str = "", version: str = "", score_threshold: float = 0.3,
                  max_lesions: int = 20, weights: dict[str, Any] | None = None) -> ModelTask:
    """The pipeline stages of a RECIST-Net on ``backend`` (a DetectorBackend) with preprocessing ``prep`` (a
    SlicePreprocessing); ``model_name``, ``version`` and ``weights`` (:func:`weights_record`) go into the results."""
    from ctzoo.inference.recist_volume import decode_heads, detections_document, slice_detections
    from ctzoo.io import reorient_lps

    def predict(batch: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        return decode_heads(backend.heads(batch), backend.down_ratio, max_lesions, score_threshold)

    def finish(volume: Volume, scales: list[np.ndarray], outputs: list) -> dict[str, Any]:
        axial = reorient_lps(volume)
        found = [d for k, ((scores, points), scale) in enumerate(zip(outputs, scales))
                 for d in slice_detections(axial, k, scores, points, scale)]
        return {**detections_document(volume, axial, found, model_name, version, weights),
                "score_threshold": score_threshold}

    def write(volume: Volume, document: dict, folder: Path, overlay: bool, runtime: dict[str, Any]):
        _log_input_warnings(volume, folder)
        written = [_write_json({**document, "runtime": runtime}, folder / "detections.json")]
        dicom_error = ""
        if volume.dicom is not None:
            from ctzoo.io.dicom_sr import write_recist_sr

            dicom_error = _write_dicom_result(written, folder / "sr.dcm", functools.partial(
                write_recist_sr, document, volume, folder / "sr.dcm", model_name, version,
                weights_sha256=(weights or {}).get("sha256", {}).get(WEIGHTS_FILE)))
        if overlay:
            from ctzoo.inference.overlay import plot_detections

            written.append(plot_detections(volume, document, folder / "overlay.png"))
        lesions = document["lesions"]
        return written, {"findings": len(lesions), "dicom_error": dicom_error,
                         "detail": "; ".join(f"{d['long_axis_mm']:.0f}x{d['short_axis_mm']:.0f} mm at {_where(d)}"
                                             for d in lesions[:5])}

    return ModelTask(model_name, version, "detection", DetectorPreprocess(prep), predict, finish, write,
                     settings={"score_threshold": score_threshold},
                     output_files=("detections.json", "sr.dcm", "overlay.png"))


def _where(lesion: dict[str, Any]) -> str:
    """The lesion's key slice for a one-line detail: ``InstanceNumber 12 (z -45.0 mm)``, else ``z -45.0 mm``."""
    z_mm = lesion.get("slice_z_mm")
    if z_mm is None:
        return f"index {lesion['slice']}"
    number = lesion.get("instance_number")
    return f"z {z_mm:.1f} mm" if number is None else f"InstanceNumber {number} (z {z_mm:.1f} mm)"


# ----------------------------------------------------------------------------------------- segmenters


@dataclass
class SegmenterPreprocess:
    """Reader side of a 2D segmenter: the training-time slices (LPS axial, resampled, cropped, windowed), computed
    on ``device`` and yielded as tensors there where one is given (see :class:`DetectorPreprocess`)."""

    prep: Any  # SegPreprocessing
    device: str | None = None

    def __call__(self, volume: Volume):
        from ctzoo.datasets.seg_preprocessing import volume_to_slices

        slices, geometry = volume_to_slices(volume, self.prep, self.device)
        return geometry, (s.numpy() if self.device is None else s for s in slices)


def segmenter_task(backend, prep, model_name: str = "", version: str = "",
                   weights: dict[str, Any] | None = None) -> ModelTask:
    """The pipeline stages of a 2D segmenter on ``backend`` (a SegmenterBackend) with preprocessing ``prep`` (a
    SegPreprocessing); ``model_name``, ``version`` and ``weights`` (:func:`weights_record`) go into the results."""
    from ctzoo.datasets.seg_preprocessing import cropped_body_warning, slices_to_volume_labels
    from ctzoo.inference.segment_volume import write_segmentation

    class_names = list(backend.class_names)

    def predict(batch: np.ndarray) -> list[np.ndarray]:
        return list(backend.segment(batch))

    def finish(volume: Volume, geometry, outputs: list[np.ndarray]) -> np.ndarray:
        # anatomy outside the canvas is background in the labels: the volume's warnings (segmentation.json, the log)
        # say so, where the reader's own warnings are
        if (warning := cropped_body_warning(volume, geometry)) is not None and warning not in volume.warnings:
            volume.warnings.append(warning)
        return slices_to_volume_labels(np.stack(outputs), geometry, volume)

    def write(volume: Volume, labels: np.ndarray, folder: Path, overlay: bool, runtime: dict[str, Any]):
        _log_input_warnings(volume, folder)
        written, document = write_segmentation(volume, labels, class_names, folder, model_name, version,
                                               overlay=overlay, runtime=runtime, weights=weights)
        dicom_error = ""
        if volume.dicom is not None and labels.any():  # a SEG holds at least one segment
            from ctzoo.io.dicom_seg import write_dicom_seg

            dicom_error = _write_dicom_result(written, folder / "seg.dcm", functools.partial(
                write_dicom_seg, labels, volume, class_names, folder / "seg.dcm", model_name, version))
        # segmentation.json's volumes (|det| of the affine per voxel: right on a sheared grid too)
        volumes = {name: entry["volume_ml"] for name, entry in document["classes"].items()}
        return written, {"findings": sum(v > 0 for v in volumes.values()), "dicom_error": dicom_error,
                         "detail": "; ".join(f"{name} {ml:.0f} mL" for name, ml in volumes.items())}

    return ModelTask(model_name, version, "segmentation", SegmenterPreprocess(prep), predict, finish, write,
                     output_files=("labels.nii.gz", "segmentation.json", "seg.dcm", "labels_overlay.png"))


def weights_record(bundle: ModelBundle) -> dict[str, Any]:
    """What results record of the weights that ran: ``{"sha256": {file: sha256}, "checked": bool}``, the digests of
    model.safetensors (and a template bank's files), checked against those bundle.json records (``checked``
    False: a bundle saved before ctzoo recorded them; computed here, with nothing to check them against)."""
    return {"sha256": bundle.file_digests(), "checked": bundle.digests_recorded}


def _runtime(bundle: ModelBundle, backend) -> dict[str, Any]:
    runtime = {"backend": backend.kind, "device": backend.device}
    if backend.kind == "onnx" and bundle.graphs is not None:
        runtime["graph"] = bundle.graphs.describe(bundle.folder)
        runtime["precision"] = bundle.graphs.precision
    else:
        runtime.update(precision=backend.precision, compiled=backend.compiled)  # False, True or "cuda-graphs"
    return runtime


def model_task(source: str | Path | ModelBundle, backend_kind: str = "torch", device: str = "auto",
               score_threshold: float | None = None, threads: int | None = None,
               network: Any = None, precision: str = "fp32", compile: bool | str = False) -> ModelTask:
    """The stages of a bundle (or a zoo name or bundle folder, loaded here) on a new backend (``torch`` or
    ``onnx``, the bundle's exported graphs); ``score_threshold`` None is the bundle's operating point;
    ``network``: a placed network the torch backend runs instead of the bundle's, ``precision`` fp32 or bf16 as
    :func:`ctzoo.inference.precision.choose_precision` resolved it, ``compile`` for ``torch.compile`` (see
    :func:`make_backend`)."""
    from ctzoo.inference.backends import make_backend

    bundle = source if isinstance(source, ModelBundle) else load_bundle(source)
    backend = make_backend(bundle, backend_kind, device, threads=threads, network=network, precision=precision,
                           compile=compile)
    task = bundle_task(bundle, backend, score_threshold)
    # weights retrained or replaced under the same version give other results: --resume compares them too (hashed
    # here, once per run, not in every model copy that bundle_task builds)
    task.settings["weights"] = bundle.weights_digest()
    if network is not None:
        task.replicate = None  # the placed network spans this machine's devices: one of it, in this process
    return task


def bundle_task(bundle: ModelBundle, backend, score_threshold: float | None = None) -> ModelTask:
    """The stages of ``bundle`` on ``backend`` (made from it): its preprocessing, name and version; detectors report
    lesions from ``score_threshold`` up (None: the bundle's operating point, :attr:`ModelBundle.score_threshold`)."""
    weights = weights_record(bundle)
    if bundle.task == "segmentation":
        task = segmenter_task(backend, bundle.preprocessing, bundle.name, bundle.version, weights)
    else:
        threshold = bundle.score_threshold if score_threshold is None else score_threshold
        task = detector_task(backend, bundle.preprocessing, bundle.name, bundle.version, threshold, weights=weights)
    task.runtime = _runtime(bundle, backend)
    task.settings.update(backend=backend.kind, precision=task.runtime["precision"])
    if backend.kind == "torch":
        task.profile = functools.partial(_profile_predict, task.predict)
    torch_options = ({"precision": task.runtime["precision"], "compile": task.runtime["compiled"]}
                     if backend.kind == "torch" else {})
    task.replicate = functools.partial(_cpu_replica, bundle, backend.kind, score_threshold, torch_options)
    return task


def _cpu_replica(bundle: ModelBundle, kind: str, score_threshold: float | None, torch_options: dict[str, Any],
                 threads: int) -> ModelTask:
    """``bundle``'s stages on a new CPU backend of ``kind`` with ``threads`` intra-op threads, and the torch
    backend's precision and compilation (ModelTask.replicate)."""
    from ctzoo.inference.backends import make_backend

    return bundle_task(bundle, make_backend(bundle, kind, "cpu", threads=threads, **torch_options), score_threshold)


def _profile_predict(predict: Callable[[np.ndarray], list[Any]], batch: np.ndarray):
    """One batch's ``predict`` (the model and its decoding) under ``torch.profiler``."""
    from ctzoo.perf.deep_profile import profile_torch

    return profile_torch(lambda: predict(batch))


def run_task(task: ModelTask, volume: Volume, batch_size: int = 8) -> Any:
    """``task`` on one volume in memory, stage after stage as the pipeline runs them (without files): the
    ``detections.json`` document of a detector, the label map on ``volume``'s grid of a segmenter."""
    context, images = task.preprocess(volume)
    outputs: list[Any] = []
    batch: list[np.ndarray] = []
    for image in images:
        batch.append(image)
        if len(batch) == batch_size:
            outputs += task.predict(np.stack(batch))
            batch = []
    if batch:
        outputs += task.predict(np.stack(batch))
    return task.finish(volume, context, outputs)
