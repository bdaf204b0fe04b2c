"""CT volumes in and out: :class:`Volume`, DICOM series, NIfTI, NRRD/MHA.

Axis and space conventions are stated once, on :class:`Volume`; LPS<->RAS
conversion lives only in :mod:`ctzoo.io.orientation`.

The readers import pydicom, SimpleITK and nibabel, about a second of start-up on a small machine. A process that
needs only :mod:`ctzoo.io.atomic` or :mod:`ctzoo.io.limits` (a secure-map party, a report) should not wait for
them, so the names below are imported on first use (PEP 562, as :mod:`ctzoo.nas` does for its supernet);
``from ctzoo.io import Volume`` reads as before.
"""

from __future__ import annotations

import importlib

#: Each public name and the submodule that defines it.
_SUBMODULE_OF = {
    "DicomError": "dicom_scan",
    "DicomWarning": "dicom_scan",
    "SeriesRules": "dicom_scan",
    "choose_series": "dicom_scan",
    "scan_folder": "dicom_scan",
    "read_dicom_series": "dicom_series",
    "derived_uid": "dicom_uids",
    "repair_uids": "dicom_uids",
    "NoOrientation": "image_files",
    "read_itk_image": "image_files",
    "read_nifti": "image_files",
    "read_volume": "image_files",
    "volume_from_sitk": "image_files",
    "volume_to_sitk": "image_files",
    "write_volume": "image_files",
    "LimitExceeded": "limits",
    "ResourceLimits": "limits",
    "UnsafeInput": "limits",
    "reorient_lps": "reorient",
    "ImplausibleSpacing": "spacing",
    "check_spacing": "spacing",
    "DicomSource": "volume",
    "Volume": "volume",
}

__all__ = sorted(_SUBMODULE_OF)


def __getattr__(name: str) -> object:
    if name not in _SUBMODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_SUBMODULE_OF[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULE_OF})
