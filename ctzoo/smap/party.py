"""One party of the joint t-SNE: a site that holds a site file (:mod:`ctzoo.smap.site_file`), connected to the other
parties over TCP by MPyC (Shamir secret sharing, honest majority: with 3 parties, any one party alone learns nothing
beyond what the run reveals; two that collude learn everything).

:func:`run_party` must run in a process of its own: MPyC reads its options (``-M`` parties, ``-I`` index, ``-P``
addresses) when ``mpyc.runtime`` is first imported, so this module imports it only there.

A party without lesions may join as a helper (:func:`helper_site`): two hospitals and a helper make the three
parties an honest majority needs; it learns what every party learns, less its own points (it has none).

What each party learns: every party's point count and feature dimension, whether all parties embedded with the
same model weights (:func:`agree_on_inputs`), the power of two above the largest absolute feature of all sites
(:func:`agree_on_scale`), whether some point's precision search saturated (one bit,
:func:`ctzoo.smap.secure.secure_conditional_p`), its own points' coordinates in the joint map, the map's extent and the
counts of all points per grid cell (:func:`joint_density`; minus its own, the others' density); every point, with
its site and label, only when every party sets ``share_points``. With ``reveal_p`` (tests and the comparison with
the plaintext t-SNE only) the joint P is opened to every party.

A party that drops out makes every other party exit (status :data:`~ctzoo.smap.connections.EXIT_DROPPED`) with a
message naming it, instead of waiting forever for its shares, and so does one that sends nothing for
``peer_timeout`` seconds while they wait for it (frozen, or cut off without its connection closing); one that never
connects ends the others' start after ``connect_timeout`` (:mod:`ctzoo.smap.connections`).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctzoo.smap.connections import (
    authenticate_peers,
    close_connections,
    connect,
    listen_on_own_address,
    refuse_pickles,
    split_address,
    watch_connections,
    watch_progress,
)
from ctzoo.smap.keys import check_key_folder
from ctzoo.smap.secure import off_diagonal_index, secure_conditional_p, secure_embed
from ctzoo.smap.site_file import read_site
from ctzoo.smap.tsne import conditional_p, embed, initial_embedding, joint_p, squared_distances

#: Every party divides its features by the same power of two (:func:`agree_on_scale`), so that every squared
#: distance is at most 1 whatever the features' scale; what still bounds the fixed-point precision is the
#: dimension d: each coordinate is then at most ``2^-(1 + ceil(log2(d) / 2))``, about ``1 / (2 sqrt(d))``, and at
#: this many dimensions that is still 2^23 times SecFxp(64, 32)'s resolution (2^-32).
MAX_FEATURE_DIM = 2**16
#: The exponent a party without features (a helper) or with all-zero features brings to :func:`agree_on_scale`.
NO_FEATURES = -1000
#: The exit status of a party stopped by SIGTERM (128 + 15, the shell's convention).
EXIT_TERMINATED = 143


def mpyc_arguments(index: int, addresses: Sequence[str], ssl: bool = False) -> list[str]:
    """MPyC's command-line options for party ``index`` of ``addresses`` (``host:port`` each, in party order).
    ``--mix32-64bit`` makes MPyC send arrays of shares as fixed-width integers instead of pickles, so a party never
    unpickles what a peer sends. An IPv6 host goes without its ``[]``: MPyC splits at the last colon and hands the
    host to the socket calls as it is."""
    arguments = ["-M", str(len(addresses)), "-I", str(index), "--no-log", "--mix32-64bit"]
    for address in addresses:
        arguments += ["-P", ":".join(split_address(address))]
    return arguments + (["--ssl"] if ssl else [])


def loopback_addresses(count: int, host: str = "127.0.0.1") -> list[str]:
    """``count`` ``HOST:PORT`` addresses on free ports of a loopback ``host`` (``::1`` gives ``[::1]:PORT``), to run
    every party on one machine (tests, trials)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets = [socket.socket(family) for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [f"[{host}]:{s.getsockname()[1]}" if ":" in host else f"{host}:{s.getsockname()[1]}" for s in sockets]
    finally:
        for s in sockets:
            s.close()


def on_loopback(address: str) -> bool:
    """Whether a ``host:port`` party address is on this machine's loopback interface."""
    host = split_address(address)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def digest_words(text: str, words: int = 4) -> list[int]:
    """A hex digest as ``words`` integers of 60 bits (they fit a 64-bit secure integer)."""
    value = int(hashlib.sha256(text.encode()).hexdigest(), 16)
    return [(value >> (60 * k)) & ((1 << 60) - 1) for k in range(words)]


def options_words(options: Any) -> list[int]:
    """What every party must share of its run options (all but its own consent to share points), as words."""
    agreed = {k: v for k, v in vars(options).items() if k != "share_points"}
    return digest_words(repr(sorted(agreed.items())))


def helper_site() -> dict[str, Any]:
    """What a helper party (``--helper``: a party without lesions, e.g. the third party two hospitals need for an
    honest majority) brings: no points."""
    return {"features": np.zeros((0, 0), dtype=np.float32), "labels": np.zeros(0, dtype=np.int16),
            "meta": {"weights": None}}


async def agree_on_inputs(mpc: Any, site: dict[str, Any], options: Any) -> tuple[list[int], int]:
    """Every party's point count (public) and the feature dimension, after checking that all sites (parties with
    points; helpers have none) have the same feature dimension and weights digest, and all parties the same run
    options (a party with other options would compute another map, or wait forever for rounds the others never
    run); each party opens only these numbers (secure integers, no pickled objects from the peers)."""
    secint = mpc.SecInt(64)
    mine = [len(site["labels"]), site["features"].shape[1], *digest_words(str(site["meta"].get("weights"))),
            *options_words(options)]
    shared = mpc.input([secint(v) for v in mine], senders=list(range(len(mpc.parties))))
    opened = [[int(v) for v in await mpc.output(values)] for values in shared]
    sites = [pid for pid, values in enumerate(opened) if values[0] > 0]
    if len(sites) < 2:
        raise ValueError(f"{len(sites)} of the {len(opened)} parties bring lesions: a joint map needs at least 2 "
                         "sites (the others may be --helper)")
    first = opened[sites[0]]
    for pid, values in enumerate(opened):
        if pid in sites and values[1] != first[1]:
            raise ValueError(f"party {pid} has {values[1]} features per lesion, party {sites[0]} {first[1]}: "
                             "every site must embed with the same model")
        if pid in sites and values[2:6] != first[2:6]:
            raise ValueError(f"party {pid} embedded with other model weights than party {sites[0]}: every site "
                             "must run ctzoo smap features with the same model")
        if values[6:] != opened[0][6:]:
            raise ValueError(f"party {pid} runs with other options than party 0 (--perplexity, --iterations, "
                             "--learning-rate, --early-iterations, --seed, --grid, --insecure-reveal-p, "
                             "--insecure-plaintext must match)")
    return [values[0] for values in opened], first[1]


def magnitude_exponent(features: np.ndarray) -> int:
    """The least ``e`` with ``max |features| < 2^e``; :data:`NO_FEATURES` when there are none, or all are 0."""
    largest = float(np.abs(features).max()) if features.size else 0.0
    return math.frexp(largest)[1] if largest > 0 else NO_FEATURES


def feature_shift(exponent: int, dim: int) -> int:
    """The ``k`` for which features below ``2^exponent`` in absolute value, times ``2^-k``, are ``dim``-dimensional
    points with every squared distance at most 1: a coordinate's difference is below ``2^(exponent + 1)``, so a
    squared distance below ``dim 2^(2 exponent + 2)``."""
    return exponent + 1 + math.ceil(math.log2(max(dim, 1)) / 2)


async def agree_on_scale(mpc: Any, features: np.ndarray, dim: int) -> int:
    """The power of two ``k`` every party divides its features by (:func:`feature_shift`), from the largest absolute
    feature of all sites: each party secret-shares the exponent of its own largest (:func:`magnitude_exponent`)
    and only their maximum is opened. t-SNE's P does not change when every point is scaled alike (each row's
    precision adapts), but the secure P is computed in fixed point: unscaled, features of a few hundred made the
    squared distances so large that the precision search's starting factor ``2^-10 / mean distance`` fell below
    the resolution and P drifted towards uniform; tiny features would lose their bits the same way."""
    exponents = mpc.input(mpc.SecInt(16)(magnitude_exponent(features)), senders=list(range(len(mpc.parties))))
    largest = int(await mpc.output(mpc.max(exponents)))
    if largest == NO_FEATURES:
        raise ValueError("every feature of every site is 0: the points cannot be told apart")
    return feature_shift(largest, dim)


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
    plaintext: bool = False  # open every party's points and compute in the clear (--insecure-plaintext)


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


async def protocol(mpc: Any, site: dict[str, Any], options: RunOptions, connect_timeout: float,
                   peer_timeout: float) -> dict[str, Any]:
    """The run as one party sees it (see the module docstring)."""
    await connect(mpc, connect_timeout)
    watch_progress(mpc, peer_timeout)
    sys.stderr.write(f"party {mpc.pid}: all {len(mpc.parties)} parties connected\n")
    sys.stderr.flush()
    try:
        counts, dim = await agree_on_inputs(mpc, site, options)
        shift = await agree_on_scale(mpc, site["features"], dim)
        scale = 2.0**-shift  # a power of two: the scaled features are exact
        secfxp = mpc.SecFxp(64, 32)
        # integral=False on every party: MPyC skips the truncation of products of values it knows are integers, so
        # a sender's flag (its data) and the others' (their zero placeholders) must agree, or the parties run
        # different protocols and wait on each other forever (a helper, or integer features, would)
        parts = [mpc.input(secfxp.array(site["features"].astype(np.float64) * scale if pid == mpc.pid else
                                        np.zeros((count, dim)), integral=False), senders=pid)
                 for pid, count in enumerate(counts) if count]  # a helper inputs nothing
        points = mpc.np_vstack(parts)
        result: dict[str, Any] = {"counts": counts, "index": mpc.pid, "options": options}
        if options.plaintext:
            opened = await open_points(mpc, site, counts, points)
        else:
            result.update(await secure_map(mpc, site, options, counts, points))
        result["bytes_sent"] = bytes_sent(mpc)
    finally:  # every party, also when all stop over inputs they do not agree on (never MPyC's shutdown: it pickles)
        await close_connections(mpc)
    if options.plaintext:  # after the connections closed: no peer waits (--peer-timeout) while this party computes
        result.update(plaintext_map(*opened, options, counts, mpc.pid))
    result["others_density"] = result["density"] - own_histogram(result["own"], result["extent"], options.grid)
    return result


def bytes_sent(mpc: Any) -> int:
    """What this party has sent to its peers so far (MPyC's count of message bytes, without TLS framing)."""
    return sum(peer.protocol.nbytes_sent for peer in mpc.parties if peer.pid != mpc.pid)


async def open_labels(mpc: Any, site: dict[str, Any], counts: Sequence[int]) -> np.ndarray:
    secint = mpc.SecInt(16)
    labels = [mpc.input(secint.array(site["labels"].astype(np.int64) if pid == mpc.pid else
                                     np.zeros(count, dtype=np.int64)), senders=pid)
              for pid, count in enumerate(counts) if count]
    return np.concatenate([np.asarray(await mpc.output(part), dtype=np.int64) for part in labels])


async def secure_map(mpc: Any, site: dict[str, Any], options: RunOptions, counts: Sequence[int],
                     points: Any) -> dict[str, Any]:
    """P and the embedding on the secret ``points``; what this party learns of them (module docstring)."""
    n = sum(counts)
    result: dict[str, Any] = {}
    started, bytes_before = time.perf_counter(), bytes_sent(mpc)
    conditional, saturated = secure_conditional_p(mpc, points, options.perplexity)
    joint = joint_from_conditional(mpc, conditional, n)
    if options.reveal_p:
        result["p"] = np.asarray(await mpc.output(joint), dtype=np.float64)
    else:  # P's sum is 1 whatever the points: opening it reveals nothing and times P
        await mpc.output(mpc.np_sum(joint))
    # one bit for the whole run, not which rows: a map whose P departs from the plaintext one is reported, not hidden
    result["p_saturated"] = bool(await mpc.output(saturated))
    p_done, bytes_p = time.perf_counter(), bytes_sent(mpc)
    y = secure_embed(mpc, joint, initial_embedding(n, options.seed), options.iterations, options.learning_rate,
                     options.early_iterations)
    await mpc.output(mpc.np_sum(y))  # the coordinates' sum is 0 (they are centred): times the iterations
    result["seconds"] = {"p": p_done - started, "embedding": time.perf_counter() - p_done}
    result["bytes_phases"] = {"p": bytes_p - bytes_before, "embedding": bytes_sent(mpc) - bytes_p}
    starts = np.cumsum([0, *counts])
    result["own"] = np.zeros((0, 2))  # a helper's
    for pid in range(len(counts)):  # each site's points to that site only
        if counts[pid]:
            mine = await mpc.output(y[starts[pid]:starts[pid + 1]], receivers=[pid])
            if pid == mpc.pid:
                result["own"] = np.asarray(mine, dtype=np.float64).reshape(-1, 2)
    result["extent"], result["density"] = await joint_density(mpc, y, options.grid)
    secint = mpc.SecInt(16)
    consents = mpc.input(secint(int(options.share_points)), senders=list(range(len(counts))))
    result["shared"] = bool(await mpc.output(mpc.prod(consents)))
    if result["shared"]:
        result["all_labels"] = await open_labels(mpc, site, counts)
        result["all_points"] = np.asarray(await mpc.output(y), dtype=np.float64).reshape(-1, 2)
        result["all_sites"] = np.repeat(np.arange(len(counts)), counts)
    return result


async def open_points(mpc: Any, site: dict[str, Any], counts: Sequence[int], points: Any) -> tuple[np.ndarray,
                                                                                                np.ndarray]:
    """``--insecure-plaintext``: every party's points and labels, opened to every party."""
    x = np.asarray(await mpc.output(points), dtype=np.float64)
    return x, await open_labels(mpc, site, counts)


def plaintext_map(x: np.ndarray, labels: np.ndarray, options: RunOptions, counts: Sequence[int],
                  pid: int) -> dict[str, Any]:
    """``--insecure-plaintext``: the plaintext t-SNE (:mod:`ctzoo.smap.tsne`) of every party's opened points
    (:func:`open_points`), which every party computes alike with the same options: for sites that may share, and the
    comparison with the secure run (same transport, same outputs)."""
    started = time.perf_counter()
    n = len(x)
    p = joint_p(conditional_p(squared_distances(x), options.perplexity)[0])
    p_done = time.perf_counter()
    y = embed(p, initial_embedding(n, options.seed), options.iterations, options.learning_rate,
              options.early_iterations)
    starts = np.cumsum([0, *counts])
    extent = [float(y[:, 0].min()), float(y[:, 0].max()), float(y[:, 1].min()), float(y[:, 1].max())]
    result = {"seconds": {"p": p_done - started, "embedding": time.perf_counter() - p_done},
              "bytes_phases": {"p": 0, "embedding": 0}, "p_saturated": False,
              "own": y[starts[pid]:starts[pid + 1]], "extent": extent,
              "density": own_histogram(y, extent, options.grid), "shared": True, "all_points": y,
              "all_labels": labels, "all_sites": np.repeat(np.arange(len(counts)), counts)}
    if options.reveal_p:
        result["p"] = p[np.arange(n)[:, None], off_diagonal_index(n)]
    return result


def run_party(site_path: str | Path | None, index: int, addresses: Sequence[str], options: RunOptions = RunOptions(),
              keys: str | Path | None = None, connect_timeout: float = 120.0,
              peer_timeout: float = 300.0) -> dict[str, Any]:
    """Run party ``index`` of ``addresses`` with the site file ``site_path`` (None: a helper, :func:`helper_site`);
    return what it learns. With ``keys`` (a folder of :func:`ctzoo.smap.keys.make_party_keys`) every connection is
    mutually authenticated TLS; without, plain TCP (loopback tests only).

    Raises ValueError for a bad site file, key folder or inputs the parties do not agree on,
    :class:`~ctzoo.smap.connections.AuthenticationFailed` when a peer fails TLS authentication,
    :class:`~ctzoo.smap.connections.PartyDropped` when a party does not connect within ``connect_timeout`` seconds,
    :class:`~ctzoo.smap.connections.CannotListen` when this party cannot listen on its own address;
    exits the process with :data:`~ctzoo.smap.connections.EXIT_DROPPED` when a connected party drops out, or sends
    nothing for ``peer_timeout`` seconds while this party waits for it."""
    site = helper_site() if site_path is None else read_site(site_path)
    if site["features"].shape[1] > MAX_FEATURE_DIM:
        raise ValueError(f"{site_path}: {site['features'].shape[1]} features per lesion, above the "
                         f"{MAX_FEATURE_DIM} the secure fixed-point numbers resolve (each coordinate, scaled so "
                         "that squared distances stay at most 1, would keep too few bits)")
    if "mpyc.runtime" in sys.modules:
        raise RuntimeError("run_party needs a process of its own: mpyc.runtime was already imported here")
    if keys is not None:
        keys = check_key_folder(keys, index).resolve()
    sys.argv = [sys.argv[0], *mpyc_arguments(index, addresses, ssl=keys is not None)]
    from mpyc.runtime import mpc

    refuse_pickles(sys.modules["mpyc.runtime"])
    mpc._ctzoo_failure = mpc._loop.create_future()
    watch_connections(mpc)
    listen_on_own_address(mpc, addresses[index])
    if keys is None:
        return mpc.run(protocol(mpc, site, options, connect_timeout, peer_timeout))
    authenticate_peers(mpc)
    with sigterm_exits():
        cwd, scratch = Path.cwd(), Path(tempfile.mkdtemp(prefix="ctzoo-smap-"))

        def leave_scratch() -> None:
            os.chdir(cwd)
            shutil.rmtree(scratch, ignore_errors=True)

        try:
            (scratch / ".config").symlink_to(keys, target_is_directory=True)
            os.chdir(scratch)  # MPyC reads the keys from ./.config (its only way to be told where they are)
            # Once connected MPyC has read them: the folder goes then, since a party that drops out later ends with
            # os._exit (watch_connections), which cleans nothing up, and a killed one cannot either.
            mpc._ctzoo_after_start = leave_scratch
            return mpc.run(protocol(mpc, site, options, connect_timeout, peer_timeout))
        finally:
            leave_scratch()


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """While the block runs in the main thread, SIGTERM (``kill``, ``systemctl stop``) raises SystemExit with
    :data:`EXIT_TERMINATED`, so ``finally`` clauses run (Python's default ends the process at once: a party stopped
    while it waited for the others left its scratch folder, with a link to its key folder, behind); the previous
    handler is restored after. ``ctzoo infer`` has the like for its run, in the CLI, which this layer cannot
    import."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        sys.stderr.write("Stopped (SIGTERM): nothing written\n")
        raise SystemExit(EXIT_TERMINATED)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
