"""Series that a PACS bridge must refuse, made from the real sample series: another modality, too few slices,
a corrupt instance. Each gets its own Series and SOP Instance UIDs (derived from ``name``)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid


def variant_series(sources: Sequence[Path], out: Path, name: str, count: int | None = None,
                   modality: str | None = None, truncate_pixels_of: int | None = None,
                   patient_id: str | None = None) -> list[Path]:
    """Write a copy of the first ``count`` files of ``sources`` as a new series under ``out/name``.

    ``modality="MR"`` makes it an MR series (SOP class too); ``truncate_pixels_of=i`` decompresses the
    series and cuts the pixel data of its i-th slice short (a well-formed file whose image cannot be decoded).
    """
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid(entropy_srcs=["ctzoo-test-series", name])
    paths = []
    for index, source in enumerate(sources[:count]):
        ds = pydicom.dcmread(source)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["ctzoo-test-instance", name, str(index)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if patient_id is not None:
            ds.PatientID = patient_id
        if modality == "MR":
            ds.Modality = "MR"
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        if truncate_pixels_of is not None:
            ds.decompress()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            if index == truncate_pixels_of:
                ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
        path = folder / source.name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def lowest_slices(series: Path, count: int, out: Path) -> Path:
    """Copy the ``count`` most inferior slices of the DICOM ``series`` (by ImagePositionPatient z, unchanged files)
    into the new folder ``out``: a short real series, for tests whose model time grows with the slices."""
    out.mkdir(parents=True)
    for path in _by_height(series)[:count]:
        shutil.copy(path, out / path.name)
    return out


def move_lowest_slice(series: Path, down_mm: float) -> Path:
    """Move the most inferior slice of the DICOM ``series`` ``down_mm`` further down (its ImagePositionPatient z
    only, pixels untouched): a gap of about ``down_mm / step`` missing slices above it. Returns the file moved."""
    lowest = _by_height(series)[0]
    ds = pydicom.dcmread(lowest)
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x, y, z - down_mm]
    ds.save_as(lowest)
    return lowest


def _by_height(series: Path) -> list[Path]:
    """The sample-named files (``CT.*``) of ``series``, lowest ImagePositionPatient z first."""
    return sorted(series.glob("CT.*"), key=lambda path: float(
        pydicom.dcmread(path, stop_before_pixels=True, force=True).ImagePositionPatient[2]))
