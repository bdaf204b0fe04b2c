"""RECIST-Net's training augmentation in two halves: drawn per sample in the loader, applied per batch on the
training device (``augment: {resample_on: device}``).

Why: in the loader mode (:func:`~ctzoo.datasets.keypoint_transforms.recist_train_transforms`) each worker resamples
every sample's 9 planes once per spatial transform (flip, rotation, zoom, each a full MONAI resample). On an H200 the
light model then waited for its data: 7 workers delivered about 190 slices/s against about 500 the GPU took
(docs/benchmarks.md). Here a worker does no interpolation at all:

* :class:`RandWindowd` draws the sample's flip, rotation, zoom, crop centre and intensity change (the same
  probabilities and ranges as the loader mode), cuts a fixed-size window of the slice around the crop (a copy,
  zero outside the slice), and moves the keypoints, boxes and diameters exactly (a few points);
* :func:`augment_batch`, in the training step, resamples the whole batch at once on the device, one bilinear
  ``torch.nn.functional.grid_sample`` for the composed geometry, then applies the intensity changes.

The two modes draw from the same distributions but not the same numbers, and this one interpolates once instead
of up to twice (slightly sharper); a sample is not the loader mode's sample pixel for pixel. The geometry about
the crop: output pixel ``p_o`` (x, y) shows slice pixel ``p_s = t + L (p_o - c_o)``, with ``L = rotation(angle) /
zoom * flip``, ``c_o`` the output's centre and ``t`` the crop's centre on the slice (a lesion's centre plus a jitter
of up to ``jitter`` of the crop's size with probability ``lesion_prob``, else uniform; kept on the slice like
:class:`~ctzoo.datasets.keypoint_transforms.RandLesionCropd`). A lesion is kept when its centre is on the output.
Draws are seeded per item, as every random transform of the training loader is
(:mod:`ctzoo.training.epoch_loader`); the noise is drawn on the device from a seed drawn in the loader, so a run
resumes bit for bit on the same device.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform, Randomizable
from monai.utils import MAX_SEED

from ctzoo.datasets.deeplesion.recist import CENTRE, DEEPLESION_BOX_PAD, box_from_points, canonical_order, diameters
from ctzoo.datasets.keypoint_transforms import (
    INTENSITY_PROBS,
    NOISE_STD,
    SCALE_FACTOR,
    SHIFT_OFFSET,
    points_inside,
    select_lesions,
)

__all__ = ["BATCH_AUGMENT_KEYS", "RandWindowd", "augment_batch", "recist_batch_train_transforms", "window_size"]

#: What :class:`RandWindowd` adds to a sample for :func:`augment_batch`: the (3, 3) float64 map from output pixel
#: (x, y, 1) to window pixel, the (3,) float32 intensity change (factor, offset, noise sigma) and the noise's seed.
BATCH_AUGMENT_KEYS = ("grid_affine", "intensity", "noise_seed")


def window_size(out_size: Sequence[int], rotate_range_deg: float, scale_range: Sequence[float]) -> tuple[int, int]:
    """(H, W) of the slice window that holds every slice pixel an ``out_size`` (H, W) output can show, at any
    rotation up to ``rotate_range_deg`` and any zoom in ``scale_range``, plus 2 pixels each side for rounding
    and bilinear neighbours. Each side keeps the parity of ``out_size`` (so an unrotated, unzoomed sample is a
    plain copy of the slice)."""
    height, width = (int(v) for v in out_size)
    angles = np.radians(np.linspace(0.0, min(float(rotate_range_deg), 90.0), 181))
    cos, sin = np.cos(angles), np.sin(angles)
    smallest = min(float(v) for v in scale_range)
    half_w = float(np.max(cos * width + sin * height)) / 2 / smallest
    half_h = float(np.max(sin * width + cos * height)) / 2 / smallest
    return (height + 2 * max(math.ceil(half_h - height / 2), 0) + 4,
            width + 2 * max(math.ceil(half_w - width / 2), 0) + 4)


def _translation(xy: np.ndarray) -> np.ndarray:
    matrix = np.eye(3)
    matrix[:2, 2] = xy
    return matrix


class RandWindowd(MapTransform, Randomizable):
    """The loader's half: draw one sample's augmentation, cut its window, move its keypoints.

    In: ``image`` (C, H, W) (MetaTensor or tensor, 0 = background), ``keypoints`` (N, 5, 2) pixel (x, y),
    optionally ``boxes``, ``diameters_px``, ``scale`` (loaded px per original px) and per-lesion ``lesion_keys``.
    Out: ``image`` (C, *window_size) float32 tensor (the slice around the crop, zero outside it); ``keypoints``
    (M, 5, 2) in the *output* frame (``out_size``), canonical pair order, M lesions whose centre is on it;
    ``boxes`` (M, 4) (DeepLesion's pad of 5 original pixels, times ``scale`` and the zoom) and ``diameters_px``
    recomputed; ``lesion_keys`` cut to the same M; and :data:`BATCH_AUGMENT_KEYS`.
    """

    def __init__(self, out_size: Sequence[int], flip_prob: float = 0.5, rotate_range_deg: float = 15.0,
                 scale_range: Sequence[float] = (0.8, 1.2), intensity: bool = True, rotate_prob: float = 0.5,
                 zoom_prob: float = 0.5, lesion_prob: float = 0.7, jitter: float = 0.35,
                 image_key: str = "image", keypoints_key: str = "keypoints", lesion_keys: Sequence[str] = (),
                 box_pad: float = DEEPLESION_BOX_PAD) -> None:
        MapTransform.__init__(self, [image_key])
        self.out_size = tuple(int(v) for v in out_size)
        self.window = window_size(self.out_size, rotate_range_deg, scale_range)
        self.flip_prob, self.rotate_prob, self.zoom_prob = flip_prob, rotate_prob, zoom_prob
        self.max_angle, self.scale_range = math.radians(rotate_range_deg), tuple(float(v) for v in scale_range)
        self.intensity, self.lesion_prob, self.jitter = intensity, lesion_prob, jitter
        self.image_key, self.keypoints_key, self.box_pad = image_key, keypoints_key, box_pad
        self.lesion_keys = tuple(k for k in lesion_keys if k not in (keypoints_key, "boxes", "diameters_px"))

    def _linear(self) -> tuple[np.ndarray, float]:
        """L (2 x 2, output step -> slice step, x/y) and the zoom, drawn in the loader mode's order."""
        flip = self.R.rand() < self.flip_prob
        angle = self.R.uniform(-self.max_angle, self.max_angle) if self.R.rand() < self.rotate_prob else 0.0
        zoom = self.R.uniform(*self.scale_range) if self.R.rand() < self.zoom_prob else 1.0
        cos, sin = math.cos(angle), math.sin(angle)
        linear = np.array([[cos, -sin], [sin, cos]]) / zoom @ np.diag([-1.0 if flip else 1.0, 1.0])
        return linear, zoom

    def _crop_centre(self, centres: np.ndarray, linear: np.ndarray, slice_xy: np.ndarray) -> np.ndarray:
        """t: the slice point at the output's centre, (x, y), kept so the output stays on the slice if it fits."""
        roi = np.array(self.out_size[::-1], dtype=np.float64)  # (W, H)
        half = np.abs(linear) @ roi / 2  # half the box around the output's footprint on the slice
        low, high = np.minimum(half, (slice_xy - 1) / 2), np.maximum(slice_xy - 1 - half, (slice_xy - 1) / 2)
        if self.R.rand() < self.lesion_prob and len(centres):
            target = centres[int(self.R.choice(len(centres)))] + linear @ (self.R.uniform(-1, 1, 2) * self.jitter * roi)
        else:
            target = low + self.R.uniform(0, 1, 2) * (high - low)
        return np.clip(target, low, high)

    def _intensity(self) -> tuple[list[float], int]:
        factor = offset = sigma = 0.0
        seed = 0
        if self.intensity:
            if self.R.rand() < INTENSITY_PROBS["scale"]:
                factor = self.R.uniform(-SCALE_FACTOR, SCALE_FACTOR)
            if self.R.rand() < INTENSITY_PROBS["shift"]:
                offset = self.R.uniform(-SHIFT_OFFSET, SHIFT_OFFSET)
            if self.R.rand() < INTENSITY_PROBS["noise"]:
                sigma, seed = self.R.uniform(0, NOISE_STD), int(self.R.randint(MAX_SEED))
        return [1.0 + factor, offset, sigma], seed

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        image = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
        points = np.asarray(d[self.keypoints_key], dtype=np.float64).reshape(-1, 5, 2)
        slice_xy = np.array(image.shape[-1:-3:-1], dtype=np.float64)  # (W, H)
        linear, zoom = self._linear()
        target = self._crop_centre(points[:, CENTRE], linear, slice_xy)
        window_xy = np.array(self.window[::-1], dtype=np.float64)
        centre_w, centre_o = (window_xy - 1) / 2, (np.array(self.out_size[::-1], dtype=np.float64) - 1) / 2
        origin = np.round(target - centre_w).astype(int)  # the window's top left on the slice
        target = origin + centre_w  # the window is a plain copy: its origin is a whole pixel
        (height, width), (x0, y0) = image.shape[-2:], (int(v) for v in origin)
        d[self.image_key] = F.pad(image.float(), (-x0, x0 + self.window[1] - width, -y0, y0 + self.window[0] - height))
        # output -> window: p_w = c_w + L (p_o - c_o); the keypoints go the other way, exactly
        to_window = _translation(centre_w) @ np.block([[linear, np.zeros((2, 1))], [0, 0, 1]]) @ _translation(-centre_o)
        moved = centre_o + (points - target) @ np.linalg.inv(linear).T
        keep = points_inside(moved[:, CENTRE], *self.out_size)
        moved = canonical_order(moved)[keep]  # a flip or rotation can swap which end is left
        d[self.keypoints_key] = torch.as_tensor(moved, dtype=torch.float32).reshape(-1, 5, 2)
        if "boxes" in d:
            pad = self.box_pad * float(d.get("scale", 1.0)) * zoom
            d["boxes"] = torch.as_tensor(box_from_points(moved, pad), dtype=torch.float32).reshape(-1, 4)
        if "diameters_px" in d:
            d["diameters_px"] = torch.as_tensor(diameters(moved)[0], dtype=torch.float32).reshape(-1, 2)
        for key in self.lesion_keys:
            if key in d:
                d[key] = select_lesions(d[key], keep)
        intensity, seed = self._intensity()
        d.update(grid_affine=torch.as_tensor(to_window, dtype=torch.float64),
                 intensity=torch.tensor(intensity, dtype=torch.float32), noise_seed=seed)
        return d


def _pixel_to_normalised(size_hw: Sequence[int]) -> torch.Tensor:
    """(3, 3): pixel (x, y) -> grid_sample's [-1, 1] coordinates with ``align_corners=True`` (pixel centres)."""
    height, width = size_hw
    return torch.tensor([[2 / max(width - 1, 1), 0, -1], [0, 2 / max(height - 1, 1), -1], [0, 0, 1]],
                        dtype=torch.float64)


def augment_batch(batch: Mapping[str, Any], out_size: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """The device's half: the batch's windows -> (B, C, *out_size) float32 augmented images on ``device``.

    ``batch``: collated samples of :class:`RandWindowd` (``image`` (B, C, Hw, Ww); :data:`BATCH_AUGMENT_KEYS` as
    lists). One bilinear resample of the batch (zeros outside the slice), then ``image * factor + offset`` and
    Gaussian noise where drawn, as the loader mode's MONAI intensity transforms do.
    """
    windows = batch["image"].to(device, torch.float32)
    count, channels = windows.shape[:2]
    to_window = torch.stack([torch.as_tensor(a, dtype=torch.float64) for a in batch["grid_affine"]])
    theta = _pixel_to_normalised(windows.shape[-2:]) @ to_window @ torch.linalg.inv(_pixel_to_normalised(out_size))
    with torch.autocast(windows.device.type, enabled=False):  # geometry in float32 under AMP too
        grid = F.affine_grid(theta[:, :2].to(windows), [count, channels, *out_size], align_corners=True)
        images = F.grid_sample(windows, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        intensity = torch.stack([torch.as_tensor(v) for v in batch["intensity"]])
        on_device = intensity.to(images)
        images = images * on_device[:, 0, None, None, None] + on_device[:, 1, None, None, None]
        for k, (sigma, seed) in enumerate(zip(intensity[:, 2].tolist(), batch["noise_seed"])):
            if sigma > 0:
                generator = torch.Generator(images.device).manual_seed(int(seed))
                images[k] += sigma * torch.randn(images.shape[1:], generator=generator, device=images.device)
    return images


def recist_batch_train_transforms(spatial_size: Sequence[int], flip_prob: float = 0.5,
                                  rotate_range_deg: float = 15.0, scale_range: Sequence[float] = (0.8, 1.2),
                                  intensity: bool = True, lesion_keys: Sequence[str] = (),
                                  seed: int | None = None) -> Compose:
    """The loader's half of ``augment: {resample_on: device}``, as a ``Compose`` (which the training loader seeds
    per item); :func:`augment_batch` with ``spatial_size`` is the device's half."""
    pipeline = Compose([RandWindowd(spatial_size, flip_prob, rotate_range_deg, scale_range, intensity,
                                    lesion_keys=lesion_keys)])
    if seed is not None:
        pipeline.set_random_state(seed=seed)
    return pipeline
