"""A training run's end-of-epoch files (checkpoints, summary, metrics table, curves) written in a background thread.

Why: ``torch.save`` of the model and optimiser, and matplotlib drawing the curves, take from tens of milliseconds
to seconds per epoch (``benchmarks/train.py`` measures them), during which the next epoch's batches would wait. The
loop hands the writer a CPU copy of the state (one memory copy, taken at once, so the next steps cannot change
what is saved) and goes on. The writer is at most one epoch behind: handing it an epoch first waits for the one
before, so a failed write (a full disk) stops the run at the next epoch with its own error, and ``close`` waits
for the last one. Every file is still written atomically (:mod:`ctzoo.io.atomic`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

log = logging.getLogger(__name__)


def cpu_snapshot(state: Any) -> Any:
    """``state`` (nested dicts, lists and tuples, as state dicts are) with every tensor copied to the CPU: later
    optimiser steps change the live tensors in place, never the copy."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: cpu_snapshot(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(cpu_snapshot(value) for value in state)
    return state


class EpochWriter:
    """One background thread for one epoch's writes at a time. ``submit(fn, *args)`` first waits for the epoch
    before (and raises its error, if it failed); ``wait_s`` is the total time the loop waited, ``write_s`` the
    total the writes took."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ctzoo-epoch-writer")
        self._pending: Future | None = None
        self.wait_s = self.write_s = 0.0

    def _timed(self, fn: Callable[..., None], *args: Any) -> None:
        start = time.perf_counter()
        fn(*args)
        self.write_s += time.perf_counter() - start

    def wait(self) -> float:
        """Wait for the writes in flight; the seconds waited."""
        start = time.perf_counter()
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()
        waited = time.perf_counter() - start
        self.wait_s += waited
        return waited

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self.wait()
        self._pending = self._pool.submit(self._timed, fn, *args)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown()
