"""The segmentation networks a ``ctzoo train`` config can name, and how its ``model:`` block builds them."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ctzoo.config import StrictConfig
from ctzoo.models.template_seg import TemplateSegNet, count_parameters, unet_baseline


class TemplateSegModelConfig(StrictConfig):
    """``template_seg``: :class:`TemplateSegNet`; ``unet``: MONAI UNet with the parameter count of the
    ``template_seg`` model these same fields describe (:func:`unet_baseline`)."""

    kind: Literal["template_seg", "unet"] = "template_seg"
    channels: tuple[int, ...] = (16, 32, 64, 128)
    share_encoders: bool = True
    fusion_levels: tuple[int, ...] | None = None
    gate: Literal["sigmoid", "none"] = "sigmoid"
    temperature: float = Field(10.0, gt=0)


def build_seg_model(model: TemplateSegModelConfig, num_classes: int) -> nn.Module:
    """The network ``model`` describes: logits ``(B, num_classes + 1, H, W)`` from ``(B, 1, H, W)``."""
    def template_net() -> TemplateSegNet:
        return TemplateSegNet(2, 1, num_classes, model.channels, (2,) * (len(model.channels) - 1),
                              model.share_encoders, model.fusion_levels, model.gate, model.temperature)

    if model.kind == "template_seg":
        return template_net()
    with torch.device("meta"):  # only counted
        target = count_parameters(template_net())
    return unet_baseline(2, 1, num_classes + 1, target, num_levels=len(model.channels))
