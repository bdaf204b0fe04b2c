"""Bring any CT volume to LPS axial index order without resampling (axes permuted and flipped only)."""

from __future__ import annotations

import SimpleITK as sitk

from ctzoo.io.image_files import volume_from_sitk, volume_to_sitk
from ctzoo.io.volume import Volume


def reorient_lps(volume: Volume) -> Volume:
    """The volume resampled losslessly (axes permuted/flipped only) so index axes point L, P, S."""
    if volume.orientation == "LPS":
        return volume
    reoriented = volume_from_sitk(sitk.DICOMOrient(volume_to_sitk(volume), "LPS"))
    if reoriented.orientation != "LPS":
        raise ValueError(f"cannot bring orientation {volume.orientation} to LPS axial by permuting axes")
    return reoriented
