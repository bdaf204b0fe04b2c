"""Write small synthetic CT DICOM series whose true HU and geometry the tests know exactly."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass
class SliceSpec:
    """One slice to write: its stored integer pixels, rescale, and where it sits."""

    stored: np.ndarray
    position: tuple[float, float, float]
    slope: float = 1.0
    intercept: float = -1024.0

    @property
    def hu(self) -> np.ndarray:
        return self.stored.astype(np.float64) * self.slope + self.intercept


@dataclass
class SeriesSpec:
    """A series: shared identity and geometry; ``slices`` in acquisition (not file) order."""

    slices: list[SliceSpec]
    orientation: tuple[float, ...] = AXIAL
    pixel_spacing: tuple[float, float] = (0.7, 0.8)  # (row spacing, column spacing)
    modality: str = "CT"
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    photometric: str = "MONOCHROME2"
    series_uid: str = field(default_factory=generate_uid)
    study_uid: str = "1.2.826.0.1.3680043.8.498.1"
    frame_of_reference_uid: str = "1.2.826.0.1.3680043.8.498.2"
    description: str = "synthetic"
    slice_thickness: float = 1.0


def make_slices(count: int, rows: int = 6, columns: int = 5, step: float = 2.5,
                orientation: tuple[float, ...] = AXIAL, origin=(-10.0, 20.0, 100.0),
                slopes=None, seed: int = 0) -> list[SliceSpec]:
    """``count`` slices ``step`` mm apart along the normal of ``orientation``, random stored values."""
    rng = np.random.default_rng(seed)
    normal = np.cross(orientation[:3], orientation[3:])
    slopes = slopes or [1.0] * count
    return [SliceSpec(rng.integers(0, 3000, size=(rows, columns), dtype=np.uint16),
                      tuple(np.asarray(origin) + k * step * normal), slope=slopes[k])
            for k in range(count)]


def slice_dataset(spec: SeriesSpec, s: SliceSpec, number: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = spec.series_uid
    ds.FrameOfReferenceUID = spec.frame_of_reference_uid
    ds.Modality = spec.modality
    ds.ImageType = list(spec.image_type)
    ds.SeriesDescription = spec.description
    ds.SeriesNumber = 3
    ds.InstanceNumber = number
    ds.PatientName = "Test^Secret"
    ds.PatientID = "SECRET-ID-42"
    ds.PatientSex = "F"
    ds.PatientAge = "061Y"
    ds.ImagePositionPatient = [f"{v:.6f}" for v in s.position]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in spec.orientation]
    ds.PixelSpacing = [f"{v:.6f}" for v in spec.pixel_spacing]
    ds.SliceThickness = spec.slice_thickness
    ds.Rows, ds.Columns = s.stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = spec.photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope = f"{s.slope:g}"
    ds.RescaleIntercept = f"{s.intercept:g}"
    ds.PixelData = s.stored.astype("<u2").tobytes()
    return ds


def write_series(folder: Path, spec: SeriesSpec, shuffle_seed: int | None = None, prefix: str = "IMG") -> list[Path]:
    """Write one file per slice; file names follow a shuffled order when ``shuffle_seed`` is given."""
    folder.mkdir(parents=True, exist_ok=True)
    order = np.arange(len(spec.slices))
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(order)
    paths = []
    for file_number, k in enumerate(order):
        path = folder / f"{prefix}{file_number:04d}.dcm"
        slice_dataset(spec, spec.slices[k], int(k) + 1).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
