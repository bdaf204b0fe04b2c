"""What a file or folder holds, as a JSON-friendly dict (used by ``ctzoo info``). No patient identifiers."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import SimpleITK as sitk

from ctzoo.io.dicom_scan import (
    DicomError,
    DicomWarning,
    SeriesRules,
    choose_series,
    dicom_folder,
    scan_folder,
)
from ctzoo.io.dicom_series import volume_from_series
from ctzoo.io.image_files import (
    ITK_READ_SUFFIXES,
    NIFTI_SUFFIXES,
    file_suffix,
    itk_pixel_dtype,
    read_volume,
)
from ctzoo.io.pydicom_log import pydicom_messages_once
from ctzoo.io.volume import Volume


def describe_path(path: str | Path, series: str | None = None, rules: SeriesRules | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Describe ``path``: for DICOM every series found and the one chosen; for any input the volume read.

    A DICOM folder whose series cannot be read still gets its series listing, with the error.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    rules = rules or SeriesRules()
    with warnings.catch_warnings(), pydicom_messages_once():
        # the warnings are returned in the description; do not print them twice
        warnings.simplefilter("ignore", DicomWarning)
        if not (path.is_dir() or file_suffix(path) == ".zip"):
            kind = ("nifti" if file_suffix(path) in NIFTI_SUFFIXES
                    else "itk" if file_suffix(path) in ITK_READ_SUFFIXES else "dicom-file")
            volume = read_volume(path, series=series, rules=rules, progress=progress)
            return {"path": str(path), "kind": kind, "volume": _described(volume, path, kind)}
        with dicom_folder(path) as (folder, display_root):
            scan = scan_folder(folder, display_root, progress=progress)
            scan.root = str(path)
            info: dict[str, Any] = {
                "path": str(path),
                # a folder or zip without DICOM is not called a DICOM one
                "kind": ("dicom-zip" if display_root else "dicom-folder") if scan.series
                        else ("zip" if display_root else "folder"),
                "series": [s.summary(rules) for s in scan.series],
                "non_dicom_files": len(scan.not_dicom),
                "other_volumes": sorted(str(Path(p).relative_to(folder)) if display_root is None else p
                                        for p in scan.not_dicom
                                        if file_suffix(Path(p)) in NIFTI_SUFFIXES + ITK_READ_SUFFIXES),
                "chosen_series": None,
                "volume": None,
                "error": None,
            }
            try:
                chosen = choose_series(scan, rules, series)
                info["chosen_series"] = chosen.index
                info["volume"] = _described(volume_from_series(chosen, scan.root, progress=progress), path, "dicom")
            except DicomError as exc:
                info["error"] = str(exc)
    return info


def _described(volume: Volume, path: Path, kind: str) -> dict[str, Any]:
    """``volume.describe()`` with ``dtype`` the voxel type the input stores, not the float32 it was read as, and
    for a NIfTI whose header scales its values (``scl_slope``, ``scl_inter``) that scaling as ``dtype_scaling``."""
    scaling = None
    if kind == "nifti":
        image = nib.load(str(path))  # the header only; nibabel moves scl_slope, scl_inter into the data proxy
        stored = image.get_data_dtype().name
        slope, intercept = float(image.dataobj.slope), float(image.dataobj.inter)
        if (slope, intercept) != (1.0, 0.0):
            scaling = {"slope": slope, "intercept": intercept}
    elif kind == "itk":
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        stored = itk_pixel_dtype(reader.GetPixelID()).name
    else:
        stored = _dicom_stored_dtype(volume)
    description = volume.describe(stored_dtype=stored)
    if scaling is not None:
        description["dtype_scaling"] = scaling
    return description


def _dicom_stored_dtype(volume: Volume) -> str | None:
    """The type of the pixel values a DICOM series stores (BitsAllocated, PixelRepresentation: 1 signed), before
    each slice's RescaleSlope and RescaleIntercept make HU of them; None where its first slice does not say."""
    header = volume.dicom.headers[0] if volume.dicom is not None and volume.dicom.headers else None
    bits = header.get("BitsAllocated") if header is not None else None
    if bits is None or header.get("PixelRepresentation") is None:
        return None
    return f"{'' if int(header.PixelRepresentation) else 'u'}int{int(bits)}"
