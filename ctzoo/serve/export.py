"""Export a zoo model or a training checkpoint into a Triton-layout model repository, checked against PyTorch.

One folder per model; the layout is a contract with ``ctzoo serve`` (which reads ``ctzoo.json``) and with Triton
(which reads ``config.pbtxt`` and ``1/model.onnx``)::

    REPO/<name>/config.pbtxt        Triton config: platform onnxruntime_onnx, max_batch_size 16, inputs/outputs
                                    (dims without the batch dim, -1 dynamic), dynamic_batching 2 ms
    REPO/<name>/1/model.onnx        one graph
    REPO/<name>/ctzoo.json          name, version, task, batching, inputs/outputs (with the batch dim),
                                    input_spec (preprocessing), down_ratio | class_names, source, parity,
                                    opset, precision, created, software
    REPO/<name>/card.json           the model card, and README.md the same card for people
    REPO/<name>/templates.*         template segmenters: the template bank (templates.safetensors/json)

Graphs (flat tensors, batch dynamic everywhere):

* detector (RecistNet): ``image (B, C, H, W)`` -> ``heatmaps``, ``offsets``, ``displacements``, the raw heads
  of ``RecistNet.forward``; H and W dynamic (multiples of 32); decode with
  :func:`ctzoo.inference.recist_volume.decode_heads` and ``down_ratio``.
* template segmenter (TemplateSegNet): ``image (B, 1, H, W)`` and ``template (B, 1 + C, H, W)`` (the template
  image then its C class masks, as :meth:`TemplateBank.templates` gives them) -> ``logits (B, C + 1, H, W)``;
  H, W fixed by the model's input_spec (the template encoder pools masks with a kernel fixed at export). The
  template of a slice is the bank's nearest (:meth:`TemplateBank.nearest`); the bank ships in the folder.

Norm layers export as :func:`ctzoo.inference.onnx_export.with_exportable_norms` writes them (row-wise means,
1e-6 of PyTorch in fp32). Every export is checked right after it is written: ONNX Runtime (CPU) against the
unmodified PyTorch model in fp32 on random input at two batch sizes (the detector also at a second spatial size)
and on the embedded sample CT preprocessed as ``ctzoo infer`` does it. The error is
``max |onnx - torch| / (max |torch| + 1e-6)`` per output and input; above :data:`RELATIVE_TOLERANCE`
(:data:`FP16_RELATIVE_TOLERANCE` for ``--fp16``) the export raises ``RuntimeError`` naming the outputs, and
nothing is left behind: the folder is written as a hidden sibling and renamed into place only when complete, so
an earlier export of the same name stays as it was until a new one has passed.

``fp16=True`` writes ``<name>-fp16``: the same graph with fp16 weights and arithmetic inside and fp32 inputs
and outputs (onnxconverter-common's ``convert_float_to_float16(keep_io_types=True)``), so clients, the service
and the preprocessing are identical for both variants; only the casts at the edges differ.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ctzoo.inference import onnx_export
from ctzoo.inference.onnx_export import DEFAULT_OPSET, HEADS, Graph, _EncodeTemplate, _Heads, with_exportable_norms
from ctzoo.io.atomic import replace_folder
from ctzoo.models.registry import CARD_JSON, CARD_MD, ModelCard
from ctzoo.models.template_seg import TemplateEncoding, TemplateSegNet
from ctzoo.scaling.zoo_expand import checkpoint_network

logger = logging.getLogger(__name__)

#: Largest ``max |onnx - torch| / (max |torch| + 1e-6)`` accepted per output for fp32 graphs.
RELATIVE_TOLERANCE = onnx_export.RELATIVE_TOLERANCE
#: The same for ``--fp16`` graphs. fp16 keeps 11 significant bits (2^-11 = 5e-4 per rounding); measured on
#: recistnet-mini 0.4-1.8e-3 (worst: displacements on real CT) and on template-seg-abdomen 5e-4, so 1e-2
#: leaves a 5x margin while still catching a broken conversion (a wrong cast or overflow is >> 1e-2).
FP16_RELATIVE_TOLERANCE = 1e-2
MAX_BATCH_SIZE = 16
MAX_QUEUE_DELAY_US = 2000
MODEL_FILE, CONFIG_FILE, INFO_FILE, README_FILE = "model.onnx", "config.pbtxt", "ctzoo.json", "README.md"
#: A model name: a folder on every OS, one word on a command line, a valid Triton model name.
NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]*$"
_DATATYPES = {1: "FP32", 10: "FP16"}  # onnx.TensorProto.FLOAT, FLOAT16
#: Real-CT check: how many slices of the embedded sample CT (evenly spread, ends excluded).
REAL_SLICES = {"detection": 3, "segmentation": 6}

Progress = Callable[[str], None]


class ExportSourceError(ValueError):
    """MODEL_OR_CHECKPOINT is not something ctzoo can export (unknown name, unreadable or unsupported
    checkpoint, missing template bank); the message says what to give instead."""


# --------------------------------------------------------------------------------------------- sources


@dataclass
class Exportable:
    """What is exported: the PyTorch model (eval, CPU, the reference the graph is checked against) and what the
    folder records about it."""

    name: str
    task: str  # "detection" | "segmentation"
    version: str
    model: nn.Module
    input_spec: dict[str, Any]
    card: ModelCard
    source: str
    bank: Any = None  # TemplateBank, template segmenters only
    bank_dir: Path | None = None  # a bank to copy verbatim (the zoo's, built with these weights)
    card_files: Path | None = None  # the zoo's card.json / MODEL_CARD.md, copied verbatim
    extra: dict[str, Any] = field(default_factory=dict)  # down_ratio | class_names, into ctzoo.json


def load_source(source: str, templates: Path | None = None) -> Exportable:
    """A zoo model name (``ctzoo zoo list``) or the path of a ``ctzoo train`` checkpoint (RECIST-Net or template
    segmenter; the latter needs ``templates``, a template-bank folder); :class:`ExportSourceError` otherwise."""
    from ctzoo.models import list_models

    if source in list_models():
        return _zoo_source(source, templates)
    path = Path(source).expanduser()
    if path.is_file():
        return _checkpoint_source(path, templates)
    if path.is_dir():
        raise ExportSourceError(f"{source} is a folder: give the checkpoint file inside it (best.pt or last.pt)")
    if path.suffix in (".pt", ".pth") or os.sep in source or "/" in source:
        raise ExportSourceError(f"no checkpoint file {source}")
    from ctzoo.models import model_entry

    try:
        model_entry(source)
    except KeyError as exc:  # UnknownModelError's message names close matches and the known models
        raise ExportSourceError(f"{exc} (or give the path of a checkpoint written by ctzoo train)") from None
    return _zoo_source(source, templates)  # registered meanwhile


def _zoo_source(name: str, templates: Path | None) -> Exportable:
    from ctzoo.models import create_model, load_card, model_entry, model_input_spec

    entry = model_entry(name)
    if not entry.has_weights:
        raise ExportSourceError(f"no weights are shipped for {name!r}, so there is nothing to export")
    if templates is not None:
        raise ExportSourceError("--templates is for template-segmenter checkpoints; zoo segmenters ship their bank")
    model = create_model(name, pretrained=True).eval()
    card, spec = load_card(name), model_input_spec(name)
    if entry.task == "detection":
        return Exportable(name, "detection", card.version, model, spec, card, name, card_files=entry.weights_dir,
                          extra={"down_ratio": int(model.down_ratio)})
    from ctzoo.models.template_bank import INDEX_FILE, TemplateBank

    if not isinstance(model, TemplateSegNet) or not (entry.weights_dir / INDEX_FILE).is_file():
        raise ExportSourceError(f"{name!r} is not a template segmenter with a template bank; only those and "
                                "RECIST-Net detectors export to a model repository")
    bank = TemplateBank.load(entry.weights_dir)
    return Exportable(name, "segmentation", card.version, model, spec, card, name, bank=bank,
                      bank_dir=entry.weights_dir, card_files=entry.weights_dir,
                      extra={"class_names": list(bank.class_names)})


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle, zip or torch errors: all mean "not a checkpoint"
        raise ExportSourceError(f"{path} is not a PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ExportSourceError(f"{path} is not a ctzoo train checkpoint (no 'model' state dict)")
    return state


def _checkpoint_source(path: Path, templates: Path | None) -> Exportable:
    state = _load_checkpoint(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    epochs = int(state.get("epoch", -1)) + 1
    version = f"0.0.0+epoch{epochs}.{digest[:8]}"  # semver build metadata: which weights, not a release
    if "model_kind" in state:
        return _template_seg_checkpoint(path, state, version, epochs, templates)
    if "train_config" in state:
        if templates is not None:
            raise ExportSourceError("--templates is for template-segmenter checkpoints, not RECIST-Net ones")
        return _recistnet_checkpoint(path, state, version, epochs)
    raise ExportSourceError(f"{path}: neither a RECIST-Net checkpoint (no 'train_config') nor a template-segmenter "
                            "one (no 'model_kind'): was it written by ctzoo train?")


def _load_state(model: nn.Module, state: dict[str, Any], path: Path) -> nn.Module:
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ExportSourceError(f"{path}: the weights do not fit the model its train_config describes: "
                                f"{str(exc).splitlines()[0]}") from None
    return model.eval()


def _recistnet_checkpoint(path: Path, state: dict[str, Any], version: str, epochs: int) -> Exportable:
    from pydantic import ValidationError

    from ctzoo.datasets.deeplesion.dataset import SlicePreprocessing
    from ctzoo.models.recistnet import RecistNet
    from ctzoo.training.recistnet_task import RecistNetTrainConfig

    try:
        cfg = RecistNetTrainConfig.model_validate(state["train_config"])
    except ValidationError as exc:
        raise ExportSourceError(f"{path}: its train_config is not a RECIST-Net config: {exc}") from None
    prep = SlicePreprocessing(**{k: getattr(cfg.data, k) for k in SlicePreprocessing.model_fields})
    model_config = {"in_channels": prep.in_channels, **cfg.model.model_dump()}
    model = _load_state(checkpoint_network(state, lambda: RecistNet(**model_config)), state, path)
    spec = {**prep.model_dump(mode="json"), "size_multiple": 32}
    card = _checkpoint_card(path, state, "detection", version, epochs, model, "RecistNet", model_config, spec,
                            f"DeepLesion-format data at {cfg.data.root} (split train)")
    return Exportable(_run_name(path), "detection", version, model, spec, card, str(path.resolve()),
                      extra={"down_ratio": int(model.down_ratio)})


def _template_seg_checkpoint(path: Path, state: dict[str, Any], version: str, epochs: int,
                             templates: Path | None) -> Exportable:
    from pydantic import ValidationError

    from ctzoo.models.template_bank import TemplateBank
    from ctzoo.training.template_seg_task import TemplateSegTrainConfig, build_seg_model

    if state["model_kind"] != "template_seg":
        raise ExportSourceError(f"{path} holds a {state['model_kind']!r} model (the baseline); only the template "
                                "segmenter (RUN/template_seg/best.pt) and RECIST-Net export")
    try:
        cfg = TemplateSegTrainConfig.model_validate(state["task_config"])
    except (KeyError, ValidationError) as exc:
        raise ExportSourceError(f"{path}: no usable task_config: {exc}") from None
    names = list(state.get("class_names") or [])
    if templates is None:
        raise ExportSourceError(f"{path} is a template segmenter: give its template bank with --templates DIR (a "
                                "folder holding templates.safetensors and templates.json)")
    try:
        bank = TemplateBank.load(templates)
    except (FileNotFoundError, ValueError) as exc:
        raise ExportSourceError(f"--templates: {exc}") from None
    if names and list(bank.class_names) != names:
        raise ExportSourceError(f"the template bank's classes {bank.class_names} differ from the checkpoint's "
                                f"{names}")
    names = names or list(bank.class_names)
    model = _load_state(checkpoint_network(state, lambda: build_seg_model(cfg.model, len(names))), state, path)
    prep = cfg.data.preprocessing
    if tuple(bank.images.shape[2:]) != tuple(prep.size):
        raise ExportSourceError(f"the template bank's slices are {tuple(bank.images.shape[2:])} pixels, the model's "
                                f"input is {tuple(prep.size)}")
    # Embeddings belong to the weights that computed them (see ctzoo.models.template_bank): re-embed the bank
    # with these weights, so that nearest-template retrieval means what it meant in training.
    bank = TemplateBank.build(model, bank.images, bank.masks, bank.class_names, bank.sources)
    spec = {**prep.model_dump(mode="json"), "classes": names}
    model_config = {"spatial_dims": 2, "in_channels": 1, "num_classes": len(names), **cfg.model.model_dump(mode="json")}
    model_config.pop("kind", None)
    card = _checkpoint_card(path, state, "segmentation", version, epochs, model, "TemplateSegNet", model_config, spec,
                            f"{cfg.data.source} slices; template bank from {templates}")
    return Exportable(_run_name(path, "template_seg"), "segmentation", version, model, spec, card,
                      str(path.resolve()), bank=bank, extra={"class_names": names})


def _run_folder(path: Path, task_folder: str | None = None) -> Path:
    """The run folder of a checkpoint: RUN/best.pt, or RUN/template_seg/best.pt for a template-segmenter run."""
    folder = path.resolve().parent
    return folder.parent if task_folder and folder.name == task_folder else folder


def _run_name(path: Path, task_folder: str | None = None) -> str:
    return _run_folder(path, task_folder).name


def _checkpoint_card(path: Path, state: dict[str, Any], task: str, version: str, epochs: int, model: nn.Module,
                     architecture: str, model_config: dict[str, Any], spec: dict[str, Any], data: str) -> ModelCard:
    """An honest card for weights that were never published: what the checkpoint itself records."""
    from ctzoo.models import Metric, TrainingInfo

    rows = [r for r in state.get("history") or [] if isinstance(r, dict)]
    scored = [r for r in rows if any(k.startswith("val_") for k in r)] or [{}]
    metrics = {key[4:]: Metric(value=float(value), split="val") for key, value in scored[-1].items()
               if key.startswith("val_") and isinstance(value, (int, float)) and np.isfinite(value)}
    run = _run_folder(path, "template_seg" if task == "segmentation" else None)
    try:  # written by ctzoo train beside the checkpoint when the run finished
        summary = json.loads((path.resolve().parent / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}
    wall = summary.get("wall_s", rows[-1].get("wall_s", 0.0) if rows else 0.0)
    return ModelCard(
        name=_valid_name(run.name, strict=False),
        version=version, task=task,
        description=f"Exported from the training checkpoint {path.resolve()} (epoch {epochs}); not a published "
                    "zoo model.",
        architecture=f"{architecture}({', '.join(f'{k}={v!r}' for k, v in model_config.items())})",
        parameters=sum(p.numel() for p in model.parameters()), input_spec=spec,
        training=TrainingInfo(data=data, config_file=str(run / "config.json"),
                              command="recorded in the run folder's config.json",
                              device=str(summary.get("device", "unknown")), epochs=max(epochs, 0),
                              wall_time_s=float(wall or 0.0)),
        metrics=metrics,
        limitations=["A training checkpoint, not a published zoo model: no test-set evaluation is recorded; the "
                     "metrics are the last validation scores the checkpoint holds.",
                     "Research use only; not a medical device."],
        licence="not stated (unpublished checkpoint)", created=datetime.date.today())


def _valid_name(name: str, strict: bool = True) -> str:
    """``name`` if it matches :data:`NAME_PATTERN`; else ExportSourceError, or (``strict=False``) a cleaned copy."""
    if re.match(NAME_PATTERN, name):
        return name
    if not strict:  # the card of a badly named run still needs a valid name; the folder name is checked apart
        return re.sub(r"[^a-z0-9_.-]", "-", name.lower()).lstrip("_.-") or "checkpoint"
    raise ExportSourceError(f"model name {name!r} must be lower-case letters, digits, '_', '-' or '.', starting "
                            "with a letter or digit: choose one with --name")


# ---------------------------------------------------------------------------------------------- graphs


class _SegmentWithTemplate(nn.Module):
    """The whole template segmenter in one graph: ``(image, template) -> logits``. The template is encoded by
    ``_EncodeTemplate`` (masks area-pooled with fixed kernels, which the TorchScript exporter accepts; equal to
    the model's adaptive pooling for sizes divisible by its strides) and fed to the model as its encoding."""

    def __init__(self, model: TemplateSegNet) -> None:
        super().__init__()
        self.model, self.encode = model, _EncodeTemplate(model)

    def forward(self, image: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
        present, *prototypes = self.encode(template)
        return self.model(image, template_encoding=TemplateEncoding(tuple(prototypes), present))


def _segment_reference(model: TemplateSegNet) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def segment(image: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
        return model(image, template)
    return segment


@functools.lru_cache(maxsize=1)
def _sample_volume():
    """The embedded sample CT (read once per process: every export checks on it)."""
    from ctzoo.datasets.samples import sample_ct_dicom
    from ctzoo.io import read_volume

    return read_volume(sample_ct_dicom(), progress=False)


def _spread(count: int, wanted: int) -> list[int]:
    """``wanted`` indices evenly spread over ``range(count)``, ends excluded where possible."""
    if count <= wanted:
        return list(range(count))
    return sorted({int(round(x)) for x in np.linspace(0, count - 1, wanted + 2)[1:-1]})


def real_ct_inputs(item: Exportable) -> dict[str, torch.Tensor]:
    """Network input from the embedded sample CT, prepared exactly as ``ctzoo infer`` prepares it: detector slices
    by :func:`slice_inputs` on the inference canvas; segmenter slices by :func:`volume_to_slices`, each with its
    nearest bank template."""
    volume = _sample_volume()
    if item.task == "detection":
        from ctzoo.datasets.deeplesion.dataset import SlicePreprocessing
        from ctzoo.inference.recist_volume import canvas_size, reorient_lps, slice_inputs

        prep = SlicePreprocessing(**{k: v for k, v in item.input_spec.items() if k in SlicePreprocessing.model_fields})
        axial = reorient_lps(volume)
        wanted = set(_spread(axial.array.shape[0], REAL_SLICES["detection"]))
        images = [image for k, (image, _) in enumerate(slice_inputs(axial, prep, canvas=canvas_size(prep)))
                  if k in wanted]
        return {"image": torch.stack(images).contiguous()}
    from ctzoo.datasets.segmentation import SegPreprocessing, volume_to_slices

    prep = SegPreprocessing(**{k: v for k, v in item.input_spec.items() if k in SegPreprocessing.model_fields})
    slices, _ = volume_to_slices(volume, prep)
    slices = torch.from_numpy(np.ascontiguousarray(slices.numpy(), dtype=np.float32))  # a plain tensor, no meta
    images = slices[_spread(len(slices), REAL_SLICES["segmentation"])]
    index = item.bank.nearest(item.model, images).cpu()
    return {"image": images, "template": item.bank.templates(index).contiguous()}


def build_graph(item: Exportable) -> tuple[Graph, list[tuple[str, dict[str, torch.Tensor]]]]:
    """The graph to export (the export example is the first check's input) and the labelled check inputs:
    ``random_b2``, ``random_b3``, (detector) ``random_size``, then ``real_ct``."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    exported = with_exportable_norms(item.model)
    if item.task == "detection":
        channels = next(m for m in item.model.modules() if isinstance(m, nn.Conv2d)).in_channels  # the stem's
        checks = [("random_b2", {"image": rand(2, channels, 96, 64)}),
                  ("random_b3", {"image": rand(3, channels, 96, 64)}),
                  ("random_size", {"image": rand(1, channels, 64, 160)})]
        axes = {0: "batch", 2: "height", 3: "width"}
        graph = Graph(MODEL_FILE, _Heads(exported), _Heads(item.model), checks[0][1], list(HEADS),
                      {"image": axes, **{name: axes for name in HEADS}})
    else:
        model: TemplateSegNet = item.model
        height, width = item.input_spec["size"]

        def random_pair(batch: int) -> dict[str, torch.Tensor]:
            # random masks whose last class is absent, so the check also covers the present=False path
            masks = (rand(batch, model.num_classes, height, width) > 0.7).float()
            masks[:, -1] = 0
            return {"image": rand(batch, model.in_channels, height, width),
                    "template": torch.cat([rand(batch, model.in_channels, height, width), masks], dim=1)}

        checks = [("random_b2", random_pair(2)), ("random_b3", random_pair(3))]
        batch = {0: "batch"}
        graph = Graph(MODEL_FILE, _SegmentWithTemplate(exported), _segment_reference(model), checks[0][1],
                      ["logits"], {"image": batch, "template": batch, "logits": batch})
    checks.append(("real_ct", real_ct_inputs(item)))
    return graph, checks


def to_fp16(path: Path) -> None:
    """Rewrite the fp32 graph at ``path`` with fp16 weights and arithmetic and fp32 inputs/outputs."""
    import onnx
    from onnxconverter_common import float16

    with warnings.catch_warnings():  # it warns for every weight below fp16's range, which it flushes to 1e-7
        warnings.simplefilter("ignore", UserWarning)
        model = float16.convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    # The converter marks every float tensor fp16 but leaves Cast(to=FLOAT) nodes (e.g. bool -> float, the
    # segmenter's class presence) casting to fp32, which ONNX Runtime rejects as a type mismatch: make them fp16.
    declared = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    for node in model.graph.node:
        if node.op_type == "Cast" and declared.get(node.output[0]) == onnx.TensorProto.FLOAT16:
            for attribute in node.attribute:
                if attribute.name == "to" and attribute.i == onnx.TensorProto.FLOAT:
                    attribute.i = onnx.TensorProto.FLOAT16
    onnx.save(model, str(path))


def check_parity(path: Path, graph: Graph, checks: list[tuple[str, dict[str, torch.Tensor]]], tolerance: float,
                 progress: Progress | None = None) -> dict[str, Any]:
    """ONNX Runtime (CPU) on ``path`` against ``graph.reference`` (PyTorch fp32) on every labelled check input.

    Returns the ``parity`` record of ctzoo.json; ``RuntimeError`` naming every output (and input) whose relative
    error exceeds ``tolerance`` (NaN included), or whose shape differs, after all checks ran.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the fp16 graph's cast-related warnings are expected
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    results: dict[str, Any] = {}
    failures: list[str] = []
    for label, inputs in checks:
        shapes = {name: list(value.shape) for name, value in inputs.items()}
        if progress:
            progress(f"  checking {label}: " + ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in shapes.items()))
        with torch.inference_mode():
            expected = graph.reference(*inputs.values())
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(graph.outputs, {name: value.numpy() for name, value in inputs.items()})
        errors = {}
        for name, reference, result in zip(graph.outputs, expected, got):
            if tuple(result.shape) != tuple(reference.shape):
                failures.append(f"output {name!r} on {label} has shape {tuple(result.shape)} in ONNX Runtime but "
                                f"{tuple(reference.shape)} in PyTorch")
                continue
            max_abs, max_rel = onnx_export.output_error(result, reference)
            errors[name] = {"max_abs": max_abs, "max_rel": max_rel}
            if not max_rel <= tolerance:  # 'not <=' so that NaN fails too
                failures.append(f"output {name!r} on {label} ({_shapes_text(shapes)}): max abs error {max_abs:.3g}, "
                                f"max relative error {max_rel:.3g} > {tolerance:g}")
        results[label] = {"inputs": shapes, "errors": errors}
    if failures:
        raise RuntimeError(f"{path.name}: ONNX Runtime and PyTorch disagree: " + "; ".join(failures))
    worst = {name: {"max_abs": max(r["errors"][name]["max_abs"] for r in results.values()),
                    "max_rel": max(r["errors"][name]["max_rel"] for r in results.values())} for name in graph.outputs}
    return {"metric": "max|onnx - torch| / (max|torch| + 1e-6), per output", "relative_tolerance": tolerance,
            "reference": "PyTorch fp32, the unmodified model", "runtime": f"onnxruntime {ort.__version__} CPU",
            "checks": results, "worst": worst}


def _shapes_text(shapes: dict[str, list[int]]) -> str:
    return ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in shapes.items())


def parity_table(parity: dict[str, Any]) -> str:
    """The parity record as a short text table: one row per check and output."""
    rows = [("check", "inputs", "output", "max abs", "max rel")]
    for label, result in parity["checks"].items():
        for k, (name, errors) in enumerate(result["errors"].items()):
            rows.append((label if k == 0 else "", _shapes_text(result["inputs"]) if k == 0 else "", name,
                         f"{errors['max_abs']:.2e}", f"{errors['max_rel']:.2e}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([*lines, f"all within max rel <= {parity['relative_tolerance']:g} ({parity['runtime']})"])


# ------------------------------------------------------------------------------------------ repository


def graph_io(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Inputs and outputs of the ONNX graph at ``path`` as ``{"name", "datatype", "shape"}`` (-1: dynamic)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(value) -> dict[str, Any]:
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        return {"name": value.name, "datatype": _DATATYPES.get(tensor.elem_type, str(tensor.elem_type)),
                "shape": shape}

    return [describe(v) for v in graph.input], [describe(v) for v in graph.output]


def triton_config(name: str, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> str:
    """``config.pbtxt`` (text protobuf) for Triton's ONNX Runtime backend; dims exclude the batch dimension."""

    def block(kind: str, tensors: list[dict[str, Any]]) -> list[str]:
        lines = [f"{kind} ["]
        for k, tensor in enumerate(tensors):
            lines += ["  {", f'    name: "{tensor["name"]}"', f"    data_type: TYPE_{tensor['datatype']}",
                      f"    dims: [ {', '.join(str(d) for d in tensor['shape'][1:])} ]",
                      "  }" + ("," if k < len(tensors) - 1 else "")]
        return [*lines, "]"]

    return "\n".join([f'name: "{name}"', 'platform: "onnxruntime_onnx"', f"max_batch_size: {MAX_BATCH_SIZE}",
                      *block("input", inputs), *block("output", outputs),
                      "dynamic_batching {", f"  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}", "}", ""])


def _software(fp16: bool) -> dict[str, str]:
    from ctzoo import __version__

    found = {"ctzoo": __version__}
    for package in ("torch", "onnx", "onnxruntime", *(["onnxconverter-common"] if fp16 else [])):
        with suppress(importlib.metadata.PackageNotFoundError):
            found[package] = importlib.metadata.version(package)
    return found


def _write_card(item: Exportable, folder: Path) -> None:
    if item.card_files is not None:  # the zoo's own files, byte for byte
        shutil.copyfile(item.card_files / CARD_JSON, folder / CARD_JSON)
        shutil.copyfile(item.card_files / CARD_MD, folder / README_FILE)
        return
    (folder / CARD_JSON).write_text(item.card.model_dump_json(indent=2) + "\n", encoding="utf-8")
    (folder / README_FILE).write_text(item.card.to_markdown(), encoding="utf-8")


def _write_bank(item: Exportable, folder: Path) -> None:
    from ctzoo.models.template_bank import INDEX_FILE, TENSORS_FILE

    if item.bank is None:
        return
    if item.bank_dir is not None:
        for name in (TENSORS_FILE, INDEX_FILE):
            shutil.copyfile(item.bank_dir / name, folder / name)
    else:
        item.bank.save(folder)


def export_model(source: str, repo: Path, name: str | None = None, fp16: bool = False, opset: int = DEFAULT_OPSET,
                 templates: Path | None = None, progress: Progress | None = None) -> Path:
    """Export ``source`` (a zoo model name or a ``ctzoo train`` checkpoint path) into the model repository
    ``repo`` as ``repo/<name>`` (``<name>-fp16`` with ``fp16``) and return that folder.

    ``name`` defaults to the zoo name or the checkpoint's run folder; ``templates`` is the template-bank folder a
    template-segmenter checkpoint needs. Every graph is checked against PyTorch (see the module docstring):
    ``RuntimeError`` when it disagrees, :class:`ExportSourceError` for a source that cannot be exported; either
    way nothing new is left in ``repo`` and an existing ``repo/<name>`` is untouched. ``progress`` receives one
    line per step.
    """
    say = progress or (lambda message: logger.info("%s", message))
    if name is not None:
        _valid_name(name)  # before any work
    say(f"loading {source}")
    item = load_source(source, templates)
    base_name = _valid_name(name or item.name)
    if item.card_files is None and item.card.name != base_name:  # a checkpoint's card names the exported model
        item.card = item.card.model_copy(update={"name": base_name})
    folder_name = base_name + ("-fp16" if fp16 else "")
    tolerance = FP16_RELATIVE_TOLERANCE if fp16 else RELATIVE_TOLERANCE
    repo = Path(repo)
    created = not repo.exists()
    repo.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder_name}.partial-", dir=repo))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private; a server may run as another user
        graph, checks = build_graph(item)
        graph_path = staging / "1" / MODEL_FILE
        graph_path.parent.mkdir()
        say(f"exporting {item.task} graph to ONNX (opset {opset})")
        start = time.perf_counter()
        onnx_export._export_graph(graph, graph_path, opset)
        if fp16:
            say("converting to fp16 (fp32 inputs and outputs)")
            to_fp16(graph_path)
        import onnx

        onnx.checker.check_model(str(graph_path))
        exported_s = time.perf_counter() - start
        say(f"checking ONNX Runtime against PyTorch (max rel <= {tolerance:g})")
        parity = check_parity(graph_path, graph, checks, tolerance, say)
        inputs, outputs = graph_io(graph_path)
        info = {"name": folder_name, "version": item.version, "task": item.task, "max_batch_size": MAX_BATCH_SIZE,
                "max_queue_delay_ms": MAX_QUEUE_DELAY_US / 1000, "inputs": inputs, "outputs": outputs,
                "input_spec": item.input_spec, **item.extra, "source": item.source, "parity": parity,
                "opset": opset, "precision": "fp16" if fp16 else "fp32",
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "software": _software(fp16), "export_s": round(exported_s, 3)}
        if item.bank is not None:
            info["templates"] = {"count": len(item.bank), "size": list(item.bank.images.shape[2:]),
                                 "files": ["templates.safetensors", "templates.json"]}
        say(f"writing {repo / folder_name}")
        (staging / CONFIG_FILE).write_text(triton_config(folder_name, inputs, outputs), encoding="utf-8")
        _write_card(item, staging)
        _write_bank(item, staging)
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        replace_folder(staging, repo / folder_name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(repo.iterdir()):
            repo.rmdir()
    return repo / folder_name
