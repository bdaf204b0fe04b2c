"""RECIST-Net: a lesion detector that finds the five RECIST keypoints (CenterNet ``exdet`` style).

The network predicts, at ``1 / down_ratio`` of the input resolution, five keypoint heatmaps in the order of
:data:`ctzoo.datasets.deeplesion.recist.POINT_NAMES` (long_a, long_b, short_a, short_b, centre), a
sub-pixel offset (dx, dy) for each of them, and, at each centre, the displacement to the four end points
(CenterNet's ``multi_pose`` regression). Turning those maps into lesions is
:func:`ctzoo.models.recist_grouping.group_keypoints` (:meth:`RecistNet.detect` calls it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.nets.resnet import ResNet
from torch import nn

from ctzoo.models.recist_grouping import NUM_ENDPOINTS, NUM_POINTS, group_keypoints

#: CenterNet initialises the heatmap bias to -log((1 - 0.1) / 0.1) so that training starts at p = 0.1
#: everywhere instead of 0.5: otherwise the many negatives dominate the first steps of the focal loss.
HEATMAP_PRIOR_BIAS = -2.19
#: Strides of the four feature levels both backbones produce; the output level is ``down_ratio``.
LEVEL_STRIDES = (4, 8, 16, 32)


def _groups(channels: int) -> int:
    """GroupNorm groups: 8 where the channels allow it (GroupNorm, not BatchNorm, since CPU batches are tiny)."""
    return math.gcd(8, channels)


def _conv_block(in_channels: int, out_channels: int, strides: int = 1) -> Convolution:
    return Convolution(2, in_channels, out_channels, strides=strides, kernel_size=3, act="RELU",
                       norm=("group", {"num_groups": _groups(out_channels)}))


class LightEncoder(nn.Module):
    """A small residual encoder for CPU training: a strided stem, then one MONAI ``ResidualUnit`` per level.

    ``forward(x)``: x (B, C, H, W) -> four features at strides 4, 8, 16, 32 with
    ``channels = (width, 2 width, 3 width, 4 width)``.
    """

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.channels = (width, 2 * width, 3 * width, 4 * width)
        self.stem = _conv_block(in_channels, width, strides=2)
        stages, previous = [], width
        for channels in self.channels:
            stages.append(ResidualUnit(2, previous, channels, strides=2, kernel_size=3, subunits=2, act="RELU",
                                       norm=("group", {"num_groups": _groups(channels)})))
            previous = channels
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features, x = [], self.stem(x)
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class ResNet34Encoder(nn.Module):
    """MONAI's 2-D ResNet-34 (basic blocks 3-4-6-3, 7x7 stride-2 stem, max pool), randomly initialised.

    ``width`` is half the stem width, so ``width=32`` is the standard 64-128-256-512 ResNet-34.
    ``forward(x)``: x (B, C, H, W) -> the outputs of layer1..layer4, strides 4, 8, 16, 32.
    """

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.channels = (2 * width, 4 * width, 8 * width, 16 * width)
        self.net = ResNet("basic", [3, 4, 6, 3], list(self.channels), spatial_dims=2, n_input_channels=in_channels,
                          conv1_t_size=7, conv1_t_stride=2, feed_forward=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        net = self.net
        x = net.maxpool(net.act(net.bn1(net.conv1(x))))
        features = []
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            x = layer(x)
            features.append(x)
        return features


class TopDownDecoder(nn.Module):
    """FPN top-down path from stride 32 to ``out_stride``: 1x1 laterals, nearest x2 upsampling, sum, 3x3 conv.

    ``forward(features)``: four maps at strides 4..32 -> (B, channels, H / out_stride, W / out_stride).
    """

    def __init__(self, in_channels: tuple[int, ...], channels: int, out_stride: int) -> None:
        super().__init__()
        self.first = LEVEL_STRIDES.index(out_stride)
        self.laterals = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels[self.first:])
        self.smooth = _conv_block(channels, channels)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        used = features[self.first:]
        x = self.laterals[-1](used[-1])
        for feature, lateral in zip(used[-2::-1], list(self.laterals)[-2::-1]):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest") + lateral(feature)
        return self.smooth(x)


def _head(in_channels: int, head_channels: int, out_channels: int, bias: float | None = None) -> nn.Sequential:
    """CenterNet head: 3x3 conv + ReLU + 1x1 conv (no norm: the outputs are logits/offsets)."""
    last = nn.Conv2d(head_channels, out_channels, 1)
    if bias is not None:
        nn.init.constant_(last.bias, bias)
    return nn.Sequential(nn.Conv2d(in_channels, head_channels, 3, padding=1), nn.ReLU(inplace=True), last)


class RecistNet(nn.Module):
    """RECIST-Net: five keypoint heatmaps and their sub-pixel offsets at stride ``down_ratio``.

    Args:
        in_channels: input channels (context slices; 3 for 3DCE-style 2.5D input).
        backbone: ``"light"`` (a ~0.8 M-parameter residual encoder + FPN for CPUs) or ``"resnet34_fpn"``
            (MONAI ResNet-34 + FPN, ~22 M parameters, for GPUs; no pretrained weights).
        width: base width. light: level channels (w, 2w, 3w, 4w), decoder 2w. resnet34_fpn: ResNet stem
            2w (w=32 is the standard ResNet-34), decoder 4w.
        head_channels: hidden channels of each output head.
        down_ratio: output stride, one of 4, 8, 16, 32.

    ``forward(x)``: x (B, in_channels, H, W), H and W multiples of 32 ->
    ``{"heatmaps": (B, 5, H/R, W/R) logits, "offsets": (B, 10, H/R, W/R), "displacements": (B, 8, H/R, W/R)}``;
    offset channels are (dx, dy) of long_a, then of long_b, short_a, short_b, centre, in heatmap cells;
    displacement channels are (dx, dy) from a centre's cell to long_a, long_b, short_a, short_b, in cells.
    """

    def __init__(self, in_channels: int = 3, backbone: str = "light", width: int = 32, head_channels: int = 64,
                 down_ratio: int = 4) -> None:
        super().__init__()
        if down_ratio not in LEVEL_STRIDES:
            raise ValueError(f"down_ratio must be one of {LEVEL_STRIDES}, got {down_ratio}")
        if backbone == "light":
            self.encoder: nn.Module = LightEncoder(in_channels, width)
            feature_channels = 2 * width
        elif backbone == "resnet34_fpn":
            self.encoder = ResNet34Encoder(in_channels, width)
            feature_channels = 4 * width
        else:
            raise ValueError(f"unknown backbone {backbone!r}: use 'light' or 'resnet34_fpn'")
        self.backbone, self.down_ratio = backbone, down_ratio
        self.decoder = TopDownDecoder(self.encoder.channels, feature_channels, down_ratio)
        self.heatmap_head = _head(feature_channels, head_channels, NUM_POINTS, bias=HEATMAP_PRIOR_BIAS)
        self.offset_head = _head(feature_channels, head_channels, 2 * NUM_POINTS)
        self.displacement_head = _head(feature_channels, head_channels, 2 * NUM_ENDPOINTS)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.feature_map(x))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's features ``(B, F, H/R, W/R)`` the heads read (F: 2w light, 4w resnet34_fpn)."""
        if isinstance(x, MetaTensor):  # a type check, not data-dependent: plain tensors keep the graph lean
            x = x.as_tensor()
        return self.decoder(self.encoder(x))

    def heads(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`forward`'s outputs from :meth:`feature_map`'s features (one pass serves both)."""
        return {"heatmaps": self.heatmap_head(features), "offsets": self.offset_head(features),
                "displacements": self.displacement_head(features)}

    @torch.no_grad()
    def detect(self, x: torch.Tensor, max_lesions: int = 20, top_k: int = 24, score_threshold: float = 0.05,
               decode: str = "both") -> list[dict[str, torch.Tensor]]:
        """Eval-mode inference and grouping on x (B, in_channels, H, W).

        Returns one dict per image: ``points`` (M, 5, 2) float32 input-pixel (x, y), ``scores`` (M,) descending,
        ``boxes`` (M, 4) tight [x1, y1, x2, y2] of the four end points. The module's train/eval mode is restored.
        ``decode`` picks the candidates (:data:`ctzoo.models.recist_grouping.DECODE_MODES`).
        """
        was_training = self.training
        self.eval()
        try:
            outputs = self(x)
        finally:
            self.train(was_training)
        return self.group(outputs, max_lesions, top_k, score_threshold, decode)

    def group(self, outputs: dict[str, torch.Tensor], max_lesions: int = 20, top_k: int = 24,
              score_threshold: float = 0.05, decode: str = "both") -> list[dict[str, torch.Tensor]]:
        """:meth:`detect`'s grouping of already computed ``outputs`` (one forward pass, several decodings)."""
        grouped = group_keypoints(outputs["heatmaps"].float(), outputs["offsets"].float(), self.down_ratio,
                                  max_lesions=max_lesions, top_k=top_k, score_threshold=score_threshold,
                                  displacements=outputs["displacements"].float(), decode=decode)
        return [{"points": grouped["points"][b][keep], "scores": grouped["scores"][b][keep],
                 "boxes": grouped["boxes"][b][keep]} for b, keep in enumerate(grouped["valid"])]


def pool_box_features(features: torch.Tensor, boxes: torch.Tensor, down_ratio: int) -> torch.Tensor:
    """Each box's pooled lesion feature: the mean of ``features`` (F, h, w) over the heatmap cells its
    ``boxes`` (N, 4) input-pixel [x1, y1, x2, y2] cover, clipped to the map (at least one cell) -> (N, F).

    Box pooling rather than the centre cell alone: a lesion's descriptor should hold its extent and edge,
    as MULAN's and LesaNet's ROI features do."""
    _, height, width = features.shape
    pooled = []
    for x1, y1, x2, y2 in boxes.tolist():
        left = min(max(int(math.floor(x1 / down_ratio)), 0), width - 1)
        top = min(max(int(math.floor(y1 / down_ratio)), 0), height - 1)
        right = max(min(int(math.ceil(x2 / down_ratio)), width), left + 1)
        bottom = max(min(int(math.ceil(y2 / down_ratio)), height), top + 1)
        pooled.append(features[:, top:bottom, left:right].mean(dim=(1, 2)))
    return torch.stack(pooled) if pooled else features.new_zeros((0, features.shape[0]))


# ----------------------------------------------------------------------------------------------- decoding
