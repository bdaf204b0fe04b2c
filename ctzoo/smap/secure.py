"""The joint probabilities P of t-SNE computed on secret-shared points (MPyC: Shamir shares over a prime field,
fixed-point numbers ``SecFxp(64, 32)``), step for step the plaintext :func:`ctzoo.smap.tsne.conditional_p`:

1. ``D = |x_i|^2 + |x_j|^2 - 2 x_i.x_j`` of the stacked shared points (one secure matrix product);
2. per row, ``a_ij = beta_i (D_ij - min_j D_ij)`` (the shift keeps every weight ``exp(-a) <= 1`` and the nearest
   neighbour's at 1, as the plaintext code shifts for ``exp``'s range);
3. the precision ``beta_i`` by a search with **no data-dependent stop**, built from squarings and products, never a
   secure ``exp`` per step (doubling ``beta`` squares every weight, ``exp(-2a) = exp(-a)^2``):

   * locate: ``beta = beta0 16^L`` for L = 0 .. 7 (``beta0 = 2^-10 / mean_j (D_ij - min_j D_ij)``, so up to
     ``2^18 / mean``), four squarings apart; each row keeps the largest ``L`` whose entropy is still at least
     ``log(perplexity)``. The weights start at ``exp(-a)`` with ``a`` tiny, so the near neighbours' lose bits:
     good enough to find the scale, not for P. The products ``a w`` stand in for ``a``, which would outgrow the
     fixed-point range (``2 a w^2 = 2 (a w) w``);
   * refine, afresh from the distances at that scale: ``beta = beta_L 2^(s - 8)``, the weights' chain starting
     8 doublings below so that the near neighbours' ``a`` are small and their weights exact to a few units of the
     last place; ``a`` is clipped at 0.375 (one comparison per pair), which changes only weights below
     ``exp(-24)`` at the tested levels. Coarse: the largest ``s`` in 6 .. 12 whose entropy is still at least the
     target (``beta_L / 4`` .. ``16 beta_L``); fine: ``beta = beta_s (1 + sum_k b_k 2^-k)`` for k = 1 .. 16, the
     factors ``v_k = exp(-a_s 2^-k)`` one Taylor series at ``k = 16`` and squarings down to ``k = 1``; bit ``b_k``
     multiplies the weights by ``v_k`` when the entropy stays at least the target;
   * a row whose search ends at either end of that range (its lowest tested level already too sharp, or its
     highest and every fine bit still too flat: ``beta`` beyond about ``2^23 / mean``, where squared distances'
     last bits decide, or exact ties) is **saturated**: P's row is then flatter or sharper than the plaintext
     one. Only whether any row saturated is opened (one bit, :func:`secure_conditional_p`).

   The entropy test needs no logarithm: ``H = log Z + E_p[a] >= log perp  <=>  Z exp(E_p[a]) >= perp``, and
   ``0 <= E_p[a] <= log n`` bounds the one ``exp`` per row;
4. ``P_cond = w / Z`` and ``P = (P_cond + P_cond^T) / (2n)``.

Nothing else is opened on the way: comparisons give secret bits, used only as multipliers. ``n`` (each party's
count) and the feature dimension are public. Cost: about 200 secure products per pair of points, plus ``n`` row
minima (``n - 1`` comparisons each), one comparison per pair (the clip) and 8 + 7 + 16 comparisons per row; O(n^2).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ctzoo.smap.tsne import EXAGGERATION, MIN_GAIN, MOMENTUM_EARLY, MOMENTUM_LATE

#: Locating: beta = beta0 16^L for L = 0 .. LOCATE_LEVELS - 1 (beta0 = 2^-LOCATE_START / the row's mean shifted
#: distance), LOCATE_STEP doublings apart. The largest scale stays below 2^31, SecFxp(64, 32)'s range: beta0 is at
#: most 2^10 (the mean is floored at 2^-20) and 2^10 16^7 2^-REFINE_BELOW = 2^30.
LOCATE_START, LOCATE_LEVELS, LOCATE_STEP = 10, 8, 4
#: Refining: the weights' chain starts REFINE_BELOW doublings below the located level; levels REFINE_TESTED are
#: tested (two below the located level to four above it), then FINE_BITS fractional bits.
REFINE_BELOW, REFINE_TESTED, FINE_BITS = 8, range(6, 13), 16
#: The refining chain's largest starting ``a``: entries clipped there weigh at most exp(-CLIP 2^6) = exp(-24) <
#: 2^-34 at every tested level, while exp's Taylor series stays exact to 2^-31 below it.
CLIP = 0.375
TAYLOR_TERMS = 8
#: What a party and its page say when some point's precision search saturated (module docstring).
SATURATED = ("the secure precision search saturated for some point (near-duplicate lesions, or distances spanning "
             "more than about 2^23 between its near and its average neighbours): P and the map there may be "
             "flatter or sharper than the plaintext t-SNE's")


def exp_small(x: Any, terms: int = TAYLOR_TERMS) -> Any:
    """``e^x`` of a secret array ``x`` with ``|x| <~ 0.1`` by its Taylor series (Horner on the public coefficients
    ``1 / t!``: one secure product, so one truncation, a term; relative error ~1e-14)."""
    result = x * (1.0 / math.factorial(terms)) + 1.0 / math.factorial(terms - 1)
    for t in range(terms - 2, -1, -1):
        result = x * result + 1.0 / math.factorial(t)
    return result


def exp_bounded(x: Any, bound: float) -> Any:
    """``e^x`` of a secret array with ``0 <= x <= bound`` (public): the series at ``x / 2^k``, squared ``k`` times."""
    k = max(0, math.ceil(math.log2(max(bound, 1e-9) / 0.1)))
    result = exp_small(x * (1.0 / 2**k))
    for _ in range(k):
        result = result * result
    return result


def reciprocal_bounded(z: Any, upper: float, bits: int = 32) -> Any:
    """``1 / z`` of a secret array with ``1 <= z <= upper`` (public): Newton's ``y <- y (2 - z y)`` from
    ``y = 1 / upper``, which approaches ``1 / z`` from below without overshoot, its relative error
    ``(1 - z / upper)^(2^k)`` after ``k`` steps, so ``k`` is chosen for ``(1 - 1 / upper)^(2^k) <= 2^-bits``. Two
    products a step and no comparison: MPyC's general division first normalises ``z`` by a bit decomposition, many
    more rounds (measured: the 37 divisions by row sums in :func:`secure_conditional_p` took over a third of a
    party's time that way)."""
    shrink = 1.0 - 1.0 / upper
    steps = 0 if shrink <= 0 else max(0, math.ceil(math.log2(bits * math.log(2) / -math.log(shrink))))
    y = z * 0 + 1.0 / upper
    for _ in range(steps):
        y = y * (2 - z * y)
    return y


def off_diagonal_index(n: int) -> np.ndarray:
    """``(n, n - 1)`` column indices of every row without its diagonal."""
    return np.array([[j for j in range(n) if j != i] for i in range(n)], dtype=np.int64).reshape(n, n - 1)


def entropy_test(mpc: Any, n: int, perplexity: float) -> Any:
    """The test ``flat_enough(w, aw)``: per row of the weights ``w`` (n, n - 1) and the products ``a w`` of their
    exponents, the secret bit ``H >= log(perplexity)`` (the distribution is still at least that flat), as (n, 1)."""
    bound = math.log(n)

    def flat_enough(w: Any, aw: Any) -> Any:
        z = mpc.np_sum(w, axis=1)  # 1 <= z <= n - 1: the nearest neighbour's weight is 1, no other's above
        mean_a = mpc.np_sum(aw, axis=1) * reciprocal_bounded(z, n - 1)
        return (z * exp_bounded(mean_a, bound) >= perplexity).reshape(n, 1)

    return flat_enough


def locate_scale(mpc: Any, shifted: Any, flat_enough: Any) -> Any:
    """Per row (n, 1), ``beta_L 2^-REFINE_BELOW``: ``beta_L`` the largest of ``beta0 16^L`` (module docstring) at
    which the row is still flat enough, or ``beta0 / 16`` when none is."""
    n = shifted.shape[0]
    mean = mpc.np_sum(shifted, axis=1) * (1.0 / (n - 1))
    beta0 = (2.0**-LOCATE_START / (mean + 2.0**-20)).reshape(n, 1)
    a = shifted * beta0  # at most (n - 1) 2^-LOCATE_START: no shifted distance exceeds n - 1 times the mean
    weights = exp_bounded(-a, (n - 1) * 2.0**-LOCATE_START)
    aw = a * weights
    scale = beta0 * 2.0 ** (-LOCATE_STEP - REFINE_BELOW)
    for level in range(LOCATE_LEVELS):
        keep = flat_enough(weights, aw)
        scale = scale + keep * (beta0 * 2.0 ** (LOCATE_STEP * level - REFINE_BELOW) - scale)
        if level < LOCATE_LEVELS - 1:
            for _ in range(LOCATE_STEP):
                aw = aw * weights * 2  # a doubled, w squared: 2 a w^2 = 2 (a w) w
                weights = weights * weights
    return scale


def refine_weights(mpc: Any, shifted: Any, scale: Any, flat_enough: Any) -> tuple[Any, Any]:
    """The weights ``exp(-beta D)`` (n, n - 1) of every row at its precision, searched from ``scale``
    (:func:`locate_scale`), and per row (n, 1) the secret bit that its search ended at an end of its range."""
    a = shifted * scale
    a = a + (a >= CLIP) * (CLIP - a)
    weights = exp_small(-a)
    for _ in range(REFINE_TESTED.start):
        weights, a = weights * weights, a * 2
    kept_w, kept_a, keeps = weights, a, []
    for level in REFINE_TESTED:
        keeps.append(flat_enough(weights, a * weights))
        kept_w = kept_w + keeps[-1] * (weights - kept_w)
        kept_a = kept_a + keeps[-1] * (a - kept_a)
        if level < REFINE_TESTED[-1]:
            weights, a = weights * weights, a * 2
    # already below the target at the lowest level (beta stays there), or still above it at the highest, where
    # every fine bit set below means beta ends at the top
    too_sharp, too_flat = 1 - keeps[0], keeps[-1]
    factor = exp_small(-kept_a * 2.0**-FINE_BITS)
    factors = {FINE_BITS: factor}
    for k in range(FINE_BITS - 1, 0, -1):
        factor = factor * factor
        factors[k] = factor
    weights, a = kept_w, kept_a
    for k in range(1, FINE_BITS + 1):
        trial_w, trial_a = weights * factors[k], a + kept_a * 2.0**-k
        keep = flat_enough(trial_w, trial_a * trial_w)
        weights = weights + keep * (trial_w - weights)
        a = a + keep * (trial_a - a)
        too_flat = too_flat * keep
    return weights, too_sharp + too_flat - too_sharp * too_flat


def secure_conditional_p(mpc: Any, x: Any, perplexity: float) -> tuple[Any, Any]:
    """``(P_cond, saturated)``: ``P_cond`` without the diagonal, ``(n, n - 1)`` secret (column ``k`` of row ``i`` is
    point :func:`off_diagonal_index` ``[i, k]``), from the secret points ``x`` (n, d) on runtime ``mpc``, scaled so
    that every squared distance is at most 1 (:func:`ctzoo.smap.party.agree_on_scale`), and the secret bit that
    some row's precision search saturated (module docstring): that row of P may differ from the plaintext one."""
    n = x.shape[0]
    if not 1 <= perplexity < n - 1:
        raise ValueError(f"perplexity must be at least 1 and below n - 1 = {n - 1}, got {perplexity}")
    norms = mpc.np_sum(x * x, axis=1)
    distances = norms.reshape(n, 1) + norms.reshape(1, n) - 2 * (x @ x.T)
    rows = distances[np.arange(n)[:, None], off_diagonal_index(n)]
    shifted = rows - mpc.np_amin(rows, axis=1).reshape(n, 1)
    flat_enough = entropy_test(mpc, n, perplexity)
    weights, saturated = refine_weights(mpc, shifted, locate_scale(mpc, shifted, flat_enough), flat_enough)
    p = weights * reciprocal_bounded(mpc.np_sum(weights, axis=1), n - 1).reshape(n, 1)
    return p, mpc.np_any(saturated)


def full_matrix(off_diagonal: np.ndarray) -> np.ndarray:
    """A plain ``(n, n - 1)`` off-diagonal matrix as ``(n, n)`` with a zero diagonal."""
    n = off_diagonal.shape[0]
    full = np.zeros((n, n))
    full[np.arange(n)[:, None], off_diagonal_index(n)] = off_diagonal
    return full


def secure_embed(mpc: Any, p: Any, y0: np.ndarray, iterations: int, learning_rate: float = 200.0,
                 early_iterations: int = 250) -> Any:
    """:func:`ctzoo.smap.tsne.embed` on the secret joint ``p`` (off-diagonal layout, (n, n - 1)) from the public
    start ``y0``: the embedding stays secret throughout (returned as a secret (n, 2) array). Per iteration and
    pair of points: one secure reciprocal (the Student-t kernel) and about six products."""
    secfxp = type(p).sectype
    n = p.shape[0]
    index = off_diagonal_index(n)
    y = secfxp.array(np.asarray(y0, dtype=np.float64))
    update = secfxp.array(np.zeros((n, 2)))
    gains = secfxp.array(np.ones((n, 2)))
    for iteration in range(iterations):
        early = iteration < early_iterations
        difference = y.reshape(n, 1, 2) - y[index]  # (n, n - 1, 2): y_i - y_j
        kernel = 1 / (1 + mpc.np_sum(difference * difference, axis=2))
        q = kernel * (1 / mpc.np_sum(kernel))
        weights = ((p * EXAGGERATION if early else p) - q) * kernel
        grad = 4 * mpc.np_sum(weights.reshape(n, n - 1, 1) * difference, axis=1)
        flip = (grad > 0) + (update > 0)
        flip = flip - 2 * (grad > 0) * (update > 0)  # (grad > 0) xor (update > 0)
        gains = gains * 0.8 + flip * (gains * 0.2 + 0.2)
        gains = gains + (gains < MIN_GAIN) * (MIN_GAIN - gains)
        update = (MOMENTUM_EARLY if early else MOMENTUM_LATE) * update - learning_rate * gains * grad
        y = y + update
        y = y - mpc.np_sum(y, axis=0).reshape(1, 2) * (1.0 / n)
    return y
