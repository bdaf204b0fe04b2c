"""Vectors in 2-D for the pages (the NAS explorer's candidates, the cohort report's lesions): PCA by numpy SVD."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Embedding(NamedTuple):
    points: np.ndarray  #: (n, 2): each vector's first two principal-component scores
    explained: tuple[float, float]  #: the share of the variance on each axis


def embedding(vectors: list[list[float]] | np.ndarray) -> Embedding:
    """The vectors in 2-D by PCA (SVD of the centred vectors). Deterministic: each axis's sign is chosen so that
    its largest loading (the first of equal ones) is positive. Fewer than two vectors, or fewer than two
    dimensions of spread, leave the missing axes at 0."""
    x = np.asarray(vectors, dtype=float)
    x = x.reshape(0, 0) if x.size == 0 and x.ndim == 1 else x  # no vectors at all
    if x.ndim != 2:
        raise ValueError(f"embedding needs n vectors of one length, not an array of shape {x.shape}")
    points, explained = np.zeros((len(x), 2)), np.zeros(2)
    if len(x) >= 2 and x.shape[1]:
        u, s, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
        k = min(2, len(s))
        signs = np.sign(vt[np.arange(k), np.abs(vt[:k]).argmax(axis=1)])
        points[:, :k] = u[:, :k] * s[:k] * np.where(signs == 0, 1.0, signs)
        total = float((s ** 2).sum())
        if total > 0:
            explained[:k] = s[:k] ** 2 / total
    return Embedding(points, (float(explained[0]), float(explained[1])))
