"""RECIST diameters measured from a lesion mask on one slice, the way radiologists measure them.

* **Long axis**: the lesion's largest in-plane diameter, i.e. the maximal Feret
  diameter between mask pixel centres. The farthest pair of a point set lies on
  its convex hull, so only hull vertices are compared.
* **Short axis**: the longest chord perpendicular to the long axis that lies
  inside the lesion and crosses the long axis. Chords are sampled at sub-pixel
  steps along the long axis; "inside" uses the same pixel-centre convention as
  the long axis (a point is inside when the pixel centres around it all are),
  so both diameters run between the outermost mask pixel centres.

Lengths and angles are measured in millimetres (``spacing_xy``), so the axes are
perpendicular in the patient even when x and y spacing differ. Points are
returned in ``ctzoo.datasets.deeplesion.recist`` conventions: 0-based (x, y) =
(column, row), each pair ordered left end first.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import ConvexHull, QhullError

from ctzoo.datasets.deeplesion.recist import canonical_order

#: Sampling steps as fractions of the finer pixel spacing: along the long axis, and along each chord.
_STEP_ALONG = 0.25
_STEP_CHORD = 0.1
_REFINE_ITERATIONS = 20


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Hull vertices (H, 2) of ``points`` (N, 2); degenerate (collinear or tiny) sets are returned whole."""
    unique = np.unique(points, axis=0)
    try:
        return unique[ConvexHull(unique).vertices]
    except QhullError:  # all points on one line: the max-distance pair is still among them
        return unique


def _outline_points(mask: np.ndarray) -> np.ndarray:
    """(x, y) pixel centres (N, 2) of each row's leftmost and rightmost mask pixel: their hull is the mask's hull."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.arange(mask.shape[1])
    inside = mask[rows]
    left = np.where(inside, cols, mask.shape[1]).min(axis=1)
    right = np.where(inside, cols, -1).max(axis=1)
    return np.concatenate([np.stack([left, rows], 1), np.stack([right, rows], 1)]).astype(np.float64)


def _inside(mask: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether continuous pixel points lie inside the mask's pixel-centre domain (all surrounding centres set)."""
    rows, cols = mask.shape
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    x1, y1 = np.ceil(x).astype(np.int64), np.ceil(y).astype(np.int64)
    valid = (x0 >= 0) & (y0 >= 0) & (x1 < cols) & (y1 < rows)
    x0, x1, y0, y1 = (np.clip(v, 0, limit - 1) for v, limit in ((x0, cols), (x1, cols), (y0, rows), (y1, rows)))
    return valid & mask[y0, x0] & mask[y0, x1] & mask[y1, x0] & mask[y1, x1]


def _run_end(mask: np.ndarray, start_mm: np.ndarray, direction_mm: np.ndarray, inside_mm: float,
             outside_mm: float, scale: np.ndarray) -> float:
    """Bisect the boundary along ``start + s * direction`` between an inside and an outside distance (mm)."""
    for _ in range(_REFINE_ITERATIONS):
        middle = 0.5 * (inside_mm + outside_mm)
        point = (start_mm + middle * direction_mm) / scale
        if _inside(mask, point[None, 0], point[None, 1])[0]:
            inside_mm = middle
        else:
            outside_mm = middle
    return inside_mm


def _short_axis(mask: np.ndarray, long_a_mm: np.ndarray, long_b_mm: np.ndarray, scale: np.ndarray,
                hull_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """End points (mm) of the longest inside chord perpendicular to the long axis that crosses it."""
    length = float(np.linalg.norm(long_b_mm - long_a_mm))
    along = (long_b_mm - long_a_mm) / length
    normal = np.array([-along[1], along[0]])
    step = float(scale.min())
    t = np.arange(0.0, length + 1e-9, _STEP_ALONG * step)
    # chords cannot leave the hull: bound the sampled offsets by its extent across the long axis
    offsets_on_hull = (hull_mm - long_a_mm) @ normal
    below = np.arange(0.0, offsets_on_hull.min() - _STEP_CHORD * step, -_STEP_CHORD * step)[::-1]
    above = np.arange(0.0, offsets_on_hull.max() + _STEP_CHORD * step, _STEP_CHORD * step)[1:]
    sigma = np.concatenate([below, above])
    zero = len(below) - 1
    centres = long_a_mm + t[:, None] * along  # (T, 2)
    points = (centres[:, None, :] + sigma[None, :, None] * normal) / scale  # (T, S, 2) in pixels
    inside = _inside(mask, points[..., 0], points[..., 1])
    # the run containing the long axis: extend from sigma = 0 until the first outside sample each way
    up = np.cumprod(inside[:, zero:], axis=1).sum(axis=1)  # samples inside, counting sigma = 0
    down = np.cumprod(inside[:, zero::-1], axis=1).sum(axis=1)
    crossing = up > 0
    if not crossing.any():
        return long_a_mm, long_a_mm
    hi = np.where(crossing, sigma[np.minimum(zero + up - 1, len(sigma) - 1)], 0.0)
    lo = np.where(crossing, sigma[np.maximum(zero - down + 1, 0)], 0.0)
    lengths = np.where(crossing, hi - lo, -1.0)
    # among chords as long as the longest (to the sampling step), take the one nearest the long axis' middle,
    # as a reader would (a rectangle has a whole plateau of equally long perpendicular chords)
    near_longest = lengths >= lengths.max() - 1.01 * _STEP_CHORD * step
    best = int(np.argmin(np.where(near_longest, np.abs(t - 0.5 * length), np.inf)))
    top, bottom = zero + up[best], zero - down[best]
    hi_mm = (_run_end(mask, centres[best], normal, hi[best], sigma[top], scale)
             if top < len(sigma) else hi[best])
    lo_mm = (-_run_end(mask, centres[best], -normal, -lo[best], -sigma[bottom], scale)
             if bottom >= 0 else lo[best])
    return centres[best] + lo_mm * normal, centres[best] + hi_mm * normal


def measure_recist(mask: np.ndarray, spacing_xy=(1.0, 1.0)) -> np.ndarray:
    """RECIST end points of a lesion mask (rows, cols) bool, measured in mm with ``spacing_xy`` = (x, y) mm/pixel.

    Returns (8,) float64: 0-based pixel (x, y) of long_a, long_b, short_a, short_b, each pair ordered left end
    first (see :func:`ctzoo.datasets.deeplesion.recist.canonical_order`). A one-pixel mask gives four equal points.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or not mask.any():
        raise ValueError(f"measure_recist needs a non-empty 2-D mask, got shape {mask.shape} with {mask.sum()} pixels")
    scale = np.asarray(spacing_xy, dtype=np.float64)
    hull_mm = _convex_hull(_outline_points(mask) * scale)
    if len(hull_mm) == 1:
        return np.tile(hull_mm[0] / scale, 4)
    squared = ((hull_mm[:, None, :] - hull_mm[None, :, :]) ** 2).sum(axis=-1)
    i, j = np.unravel_index(int(np.argmax(squared)), squared.shape)
    long_a, long_b = hull_mm[i], hull_mm[j]
    short_a, short_b = _short_axis(mask, long_a, long_b, scale, hull_mm)
    points = np.stack([long_a, long_b, short_a, short_b]) / scale
    return canonical_order(points).reshape(8)
