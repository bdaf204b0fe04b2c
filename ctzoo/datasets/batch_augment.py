"""RECIST-Net's training augmentation in two halves: drawn per sample in the loader, applied per batch on the
training device (``augment: {resample_on: device}``).

Why: in the loader mode (:func:`~ctzoo.datasets.keypoint_transforms.recist_train_transforms`) each worker resamples
a whole slice to 0.8 mm, windows it into 9 planes, then resamples those once per spatial transform (flip, rotation,
zoom, each a full MONAI resample). On an H200 the light model then waited for its data: 7 workers delivered about
190 slices/s against about 500 the GPU took; on 2 CPU cores the loading took half the model's rate
(docs/benchmarks.md). Here a worker does no interpolation at all:

* :class:`RandWindowd` draws the sample's flip, rotation, zoom, crop centre and intensity change (the same
  probabilities and ranges as the loader mode), copies the window of the slice's HU planes that this draw's output
  covers, at the slice's own pixel size (read from the slice store's memory map for that window alone: a third of
  the slice, zero beyond it), and moves the keypoints, boxes and diameters exactly (a few points);
* :func:`augment_batch`, in the training step, resamples the whole batch at once on the device, one bilinear
  ``torch.nn.functional.grid_sample`` for the spacing resample and the augmentation together, then windows the HU
  into the network's channels and applies the intensity changes in one pass per window (:func:`scaled_windows`).

The two modes draw from the same distributions but not the same numbers, and this one interpolates once instead
of two or three times (slightly sharper; a slice shrunk to 0.8 mm is not anti-aliased first, as a zoom never is;
windowing after the interpolation changes only pixels whose neighbours straddle a window's end); a sample is not
the loader mode's sample pixel for pixel. The geometry about the crop, in the resampled frame (0.8 mm pixels):
output pixel ``p_o`` (x, y) shows frame pixel ``p_s = t + L (p_o - c_o)``, which is image pixel
``(p_s + 0.5) / s - 0.5`` for the spacing resample's scale ``s``, with ``L = rotation(angle) / zoom * flip``,
``c_o`` the output's centre and ``t`` the crop's centre on the slice (a lesion's centre plus a jitter
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

from ctzoo.datasets.deeplesion.context import ContextPlanes
from ctzoo.datasets.deeplesion.dataset import SlicePreprocessing, below_windows_hu, paste
from ctzoo.datasets.deeplesion.recist import CENTRE, DEEPLESION_BOX_PAD, box_from_points, canonical_order, diameters
from ctzoo.datasets.keypoint_transforms import (
    INTENSITY_PROBS,
    NOISE_STD,
    SCALE_FACTOR,
    SHIFT_OFFSET,
    points_inside,
    select_lesions,
)

__all__ = ["BATCH_AUGMENT_KEYS", "RandWindowd", "augment_batch", "focus_box", "recist_batch_train_transforms",
           "scaled_windows"]

#: What :class:`RandWindowd` adds to a sample for :func:`augment_batch`: the (3, 3) float64 map from output pixel
#: (x, y, 1) to window pixel, the (3,) float32 intensity change (factor, offset, noise sigma) and the noise's seed.
BATCH_AUGMENT_KEYS = ("grid_affine", "intensity", "noise_seed")


def focus_box(focus_yx: Sequence[float], size_hw: Sequence[int], shape_hw: Sequence[int]) -> tuple[np.ndarray,
                                                                                                np.ndarray]:
    """(top left, size), (row, column) pixels, of the ``size_hw`` box around ``focus_yx`` kept on a ``shape_hw``
    slice (as MONAI's ``SpatialCrop`` with ``roi_center`` places it): where a mined hard negative's crop may fall."""
    shape = np.asarray(shape_hw, dtype=int)
    size = np.minimum(np.asarray(size_hw, dtype=int), shape)
    centre = np.clip(np.round(np.asarray(focus_yx, dtype=np.float64)), size // 2, shape - (size - size // 2))
    return centre.astype(int) - size // 2, size


def _translation(xy: np.ndarray) -> np.ndarray:
    matrix = np.eye(3)
    matrix[:2, 2] = xy
    return matrix


class RandWindowd(MapTransform, Randomizable):
    """The loader's half: draw one sample's augmentation, cut its window, move its keypoints.

    In: ``image`` (C, H, W) (MetaTensor or tensor, 0 = background), ``keypoints`` (N, 5, 2) pixel (x, y),
    optionally ``boxes``, ``diameters_px``, ``scale`` (loaded px per original px) and per-lesion ``lesion_keys``.
    With ``hu_fill`` (what :func:`recist_batch_train_transforms` sets from a :class:`SlicePreprocessing`),
    ``image`` holds HU planes at the original pixel size instead (a tensor, or :class:`ContextPlanes` read only
    where the window falls), the points stay in the resampled frame, and ``resampled_hw`` and ``scale_xy``
    (:class:`~ctzoo.datasets.deeplesion.dataset.LoadDeepLesiond` with ``resample=False``) map one to the other:
    the spacing resample joins the augmentation's, on the device. An item's ``focus`` ((row, column) in the
    frame; mined hard negatives) keeps the crop inside the ``focus_size`` box around it (:func:`focus_box`).
    Out: ``image`` (C, h, w) float32 tensor, the image's pixels under this draw's output with their bilinear
    neighbours (zero beyond the slice; with ``hu_fill``: HU - ``hu_fill``, so zero reads as below every window;
    its size follows the draw and the spacing, and the batch pads it right and bottom); ``keypoints``
    (M, 5, 2) in the *output* frame (``out_size``), canonical pair order, M lesions whose centre is on it;
    ``boxes`` (M, 4) (DeepLesion's pad of 5 original pixels, times ``scale`` and the zoom) and ``diameters_px``
    recomputed; ``lesion_keys`` cut to the same M; and :data:`BATCH_AUGMENT_KEYS`.
    """

    def __init__(self, out_size: Sequence[int], flip_prob: float = 0.5, rotate_range_deg: float = 15.0,
                 scale_range: Sequence[float] = (0.8, 1.2), intensity: bool = True, rotate_prob: float = 0.5,
                 zoom_prob: float = 0.5, lesion_prob: float = 0.7, jitter: float = 0.35,
                 image_key: str = "image", keypoints_key: str = "keypoints", lesion_keys: Sequence[str] = (),
                 box_pad: float = DEEPLESION_BOX_PAD, hu_fill: float | None = None,
                 focus_size: Sequence[int] | None = None) -> None:
        MapTransform.__init__(self, [image_key])
        self.out_size = tuple(int(v) for v in out_size)
        self.flip_prob, self.rotate_prob, self.zoom_prob = flip_prob, rotate_prob, zoom_prob
        self.max_angle, self.scale_range = math.radians(rotate_range_deg), tuple(float(v) for v in scale_range)
        self.intensity, self.lesion_prob, self.jitter = intensity, lesion_prob, jitter
        self.image_key, self.keypoints_key, self.box_pad = image_key, keypoints_key, box_pad
        self.lesion_keys = tuple(k for k in lesion_keys if k not in (keypoints_key, "boxes", "diameters_px"))
        self.hu_fill, self.focus_size = hu_fill, focus_size
        height, width = self.out_size
        self._corners = np.array([[x, y, 1.0] for x in (0, width - 1) for y in (0, height - 1)]).T  # (3, 4)

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

    def _cut(self, image: Any, first_xy: np.ndarray, size_xy: np.ndarray) -> torch.Tensor:
        """``image``'s pixels [first, first + size) (x, y) as a (C, h, w) float32 copy, zero beyond the slice (with
        ``hu_fill``: HU - hu_fill)."""
        (x0, y0), (width, height) = (int(v) for v in first_xy), (int(v) for v in size_xy)
        rows_in, columns_in = image.shape[-2:]
        top, left = min(max(y0, 0), rows_in), min(max(x0, 0), columns_in)
        rows, columns = slice(top, max(top, min(y0 + height, rows_in))), slice(left, max(left, min(x0 + width,
                                                                                                  columns_in)))
        if isinstance(image, ContextPlanes):
            part = torch.from_numpy(image.window(rows, columns))
        else:
            part = (image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image))[..., rows, columns]
        window = torch.empty((*part.shape[:-2], height, width), dtype=torch.float32)
        return paste(part.float(), window, top - y0, left - x0, 0.0 if self.hu_fill is None else self.hu_fill)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        points = np.asarray(d[self.keypoints_key], dtype=np.float64).reshape(-1, 5, 2)
        if self.hu_fill is None:  # the image is the frame
            frame_hw, scale_xy = tuple(image.shape[-2:]), np.ones(2)
        else:
            frame_hw, scale_xy = tuple(int(v) for v in d["resampled_hw"]), np.asarray(d["scale_xy"], np.float64)
        box_origin, box_xy = np.zeros(2), np.array(frame_hw[::-1], dtype=np.float64)  # (x, y), (W, H)
        focus = d.pop("focus", None)  # batches share their keys
        if focus is not None:
            if self.focus_size is None:
                raise ValueError("an item with a focus needs RandWindowd(focus_size=...)")
            start, size = focus_box(focus, self.focus_size, frame_hw)
            box_origin, box_xy = start[::-1].astype(np.float64), size[::-1].astype(np.float64)
        linear, zoom = self._linear()
        target = box_origin + self._crop_centre(points[:, CENTRE] - box_origin, linear, box_xy)
        centre_o = (np.array(self.out_size[::-1], dtype=np.float64) - 1) / 2
        target = np.round(target - centre_o) + centre_o  # unrotated and unzoomed, a whole-pixel shift: a plain copy
        # output -> frame: p = t + L (p_o - c_o); the frame's pixel p is the image's (p + 0.5) / s - 0.5 (pixel
        # centres, as MONAI's Resize). The keypoints go the other way, exactly.
        to_frame = _translation(target) @ np.block([[linear, np.zeros((2, 1))], [0, 0, 1]]) @ _translation(-centre_o)
        to_image = np.diag([*(1 / scale_xy), 1.0])
        to_image[:2, 2] = 0.5 / scale_xy - 0.5
        # the window: the image's pixels under this draw's output's corners, every bilinear neighbour included
        footprint = (to_image @ to_frame @ self._corners)[:2]
        first, last = np.floor(footprint.min(axis=1)).astype(int), np.ceil(footprint.max(axis=1)).astype(int)
        d[self.image_key] = self._cut(image, first, last - first + 1)
        to_window = _translation(-first) @ to_image @ to_frame
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


def augment_batch(batch: Mapping[str, Any], out_size: Sequence[int], device: torch.device | str,
                  preprocessing: SlicePreprocessing | None = None) -> torch.Tensor:
    """The device's half: the batch's windows -> (B, C, *out_size) float32 augmented images on ``device``.

    ``batch``: collated samples of :class:`RandWindowd` (``image`` (B, C, Hw, Ww); :data:`BATCH_AUGMENT_KEYS` as
    lists). One bilinear resample of the batch (zeros outside the slice), then, with ``preprocessing`` (windows
    of HU planes: ``hu_fill`` set), its windowing into ``preprocessing.in_channels`` channels, then
    ``image * factor + offset`` and Gaussian noise where drawn, as the loader mode's MONAI intensity transforms
    do. Windowing after the resample instead of before changes only pixels whose bilinear neighbours straddle a
    window's end.
    """
    windows = batch["image"].to(device, torch.float32)
    count, channels = windows.shape[:2]
    to_window = torch.stack([torch.as_tensor(a, dtype=torch.float64) for a in batch["grid_affine"]])
    theta = _pixel_to_normalised(windows.shape[-2:]) @ to_window @ torch.linalg.inv(_pixel_to_normalised(out_size))
    with torch.autocast(windows.device.type, enabled=False):  # geometry in float32 under AMP too
        grid = F.affine_grid(theta[:, :2].to(windows), [count, channels, *out_size], align_corners=True)
        images = F.grid_sample(windows, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        intensity = torch.stack([torch.as_tensor(v) for v in batch["intensity"]])
        factor, offset = intensity.to(images)[:, :2, None, None, None].unbind(1)
        if preprocessing is None:
            images = torch.addcmul(offset, images, factor)
        else:  # the windows hold HU - below_windows_hu: zero reads as below every window
            images = scaled_windows(images, preprocessing, below_windows_hu(preprocessing), factor, offset)
        for k, (sigma, seed) in enumerate(zip(intensity[:, 2].tolist(), batch["noise_seed"])):
            if sigma > 0:
                generator = torch.Generator(images.device).manual_seed(int(seed))
                images[k] += sigma * torch.randn(images.shape[1:], generator=generator, device=images.device)
    return images


def scaled_windows(planes: torch.Tensor, cfg: SlicePreprocessing, shift_hu: float, factor: torch.Tensor,
                   offset: torch.Tensor) -> torch.Tensor:
    """``window_planes(planes + shift_hu, cfg) * factor + offset`` for a batch: (B, S, H, W) -> (B, in_channels, H,
    W); ``factor`` and ``offset`` (B, 1, 1, 1). Two passes over each window's planes (a clamp, then one
    multiply-add) instead of MONAI's ``ScaleIntensityRange`` (five), a copy into the channels and the intensity
    change (two more): the training step pays for every pass. Tested equal to those."""
    b_low, b_high = cfg.output_range
    windows = (cfg.window_hu, *cfg.extra_windows_hu)
    count = planes.shape[1]
    out = planes.new_empty((planes.shape[0], len(windows) * count, *planes.shape[2:]))
    for i, (low, high) in enumerate(windows):
        gain = (b_high - b_low) / (high - low)  # clamping the input clips the output, as clip=True does
        low, high = low - shift_hu, high - shift_hu
        torch.addcmul(offset + factor * (b_low - low * gain), planes.clamp(low, high), factor * gain,
                      out=out[:, i * count:(i + 1) * count])
    return out


def recist_batch_train_transforms(spatial_size: Sequence[int], flip_prob: float = 0.5,
                                  rotate_range_deg: float = 15.0, scale_range: Sequence[float] = (0.8, 1.2),
                                  intensity: bool = True, lesion_keys: Sequence[str] = (),
                                  seed: int | None = None, preprocessing: SlicePreprocessing | None = None,
                                  focus_size: Sequence[int] | None = None) -> Compose:
    """The loader's half of ``augment: {resample_on: device}``, as a ``Compose`` (which the training loader seeds
    per item); :func:`augment_batch` with ``spatial_size`` (and the same ``preprocessing``) is the device's half.
    ``preprocessing``: the samples hold HU planes at the original pixel size, resampled to its spacing and
    windowed on the device."""
    hu_fill = None if preprocessing is None else below_windows_hu(preprocessing)
    pipeline = Compose([RandWindowd(spatial_size, flip_prob, rotate_range_deg, scale_range, intensity,
                                    lesion_keys=lesion_keys, hu_fill=hu_fill, focus_size=focus_size)])
    if seed is not None:
        pipeline.set_random_state(seed=seed)
    return pipeline
