"""Which channels are which: a forward pass recorded at the level of channel *spaces*, for lossless expansion.

Widening a layer losslessly means widening every tensor it writes *and* every layer that reads them, in the
same way: a residual add ties the channels of its two operands, a skip concatenation makes a layer read two
spaces side by side, a shared (Siamese) encoder reads two streams with the same weights. Rather than describe
that by hand for each architecture, :func:`trace_channels` runs the model once on example inputs under a
``TorchFunctionMode`` and follows the channel dimension of every tensor:

* a convolution or linear layer writes a new *space* (one per module, shared by its repeated calls) and
  reads a *layout*: the list of spaces along its input channels (several after a concatenation);
* channel-wise operations (activations, norms, pooling, resizing, dropout, padding) keep the layout;
* elementwise binary operations (residual adds, gates) *unify* the spaces of their operands (union-find);
* concatenation along the channel dimension concatenates layouts;
* anything else makes a tensor whose channels are *fixed* (never expanded): e.g. the cosine maps of the
  template segmenter, whose channels are classes. The model's inputs and outputs are fixed too.

A mistake here cannot go unnoticed: :mod:`ctzoo.scaling.expand` checks the expanded model against the
original numerically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["ChannelTrace", "LayerUse", "Segment", "UnsupportedLayerError", "trace_channels"]

#: Modules whose parameters the expansion knows how to widen.
WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                 nn.Linear)
NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
               nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm)
SUPPORTED_LAYERS = WEIGHT_LAYERS + NORM_LAYERS + (nn.PReLU,)

_KEEP_LAYOUT = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.leaky_relu, F.leaky_relu_, F.gelu, F.silu, F.elu, F.selu,
    F.celu, F.hardtanh, F.relu6, F.hardswish, F.mish, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh,
    torch.Tensor.sigmoid, torch.Tensor.tanh, torch.Tensor.relu, torch.Tensor.relu_,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.dropout, torch.dropout_,
    F.interpolate, F.upsample, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
    F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, torch.max_pool2d, torch.avg_pool1d, F.pad,
    torch.Tensor.contiguous, torch.Tensor.clone, torch.clone, torch.Tensor.float, torch.Tensor.to,
    torch.Tensor.type_as, torch.Tensor.clamp, torch.clamp, torch.Tensor.clamp_,
}
_BINARY = {
    torch.add, torch.sub, torch.mul, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.sub, torch.Tensor.sub_,
    torch.Tensor.mul, torch.Tensor.mul_, torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.__iadd__,
    torch.Tensor.__sub__, torch.Tensor.__rsub__, torch.Tensor.__isub__, torch.Tensor.__mul__,
    torch.Tensor.__rmul__, torch.Tensor.__imul__, torch.Tensor.__truediv__, torch.Tensor.__itruediv__,
    torch.div, torch.Tensor.div, torch.maximum, torch.minimum,
}
#: Reductions and reshapes that keep the channel dim 1 when they only touch the dims after it.
_SPATIAL_ONLY = {torch.mean, torch.Tensor.mean, torch.sum, torch.Tensor.sum, torch.amax, torch.Tensor.amax,
                 torch.amin, torch.Tensor.amin, torch.flatten, torch.Tensor.flatten, torch.squeeze,
                 torch.Tensor.squeeze}
_WEIGHTED = {F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv", F.conv_transpose1d: "conv_transpose",
             F.conv_transpose2d: "conv_transpose", F.conv_transpose3d: "conv_transpose", F.linear: "linear"}
_NORMS = {F.batch_norm, F.instance_norm, F.group_norm, F.layer_norm, torch.batch_norm, torch.instance_norm,
          torch.group_norm, torch.layer_norm}


class UnsupportedLayerError(ValueError):
    """The model holds a layer that cannot be expanded losslessly; the message names it."""


@dataclass(frozen=True)
class Segment:
    """``size`` consecutive channels of a tensor, all from ``space`` (an id), or fixed when ``space`` is None."""

    space: int | None
    size: int


@dataclass
class LayerUse:
    """What the trace saw of one layer: the spaces it reads and writes, and the channel dim it works on."""

    name: str
    module: nn.Module
    kind: str  # conv | conv_transpose | linear | norm | prelu
    inputs: list[Segment] = field(default_factory=list)
    output: int | None = None  # the space written (weight layers), or normalised (norms)
    channel_dim: int = 1  # 1 for convolutions and norms over (B, C, ...), -1 for linear / layer norm
    calls: int = 0


class ChannelTrace:
    """Spaces (union-find over ids), the layers and what they read and write."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.fixed: set[int] = set()
        self.layers: dict[str, LayerUse] = {}
        #: space (root) -> names of the norm layers applied to it; and of layers whose output feeds a norm directly
        self.normalised_by: dict[int, list[str]] = {}
        self.feeds_only_norms: dict[str, bool] = {}
        #: spaces whose channels an operation mixes (a cosine, a mean over channels, ...): copies of a channel there
        #: must come in equal numbers, so extra channels are zero channels, not copies
        self.mixed: set[int] = set()
        #: spaces normalised by a norm without parameters (InstanceNorm's default): no layer records those
        self.plainly_normalised: set[int] = set()

    def new_space(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        return len(self.parent) - 1

    def find(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if self.size[ra] != self.size[rb]:
                raise UnsupportedLayerError(f"an operation ties channel spaces of sizes {self.size[ra]} and "
                                            f"{self.size[rb]}")
            self.parent[rb] = ra
            if rb in self.fixed:
                self.fixed.add(ra)

    def is_fixed(self, space: int) -> bool:
        return self.find(space) in {self.find(s) for s in self.fixed}

    def roots(self) -> list[int]:
        return sorted({self.find(s) for s in range(len(self.parent))})

    def is_mixed(self, space: int) -> bool:
        return self.find(space) in {self.find(s) for s in self.mixed}

    def is_plainly_normalised(self, space: int) -> bool:
        return self.find(space) in {self.find(s) for s in self.plainly_normalised}

    def norms_of(self, space: int) -> list[str]:
        root = self.find(space)
        return [name for s, names in self.normalised_by.items() if self.find(s) == root for name in names]


@dataclass
class _Layout:
    segments: tuple[Segment, ...]
    dim: int  # the channel dimension: 1 or -1

    @property
    def width(self) -> int:
        return sum(s.size for s in self.segments)


def _fixed(t: torch.Tensor, dim: int = 1) -> _Layout | None:
    if t.ndim < 2:
        return None
    return _Layout((Segment(None, int(t.shape[dim])),), dim % t.ndim)


class _Recorder(TorchFunctionMode):
    def __init__(self, trace: ChannelTrace, param_owner: dict[int, tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.trace, self.param_owner = trace, param_owner
        self.layouts: dict[int, _Layout] = {}
        self.keep: list[torch.Tensor] = []  # keeps traced tensors alive, so their ids are not reused
        self.produced_by: dict[int, str] = {}  # tensor id -> weight layer that wrote it

    def layout(self, t: Any) -> _Layout | None:
        if not isinstance(t, torch.Tensor):
            return None
        found = self.layouts.get(id(t))
        return found if found is not None else _fixed(t)

    def set(self, t: Any, layout: _Layout | None) -> None:
        if isinstance(t, torch.Tensor) and layout is not None:
            self.layouts[id(t)] = layout
            self.keep.append(t)

    def _owner(self, args: tuple, kwargs: dict) -> tuple[str, nn.Module] | None:
        for value in list(args) + list(kwargs.values()):
            if isinstance(value, nn.Parameter) and id(value) in self.param_owner:
                return self.param_owner[id(value)]
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._record(func, args, kwargs, out)
        return out

    def _use(self, name: str, module: nn.Module, kind: str, dim: int) -> LayerUse:
        use = self.trace.layers.get(name)
        if use is None:
            use = self.trace.layers[name] = LayerUse(name, module, kind, channel_dim=dim)
        use.calls += 1
        return use

    def _tie_inputs(self, use: LayerUse, layout: _Layout) -> None:
        segments = list(layout.segments)
        if use.calls == 1:
            use.inputs = segments
            return
        if [s.size for s in segments] != [s.size for s in use.inputs]:
            raise UnsupportedLayerError(f"{use.name} reads differently laid-out channels on different calls")
        for old, new in zip(use.inputs, segments):
            if (old.space is None) != (new.space is None):
                raise UnsupportedLayerError(f"{use.name} reads expandable and fixed channels at the same place")
            if old.space is not None:
                self.trace.union(old.space, new.space)

    def _record(self, func, args, kwargs, out) -> None:
        first = args[0] if args else None
        if func in _WEIGHTED:
            owner = self._owner(args, kwargs)
            if owner is None:
                self.set(out, _fixed(out))
                return
            name, module = owner
            kind = _WEIGHTED[func]
            in_dim, out_dim = (first.ndim - 1, out.ndim - 1) if kind == "linear" else (1, 1)
            use = self._use(name, module, kind, -1 if kind == "linear" else 1)
            in_layout = self.layout(first)
            if in_layout is None or in_layout.dim != in_dim:
                in_layout = _fixed(first, in_dim)
            self._tie_inputs(use, in_layout)
            if use.output is None:
                use.output = self.trace.new_space(int(out.shape[out_dim]))
            self.set(out, _Layout((Segment(use.output, int(out.shape[out_dim])),), out_dim))
            self.produced_by[id(out)] = name
            self.trace.feeds_only_norms.setdefault(name, True)
            return
        if func in _NORMS:
            owner = self._owner(args, kwargs)
            layout = self.layout(first)
            if owner is not None and layout is not None:
                name, module = owner
                is_layer_norm = func in (F.layer_norm, torch.layer_norm)
                if layout.dim != (first.ndim - 1 if is_layer_norm else 1):
                    layout = _fixed(first, first.ndim - 1 if is_layer_norm else 1)
                use = self._use(name, module, "norm", -1 if is_layer_norm else 1)
                self._tie_inputs(use, layout)
                for segment in layout.segments:
                    if segment.space is not None:
                        self.trace.normalised_by.setdefault(segment.space, []).append(name)
            elif layout is not None:
                self.trace.plainly_normalised.update(s.space for s in layout.segments if s.space is not None)
            self.set(out, layout)
            self._note_consumer(first, is_norm=True)
            return
        if func is F.prelu or func is torch.prelu:
            owner = self._owner(args, kwargs)
            if owner is not None:
                use = self._use(owner[0], owner[1], "prelu", 1)
                layout = self.layout(first)
                if layout is not None:
                    self._tie_inputs(use, layout)
            self.set(out, self.layout(first))
            self._note_consumer(first)
            return
        if self._owner(args, kwargs) is not None:
            name, module = self._owner(args, kwargs)
            raise UnsupportedLayerError(f"layer {name} ({type(module).__name__}) uses its parameters in "
                                        f"{getattr(func, '__name__', func)}, which cannot be expanded")
        for value in list(args) + list(kwargs.values()):
            if isinstance(value, torch.Tensor):
                self._note_consumer(value)
        if func in (torch.cat, torch.concat):
            self._record_cat(args, kwargs, out)
        elif func in _SPATIAL_ONLY and isinstance(first, torch.Tensor) and isinstance(out, torch.Tensor):
            layout = self.layout(first)
            kept = (layout is not None and layout.dim == 1 and out.ndim >= 2
                    and out.shape[:2] == first.shape[:2] and _spatial_only(func, args, kwargs, first))
            self.set(out, layout if kept else self._mixing(args, kwargs, out))
        elif func in _BINARY:
            self._record_binary(args, out)
        elif func in _KEEP_LAYOUT and isinstance(first, torch.Tensor) and isinstance(out, torch.Tensor):
            layout = self.layout(first)
            if layout is not None and out.ndim == first.ndim and out.shape[layout.dim] == first.shape[layout.dim]:
                self.set(out, layout)
            else:
                self.set(out, self._mixing(args, kwargs, out))
        elif isinstance(out, torch.Tensor):
            self.set(out, self._mixing(args, kwargs, out))

    def _mixing(self, args: tuple, kwargs: dict, out: torch.Tensor) -> _Layout:
        """``out`` of an operation that may combine channels: its inputs' spaces are mixed, its channels fixed."""
        for value in list(args) + list(kwargs.values()):
            for t in value if isinstance(value, (list, tuple)) else (value,):
                layout = self.layout(t) if isinstance(t, torch.Tensor) else None
                if layout is not None:
                    self.trace.mixed.update(s.space for s in layout.segments if s.space is not None)
        return _fixed(out)

    def _note_consumer(self, t: Any, is_norm: bool = False) -> None:
        if isinstance(t, torch.Tensor) and id(t) in self.produced_by and not is_norm:
            self.trace.feeds_only_norms[self.produced_by[id(t)]] = False

    def _record_cat(self, args, kwargs, out) -> None:
        tensors = args[0] if args else kwargs["tensors"]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        layouts = [self.layout(t) for t in tensors]
        ndim = out.ndim
        dim = dim % ndim
        if all(lay is not None and lay.dim % ndim == dim for lay in layouts):
            self.set(out, _Layout(tuple(s for lay in layouts for s in lay.segments), layouts[0].dim))
        elif all(lay is not None and lay.dim % ndim != dim for lay in layouts) and len(
                {tuple(s.size for s in lay.segments) for lay in layouts}) == 1:
            for lay in layouts[1:]:  # stacked along another dim: the channels must expand alike
                for a, b in zip(layouts[0].segments, lay.segments):
                    if a.space is not None and b.space is not None:
                        self.trace.union(a.space, b.space)
            self.set(out, layouts[0])
        else:
            self.set(out, self._mixing(args, kwargs, out))

    def _record_binary(self, args, out) -> None:
        operands = [a for a in args[:2] if isinstance(a, torch.Tensor)]
        layouts = [self.layout(a) for a in operands]
        full = [(a, lay) for a, lay in zip(operands, layouts) if lay is not None and a.shape[lay.dim] > 1]
        if not isinstance(out, torch.Tensor):
            return
        if not full:
            self.set(out, _fixed(out) if out.ndim >= 2 else None)
            return
        base = full[0][1]
        for _, other in full[1:]:
            if [s.size for s in other.segments] != [s.size for s in base.segments]:
                self.set(out, self._mixing(tuple(operands), {}, out))
                return
            for a, b in zip(base.segments, other.segments):
                if a.space is not None and b.space is not None:
                    self.trace.union(a.space, b.space)
                elif (a.space is None) != (b.space is None):  # expandable + fixed at the same place: pin it
                    self.trace.fixed.add(a.space if a.space is not None else b.space)
        self.set(out, base)


def _spatial_only(func, args: tuple, kwargs: dict, first: torch.Tensor) -> bool:
    """Whether a reduction/flatten/squeeze leaves dims 0 and 1 alone (so channels stay at dim 1, in order)."""
    if func in (torch.flatten, torch.Tensor.flatten):
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        return start % first.ndim >= 2 or all(s == 1 for s in first.shape[2:])
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    if dims is None:
        return func in (torch.squeeze, torch.Tensor.squeeze) and first.shape[0] != 1 and first.shape[1] != 1
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    return all(d % first.ndim >= 2 for d in dims)


def _named_parameter_owners(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    owners: dict[int, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        direct = list(module.parameters(recurse=False))
        if not direct:
            continue
        if not isinstance(module, SUPPORTED_LAYERS):
            raise UnsupportedLayerError(f"layer {name or '<root>'} ({type(module).__name__}) cannot be expanded: "
                                        "only Conv/ConvTranspose 1-3D, Linear, BatchNorm, InstanceNorm, GroupNorm, "
                                        "LayerNorm and PReLU layers hold parameters in an expandable model")
        if isinstance(module, WEIGHT_LAYERS[:6]) and module.groups != 1:
            raise UnsupportedLayerError(f"layer {name} ({type(module).__name__}) is a grouped convolution "
                                        f"(groups={module.groups}), which cannot be expanded")
        for parameter in direct:
            owners.setdefault(id(parameter), (name, module))
    return owners


def _outputs(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _outputs(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _outputs(v)]
    return []


@torch.no_grad()
def trace_channels(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> ChannelTrace:
    """Run ``model(*example_inputs)`` once (eval mode) and return its :class:`ChannelTrace`.

    Raises :class:`UnsupportedLayerError` naming the first layer that cannot be expanded.
    """
    trace = ChannelTrace()
    owners = _named_parameter_owners(model)
    was_training = model.training
    model.eval()
    recorder = _Recorder(trace, owners)
    try:
        with recorder:
            outputs = model(*example_inputs)
    finally:
        model.train(was_training)
    for t in _outputs(outputs):
        layout = recorder.layouts.get(id(t))
        for segment in layout.segments if layout else ():
            if segment.space is not None:
                trace.fixed.add(segment.space)
    for name, module in model.named_modules():
        if list(module.parameters(recurse=False)) and name not in trace.layers:
            trace.layers[name] = LayerUse(name, module, "unused")
    return trace
