"""2.5D input for DeepLesion: the key slice and its neighbours, as 3DCE and MULAN build it.

Neighbours sit ``slice_interval_mm`` apart (3DCE/MULAN: 2 mm). Where that is not
a whole number of the series' slice intervals, a neighbour is interpolated
linearly between the two slices around it. A neighbour beyond the slices
provided (DeepLesion ships about +-30 mm around each key slice, ``Slice_range``)
falls back to the nearest provided slice, i.e. the edge slice repeats. A series
with an unknown or zero slice interval repeats the key slice.

Channel order is by patient position, the superior neighbour first, the key slice in the middle, the inferior
neighbour last (each window of a 9-channel input alike): :func:`neighbour_offsets` orders the offsets so in
whichever direction a series' slice index runs. DeepLesion's slice numbers (its PNG file names) are assumed to
increase from head to feet (:data:`DEEPLESION_INDEX_TOWARDS`), as the miniature is built
(:mod:`.lesion_synthesis`: slice k at z = origin - k dz); volume inference runs on LPS volumes, whose slice index
increases towards the head (:func:`ctzoo.inference.recist_volume.slice_inputs`). Both get the order the shipped
models were trained with.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ctzoo.datasets.deeplesion.info_csv import LesionRow
from ctzoo.datasets.deeplesion.png_slices import read_png_hu, slice_path

#: The direction in the patient that a series' slice index increases towards.
IndexDirection = Literal["feet", "head"]

#: Where DeepLesion's slice numbers (PNG file names) increase towards: the feet, PNG 001 the most superior slice
#: of a series. An assumption about the real dataset, not checked against it (its PNGs carry no patient
#: position); the miniature is built so, and the shipped models were trained so.
DEEPLESION_INDEX_TOWARDS: IndexDirection = "feet"


def neighbour_offsets(num_slices: int, slice_interval_mm: float, series_interval_mm: float,
                      index_towards: IndexDirection) -> list[float]:
    """Offsets in (fractional) slice indices of the ``num_slices`` slices centred on the key slice, in channel
    order: the most superior first, whichever way the series' slice index runs (``index_towards``: the direction
    in the patient it increases towards; DeepLesion's PNG numbers: :data:`DEEPLESION_INDEX_TOWARDS`, an LPS
    volume: ``"head"``).

    ``num_slices`` is odd (3 for one RGB-like triplet, 9 for MULAN's 3 x 3).
    """
    if num_slices < 1 or num_slices % 2 == 0:
        raise ValueError(f"num_slices must be odd and positive, got {num_slices}")
    if index_towards not in ("feet", "head"):
        raise ValueError(f"index_towards must be 'feet' or 'head', got {index_towards!r}")
    half = num_slices // 2
    if not math.isfinite(series_interval_mm) or series_interval_mm < 1e-3:
        return [0.0] * num_slices
    step = slice_interval_mm / series_interval_mm
    superior_first = -1 if index_towards == "feet" else 1  # the superior neighbour's offset sign
    return [superior_first * k * step for k in range(half, -half - 1, -1)]


class ContextPlanes:
    """The planes at ``key + offset`` for each offset, read on demand: ``shape`` is (len(offsets), rows, columns)
    and :meth:`window` reads only the rows and columns asked for (a training crop of a memory-mapped slice store
    reads a third of each slice instead of all of it).

    ``get_plane(k)`` returns slice k: an array or a tensor (on any device: volume inference preprocessing on the
    GPU); a view is fine, it is only read. Positions are clamped to [first, last] (the edge repeats) and a
    fractional position is linearly interpolated between its two neighbours. ``name`` prefixes errors.
    """

    def __init__(self, get_plane: Callable[[int], np.ndarray | torch.Tensor], key: float, offsets: list[float],
                 first: int, last: int, name: str = "") -> None:
        self.get_plane, self.name = get_plane, name
        self.positions = []  # (slice below, weight of the slice above) per plane
        for offset in offsets:
            position = min(max(key + offset, first), last)  # beyond the provided range: the edge slice repeats
            self.positions.append((int(math.floor(position)), position - math.floor(position)))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.positions), *self.get_plane(self.positions[0][0]).shape[-2:])

    def window(self, rows: slice = slice(None), columns: slice = slice(None)) -> np.ndarray | torch.Tensor:
        """The planes' ``[rows, columns]``: (len(offsets), h, w) float32, stacked where the planes are."""
        out, shapes = None, set()
        for k, (below, weight) in enumerate(self.positions):  # each plane written into ``out`` in place
            plane = self.get_plane(below)
            shapes.add(tuple(plane.shape))
            part = plane[rows, columns]
            if out is None:
                shape = (len(self.positions), *part.shape)
                out = (part.new_empty(shape, dtype=torch.float32) if isinstance(part, torch.Tensor)
                       else np.empty(shape, dtype=np.float32))
            out[k] = part
            if weight > 1e-6:
                above = self.get_plane(below + 1)
                shapes.add(tuple(above.shape))
                out[k] *= 1.0 - weight
                out[k] += weight * (above[rows, columns].float() if isinstance(above, torch.Tensor)
                                    else np.asarray(above[rows, columns], dtype=np.float32))
        if len(shapes) != 1:
            raise ValueError(f"{self.name + ': ' if self.name else ''}slices of different sizes {sorted(shapes)}")
        return out


def context_planes(get_plane: Callable[[int], np.ndarray], key: float, offsets: list[float], first: int,
                   last: int) -> np.ndarray:
    """Stack the planes at ``key + offset`` for each offset: (len(offsets), rows, columns) float32, all of them
    (:class:`ContextPlanes` says how)."""
    return ContextPlanes(get_plane, key, offsets, first, last).window()


def context_of(images_root: str | Path, row: LesionRow, num_slices: int = 3, slice_interval_mm: float = 2.0,
               reader: Callable[[Path], np.ndarray] | None = None) -> ContextPlanes:
    """The key slice of ``row`` with its neighbours, to be read (:class:`ContextPlanes`): from
    ``images_root/{series}/{slice:03d}.png`` by ``reader`` (default: decode the PNG, the last 64 kept)."""
    read = reader or _cached_reader()
    offsets = neighbour_offsets(num_slices, slice_interval_mm, row.spacing_mm_px[2], DEEPLESION_INDEX_TOWARDS)
    return ContextPlanes(lambda k: read(slice_path(images_root, row.series_folder, k)), row.key_slice_index, offsets,
                         *row.slice_range, name=row.series_folder)


def load_context_slices(images_root: str | Path, row: LesionRow, num_slices: int = 3,
                        slice_interval_mm: float = 2.0,
                        reader: Callable[[Path], np.ndarray] | None = None) -> np.ndarray:
    """The key slice of ``row`` with its neighbours, float32 HU of shape (num_slices, rows, columns).

    Slices are read from ``images_root/{series}/{slice:03d}.png``. ``reader`` lets a caller share a
    cache of decoded slices across lesions of one image.
    """
    return context_of(images_root, row, num_slices, slice_interval_mm, reader).window()


def _cached_reader(size: int = 64) -> Callable[[Path], np.ndarray]:
    @lru_cache(maxsize=size)
    def read(path: Path) -> np.ndarray:
        if not path.exists():
            raise FileNotFoundError(f"{path}: DeepLesion slice missing (is the Images_png download complete?)")
        return read_png_hu(path)
    return read
