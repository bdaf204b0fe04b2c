"""The one place where LPS and RAS meet.

DICOM and ITK describe patient space in **LPS** (x towards the patient's Left,
y Posterior, z Superior); NIfTI, nibabel and MONAI's default affines use
**RAS** (x Right, y Anterior, z Superior). The two differ by negating x and y.
Every conversion in ctzoo goes through :func:`lps_to_ras_affine` /
:func:`ras_to_lps_affine` (or :data:`LPS_RAS_FLIP` for points), so that a
sign error can only live here, where the tests look for it.
"""

from __future__ import annotations

import numpy as np

#: Diagonal matrix that maps LPS coordinates to RAS and back (it is its own inverse).
LPS_RAS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_to_ras_affine(affine_lps: np.ndarray) -> np.ndarray:
    """Turn a 4x4 voxel-to-LPS affine into the voxel-to-RAS affine of the same grid."""
    return LPS_RAS_FLIP @ np.asarray(affine_lps, dtype=float)


def ras_to_lps_affine(affine_ras: np.ndarray) -> np.ndarray:
    """Turn a 4x4 voxel-to-RAS affine into the voxel-to-LPS affine of the same grid."""
    return LPS_RAS_FLIP @ np.asarray(affine_ras, dtype=float)


def lps_to_ras_points(points: np.ndarray) -> np.ndarray:
    """Convert points of shape (..., 3) from LPS to RAS millimetres (or back: the map is an involution)."""
    return np.asarray(points, dtype=float) * LPS_RAS_FLIP.diagonal()[:3]


def affine_from_geometry(spacing, origin, direction) -> np.ndarray:
    """Build the 4x4 affine mapping ITK index order (i, j, k, 1) to physical mm.

    ``direction`` is 3x3 with one column per index axis (ITK convention);
    the affine lives in whatever space ``origin``/``direction`` live in.
    """
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(direction, dtype=float).reshape(3, 3) @ np.diag(np.asarray(spacing, dtype=float))
    affine[:3, 3] = np.asarray(origin, dtype=float)
    return affine


def geometry_from_affine(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], np.ndarray]:
    """Split a 4x4 affine into (spacing, origin, direction): the inverse of :func:`affine_from_geometry`."""
    affine = np.asarray(affine, dtype=float)
    linear = affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"affine has a zero-length axis: {affine.tolist()}")
    direction = linear / spacing
    return tuple(float(s) for s in spacing), tuple(float(o) for o in affine[:3, 3]), direction


def orientation_code(direction_lps: np.ndarray) -> str:
    """Three letters naming where each index axis (i, j, k) points in patient space.

    ``'LPS'`` means i runs towards the patient's left, j posterior, k superior:
    the usual axial CT stored in DICOM order. Axes are named by their dominant
    component, as nibabel's ``aff2axcodes`` does.
    """
    positive, negative = "LPS", "RAI"
    letters = []
    for axis in np.asarray(direction_lps, dtype=float).reshape(3, 3).T:
        dominant = int(np.argmax(np.abs(axis)))
        letters.append(positive[dominant] if axis[dominant] > 0 else negative[dominant])
    return "".join(letters)
