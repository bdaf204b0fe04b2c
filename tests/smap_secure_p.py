"""``python tests/smap_secure_p.py CASES.npz OUT.npz``: the secure joint P of each case (``x{k}`` points,
``perplexity{k}``) with MPyC in this one process (one party: the same secure operations as a party of a run, without
the connections), scaled as ``agree_on_scale`` scales a run's features; writes ``p{k}`` (n, n) and ``saturated{k}``
(the bit a run opens)."""

from __future__ import annotations

import sys

import numpy as np


def secure_p(mpc, x: np.ndarray, perplexity: float) -> tuple[np.ndarray, bool]:
    from ctzoo.smap.party import feature_shift, joint_from_conditional, magnitude_exponent
    from ctzoo.smap.secure import full_matrix, secure_conditional_p

    scaled = x * 2.0 ** -feature_shift(magnitude_exponent(x), x.shape[1])

    async def run():
        points = mpc.SecFxp(64, 32).array(scaled, integral=False)
        conditional, saturated = secure_conditional_p(mpc, points, perplexity)
        joint = await mpc.output(joint_from_conditional(mpc, conditional, len(x)))
        return np.asarray(joint, dtype=np.float64), bool(await mpc.output(saturated))

    joint, saturated = mpc.run(run())
    return full_matrix(joint), saturated


if __name__ == "__main__":
    cases, out = sys.argv[1], sys.argv[2]
    sys.argv = [sys.argv[0], "--no-log"]  # mpyc parses the command line when first imported: give it its own
    from mpyc.runtime import mpc

    results = {}
    with np.load(cases) as arrays:
        mpc.run(mpc.start())
        for k in range(len(arrays.files) // 2):
            results[f"p{k}"], results[f"saturated{k}"] = secure_p(mpc, arrays[f"x{k}"], float(arrays[f"perplexity{k}"]))
        mpc.run(mpc.shutdown())
    with open(out, "wb") as handle:
        np.savez(handle, **results)
