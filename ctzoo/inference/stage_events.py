"""Batch inference's stages as events of the latency anomaly detector (:mod:`ctzoo.perf`, ``--perf``).

Per case: ``read`` (read + decode + the NaN check) and ``preprocess`` (reorient, resample, the model's inputs),
both timed inside the reader while it works, not while it waits for the model to take its slices (so they mean
the same with ``--workers 0``, where the reader runs in the main process, as with reader processes), then
``finish`` (post-processing of the model's outputs) and ``write`` (the files). Per batch: ``predict``. Case
stages are keyed by the case's slice count (bucketed, :func:`ctzoo.perf.slice_bucket`), ``predict`` by the
batch's rows. Everything is recorded in the driver process (the one running the pipeline or the Ray job), from
timings measured where the stage ran.

Context never names the input: ``case`` is the case's position among the cases this run processes, and
``series_hash`` a keyed hash of its path that groups one case's events without revealing the path (the key is
this process's, random, so the hash cannot be reversed by guessing paths). A ``predict`` event names the cases
its batch's slices came from: ``cases`` and ``series_hashes``, comma-separated (:func:`batch_context`).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

from ctzoo.perf import event_key

_HASH_KEY = os.urandom(16)


def series_hash(path: str | Path) -> str:
    return hashlib.blake2b(str(path).encode(), key=_HASH_KEY, digest_size=8).hexdigest()


def case_context(index: int, path: str | Path, end: dict[str, Any], runtime: dict[str, Any]) -> dict[str, Any]:
    """What explains a case's stage times: its slices and spacing, the reader that read it, the backend."""
    spacing = end.get("spacing")
    return {"case": index, "series_hash": series_hash(path), "slices": end["slices"],
            "spacing": "x".join(f"{s:.3g}" for s in spacing) if spacing is not None else None,
            "reader": end.get("worker"), "backend": runtime.get("backend")}


def record_case_stages(perf, model: str, version: str, device: str, context: dict[str, Any],
                       reader_s: dict[str, float], started_at: float, writer_s: dict[str, float]) -> None:
    """One event per case stage: ``reader_s`` (read, preprocess, from ``started_at``) and ``writer_s`` (finish,
    write, ending now)."""
    slices = context["slices"]
    started = started_at
    for stage in ("read", "preprocess"):
        if stage in reader_s:
            perf.record(event_key(model, version, stage, device, slices), reader_s[stage], started, context)
            started += reader_s[stage]
    started = time.time() - sum(writer_s.values())
    for stage in ("finish", "write"):
        if stage in writer_s:
            perf.record(event_key(model, version, stage, device, slices), writer_s[stage], started, context)
            started += writer_s[stage]


def batch_context(cases: list[int], paths: list[str | Path], backend: str | None) -> dict[str, Any]:
    """What names a batch's members: the positions of the ``cases`` its slices came from and their series hashes
    (``paths``: every case's path, by position), comma-separated as a served batch lists its ``requests``."""
    members = sorted(set(cases))
    return {"cases": ",".join(map(str, members)),
            "series_hashes": ",".join(series_hash(paths[case]) for case in members), "backend": backend}


def record_batch(perf, model: str, version: str, device: str, rows: int, seconds: float,
                 context: dict[str, Any], profile=None) -> None:
    """One ``predict`` event: a batch of ``rows`` slices that took ``seconds`` on the backend (``profile``: its
    rerun under a profiler, taken if the event is anomalous and deep profiles are armed)."""
    perf.record(event_key(model, version, "predict", device, rows), seconds, context={"batch": rows, **context},
                profile=profile)
