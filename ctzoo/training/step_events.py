"""What ``fit`` tells a :class:`~ctzoo.perf.PerfMonitor` about each training step, per rank.

Stages, one event each per optimiser step:

``data_wait``
    time blocked on the next batch (the loader, or the task's batch generator);
``forward_backward``
    the loss and its backward pass; under DDP this *includes* the gradient all-reduce, which overlaps the backward
    and which the backward waits for at its end;
``comm_hook``
    (DDP only) from the first gradient bucket handed to the communication hook to the last bucket's all-reduce
    finished, the hook's futures timed where they complete. Nested inside ``forward_backward``: when a peer is
    late, this is the stage that grows on the ranks that wait for it, while the late rank's own slow stage shows
    where the time went;
``optimizer_step``
    gradient clipping and the optimiser's step.

Key: ``(task name, run name, stage, device, batch size bucket)``; context: rank, world size, step, epoch, batch
size, backend. Every rank has its own monitor; a parameter server merges their statistics.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from ctzoo.perf import event_key


class StepEvents:
    """Times the stages of ``fit``'s steps into ``monitor``; every method does nothing when ``monitor`` is None,
    so the loop reads the same with and without it."""

    def __init__(self, monitor: Any, model: str, version: str, device: str, batch_size: int, rank: int,
                 world: int, backend: str | None) -> None:
        self.monitor, self.model, self.version, self.device = monitor, model, version, device
        self.batch_size = batch_size
        self.context: dict[str, Any] = {"rank": rank, "world_size": world, "batch_size": batch_size,
                                        "backend": backend or "none"}
        self._wait: tuple[float, float] | None = None  # (started, seconds) of the wait for the current batch
        # per bucket of the current step: (hook called: Unix time, perf_counter; future done: perf_counter)
        self._comm: list[tuple[float, float, float]] = []
        self._comm_lock = threading.Lock()  # hook futures complete on the communication backend's threads

    def batches(self, iterable: Iterable[Any]) -> Iterator[Any]:
        """``iterable``'s batches, with the time blocked on each kept for :meth:`begin`."""
        if self.monitor is None:
            yield from iterable
            return
        iterator = iter(iterable)
        while True:
            started, clock = time.time(), time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self._wait = (started, time.perf_counter() - clock)
            yield batch

    def begin(self, step: int, epoch: int) -> None:
        """A step starts: it is ``step`` (optimiser steps so far) of ``epoch``; record its data wait."""
        if self.monitor is None:
            return
        self.context.update(step=step, epoch=epoch + 1)
        if self._wait is not None:
            self._record("data_wait", *self._wait)
            self._wait = None

    def stage(self, name: str):
        """A context manager timing one stage of the current step."""
        if self.monitor is None:
            return nullcontext()
        return self._timed(name)

    @contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        started, clock = time.time(), time.perf_counter()
        try:
            yield
        finally:
            self._record(name, started, time.perf_counter() - clock)

    def _record(self, stage: str, started: float, seconds: float) -> None:
        self.monitor.record(event_key(self.model, self.version, stage, self.device, self.batch_size), seconds,
                            started, dict(self.context))

    def time_comm_hooks(self, ddp_model: Any) -> None:
        """Time every communication hook registered on ``ddp_model`` from now on (call before the hook is
        registered): the hook's future is chained with a callback noting when the bucket's exchange finished."""
        if self.monitor is None:
            return
        register = ddp_model.register_comm_hook

        def register_timed(state: Any, hook: Any) -> None:
            def timed_hook(hook_state, bucket):  # unannotated: DDP checks the annotation object
                called, clock = time.time(), time.perf_counter()
                future = hook(hook_state, bucket)

                def finished(done: Any) -> Any:
                    with self._comm_lock:
                        self._comm.append((called, clock, time.perf_counter()))
                    return done.value()

                return future.then(finished)

            register(state, timed_hook)

        ddp_model.register_comm_hook = register_timed

    def communication(self) -> None:
        """After the backward (which waits for every bucket): record the step's ``comm_hook`` span, if any."""
        if self.monitor is None:
            return
        with self._comm_lock:
            spans, self._comm = self._comm, []
        if spans:
            first = min(spans, key=lambda span: span[1])
            self._record("comm_hook", first[0], max(span[2] for span in spans) - first[1])
