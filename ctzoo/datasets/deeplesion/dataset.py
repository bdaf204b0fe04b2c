"""DeepLesion as MONAI datasets: one sample per key slice, with every lesion annotated on it.

Pipeline per sample (:class:`LoadDeepLesiond`), following 3DCE/MULAN:

1. read the key slice and its neighbours (:mod:`.context`: the superior one first, PNG numbers assumed to run
   from head to feet), HU = PNG value - 32768;
2. resample in-plane to ``norm_spacing_mm`` (MULAN: 0.8 mm/px), longer side capped at ``max_size``,
   with MONAI's ``Resize`` (bilinear; anti-aliased when shrinking);
3. window ``window_hu`` (and each of ``extra_windows_hu``) onto ``output_range`` with MONAI's
   ``ScaleIntensityRange`` (clipped); several windows are stacked window by window;
4. RECIST targets for each lesion (:mod:`.recist`), moved into the resampled pixel frame.

Point coordinates follow pixel centres: a resize by ``s`` maps x to (x + 0.5) s - 0.5.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset, MetaTensor
from monai.transforms import Compose, Resize, ScaleIntensityRange, Transform
from pydantic import Field

from ctzoo.config import StrictConfig
from ctzoo.datasets.deeplesion.context import context_of
from ctzoo.datasets.deeplesion.info_csv import SPLITS, LesionRow, read_dl_info
from ctzoo.datasets.deeplesion.recist import (
    DEEPLESION_BOX_PAD,
    box_from_points,
    diameters,
    points_from_measurement,
)
from ctzoo.datasets.deeplesion.slice_cache import SliceCache

#: Keys of a sample that hold one entry per lesion (what a crop must filter together).
LESION_KEYS = ("keypoints", "boxes", "diameters_px", "diameters_mm", "lesion_types", "lesion_index")


class SlicePreprocessing(StrictConfig):
    """How CT slices become network input: the same for DeepLesion training and for volume inference."""

    num_slices: int = Field(3, ge=1, description="key slice plus neighbours; odd (3DCE: 3, MULAN: 9)")
    slice_interval_mm: float = Field(2.0, gt=0, description="distance between neighbours (3DCE/MULAN: 2 mm)")
    norm_spacing_mm: float | None = Field(0.8, gt=0, description="in-plane mm/px after resampling; null keeps it")
    max_size: int = Field(512, ge=32, description="cap on the longer image side after resampling")
    window_hu: tuple[float, float] = (-1024.0, 3071.0)
    extra_windows_hu: list[tuple[float, float]] = Field(
        default_factory=list, description="more windows, each adding num_slices channels (e.g. soft tissue "
                                          "[-160, 240] and lung [-1350, 150]: lesions 20 HU from their organ "
                                          "differ by 0.005 in the 4096 HU window alone)")
    output_range: tuple[float, float] = (0.0, 1.0)

    @property
    def in_channels(self) -> int:
        """Network input channels: num_slices per window."""
        return self.num_slices * (1 + len(self.extra_windows_hu))


class DeepLesionConfig(SlicePreprocessing):
    """Where DeepLesion is and how to turn it into network input (``configs/deeplesion_*.yaml``)."""

    root: Path = Field(description="folder holding DL_info.csv and Images_png/ (the official download, unzipped)")
    info_csv: str = "DL_info.csv"
    images_dir: str = "Images_png"
    drop_noisy: bool = Field(True, description="drop Possibly_noisy lesions (MULAN does, for all splits)")
    negatives_per_series: int = Field(0, ge=0, description="lesion-free context slices added per series")
    slice_cache: Path | None = Field(None, description="the decoded-slice store to read slices from (ctzoo data "
                                     "cache ROOT writes ROOT/slice_cache); None: decode the PNGs")

    @property
    def images_root(self) -> Path:
        return self.root / self.images_dir


def resample_and_window(hu: np.ndarray, spacing_xy, cfg: SlicePreprocessing) -> tuple[torch.Tensor, np.ndarray]:
    """Steps 2 and 3 above for planes ``hu`` (S, H, W): returns the image (cfg.in_channels, H', W') (the S planes
    in the first window, then in each extra window) and the (x, y) scale.

    Shared by training (:class:`LoadDeepLesiond`) and volume inference, so both see identical input.
    """
    image, scale = resample_planes(hu, spacing_xy, cfg)
    return window_planes(image, cfg), scale


def resample_planes(hu: np.ndarray | torch.Tensor, spacing_xy,
                    cfg: SlicePreprocessing) -> tuple[torch.Tensor, np.ndarray]:
    """Step 2 alone: planes (S, H, W) HU -> (S, H', W') float32 HU at ``cfg.norm_spacing_mm``, and the (x, y) scale.

    Linear in the planes (bilinear resize plus, when shrinking, MONAI's anti-aliasing Gaussian): resampling a
    linear mix of planes equals mixing the resampled planes, which lets volume inference resample each plane once.
    A tensor ``hu`` is resampled on its own device (volume inference on the GPU).
    """
    height, width = hu.shape[1:]
    size, scale_xy = resampled_size((height, width), spacing_xy, cfg)
    image = hu.float() if isinstance(hu, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(hu, np.float32))
    if size != (height, width):
        image = Resize(size, mode="bilinear", anti_aliasing=bool(scale_xy.min() < 1.0))(image)
    image = torch.as_tensor(image, dtype=torch.float32)
    image = image.as_tensor() if isinstance(image, MetaTensor) else image
    return image, scale_xy


def resampled_size(shape_hw: tuple[int, int], spacing_xy, cfg: SlicePreprocessing) -> tuple[tuple[int, int],
                                                                                           np.ndarray]:
    """(H', W') of a (H, W) slice resampled by :func:`resample_planes`, and the (x, y) scale: W'/W, H'/H."""
    height, width = shape_hw
    scale = 1.0 if cfg.norm_spacing_mm is None else float(np.mean(spacing_xy)) / cfg.norm_spacing_mm
    scale = min(scale, cfg.max_size / max(height, width))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return size, np.array([size[1] / width, size[0] / height])


def below_windows_hu(cfg: SlicePreprocessing) -> float:
    """A HU value that every window of ``cfg`` maps to the bottom of ``output_range``: the lowest window's low end
    (what lies outside a slice reads as, when the windowing comes after a resample: ``augment: {resample_on:
    device}``)."""
    return float(min(low for low, _ in (cfg.window_hu, *cfg.extra_windows_hu)))


def window_planes(image: torch.Tensor, cfg: SlicePreprocessing, out: torch.Tensor | None = None) -> torch.Tensor:
    """Step 3 alone: (S, H, W) HU -> (cfg.in_channels, H, W), the planes in the first window, then in each extra.

    ``out``: a (cfg.in_channels, H, W) tensor to write into (volume inference passes the top left of its zeroed
    canvas, which saves concatenating and then padding 9 planes per slice); returned.
    """
    b_low, b_high = cfg.output_range
    windows = (cfg.window_hu, *cfg.extra_windows_hu)
    if out is None:
        out = image.new_empty((len(windows) * image.shape[0], *image.shape[1:]), dtype=torch.float32)
    for i, (low, high) in enumerate(windows):
        out[i * image.shape[0]:(i + 1) * image.shape[0]] = ScaleIntensityRange(low, high, b_low, b_high,
                                                                               clip=True)(image)
    return out


class LoadDeepLesiond(Transform):
    """Item ``{"context_row": LesionRow, "lesions": [LesionRow, ...], ...}`` -> a network-ready sample.

    Output keys: ``image`` (MetaTensor, (in_channels, H, W) float32, affine = pixel spacing in mm; per window
    the context slices superior first, assuming DeepLesion's PNG numbers increase from head to feet, an
    assumption not checked against the real dataset: :data:`~.context.DEEPLESION_INDEX_TOWARDS`);
    ``keypoints`` (N, 5, 2) x, y in pixels (see :mod:`.recist` for the order); ``boxes`` (N, 4);
    ``diameters_px`` / ``diameters_mm`` (N, 2) long, short; ``lesion_types`` (N,) int64;
    ``spacing_mm`` (2,) x, y after resampling; ``scale`` (resampled per original pixel); ``file_name`` and
    ``split`` as given.

    ``resample=False`` (``augment: {resample_on: device}``, which resamples, windows and augments in one go on the
    training device): ``image`` is the context planes' HU instead, (num_slices, H, W) float32 at the original pixel
    size, or, ``lazy``, the :class:`~.context.ContextPlanes` to read a window of; every point, box and size is still
    in the resampled frame, which ``resampled_hw`` (H', W') and ``scale_xy`` (resampled per original pixel, x, y)
    describe.
    """

    def __init__(self, cfg: DeepLesionConfig, resample: bool = True, lazy: bool = False) -> None:
        self.cfg, self.resample, self.lazy = cfg, resample, lazy
        self._store: SliceCache | None = None  # opened in each process that loads (workers do not share a map)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None}

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        cfg, row = self.cfg, item["context_row"]
        if cfg.slice_cache is not None and self._store is None:
            self._store = SliceCache(cfg.slice_cache)
        planes = context_of(cfg.images_root, row, cfg.num_slices, cfg.slice_interval_mm,
                            reader=self._store.read_view if self._store is not None else None)
        if self.resample:
            image, scale_xy = resample_and_window(planes.window(), row.spacing_mm_px[:2], cfg)
            extra = {}
        else:
            resampled_hw, scale_xy = resampled_size(planes.shape[1:], row.spacing_mm_px[:2], cfg)
            image = planes if self.lazy else torch.from_numpy(planes.window())
            extra = {"resampled_hw": resampled_hw, "scale_xy": torch.as_tensor(scale_xy)}
        spacing_xy = np.asarray(row.spacing_mm_px[:2]) / scale_xy
        lesions = item["lesions"]
        points = np.array([points_from_measurement(r.measurement_coordinates) for r in lesions]).reshape(-1, 5, 2)
        points = (points + 0.5) * scale_xy - 0.5
        pixels, mm = diameters(points, spacing_xy)
        # MONAI keeps 4x4 affines even for 2-D images; spatial dims are (row, column) = (y, x)
        affine = torch.diag(torch.tensor([spacing_xy[1], spacing_xy[0], 1.0, 1.0], dtype=torch.float64))
        return {
            **{k: v for k, v in item.items() if k not in ("context_row", "lesions")},
            "image": MetaTensor(image, affine=affine) if self.resample else image,
            "keypoints": torch.as_tensor(points, dtype=torch.float32),
            "boxes": torch.as_tensor(box_from_points(points, DEEPLESION_BOX_PAD * float(scale_xy.mean())),
                                     dtype=torch.float32).reshape(-1, 4),
            "diameters_px": torch.as_tensor(pixels, dtype=torch.float32).reshape(-1, 2),
            "diameters_mm": torch.as_tensor(mm, dtype=torch.float32).reshape(-1, 2),
            "lesion_types": torch.as_tensor([r.coarse_lesion_type for r in lesions], dtype=torch.int64),
            # each lesion's place among its key slice's rows of DL_info.csv: which row it is after a crop
            "lesion_index": torch.arange(len(lesions), dtype=torch.int64),
            "spacing_mm": torch.as_tensor(spacing_xy, dtype=torch.float32),
            "scale": float(scale_xy.mean()),  # resampled px per original px: DeepLesion's box pad scales with it
            **extra,
        }


Split = Literal["train", "val", "test", "all"]


def key_slice_items(rows: list[LesionRow], split: Split = "all", drop_noisy: bool = True,
                    negatives_per_series: int = 0) -> list[dict[str, Any]]:
    """Group lesion rows by key slice (File_name) into dataset items; add lesion-free slices if asked.

    The official patient-level split is Train_Val_Test (1 train, 2 val, 3 test). Dropped noisy lesions still keep
    lesion-free slices away from them: they are lesions, only their marks are doubtful.
    """
    wanted = set(SPLITS) if split == "all" else {k for k, name in SPLITS.items() if name == split}
    annotated: dict[str, list[LesionRow]] = defaultdict(list)  # every lesion of the split, noisy ones too
    by_image: dict[str, list[LesionRow]] = defaultdict(list)  # the lesions to learn and score
    for row in rows:
        if row.train_val_test in wanted:
            annotated[row.file_name].append(row)
            if not (drop_noisy and row.possibly_noisy):
                by_image[row.file_name].append(row)
    items = [{"file_name": name, "split": lesions[0].split, "context_row": lesions[0], "lesions": lesions}
             for name, lesions in sorted(by_image.items())]
    if negatives_per_series:
        items += negative_items(annotated, negatives_per_series)
    return items


def negative_items(by_image: dict[str, list[LesionRow]], per_series: int) -> list[dict[str, Any]]:
    """Context slices far from every annotated lesion of their series, as samples with no lesion.

    "Far" is more than half the series' longest lesion diameter plus 10 mm along z from every key slice.
    DeepLesion's unannotated slices can still hold lesions nobody marked, as its authors warn. A slice in the
    Slice_range of several lesions takes its neighbours from the widest range (then the first File_name): the
    same in every process (it once depended on Python's string hashing, so a resumed run could read another
    range, and repeat other edge slices, than the run it continued).
    """
    by_series: dict[str, list[LesionRow]] = defaultdict(list)
    for lesions in by_image.values():
        by_series[lesions[0].series_folder].extend(lesions)
    items = []
    for folder, lesions in sorted(by_series.items()):
        z_mm = lesions[0].spacing_mm_px[2]
        reach = max(r.lesion_diameters_px[0] * r.spacing_mm_px[0] for r in lesions) / 2 + 10.0
        keys = {r.key_slice_index for r in lesions}
        holders: dict[int, LesionRow] = {}  # per far slice, the lesion row whose Slice_range it is read in
        for r in sorted(lesions, key=lambda r: (r.slice_range[0] - r.slice_range[1], r.file_name, r.slice_range)):
            for s in range(r.slice_range[0], r.slice_range[1] + 1):
                if all(abs(s - k) * z_mm > reach for k in keys):
                    holders.setdefault(s, r)
        unique = sorted(holders.items(), key=lambda pair: pair[0])
        for s, r in (unique[int(i)] for i in np.linspace(0, len(unique) - 1, min(per_series, len(unique)))):
            items.append({"file_name": f"{folder}_{s:03d}.png", "split": r.split,
                          "context_row": dataclasses.replace(r, key_slice_index=s), "lesions": []})
    return items


def patient_rows(csv_path: str | Path, patients: set[int] | None = None) -> list[LesionRow]:
    """The rows of a DL_info.csv, of ``patients`` only when given (a site's share of the CSV)."""
    return [row for row in read_dl_info(csv_path) if patients is None or row.patient_index in patients]


def require_series_folders(cfg: DeepLesionConfig, items: list[dict[str, Any]]) -> None:
    """Refuse, before any slice is read, a dataset whose Images_png folder or series folders are missing: read
    later, inside MONAI's transform chain, the missing slice surfaced as a RuntimeError traceback."""
    images = cfg.root / cfg.images_dir
    if not images.is_dir():
        raise FileNotFoundError(f"{images}: DeepLesion's {cfg.images_dir} folder is missing (download and unzip it "
                                f"beside {cfg.info_csv})")
    folders = sorted({item["context_row"].series_folder for item in items})
    missing = [folder for folder in folders if not (images / folder).is_dir()]
    if missing:
        raise FileNotFoundError(f"{images}: {len(missing)} of the {len(folders)} series folders {cfg.info_csv} names "
                                f"are missing, e.g. {missing[0]} (is the {cfg.images_dir} download complete?)")


def deeplesion_dataset(cfg: DeepLesionConfig, split: Split = "train", transform: Transform | None = None,
                       cache: bool = False, num_workers: int = 0, copy_cache: bool = True,
                       resample: bool = True, patients: set[int] | None = None,
                       lesion_free_per_series: int | None = None) -> Dataset:
    """A MONAI ``Dataset`` (or ``CacheDataset`` when ``cache``: loading and resampling are cached, random
    ``transform`` steps still run per epoch) over the key slices of ``split``. ``copy_cache=False`` hands
    ``transform`` the cached sample itself instead of a deep copy: only for a transform that never writes into its
    input. ``resample=False``: samples hold HU planes at the original pixel size (:class:`LoadDeepLesiond`), read
    on demand unless cached. ``patients``: only these patients' key slices (a site's share of the CSV).

    ``lesion_free_per_series``: lesion-free context slices added per series. By default ``cfg.negatives_per_series``
    for ``train`` and ``all``, none for ``val`` and ``test``: those are scored on their key slices alone, DeepLesion's
    protocol, so that FROC figures compare with published ones (and an unmarked lesion on a context slice cannot
    count as a false positive)."""
    if lesion_free_per_series is None:
        lesion_free_per_series = cfg.negatives_per_series if split in ("train", "all") else 0
    items = key_slice_items(patient_rows(cfg.root / cfg.info_csv, patients), split, cfg.drop_noisy,
                            lesion_free_per_series)
    if not items:
        raise ValueError(f"{cfg.root / cfg.info_csv}: no key slices in split {split!r}"
                         + ("" if patients is None else f" of patients {sorted(patients)}"))
    require_series_folders(cfg, items)
    pipeline = Compose([LoadDeepLesiond(cfg, resample, lazy=not cache)] + ([transform] if transform else []))
    if cache:
        return CacheDataset(items, pipeline, num_workers=num_workers or None, progress=False, copy_cache=copy_cache)
    return Dataset(items, pipeline)


def paste(part: torch.Tensor, out: torch.Tensor, top: int, left: int, shift: float = 0.0) -> torch.Tensor:
    """Write ``part - shift`` (..., h, w) into ``out`` (..., H, W) at (top, left) and zeros everywhere else, each
    pixel of ``out`` written once (no zero fill first: the device-mode windows are copied per sample and per batch).
    ``part`` must fit. Returns ``out``."""
    height, width = part.shape[-2:]
    torch.sub(part, shift, out=out[..., top:top + height, left:left + width])
    out[..., :top, :] = 0
    out[..., top + height:, :] = 0
    out[..., top:top + height, :left] = 0
    out[..., top:top + height, left + width:] = 0
    return out


def collate_lesions(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images, zero-padded right and bottom to the largest (pixels keep their coordinates: the windows of
    ``augment: {resample_on: device}`` differ in size with the slices' spacing); keep per-lesion tensors as lists,
    like torchvision detection targets, since each image holds a different number of lesions."""
    images = [torch.as_tensor(s["image"]) for s in batch]
    height, width = (max(image.shape[axis] for image in images) for axis in (-2, -1))
    if all(image.shape[-2:] == (height, width) for image in images):
        stacked = torch.stack(images)
    else:
        stacked = images[0].new_empty((len(images), *images[0].shape[:-2], height, width))
        for k, image in enumerate(images):
            paste(image, stacked[k], 0, 0)
    out: dict[str, Any] = {"image": stacked}
    for key in batch[0]:
        if key != "image":
            out[key] = [s[key] for s in batch]
    return out


def deeplesion_dataloader(dataset: Dataset, batch_size: int = 8, shuffle: bool = True, num_workers: int = 2,
                          seed: int = 0) -> DataLoader:
    """MONAI DataLoader with worker processes (decoding PNGs, not the model, bounds throughput)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      collate_fn=collate_lesions, generator=generator, persistent_workers=num_workers > 0)
