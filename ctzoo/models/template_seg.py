"""Template segmenter: a U-Net with a second (Siamese) encoder for a labelled template and cosine-prototype fusion.

After "Learning Shape Priors by Pairwise Comparison for Robust Semantic Segmentation" (Xie et al., arXiv
2204.11090). Only the abstract is known: an image encoder reads the target image; a template encoder reads a
template image concatenated with its foreground regions; a cosine-similarity attention module fuses the two
for each foreground class; a decoder produces the segmentation. Everything below the abstract is **our
choice**, not the paper's (see ``/work/shared/papers/template-segmenter-recistnet-deeplesion.md`` section 1):

* Inputs. Target image ``(B, in_channels, *S)``; template ``(B, in_channels + num_classes, *S_t)``, i.e. the
  template image followed by one binary (or soft) mask per foreground class. ``S_t`` need not equal ``S``: the
  template only enters through per-class prototype vectors, so any template size divisible by ``prod(strides)``
  works, and a template batch of 1 broadcasts over an image batch.
* Encoders. Both have the same U-Net encoder shape: a 3x3 stem convolution to ``channels[0]`` then one MONAI
  ``ResidualUnit`` per level (level 0 at full resolution, level ``k`` at stride ``prod(strides[:k])``; the last
  level is the bottleneck). Instance norm, because CPU batches are tiny. ``share_encoders=True`` shares every
  weight except the stem (whose input channel count differs); ``False`` keeps two separate encoders.
* Fusion (:class:`CosinePrototypeAttention`, at every level in ``fusion_levels``). Class masks are brought to
  the level's resolution by adaptive average pooling, i.e. the fraction of each cell the class covers: unlike
  nearest/bilinear resizing it never drops a small structure at coarse levels, and it is exactly the weight a
  masked average wants. Prototype ``p_c`` = masked average of template features; similarity
  ``a_c(x) = cos(F_i(x), p_c)``; gate ``g = sigmoid(temperature * max_c a_c)`` (or none); output
  ``conv1x1(concat[F_i * (1 + g), a_1..a_C])`` with ``F`` channels. ``1 + g`` (residual attention) can only
  amplify template-like regions, never erase features, so a poorly matching template cannot blind the network.
* Decoder. UNet-like: transposed-conv upsampling, concat with the fused skip, one residual unit; a 1x1 head
  gives logits ``(B, num_classes + 1, *S)`` (channel 0 = background).

:func:`unet_baseline` builds a MONAI ``UNet`` of the same parameter budget for a fair comparison.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.nets import UNet
from torch import nn

NORM = "instance"
ACT = "PRELU"  # MONAI UNet's default activation
EPS = 1e-6


def downsample_masks(masks: torch.Tensor, spatial_size: Sequence[int]) -> torch.Tensor:
    """Area-average masks ``(B, C, *S)`` to ``(B, C, *spatial_size)``: each cell gets the fraction a class covers.

    Adaptive average pooling keeps every class that is present at full resolution present (positive mass) at
    every level, which nearest or bilinear resizing does not guarantee for small structures.
    """
    if tuple(masks.shape[2:]) == tuple(spatial_size):
        return masks
    pool = F.adaptive_avg_pool3d if masks.ndim == 5 else F.adaptive_avg_pool2d
    return pool(masks, tuple(spatial_size))


def masked_prototypes(features: torch.Tensor, masks: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Per-class masked average of features: features ``(B, F, *s)``, masks ``(B, C, *s)`` -> ``(B, C, F)``.

    ``p[b, c] = sum_x M[b, c, x] F[b, :, x] / (sum_x M[b, c, x] + eps)``; a class with an empty mask gets the zero
    vector (no NaN).
    """
    if features.shape[0] != masks.shape[0] or features.shape[2:] != masks.shape[2:]:
        raise ValueError(f"features {tuple(features.shape)} and masks {tuple(masks.shape)} must share batch and "
                         "spatial size")
    weights = masks.flatten(2).to(features.dtype)  # (B, C, N)
    sums = weights @ features.flatten(2).transpose(1, 2)  # (B, C, F)
    return sums / (weights.sum(-1, keepdim=True) + eps)


def cosine_similarity_maps(features: torch.Tensor, prototypes: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Cosine of every feature vector to every prototype: ``(B, F, *s)``, ``(B|1, C, F)`` -> ``(B, C, *s)``."""
    unit_features = F.normalize(features.flatten(2), dim=1, eps=eps)  # (B, F, N)
    unit_prototypes = F.normalize(prototypes, dim=-1, eps=eps)  # (B|1, C, F)
    similarity = unit_prototypes @ unit_features  # matmul broadcasts a single stored template over the batch
    return similarity.reshape(*similarity.shape[:2], *features.shape[2:])


def presence_maps(present: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Class presence ``(B|1, C)`` shaped to broadcast over per-class ``maps`` ``(B, C, *s)``: ``(B|1, C, 1, ...)``."""
    return present.reshape(*present.shape, *[1] * (maps.ndim - 2))


# The helpers above read tensor shapes in Python; torch.fx (ctzoo place) keeps each as one call, not traced into.
for _helper in ("downsample_masks", "masked_prototypes", "cosine_similarity_maps", "presence_maps"):
    torch.fx.wrap(_helper)
del _helper


def sigmoid_gate(features: torch.Tensor, similarity: torch.Tensor, present: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """Residual attention ``F * (1 + sigmoid(temperature * max_c a_c))``: ``(B, F, *s)``, maps ``(B, C, *s)``,
    presence ``(B|1, C)`` -> ``(B, F, *s)``."""
    # Absent classes must not win the max with their zero map: give them the lowest cosine, -1.
    absent = ~presence_maps(present, similarity)
    best = similarity.masked_fill(absent, -1.0).amax(dim=1, keepdim=True)  # (B, 1, *s)
    return features * (1 + torch.sigmoid(temperature * best))


class CosinePrototypeAttention(nn.Module):
    """Fuse image features with per-class template prototypes by cosine similarity.

    ``forward(image_features, template_features, masks)``: ``(B, F, *s)``, ``(B, F, *s_t)``, ``(B, C, *S_t)`` (masks
    at any resolution; area-pooled to ``s_t``) -> ``(B, F, *s)``. :meth:`attend` does the same from precomputed
    prototypes ``(B|1, C, F)`` and presence flags ``(B|1, C)``; :meth:`similarity` returns the maps ``(B, C, *s)``.

    Args:
        spatial_dims: 2 or 3.
        channels: feature channels ``F``.
        num_classes: foreground classes ``C``.
        gate: ``"sigmoid"``: scale features by ``1 + sigmoid(temperature * max_c a_c)``; ``"none"``: only
            concatenate the similarity maps.
        temperature: sharpness of the sigmoid gate (cosines lie in [-1, 1], so 10 spans ~(0, 1)).
    """

    def __init__(self, spatial_dims: int, channels: int, num_classes: int,
                 gate: Literal["sigmoid", "none"] = "sigmoid", temperature: float = 10.0) -> None:
        super().__init__()
        if gate not in ("sigmoid", "none"):
            raise ValueError(f"gate must be 'sigmoid' or 'none', got {gate!r}")
        self.gate, self.temperature = gate, temperature
        # Linear 1x1 projection back to F channels: the decoder block that reads it normalises and activates.
        self.project = Convolution(spatial_dims, channels + num_classes, channels, kernel_size=1, conv_only=True)

    @staticmethod
    def prototypes(template_features: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, F, *s_t)``, ``(B, C, *S_t)`` -> prototypes ``(B, C, F)`` and presence ``(B, C)`` (mask mass > 0)."""
        masks = downsample_masks(masks, template_features.shape[2:])
        return masked_prototypes(template_features, masks), masks.flatten(2).sum(-1) > 0

    def similarity(self, image_features: torch.Tensor, prototypes: torch.Tensor,
                   present: torch.Tensor) -> torch.Tensor:
        """``(B, F, *s)``, ``(B|1, C, F)``, ``(B|1, C)`` -> ``(B, C, *s)``; maps of absent classes are exactly 0."""
        similarity = cosine_similarity_maps(image_features, prototypes)
        return similarity * presence_maps(present, similarity).to(similarity.dtype)

    def attend(self, image_features: torch.Tensor, prototypes: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``(B, F, *s)``, ``(B|1, C, F)``, ``(B|1, C)`` -> fused ``(B, F, *s)``."""
        similarity = self.similarity(image_features, prototypes, present)
        gated = sigmoid_gate(image_features, similarity, present, self.temperature) if self.gate == "sigmoid" \
            else image_features
        return self.project(torch.cat([gated, similarity], dim=1))

    def forward(self, image_features: torch.Tensor, template_features: torch.Tensor,
                masks: torch.Tensor) -> torch.Tensor:
        return self.attend(image_features, *self.prototypes(template_features, masks))


class UNetEncoder(nn.Module):
    """Stem convolution + one ``ResidualUnit`` per level; ``forward(x)``: ``(B, in, *S)`` -> list of
    ``(B, channels[k], *S / prod(strides[:k]))`` for ``k = 0 .. len(channels) - 1``.

    Pass another encoder's ``levels`` to share all weights but the stem (a Siamese pair with different inputs).
    ``kernel_sizes`` and ``subunits`` give each level's convolution kernel and number of convolutions (default 3
    and 2 everywhere; the architecture search, :mod:`ctzoo.nas`, varies them).
    """

    def __init__(self, spatial_dims: int, in_channels: int, channels: Sequence[int], strides: Sequence[int],
                 levels: nn.ModuleList | None = None, kernel_sizes: Sequence[int] | None = None,
                 subunits: Sequence[int] | None = None) -> None:
        super().__init__()
        self.stem = Convolution(spatial_dims, in_channels, channels[0], kernel_size=3, norm=NORM, act=ACT)
        if levels is None:
            inputs, level_strides = [channels[0], *channels[:-1]], [1, *strides]
            kernel_sizes = kernel_sizes or [3] * len(channels)
            subunits = subunits or [2] * len(channels)
            levels = nn.ModuleList(
                ResidualUnit(spatial_dims, c_in, c_out, strides=s, kernel_size=k, subunits=n, norm=NORM, act=ACT)
                for c_in, c_out, s, k, n in zip(inputs, channels, level_strides, kernel_sizes, subunits))
        self.levels = levels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features, x = [], self.stem(x)
        for level in self.levels:
            x = level(x)
            features.append(x)
        return features


class TemplateEncoding(NamedTuple):
    """A template encoded once for reuse: per-level prototypes ``(B, C, F_k)`` and class presence ``(B, C)``."""

    prototypes: tuple[torch.Tensor, ...]
    present: torch.Tensor


class TemplateSegNet(nn.Module):
    """Siamese-encoder U-Net segmenting an image given a labelled template (see the module docstring).

    ``forward(image, template)``: ``(B, in_channels, *S)``, ``(B|1, in_channels + num_classes, *S_t)`` -> logits
    ``(B, num_classes + 1, *S)``. Each spatial size must be divisible by ``prod(strides)``.

    Args:
        spatial_dims: 2 (slices) or 3 (patches).
        in_channels: image channels.
        num_classes: foreground classes (template mask channels); the output adds a background channel.
        channels: feature widths per encoder level; the last level is the bottleneck.
        strides: downsampling between consecutive levels (``len(channels) - 1`` entries).
        share_encoders: share all encoder weights except the stems.
        fusion_levels: encoder levels fused with the template (default: all, bottleneck included); the other
            levels pass image features unchanged.
        gate: ``"sigmoid"`` or ``"none"``, see :class:`CosinePrototypeAttention`.
        temperature: sigmoid gate sharpness.
        kernel_sizes: convolution kernel per encoder level (default 3; the stem and decoder always use 3).
        subunits: convolutions per encoder level's residual unit (default 2).
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, num_classes: int = 5,
                 channels: Sequence[int] = (16, 32, 64, 128), strides: Sequence[int] = (2, 2, 2),
                 share_encoders: bool = True, fusion_levels: Sequence[int] | None = None,
                 gate: Literal["sigmoid", "none"] = "sigmoid", temperature: float = 10.0,
                 kernel_sizes: Sequence[int] | None = None, subunits: Sequence[int] | None = None) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(strides) != len(channels) - 1:
            raise ValueError(f"need len(strides) == len(channels) - 1, got channels={channels}, strides={strides}")
        levels = range(len(channels))
        fusion_levels = list(levels if fusion_levels is None else fusion_levels)
        if any(k not in levels for k in fusion_levels):
            raise ValueError(f"fusion_levels {fusion_levels} must lie in 0..{len(channels) - 1}")
        for name, values in (("kernel_sizes", kernel_sizes), ("subunits", subunits)):
            if values is not None and len(values) != len(channels):
                raise ValueError(f"need one {name} entry per level ({len(channels)}), got {values}")
        self.spatial_dims, self.in_channels, self.num_classes = spatial_dims, in_channels, num_classes
        self.channels, self.strides = tuple(channels), tuple(strides)
        self.size_divisor = math.prod(strides)
        self.image_encoder = UNetEncoder(spatial_dims, in_channels, channels, strides, None, kernel_sizes, subunits)
        self.template_encoder = UNetEncoder(spatial_dims, in_channels + num_classes, channels, strides,
                                            self.image_encoder.levels if share_encoders else None, kernel_sizes,
                                            subunits)
        self.fusion = nn.ModuleDict({
            str(k): CosinePrototypeAttention(spatial_dims, channels[k], num_classes, gate, temperature)
            for k in sorted(set(fusion_levels))})
        self.up = nn.ModuleList(
            Convolution(spatial_dims, channels[k], channels[k - 1], strides=strides[k - 1], kernel_size=3,
                        is_transposed=True, norm=NORM, act=ACT) for k in range(len(channels) - 1, 0, -1))
        self.decode = nn.ModuleList(
            ResidualUnit(spatial_dims, 2 * channels[k - 1], channels[k - 1], kernel_size=3, subunits=1,
                         norm=NORM, act=ACT) for k in range(len(channels) - 1, 0, -1))
        self.head = Convolution(spatial_dims, channels[0], num_classes + 1, kernel_size=1, conv_only=True)

    def _check(self, x: torch.Tensor, name: str, channels: int) -> None:
        if isinstance(x, torch.fx.Proxy):  # symbolic tracing (ctzoo place): no shapes to check yet
            return
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != channels:
            raise ValueError(f"{name} must have shape (B, {channels}, {', '.join('*' * self.spatial_dims)}) "
                             f"for spatial_dims={self.spatial_dims}, got {tuple(x.shape)}")
        size = tuple(x.shape[2:])
        if any(s % self.size_divisor for s in size):
            raise ValueError(f"{name} spatial size {size} must be divisible by {self.size_divisor} "
                             f"(= prod(strides={self.strides}))")

    def encode_template(self, template: torch.Tensor) -> TemplateEncoding:
        """``(B, in_channels + num_classes, *S_t)`` -> :class:`TemplateEncoding`; compute once, reuse across images."""
        self._check(template, "template", self.in_channels + self.num_classes)
        masks = template[:, self.in_channels:]
        pairs = [CosinePrototypeAttention.prototypes(f, masks) for f in self.template_encoder(template)]
        # Presence from the full-resolution masks; area pooling keeps it the same at every level.
        return TemplateEncoding(tuple(p for p, _ in pairs), masks.flatten(2).sum(-1) > 0)

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, *S)`` -> ``(B, channels[-1])``: mean bottleneck features, for template retrieval."""
        self._check(image, "image", self.in_channels)
        return self.image_encoder(image)[-1].flatten(2).mean(-1)

    def forward(self, image: torch.Tensor, template: torch.Tensor | None = None,
                template_encoding: TemplateEncoding | None = None) -> torch.Tensor:
        """``(B, in_channels, *S)`` and a template (or its :meth:`encode_template`) -> ``(B, num_classes + 1, *S)``."""
        if (template is None) == (template_encoding is None):
            raise ValueError("pass exactly one of template and template_encoding")
        self._check(image, "image", self.in_channels)
        features = self.image_encoder(image)
        if not self.fusion:  # nothing reads the template: do not encode it
            if template is not None:
                self._check(template, "template", self.in_channels + self.num_classes)
            return self._decode(features)
        encoding = template_encoding if template_encoding is not None else self.encode_template(template)
        for key, fuse in self.fusion.items():
            k = int(key)
            features[k] = fuse.attend(features[k], encoding.prototypes[k], encoding.present)
        return self._decode(features)

    def _decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The (fused) encoder features per level -> logits ``(B, num_classes + 1, *S)``."""
        x = features[-1]
        for up, decode, skip in zip(self.up, self.decode, reversed(features[:-1])):
            x = decode(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def count_parameters(module: nn.Module) -> int:
    """Number of distinct parameters (shared ones counted once)."""
    return sum(p.numel() for p in module.parameters())


def unet_baseline(spatial_dims: int, in_channels: int, out_channels: int, target_parameters: int,
                  num_levels: int = 4, num_res_units: int = 2, tolerance: float = 0.1,
                  max_width: int = 512) -> UNet:
    """A MONAI ``UNet`` with widths ``(w, 2w, 4w, ...)`` and strides 2 whose parameter count is closest to
    ``target_parameters`` (for a same-budget comparison with :class:`TemplateSegNet`).

    The count grows monotonically with the base width ``w``, so ``w`` is found by bisection; candidates are built
    on the meta device (no memory). Raises ``ValueError`` if no width lands within ``tolerance`` (relative).
    ``forward``: ``(B, in_channels, *S)`` -> ``(B, out_channels, *S)``, ``S`` divisible by ``2 ** (num_levels - 1)``.
    """

    def build(width: int) -> UNet:
        return UNet(spatial_dims, in_channels, out_channels, channels=[width * 2**k for k in range(num_levels)],
                    strides=[2] * (num_levels - 1), num_res_units=num_res_units, norm=NORM)

    def count(width: int) -> int:
        with torch.device("meta"):
            return count_parameters(build(width))

    low, high = 1, max_width  # invariant after the loop: count(low) < target <= count(high), or an end
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if count(middle) < target_parameters else (low, middle)
    width = min((low, high), key=lambda w: abs(count(w) - target_parameters))
    error = abs(count(width) - target_parameters) / target_parameters
    if error > tolerance:
        raise ValueError(f"no base width in 1..{max_width} gives a UNet within {tolerance:.0%} of "
                         f"{target_parameters} parameters (best: width {width}, {count(width)} parameters)")
    return build(width)
