"""DeepLesion's 16-bit PNG slices: ``Images_png/{patient}_{study}_{series}/{slice:03d}.png``, HU = value - 32768."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ctzoo.io.atomic import atomic_path

HU_OFFSET = 32768
#: zlib level 1: a CT slice encodes in ~15 ms instead of level 6's ~100 ms, for files ~8 % larger (measured on the
#: sample CT's 512 x 512 slices; decoding takes the same time). Encoding is most of a miniature's build time.
PNG_COMPRESS_LEVEL = 1


def slice_path(images_root: str | Path, series_folder: str, slice_index: int) -> Path:
    """Where slice ``slice_index`` (1-based, as in DL_info.csv) of a series lives under ``Images_png``."""
    return Path(images_root) / series_folder / f"{slice_index:03d}.png"


def read_png_hu(path: str | Path) -> np.ndarray:
    """One slice as float32 HU, shape (rows, columns). Refuses PNGs that are not single-channel 16-bit."""
    with Image.open(path) as image:
        if image.mode not in ("I;16", "I;16B", "I"):
            raise ValueError(f"{path}: a DeepLesion slice is a 16-bit grayscale PNG, this one is mode {image.mode}")
        stored = np.asarray(image)
    return stored.astype(np.float32) - HU_OFFSET


def write_png_hu(path: str | Path, hu: np.ndarray) -> Path:
    """Write HU as DeepLesion does (uint16 = round(HU) + 32768), atomically. HU outside the uint16 range is refused."""
    path = Path(path)
    stored = np.rint(np.asarray(hu, dtype=np.float64)) + HU_OFFSET
    if stored.min() < 0 or stored.max() > 65535:
        raise ValueError(f"{path}: HU {hu.min():.0f}..{hu.max():.0f} does not fit DeepLesion's uint16 encoding")
    with atomic_path(path) as temporary:
        Image.fromarray(stored.astype(np.uint16)).save(temporary, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return path
