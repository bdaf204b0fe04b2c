"""The PACS bridge's work as events of the latency anomaly detector (:mod:`ctzoo.perf`; the ``perf`` section of
the config, docs/perf.md).

Per job, in the worker that runs it:

* ``download`` (watcher: the series fetched from Orthanc) or ``receive`` (listener: how long the associations
  took to deliver the series' instances, :class:`ReceiveTimes`; recorded when the job takes them from the spool);
* ``check``: the series read and decoded once, the rules applied (:func:`ctzoo.pacs.core.check_series`);
* each model's ``read``, ``preprocess``, ``predict``, ``finish`` and ``write`` (the pipeline's own events,
  :mod:`ctzoo.inference.stage_events`, under the model's key);
* ``upload``: the SR/SEG sent back (Orthanc ``POST /instances``, or C-STORE to the destination);
* ``job``: the whole job, from its claim to its completion, for jobs that end DONE.

A stage is recorded once it completes: a download cut short by an outage, or a check that rejects the series,
says nothing about how long the stage takes. The bridge's own stages are keyed ``("pacs", ctzoo version, stage,
"-", bucket)`` (``-``: they do not run on a model's device); the bucket is the series' slice count as known at
that point: its instances for ``download``/``receive``, the decoded volume's axial slices from ``check`` on (the
same number for the usual one-slice-per-instance CT).

The context never names a patient or a series: ``job`` (the ledger's job number), ``attempt``, ``series_hash``
(the keyed hash of the job's folder that the model events of the same job carry, so that a job's events group;
never a UID), ``slices``, ``worker`` (the ledger's name of this process), and what explains the stage (files,
bytes, associations).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctzoo import __version__
from ctzoo.inference.stage_events import series_hash
from ctzoo.pacs.ledger import Job
from ctzoo.perf import DetectorConfig, PerfMonitor, event_key

__all__ = ["JobEvents", "ReceiveTimes", "instance_count", "perf_monitor"]

#: The model field of the bridge's own stages (those that belong to no model).
BRIDGE = "pacs"
NO_DEVICE = "-"


@contextmanager
def perf_monitor(settings) -> Iterator[PerfMonitor | None]:
    """The monitor the config's ``perf`` section asks for (None when it is off), closed at the end so that the
    store's totals and key states are written last."""
    section = settings.perf
    if not section.enabled:
        yield None
        return
    config = DetectorConfig(algorithm=section.algorithm, min_samples=section.min_samples)
    monitor = PerfMonitor(settings.perf_store_path, config, role="pacs", server=section.server)
    try:
        yield monitor
    finally:
        monitor.close()


def instance_count(folder: Path) -> int:
    """The files of a fetched series (one per instance)."""
    return sum(1 for path in folder.rglob("*") if path.is_file())


class JobEvents:
    """Times one job's bridge stages into ``monitor``; with ``monitor`` None it records nothing."""

    def __init__(self, monitor: PerfMonitor | None, job: Job, worker: str) -> None:
        self.monitor = monitor
        self.slices: int | None = None  # the bucket of the events recorded from now on
        self.context: dict[str, Any] = {"job": job.id, "attempt": job.attempts, "worker": worker}
        self.started, self._clock = time.time(), time.perf_counter()

    def name_series(self, folder: Path) -> None:
        """Name the series as the pipeline names it when it reads ``folder`` (a keyed hash of the path)."""
        self.context["series_hash"] = series_hash(folder)

    def record(self, stage: str, seconds: float, started: float, **context: Any) -> None:
        if self.monitor is not None:
            self.monitor.record(event_key(BRIDGE, __version__, stage, NO_DEVICE, self.slices), seconds, started,
                                {**self.context, "slices": self.slices, **context})

    @contextmanager
    def stage(self, name: str, **context: Any) -> Iterator[dict[str, Any]]:
        """Time the block as the stage ``name``, recorded only if the block completes; the yielded dict may be
        filled with more context."""
        started, clock = time.time(), time.perf_counter()
        yield context
        self.record(name, time.perf_counter() - clock, started, **context)

    def record_job(self, **context: Any) -> None:
        """The whole job, from its claim until now."""
        self.record("job", time.perf_counter() - self._clock, self.started, **context)


@dataclass
class Received:
    """What the associations delivered of one series: ``seconds`` they took, from ``started`` (Unix time)."""

    started: float
    seconds: float
    instances: int
    bytes: int
    associations: int


class ReceiveTimes:
    """How long the associations took to deliver each spooled series (the listener's ``receive`` stage).

    Per series, summed over the associations that sent it: the time from an association's first instance of the
    series arriving to its last one stored. The gaps between associations (a sender pausing, retrying) are the
    sender's and are left out; pynetdicom hands the handler a whole instance, so the first instance's own transfer
    is not in it either. Kept in memory only: a series received before a restart has no ``receive`` event.
    Thread-safe (each association has its own thread)."""

    def __init__(self) -> None:
        self._series: dict[str, _Spans] = {}
        self._lock = threading.Lock()

    def stored(self, series: str, association: Any, arrived: float, stored: float, size: int) -> None:
        """One instance of ``series`` (its spool name) arrived at ``arrived`` and was stored at ``stored``."""
        with self._lock:
            spans = self._series.get(series)
            if spans is None:
                self._series[series] = _Spans(association, arrived, stored, size)
            else:
                spans.add(association, arrived, stored, size)

    def take(self, series: str) -> Received | None:
        """What was received of ``series``, forgotten from now on; None if nothing was (since this start)."""
        with self._lock:
            spans = self._series.pop(series, None)
        return None if spans is None else spans.received()

    def forget(self, series: str) -> None:
        with self._lock:
            self._series.pop(series, None)


class _Spans:
    """One series' association spans: the closed ones summed, the current one open."""

    def __init__(self, association: Any, arrived: float, stored: float, size: int) -> None:
        self.started, self.span_start, self.span_end = arrived, arrived, stored
        # a weak reference: an association that ended is not kept alive, and a new one at its address is not it
        self.association = weakref.ref(association)
        self.closed_s, self.instances, self.bytes, self.associations = 0.0, 1, size, 1

    def add(self, association: Any, arrived: float, stored: float, size: int) -> None:
        if self.association() is not association:
            self.closed_s += self.span_end - self.span_start
            self.span_start, self.association = arrived, weakref.ref(association)
            self.associations += 1
        self.span_end = max(self.span_end, stored)
        self.instances += 1
        self.bytes += size

    def received(self) -> Received:
        return Received(self.started, self.closed_s + self.span_end - self.span_start, self.instances, self.bytes,
                        self.associations)
