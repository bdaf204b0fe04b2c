"""Whether an image slice's geometry and rescale values can be used, checked when its header is read.

A malformed value would otherwise surface later as a raw exception naming no file (PixelSpacing with one value: a
TypeError; ImagePositionPatient with two: numpy's matmul error) or, worse, as a volume read without a word:
direction cosines that are not unit length (``[2, 0, 0, 0, 2, 0]``) scale every slice position along the normal
(a wrong slice spacing and a bogus gantry-tilt warning), and a RescaleSlope of 0 turns a slice into one flat value.
:func:`slice_value_problem` says what is wrong, for a message naming the file.
"""

from __future__ import annotations

import math

import numpy as np
import pydicom
from pydicom.multival import MultiValue
from pydicom.valuerep import DA, DT, TM

#: How many numbers each geometry attribute holds.
GEOMETRY_VALUE_COUNTS = {"ImagePositionPatient": 3, "ImageOrientationPatient": 6, "PixelSpacing": 2}
#: The values a DICOM writer (highdicom) accepts for PatientSex; anything else is refused there.
PATIENT_SEX_VALUES = ("M", "F", "O")
#: Value representations a DICOM writer converts to dates and times, refusing a value not in DICOM's format.
_CONVERTERS = {"DA": DA, "DT": DT, "TM": TM}
#: How far direction cosines may be from unit length, and their dot product from 0 (files round them to a few
#: digits; a real error is far larger).
COSINE_TOLERANCE = 1e-3


def numbers(ds: pydicom.Dataset, keyword: str) -> list[float]:
    """The numbers of a decimal-string attribute (one value or several); ValueError where one is not a number."""
    try:
        value = ds[keyword].value
    except (ValueError, TypeError) as exc:  # pydicom converts a DS on first access: 'abc' raises there
        raise ValueError(f"{keyword} is not numeric ({exc})") from None
    if value in (None, ""):
        return []
    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    try:
        return [float(v) for v in values]
    except (ValueError, TypeError):
        raise ValueError(f"{keyword} {[str(v) for v in values]} is not numeric") from None


def slice_value_problem(ds: pydicom.Dataset) -> str:
    """'' when the geometry (ImagePositionPatient, ImageOrientationPatient, PixelSpacing, Rows, Columns) and the
    rescale (RescaleSlope, RescaleIntercept, where present) of an image slice's header can be used, else what is
    wrong with the first one that cannot."""
    try:
        for keyword, count in GEOMETRY_VALUE_COUNTS.items():
            values = numbers(ds, keyword)
            if len(values) != count:
                return f"{keyword} holds {len(values)} value(s) {values}, not {count}"
            if not all(math.isfinite(v) for v in values):
                return f"{keyword} {values} is not finite"
        problem = orientation_problem(numbers(ds, "ImageOrientationPatient"))
        if problem:
            return problem
        for keyword in ("Rows", "Columns"):
            if int(ds.get(keyword)) < 1:
                return f"{keyword} is {ds.get(keyword)}"
        return rescale_problem(ds)
    except ValueError as exc:
        return str(exc)


def orientation_problem(cosines: list[float]) -> str:
    """'' when the six values of ImageOrientationPatient are two perpendicular unit vectors (the row and column
    directions), else what they are instead."""
    row, column = np.asarray(cosines[:3]), np.asarray(cosines[3:])
    lengths = [float(np.linalg.norm(row)), float(np.linalg.norm(column))]
    if any(abs(length - 1) > COSINE_TOLERANCE for length in lengths):
        return (f"ImageOrientationPatient {cosines}: direction cosines of length {lengths[0]:.4g} and "
                f"{lengths[1]:.4g}, not 1")
    if abs(float(row @ column)) > COSINE_TOLERANCE:
        angle = math.degrees(math.acos(max(-1.0, min(1.0, float(row @ column)))))
        return f"ImageOrientationPatient {cosines}: row and column directions {angle:.1f} deg apart, not 90"
    return ""


def rescale_problem(ds: pydicom.Dataset) -> str:
    """'' when RescaleSlope (where present) is a positive number and RescaleIntercept (where present) a finite one;
    a slope of 0 makes every pixel the intercept."""
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        if keyword not in ds:
            continue
        values = numbers(ds, keyword)
        if not values:
            return f"{keyword} is empty"
        if len(values) != 1 or not math.isfinite(values[0]):
            return f"{keyword} {values} is not one finite number"
        if keyword == "RescaleSlope" and values[0] <= 0:
            return f"RescaleSlope is {values[0]:g}; HU need a positive slope"
    return ""


def unwritable(ds: pydicom.Dataset, keyword: str) -> bool:
    """Whether ``ds``'s ``keyword`` (present) holds a value a DICOM writer refuses to copy into a result: a date or
    time not in DICOM's format (PatientBirthDate '1970-01-31'), a PatientSex other than M, F or O, or a value pydicom
    cannot decode. An empty value is writable."""
    try:
        element = ds[keyword]
        value = element.value
    except (ValueError, TypeError):
        return True
    if value in (None, ""):
        return False
    if keyword == "PatientSex":
        return str(value) not in PATIENT_SEX_VALUES
    converter = _CONVERTERS.get(element.VR)
    if converter is None:
        return False
    try:
        converter(value)
    except (ValueError, TypeError):
        return True
    return False
