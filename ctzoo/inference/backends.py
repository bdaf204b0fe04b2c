"""Inference backends for the zoo models: PyTorch eager or ONNX Runtime behind one small interface.

``ctzoo infer --backend onnx|torch`` preprocesses slices and hands batches to a backend made by
:func:`make_backend`; the backend only runs the network, with numpy in and out:

* a :class:`DetectorBackend` (RecistNet) returns the raw heads, ``{"heatmaps", "offsets", "displacements"}``,
  which the caller decodes with :func:`ctzoo.models.recistnet.group_keypoints`;
* a :class:`SegmenterBackend` (TemplateSegNet) returns the class index per pixel, each slice segmented with its
  nearest bank template, by the same rule as :func:`ctzoo.inference.segment_volume.segment_slices`.

The ONNX backends run graphs exported once per weights into the cache by
:func:`ctzoo.inference.onnx_export.cached_onnx_folder` (checked against PyTorch when written, see there).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from ctzoo.inference.onnx_export import HEADS, cached_onnx_folder, export_onnx
from ctzoo.models.recistnet import NUM_ENDPOINTS, NUM_POINTS
from ctzoo.models.registry import create_model, model_entry, model_input_spec

__all__ = ["DetectorBackend", "SegmenterBackend", "export_onnx", "make_backend"]

KINDS = ("torch", "onnx")
#: Channels of each RecistNet head (for an empty batch, which neither runtime needs to see).
HEAD_CHANNELS = {"heatmaps": NUM_POINTS, "offsets": 2 * NUM_POINTS, "displacements": 2 * NUM_ENDPOINTS}
SIZE_MULTIPLE = 32  # RecistNet's input must be a multiple of its coarsest stride


class DetectorBackend(Protocol):
    kind: str  # "torch" or "onnx"
    device: str  # "cpu" or "cuda"
    down_ratio: int

    def heads(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """images (B, C, H, W) float32 -> {"heatmaps", "offsets", "displacements"} float32 numpy (raw
        logits/regressions)."""
        ...


class SegmenterBackend(Protocol):
    kind: str
    device: str
    class_names: list[str]

    def segment(self, images: np.ndarray) -> np.ndarray:
        """images (B, 1, H, W) float32 preprocessed slices -> (B, H, W) uint8 class index, each slice with its
        nearest bank template (same rule as segment_slices)."""
        ...


def make_backend(model_name: str, kind: Literal["torch", "onnx"] = "torch", device: str = "auto",
                 cache: Path | None = None, threads: int | None = None) -> DetectorBackend | SegmenterBackend:
    """A backend running the zoo model ``model_name`` with its shipped weights.

    Args:
        kind: ``"torch"`` (eager PyTorch) or ``"onnx"`` (ONNX Runtime; exported into the cache on first use).
        device: ``"auto"`` (CUDA when torch sees one, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. ONNX
            Runtime without its CUDA provider falls back to the CPU with a warning; ``backend.device`` says
            which one runs.
        cache: root of the ONNX export cache instead of :func:`ctzoo.datasets.samples.cache_dir`.
        threads: intra-op threads: ONNX Runtime's ``intra_op_num_threads``, or ``torch.set_num_threads`` (which
            is process-wide) for torch; None keeps the runtime's default.

    Unknown names raise the registry's :class:`~ctzoo.models.UnknownModelError`; an unknown kind ``ValueError``.
    """
    entry = model_entry(model_name)
    if kind not in KINDS:
        raise ValueError(f"unknown backend kind {kind!r}: use one of {', '.join(KINDS)}")
    device = _resolve_device(device)
    bank = None
    if entry.task == "segmentation":
        from ctzoo.models.template_bank import INDEX_FILE, TemplateBank

        # a template segmenter ships its bank beside its weights; a plain segmenter has none
        if (entry.weights_dir / INDEX_FILE).is_file():
            bank = TemplateBank.load(entry.weights_dir)
        class_names = bank.class_names if bank is not None else list(model_input_spec(model_name)["classes"])
    if kind == "torch":
        if threads is not None:
            torch.set_num_threads(threads)
        model = create_model(model_name, pretrained=True).eval().to(device)
        if entry.task == "detection":
            return TorchDetector(model, device)
        return TorchSegmenter(model, bank, class_names, device)
    folder = cached_onnx_folder(model_name, cache)
    if entry.task == "detection":
        down_ratio = create_model(model_name, pretrained=True).down_ratio  # the shipped config's, not the default
        return OnnxDetector(folder, down_ratio, device, threads)
    size = tuple(model_input_spec(model_name)["size"])
    return OnnxSegmenter(folder, bank, class_names, size, device, threads)


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not (device == "cuda" or device.startswith("cuda:")):
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    return device


def _as_batch(images: np.ndarray, channels: int | None, multiple: int = 1,
              size: tuple[int, ...] | None = None) -> np.ndarray:
    """``images`` as C-contiguous float32 ``(B, C, H, W)``; ValueError naming what is wrong otherwise."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    if images.ndim != 4 or (channels is not None and images.shape[1] != channels):
        raise ValueError(f"images must have shape (B, {channels or 'C'}, H, W), got {images.shape}")
    if any(s % multiple for s in images.shape[2:]):
        raise ValueError(f"image height and width must be multiples of {multiple}, got {images.shape[2:]}")
    if size is not None and images.shape[2:] != size:
        raise ValueError(f"slices must be {size} pixels (the model's preprocessing and its template bank), "
                         f"got {images.shape[2:]}")
    return images


# ------------------------------------------------------------------------------------------------- torch


class TorchDetector:
    kind = "torch"

    def __init__(self, model: torch.nn.Module, device: str) -> None:
        self.model, self.device, self.down_ratio = model, torch.device(device).type, model.down_ratio
        self._device = device
        self._channels = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels

    def heads(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = _as_batch(images, self._channels, SIZE_MULTIPLE)
        with torch.inference_mode():
            outputs = self.model(torch.from_numpy(images).to(self._device))
        return {name: outputs[name].float().cpu().numpy() for name in HEADS}


class TorchSegmenter:
    """:func:`segment_slices` on one batch: the reference the ONNX segmenter must reproduce."""

    kind = "torch"

    def __init__(self, model: torch.nn.Module, bank, class_names: list[str], device: str) -> None:
        self.model, self.bank, self.class_names = model, bank, list(class_names)
        self.device, self._device = torch.device(device).type, device

    def segment(self, images: np.ndarray) -> np.ndarray:
        from ctzoo.inference.segment_volume import segment_slices

        images = _as_batch(images, 1)
        slices = torch.from_numpy(images)
        return segment_slices(self.model, self.bank, slices, batch_size=max(1, len(images)), device=self._device,
                              progress=False).numpy()


# ------------------------------------------------------------------------------------------- ONNX Runtime


def _session(path: Path, device: str, threads: int | None):
    """An ONNX Runtime session on CUDA when asked for and available, else on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    providers: list = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" in ort.get_available_providers():
            device_id = int(device.partition(":")[2] or 0)
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        else:
            warnings.warn("ONNX Runtime has no CUDAExecutionProvider here (install onnxruntime-gpu): running on "
                          "the CPU", RuntimeWarning, stacklevel=3)
    return ort.InferenceSession(str(path), options, providers=providers)


def _session_device(session) -> str:
    return "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"


class OnnxDetector:
    kind = "onnx"

    def __init__(self, folder: Path, down_ratio: int, device: str, threads: int | None) -> None:
        self.session = _session(folder / "heads.onnx", device, threads)
        self.device, self.down_ratio = _session_device(self.session), down_ratio
        self._channels = self.session.get_inputs()[0].shape[1]  # static in the graph; batch, H, W are not

    def heads(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = _as_batch(images, self._channels, SIZE_MULTIPLE)
        if not len(images):  # ONNX Runtime kernels need not accept an empty batch
            h, w = (s // self.down_ratio for s in images.shape[2:])
            return {name: np.zeros((0, HEAD_CHANNELS[name], h, w), np.float32) for name in HEADS}
        return dict(zip(HEADS, self.session.run(list(HEADS), {"images": images})))


class OnnxSegmenter:
    """The ONNX twin of :func:`segment_slices`: embed -> cosine-nearest bank template -> encode each distinct
    template once -> segment with the per-slice encoding. Template encodings are kept across batches too (a
    bank template's encoding never changes), so a volume encodes each template at most once."""

    kind = "onnx"

    def __init__(self, folder: Path, bank, class_names: list[str], size: tuple[int, int], device: str,
                 threads: int | None) -> None:
        self.bank, self.class_names, self.size = bank, list(class_names), tuple(size)
        self._segment = _session(folder / "segment.onnx", device, threads)
        self.device = _session_device(self._segment)
        self._encodings: dict[int, list[np.ndarray]] = {}
        if bank is not None:
            if tuple(bank.images.shape[2:]) != self.size:
                raise ValueError(f"bank templates are {tuple(bank.images.shape[2:])} pixels but the model's "
                                 f"preprocessing gives {self.size}")
            self._embed = _session(folder / "embed.onnx", device, threads)
            self._encode = _session(folder / "encode_template.onnx", device, threads)
            self._encoded_names = [output.name for output in self._encode.get_outputs()]
            self._bank_unit = _unit(bank.embeddings.numpy().astype(np.float32))

    def segment(self, images: np.ndarray) -> np.ndarray:
        images = _as_batch(images, 1, size=self.size)
        if not len(images):
            return np.zeros((0, *self.size), np.uint8)
        feeds = {"images": images}
        if self.bank is not None:
            feeds.update(self._nearest_encoding(images))
        logits = self._segment.run(["logits"], feeds)[0]
        return logits.argmax(axis=1).astype(np.uint8)

    def _nearest_encoding(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """As :func:`ctzoo.inference.segment_volume._nearest_encoding`: the nearest template's encoding per slice."""
        queries = self._embed.run(["embeddings"], {"images": images})[0]
        index = (_unit(queries) @ self._bank_unit.T).argmax(axis=1)  # cosine nearest, as TemplateBank.nearest
        missing = sorted(set(index.tolist()) - self._encodings.keys())
        if missing:
            encoded = self._encode.run(self._encoded_names, {"templates": self.bank.templates(missing).numpy()})
            for row, template in enumerate(missing):
                self._encodings[template] = [value[row] for value in encoded]
        return {name: np.stack([self._encodings[t][k] for t in index.tolist()])
                for k, name in enumerate(self._encoded_names)}


def _unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, with F.normalize's floor on the norm (1e-12)."""
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
