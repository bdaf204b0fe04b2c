"""A single-path one-shot supernet of the template segmenter, and the standalone sub-networks cut out of it.

:class:`TemplateSuperNet` wraps one :class:`TemplateSegNet` holding the largest choice of every block (the widest
channels, the largest kernel, the most units, fusion at every level) and runs any :class:`Architecture` of its
:class:`SearchSpace` through it functionally, with slices of those weights:

* width: the first ``c`` output channels (and the matching input channels) of every convolution; instance
  norms carry no parameters and PReLU one, so only convolutions are sliced;
* kernel: a kernel ``k`` is the centre ``k x k`` of the largest kernel (weight sharing as in once-for-all
  networks rather than separate weights per kernel: one tensor per convolution keeps every sampled path
  training the same weights, and the extracted 3x3 convolution is the same op as the supernet's);
* units: the first ``n`` convolutions of the level's residual unit (the first one strides);
* fusion: the level's cosine-prototype attention runs or the image features pass unchanged; gate as chosen.

Convolutions whose input is a concatenation (fusion's projection: features then class maps; the decoder: upsampled
then skip features) take the chosen channels of each part. :func:`conv_slices` says, per convolution of the
wrapped network, which slice an architecture uses; the supernet's forward and :func:`extract` both read it, so
the extracted :class:`TemplateSegNet` holds exactly the weights the supernet ran with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ctzoo.models.template_seg import CosinePrototypeAttention, TemplateSegNet, sigmoid_gate
from ctzoo.nas.space import Architecture, SearchSpace, extreme

CONV = {2: F.conv2d, 3: F.conv3d}
CONV_TRANSPOSE = {2: F.conv_transpose2d, 3: F.conv_transpose3d}
NORMS = (nn.InstanceNorm2d, nn.InstanceNorm3d)


@dataclass(frozen=True)
class ConvSlice:
    """The part of a convolution's weight a sub-network uses: the first ``out`` output channels, the input
    channels in ``inputs`` (``(start, stop)`` spans, concatenated), the centre ``kernel`` of the kernel."""

    out: int
    inputs: tuple[tuple[int, int], ...]
    kernel: int


def sliced_weight(conv: nn.Conv2d | nn.Conv3d | nn.ConvTranspose2d | nn.ConvTranspose3d,
                  part: ConvSlice) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``conv``'s weight and bias restricted to ``part`` (views when the input is one span)."""
    transposed = isinstance(conv, (nn.ConvTranspose2d, nn.ConvTranspose3d))
    weight = conv.weight.transpose(0, 1) if transposed else conv.weight  # (out, in, *k)
    weight = weight[:part.out]
    weight = torch.cat([weight[:, a:b] for a, b in part.inputs], dim=1) if len(part.inputs) > 1 \
        else weight[:, part.inputs[0][0]:part.inputs[0][1]]
    offset = (conv.kernel_size[0] - part.kernel) // 2
    if offset:
        weight = weight[(..., *[slice(offset, offset + part.kernel)] * (weight.ndim - 2))]
    weight = weight.transpose(0, 1) if transposed else weight
    return weight, None if conv.bias is None else conv.bias[:part.out]


def sliced_conv(conv: nn.Module, part: ConvSlice, x: torch.Tensor) -> torch.Tensor:
    """``conv`` run with its ``part`` slice: ``(B, sum of input spans, *s)`` -> ``(B, part.out, *s')``."""
    weight, bias = sliced_weight(conv, part)
    dims = weight.ndim - 2
    # a centre-cropped kernel keeps the output size with correspondingly less padding (k5/p2 -> k3/p1)
    shrink = (conv.kernel_size[0] - part.kernel) // 2 * conv.dilation[0]
    padding = tuple(p - shrink for p in conv.padding)
    if isinstance(conv, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return CONV_TRANSPOSE[dims](x, weight, bias, conv.stride, padding, conv.output_padding, conv.groups,
                                    conv.dilation)
    return CONV[dims](x, weight, bias, conv.stride, padding, conv.dilation, conv.groups)


def subnet_config(space: SearchSpace, arch: Architecture) -> dict[str, Any]:
    """The :class:`TemplateSegNet` constructor arguments of ``arch`` (JSON values: a bundle's network config)."""
    space.check(arch)
    return {"spatial_dims": space.spatial_dims, "in_channels": space.in_channels, "num_classes": space.num_classes,
            "channels": [space.channels(k, v.width) for k, v in enumerate(arch.levels)],
            "strides": list(space.strides), "share_encoders": True,
            "fusion_levels": [k for k, v in enumerate(arch.levels) if v.fusion], "gate": arch.gate,
            "temperature": space.temperature, "kernel_sizes": [v.kernel for v in arch.levels],
            "subunits": [v.units for v in arch.levels]}


def conv_slices(net: TemplateSegNet, space: SearchSpace, arch: Architecture) -> dict[str, ConvSlice]:
    """``{path of a convolution in net: its slice}`` for every convolution ``arch`` runs (``net``: the supernet's
    largest network). Paths are those of the sub-network too: the same ``state_dict`` keys, fewer of them."""
    widths = subnet_config(space, arch)["channels"]
    full, parts = space.max_channels(), {}
    for encoder in ("image_encoder", "template_encoder"):  # shared levels: the same slices under both names
        stem = net.get_submodule(f"{encoder}.stem.conv")
        parts[f"{encoder}.stem.conv"] = ConvSlice(widths[0], ((0, stem.in_channels),), stem.kernel_size[0])
        for k, level in enumerate(arch.levels):
            path, c_in = f"{encoder}.levels.{k}", widths[max(k - 1, 0)]
            parts[f"{path}.conv.unit0.conv"] = ConvSlice(widths[k], ((0, c_in),), level.kernel)
            for unit in range(1, level.units):
                parts[f"{path}.conv.unit{unit}.conv"] = ConvSlice(widths[k], ((0, widths[k]),), level.kernel)
            residual = net.get_submodule(f"{path}.residual")
            if isinstance(residual, (nn.Conv2d, nn.Conv3d)):  # MONAI: the unit's kernel when it strides, else 1x1
                kernel = level.kernel if residual.kernel_size[0] > 1 else 1
                parts[f"{path}.residual"] = ConvSlice(widths[k], ((0, c_in),), kernel)
    for k, level in enumerate(arch.levels):
        if level.fusion:  # features then one similarity map per class
            maps = (full[k], full[k] + space.num_classes)
            parts[f"fusion.{k}.project.conv"] = ConvSlice(widths[k], ((0, widths[k]), maps), 1)
    for i, k in enumerate(range(space.num_levels - 1, 0, -1)):
        up = net.get_submodule(f"up.{i}.conv")
        parts[f"up.{i}.conv"] = ConvSlice(widths[k - 1], ((0, widths[k]),), up.kernel_size[0])
        halves = ((0, widths[k - 1]), (full[k - 1], full[k - 1] + widths[k - 1]))  # upsampled, then skip
        parts[f"decode.{i}.conv.unit0.conv"] = ConvSlice(widths[k - 1], halves, 3)
        parts[f"decode.{i}.residual"] = ConvSlice(widths[k - 1], halves, 1)
    head = net.get_submodule("head.conv")
    parts["head.conv"] = ConvSlice(head.out_channels, ((0, widths[0]),), 1)
    return parts


class TemplateSuperNet(nn.Module):
    """Weight-sharing supernet of ``space`` (see the module docstring).

    ``forward(image, template, arch=None)``: ``(B, in_channels, *S)``, ``(B|1, in_channels + num_classes, *S_t)``
    -> logits ``(B, num_classes + 1, *S)`` of sub-network ``arch`` (default: the one :meth:`set_active` chose).
    ``net`` is the largest network; its weights are the supernet's only parameters.
    """

    def __init__(self, space: SearchSpace) -> None:
        super().__init__()
        self.space = space
        levels = space.num_levels
        self.net = TemplateSegNet(space.spatial_dims, space.in_channels, space.num_classes, space.max_channels(),
                                  space.strides, share_encoders=True, fusion_levels=None, gate="sigmoid",
                                  temperature=space.temperature, kernel_sizes=[max(space.kernels)] * levels,
                                  subunits=[max(space.units)] * levels)
        self.active = extreme(space, largest=True)

    def set_active(self, arch: Architecture) -> None:
        """Make ``arch`` the sub-network a ``forward`` without ``arch`` runs."""
        self.space.check(arch)
        self.active = arch

    def forward(self, image: torch.Tensor, template: torch.Tensor, arch: Architecture | None = None) -> torch.Tensor:
        arch = self.active if arch is None else arch
        net, parts = self.net, conv_slices(self.net, self.space, arch)
        net._check(image, "image", net.in_channels)
        net._check(template, "template", net.in_channels + net.num_classes)
        features = self._encode("image_encoder", image, arch, parts)
        fused = [k for k, level in enumerate(arch.levels) if level.fusion]
        if fused:  # as TemplateSegNet.encode_template: presence from the full-resolution masks
            masks = template[:, net.in_channels:]
            present = masks.flatten(2).sum(-1) > 0
            template_features = self._encode("template_encoder", template, arch, parts)
        for k in fused:
            prototypes, _ = CosinePrototypeAttention.prototypes(template_features[k], masks)
            similarity = net.fusion[str(k)].similarity(features[k], prototypes, present)
            gated = sigmoid_gate(features[k], similarity, present, net.fusion[str(k)].temperature) \
                if arch.gate == "sigmoid" else features[k]
            features[k] = self._conv(f"fusion.{k}.project.conv", torch.cat([gated, similarity], dim=1), parts)
        x = features[-1]
        for i, skip in enumerate(reversed(features[:-1])):
            x = self._block(f"up.{i}", x, parts)
            x = self._residual_unit(f"decode.{i}", torch.cat([x, skip], dim=1), 1, parts)
        return self._conv("head.conv", x, parts)

    def _encode(self, encoder: str, x: torch.Tensor, arch: Architecture,
                parts: dict[str, ConvSlice]) -> list[torch.Tensor]:
        """As ``UNetEncoder.forward``: ``(B, in, *S)`` -> the chosen-width features of every level."""
        x, features = self._block(f"{encoder}.stem", x, parts), []
        for k, level in enumerate(arch.levels):
            x = self._residual_unit(f"{encoder}.levels.{k}", x, level.units, parts)
            features.append(x)
        return features

    def _conv(self, path: str, x: torch.Tensor, parts: dict[str, ConvSlice]) -> torch.Tensor:
        return sliced_conv(self.net.get_submodule(path), parts[path], x)

    def _block(self, path: str, x: torch.Tensor, parts: dict[str, ConvSlice]) -> torch.Tensor:
        """A MONAI ``Convolution`` (convolution, then instance norm and activation) on the slice."""
        x = self._conv(f"{path}.conv", x, parts)
        for layer in getattr(self.net.get_submodule(path), "adn", ()):
            if isinstance(layer, NORMS):  # no affine parameters: any width; F avoids the num_features warning
                x = F.instance_norm(x, eps=layer.eps)
            else:
                x = layer(x)
        return x

    def _residual_unit(self, path: str, x: torch.Tensor, units: int, parts: dict[str, ConvSlice]) -> torch.Tensor:
        """A MONAI ``ResidualUnit`` with its first ``units`` convolutions: ``conv(x) + residual(x)``."""
        residual = self._conv(f"{path}.residual", x, parts) if f"{path}.residual" in parts else x
        for unit in range(units):
            x = self._block(f"{path}.conv.unit{unit}", x, parts)
        return x + residual


def extract(supernet: TemplateSuperNet, arch: Architecture) -> TemplateSegNet:
    """A standalone :class:`TemplateSegNet` of ``arch`` holding copies of exactly the weights the supernet runs
    ``arch`` with (same outputs; constructor arguments :func:`subnet_config`), in the supernet's train/eval mode."""
    net = TemplateSegNet(**subnet_config(supernet.space, arch))
    parts = conv_slices(supernet.net, supernet.space, arch)
    source = supernet.net.state_dict()
    state = {}
    for key, target in net.state_dict().items():
        module, _, name = key.rpartition(".")
        if module in parts:
            weight, bias = sliced_weight(supernet.net.get_submodule(module), parts[module])
            value = weight if name == "weight" else bias
        else:  # PReLU slopes: one per activation, whatever the width
            value = source[key]
        if value.shape != target.shape:
            raise RuntimeError(f"{key}: supernet slice {tuple(value.shape)} != sub-network {tuple(target.shape)}")
        state[key] = value.detach().clone()
    net.load_state_dict(state)
    return net.train(supernet.training)
