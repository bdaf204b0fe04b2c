"""CT volumes as the 2-D slices a segmenter takes, and its predicted slices back on the volume's own grid.

The same for training, evaluation and inference, so all three see identical input:

1. reorient to LPS axial (:func:`ctzoo.io.reorient_lps`: axes permuted/flipped only);
2. resample every axial slice in-plane to ``spacing_mm`` (bilinear, anti-aliased when shrinking; z kept);
3. pad (with air, -1024 HU) or crop, centred, to ``size``;
4. window ``window_hu`` onto [0, 1], clipped (MONAI ``ScaleIntensityRange``).

Labels follow the same path with nearest-neighbour resampling (pixel centres aligned, ``nearest-exact``);
:func:`slices_to_volume_labels` undoes every step to put predicted labels on the volume's own grid.

The canvas is the field of view: ``size`` x ``spacing_mm`` (128 x 128 px at 3 mm: 384 mm, centred on the slice).
Anatomy outside it is not segmented; :func:`cropped_body_warning` says so for a volume whose body (HU > -500) it
cuts.

Steps 2 and 3 never hold more than the volume or the canvas: where resampling whole slices would (a volume far
wider than the canvas at coarse spacing, which steps 2 and 3 then mostly crop away), only the part that lands
inside the canvas is computed, the same values (bilinear and nearest-exact as ``torch.nn.functional.interpolate``
computes them) without the rest.
:class:`SegPreprocessing` is what a segmentation bundle's card records and the exported graph expects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import Resize, ScaleIntensityRange
from pydantic import Field

from ctzoo.config import StrictConfig
from ctzoo.io import Volume, reorient_lps

AIR_HU = -1024.0
#: Voxels above this are body, not air (the field-of-view check, :func:`cropped_body_warning`).
BODY_HU = -500.0

class SegPreprocessing(StrictConfig):
    """How CT volumes become 2-D network input (and how predictions go back)."""

    spacing_mm: float = Field(2.0, gt=0, description="in-plane target spacing (mm/px); z is kept")
    size: tuple[int, int] = Field((256, 256), description="(H, W) after centred pad/crop; divisible by the "
                                                          "network's total stride")
    window_hu: tuple[float, float] = Field((-200.0, 400.0), description="HU mapped to [0, 1], clipped")


@dataclass(frozen=True)
class SliceGeometry:
    """Everything needed to map network slices back onto the volume they came from.

    ``slice[z, y + offset[0], x + offset[1]] = resampled[z, y, x]`` (negative offsets: cropped), and ``resampled``
    is the LPS-reoriented volume's slices resized from ``lps_shape[1:]`` to ``resampled_hw``.
    """

    lps_shape: tuple[int, int, int]  # (Z, Y, X) of the LPS-reoriented volume
    lps_spacing: tuple[float, float, float]  # (x, y, z) mm, ITK index order
    lps_origin: tuple[float, float, float]
    lps_direction: tuple[float, ...]  # 9 numbers, row-major
    resampled_hw: tuple[int, int]
    offset: tuple[int, int]  # (top, left) of the resampled slice inside the network slice
    size: tuple[int, int]  # (H, W) of the network slice

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel spacing (z, row, column) in mm of the network slices: exact, not the rounded target."""
        z, y, x = self.lps_shape
        return (self.lps_spacing[2], y * self.lps_spacing[1] / self.resampled_hw[0],
                x * self.lps_spacing[0] / self.resampled_hw[1])


def _place(array: torch.Tensor, size: Sequence[int], offset: Sequence[int], fill: float) -> torch.Tensor:
    """``(..., h, w)`` into a ``(..., *size)`` canvas of ``fill`` at ``offset`` (top, left; may be negative): pad
    and crop in one step, so the same function also undoes itself with ``-offset``."""
    canvas = array.new_full((*array.shape[:-2], *size), fill)
    src, dst = [], []
    for length, target, shift in zip(array.shape[-2:], size, offset):
        start, stop = max(0, -shift), min(length, target - shift)  # source range that lands inside
        if stop <= start:
            return canvas
        src.append(slice(start, stop))
        dst.append(slice(start + shift, stop + shift))
    canvas[..., dst[0], dst[1]] = array[..., src[0], src[1]]
    return canvas


def _resize_labels(labels: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resize of ``(Z, h, w)`` integer labels with pixel centres aligned (``nearest-exact``)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    resized = F.interpolate(labels[None].float(), size=tuple(size), mode="nearest-exact")[0]
    return resized.round().to(labels.dtype)


def _whole_slices_fit(resampled_hw: Sequence[int], source_hw: Sequence[int], size: Sequence[int]) -> bool:
    """Whether slices resampled whole to ``resampled_hw`` hold no more than the source slices or the canvas."""
    return resampled_hw[0] * resampled_hw[1] <= max(source_hw[0] * source_hw[1], size[0] * size[1])


def _kept(length: int, target: int, shift: int) -> tuple[int, int]:
    """The range of a resampled axis of ``length`` that lands inside a canvas axis of ``target`` at ``shift``."""
    start = max(0, -shift)
    return start, max(start, min(length, target - shift))


def _resize(images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """MONAI's bilinear resize of ``(Z, h, w)``, anti-aliased when shrinking (what training saw)."""
    shrinking = size[0] < images.shape[1] or size[1] < images.shape[2]
    resized = Resize(tuple(size), mode="bilinear", anti_aliasing=shrinking)(images)
    return resized.as_tensor() if isinstance(resized, MetaTensor) else torch.as_tensor(resized)


def _linear_part(images: torch.Tensor, axis: int, length: int, start: int, stop: int) -> torch.Tensor:
    """Elements ``start:stop`` along ``axis`` of ``images`` resized to ``length`` there by linear interpolation
    (``interpolate``'s, ``align_corners=False``), without computing the others."""
    size = images.shape[axis]
    source = ((torch.arange(start, stop, dtype=torch.float64, device=images.device) + 0.5) * (size / length)
              - 0.5).clamp(min=0)
    low = source.floor().long().clamp(max=size - 1)
    high = (low + 1).clamp(max=size - 1)
    shape = [1] * images.ndim
    shape[axis] = -1
    weight = (source - low).to(images.dtype).view(shape)
    return images.index_select(axis, low) * (1 - weight) + images.index_select(axis, high) * weight


def _nearest_sources(size: int, length: int, start: int, stop: int, device=None) -> torch.Tensor:
    """Source indices of elements ``start:stop`` of an axis of ``size`` resized to ``length`` (``nearest-exact``)."""
    scale = float(np.float32(size / length))
    indices = torch.arange(start, stop, dtype=torch.float64, device=device)
    return ((indices + 0.5) * scale).floor().long().clamp(max=size - 1)


def _resampled_part(hu: torch.Tensor, resampled_hw: Sequence[int], offset: Sequence[int],
                    size: Sequence[int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """The part of ``hu`` ``(Z, h, w)`` resampled to ``resampled_hw`` that lands inside a ``size`` canvas at
    ``offset``, and where it lands: an axis that shrinks is resized whole (anti-aliased, no larger than the source),
    an axis that grows only over the kept range."""
    shrunk = tuple(min(n, m) for n, m in zip(resampled_hw, hu.shape[1:]))
    if shrunk != tuple(hu.shape[1:]):
        hu = _resize(hu, shrunk)
    placed = []
    for axis, (length, target, shift) in enumerate(zip(resampled_hw, size, offset), start=1):
        start, stop = _kept(length, target, shift)
        if hu.shape[axis] == length:
            hu = hu.narrow(axis, start, stop - start)
        else:
            hu = _linear_part(hu, axis, length, start, stop)
        placed.append(shift + start)
    return hu, (placed[0], placed[1])


def resample_slices(volume: Volume, prep: SegPreprocessing,
                    device: str | None = None) -> tuple[torch.Tensor, SliceGeometry]:
    """Steps 1-3 of the module docstring: ``volume`` -> HU slices ``(Z, H, W)`` float32 (air outside) and geometry.

    Separate from windowing so that HU-level perturbations (robustness tests) can act in between. ``device``: where
    the resampling runs and the slices are (None: the CPU).
    """
    lps = reorient_lps(volume)
    depth, rows, cols = lps.array.shape
    sx, sy = lps.spacing[:2]
    hw = (max(1, round(rows * sy / prep.spacing_mm)), max(1, round(cols * sx / prep.spacing_mm)))
    hu = torch.from_numpy(np.ascontiguousarray(lps.array, dtype=np.float32)).to(device)  # slices act as channels
    offset = ((prep.size[0] - hw[0]) // 2, (prep.size[1] - hw[1]) // 2)
    placed = offset
    if not _whole_slices_fit(hw, (rows, cols), prep.size):
        hu, placed = _resampled_part(hu, hw, offset, prep.size)
    elif hw != (rows, cols):
        hu = _resize(hu, hw)
    geometry = SliceGeometry((depth, rows, cols), tuple(lps.spacing), tuple(float(v) for v in lps.origin),
                             tuple(float(v) for v in np.ravel(lps.direction)), hw, offset, tuple(prep.size))
    return _place(hu.float(), prep.size, placed, AIR_HU), geometry


def window_slices(hu: torch.Tensor, prep: SegPreprocessing) -> torch.Tensor:
    """Step 4: HU slices ``(Z, H, W)`` -> network input ``(Z, 1, H, W)`` in [0, 1]."""
    low, high = prep.window_hu
    return torch.as_tensor(ScaleIntensityRange(low, high, 0.0, 1.0, clip=True)(hu[:, None]), dtype=torch.float32)


def volume_to_slices(volume: Volume, prep: SegPreprocessing,
                     device: str | None = None) -> tuple[torch.Tensor, SliceGeometry]:
    """CT ``volume`` -> network slices ``(Z, 1, H, W)`` float32 in [0, 1] (LPS axial, slice 0 inferior) + geometry,
    computed on ``device`` (None: the CPU)."""
    hu, geometry = resample_slices(volume, prep, device)
    return window_slices(hu, prep), geometry


def labels_to_slices(labels: np.ndarray, volume: Volume, geometry: SliceGeometry) -> torch.Tensor:
    """Label map ``(Z, Y, X)`` on ``volume``'s own grid -> ``(Z, H, W)`` int64 on the network slices of
    ``geometry`` (nearest neighbour; background outside the volume)."""
    labels = np.asarray(labels)
    if labels.shape != volume.array.shape:
        raise ValueError(f"labels shape {labels.shape} does not match the volume's {volume.array.shape}")
    if volume.orientation != "LPS":  # float32 holds label ids exactly; DICOMOrient only permutes and flips
        labels = reorient_lps(volume.with_array(labels.astype(np.float32))).array
    if labels.shape != geometry.lps_shape:
        raise ValueError(f"reoriented labels {labels.shape} do not match the geometry's {geometry.lps_shape}")
    labels = torch.from_numpy(np.rint(labels).astype(np.int64))
    hw, size, offset = geometry.resampled_hw, geometry.size, geometry.offset
    if _whole_slices_fit(hw, geometry.lps_shape[1:], size):
        return _place(_resize_labels(labels, hw), size, offset, 0)
    (top, bottom), (left, right) = (_kept(n, m, shift) for n, m, shift in zip(hw, size, offset))
    rows = _nearest_sources(labels.shape[1], hw[0], top, bottom)
    columns = _nearest_sources(labels.shape[2], hw[1], left, right)
    return _place(labels[:, rows][:, :, columns], size, (offset[0] + top, offset[1] + left), 0)


def slices_to_volume_labels(predicted: np.ndarray | torch.Tensor, geometry: SliceGeometry,
                            volume: Volume) -> np.ndarray:
    """Labels ``(Z, H, W)`` on the network slices -> uint8 ``(Z, Y, X)`` on ``volume``'s grid as stored.

    Undoes the crop/pad (cropped-away voxels become background), the in-plane resampling (nearest) and the
    reorientation (nearest resampling onto the stored grid, which only permutes and flips).
    """
    predicted = torch.as_tensor(np.asarray(predicted) if not isinstance(predicted, torch.Tensor) else predicted)
    if tuple(predicted.shape[1:]) != geometry.size or predicted.shape[0] != geometry.lps_shape[0]:
        raise ValueError(f"predicted labels {tuple(predicted.shape)} do not match the geometry "
                         f"({geometry.lps_shape[0]}, {geometry.size[0]}, {geometry.size[1]})")
    lps = _labels_on_lps_grid(predicted.to(torch.int64), geometry).numpy().astype(np.uint8)
    if volume.orientation == "LPS":
        return lps
    image = sitk.GetImageFromArray(lps)
    image.SetSpacing(geometry.lps_spacing)
    image.SetOrigin(geometry.lps_origin)
    image.SetDirection(geometry.lps_direction)
    back = sitk.Resample(image, volume.size, sitk.Transform(), sitk.sitkNearestNeighbor, volume.origin,
                         volume.spacing, tuple(volume.direction.ravel()), 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(back)


def _canvas_mask(geometry: SliceGeometry) -> torch.Tensor:
    """``(Y, X)`` bool on the LPS grid: which of its pixels land inside the canvas (as :func:`_labels_on_lps_grid`
    maps them back)."""
    hw, size, offset, lps_hw = geometry.resampled_hw, geometry.size, geometry.offset, geometry.lps_shape[1:]
    rows = _nearest_sources(hw[0], lps_hw[0], 0, lps_hw[0]) + offset[0]
    columns = _nearest_sources(hw[1], lps_hw[1], 0, lps_hw[1]) + offset[1]
    return ((rows >= 0) & (rows < size[0]))[:, None] & ((columns >= 0) & (columns < size[1]))[None, :]


def cropped_body_warning(volume: Volume, geometry: SliceGeometry) -> str | None:
    """A warning for the volume's results when the canvas of ``geometry`` (:func:`resample_slices` of ``volume``)
    cut off body voxels (HU > :data:`BODY_HU`): how many, and the field of view, since the labels there are
    background because the model never saw them, not because nothing is there. None when nothing was cut."""
    hw, size, offset = geometry.resampled_hw, geometry.size, geometry.offset
    if all(0 <= o and o + n <= m for o, n, m in zip(offset, hw, size)):
        return None  # the whole slice fits: the common case costs nothing
    outside = ~_canvas_mask(geometry).numpy()
    cut = int((reorient_lps(volume).array[:, outside] > BODY_HU).sum())
    if cut == 0:
        return None
    z, y, x = geometry.lps_shape
    field = [n * s for n, s in zip(size, geometry.spacing_zyx[1:])]
    extent = [y * geometry.lps_spacing[1], x * geometry.lps_spacing[0]]
    return (f"field of view: the model sees {field[0]:.0f} x {field[1]:.0f} mm of each slice ({size[0]} x {size[1]} "
            f"px, centred), the slices are {extent[0]:.0f} x {extent[1]:.0f} mm; {cut} voxels of body or table (HU > "
            f"{BODY_HU:g}, {cut * volume.voxel_volume_mm3 / 1000:.0f} mL) outside it are not segmented (background)")


def _labels_on_lps_grid(predicted: torch.Tensor, geometry: SliceGeometry) -> torch.Tensor:
    """Labels ``(Z, H, W)`` on the network slices -> ``(Z, Y, X)`` on the LPS grid: the crop/pad and the in-plane
    resampling undone (nearest; background where the canvas cropped the slice away)."""
    hw, size, offset, lps_hw = geometry.resampled_hw, geometry.size, geometry.offset, geometry.lps_shape[1:]
    if _whole_slices_fit(hw, lps_hw, size):
        return _resize_labels(_place(predicted, hw, [-o for o in offset], 0), lps_hw)
    # each grid pixel's canvas pixel, looked up directly: the resampled slices are never built
    rows = _nearest_sources(hw[0], lps_hw[0], 0, lps_hw[0]) + offset[0]
    columns = _nearest_sources(hw[1], lps_hw[1], 0, lps_hw[1]) + offset[1]
    found = predicted[:, rows.clamp(0, size[0] - 1)][:, :, columns.clamp(0, size[1] - 1)]
    return found * _canvas_mask(geometry)


# ----------------------------------------------------------------------------------------------- class maps


