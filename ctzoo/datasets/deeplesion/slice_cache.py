"""DeepLesion's PNG slices decoded once into a memory-mapped store that every loader worker and every DDP rank on a
node share (the page cache holds one copy): ``ROOT/slice_cache/slices.int16`` (every slice of a series contiguous,
HU as int16, which holds DeepLesion's ``uint16 - 32768`` exactly) and ``index.json`` (per series: offset, its
slice numbers as runs, count, rows, columns and a signature of its PNG files).

Reading a slice from the store costs a copy instead of a PNG decode. A series whose PNG files changed since the
store was built (names, sizes or modification times: :func:`series_signature`) is read from its PNGs again, with
one warning naming it, so a stale store never changes a sample; ``ctzoo data cache ROOT`` rebuilds it. Reading
from the store gives the same float32 HU as :func:`ctzoo.datasets.deeplesion.png_slices.read_png_hu`, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ctzoo.datasets.deeplesion.png_slices import read_png_hu
from ctzoo.io.atomic import atomic_folder

LOG = logging.getLogger(__name__)
CACHE_DIR, SLICES_FILE, INDEX_FILE = "slice_cache", "slices.int16", "index.json"
SCHEMA = 1


def series_pngs(series_root: Path) -> list[Path]:
    return sorted(series_root.glob("*.png"))


def series_signature(series_root: Path) -> str:
    """A digest of the series folder's PNG names, sizes and modification times: what the store was built from."""
    digest = hashlib.sha256()
    for path in series_pngs(series_root):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def runs_of(numbers: list[int]) -> list[list[int]]:
    """Sorted slice numbers as ``[first, count]`` runs (DeepLesion keeps slices only around each key slice, so a
    series folder holds one run per ``Slice_range``, with gaps between)."""
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number == runs[-1][0] + runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([number, 1])
    return runs


def decode_series(series_root: Path) -> tuple[list[list[int]], np.ndarray, str]:
    """Every slice of a series in slice order as (slices, rows, columns) int16 HU, their numbers as runs
    (:func:`runs_of`) and the folder's signature. A series' slices must be of one size."""
    paths = sorted(series_pngs(series_root), key=lambda p: int(p.stem))
    if not paths:
        raise ValueError(f"{series_root}: no PNG slices")
    planes = [read_png_hu(p) for p in paths]
    if len({p.shape for p in planes}) != 1:
        raise ValueError(f"{series_root}: slices of different sizes {sorted({p.shape for p in planes})}")
    return runs_of([int(p.stem) for p in paths]), np.stack(planes).astype(np.int16), series_signature(series_root)


def in_order_bounded(pool: ProcessPoolExecutor, function: Callable, arguments: list, window: int) -> Iterator:
    """``pool.map(function, arguments)`` with at most ``window`` results decoded and waiting at once (``map``
    submits everything: on the whole of DeepLesion, series decoded ahead of the writer would pile up in memory)."""
    pending: deque = deque()
    for argument in arguments:
        pending.append(pool.submit(function, argument))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def build_slice_cache(images_root: str | Path, series_folders: Iterable[str], out: str | Path,
                      workers: int | None = None, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Decode every PNG slice of ``series_folders`` under ``images_root`` in ``workers`` processes into the store
    ``out`` (written whole, then moved into place: an interrupted build leaves the old store). Returns its size,
    series and slice counts and build seconds."""
    images_root, started = Path(images_root), time.perf_counter()
    folders = sorted(set(series_folders))
    workers = workers or max(1, min(8, (os.cpu_count() or 2) - 1))
    index: dict[str, Any] = {}
    offset = 0
    with atomic_folder(out) as partial, open(Path(partial) / SLICES_FILE, "wb") as store, \
            ProcessPoolExecutor(max_workers=workers) as pool:
        decoded = in_order_bounded(pool, decode_series, [images_root / folder for folder in folders], 2 * workers)
        for done, (folder, (runs, planes, signature)) in enumerate(zip(folders, decoded), start=1):
            store.write(planes.tobytes())
            index[folder] = {"offset": offset, "runs": runs, "count": int(planes.shape[0]),
                             "rows": int(planes.shape[1]), "columns": int(planes.shape[2]), "signature": signature}
            offset += planes.size
            if progress is not None:
                progress(done, len(folders))
        store.flush()
        (Path(partial) / INDEX_FILE).write_text(json.dumps({"schema": SCHEMA, "series": index}))
    slices = sum(entry["count"] for entry in index.values())
    return {"series": len(index), "slices": slices, "bytes": offset * 2, "seconds": time.perf_counter() - started}


class SliceCache:
    """The store at ``folder`` read through a read-only memory map; :meth:`reader` is a drop-in for
    :func:`read_png_hu` (a slice path under ``images_root``), falling back to the PNG for a series the store lacks
    or holds stale."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        document = json.loads((self.folder / INDEX_FILE).read_text())
        if document.get("schema") != SCHEMA:
            raise ValueError(f"{self.folder}: a slice store of another version; rebuild it (ctzoo data cache)")
        self.index: dict[str, dict[str, Any]] = document["series"]
        self.slices = np.memmap(self.folder / SLICES_FILE, dtype=np.int16, mode="r")
        self._checked: dict[str, bool] = {}

    def fresh(self, series_root: Path) -> bool:
        """Whether the store holds ``series_root``'s slices as they are now on disk (checked once per series)."""
        name = series_root.name
        if name not in self._checked:
            entry = self.index.get(name)
            self._checked[name] = entry is not None and entry["signature"] == series_signature(series_root)
            if entry is not None and not self._checked[name]:
                LOG.warning("%s changed since the slice store was built: read from its PNGs (rebuild with "
                            "ctzoo data cache)", name)
        return self._checked[name]

    def view(self, series: str, number: int) -> np.ndarray:
        """Slice ``number`` of ``series`` as int16 HU, a read-only view of the map (nothing is read until used)."""
        entry = self.index[series]
        k, before = None, 0
        for first, count in entry["runs"]:
            if first <= number < first + count:
                k = before + number - first
                break
            before += count
        if k is None:
            raise FileNotFoundError(f"{series}: slice {number} is not in the store")
        size = entry["rows"] * entry["columns"]
        start = entry["offset"] + k * size
        return self.slices[start:start + size].reshape(entry["rows"], entry["columns"])

    def plane(self, series: str, number: int) -> np.ndarray:
        """Slice ``number`` of ``series`` as float32 HU (a copy)."""
        return self.view(series, number).astype(np.float32)

    def read(self, path: str | Path) -> np.ndarray:
        """:func:`read_png_hu` of ``path`` (``.../{series}/{slice:03d}.png``), from the store where it is fresh."""
        return np.asarray(self.read_view(path), dtype=np.float32)

    def read_view(self, path: str | Path) -> np.ndarray:
        """:meth:`read` without the copy where the store holds the slice: its int16 view (:meth:`view`), so that a
        reader of part of the slice (:class:`~ctzoo.datasets.deeplesion.context.ContextPlanes`) copies that part
        alone. The PNG's float32 HU where the store lacks the series or holds it stale."""
        path = Path(path)
        if self.fresh(path.parent):
            return self.view(path.parent.name, int(path.stem))
        if not path.exists():
            raise FileNotFoundError(f"{path}: DeepLesion slice missing (is the Images_png download complete?)")
        return read_png_hu(path)
