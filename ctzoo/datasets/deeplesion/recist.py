"""RECIST annotations as RECIST-Net keypoints.

A RECIST measurement is two diameters on the key slice: the long axis (the
lesion's largest in-plane diameter) and the short axis (its largest diameter
perpendicular to the long one). RECIST-Net detects their four end points and
their centre. Conventions, used everywhere in ctzoo:

* Points are ``(x, y)`` = (column, row) in **0-based pixel coordinates**, the
  centre of the top-left pixel at (0, 0). DeepLesion's CSV is 1-based (3DCE and
  MULAN subtract 1), so :func:`points_from_measurement` subtracts 1.
* The five points of a lesion come in this order, shape ``(5, 2)``::

      0 long_a   1 long_b   2 short_a   3 short_b   4 centre

  Within each pair, ``a`` is the **left** end point (smaller x); on a vertical
  axis (equal x) the **upper** one (smaller y). The order is a function of the
  geometry only, so after any flip or rotation :func:`canonical_order` restores
  it, and a detector's heatmap channels always mean the same thing.
* The centre is where the two diameters' lines **intersect** (as MULAN builds
  its RECIST polygon), not the mean of the end points.
* A lesion's box is the tight box of its four end points, padded by
  :data:`DEEPLESION_BOX_PAD` pixels of the *original* image: that is how
  DeepLesion's own ``Bounding_boxes`` column was made.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LONG_A, LONG_B, SHORT_A, SHORT_B, CENTRE = range(5)
POINT_NAMES = ("long_a", "long_b", "short_a", "short_b", "centre")
#: DeepLesion's Bounding_boxes are the RECIST end points' box padded by this many pixels.
DEEPLESION_BOX_PAD = 5.0
#: |dx| below this (pixels) counts as a vertical axis when ordering a pair: well above float32 noise after
#: a rotate-and-invert round trip (~1e-5 px), well below any real annotation difference.
VERTICAL_EPS = 1e-3


def canonical_order(points: np.ndarray) -> np.ndarray:
    """Reorder each end-point pair of ``points`` (..., 4 or 5, 2) so ``a`` is left (or, on a vertical axis, upper)."""
    points = np.array(points, dtype=np.float64, copy=True)
    for a, b in ((LONG_A, LONG_B), (SHORT_A, SHORT_B)):
        delta = points[..., b, :] - points[..., a, :]
        swap = (delta[..., 0] < -VERTICAL_EPS) | ((np.abs(delta[..., 0]) <= VERTICAL_EPS) & (delta[..., 1] < 0))
        first = points[..., a, :].copy()
        points[..., a, :] = np.where(swap[..., None], points[..., b, :], first)
        points[..., b, :] = np.where(swap[..., None], first, points[..., b, :])
    return points


def recist_centre(endpoints: np.ndarray) -> np.ndarray:
    """Intersection of the long-axis and short-axis lines of ``endpoints`` (4, 2).

    Falls back to the mean of the four points when the axes are (nearly) parallel or the lines meet
    outside the points' box (a malformed annotation), so the centre is always on the lesion.
    """
    p, q = endpoints[LONG_A], endpoints[LONG_B]
    r, s = endpoints[SHORT_A], endpoints[SHORT_B]
    d1, d2 = q - p, s - r
    denominator = d1[0] * d2[1] - d1[1] * d2[0]
    mean = endpoints[:4].mean(axis=0)
    if abs(denominator) < 1e-9 * max(np.dot(d1, d1) * np.dot(d2, d2), 1e-12) ** 0.5:
        return mean
    t = ((r[0] - p[0]) * d2[1] - (r[1] - p[1]) * d2[0]) / denominator
    centre = p + t * d1
    low, high = endpoints[:4].min(axis=0), endpoints[:4].max(axis=0)
    if np.any(centre < low - 1e-6) or np.any(centre > high + 1e-6):
        return mean
    return centre


def points_from_measurement(coordinates, one_based: bool = True) -> np.ndarray:
    """DeepLesion ``Measurement_coordinates`` (8 numbers: long-axis ends, then short-axis ends) -> (5, 2) points."""
    values = np.asarray(coordinates, dtype=np.float64).reshape(4, 2) - (1.0 if one_based else 0.0)
    ordered = canonical_order(values)
    return np.vstack([ordered, recist_centre(ordered)[None]])


def box_from_points(points: np.ndarray, pad: float = 0.0) -> np.ndarray:
    """(..., 4) boxes [x1, y1, x2, y2] around the four end points of ``points`` (..., 4 or 5, 2), padded by ``pad``."""
    endpoints = np.asarray(points, dtype=np.float64)[..., :4, :]
    return np.concatenate([endpoints.min(axis=-2) - pad, endpoints.max(axis=-2) + pad], axis=-1)


def diameters(points: np.ndarray, spacing_xy=(1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """Long and short axis lengths of ``points`` (..., 4 or 5, 2): (pixels, mm), each (..., 2) = (long, short)."""
    points = np.asarray(points, dtype=np.float64)
    scale = np.asarray(spacing_xy, dtype=np.float64)
    long_vec = points[..., LONG_B, :] - points[..., LONG_A, :]
    short_vec = points[..., SHORT_B, :] - points[..., SHORT_A, :]
    pixels = np.stack([np.linalg.norm(long_vec, axis=-1), np.linalg.norm(short_vec, axis=-1)], axis=-1)
    mm = np.stack([np.linalg.norm(long_vec * scale, axis=-1), np.linalg.norm(short_vec * scale, axis=-1)], axis=-1)
    return pixels, mm


@dataclass
class RecistTargets:
    """One lesion's RECIST-Net targets in the pixel frame they were computed for."""

    points: np.ndarray  # (5, 2) long_a, long_b, short_a, short_b, centre; (x, y), 0-based
    box: np.ndarray  # (4,) x1, y1, x2, y2: end points' box padded like DeepLesion's
    diameters_px: np.ndarray  # (2,) long, short
    diameters_mm: np.ndarray  # (2,) long, short

    @classmethod
    def from_measurement(cls, coordinates, spacing_xy, one_based: bool = True,
                         pad: float = DEEPLESION_BOX_PAD) -> RecistTargets:
        points = points_from_measurement(coordinates, one_based)
        pixels, mm = diameters(points, spacing_xy)
        return cls(points, box_from_points(points, pad), pixels, mm)
