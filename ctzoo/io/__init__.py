"""CT volumes in and out: :class:`Volume`, DICOM series, NIfTI, NRRD/MHA.

Axis and space conventions are stated once, on :class:`Volume`; LPS<->RAS
conversion lives only in :mod:`ctzoo.io.orientation`.
"""

from ctzoo.io.dicom_scan import (
    DicomError,
    DicomWarning,
    SeriesRules,
    choose_series,
    scan_folder,
)
from ctzoo.io.dicom_series import read_dicom_series
from ctzoo.io.dicom_uids import derived_uid, repair_uids
from ctzoo.io.image_files import (
    read_itk_image,
    read_nifti,
    read_volume,
    volume_from_sitk,
    volume_to_sitk,
    write_volume,
)
from ctzoo.io.limits import LimitExceeded, ResourceLimits, UnsafeInput
from ctzoo.io.reorient import reorient_lps
from ctzoo.io.volume import DicomSource, Volume

__all__ = [
    "DicomError",
    "DicomSource",
    "DicomWarning",
    "LimitExceeded",
    "ResourceLimits",
    "SeriesRules",
    "UnsafeInput",
    "Volume",
    "choose_series",
    "derived_uid",
    "read_dicom_series",
    "read_itk_image",
    "read_nifti",
    "read_volume",
    "reorient_lps",
    "repair_uids",
    "scan_folder",
    "volume_from_sitk",
    "volume_to_sitk",
    "write_volume",
]
