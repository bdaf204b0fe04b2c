"""Exact t-SNE (van der Maaten and Hinton, 2008) in numpy, written as the steps a secure protocol computes, so that
each secure step can be checked against the same step in the clear:

1. :func:`squared_distances`: ``D_ij = |x_i|^2 + |x_j|^2 - 2 x_i.x_j`` (the only term that mixes sites is the
   inner product);
2. :func:`conditional_p`: per row, the precision ``beta_i`` found by bisection so that the entropy of
   ``p_{j|i} ~ exp(-beta_i D_ij)`` is ``log(perplexity)``; a fixed number of halvings (no data-dependent stop),
   as a protocol must run it;
3. :func:`joint_p`: ``P = (P_cond + P_cond^T) / (2n)``;
4. :func:`gradient` and :func:`embed`: Student-t similarities ``q_ij``, the KL gradient
   ``4 sum_j (p_ij - q_ij)(y_i - y_j)/(1 + |y_i - y_j|^2)``, early exaggeration, momentum and gains as in the
   reference implementation; the initialisation is given, so two runs from the same one can be compared.

O(n^2) memory and time per iteration: for the hundreds to a few thousand lesions of a multi-site map, not for
millions. :func:`knn_agreement` compares two embeddings (the share of each point's k nearest neighbours they share).
"""

from __future__ import annotations

import numpy as np

BISECTION_STEPS = 64
#: The reference implementation's schedule.
EXAGGERATION, EXAGGERATION_ITERATIONS = 12.0, 250
MOMENTUM_EARLY, MOMENTUM_LATE = 0.5, 0.8
MIN_GAIN = 0.01


def squared_distances(x: np.ndarray) -> np.ndarray:
    """``(n, n)`` squared Euclidean distances of the rows of ``x`` (n, d), from norms and inner products, clipped
    at 0 and with an exact zero diagonal."""
    x = np.asarray(x, dtype=np.float64)
    norms = (x * x).sum(axis=1)
    d = np.maximum(norms[:, None] + norms[None, :] - 2.0 * x @ x.T, 0.0)
    np.fill_diagonal(d, 0.0)
    return d


def _row_entropy(d: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the conditional distribution at precision ``beta`` (diagonal excluded) and its entropy (nats)."""
    shifted = d - np.where(np.eye(len(d), dtype=bool), np.inf, d).min(axis=1, keepdims=True)  # for exp's range
    np.fill_diagonal(shifted, np.inf)  # exp(-inf) = 0: no point is its own neighbour
    weights = np.exp(-beta[:, None] * shifted)
    p = weights / weights.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return p, entropy


def conditional_p(d: np.ndarray, perplexity: float = 30.0, steps: int = BISECTION_STEPS) -> tuple[np.ndarray,
                                                                                                np.ndarray]:
    """``(P_cond (n, n), beta (n,))``: rows ``p_{j|i}`` whose entropy is ``log(perplexity)``, by ``steps``
    bisections of ``log(beta)`` between ``2^-40`` and ``2^40`` times ``1 / median(D_i)``."""
    n = len(d)
    if not 1 <= perplexity < n - 1:
        raise ValueError(f"perplexity must be at least 1 and below n - 1 = {n - 1}, got {perplexity}")
    off_diagonal = d[~np.eye(n, dtype=bool)].reshape(n, n - 1)
    scale = 1.0 / np.maximum(np.median(off_diagonal, axis=1), 1e-12)  # beta's scale: 1 / a typical distance
    low, high = np.full(n, -40.0 * np.log(2)), np.full(n, 40.0 * np.log(2))
    target = np.log(perplexity)
    for _ in range(steps):
        middle = (low + high) / 2
        _, entropy = _row_entropy(d, scale * np.exp(middle))
        too_flat = entropy > target  # too broad a distribution: raise the precision
        low, high = np.where(too_flat, middle, low), np.where(too_flat, high, middle)
    beta = scale * np.exp((low + high) / 2)
    return _row_entropy(d, beta)[0], beta


def joint_p(p_conditional: np.ndarray) -> np.ndarray:
    """Symmetrised joint probabilities ``(P + P^T) / (2n)``, summing to 1."""
    return (p_conditional + p_conditional.T) / (2.0 * len(p_conditional))


def student_q(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(Q (n, n), kernel (n, n))``: the Student-t similarities of the embedding ``y`` and their unnormalised
    kernel ``1 / (1 + |y_i - y_j|^2)`` (diagonal 0)."""
    kernel = 1.0 / (1.0 + squared_distances(y))
    np.fill_diagonal(kernel, 0.0)
    return kernel / kernel.sum(), kernel


def gradient(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The gradient of KL(P || Q) with respect to ``y`` (n, 2)."""
    q, kernel = student_q(y)
    weights = (p - q) * kernel
    return 4.0 * (weights.sum(axis=1, keepdims=True) * y - weights @ y)


def kl_divergence(p: np.ndarray, y: np.ndarray) -> float:
    q, _ = student_q(y)
    mask = p > 0
    return float((p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-300))).sum())


def initial_embedding(n: int, seed: int = 0) -> np.ndarray:
    """The reference initialisation: N(0, 1e-4) per coordinate, from ``seed``."""
    return np.random.default_rng(seed).normal(0.0, 1e-4, (n, 2))


def embed(p: np.ndarray, y0: np.ndarray, iterations: int = 1000, learning_rate: float = 200.0,
          early_iterations: int = EXAGGERATION_ITERATIONS) -> np.ndarray:
    """Gradient descent on KL(P || Q) from ``y0`` with the reference schedule: ``P`` exaggerated 12x for the first
    ``early_iterations`` (250), momentum 0.5 then 0.8, per-coordinate gains (+0.2 where ``grad > 0`` differs from
    ``update > 0``, else x0.8; at least 0.01), recentred each step: van der Maaten's reference ``tsne.py``."""
    y = np.array(y0, dtype=np.float64)
    update, gains = np.zeros_like(y), np.ones_like(y)
    for iteration in range(iterations):
        early = iteration < early_iterations
        grad = gradient(p * EXAGGERATION if early else p, y)
        gains = np.where((grad > 0) != (update > 0), gains + 0.2, gains * 0.8)
        gains = np.maximum(gains, MIN_GAIN)
        update = (MOMENTUM_EARLY if early else MOMENTUM_LATE) * update - learning_rate * gains * grad
        y = y + update
        y = y - y.mean(axis=0)
    return y


def tsne(x: np.ndarray, perplexity: float = 30.0, iterations: int = 1000, seed: int = 0) -> np.ndarray:
    """The whole plaintext pipeline on the rows of ``x``: distances, P, then :func:`embed` from
    :func:`initial_embedding` (``seed``)."""
    p_conditional, _ = conditional_p(squared_distances(x), perplexity)
    return embed(joint_p(p_conditional), initial_embedding(len(x), seed), iterations)


def knn_agreement(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """The mean share of each point's ``k`` nearest neighbours in ``a`` that are also among its ``k`` nearest in
    ``b`` (1: the same neighbourhoods)."""
    def neighbours(y: np.ndarray) -> np.ndarray:
        d = squared_distances(y)
        np.fill_diagonal(d, np.inf)
        return np.argsort(d, axis=1, kind="stable")[:, :k]

    first, second = neighbours(a), neighbours(b)
    return float(np.mean([len(set(r) & set(s)) / k for r, s in zip(first, second)]))
