"""Export the zoo models to ONNX, check every graph against PyTorch, and cache the result per weights.

A zoo model becomes one or more ONNX graphs with flat tensor inputs and outputs (ONNX knows no dicts or
NamedTuples):

* detector (RecistNet): ``heads.onnx``: ``images (B, C, H, W)`` -> ``heatmaps``, ``offsets``, ``displacements``;
  batch, height and width are dynamic (any multiple of 32).
* template segmenter (TemplateSegNet): the three pieces that let the ONNX path retrieve and reuse templates
  exactly as :func:`ctzoo.inference.segment_volume.segment_slices` does:
  ``embed.onnx`` (``images`` -> ``embeddings (B, F)``, for nearest-template retrieval),
  ``encode_template.onnx`` (``templates (T, 1 + C, H, W)`` -> ``present (T, C)`` bool, ``prototypes_k (T, C, F_k)``)
  and ``segment.onnx`` (``images``, ``present``, ``prototypes_k`` -> ``logits (B, C + 1, H, W)``). Only the batch
  is dynamic: the template encoder area-pools masks with a kernel fixed at export, and the bank fixes the slice
  size anyway.
* any other segmenter: ``segment.onnx`` (``images`` -> ``logits``).

GroupNorm and InstanceNorm are exported as plain ops that average row by row (:class:`_RowwiseNorm`): ONNX
Runtime's own ``InstanceNormalization`` sums a whole group in one fp32 pass and is 100 times less accurate on
real 512 px CT. The check always compares against the unmodified zoo model.

Every graph is checked right after it is written: ONNX Runtime against PyTorch on random input (and, for the
dynamic axes, on a second batch size and, for RecistNet, a second spatial size). The check is relative,
``max |onnx - torch| / (max |torch| + 1e-6)``, against :data:`RELATIVE_TOLERANCE`; a failure raises
``RuntimeError`` and leaves no file behind. Errors and timings go to ``checks.json`` beside the graphs.

:func:`cached_onnx_folder` exports once into ``cache_dir()/onnx/<model>-<version>-<sha256[:12]>/``, keyed by the
shipped weights and config, so new weights never meet stale graphs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ctzoo.io.atomic import replace_folder
from ctzoo.models.registry import CONFIG_FILE, WEIGHTS_FILE, create_model, model_entry, model_input_spec, model_version
from ctzoo.models.template_seg import TemplateEncoding, TemplateSegNet, masked_prototypes

logger = logging.getLogger(__name__)

#: Largest accepted ``max |onnx - torch| / (max |torch| + 1e-6)`` per output (fp32 on the CPU).
RELATIVE_TOLERANCE = 1e-4
DEFAULT_OPSET = 17
CHECKS_FILE = "checks.json"
#: Bump when the graphs' names, inputs or outputs change, so cached exports of older code are redone.
EXPORT_FORMAT = 1
HEADS = ("heatmaps", "offsets", "displacements")


# ------------------------------------------------------------------------------------------------ wrappers


class _Heads(nn.Module):
    """RecistNet with a tuple output in :data:`HEADS` order (the exporter flattens outputs by position)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(images)
        return tuple(outputs[name] for name in HEADS)


class _Embed(nn.Module):
    def __init__(self, model: TemplateSegNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embed(images)


class _EncodeTemplate(nn.Module):
    """``encode_template`` with the NamedTuple flattened to ``(present, prototypes_0, ...)``.

    The TorchScript exporter refuses adaptive pooling whose output size comes from a traced shape, which is
    how :func:`~ctzoo.models.template_seg.downsample_masks` sizes it. The model requires sizes divisible by its
    strides, and then adaptive average pooling *is* an average pool with a fixed kernel, so the masks are pooled
    that way here. The export check compares this graph with ``model.encode_template`` itself.
    """

    def __init__(self, model: TemplateSegNet) -> None:
        super().__init__()
        self.model = model
        self.factors = [math.prod(model.strides[:k]) for k in range(len(model.channels))]  # level k's stride
        self.pool = F.avg_pool2d if model.spatial_dims == 2 else F.avg_pool3d

    def forward(self, templates: torch.Tensor) -> tuple[torch.Tensor, ...]:
        masks = templates[:, self.model.in_channels:]
        features = self.model.template_encoder(templates)
        prototypes = [masked_prototypes(f, self.pool(masks, s) if s > 1 else masks)
                      for f, s in zip(features, self.factors)]
        return (masks.flatten(2).sum(-1) > 0, *prototypes)


def _encode_reference(model: TemplateSegNet) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    def encode(templates: torch.Tensor) -> tuple[torch.Tensor, ...]:
        encoding = model.encode_template(templates)
        return (encoding.present, *encoding.prototypes)
    return encode


class _SegmentEncoded(nn.Module):
    """``forward(images, template_encoding=...)`` taking the encoding as flat inputs, in
    :class:`_EncodeTemplate`'s output order, so one graph's outputs feed the other by name."""

    def __init__(self, model: TemplateSegNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, present: torch.Tensor, *prototypes: torch.Tensor) -> torch.Tensor:
        return self.model(images, template_encoding=TemplateEncoding(tuple(prototypes), present))


class _RowwiseNorm(nn.Module):
    """GroupNorm or InstanceNorm (without running statistics) in plain ops, its means taken row by row.

    The exporter turns both into ONNX ``InstanceNormalization``, whose fp32 statistics in ONNX Runtime are
    straight sums over a whole group: 4 x 256 x 256 terms in recistnet-mini's stem at 512 px, enough rounding
    to give 7e-5 relative error on the detector's heads for a real CT slice (PyTorch fp32, which sums in a
    cascade: 5e-7), close to the 1e-4 the check allows. Averaging each row first, then the row means, keeps
    every fp32 sum short (that stem norm: 2e-5 -> 3e-7 against fp64). Equal-length rows make it the same mean.
    """

    def __init__(self, norm: nn.GroupNorm | nn.InstanceNorm1d | nn.InstanceNorm2d | nn.InstanceNorm3d) -> None:
        super().__init__()
        self.groups = norm.num_groups if isinstance(norm, nn.GroupNorm) else norm.num_features
        self.eps, self.weight, self.bias = norm.eps, norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def mean(t: torch.Tensor) -> torch.Tensor:  # over each group: along the rows, then across them
            return t.mean(-1, keepdim=True).mean(-2, keepdim=True)

        grouped = x.reshape(x.shape[0], self.groups, -1, x.shape[-1])  # (B, G, rows, W)
        centred = grouped - mean(grouped)
        normed = (centred * torch.rsqrt(mean(centred * centred) + self.eps)).reshape_as(x)  # biased, as torch
        if self.weight is None:  # InstanceNorm without affine parameters
            return normed
        shape = (1, -1, *[1] * (x.ndim - 2))
        return normed * self.weight.reshape(shape) + self.bias.reshape(shape)


def with_exportable_norms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose GroupNorm/InstanceNorm layers are :class:`_RowwiseNorm` (shared layers stay
    shared); ``model`` itself is untouched and stays the reference the export is checked against."""
    model = copy.deepcopy(model)
    instance_norms = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.GroupNorm) or (isinstance(child, instance_norms)
                                                   and not child.track_running_stats):
                setattr(parent, name, _RowwiseNorm(child))
    return model


# ------------------------------------------------------------------------------------------------- graphs


@dataclass
class Graph:
    """One ONNX file to write: the module to export, the PyTorch truth to check it against (the zoo model
    itself, unmodified), named example inputs, output names, dynamic axes and more check inputs."""

    file_name: str
    module: nn.Module
    reference: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
    inputs: dict[str, torch.Tensor]  # export example (also the first check)
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    more_checks: list[dict[str, torch.Tensor]] = field(default_factory=list)  # other shapes, for dynamic axes


def graph_files(model_name: str) -> list[str]:
    """The ONNX file names a zoo model exports to (without building it)."""
    entry = model_entry(model_name)
    if entry.task == "detection":
        return ["heads.onnx"]
    from ctzoo.models.template_bank import INDEX_FILE

    if (entry.weights_dir / INDEX_FILE).is_file():
        return ["embed.onnx", "encode_template.onnx", "segment.onnx"]
    return ["segment.onnx"]


def model_graphs(model_name: str, model: nn.Module) -> list[Graph]:
    """The graphs of :func:`graph_files` for ``model`` (eval mode, CPU), with seeded random example inputs."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    exported = with_exportable_norms(model)
    batch = {0: "batch"}
    if model_entry(model_name).task == "detection":
        channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels  # the stem's
        axes = {0: "batch", 2: "height", 3: "width"}
        return [Graph("heads.onnx", _Heads(exported), _Heads(model), {"images": rand(2, channels, 96, 64)},
                      list(HEADS), {"images": axes, **{name: axes for name in HEADS}},
                      more_checks=[{"images": rand(1, channels, 64, 160)}])]
    height, width = model_input_spec(model_name)["size"]
    if not isinstance(model, TemplateSegNet):
        return [Graph("segment.onnx", exported, model, {"images": rand(2, 1, height, width)}, ["logits"],
                      {"images": batch, "logits": batch}, more_checks=[{"images": rand(3, 1, height, width)}])]
    levels = [f"prototypes_{k}" for k in range(len(model.channels))]
    # A random template whose last class is absent, so the check also covers the present=False path.
    masks = (rand(3, model.num_classes, height, width) > 0.7).float()
    masks[:, -1] = 0
    templates = torch.cat([rand(3, model.in_channels, height, width), masks], dim=1)
    with torch.inference_mode():
        encoding = model.encode_template(templates)
    encoded = {"present": encoding.present, **dict(zip(levels, encoding.prototypes))}
    return [
        Graph("embed.onnx", _Embed(exported), _Embed(model), {"images": rand(2, 1, height, width)}, ["embeddings"],
              {"images": batch, "embeddings": batch}, more_checks=[{"images": rand(3, 1, height, width)}]),
        Graph("encode_template.onnx", _EncodeTemplate(exported), _encode_reference(model),
              {"templates": templates[:2]}, ["present", *levels],
              {name: batch for name in ("templates", "present", *levels)}, more_checks=[{"templates": templates}]),
        Graph("segment.onnx", _SegmentEncoded(exported), _SegmentEncoded(model),
              {"images": rand(2, 1, height, width), **{k: v[:2] for k, v in encoded.items()}}, ["logits"],
              {name: batch for name in ("images", "present", *levels, "logits")},
              more_checks=[{"images": rand(3, 1, height, width), **encoded}]),
    ]


# ------------------------------------------------------------------------------------------ export, check


def _export_graph(graph: Graph, path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        # Tracing warns about every Python-side shape check (e.g. TemplateSegNet._check); they are input
        # validation, not control flow of the graph, and the check below proves the graph right.
        warnings.simplefilter("ignore")
        torch.onnx.export(graph.module, tuple(graph.inputs.values()), str(path), input_names=list(graph.inputs),
                          output_names=graph.outputs, dynamic_axes=graph.dynamic_axes, opset_version=opset,
                          do_constant_folding=True, dynamo=False)


def output_error(result: np.ndarray, reference: torch.Tensor | np.ndarray) -> tuple[float, float]:
    """``(max |result - reference|, that / (max |reference| + 1e-6))`` in float64, for outputs of equal shape: the
    measure every export check uses. Bool outputs count too (a flipped flag is an error of 1); NaN propagates,
    so a ``not max_rel <= tolerance`` test fails on it."""
    reference = reference.numpy() if isinstance(reference, torch.Tensor) else np.asarray(reference)
    reference = reference.astype(np.float64)
    max_abs = float(np.abs(np.asarray(result).astype(np.float64) - reference).max(initial=0.0))
    return max_abs, max_abs / (float(np.abs(reference).max(initial=0.0)) + 1e-6)


def check_graph(path: Path, graph: Graph) -> dict[str, dict[str, float]]:
    """Run ``path`` in ONNX Runtime (CPU) and ``graph.reference`` in PyTorch on every check input.

    Returns ``{output: {"max_abs": ..., "max_rel": ...}}`` (worst over the checks); ``RuntimeError`` naming the
    output, the input shapes and both errors when the relative error exceeds :data:`RELATIVE_TOLERANCE` or the
    shapes differ.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    errors: dict[str, dict[str, float]] = {name: {"max_abs": 0.0, "max_rel": 0.0} for name in graph.outputs}
    for inputs in [graph.inputs, *graph.more_checks]:
        with torch.inference_mode():
            expected = graph.reference(*inputs.values())
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(graph.outputs, {name: value.numpy() for name, value in inputs.items()})
        shapes = ", ".join(f"{name} {tuple(value.shape)}" for name, value in inputs.items())
        for name, reference, result in zip(graph.outputs, expected, got):
            if tuple(result.shape) != tuple(reference.shape):
                raise RuntimeError(f"{path.name}: output {name!r} has shape {tuple(result.shape)} in ONNX Runtime "
                                   f"but {tuple(reference.shape)} in PyTorch (inputs {shapes})")
            max_abs, max_rel = output_error(result, reference)
            if not max_rel <= RELATIVE_TOLERANCE:  # 'not <=' so that NaN fails too
                raise RuntimeError(f"{path.name}: ONNX Runtime and PyTorch disagree on output {name!r} (inputs "
                                   f"{shapes}): max abs error {max_abs:.3g}, max relative error {max_rel:.3g} > "
                                   f"{RELATIVE_TOLERANCE:g}")
            errors[name] = {"max_abs": max(errors[name]["max_abs"], max_abs),
                            "max_rel": max(errors[name]["max_rel"], max_rel)}
    return errors


def export_onnx(model_name: str, out_dir: Path, opset: int = DEFAULT_OPSET) -> list[Path]:
    """Export the zoo model ``model_name`` (shipped weights) into ``out_dir`` and check each graph.

    Returns the ``.onnx`` paths (see the module docstring for the graphs); ``out_dir/checks.json`` records the
    errors, export times and versions. Everything is written into a hidden folder inside ``out_dir`` first and
    renamed into place only once every graph passed, so a failed export (``RuntimeError``) leaves no file.
    """
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".onnx-export-", dir=out_dir))
    try:
        model = create_model(model_name, pretrained=True).eval()
        report: dict = {"format": EXPORT_FORMAT, "model": model_name, "model_version": model_version(model_name),
                        "opset": opset, "torch": torch.__version__, "onnxruntime": _ort_version(),
                        "relative_tolerance": RELATIVE_TOLERANCE, "graphs": {}}
        for graph in model_graphs(model_name, model):
            start = time.perf_counter()
            _export_graph(graph, staging / graph.file_name, opset)
            exported = time.perf_counter()
            errors = check_graph(staging / graph.file_name, graph)
            report["graphs"][graph.file_name] = {
                "bytes": (staging / graph.file_name).stat().st_size, "export_s": round(exported - start, 3),
                "check_s": round(time.perf_counter() - exported, 3), "inputs": list(graph.inputs),
                "outputs": graph.outputs, "errors": errors}
            logger.info("%s %s: exported in %.1f s, %s", model_name, graph.file_name, exported - start,
                        ", ".join(f"{k} max abs {v['max_abs']:.2g} rel {v['max_rel']:.2g}" for k, v in errors.items()))
        (staging / CHECKS_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        names = [*report["graphs"], CHECKS_FILE]  # checks.json last: its presence marks a complete export
        for name in names:
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
    return [out_dir / name for name in report["graphs"]]


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


# -------------------------------------------------------------------------------------------------- cache


def weights_digest(model_name: str) -> str:
    """sha256 of the shipped weights and config (the config too: e.g. ``gate`` changes the graph, not the
    weights), which is what the exported graphs depend on."""
    digest = hashlib.sha256()
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        with open(model_entry(model_name).weights_dir / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def cached_onnx_folder(model_name: str, cache: Path | None = None) -> Path:
    """``(cache or cache_dir())/onnx/<model>-<version>-<sha256[:12]>/`` holding checked graphs; exported (and
    checked) on first use into a hidden folder beside it, then renamed into place, so concurrent or interrupted
    runs never see a half-written export. Later calls only read ``checks.json``."""
    from ctzoo.datasets.samples import cache_dir

    key = f"{model_name}-{model_version(model_name)}-{weights_digest(model_name)[:12]}"
    folder = (cache or cache_dir()) / "onnx" / key
    if _complete(folder, model_name):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.partial-", dir=folder.parent))
    try:
        start = time.perf_counter()
        export_onnx(model_name, staging)
        if not _complete(folder, model_name):  # another process may have finished first: keep its files
            replace_folder(staging, folder)
        logger.info("exported %s to ONNX in %.1f s: %s", model_name, time.perf_counter() - start, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _complete(folder: Path, model_name: str) -> bool:
    try:
        report = json.loads((folder / CHECKS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return report.get("format") == EXPORT_FORMAT and all((folder / f).is_file() for f in graph_files(model_name))
