"""Inference backends for model bundles: PyTorch eager or ONNX Runtime behind one small interface.

``ctzoo infer --backend onnx|torch`` preprocesses slices and hands batches to a backend made by
:func:`make_backend`; the backend only runs the network, with numpy in and out:

* a :class:`DetectorBackend` (RecistNet) returns the raw heads, ``{"heatmaps", "offsets", "displacements"}``,
  which the caller decodes with :func:`ctzoo.inference.recist_volume.decode_heads`;
* a :class:`SegmenterBackend` (TemplateSegNet) returns the class index per pixel, each slice segmented with its
  nearest bank template, by the same rule as :func:`ctzoo.inference.segment_volume.segment_slices`.

The torch backends can predict under bf16 autocast (``precision``, checked first by
:mod:`ctzoo.inference.precision`) and run a network compiled for fixed shapes (``compile``, :class:`FixedBatches`).
The ONNX backends run the checked graphs an exported bundle carries (``1/model.onnx``, ``1/embed.onnx``: see
:mod:`ctzoo.export.repository`), whatever their precision: the graph ``ctzoo serve`` serves is the graph a
study or a batch runs.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from ctzoo.models.bundle import ModelBundle
from ctzoo.models.recist_grouping import NUM_ENDPOINTS, NUM_POINTS

__all__ = ["DetectorBackend", "SegmenterBackend", "make_backend"]

KINDS = ("torch", "onnx")
HEADS = ("heatmaps", "offsets", "displacements")
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


#: ``compile`` values of :func:`make_backend` -> torch.compile's mode.
COMPILE_MODES = {True: None, "cuda-graphs": "reduce-overhead"}


class NoGraphsError(ValueError):
    """The ONNX backend was asked for a bundle that carries no exported graphs."""


def make_backend(bundle: ModelBundle, kind: Literal["torch", "onnx"] = "torch", device: str = "auto",
                 threads: int | None = None, network: torch.nn.Module | None = None, precision: str = "fp32",
                 compile: bool | str = False) -> DetectorBackend | SegmenterBackend:
    """A backend running ``bundle``.

    Args:
        kind: ``"torch"`` (eager PyTorch, the bundle's weights) or ``"onnx"`` (ONNX Runtime, the bundle's exported
            graphs; :class:`NoGraphsError` when it has none: ``ctzoo export`` it, or let ``ctzoo infer --backend
            onnx`` export it into the cache).
        device: ``"auto"`` (CUDA when torch sees one, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. ONNX
            Runtime without its CUDA provider falls back to the CPU with a warning; ``backend.device`` says
            which one runs.
        threads: intra-op threads: ONNX Runtime's ``intra_op_num_threads``, or ``torch.set_num_threads`` (which
            is process-wide) for torch; None keeps the runtime's default.
        network: torch only: run this instead of a copy of the bundle's network, where it is (never moved): a
            placed network (``ctzoo.scaling.placement.execute.PlacedModule``, inputs on ``device``, its home).
        precision: torch only: ``"fp32"`` or ``"bf16"`` (autocast), as
            :func:`ctzoo.inference.precision.choose_precision` resolved it (nothing here checks bf16 against fp32).
        compile: torch only: ``torch.compile`` the network for fixed shapes, every batch padded to the largest
            batch seen (:class:`FixedBatches`), so a job's last, partial batch does not compile it again.
            ``"cuda-graphs"`` (CUDA only): compiled in torch's ``reduce-overhead`` mode, each fixed-shape batch
            replayed as one CUDA graph (no per-kernel launch cost; outputs are copied out before the next batch).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown backend kind {kind!r}: use one of {', '.join(KINDS)}")
    # ONNX Runtime has CUDA of its own (or falls back to the CPU with a warning), whatever torch has
    device = resolve_device(device) if kind == "torch" else _device_name(device)
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}: a backend runs fp32 or bf16 (choose_precision resolves "
                         "auto)")
    if kind == "torch":
        if threads is not None:
            torch.set_num_threads(threads)
        import copy

        if network is not None:
            if compile:
                raise ValueError("a placed network runs as placed: it cannot be compiled")
            model = network
        else:
            model = copy.deepcopy(bundle.network()).to(device).eval()  # the bundle's stays on the CPU, shared
        fixed = None
        if compile:
            if compile not in COMPILE_MODES:
                raise ValueError(f"unknown compile mode {compile!r}: use True or 'cuda-graphs'")
            if compile == "cuda-graphs" and not device.startswith("cuda"):
                raise ValueError(f"CUDA graphs (--cuda-graphs) replay on a CUDA device, not {device}: use --device "
                                 "cuda, or --compile alone")
            # in place: still the same module class, as segment_slices expects
            model.compile(dynamic=False, mode=COMPILE_MODES[compile])
            fixed = FixedBatches()
        if bundle.task == "detection":
            return TorchDetector(model, device, precision, fixed, compile)
        return TorchSegmenter(model, bundle.template_bank, bundle.class_names, device, placed=network is not None,
                              precision=precision, fixed=fixed, compiled=compile)
    if precision != "fp32" or compile:
        raise ValueError("bf16 and compile apply to the PyTorch backend: an ONNX graph runs as exported")
    if network is not None:
        raise ValueError("the ONNX backend runs the bundle's exported graphs; a PyTorch network needs kind='torch'")
    if bundle.graphs is None:
        raise NoGraphsError(f"{bundle.folder} carries no ONNX graphs: export it with 'ctzoo export' (or run "
                            "'ctzoo infer --backend onnx', which exports into the cache)")
    bundle.graphs.verify()  # BundleError when a graph is not the one the export checked
    if bundle.task == "detection":
        return OnnxDetector(bundle.graphs.model, bundle.down_ratio, device, threads)
    return OnnxSegmenter(bundle.graphs.model, bundle.graphs.embed, bundle.template_bank, bundle.class_names,
                         tuple(bundle.preprocessing.size), device, threads)


def _device_name(device: str) -> str:
    """``auto`` as the device it stands for (CUDA when torch sees one, else the CPU); ValueError for an unknown one."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not (device == "cuda" or device.startswith("cuda:") and device[5:].isdigit()):
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    return device


def resolve_device(device: str) -> str:
    """:func:`_device_name`, and ValueError for a CUDA device PyTorch does not have on this machine (torch would
    fail later with an AssertionError)."""
    device = _device_name(device)
    if device == "cpu":
        return device
    index = device.removeprefix("cuda:") if device.startswith("cuda:") else None
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device on this machine (use auto or cpu)")
    if index is not None and int(index) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def autocast(device: str, precision: str) -> contextlib.AbstractContextManager:
    """The context a forward pass of ``precision`` (``fp32`` or ``bf16``) runs in on ``device``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ValueError(f"unknown precision {precision!r}: a backend runs fp32 or bf16")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def _as_batch(images: np.ndarray | torch.Tensor, channels: int | None, multiple: int = 1,
              size: tuple[int, ...] | None = None) -> np.ndarray | torch.Tensor:
    """``images`` as C-contiguous float32 ``(B, C, H, W)`` (a tensor stays a tensor, on its device: preprocessed
    there); ValueError naming what is wrong otherwise."""
    if isinstance(images, torch.Tensor):
        images = images.float().contiguous()
    else:
        images = np.ascontiguousarray(images, dtype=np.float32)
    if images.ndim != 4 or (channels is not None and images.shape[1] != channels):
        raise ValueError(f"images must have shape (B, {channels or 'C'}, H, W), got {images.shape}")
    if any(s % multiple for s in images.shape[2:]):
        raise ValueError(f"image height and width must be multiples of {multiple}, got {images.shape[2:]}")
    if size is not None and tuple(images.shape[2:]) != size:
        raise ValueError(f"slices must be {size} pixels (the model's preprocessing and its template bank), "
                         f"got {images.shape[2:]}")
    return images


# ------------------------------------------------------------------------------------------------- torch


class FixedBatches:
    """Batches padded with zero slices to the largest batch seen so far, for a network compiled for fixed shapes:
    a new batch size would compile it again (tens of seconds on a CPU), and in a batch job only the last batch is
    smaller. The padding's outputs are dropped (``[:count]``)."""

    def __init__(self) -> None:
        self.batch = 1

    def pad(self, images: np.ndarray) -> tuple[np.ndarray, int]:
        """``(B, ...)`` -> ``(max(B, largest before), ...)`` and ``B``."""
        count = len(images)
        self.batch = max(self.batch, count)
        if count == self.batch:
            return images, count
        if isinstance(images, torch.Tensor):
            return torch.cat([images, images.new_zeros((self.batch - count, *images.shape[1:]))]), count
        return np.concatenate([images, np.zeros((self.batch - count, *images.shape[1:]), images.dtype)]), count


def _new_step(compiled: bool | str) -> None:
    """Before each batch of a network replayed as CUDA graphs: a new inference step, so torch knows the last
    batch's outputs (already copied out) may be overwritten."""
    if compiled == "cuda-graphs":
        torch.compiler.cudagraph_mark_step_begin()


class TorchDetector:
    kind = "torch"

    def __init__(self, model: torch.nn.Module, device: str, precision: str = "fp32",
                 fixed: FixedBatches | None = None, compiled: bool | str = False) -> None:
        self.model, self.device, self.down_ratio = model, torch.device(device).type, model.down_ratio
        self._device, self.precision, self.fixed, self.compiled = device, precision, fixed, compiled
        self._channels = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels

    def heads(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = _as_batch(images, self._channels, SIZE_MULTIPLE)
        images, count = self.fixed.pad(images) if self.fixed else (images, len(images))
        _new_step(self.compiled)
        with torch.inference_mode(), autocast(self._device, self.precision):
            outputs = self.model(torch.as_tensor(images).to(self._device))
        return {name: outputs[name][:count].float().cpu().numpy() for name in HEADS}


class TorchSegmenter:
    """:func:`segment_slices` on one batch: the reference the ONNX segmenter must reproduce.

    ``placed``: ``model`` is a placed network, spread over devices, which must not be moved (``segment_slices``
    moves its model): each slice then runs with its nearest template as the ONNX segmenter does.
    """

    kind = "torch"

    def __init__(self, model: torch.nn.Module, bank, class_names: list[str], device: str,
                 placed: bool = False, precision: str = "fp32", fixed: FixedBatches | None = None,
                 compiled: bool | str = False) -> None:
        self.model, self.bank, self.class_names, self.placed = model, bank, list(class_names), placed
        self.precision, self.fixed, self.compiled = precision, fixed, compiled
        self.device, self._device = torch.device(device).type, device

    def segment(self, images: np.ndarray) -> np.ndarray:
        from ctzoo.inference.segment_volume import segment_slices

        images = _as_batch(images, 1)
        if self.placed:
            return self._segment_in_place(torch.as_tensor(images).to(self._device))
        images, count = self.fixed.pad(images) if self.fixed else (images, len(images))
        _new_step(self.compiled)
        with autocast(self._device, self.precision):
            return segment_slices(self.model, self.bank, torch.as_tensor(images), batch_size=max(1, len(images)),
                                  device=self._device, progress=False)[:count].numpy()

    def _segment_in_place(self, slices: torch.Tensor) -> np.ndarray:
        """``(B, 1, H, W)`` -> ``(B, H, W)`` uint8: each slice with its nearest bank template (a plain segmenter
        alone), the model left where it is."""
        self.model.eval()
        with torch.inference_mode():
            if self.bank is None:
                logits = self.model(slices)
            else:
                index = self.bank.nearest(self.model, slices).cpu()
                logits = self.model(slices, self.bank.templates(index).to(slices.device))
        return logits.argmax(dim=1).to(torch.uint8).cpu().numpy()


# ------------------------------------------------------------------------------------------- ONNX Runtime


def _session(path: Path, device: str, threads: int | None):
    """An ONNX Runtime session on CUDA when asked for and available, else on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    # between batches this process decodes, resamples and writes: threads spinning while they wait for the next
    # batch would take the cores that work needs (and other model copies' and processes'), as in ctzoo serve
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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

    def __init__(self, graph: Path, down_ratio: int, device: str, threads: int | None) -> None:
        self.session = _session(graph, device, threads)
        self.device, self.down_ratio = _session_device(self.session), down_ratio
        self._channels = self.session.get_inputs()[0].shape[1]  # static in the graph; batch, H, W are not

    def heads(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = _as_batch(images, self._channels, SIZE_MULTIPLE)
        if not len(images):  # ONNX Runtime kernels need not accept an empty batch
            h, w = (s // self.down_ratio for s in images.shape[2:])
            return {name: np.zeros((0, HEAD_CHANNELS[name], h, w), np.float32) for name in HEADS}
        return dict(zip(HEADS, self.session.run(list(HEADS), {"image": images})))


class OnnxSegmenter:
    """The ONNX twin of :func:`segment_slices`: ``embed.onnx`` -> cosine-nearest bank template -> ``model.onnx``
    on each slice with its template (the graph encodes the template itself, as the served graph does)."""

    kind = "onnx"

    def __init__(self, graph: Path, embed: Path | None, bank, class_names: list[str], size: tuple[int, int],
                 device: str, threads: int | None) -> None:
        self.bank, self.class_names, self.size = bank, list(class_names), tuple(size)
        if bank is None or embed is None:
            raise ValueError("the ONNX segmenter needs the template bank and its embed.onnx graph")
        if tuple(bank.images.shape[2:]) != self.size:
            raise ValueError(f"bank templates are {tuple(bank.images.shape[2:])} pixels but the model's "
                             f"preprocessing gives {self.size}")
        self._segment = _session(graph, device, threads)
        self.device = _session_device(self._segment)
        self._embed = _session(embed, device, threads)
        self._bank_unit = _unit(bank.embeddings.numpy().astype(np.float32))

    def segment(self, images: np.ndarray) -> np.ndarray:
        images = _as_batch(images, 1, size=self.size)
        if not len(images):
            return np.zeros((0, *self.size), np.uint8)
        queries = self._embed.run(["embeddings"], {"image": images})[0]
        index = (_unit(queries) @ self._bank_unit.T).argmax(axis=1)  # cosine nearest, as TemplateBank.nearest
        templates = self.bank.templates(index.tolist()).numpy()
        logits = self._segment.run(["logits"], {"image": images, "template": templates})[0]
        return logits.argmax(axis=1).astype(np.uint8)


def _unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, with F.normalize's floor on the norm (1e-12)."""
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
