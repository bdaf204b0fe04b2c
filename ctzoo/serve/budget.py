"""The service's per-request resource budget: one place for every limit ``ctzoo serve`` applies to a request.

* **Per input** (:class:`ctzoo.io.limits.ResourceLimits`, ``ServeLimits.volume``): voxels per study volume,
  decoded bytes and inflation ratio of an upload, self-contained files only; checked from headers before
  anything is allocated (413, or 400 for a detached-data header).
* **Per tensor request**: at most ``max_tensor_elements`` elements over all inputs and ``max_tensor_side`` along
  any non-batch axis, checked on the declared shapes before any tensor is built (413); a compressed body may
  inflate to the bytes those limits allow, no more; its JSON may hold no more numbers than those elements
  (and some slack for shapes and parameters), counted before it is parsed (413).
* **In flight**: at most ``max_requests_per_model`` requests per model are being worked on at once (a tensor
  request takes its place once its body has arrived, so clients still uploading never lock a model), and the
  bytes they are expected to decode, summed over the whole server, stay under ``max_inflight_mb`` (a body or
  upload is reserved as its bytes arrive, not as its ``Content-Length`` announces them: a client that announces
  512 MiB and stalls holds what it sent, so stalled uploads cannot lock the others out). A request
  that does not fit waits (up to ``queue_wait_s``, inside its own deadline); then it gets 503 with
  ``Retry-After``. One that could never fit (alone over ``max_inflight_mb``) gets 413 at once.

How much a request reserves: a study, ``STUDY_BYTES_PER_VOXEL`` per voxel its headers declare (the float32
volume, the stored copy and the model's resampled input), plus, for a segmenter, which holds every slice of the
volume on its input canvas at once whatever the slices' own size, ``SEGMENTER_BYTES_PER_CANVAS_PIXEL`` per canvas
pixel of each declared slice (:func:`study_bytes`); a tensor request, its body, plus the inflated size
its compression allows, plus ``PARSED_BYTES_PER_JSON_VALUE`` per value its JSON holds (counted before parsing;
more values than ``max_tensor_elements`` allow are refused then: :func:`ctzoo.serve.v2_codec.request_budget`).
"""

from __future__ import annotations

import asyncio
import math
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from ctzoo.io.limits import ResourceLimits
from ctzoo.serve.v2_codec import ServeError

#: Bytes reserved per declared voxel of a study: float32 HU (4), the decoded stored values (2), the resampled
#: float32 model input (4), rounded up.
STUDY_BYTES_PER_VOXEL = 12
#: Bytes reserved per pixel of a segmenter's input canvas, per declared slice: the float32 HU canvas, the windowed
#: input and the copies windowing makes while both exist (measured: 18), the uint8 label per slice, rounded up.
SEGMENTER_BYTES_PER_CANVAS_PIXEL = 20


def study_bytes(voxels: int, slices: int, canvas_pixels: int = 0) -> int:
    """What a study of ``voxels`` in ``slices`` slices reserves; ``canvas_pixels``: a segmenter's input slice
    (H x W; 0 for a detector, which prepares its slices a few at a time)."""
    return voxels * STUDY_BYTES_PER_VOXEL + slices * canvas_pixels * SEGMENTER_BYTES_PER_CANVAS_PIXEL


def _upload_limits() -> ResourceLimits:
    return ResourceLimits(self_contained_only=True)


@dataclass(frozen=True)
class ServeLimits:
    """Every limit of :mod:`ctzoo.serve.budget`, with the service's defaults."""

    volume: ResourceLimits = field(default_factory=_upload_limits)
    max_tensor_elements: int = 1 << 25
    max_tensor_side: int = 1024
    max_requests_per_model: int = 4
    max_inflight_mb: float = 8192
    queue_wait_s: float = 10.0

    @property
    def max_inflight_bytes(self) -> int:
        return int(self.max_inflight_mb * (1 << 20))

    @property
    def max_tensor_bytes(self) -> int:
        """The most a tensor request's body may inflate to: every element as FP64, plus 1 MiB of JSON."""
        return self.max_tensor_elements * 8 + (1 << 20)

    def check_tensor_shape(self, name: str, shape: tuple[int, ...], elements_so_far: int = 0) -> int:
        """The elements of an input of ``shape`` plus ``elements_so_far``; ServeError 413 past a tensor limit."""
        too_long = [s for s in shape[1:] if s > self.max_tensor_side]
        if too_long:
            raise ServeError(f"input {name!r} has shape {list(shape)}: {too_long[0]} is over the limit of "
                             f"{self.max_tensor_side} per non-batch axis (raise it with --max-tensor-side)",
                             status=413)
        total = elements_so_far + math.prod(shape)
        if total > self.max_tensor_elements:
            raise ServeError(f"the request's inputs hold {total:,} elements, over the limit of "
                             f"{self.max_tensor_elements:,} (raise it with --max-tensor-elements; or split the "
                             "batch)", status=413)
        return total


class InflightBudget:
    """Requests in flight per model and bytes in flight for the whole server (see the module docstring)."""

    def __init__(self, limits: ServeLimits) -> None:
        self.limits = limits
        self.reserved = 0
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._changed: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:  # created inside the running loop
            self._changed = asyncio.Condition()
        return self._changed

    @staticmethod
    def busy(retry_after_s: int = 1) -> ServeError:
        return ServeError("the server is busy: too many requests or too much data in flight; retry shortly",
                          status=503, headers={"Retry-After": str(retry_after_s)})

    @asynccontextmanager
    async def slot(self, model: str):
        """One of the model's ``max_requests_per_model`` places; 503 with Retry-After after ``queue_wait_s``."""
        semaphore = self._slots.setdefault(model, asyncio.Semaphore(self.limits.max_requests_per_model))
        try:
            await asyncio.wait_for(semaphore.acquire(), self.limits.queue_wait_s)
        except asyncio.TimeoutError:
            raise self.busy() from None
        try:
            yield
        finally:
            semaphore.release()

    def check_fits(self, nbytes: int, what: str) -> None:
        """413 when ``nbytes`` alone could never fit in the server's ``max_inflight_mb``."""
        if nbytes > self.limits.max_inflight_bytes:
            raise ServeError(f"{what} needs about {nbytes / (1 << 20):,.0f} MiB, over the server's "
                             f"{self.limits.max_inflight_mb:g} MiB in flight (raise it with --max-inflight-mb)",
                             status=413)

    @asynccontextmanager
    async def reserve(self, nbytes: int, what: str, held: int = 0):
        """``nbytes`` of the server's ``max_inflight_mb`` held while the block runs: 413 when it could never
        fit, waits while others hold too much, 503 with Retry-After after ``queue_wait_s``. ``held``: bytes an
        enclosing reservation of the same request holds already (its body's, once read): only the rest is
        added."""
        self.check_fits(nbytes, what)
        nbytes = max(0, nbytes - held)
        await self._take(nbytes)
        try:
            yield
        finally:
            self._give_back(nbytes)

    @asynccontextmanager
    async def growing(self, what: str):
        """A :class:`Reservation` of nothing yet, grown as a body arrives (:meth:`Reservation.grow`), all of it
        given back when the block ends."""
        reservation = Reservation(self, what)
        try:
            yield reservation
        finally:
            self._give_back(reservation.nbytes)

    async def _take(self, nbytes: int) -> None:
        """Add ``nbytes`` to what is reserved once they fit; 503 with Retry-After after ``queue_wait_s``."""
        total, changed = self.limits.max_inflight_bytes, self._condition()
        async with changed:
            try:
                await asyncio.wait_for(changed.wait_for(lambda: self.reserved + nbytes <= total),
                                       self.limits.queue_wait_s)
            except asyncio.TimeoutError:
                raise self.busy() from None
            self.reserved += nbytes

    def _give_back(self, nbytes: int) -> None:
        if nbytes:
            self.reserved -= nbytes  # at once, even when the request is being cancelled; waiters are woken apart
            asyncio.get_running_loop().create_task(self._wake())

    async def _wake(self) -> None:
        changed = self._condition()
        async with changed:
            changed.notify_all()


class Reservation:
    """The bytes of the server's ``max_inflight_mb`` one body holds, as many as have arrived
    (:meth:`InflightBudget.growing`)."""

    def __init__(self, budget: InflightBudget, what: str) -> None:
        self.budget, self.what, self.nbytes = budget, what, 0

    def check_fits(self, nbytes: int) -> None:
        """413 when a body of ``nbytes`` (as its Content-Length announces it) could never fit, before it is read."""
        self.budget.check_fits(nbytes, self.what)

    async def grow(self, nbytes: int) -> None:
        """Hold ``nbytes`` more (a chunk that arrived): 413 once the body alone is over the budget, else waits while
        others hold too much, and 503 after ``queue_wait_s``."""
        self.budget.check_fits(self.nbytes + nbytes, self.what)
        await self.budget._take(nbytes)
        self.nbytes += nbytes
