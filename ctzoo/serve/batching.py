"""Dynamic micro-batching: concurrent requests for one model merged along the batch axis.

One :class:`MicroBatcher` per model. :meth:`MicroBatcher.submit` queues an already validated request (a dict of
arrays sharing their first, batch, axis) and awaits its own outputs. A single worker task per model:

1. waits for the oldest queued request, then for up to ``max_queue_delay_ms`` (counted from that request's
   arrival) while fewer than ``max_batch_size`` rows of *compatible* requests are queued. Requests are
   compatible when every input has the same name, dtype and non-batch shape (a 512 px slice never waits for,
   or merges with, a 256 px one);
2. takes the oldest request and the compatible ones after it, in arrival order, while their rows fit
   ``max_batch_size``; the others stay queued, in order, for the next round (the oldest always goes first,
   so nothing starves);
3. concatenates the inputs, runs the model in the model's single worker thread (the event loop stays free;
   ONNX Runtime releases the GIL) and splits the outputs back by each request's rows.

If a merged run fails, each request of that batch is rerun alone, so only a request that fails by itself
gets an error. Requests whose caller gave up (timeout, disconnect) are dropped before they run. With
``enabled=False`` every request runs alone, at once.

The batcher knows nothing of HTTP or Prometheus; an optional observer gets queue depths, batch sizes and
per-request queue and inference times.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


class BatchObserver(Protocol):
    def queue_depth(self, model: str, depth: int) -> None: ...

    def batch(self, model: str, rows: int, requests: int, seconds: float) -> None: ...

    def request(self, model: str, queue_seconds: float, inference_seconds: float) -> None: ...


class QueueFullError(RuntimeError):
    """More requests are queued for the model than ``max_queue`` allows (the app answers 503)."""


@dataclass(eq=False)
class _Pending:
    inputs: Arrays
    rows: int
    key: tuple
    future: asyncio.Future
    enqueued: float
    timing: dict | None = None  # filled for the caller: queue_s, model_s, batch_rows, batch_requests, queue_depth


def batch_key(inputs: Arrays) -> tuple:
    """What must match for requests to be merged: each input's name, dtype and shape without the batch axis."""
    return tuple((name, array.dtype.str, array.shape[1:]) for name, array in inputs.items())


class MicroBatcher:
    """Merge concurrent ``submit`` calls for one model and run them with ``run`` (blocking, thread-safe enough
    to be called from one worker thread) in batches of at most ``max_batch_size`` rows."""

    def __init__(self, name: str, run: Callable[[Arrays], Arrays], max_batch_size: int = 16,
                 max_queue_delay_ms: float = 2.0, enabled: bool = True, observer: BatchObserver | None = None,
                 max_queue: int = 1024, max_elements: int | None = None) -> None:
        if max_batch_size < 1 or max_queue_delay_ms < 0:
            raise ValueError("max_batch_size must be >= 1 and max_queue_delay_ms >= 0")
        self.name, self._run_model = name, run
        self.max_batch_size, self.delay = max_batch_size, max_queue_delay_ms / 1000.0
        self.enabled, self.observer, self.max_queue = enabled, observer, max_queue
        self.max_elements = max_elements  # a merged run holds at most this many input elements (memory)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"ctzoo-serve-{name}")
        self._queue: deque[_Pending] = deque()
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None

    def _row_cap(self, first: _Pending) -> int:
        """Rows one merged run may hold: ``max_batch_size``, fewer when the rows are large (``max_elements``)."""
        if self.max_elements is None:
            return self.max_batch_size
        per_row = sum(int(np.prod(shape)) for _, _, shape in first.key)
        return max(1, min(self.max_batch_size, self.max_elements // max(per_row, 1)))

    # ---------------------------------------------------------------------------------------- client side

    async def submit(self, inputs: Arrays, timing: dict | None = None) -> Arrays:
        """Queue ``inputs`` (validated, all with the same batch size) and return their outputs. ``timing``, when
        given, receives this request's ``queue_s`` (waiting and batch formation), ``model_s`` (its merged run),
        ``batch_rows``, ``batch_requests`` and ``queue_depth`` (requests queued when it arrived); the batch's first
        live request also gets ``batch_first`` (True), ``batch_s`` (with batching on: how long the free batcher
        held the batch open for more rows), ``model_started`` (Unix time), ``batch_members`` (each member's
        ``timing["request"]``) and ``batch_inputs`` (each member's inputs, for a deep profile's rerun), so that
        one request per batch can report the batch's own events."""
        loop = self._ensure_started()
        if len(self._queue) >= self.max_queue:
            raise QueueFullError(f"model {self.name!r} has {len(self._queue)} requests queued; try again later")
        rows = next(iter(inputs.values())).shape[0]
        pending = _Pending(inputs, rows, batch_key(inputs), loop.create_future(), time.perf_counter(), timing)
        if timing is not None:
            timing["queue_depth"] = len(self._queue)
        self._queue.append(pending)
        self._observe_depth()
        self._wakeup.set()
        return await pending.future  # a cancelled caller cancels the future: the worker then skips it

    def _ensure_started(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop, self._queue, self._wakeup = loop, deque(), asyncio.Event()
            self._task = loop.create_task(self._work(), name=f"ctzoo-batcher-{self.name}")
        return loop

    async def stop(self) -> None:
        """Stop the worker; queued requests fail with ``RuntimeError``."""
        if self._task is not None and self._loop is asyncio.get_running_loop():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for pending in self._queue:
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("the service is shutting down"))
        self._queue.clear()
        self._task = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------------------------------- worker side

    def _observe_depth(self) -> None:
        if self.observer is not None:
            self.observer.queue_depth(self.name, len(self._queue))

    async def _work(self) -> None:
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch: list[_Pending] = []
            try:
                collecting = time.perf_counter()  # the batcher is free from here: formation, not queueing
                batch = await self._collect()
                if batch:
                    await self._execute(batch, collecting)
            except asyncio.CancelledError:
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(RuntimeError("the service is shutting down"))
                raise
            except Exception as exc:  # never let the worker die: fail this batch, keep serving
                logger.exception("batch worker of %s failed", self.name)
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)

    async def _collect(self) -> list[_Pending]:
        first = next((p for p in self._queue if not p.future.done()), None)
        if first is None:
            self._queue.clear()
            self._observe_depth()
            return []
        if self.enabled and first.rows < self.max_batch_size and self.delay > 0:
            deadline = first.enqueued + self.delay
            while True:
                rows = sum(p.rows for p in self._queue if p.key == first.key and not p.future.done())
                remaining = deadline - time.perf_counter()
                if rows >= self.max_batch_size or remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
        batch, rest, rows, cap = [], deque(), 0, self._row_cap(first)
        for pending in self._queue:
            if pending.future.done():
                continue  # the caller gave up
            if pending.key == first.key and (not batch or (self.enabled and rows + pending.rows <= cap)):
                batch.append(pending)
                rows += pending.rows
            else:
                rest.append(pending)
        self._queue = rest
        self._observe_depth()
        return batch

    async def _execute(self, batch: list[_Pending], collecting: float) -> None:
        started, wall = time.perf_counter(), time.time()
        results = await asyncio.get_running_loop().run_in_executor(self._executor, self._run_batch, batch)
        seconds = time.perf_counter() - started
        first = next((p for p in batch if p.timing is not None and not p.future.done()), None)
        if first is not None:  # its request reports the batch's formation and model run, once per batch
            first.timing.update(batch_first=True, model_started=wall,
                                batch_members=[p.timing.get("request") for p in batch if p.timing is not None],
                                batch_inputs=[p.inputs for p in batch])  # references: a deep profile's rerun
            if self.enabled:  # batching off, no batch is held open
                first.timing["batch_s"] = started - max(collecting, batch[0].enqueued)
        if self.observer is not None:
            self.observer.batch(self.name, sum(p.rows for p in batch), len(batch), seconds)
        for pending, result in zip(batch, results):
            if self.observer is not None:
                self.observer.request(self.name, started - pending.enqueued, seconds)
            if pending.timing is not None:
                pending.timing.update(queue_s=started - pending.enqueued, model_s=seconds,
                                      batch_rows=sum(p.rows for p in batch), batch_requests=len(batch))
            if pending.future.done():
                continue
            if isinstance(result, BaseException):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)

    def _run_batch(self, batch: list[_Pending]) -> list[Arrays | BaseException]:
        """In the worker thread: the outputs (or the error) of each request of ``batch``."""
        if len(batch) == 1:
            try:
                return [self._run_model(batch[0].inputs)]
            except Exception as exc:
                return [exc]
        try:
            merged = {name: np.concatenate([p.inputs[name] for p in batch]) for name in batch[0].inputs}
            outputs = self._run_model(merged)
            total, bounds = sum(p.rows for p in batch), np.cumsum([p.rows for p in batch])[:-1]
            for name, value in outputs.items():
                if value.ndim == 0 or value.shape[0] != total:
                    raise ValueError(f"output {name} has shape {value.shape}, not a batch of {total}")
            parts = {name: np.split(value, bounds) for name, value in outputs.items()}
            del merged
            return [{name: split[k] for name, split in parts.items()} for k in range(len(batch))]
        except Exception:
            logger.warning("a merged batch of %d requests for %s failed; running them one by one", len(batch),
                           self.name, exc_info=logger.isEnabledFor(logging.DEBUG))
            return [self._run_batch([pending])[0] for pending in batch]
