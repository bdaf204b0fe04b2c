"""Organ segmentation data: CT volumes as 2-D network slices and back, label maps, and labelled cases.

Preprocessing (the same for training, evaluation and inference, so all three see identical input):

1. reorient to LPS axial (:func:`ctzoo.inference.recist_volume.reorient_lps`: axes permuted/flipped only);
2. resample every axial slice in-plane to ``spacing_mm`` (bilinear, anti-aliased when shrinking; z kept);
3. pad (with air, -1024 HU) or crop, centred, to ``size``;
4. window ``window_hu`` onto [0, 1], clipped (MONAI ``ScaleIntensityRange``).

Labels follow the same path with nearest-neighbour resampling (pixel centres aligned, ``nearest-exact``);
:func:`slices_to_volume_labels` undoes every step to put predicted labels on the volume's own grid.

Cases (:class:`SegCase`): the TotalSegmentator sample volumes (:func:`totalsegmentator_cases`) and any folder in
the Medical Segmentation Decathlon layout (:func:`msd_cases`). Class sets map source label names to our classes
(:func:`map_labels`; 0 = background, 1..C in class order). The training-slice dataset lives in
:mod:`ctzoo.datasets.segmentation_slices`.
"""

from __future__ import annotations

import fnmatch
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import Resize, ScaleIntensityRange
from pydantic import Field

from ctzoo.config import StrictConfig
from ctzoo.datasets import samples
from ctzoo.io import Volume, read_volume, reorient_lps, volume_to_sitk

AIR_HU = -1024.0

#: Abdominal organs labelled in every TotalSegmentator sample volume; values are source-name patterns (fnmatch).
ABDOMEN_CLASSES: dict[str, tuple[str, ...]] = {
    "liver": ("liver",),
    "spleen": ("spleen",),
    "stomach": ("stomach",),
    "aorta": ("aorta",),
    "vertebrae": ("vertebrae_*",),  # T11, T12, L1, L2 ... merged into one class
}


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


def resample_slices(volume: Volume, prep: SegPreprocessing) -> tuple[torch.Tensor, SliceGeometry]:
    """Steps 1-3 of the module docstring: ``volume`` -> HU slices ``(Z, H, W)`` float32 (air outside) and geometry.

    Separate from windowing so that HU-level perturbations (robustness tests) can act in between.
    """
    lps = reorient_lps(volume)
    depth, rows, cols = lps.array.shape
    sx, sy = lps.spacing[:2]
    hw = (max(1, round(rows * sy / prep.spacing_mm)), max(1, round(cols * sx / prep.spacing_mm)))
    hu = torch.from_numpy(np.ascontiguousarray(lps.array, dtype=np.float32))  # slices act as channels
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


def volume_to_slices(volume: Volume, prep: SegPreprocessing) -> tuple[torch.Tensor, SliceGeometry]:
    """CT ``volume`` -> network slices ``(Z, 1, H, W)`` float32 in [0, 1] (LPS axial, slice 0 inferior) + geometry."""
    hu, geometry = resample_slices(volume, prep)
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


def map_labels(labels: np.ndarray, source_names: Mapping[int, str],
               classes: Mapping[str, Sequence[str]]) -> np.ndarray:
    """Source label map -> uint8 map with 0 = background and ``k`` = the k-th class of ``classes`` (1-based).

    ``classes`` maps our class name to source-name patterns (``fnmatch``: ``"vertebrae_*"`` matches every
    vertebra); a source label matching no class becomes background. Raises ``ValueError`` for a class that
    matches no source name (a typo must not silently train an empty class) or a label matching two classes.
    """
    if len(classes) > 255:
        raise ValueError(f"at most 255 classes fit in uint8, got {len(classes)}")
    labels = np.asarray(labels)
    top = max([int(labels.max(initial=0)), *source_names])
    table = np.zeros(top + 1, np.uint8)
    owner: dict[int, str] = {}
    for k, (name, patterns) in enumerate(classes.items(), start=1):
        ids = [i for i, source in source_names.items() if any(fnmatch.fnmatchcase(source, p) for p in patterns)]
        if not ids:
            raise ValueError(f"class {name!r}: no source label matches {list(patterns)}")
        for i in ids:
            if i in owner:
                raise ValueError(f"source label {i} ({source_names[i]!r}) matches classes {owner[i]!r} and {name!r}")
            owner[i] = name
            table[i] = k
    if labels.min(initial=0) < 0:
        raise ValueError("label maps must not hold negative values")
    return table[labels.astype(np.int64)]


# ----------------------------------------------------------------------------------------------------- cases


@dataclass
class SegCase:
    """One labelled volume: ``labels`` (Z, Y, X) uint8 on ``image``'s grid, 0 = background, 1..C classes."""

    name: str
    image: Volume
    labels: np.ndarray

    def __post_init__(self) -> None:
        if np.shape(self.labels) != self.image.array.shape:
            raise ValueError(f"{self.name}: labels {np.shape(self.labels)} and image {self.image.array.shape} "
                             "must share the voxel grid")


def _lps_slab(volume: Volume, start: int, stop: int) -> Volume:
    """Slices ``start:stop`` of an LPS volume, origin moved to the first one (DICOM identity dropped: the slab is
    no longer the series)."""
    origin = volume.index_to_lps(np.array([0.0, 0.0, float(start)]))
    return replace(volume, array=volume.array[start:stop], origin=tuple(origin), dicom=None,
                   warnings=list(volume.warnings))


def split_slab(case: SegCase, held_out: int, end: Literal["superior", "inferior"] = "superior"
               ) -> tuple[SegCase, SegCase]:
    """Split ``case`` along the body axis into (rest, slab of ``held_out`` slices at ``end``), both LPS.

    For validation on a volume that is also trained on: the slab is never trained on, and being contiguous at
    one end it does not share slices with the rest (neighbouring slices are nearly identical).
    """
    image = reorient_lps(case.image)
    labels = case.labels if case.image.orientation == "LPS" else np.rint(
        reorient_lps(case.image.with_array(case.labels.astype(np.float32))).array).astype(np.uint8)
    depth = image.array.shape[0]
    if not 0 < held_out < depth:
        raise ValueError(f"{case.name}: cannot hold out {held_out} of {depth} slices")
    cut = depth - held_out if end == "superior" else held_out  # LPS: slice index grows towards superior
    parts = [(0, cut), (cut, depth)]
    rest, slab = parts if end == "superior" else parts[::-1]
    return tuple(SegCase(f"{case.name}[{a}:{b}]", _lps_slab(image, a, b), labels[a:b]) for a, b in (rest, slab))


def label_names(cache: Path | None = None) -> dict[int, str]:
    """TotalSegmentator 'total' label names (id -> name) fetched with the samples."""
    path = samples.sample_path(samples.LABELS_FILE, cache)
    return {int(k): v for k, v in json.loads(path.read_text()).items()}


def resample_labels_onto(labels: Volume, reference: Volume) -> np.ndarray:
    """A label volume moved onto ``reference``'s grid by nearest neighbour (exact when the voxel centres coincide,
    e.g. the LAS label file of the LPS DICOM sample); uint8 (Z, Y, X)."""
    moved = sitk.Resample(volume_to_sitk(labels), volume_to_sitk(reference), sitk.Transform(),
                          sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(moved)


def totalsegmentator_cases(classes: Mapping[str, Sequence[str]] = ABDOMEN_CLASSES,
                           cache: Path | None = None) -> dict[str, list[SegCase]]:
    """The labelled TotalSegmentator sample volumes (``ctzoo data fetch-samples``) as cases.

    ``{"train": [example_ct_sm (30 slices, 3 mm)], "test": [the embedded DICOM sample (20 slices, 0.98 mm, another
    patient)]}``. There is no "val" entry: hold a slab of the training volume out with :func:`split_slab`
    (the training task does: its superior 8 slices).
    """
    names = label_names(cache)
    image = read_volume(samples.sample_path("example_ct_sm.nii.gz", cache))
    seg = read_volume(samples.sample_path("example_seg.nii.gz", cache), dtype=None)
    with warnings.catch_warnings():  # the embedded sample's repaired UIDs are reported by ctzoo info, not here
        warnings.simplefilter("ignore")
        dicom = read_volume(samples.sample_ct_dicom(), progress=False)
    dicom_seg = read_volume(samples.sample_path("example_seg_dicom.nii.gz", cache), dtype=None)
    return {"train": [SegCase("example_ct_sm", image, map_labels(seg.array, names, classes))],
            "test": [SegCase("sample_ct_dicom", dicom,
                             map_labels(resample_labels_onto(dicom_seg, dicom), names, classes))]}


# ----------------------------------------------------------------------------------- Medical Segmentation Decathlon


class DatasetError(ValueError):
    """A dataset folder that cannot be used; the message names the file and the entry."""


def _msd_label_names(raw: object, path: Path) -> dict[int, str]:
    """``{"0": "background", "1": "liver"}`` (MSD) or ``{"background": 0, "liver": 1}`` (nnU-Net v2) -> id -> name."""
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{path}: 'labels' must be a non-empty mapping, got {raw!r}")
    try:
        if all(isinstance(v, str) for v in raw.values()):
            names = {int(k): v for k, v in raw.items()}
        else:
            names = {int(v): str(k) for k, v in raw.items()}
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{path}: 'labels' must map ids to names (MSD) or names to integer ids (nnU-Net v2), "
                           f"got {raw!r}") from exc
    if 0 not in names or len(names) < 2:
        raise DatasetError(f"{path}: 'labels' needs background 0 and at least one class, got {raw!r}")
    return names


def _msd_entry_path(root: Path, entry: object, key: str, where: str) -> Path:
    if not isinstance(entry, dict) or not isinstance(entry.get(key), str):
        raise DatasetError(f"{where}: needs a '{key}' path, got {entry!r}")
    path = (root / entry[key]).resolve()
    if not path.exists():
        raise DatasetError(f"{where}: {key} file {path} does not exist")
    return path


def read_msd_index(root: Path) -> tuple[dict[int, str], list[tuple[Path, Path]]]:
    """``root/dataset.json`` -> (label names id -> name, [(image, label) paths in listed order]), all checked."""
    path = Path(root) / "dataset.json"
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(index, dict) or "labels" not in index or "training" not in index:
        raise DatasetError(f"{path}: needs 'labels' and 'training' entries (Medical Segmentation Decathlon layout)")
    names = _msd_label_names(index["labels"], path)
    if not isinstance(index["training"], list) or not index["training"]:
        raise DatasetError(f"{path}: 'training' must be a non-empty list of {{'image': ..., 'label': ...}}")
    pairs = []
    for i, entry in enumerate(index["training"]):
        where = f"{path}: training[{i}]"
        pairs.append((_msd_entry_path(path.parent, entry, "image", where),
                      _msd_entry_path(path.parent, entry, "label", where)))
    return names, pairs


def _split_sizes(count: int, val_fraction: float, test_fraction: float, where: Path) -> tuple[int, int, int]:
    def part(fraction: float) -> int:
        return max(1, round(count * fraction)) if fraction > 0 else 0

    val, test = part(val_fraction), part(test_fraction)
    if count - val - test < 1:
        raise DatasetError(f"{where}: {count} cases cannot give {val} val and {test} test cases and still train")
    return count - val - test, val, test


def msd_cases(root: Path, classes: Mapping[str, Sequence[str]] | None = None, val_fraction: float = 0.2,
              test_fraction: float = 0.2) -> dict[str, list[SegCase]]:
    """Cases of a Medical Segmentation Decathlon folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``).

    ``classes`` maps our class names to dataset label-name patterns as in :func:`map_labels`; ``None`` keeps every
    non-background label as its own class, in id order. The split follows the order of ``training`` in
    ``dataset.json``: the first cases train, then ``val_fraction`` validate, the last ``test_fraction`` test
    (each at least one case when its fraction is > 0). Every volume is read into memory.
    """
    root = Path(root)
    names, pairs = read_msd_index(root)
    if classes is None:
        classes = {names[i]: (names[i],) for i in sorted(names) if i != 0}
    sizes = _split_sizes(len(pairs), val_fraction, test_fraction, root / "dataset.json")
    cases = []
    for i, (image_path, label_path) in enumerate(pairs):
        image = read_volume(image_path)
        labels = read_volume(label_path, dtype=None).array
        if labels.shape != image.array.shape:
            raise DatasetError(f"{root / 'dataset.json'}: training[{i}]: label {label_path.name} has shape "
                               f"{labels.shape}, image {image_path.name} {image.array.shape}")
        unknown = sorted(set(np.unique(labels).tolist()) - set(names))
        if unknown:
            raise DatasetError(f"{label_path}: label values {unknown} are not in dataset.json's 'labels'")
        name = image_path.name.removesuffix(".gz").removesuffix(".nii")
        cases.append(SegCase(name, image, map_labels(labels, names, classes)))
    bounds = np.cumsum([0, *sizes])
    return {split: cases[a:b] for split, a, b in zip(("train", "val", "test"), bounds[:-1], bounds[1:])}
