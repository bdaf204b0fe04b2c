"""``DL_info.csv``: DeepLesion's annotation table, read and written in its real format.

One row per lesion, 18 columns in the official order (:data:`COLUMNS`). List
values are quoted, comma-separated numbers (``"233.537, 95.0204, ..."``).
Pixel coordinates in the file are 1-based (3DCE and MULAN subtract 1); this
module keeps the file's numbers as they are, and
:mod:`ctzoo.datasets.deeplesion.recist` converts.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path

from ctzoo.io.atomic import atomic_path

COLUMNS = (
    "File_name", "Patient_index", "Study_index", "Series_ID", "Key_slice_index", "Measurement_coordinates",
    "Bounding_boxes", "Lesion_diameters_Pixel_", "Normalized_lesion_location", "Coarse_lesion_type",
    "Possibly_noisy", "Slice_range", "Spacing_mm_px_", "Image_size", "DICOM_windows", "Patient_gender",
    "Patient_age", "Train_Val_Test",
)
#: Coarse_lesion_type codes (only val/test lesions are typed in DeepLesion; the rest are -1).
LESION_TYPES = {-1: "unknown", 1: "bone", 2: "abdomen", 3: "mediastinum", 4: "liver", 5: "lung", 6: "kidney",
                7: "soft tissue", 8: "pelvis"}
SPLITS = {1: "train", 2: "val", 3: "test"}


class DLInfoError(ValueError):
    """A DL_info.csv that cannot be used; the message names the file, the row and the column."""


@dataclass(frozen=True)
class LesionRow:
    """One row of DL_info.csv, typed. Coordinates are the file's own (1-based pixels)."""

    file_name: str
    patient_index: int
    study_index: int
    series_id: int
    key_slice_index: int
    measurement_coordinates: tuple[float, ...]  # 8: long-axis x1,y1,x2,y2 then short-axis x1,y1,x2,y2
    bounding_box: tuple[float, ...]  # 4: x1,y1,x2,y2 (RECIST end points' box padded by 5 px)
    lesion_diameters_px: tuple[float, ...]  # 2: long, short
    normalized_lesion_location: tuple[float, ...]  # 3: x, y, z in [0, 1]
    coarse_lesion_type: int
    possibly_noisy: bool
    slice_range: tuple[int, ...]  # 2: first and last slice provided around the key slice
    spacing_mm_px: tuple[float, ...]  # 3: x, y (mm/pixel) and z (slice interval, mm)
    image_size: tuple[int, ...]  # 2: width, height
    dicom_windows: tuple[float, ...]  # 2: HU low, high
    patient_gender: str
    patient_age: float | None
    train_val_test: int

    @property
    def series_folder(self) -> str:
        """``{patient}_{study}_{series}``: the File_name up to its last underscore."""
        return self.file_name.rsplit("_", 1)[0]

    @property
    def key_slice_path(self) -> str:
        """Path of the key slice under ``Images_png/``: the last underscore of File_name becomes a slash."""
        return f"{self.series_folder}/{self.key_slice_index:03d}.png"

    @property
    def split(self) -> str:
        return SPLITS[self.train_val_test]

    @property
    def lesion_type(self) -> str:
        return LESION_TYPES[self.coarse_lesion_type]


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not finite")
    return value


def _numbers(count: int, kind: Callable = float) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != count:
            raise ValueError(f"expected {count} comma-separated numbers, got {len(parts)}")
        return tuple(_integer(p) if kind is int else _finite(p) for p in parts)
    return parse


def _integer(text: str) -> int:
    value = _finite(text)  # int() of an infinity ('inf', '1e400') raises OverflowError, not ValueError
    if value != int(value):
        raise ValueError("expected a whole number")
    return int(value)


def _choice(allowed: Iterable) -> Callable[[str], int]:
    allowed = set(allowed)

    def parse(text: str) -> int:
        value = _integer(text)
        if value not in allowed:
            raise ValueError(f"expected one of {sorted(allowed)}")
        return value
    return parse


def _age(text: str) -> float | None:
    if text.strip() == "" or text.strip().lower() == "nan":
        return None
    value = float(text)
    if not 0 <= value < 150:
        raise ValueError("age outside 0..150")
    return value


def _gender(text: str) -> str:
    if text.strip() not in ("M", "F", ""):
        raise ValueError("expected M, F or empty")
    return text.strip()


def _file_name(text: str) -> str:
    parts = text.strip().rsplit("_", 1)
    if len(parts) != 2 or not parts[1].endswith(".png") or parts[0].count("_") != 2:
        raise ValueError("expected {patient}_{study}_{series}_{slice}.png")
    return text.strip()


def _positive(parse: Callable) -> Callable:
    def check(text: str):
        values = parse(text)
        if any(v <= 0 for v in values):
            raise ValueError("expected positive numbers")
        return values
    return check


_PARSERS: dict[str, Callable[[str], object]] = {
    "File_name": _file_name, "Patient_index": _integer, "Study_index": _integer, "Series_ID": _integer,
    "Key_slice_index": _integer, "Measurement_coordinates": _numbers(8), "Bounding_boxes": _numbers(4),
    "Lesion_diameters_Pixel_": _numbers(2), "Normalized_lesion_location": _numbers(3),
    "Coarse_lesion_type": _choice(LESION_TYPES), "Possibly_noisy": lambda t: bool(_choice((0, 1))(t)),
    "Slice_range": _numbers(2, int), "Spacing_mm_px_": _positive(_numbers(3)),
    "Image_size": _positive(_numbers(2, int)),
    "DICOM_windows": _numbers(2), "Patient_gender": _gender, "Patient_age": _age,
    "Train_Val_Test": _choice(SPLITS),
}


def _parse_row(raw: dict[str, str], where: str) -> LesionRow:
    values = []
    for column in COLUMNS:
        text = raw.get(column)
        if text is None:
            raise DLInfoError(f"{where}, column {column}: missing value")
        try:
            values.append(_PARSERS[column](text))
        except (ValueError, TypeError) as exc:
            raise DLInfoError(f"{where}, column {column}: {exc}: {text!r}") from exc
    row = LesionRow(*values)
    low, high = row.slice_range
    if not low <= row.key_slice_index <= high:
        raise DLInfoError(f"{where}, column Key_slice_index: {row.key_slice_index} outside Slice_range {low}-{high}")
    return row


def read_dl_info(path: str | Path) -> list[LesionRow]:
    """Parse DL_info.csv; :class:`DLInfoError` names the file, row (file line) and column of the first bad value."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = tuple(name.strip() for name in reader.fieldnames or ())
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise DLInfoError(f"{path}: header lacks column(s) {', '.join(missing)}")
        rows = []
        for raw in reader:
            raw = {k.strip(): v for k, v in raw.items() if k is not None}
            name = raw.get("File_name", "?")
            rows.append(_parse_row(raw, f"{path}: row {reader.line_num} ({name})"))
    return rows


def _format(value: object) -> str:
    if isinstance(value, tuple):
        return ", ".join(_format(v) for v in value)
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.6g}"
    if value is None:
        return "NaN"
    return str(value)


def write_dl_info(rows: Iterable[LesionRow], path: str | Path) -> Path:
    """Write rows in the official column order and number format, atomically (temporary name, then rename)."""
    path = Path(path)
    with atomic_path(path) as temporary, open(temporary, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([_format(getattr(row, f.name)) for f in fields(LesionRow)])
    return path
