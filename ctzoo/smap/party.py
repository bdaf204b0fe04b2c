"""One party of the joint t-SNE: a site that holds a site file (:mod:`ctzoo.smap.features`), connected to the other
parties over TCP by MPyC (Shamir secret sharing, honest majority: with 3 parties, any one party alone learns nothing
beyond what the run reveals; two that collude learn everything).

:func:`run_party` must run in a process of its own: MPyC reads its options (``-M`` parties, ``-I`` index, ``-P``
addresses) when ``mpyc.runtime`` is first imported, so this module imports it only there.

What each party learns: every party's point count and feature dimension, whether all parties embedded with the
same model weights (:func:`agree_on_inputs`), its own points' coordinates in the joint map, the map's extent and the
counts of all points per grid cell (:func:`joint_density`; minus its own, the others' density); every point, with
its site and label, only when every party sets ``share_points``. With ``reveal_p`` (tests and the comparison with
the plaintext t-SNE only) the joint P is opened to every party.

A party that drops out makes every other party exit (status :data:`EXIT_DROPPED`) with a message naming it, instead
of waiting forever for its shares (MPyC raises in its connection callback, where nothing can catch it, so the
callback is wrapped here); one that never connects ends the others' start after ``connect_timeout``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctzoo.smap.features import read_site
from ctzoo.smap.secure import off_diagonal_index, secure_conditional_p, secure_embed
from ctzoo.smap.tsne import initial_embedding

#: Feature values this large would overflow the fixed-point range of the squared distances (2^31).
MAX_ABS_FEATURE = 1000.0


#: The exit status of a party whose peer dropped out mid-run.
EXIT_DROPPED = 3


class PartyDropped(RuntimeError):
    """Another party did not connect in time."""


def mpyc_arguments(index: int, addresses: Sequence[str], ssl: bool = False) -> list[str]:
    """MPyC's command-line options for party ``index`` of ``addresses`` (``host:port`` each, in party order)."""
    arguments = ["-M", str(len(addresses)), "-I", str(index), "--no-log"]
    for address in addresses:
        arguments += ["-P", address]
    return arguments + (["--ssl"] if ssl else [])


def digest_words(text: str, words: int = 4) -> list[int]:
    """A hex digest as ``words`` integers of 60 bits (they fit a 64-bit secure integer)."""
    value = int(hashlib.sha256(text.encode()).hexdigest(), 16)
    return [(value >> (60 * k)) & ((1 << 60) - 1) for k in range(words)]


def options_words(options: Any) -> list[int]:
    """What every party must share of its run options (all but its own consent to share points), as words."""
    agreed = {k: v for k, v in vars(options).items() if k != "share_points"}
    return digest_words(repr(sorted(agreed.items())))


async def agree_on_inputs(mpc: Any, site: dict[str, Any], options: Any) -> list[int]:
    """Every party's point count (public), after checking that all have the same feature dimension, weights digest
    and run options (a party with other options would compute another map, or wait forever for rounds the others
    never run); each party opens only these numbers (secure integers, no pickled objects from the peers)."""
    secint = mpc.SecInt(64)
    mine = [len(site["labels"]), site["features"].shape[1], *digest_words(str(site["meta"].get("weights"))),
            *options_words(options)]
    shared = mpc.input([secint(v) for v in mine], senders=list(range(len(mpc.parties))))
    opened = [[int(v) for v in await mpc.output(values)] for values in shared]
    for pid, values in enumerate(opened):
        if values[1] != opened[0][1]:
            raise ValueError(f"party {pid} has {values[1]} features per lesion, party 0 {opened[0][1]}: every "
                             "site must embed with the same model")
        if values[2:6] != opened[0][2:6]:
            raise ValueError(f"party {pid} embedded with other model weights than party 0: every site must run "
                             "ctzoo smap features with the same model")
        if values[6:] != opened[0][6:]:
            raise ValueError(f"party {pid} runs with other options than party 0 (--perplexity, --iterations, "
                             "--learning-rate, --early-iterations, --seed, --grid, --insecure-reveal-p must match)")
    return [values[0] for values in opened]


def joint_from_conditional(mpc: Any, conditional: Any, n: int) -> Any:
    """``(P_cond + P_cond^T) / (2n)`` in the off-diagonal layout of :func:`off_diagonal_index`."""
    index = off_diagonal_index(n)
    rows = np.repeat(np.arange(n)[:, None], n - 1, axis=1)
    # P_cond[j, i] for the entry (i, j = index[i, k]): row j, column i or i - 1 (the diagonal is left out)
    transposed = conditional[index, np.where(rows < index, rows, rows - 1)]
    return (conditional + transposed) * (1.0 / (2 * n))


@dataclass(frozen=True)
class RunOptions:
    """What every party must run with (a party with other values computes another map)."""

    perplexity: float = 30.0
    iterations: int = 300
    learning_rate: float = 10.0
    #: Early exaggeration makes small joint maps depend chaotically on rounding (measured in docs/smap.md), so the
    #: secure default is none; the plaintext reference keeps its 250.
    early_iterations: int = 0
    seed: int = 0  # of the public initialisation, N(0, 1e-4) per coordinate
    grid: int = 24  # density cells per axis
    share_points: bool = False  # open every point to every party, if and only if every party says so
    reveal_p: bool = False  # testing and comparison only


def own_histogram(points: np.ndarray, extent: Sequence[float], grid: int) -> np.ndarray:
    """The (grid, grid) counts of ``points`` (m, 2) in the cells the protocol uses: a point is in the cell of the
    number of interior edges at or below it, per axis."""
    counts = np.zeros((grid, grid), dtype=np.int64)
    for x, y in points:
        counts[cell_of(x, extent[0], extent[1], grid), cell_of(y, extent[2], extent[3], grid)] += 1
    return counts


def cell_of(value: float, low: float, high: float, grid: int) -> int:
    edges = np.linspace(low, high, grid + 1)[1:-1]
    return int((value >= edges).sum())


async def joint_density(mpc: Any, y: Any, grid: int) -> tuple[list[float], np.ndarray]:
    """The map's extent (opened) and the (grid, grid) counts of all its points (opened), computed on the secret
    coordinates: per axis the comparisons with the interior edges give each point's one-hot cell, and the counts
    are one product of the two one-hot matrices."""
    low, high = mpc.np_amin(y, axis=0), mpc.np_amax(y, axis=0)
    extent_values = [float(v) for v in await mpc.output(mpc.np_hstack([low, high]))]
    extent = [extent_values[0], extent_values[2], extent_values[1], extent_values[3]]
    one_hot = []
    for axis in range(2):
        edges = np.linspace(extent[2 * axis], extent[2 * axis + 1], grid + 1)[1:-1]
        at_or_above = y[:, axis].reshape(-1, 1) >= edges.reshape(1, -1)  # (n, grid - 1) secret bits
        n = y.shape[0]
        ones, zeros = type(y).sectype.array(np.ones((n, 1))), type(y).sectype.array(np.zeros((n, 1)))
        one_hot.append(mpc.np_hstack([ones, at_or_above]) - mpc.np_hstack([at_or_above, zeros]))
    density = await mpc.output(one_hot[0].T @ one_hot[1])
    return extent, np.rint(np.asarray(density, dtype=np.float64)).astype(np.int64)


async def protocol(mpc: Any, site: dict[str, Any], options: RunOptions, connect_timeout: float) -> dict[str, Any]:
    """The run as one party sees it (see the module docstring)."""
    try:
        await asyncio.wait_for(mpc.start(), connect_timeout)
    except asyncio.TimeoutError:
        missing = [peer.pid for peer in mpc.parties if peer.pid != mpc.pid and peer.protocol is None]
        raise PartyDropped(f"parties {missing} did not connect within {connect_timeout:g} s: check that every "
                           "party runs with the same --party list; nothing was sent") from None
    sys.stderr.write(f"party {mpc.pid}: all {len(mpc.parties)} parties connected\n")
    sys.stderr.flush()
    try:
        counts = await agree_on_inputs(mpc, site, options)
        secfxp = mpc.SecFxp(64, 32)
        dim = site["features"].shape[1]
        parts = [mpc.input(secfxp.array(site["features"].astype(np.float64) if pid == mpc.pid else
                                        np.zeros((count, dim))), senders=pid) for pid, count in enumerate(counts)]
        points = mpc.np_vstack(parts)
        n = sum(counts)
        started = time.perf_counter()
        joint = joint_from_conditional(mpc, secure_conditional_p(mpc, points, options.perplexity), n)
        result: dict[str, Any] = {"counts": counts, "index": mpc.pid, "options": options}
        if options.reveal_p:
            result["p"] = np.asarray(await mpc.output(joint), dtype=np.float64)
        else:  # P's sum is 1 whatever the points: opening it reveals nothing and times P
            await mpc.output(mpc.np_sum(joint))
        p_done = time.perf_counter()
        y = secure_embed(mpc, joint, initial_embedding(n, options.seed), options.iterations, options.learning_rate,
                         options.early_iterations)
        await mpc.output(mpc.np_sum(y))  # the coordinates' sum is 0 (they are centred): times the iterations
        result["seconds"] = {"p": p_done - started, "embedding": time.perf_counter() - p_done}
        starts = np.cumsum([0, *counts])
        for pid in range(len(counts)):  # each party's points to that party only
            mine = await mpc.output(y[starts[pid]:starts[pid + 1]], receivers=[pid])
            if pid == mpc.pid:
                result["own"] = np.asarray(mine, dtype=np.float64).reshape(-1, 2)
        result["extent"], result["density"] = await joint_density(mpc, y, options.grid)
        result["others_density"] = result["density"] - own_histogram(result["own"], result["extent"], options.grid)
        secint = mpc.SecInt(16)
        consents = mpc.input(secint(int(options.share_points)), senders=list(range(len(counts))))
        result["shared"] = bool(await mpc.output(mpc.prod(consents)))
        if result["shared"]:
            labels = [mpc.input(secint.array(site["labels"].astype(np.int64) if pid == mpc.pid else
                                             np.zeros(count, dtype=np.int64)), senders=pid)
                      for pid, count in enumerate(counts)]
            result["all_points"] = np.asarray(await mpc.output(y), dtype=np.float64).reshape(-1, 2)
            result["all_labels"] = np.concatenate([np.asarray(await mpc.output(part), dtype=np.int64)
                                                   for part in labels])
            result["all_sites"] = np.repeat(np.arange(len(counts)), counts)
        result["bytes_sent"] = sum(peer.protocol.nbytes_sent for peer in mpc.parties if peer.pid != mpc.pid)
    finally:
        mpc._ctzoo_ending = True  # from here on, peers closing their connections is the normal end
        await mpc.shutdown()
    return result


def watch_connections(mpc: Any) -> None:
    """Make a lost connection to a peer end this party's process at once, with a clear message and
    :data:`EXIT_DROPPED` (module docstring): the secret program cannot go on without the peer's shares, nothing has
    been opened, and only an exit stops MPyC's already scheduled work."""
    from mpyc import asyncoro

    original = asyncoro.MessageExchanger.connection_lost

    def connection_lost(exchanger, exc):
        if getattr(mpc, "_ctzoo_ending", False):
            return original(exchanger, None)
        sys.stderr.write(f"Error: party {exchanger.peer_pid} dropped out (its connection was lost): the run is "
                         "aborted, nothing was opened and nothing written; start every party again\n")
        sys.stderr.flush()
        os._exit(EXIT_DROPPED)

    asyncoro.MessageExchanger.connection_lost = connection_lost


def listen_on_own_address(mpc: Any, address: str) -> None:
    """Make MPyC listen on this party's own host (``127.0.0.1`` on loopback) rather than on every interface, its
    default."""
    loop, host = mpc._loop, address.rsplit(":", 1)[0]
    create_server = loop.create_server

    async def create_server_on_host(factory, **options):
        options.setdefault("host", host)
        return await create_server(factory, **options)

    loop.create_server = create_server_on_host


def run_party(site_path: str | Path, index: int, addresses: Sequence[str], options: RunOptions = RunOptions(),
              ssl: bool = False, connect_timeout: float = 120.0) -> dict[str, Any]:
    """Run party ``index`` of ``addresses`` with the site file ``site_path``; return what it learns.

    Raises ValueError for a bad site file or inputs the parties do not agree on, :class:`PartyDropped` when a
    party does not connect within ``connect_timeout`` seconds; exits the process with :data:`EXIT_DROPPED` when a
    connected party drops out."""
    site = read_site(site_path)
    if np.abs(site["features"]).max() > MAX_ABS_FEATURE:
        raise ValueError(f"{site_path}: features above {MAX_ABS_FEATURE:g} in absolute value would overflow the "
                         "secure fixed-point range")
    if "mpyc.runtime" in sys.modules:
        raise RuntimeError("run_party needs a process of its own: mpyc.runtime was already imported here")
    sys.argv = [sys.argv[0], *mpyc_arguments(index, addresses, ssl)]
    from mpyc.runtime import mpc

    watch_connections(mpc)
    listen_on_own_address(mpc, addresses[index])
    return mpc.run(protocol(mpc, site, options, connect_timeout))
