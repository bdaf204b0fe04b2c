"""The segmentation networks a ``ctzoo train`` config can name, and how its ``model:`` block builds them."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
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
    kernel_sizes: tuple[int, ...] | None = Field(None, description="per encoder level, the convolution kernel "
                                                                   "(default 3 everywhere; e.g. a searched network)")
    subunits: tuple[int, ...] | None = Field(None, description="per encoder level, the convolutions of its residual "
                                                               "unit (default 2 everywhere)")

    @model_validator(mode="after")
    def _one_entry_per_level(self) -> TemplateSegModelConfig:
        for name in ("kernel_sizes", "subunits"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.channels):
                raise ValueError(f"model.{name} needs one entry per level ({len(self.channels)}), got {values}")
        return self


def template_seg_config(model: TemplateSegModelConfig, num_classes: int) -> dict[str, Any]:
    """The :class:`TemplateSegNet` constructor arguments ``model`` describes, as JSON values (a bundle's network
    config); ``kernel_sizes`` and ``subunits`` only when set, so configs without them stay as they were."""
    config = {"spatial_dims": 2, "in_channels": 1, "num_classes": num_classes, "channels": list(model.channels),
              "strides": [2] * (len(model.channels) - 1), "share_encoders": model.share_encoders,
              "fusion_levels": None if model.fusion_levels is None else list(model.fusion_levels),
              "gate": model.gate, "temperature": model.temperature}
    return config | {name: list(getattr(model, name)) for name in ("kernel_sizes", "subunits")
                     if getattr(model, name) is not None}


def build_seg_model(model: TemplateSegModelConfig, num_classes: int) -> nn.Module:
    """The network ``model`` describes: logits ``(B, num_classes + 1, H, W)`` from ``(B, 1, H, W)``."""
    def template_net() -> TemplateSegNet:
        return TemplateSegNet(**template_seg_config(model, num_classes))

    if model.kind == "template_seg":
        return template_net()
    with torch.device("meta"):  # only counted
        target = count_parameters(template_net())
    return unet_baseline(2, 1, num_classes + 1, target, num_levels=len(model.channels))
