"""What a file or folder holds, as a JSON-friendly dict (used by ``ctzoo info``). No patient identifiers."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

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
    read_volume,
)
from ctzoo.io.pydicom_log import pydicom_messages_once


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
            return {"path": str(path), "kind": kind,
                    "volume": read_volume(path, series=series, rules=rules, progress=progress).describe()}
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
                info["volume"] = volume_from_series(chosen, scan.root, progress=progress).describe()
            except DicomError as exc:
                info["error"] = str(exc)
    return info
