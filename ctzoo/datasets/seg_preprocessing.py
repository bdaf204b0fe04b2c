"""CT volumes as the 2-D slices a segmenter takes, and its predicted slices back on the volume's own grid.

The same for training, evaluation and inference, so all three see identical input:

1. reorient to LPS axial (:func:`ctzoo.io.reorient_lps`: axes permuted/flipped only);
2. resample every axial slice in-plane to ``spacing_mm`` (bilinear, anti-aliased when shrinking; z kept);
3. pad (with air, -1024 HU) or crop, centred, to ``size``;
4. window ``window_hu`` onto [0, 1], clipped (MONAI ``ScaleIntensityRange``).

Labels follow the same path with nearest-neighbour resampling (pixel centres aligned, ``nearest-exact``);
:func:`slices_to_volume_labels` undoes every step to put predicted labels on the volume's own grid.
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
    if hw != (rows, cols):
        hu = Resize(hw, mode="bilinear", anti_aliasing=hw[0] < rows or hw[1] < cols)(hu)
        hu = hu.as_tensor() if isinstance(hu, MetaTensor) else torch.as_tensor(hu)
    offset = ((prep.size[0] - hw[0]) // 2, (prep.size[1] - hw[1]) // 2)
    geometry = SliceGeometry((depth, rows, cols), tuple(lps.spacing), tuple(float(v) for v in lps.origin),
                             tuple(float(v) for v in np.ravel(lps.direction)), hw, offset, tuple(prep.size))
    return _place(hu.float(), prep.size, offset, AIR_HU), geometry


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
    resized = _resize_labels(torch.from_numpy(np.rint(labels).astype(np.int64)), geometry.resampled_hw)
    return _place(resized, geometry.size, geometry.offset, 0)


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
    resampled = _place(predicted.to(torch.int64), geometry.resampled_hw, [-o for o in geometry.offset], 0)
    lps = _resize_labels(resampled, geometry.lps_shape[1:]).numpy().astype(np.uint8)
    if volume.orientation == "LPS":
        return lps
    image = sitk.GetImageFromArray(lps)
    image.SetSpacing(geometry.lps_spacing)
    image.SetOrigin(geometry.lps_origin)
    image.SetDirection(geometry.lps_direction)
    back = sitk.Resample(image, volume.size, sitk.Transform(), sitk.sitkNearestNeighbor, volume.origin,
                         volume.spacing, tuple(volume.direction.ravel()), 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(back)


# ----------------------------------------------------------------------------------------------- class maps


