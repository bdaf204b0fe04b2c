"""The cohort table's context modality: one row per CT series, from its DICOM headers (or a volume file's header,
or DeepLesion's ``DL_info.csv``), with every missing field an explicit :data:`UNKNOWN`, never a dropped row.

HealthPrism (arXiv 2307.12242) profiles individuals from two modalities, context and measured signals; for a CT zoo
the context is what the study's headers say about the patient, the scanner and the protocol:

* patient: ``age_years`` (PatientAge ``045Y``/``006M``/``010W``/``003D``; the birth date is never read) and its
  ``age_band``, ``sex``;
* scanner: ``manufacturer``, ``model``;
* protocol: ``kvp``, ``tube_current_ma``, ``kernel`` (ConvolutionKernel, several values joined by ``/``),
  ``slice_thickness_mm``, ``spacing_x_mm``/``spacing_y_mm``/``spacing_z_mm`` (the volume's), ``slices``,
  ``contrast`` (``yes`` when ContrastBolusAgent names an agent, else unknown: an empty tag does not prove a
  non-contrast scan) and ``contrast_agent``, ``body_part``;
* DeepLesion rows add ``window_low_hu``/``window_high_hu``, ``lesions``, ``lesion_types``, ``lesion_long_mm``
  (the largest long axis) and ``lesion_z`` (mean normalised location) from the CSV.

Identifiers never enter the table: ``patient``, ``study`` and ``series`` are salted SHA-256 digests
(:func:`ctzoo.io.privacy.patient_hash`) of PatientID, StudyInstanceUID and SeriesInstanceUID (DeepLesion: its
patient index and ``{patient}_{study}_{series}`` folder), cut to 16 hex digits.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ctzoo.datasets.deeplesion.info_csv import LesionRow
from ctzoo.io.privacy import patient_hash
from ctzoo.io.volume import Volume

UNKNOWN = "unknown"
#: Columns of every row, in the table's order (the DeepLesion ones are unknown for DICOM and volume files).
COLUMNS = ("patient", "study", "series", "source", "age_years", "age_band", "sex", "manufacturer", "model", "kvp",
           "tube_current_ma", "kernel", "slice_thickness_mm", "spacing_x_mm", "spacing_y_mm", "spacing_z_mm",
           "slices", "contrast", "contrast_agent", "body_part", "window_low_hu", "window_high_hu", "lesions",
           "lesion_types", "lesion_long_mm", "lesion_z")
#: Columns that group studies (the report's subgroups); numbers are grouped through their bands.
GROUPING = ("source", "age_band", "sex", "manufacturer", "model", "kernel", "thickness_band", "contrast", "body_part")
AGE_BANDS = ((0, 40, "<40"), (40, 60, "40-59"), (60, 80, "60-79"), (80, math.inf, "80+"))
THICKNESS_BANDS = ((0, 1.5, "<1.5 mm"), (1.5, 3.0, "1.5-2.9 mm"), (3.0, 5.0, "3-4.9 mm"), (5.0, math.inf, "5+ mm"))
HASH_DIGITS = 16
#: The train/val/test split's key (:func:`split_bucket`): fixed and public, so the split is the same whatever the
#: table's salt; the salt is for pseudonymisation only.
SPLIT_KEY = "ctzoo cohort split"
SPLIT_BUCKET_DIGITS = 2
_AGE = re.compile(r"^(\d{1,3})([YMWD])$")
_AGE_UNIT_YEARS = {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}


def hashed(identifier: str, salt: str) -> str:
    """An identifier as the table keeps it; :data:`UNKNOWN` for an empty one."""
    return patient_hash(identifier, salt)[:HASH_DIGITS] if identifier else UNKNOWN


def split_bucket(identifier: str) -> int:
    """The patient's split bucket, 0-255: 8 bits of its hash under :data:`SPLIT_KEY`. The same patient falls in the
    same bucket in every build; 8 bits are too few to name a patient, where a whole unsalted hash could be matched
    against every candidate ID."""
    return int(patient_hash(identifier, SPLIT_KEY)[:SPLIT_BUCKET_DIGITS], 16)


def dicom_age(text: str) -> float | None:
    """Years from a DICOM Age String (``045Y``, ``006M``, ``010W``, ``003D``); None when absent or malformed."""
    match = _AGE.match(str(text or "").strip().upper())
    return None if match is None else round(int(match.group(1)) * _AGE_UNIT_YEARS[match.group(2)], 2)


def band(value: Any, bands: Sequence[tuple[float, float, str]]) -> str:
    """The label of the half-open band holding ``value``; :data:`UNKNOWN` for a missing one."""
    if not isinstance(value, int | float) or not math.isfinite(value):
        return UNKNOWN
    return next(label for low, high, label in bands if low <= value < high)


def _text(header: Any, keyword: str) -> str:
    value = getattr(header, keyword, None) if header is not None else None
    if value is None:
        return UNKNOWN
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        text = str(value).strip()
    else:  # multi-valued (ConvolutionKernel "B30f"\"SMOOTH")
        text = "/".join(str(v).strip() for v in value if str(v).strip())
    return text or UNKNOWN


def _number(header: Any, keyword: str) -> float | None:
    value = getattr(header, keyword, None) if header is not None else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return round(number, 3) if math.isfinite(number) else None


def sex_code(text: str) -> str:
    return {"M": "M", "F": "F", "O": "O"}.get(str(text or "").strip().upper(), UNKNOWN)


def blank_row(source: str) -> dict[str, Any]:
    """Every column unknown (numbers None), ``source`` set."""
    row: dict[str, Any] = {column: UNKNOWN for column in COLUMNS}
    for column in ("age_years", "kvp", "tube_current_ma", "slice_thickness_mm", "spacing_x_mm", "spacing_y_mm",
                   "spacing_z_mm", "slices", "window_low_hu", "window_high_hu", "lesions", "lesion_long_mm",
                   "lesion_z"):
        row[column] = None
    return row | {"source": source}


def with_bands(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with its derived groups: ``age_band`` and ``thickness_band``."""
    thickness = row["slice_thickness_mm"] if row["slice_thickness_mm"] is not None else row["spacing_z_mm"]
    return row | {"age_band": band(row["age_years"], AGE_BANDS), "thickness_band": band(thickness, THICKNESS_BANDS)}


def volume_context(volume: Volume, salt: str, name: str) -> dict[str, Any]:
    """The context row of a volume: its first slice's DICOM header when it came from DICOM (``source`` dicom),
    else only what a NIfTI/NRRD/MHA header holds (spacing, slices; ``source`` volume, the series keyed by
    ``name``)."""
    spacing = {f"spacing_{axis}_mm": round(float(s), 6) for axis, s in zip("xyz", volume.spacing, strict=True)}
    dicom = volume.dicom
    if dicom is None:
        return with_bands(blank_row("volume") | spacing | {"series": hashed(name, salt),
                                                           "slices": int(volume.array.shape[0])})
    header = dicom.headers[0] if dicom.headers else None
    agent = _text(header, "ContrastBolusAgent")
    row = blank_row("dicom") | spacing | {
        "patient": hashed(str(getattr(header, "PatientID", "") or ""), salt),
        "study": hashed(dicom.study_instance_uid, salt), "series": hashed(dicom.series_instance_uid, salt),
        "age_years": dicom_age(dicom.patient_age or _text(header, "PatientAge")),
        "sex": sex_code(dicom.patient_sex or _text(header, "PatientSex")),
        "manufacturer": _text(header, "Manufacturer"), "model": _text(header, "ManufacturerModelName"),
        "kvp": _number(header, "KVP"), "tube_current_ma": _number(header, "XRayTubeCurrent"),
        "kernel": _text(header, "ConvolutionKernel"), "slice_thickness_mm": _number(header, "SliceThickness"),
        "slices": int(volume.array.shape[0]), "contrast": "yes" if agent != UNKNOWN else UNKNOWN,
        "contrast_agent": agent, "body_part": dicom.body_part_examined.strip().upper() or UNKNOWN}
    return with_bands(row)


def deeplesion_context(rows: Iterable[LesionRow], salt: str) -> list[dict[str, Any]]:
    """One context row per DeepLesion series (``{patient}_{study}_{series}`` folder) of ``DL_info.csv`` rows:
    age, sex, spacing, the window of its first row (rows of one series may name different windows) and the
    series' lesions (count, coarse types, largest long axis in mm, mean normalised z)."""
    series: dict[str, list[LesionRow]] = {}
    for row in rows:
        series.setdefault(row.series_folder, []).append(row)
    table = []
    for folder, lesions in sorted(series.items()):
        first = lesions[0]
        x_mm, y_mm, z_mm = first.spacing_mm_px
        long_mm = [lesion.lesion_diameters_px[0] * x_mm for lesion in lesions if lesion.lesion_diameters_px[0] > 0]
        types = sorted({lesion.lesion_type for lesion in lesions})
        table.append(with_bands(blank_row("deeplesion") | {
            "patient": hashed(str(first.patient_index), salt),
            "study": hashed(f"{first.patient_index}_{first.study_index}", salt), "series": hashed(folder, salt),
            "age_years": first.patient_age, "sex": sex_code(first.patient_gender),
            "spacing_x_mm": x_mm, "spacing_y_mm": y_mm, "spacing_z_mm": z_mm,
            "window_low_hu": first.dicom_windows[0], "window_high_hu": first.dicom_windows[1],
            "lesions": len(lesions), "lesion_types": "/".join(types),
            "lesion_long_mm": round(max(long_mm), 2) if long_mm else None,
            "lesion_z": round(sum(lesion.normalized_lesion_location[2] for lesion in lesions) / len(lesions), 4)}))
    return table


def group_counts(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """Per grouping column, how many rows hold each value, :data:`UNKNOWN` included (largest first)."""
    counts: dict[str, dict[str, int]] = {}
    for column in GROUPING:
        values: dict[str, int] = {}
        for row in rows:
            values[str(row[column])] = values.get(str(row[column]), 0) + 1
        counts[column] = dict(sorted(values.items(), key=lambda item: (-item[1], item[0])))
    return counts
