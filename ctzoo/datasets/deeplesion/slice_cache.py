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
import shutil
import struct
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


def slice_number(path: Path) -> int:
    """The slice number of ``.../{series}/NNN.png``; another name is refused, naming the file."""
    if not path.stem.isdigit():
        raise ValueError(f"{path}: not a DeepLesion slice name (NNN.png); move it out of the series folder")
    return int(path.stem)


def decode_slice(path: Path) -> np.ndarray:
    """:func:`read_png_hu`, any decoder failure (a truncated or damaged PNG) reported with the file it came from."""
    try:
        return read_png_hu(path)
    except ValueError:
        raise  # read_png_hu's own refusals name the file already
    except Exception as exc:  # PIL raises OSError, SyntaxError, struct.error... for damaged files
        raise ValueError(f"{path}: cannot decode this PNG ({type(exc).__name__}: {exc}); is the file complete?") \
            from exc


def decode_series(series_root: Path) -> tuple[list[list[int]], np.ndarray, str]:
    """Every slice of a series in slice order as (slices, rows, columns) int16 HU, their numbers as runs
    (:func:`runs_of`) and the folder's signature. A series' slices must be of one size."""
    paths = sorted(series_pngs(series_root), key=slice_number)
    if not paths:
        raise ValueError(f"{series_root}: no PNG slices")
    planes = [decode_slice(p) for p in paths]
    if len({p.shape for p in planes}) != 1:
        raise ValueError(f"{series_root}: slices of different sizes {sorted({p.shape for p in planes})}")
    return runs_of([slice_number(p) for p in paths]), np.stack(planes).astype(np.int16), series_signature(series_root)


def png_size(path: Path) -> tuple[int, int] | None:
    """(rows, columns) from a PNG's header alone; None where it is no PNG (decoding will say so)."""
    with open(path, "rb") as handle:
        head = handle.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    columns, rows = struct.unpack(">II", head[16:24])
    return rows, columns


def store_bytes_needed(images_root: Path, folders: Iterable[str]) -> int:
    """The store's size (2 bytes a voxel) from each series' slice count and its first PNG's header: one small read
    per series, so a full disk is refused before hours of decoding rather than found at the end."""
    total = 0
    for folder in folders:
        pngs = series_pngs(images_root / folder)
        size = png_size(pngs[0]) if pngs else None
        if size is not None:
            total += 2 * len(pngs) * size[0] * size[1]
    return total


def is_slice_store(folder: Path) -> bool:
    """Whether ``folder`` holds a slice store of any version (its ``index.json`` names a schema and series)."""
    try:
        document = json.loads((folder / INDEX_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and "schema" in document and "series" in document


def check_store_target(images_root: Path, out: Path) -> None:
    """Refuse an ``out`` that a build would destroy something in: the build replaces ``out`` whole, so it must be
    a new or empty folder or a slice store (the re-run case), and neither be, hold nor lie inside ``images_root``
    (``ROOT/slice_cache`` beside ``ROOT/Images_png``, the default, is fine)."""
    images, target = images_root.resolve(), out.resolve()
    instead = f"choose a separate folder such as {images_root.parent / CACHE_DIR}"
    if images.is_relative_to(target):
        raise ValueError(f"--out {out}: holds {images_root}, and the build replaces --out whole; {instead}")
    if target.is_relative_to(images):
        raise ValueError(f"--out {out}: lies inside {images_root}, among the series folders; {instead}")
    if out.exists() and not (out.is_dir() and (is_slice_store(out) or not any(out.iterdir()))):
        raise ValueError(f"--out {out}: exists and is not a slice store; the build replaces --out whole, so choose "
                         "a new folder (or remove this one yourself)")


def check_free_space(out: Path, needed: int) -> None:
    """Refuse a build that cannot fit beside ``out`` (the old store stays until the new one is complete)."""
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if needed > free:
        raise ValueError(f"{out}: the store needs {needed / 1e9:.2f} GB, {parent} has {free / 1e9:.2f} GB free")


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
    series and slice counts and build seconds. Refused before anything is written: an ``out`` the build would
    destroy something in (:func:`check_store_target`), no series, or too little free space."""
    images_root, out, started = Path(images_root), Path(out), time.perf_counter()
    folders = sorted(set(series_folders))
    check_store_target(images_root, out)
    if not folders:
        raise ValueError(f"{images_root}: no series to store (does DL_info.csv name any?)")
    check_free_space(out, store_bytes_needed(images_root, folders))
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
        rebuild = "rebuild it with ctzoo data cache"
        try:
            document = json.loads((self.folder / INDEX_FILE).read_text())
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{self.folder}: no slice store here (no {INDEX_FILE}); {rebuild}") from exc
        except ValueError as exc:
            raise ValueError(f"{self.folder}: damaged slice store ({INDEX_FILE} is not JSON); {rebuild}") from exc
        if not isinstance(document, dict) or document.get("schema") != SCHEMA:
            raise ValueError(f"{self.folder}: a slice store of another version; {rebuild}")
        self.index: dict[str, dict[str, Any]] = document["series"]
        if not self.index:
            raise ValueError(f"{self.folder}: an empty slice store (no series); {rebuild}")
        expected = 2 * sum(entry["count"] * entry["rows"] * entry["columns"] for entry in self.index.values())
        slices = self.folder / SLICES_FILE
        actual = slices.stat().st_size if slices.exists() else None
        if actual != expected:
            found = "missing" if actual is None else f"{actual} bytes"
            raise ValueError(f"{slices}: {found}, its index says {expected} bytes (truncated or interrupted copy?); "
                             f"{rebuild}")
        self.slices = np.memmap(slices, dtype=np.int16, mode="r")
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
