"""Organ segmentation data: label maps and labelled cases. How a volume becomes the network's slices (and the
prediction goes back) is :mod:`ctzoo.datasets.seg_preprocessing`.

Cases (:class:`SegCase`): the TotalSegmentator sample volumes (:func:`totalsegmentator_cases`) and any folder in
the Medical Segmentation Decathlon layout (:func:`msd_cases`). Class sets map source label names to our classes
(:func:`map_labels`; 0 = background, 1..C in class order). The training-slice dataset lives in
:mod:`ctzoo.datasets.segmentation_slices`.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk

from ctzoo.datasets import samples
from ctzoo.datasets.seg_preprocessing import AIR_HU  # noqa: F401  (the air fill of both)
from ctzoo.io import Volume, read_volume, reorient_lps, volume_to_sitk

#: Abdominal organs labelled in every TotalSegmentator sample volume; values are source-name patterns (fnmatch).
ABDOMEN_CLASSES: dict[str, tuple[str, ...]] = {
    "liver": ("liver",),
    "spleen": ("spleen",),
    "stomach": ("stomach",),
    "aorta": ("aorta",),
    "vertebrae": ("vertebrae_*",),  # T11, T12, L1, L2 ... merged into one class
}


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
    """``root/dataset.json`` -> (label names id -> name, [(image, label) paths in listed order]), all checked: each
    file exists and is in one entry only."""
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
    pairs, listed = [], {}
    for i, entry in enumerate(index["training"]):
        where = f"{path}: training[{i}]"
        pair = tuple(_msd_entry_path(path.parent, entry, key, where) for key in ("image", "label"))
        for key, file in zip(("image", "label"), pair):
            # split by position, a case listed twice could land in training and in test
            if (first := listed.setdefault(file, i)) != i:
                raise DatasetError(f"{where}: {key} file {file} is also listed in training[{first}]; list each case "
                                   "once")
        pairs.append(pair)
    return names, pairs


#: Label and image affines closer than this (mm) are one grid: the label array is taken as stored.
SAME_GRID_MM = 1e-3
#: The share of a label's foreground that must lie inside its image for the two to be one patient's space.
MIN_FOREGROUND_INSIDE = 0.99


def foreground_inside(labels: Volume, image: Volume, most: int = 200_000) -> float:
    """The share of ``labels``' foreground voxels (non-zero; at most ``most``, evenly picked) whose centres lie
    within ``image``'s physical extent (half a voxel beyond its outer voxel centres); 1.0 for an empty label map."""
    zyx = np.argwhere(labels.array != 0)
    if len(zyx) == 0:
        return 1.0
    zyx = zyx[np.linspace(0, len(zyx) - 1, min(most, len(zyx))).round().astype(int)]
    lps = labels.index_to_lps(zyx[:, ::-1].astype(float))
    ijk = (lps - image.affine_lps[:3, 3]) @ np.linalg.inv(image.affine_lps[:3, :3]).T
    inside = np.all((ijk >= -0.5) & (ijk <= np.asarray(image.size) - 0.5), axis=1)
    return float(inside.mean())


def _grid_words(volume: Volume) -> str:
    return (f"{volume.array.shape} voxels, origin {np.round(volume.origin, 2).tolist()} mm, spacing "
            f"{np.round(volume.spacing, 3).tolist()} mm, orientation {volume.orientation}")


def _grid_box(volume: Volume) -> np.ndarray:
    """The physical box a voxel grid covers: the lowest and highest LPS corner (mm) of its voxels' outer faces,
    whichever way its axes run (a mirrored copy of a grid covers the same box)."""
    corners = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in volume.size])))
    lps = volume.index_to_lps(corners)
    return np.stack([lps.min(axis=0), lps.max(axis=0)])


def labels_on_image_grid(labels: Volume, image: Volume, where: str) -> np.ndarray:
    """``labels`` on ``image``'s voxel grid ``(Z, Y, X)``: as stored where the two share the grid (shape and affine),
    else moved there by nearest neighbour (:func:`resample_labels_onto`: a label file stored mirrored or on another
    grid, its header saying so). Matching by array shape alone would pair a mirrored label with the wrong side of
    the patient. ``DatasetError`` (message prefixed ``where``, naming both grids) where they do not share physical
    space: less than :data:`MIN_FOREGROUND_INSIDE` of the label's foreground lies inside the image, or the label has
    the image's array shape but covers another box (by more than half an image voxel): a label saved without its
    image's header (1 mm voxels at the origin), whose foreground may well lie inside the image, in a corner."""
    if labels.array.shape == image.array.shape and np.allclose(labels.affine_lps, image.affine_lps,
                                                              atol=SAME_GRID_MM):
        return labels.array
    grids = f"label {_grid_words(labels)}; image {_grid_words(image)}"
    inside = foreground_inside(labels, image)
    if inside < MIN_FOREGROUND_INSIDE:
        raise DatasetError(f"{where}: label and image do not share physical space: {inside:.0%} of the label's "
                           f"foreground lies inside the image ({grids}); fix the label file's header")
    if labels.array.shape == image.array.shape and not np.allclose(_grid_box(labels), _grid_box(image),
                                                                   atol=min(image.spacing) / 2):
        raise DatasetError(f"{where}: label and image do not share physical space: the label has the image's array "
                           f"shape but covers another region ({grids}); fix the label file's header")
    return resample_labels_onto(labels, image)


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
    (each at least one case when its fraction is > 0). Every volume is read into memory. A label file is put on
    its image's voxel grid by its header (:func:`labels_on_image_grid`), not paired by array shape. Refused
    (``DatasetError``): val or test cases without any labelled voxel, a class without a voxel in the training
    cases, a file listed in two entries.
    """
    root = Path(root)
    names, pairs = read_msd_index(root)
    if classes is None:
        classes = {names[i]: (names[i],) for i in sorted(names) if i != 0}
    sizes = _split_sizes(len(pairs), val_fraction, test_fraction, root / "dataset.json")
    cases = []
    for i, (image_path, label_path) in enumerate(pairs):
        image = read_volume(image_path)
        stored = read_volume(label_path, dtype=None)
        unknown = sorted(set(np.unique(stored.array).tolist()) - set(names))
        if unknown:
            raise DatasetError(f"{label_path}: label values {unknown} are not in dataset.json's 'labels'")
        labels = labels_on_image_grid(stored, image, f"{root / 'dataset.json'}: training[{i}]: label "
                                                     f"{label_path.name}, image {image_path.name}")
        name = image_path.name.removesuffix(".gz").removesuffix(".nii")
        cases.append(SegCase(name, image, map_labels(labels, names, classes)))
    bounds = np.cumsum([0, *sizes])
    splits = {split: cases[a:b] for split, a, b in zip(("train", "val", "test"), bounds[:-1], bounds[1:])}
    _check_split_labels(splits, list(classes), root / "dataset.json")
    return splits


def _check_split_labels(splits: Mapping[str, list[SegCase]], class_names: Sequence[str], where: Path) -> None:
    """``DatasetError`` for a split that cannot do its job: val or test cases without a voxel of any class (Dice is
    nan on them: best.pt would never be written, or nothing compared), or a class without a voxel in the training
    cases (the model could never learn it, the template bank never show it)."""
    for split in ("val", "test"):
        if splits[split] and not any(case.labels.any() for case in splits[split]):
            raise DatasetError(f"{where}: the {split} cases {[c.name for c in splits[split]]} hold no voxel of any "
                               "class; list cases with labels there (the split follows the order of 'training')")
    trained = set().union(*(np.unique(case.labels).tolist() for case in splits["train"]))
    if missing := [name for k, name in enumerate(class_names, start=1) if k not in trained]:
        raise DatasetError(f"{where}: classes {missing} have no voxel in the training cases "
                           f"({splits['train'][0].name} to {splits['train'][-1].name}); drop them from data.classes "
                           "or list cases holding them first in 'training'")
