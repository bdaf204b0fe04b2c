"""LEMON: lossless model expansion (Wang et al., ICLR 2024) for the zoo's convolutional networks.

:func:`expand_model` grows a trained model wider (``width_mult``) and deeper (``depth_add``) so that the larger
model computes exactly the function of the smaller one (up to float rounding), then trains on from there.

Width. Every expandable channel space of ``D`` channels (found by :func:`ctzoo.scaling.channel_trace.trace_channels`:
residual adds tie spaces together, concatenations give a layer several input segments, a model's inputs,
outputs and class-valued maps stay fixed) grows to ``D' = k D + r``:

* every channel ``c`` is a copy of channel ``c mod D`` (circular, as LEMON: channel ``i`` has ``|S_i| = k + 1``
  copies for ``i < r``, else ``k``), with the norms' parameters and statistics copied alike, so every added
  channel computes and trains like the channel it copies;
* except in *mixed* spaces, whose channels an operation combines (the template segmenter's cosine attention, a
  mean over channels): unequal copy counts would change those, so there the ``r`` extra channels are *zero*
  channels (zero rows, or, where the output goes straight into a norm with affine parameters, random rows
  normalised into ``gamma = beta = 0``); a mixed space normalised by a norm without parameters grows by whole
  copies instead (``r = 0``: ``norm(eps * x)`` of a zero channel would be of order 1 after one step);
* a layer reading copies gets LEMON's symmetry-breaking column projection: its new weights start random
  (the layer's default initialisation, seeded) and each copy ``c`` of input channel ``i`` is shifted so that
  the copies of ``i`` sum to the old column: ``W_c = W'_c - (sum_{c' in S_i} W'_{c'} - W_i) / |S_i|``. Copies
  thus get different fan-out weights and different gradients (Net2Net's equal split would keep them
  identical); columns reading zero channels keep their random values;
* a GroupNorm keeps its channels per group (``r`` is rounded to whole groups, the group count grows); a
  LayerNorm over an expanded dimension needs whole copies (``r = 0``).

Depth. ``depth_add`` identity blocks are inserted after every residual block (MONAI ``ResidualUnit``, MONAI
ResNet basic blocks): a copy of the block's shape with stride 1 and an identity shortcut whose residual branch
ends in a norm with ``gamma = beta = 0`` (LEMON's CNN recipe zeroes ``bn3``), so it outputs exactly its input;
its other weights are freshly initialised. In a ``ResidualUnit`` the activation after that last norm is left
out (ReLU's gradient at 0 is 0: the whole branch would never train), and a last norm without parameters too,
the branch then ending in its zeroed convolution, whose weights get a gradient from its non-zero input.

Any other layer with parameters (attention, grouped convolutions, ...) raises
:class:`~ctzoo.scaling.channel_trace.UnsupportedLayerError` naming it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from monai.networks.blocks import ResidualUnit
from monai.networks.nets.resnet import ResNetBlock
from torch import nn

from ctzoo.scaling.channel_trace import (
    NORM_LAYERS,
    WEIGHT_LAYERS,
    ChannelTrace,
    LayerUse,
    Segment,
    UnsupportedLayerError,
    trace_channels,
)

__all__ = ["ExpansionReport", "SpacePlan", "UnsupportedLayerError", "compare_outputs", "expand_model",
           "plan_widths"]


@dataclass(frozen=True)
class SpacePlan:
    """A channel space of ``old`` channels grown to ``new = copies * old + extra``; the extra channels are
    copies of channels ``0 .. extra-1`` (``circular``) or zero channels."""

    old: int
    new: int
    circular: bool = True

    @property
    def copies(self) -> int:
        return self.new // self.old

    @property
    def extra(self) -> int:
        return self.new - self.copies * self.old

    @property
    def copied(self) -> int:
        """How many of the new channels are copies (the rest are zero channels)."""
        return self.new if self.circular else self.copies * self.old

    def source_index(self) -> torch.Tensor:
        """For each of the :attr:`copied` channels, the old channel it copies."""
        return torch.arange(self.copied) % self.old


@dataclass
class ExpansionReport:
    width_mult: float
    depth_add: int
    parameters_before: int
    parameters_after: int
    widths: dict[str, tuple[int, int]]  # layer -> (old, new) output channels
    blocks_added: int
    max_abs_diff: float = float("nan")
    max_rel_diff: float = float("nan")

    def as_dict(self) -> dict:
        return {"width_mult": self.width_mult, "depth_add": self.depth_add,
                "parameters_before": self.parameters_before, "parameters_after": self.parameters_after,
                "blocks_added": self.blocks_added, "max_abs_diff": self.max_abs_diff,
                "max_rel_diff": self.max_rel_diff, "widths": {k: list(v) for k, v in self.widths.items()}}


# ------------------------------------------------------------------------------------------------- planning


def _quantum(trace: ChannelTrace, root: int, layers: dict[str, LayerUse]) -> int:
    """Channels must be added in multiples of this: a GroupNorm's group size, a LayerNorm's whole width; and the
    whole width for a mixed space (zero channels there) normalised without parameters, since a zero channel
    there would turn into ``norm(eps * x)``, of order 1, on the first optimiser step."""
    mixed = trace.is_mixed(root)
    if mixed and trace.is_plainly_normalised(root):
        return trace.size[root]
    quantum = 1
    for name in trace.norms_of(root):
        module = layers[name].module
        if isinstance(module, nn.LayerNorm) or (mixed and getattr(module, "weight", None) is None):
            quantum = math.lcm(quantum, trace.size[root])
        elif isinstance(module, nn.GroupNorm):
            quantum = math.lcm(quantum, module.num_channels // module.num_groups)
    return quantum


def plan_widths(trace: ChannelTrace, width_mult: float) -> dict[int, SpacePlan]:
    """New width of every channel space (by union-find root): ``round(width_mult * old)`` rounded up to the
    space's quantum; fixed spaces keep their width."""
    if width_mult < 1:
        raise ValueError(f"width_mult must be >= 1, got {width_mult}")
    plans = {}
    for root in trace.roots():
        old = trace.size[root]
        if trace.is_fixed(root):
            plans[root] = SpacePlan(old, old)
            continue
        quantum = _quantum(trace, root, trace.layers)
        added = round((width_mult - 1) * old)
        plans[root] = SpacePlan(old, old + math.ceil(added / quantum) * quantum, not trace.is_mixed(root))
    return plans


# ------------------------------------------------------------------------------------------------ weights


def _segment_plans(trace: ChannelTrace, plans: dict[int, SpacePlan], segments: list[Segment]) -> list[SpacePlan]:
    return [SpacePlan(s.size, s.size) if s.space is None else plans[trace.find(s.space)] for s in segments]


def _expand_rows(old: torch.Tensor, plan: SpacePlan, fill: torch.Tensor) -> torch.Tensor:
    """Dim 0 of ``old`` grown by ``plan``: copies circular, extra rows from ``fill`` (same shape as the result)."""
    out = fill.clone()
    out[: plan.copied] = old[plan.source_index()]
    return out


def _project_columns(rows: torch.Tensor, random: torch.Tensor, segments: list[SpacePlan]) -> torch.Tensor:
    """LEMON's column projection: ``rows`` (O', I, ...) -> (O', I', ...) starting from ``random`` (O', I', ...)."""
    out, old_at, new_at = random.clone(), 0, 0
    for plan in segments:
        old_cols = rows[:, old_at: old_at + plan.old]
        if plan.new == plan.old:
            out[:, new_at: new_at + plan.new] = old_cols
        else:  # copy c of channel i (one of |S_i| = k or k + 1) gets W'_c - (sum_{S_i} W' - W_i) / |S_i|
            source = plan.source_index()
            copies = random[:, new_at: new_at + plan.copied]
            sums = torch.zeros_like(old_cols).index_add_(1, source, copies)
            counts = torch.bincount(source, minlength=plan.old).to(random.dtype)
            shift = (sums - old_cols) / counts.view(1, -1, *[1] * (random.ndim - 2))
            out[:, new_at: new_at + plan.copied] = copies - shift[:, source]
        old_at, new_at = old_at + plan.old, new_at + plan.new
    return out


def _new_weight_layer(module: nn.Module, in_new: int, out_new: int) -> nn.Module:
    if isinstance(module, nn.Linear):
        return nn.Linear(in_new, out_new, bias=module.bias is not None)
    kwargs = dict(kernel_size=module.kernel_size, stride=module.stride, padding=module.padding,
                  dilation=module.dilation, bias=module.bias is not None, padding_mode=module.padding_mode)
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        kwargs["output_padding"] = module.output_padding
    return type(module)(in_new, out_new, **kwargs)


def _zero_rows_needed(trace: ChannelTrace, use: LayerUse) -> bool:
    """Extra output rows must be zero unless the output goes only into norms whose gamma/beta zero them."""
    if not trace.feeds_only_norms.get(use.name, False):
        return True
    norms = [trace.layers[n].module for n in trace.norms_of(use.output)]
    return not norms or not all(getattr(m, "weight", None) is not None for m in norms)


def _expand_weight_layer(trace: ChannelTrace, plans: dict[int, SpacePlan], use: LayerUse) -> nn.Module:
    module = use.module
    in_plans = _segment_plans(trace, plans, use.inputs)
    out_plan = plans[trace.find(use.output)]
    new = _new_weight_layer(module, sum(p.new for p in in_plans), out_plan.new)
    transposed = isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
    old_w = module.weight.detach().transpose(0, 1) if transposed else module.weight.detach()
    rand_w = new.weight.detach().transpose(0, 1) if transposed else new.weight.detach()
    fill = torch.zeros(out_plan.new, old_w.shape[1], *old_w.shape[2:], dtype=old_w.dtype)
    rows = _expand_rows(old_w, out_plan, fill)
    weight = _project_columns(rows, rand_w, in_plans)
    if out_plan.copied < out_plan.new and _zero_rows_needed(trace, use):
        weight[out_plan.copied:] = 0
    with torch.no_grad():
        new.weight.copy_(weight.transpose(0, 1) if transposed else weight)
        if module.bias is not None:
            new.bias.copy_(_expand_rows(module.bias.detach(), out_plan, torch.zeros(out_plan.new)))
    return new


def _expand_vector(old: torch.Tensor, plans: list[SpacePlan], extra_value: float) -> torch.Tensor:
    parts, at = [], 0
    for plan in plans:
        piece = old[at: at + plan.old]
        parts.append(_expand_rows(piece, plan, torch.full((plan.new,), extra_value, dtype=old.dtype)))
        at += plan.old
    return torch.cat(parts)


def _expand_norm(trace: ChannelTrace, plans: dict[int, SpacePlan], use: LayerUse) -> nn.Module:
    module = use.module
    in_plans = _segment_plans(trace, plans, use.inputs)
    width = sum(p.new for p in in_plans)
    if isinstance(module, nn.GroupNorm):
        if len(in_plans) > 1 and width != module.num_channels:
            raise UnsupportedLayerError(f"layer {use.name} (GroupNorm) normalises a concatenation; cannot expand it")
        per_group = module.num_channels // module.num_groups
        new = nn.GroupNorm(width // per_group, width, eps=module.eps, affine=module.affine)
    elif isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            raise UnsupportedLayerError(f"layer {use.name} (LayerNorm) normalises several dimensions")
        if any(p.extra for p in in_plans):
            raise UnsupportedLayerError(f"layer {use.name} (LayerNorm) needs a whole-number width multiple")
        new = nn.LayerNorm(width, eps=module.eps, elementwise_affine=module.elementwise_affine,
                           bias=module.bias is not None)
    else:  # batch and instance norms
        new = type(module)(width, eps=module.eps, momentum=module.momentum, affine=module.affine,
                           track_running_stats=module.track_running_stats)
    with torch.no_grad():
        for name, extra_value in (("weight", 0.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            old = getattr(module, name, None)
            if old is not None:
                getattr(new, name).copy_(_expand_vector(old.detach(), in_plans, extra_value))
        if getattr(module, "num_batches_tracked", None) is not None:
            new.num_batches_tracked.copy_(module.num_batches_tracked)
    return new


def _expand_prelu(trace: ChannelTrace, plans: dict[int, SpacePlan], use: LayerUse) -> nn.Module:
    module = use.module
    if module.num_parameters == 1:
        return copy.deepcopy(module)
    in_plans = _segment_plans(trace, plans, use.inputs)
    new = nn.PReLU(sum(p.new for p in in_plans))
    with torch.no_grad():
        new.weight.copy_(_expand_vector(module.weight.detach(), in_plans, 0.25))
    return new


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


# ------------------------------------------------------------------------------------------------- depth


def _branch_ends_in_its_norm(adn: nn.Module | None) -> nn.Module | None:
    """The norm of the residual branch's last norm-dropout-activation (MONAI ``ADN``), made its last operation:
    the activation after it goes (a zeroed norm before a ReLU would leave the whole branch without gradients:
    ReLU's gradient at 0 is 0), and so does a norm without parameters (which cannot be zeroed, and turns the
    small output of the zeroed convolution before it into one of order 1). None: the branch ends in its
    convolution."""
    if adn is None:
        return None
    for child in [n for n in ("A", "N") if hasattr(adn, n)]:
        if child == "N" and getattr(adn.N, "weight", None) is not None:
            return adn.N
        delattr(adn, child)
    return None


def _identity_block(block: nn.Module) -> nn.Module:
    """A fresh stride-1, same-width residual block shaped like ``block`` whose output equals its input."""
    new = copy.deepcopy(block)
    if isinstance(block, ResidualUnit):
        first, last = new.conv[0].conv, new.conv[-1]
        # the expanded widths (the block's out_channels attribute is the original's): the block's output, which the
        # identity block reads and writes, and its first convolution's, which may have grown by another ratio
        width = (last.conv if hasattr(last, "conv") else last).out_channels
        new.conv[0].conv = type(first)(width, first.out_channels, kernel_size=first.kernel_size, stride=1,
                                       padding=first.padding, dilation=first.dilation, bias=first.bias is not None)
        new.residual, new.in_channels, new.out_channels = nn.Identity(), width, width
        last = new.conv[-1]
        last_conv = last.conv if hasattr(last, "conv") else last
        last_norm = _branch_ends_in_its_norm(getattr(last, "adn", None))
    elif isinstance(block, ResNetBlock):
        width = block.conv2.out_channels
        new.conv1 = type(block.conv1)(width, width, kernel_size=block.conv1.kernel_size, stride=1,
                                      padding=block.conv1.padding, bias=block.conv1.bias is not None)
        new.downsample, new.stride = None, 1
        last_conv, last_norm = new.conv2, new.bn2
    else:
        raise UnsupportedLayerError(f"cannot add depth after a {type(block).__name__}")
    for module in new.modules():
        if hasattr(module, "reset_parameters") and module is not new:
            module.reset_parameters()
    with torch.no_grad():
        if last_norm is not None and getattr(last_norm, "weight", None) is not None:
            last_norm.weight.zero_()
            last_norm.bias.zero_()
        else:  # no affine norm to silence the branch: silence its last convolution
            last_conv.weight.zero_()
            if last_conv.bias is not None:
                last_conv.bias.zero_()
    return new


def _add_depth(model: nn.Module, depth_add: int) -> int:
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, (ResidualUnit, ResNetBlock))]
    # innermost first is irrelevant here: residual blocks do not nest in MONAI's nets
    for name, block in blocks:
        _set_module(model, name, nn.Sequential(block, *[_identity_block(block) for _ in range(depth_add)]))
    return len(blocks) * depth_add


@torch.no_grad()
def _record_parameterless_norm_widths(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> None:
    """Norms without parameters or statistics (InstanceNorm's default) work at any width, but keep the
    original ``num_features`` in their repr and warn; set it to the width they now see."""
    plain = [m for m in model.modules() if isinstance(m, nn.modules.instancenorm._InstanceNorm)
             and not m.affine and not m.track_running_stats]
    hooks = [m.register_forward_pre_hook(lambda module, args: setattr(module, "num_features", args[0].shape[1]))
             for m in plain]
    was_training = model.training
    try:
        model.eval()
        model(*example_inputs)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()


# ------------------------------------------------------------------------------------------------- public


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def expand_model(model: nn.Module, example_inputs: tuple[torch.Tensor, ...], width_mult: float = 1.0,
                 depth_add: int = 0, seed: int = 0) -> tuple[nn.Module, ExpansionReport]:
    """A wider and deeper copy of ``model`` computing the same function (``model`` is left untouched).

    ``example_inputs``: one valid input tuple (small sizes suffice); it is used to trace the channel spaces.
    ``seed`` fixes the random part (new weights), so the same call gives the same model.
    The report's ``max_*_diff`` are filled by :func:`compare_outputs` (``ctzoo expand`` does it).
    """
    if depth_add < 0:
        raise ValueError(f"depth_add must be >= 0, got {depth_add}")
    trace = trace_channels(model, example_inputs)
    plans = plan_widths(trace, width_mult)
    expanded = copy.deepcopy(model)
    widths: dict[str, tuple[int, int]] = {}
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for name, use in sorted(trace.layers.items()):
            if use.kind == "unused":
                raise UnsupportedLayerError(f"layer {name} ({type(use.module).__name__}) has parameters but takes "
                                            "no part in the forward pass on the example inputs")
            if isinstance(use.module, WEIGHT_LAYERS):
                new = _expand_weight_layer(trace, plans, use)
                widths[name] = (plans[trace.find(use.output)].old, plans[trace.find(use.output)].new)
            elif isinstance(use.module, NORM_LAYERS):
                new = _expand_norm(trace, plans, use)
            else:
                new = _expand_prelu(trace, plans, use)
            _set_module(expanded, name, new)
        added = _add_depth(expanded, depth_add) if depth_add else 0
        _record_parameterless_norm_widths(expanded, example_inputs)
    finally:
        torch.random.set_rng_state(generator_state)
    expanded.train(model.training)
    report = ExpansionReport(width_mult, depth_add, count_parameters(model), count_parameters(expanded), widths,
                             added)
    return expanded, report


def _flat(outputs) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        return [t for key in sorted(outputs) for t in _flat(outputs[key])]
    return [t for value in outputs for t in _flat(value)]


@torch.no_grad()
def compare_outputs(original: nn.Module, expanded: nn.Module, inputs: tuple[torch.Tensor, ...],
                    training: bool = False) -> tuple[float, float]:
    """Outputs of both models on ``inputs``, in eval mode (or ``training`` mode: norms use the batch's statistics,
    and BatchNorm's running statistics of both models are updated by the pass): (max absolute difference, max
    difference relative to the largest absolute original output)."""
    modes = original.training, expanded.training
    original.train(training), expanded.train(training)
    try:
        a, b = _flat(original(*inputs)), _flat(expanded(*inputs))
    finally:
        original.train(modes[0]), expanded.train(modes[1])
    if [t.shape for t in a] != [t.shape for t in b]:
        raise AssertionError(f"output shapes differ: {[tuple(t.shape) for t in a]} vs {[tuple(t.shape) for t in b]}")
    abs_diff = max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b))
    scale = max(float(x.double().abs().max()) for x in a)
    return abs_diff, abs_diff / max(scale, 1e-12)
