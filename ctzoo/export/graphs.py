"""The ONNX graphs of a model bundle, and the one call to the ONNX exporter.

Graphs take and give flat tensors (ONNX knows no dicts or NamedTuples), batch dynamic everywhere:

* detector (RecistNet): ``model.onnx``: ``image (B, C, H, W)`` -> ``heatmaps``, ``offsets``, ``displacements``, the
  raw heads of ``RecistNet.forward``; H and W dynamic (multiples of 32); decode with
  :func:`ctzoo.inference.recist_volume.decode_heads` and the bundle's ``down_ratio``.
* template segmenter (TemplateSegNet): ``model.onnx``: ``image (B, 1, H, W)`` and ``template (B, 1 + C, H, W)``
  (the template image then its C class masks, as :meth:`TemplateBank.templates` gives them) -> ``logits
  (B, C + 1, H, W)``; and ``embed.onnx``: ``image`` -> ``embeddings (B, F)``, with which the caller picks each
  slice's cosine-nearest bank template (:meth:`TemplateBank.nearest`). H, W are fixed by the preprocessing (the
  template encoder pools masks with a kernel fixed at export).

GroupNorm and InstanceNorm are exported as plain ops that average row by row (:class:`_RowwiseNorm`): ONNX
Runtime's own ``InstanceNormalization`` sums a whole group in one fp32 pass and is 100 times less accurate on
real 512 px CT. The check (:mod:`ctzoo.export.parity`) always compares with the unmodified PyTorch network.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ctzoo.inference.sample_inputs import sample_ct_inputs
from ctzoo.models.bundle import EMBED_FILE, GRAPH_FILE, ModelBundle
from ctzoo.models.template_seg import TemplateEncoding, TemplateSegNet, masked_prototypes

HEADS = ("heatmaps", "offsets", "displacements")
Inputs = dict[str, torch.Tensor]


@dataclass
class Graph:
    """One ONNX file to write: the module to export, the PyTorch truth to check it against (the bundle's network
    itself, unmodified), the export example, output names, dynamic axes, and the labelled check inputs."""

    file_name: str
    module: nn.Module
    reference: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
    example: Inputs
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    checks: list[tuple[str, Inputs]]


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
    """The template segmenter's slice embedding, which picks each slice's nearest bank template."""

    def __init__(self, model: TemplateSegNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.embed(image)


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


class _SegmentWithTemplate(nn.Module):
    """The whole template segmenter in one graph: ``(image, template) -> logits``. The template is encoded by
    :class:`_EncodeTemplate` (masks area-pooled with fixed kernels, which the TorchScript exporter accepts; equal to
    the model's adaptive pooling for sizes divisible by its strides) and fed to the model as its encoding."""

    def __init__(self, model: TemplateSegNet) -> None:
        super().__init__()
        self.model, self.encode = model, _EncodeTemplate(model)

    def forward(self, image: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
        present, *prototypes = self.encode(template)
        return self.model(image, template_encoding=TemplateEncoding(tuple(prototypes), present))


@dataclass(frozen=True)
class GraphModule:
    """The PyTorch module ``model.onnx`` is exported from, on the unmodified network (the export check's truth),
    with the graph's input and output names in order: what ``ctzoo serve --backend torch`` runs for
    ``/v2/models/<m>/infer``, so both backends take and give the same named tensors."""

    module: nn.Module
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def graph_module(task: str, network: nn.Module) -> GraphModule:
    """:class:`GraphModule` of ``network`` (a ``detection`` RecistNet or a template segmenter)."""
    if task == "detection":
        return GraphModule(_Heads(network), ("image",), HEADS)
    if not isinstance(network, TemplateSegNet):
        raise ValueError("only RECIST-Net detectors and template segmenters have an exported graph")
    return GraphModule(_SegmentWithTemplate(network), ("image", "template"), ("logits",))


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


def bundle_graphs(bundle: ModelBundle) -> list[Graph]:
    """The graphs of ``bundle`` with their checks: ``random_b2``, ``random_b3``, (detector) ``random_size``, then
    ``real_ct``, the embedded sample CT prepared exactly as ``ctzoo infer`` prepares it."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    model = bundle.network()
    exported = with_exportable_norms(model)
    real = sample_ct_inputs(bundle)
    if bundle.task == "detection":
        channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels  # the stem's
        checks = [("random_b2", {"image": rand(2, channels, 96, 64)}),
                  ("random_b3", {"image": rand(3, channels, 96, 64)}),
                  ("random_size", {"image": rand(1, channels, 64, 160)}), ("real_ct", real)]
        # the heads are 1/down_ratio of the image: sizes of their own, not the image's (which they are not)
        image_axes = {0: "batch", 2: "height", 3: "width"}
        head_axes = {0: "batch", 2: "out_height", 3: "out_width"}
        graph, reference = graph_module(bundle.task, exported), graph_module(bundle.task, model)
        return [Graph(GRAPH_FILE, graph.module, reference.module, checks[0][1], list(graph.outputs),
                      {"image": image_axes, **{name: head_axes for name in graph.outputs}}, checks)]
    if not isinstance(model, TemplateSegNet):
        raise ValueError(f"{bundle.name}: only RECIST-Net detectors and template segmenters export to ONNX")
    height, width = bundle.preprocessing.size

    def random_pair(batch: int) -> Inputs:
        # random masks whose last class is absent, so the check also covers the present=False path
        masks = (rand(batch, model.num_classes, height, width) > 0.7).float()
        masks[:, -1] = 0
        return {"image": rand(batch, model.in_channels, height, width),
                "template": torch.cat([rand(batch, model.in_channels, height, width), masks], dim=1)}

    pairs = [("random_b2", random_pair(2)), ("random_b3", random_pair(3)), ("real_ct", real)]
    images = [(label, {"image": inputs["image"]}) for label, inputs in pairs]
    return [segmenter_graph(model, pairs, exported),
            Graph(EMBED_FILE, _Embed(exported), _Embed(model), images[0][1], ["embeddings"],
                  {"image": {0: "batch"}, "embeddings": {0: "batch"}}, images)]


def segmenter_graph(model: TemplateSegNet, checks: list[tuple[str, Inputs]],
                    exported: nn.Module | None = None) -> Graph:
    """The template segmenter's ``model.onnx`` graph ``(image, template) -> logits``, exported from ``exported``
    (default: :func:`with_exportable_norms` of ``model``) and exampled by the first of ``checks``."""
    exported = with_exportable_norms(model) if exported is None else exported
    batch = {0: "batch"}
    graph, reference = graph_module("segmentation", exported), graph_module("segmentation", model)
    return Graph(GRAPH_FILE, graph.module, reference.module, checks[0][1], list(graph.outputs),
                 {name: batch for name in graph.inputs + graph.outputs}, checks)


def export_graph(graph: Graph, path: Path, opset: int) -> None:
    """Write ``graph`` to ``path``: the one place ctzoo calls the ONNX exporter."""
    with warnings.catch_warnings():
        # Tracing warns about every Python-side shape check (e.g. TemplateSegNet._check); they are input
        # validation, not control flow of the graph, and the check below proves the graph right.
        warnings.simplefilter("ignore")
        torch.onnx.export(graph.module, tuple(graph.example.values()), str(path), input_names=list(graph.example),
                          output_names=graph.outputs, dynamic_axes=graph.dynamic_axes, opset_version=opset,
                          do_constant_folding=True, dynamo=False)
    keep_declared_inputs(path, graph)


def keep_declared_inputs(path: Path, graph: Graph) -> None:
    """Put back the inputs the exporter dropped because the network never reads them (a template segmenter fused at
    no level, e.g. an architecture search's candidate, ignores its template), so every graph of a kind has the same
    signature: clients, the Triton config and the parity check send each declared input. ONNX allows an unused
    graph input; ONNX Runtime accepts it and ignores its value."""
    import onnx

    model = onnx.load(str(path))
    present = {value.name for value in model.graph.input}
    missing = [name for name in graph.example if name not in present]
    if not missing:
        return
    kinds = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
             torch.int64: onnx.TensorProto.INT64}
    declared = []
    for name, tensor in graph.example.items():
        if name in present:
            declared.append(next(value for value in model.graph.input if value.name == name))
            continue
        axes = graph.dynamic_axes.get(name, {})
        shape = [axes.get(axis, size) for axis, size in enumerate(tensor.shape)]
        declared.append(onnx.helper.make_tensor_value_info(name, kinds[tensor.dtype], shape))
    others = [value for value in model.graph.input if value.name not in graph.example]  # e.g. initializers
    del model.graph.input[:]
    model.graph.input.extend(declared + others)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


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
