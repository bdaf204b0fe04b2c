"""The voxel spacings a CT can have, checked when a volume's header is read.

A header with a voxel size no scanner produces (a unit mix-up, a zero or garbage ``pixdim``, a made-up 1 mm) is
refused before any voxel is read: measurements in mm on such a volume would be wrong, and resampling it to a
model's spacing would allocate in proportion to the bad number (a 32 x 32 slice at 1875 mm/pixel becomes a
30,000 x 30,000 one at 2 mm). Every reader of :mod:`ctzoo.io` applies it (``ctzoo infer``, ``ctzoo pacs``,
``ctzoo serve``'s study endpoints), as it applies :mod:`ctzoo.io.limits`. (A NIfTI with neither qform nor sform,
whose 1 mm and orientation nibabel would make up, is refused by the reader:
:class:`ctzoo.io.image_files.NoOrientation`.)

"In-plane" are the two index axes across the axial plane the models see, "slice" the one nearest the patient's
head-foot (S) axis, as :func:`ctzoo.io.reorient_lps` puts them.
"""

from __future__ import annotations

import math

import numpy as np

#: In-plane pixel spacing (mm): clinical CT is 0.2-1.5 mm, micro-CT and scouts stay within these bounds.
IN_PLANE_SPACING_MM = (0.05, 50.0)
#: Spacing between slices (mm): thin reconstructions are 0.5 mm, sparse ones 10-20 mm.
SLICE_SPACING_MM = (0.05, 100.0)


class ImplausibleSpacing(ValueError):
    """A volume whose header gives a voxel spacing no CT has (zero, not finite, or out of the bounds above)."""


def slice_axis(direction: np.ndarray) -> int:
    """The index axis (0, 1, 2 = i, j, k) nearest the patient's S axis: the one slices are taken along."""
    return int(np.argmax(np.abs(np.nan_to_num(np.asarray(direction, dtype=float).reshape(3, 3)[2]))))


def check_spacing(spacing, direction, what: str) -> None:
    """:class:`ImplausibleSpacing` naming ``what`` when ``spacing`` (mm, index order i, j, k) is not a CT's;
    ``direction`` (columns: the index axes in LPS) says which axis is the slice axis."""
    across = slice_axis(direction)
    for axis, mm in enumerate(spacing):
        kind, (low, high) = ("slice", SLICE_SPACING_MM) if axis == across else ("in-plane", IN_PLANE_SPACING_MM)
        if not (math.isfinite(mm) and low <= mm <= high):
            shown = " x ".join(f"{s:.4g}" for s in spacing)
            raise ImplausibleSpacing(
                f"{what}: voxel spacing {shown} mm is not a CT's ({kind} spacing must lie within {low:g}-{high:g} "
                "mm): the header's voxel size is wrong or missing")
