"""The in-situ monitor a process keeps switched on: time a stage, judge it, keep its provenance.

``monitor.record(key, seconds, context=...)`` or ``with monitor.timed(model, version, stage, device, slices,
context): ...`` gives every event a :class:`~ctzoo.perf.detectors.Label` at once (SSTD or HBOS against this
process's statistics), hands anomalies and their neighbours to the :class:`ProvenanceRecorder`, and calls
``on_event(event, label)`` (the service counts events and anomalies in Prometheus there). Thread-safe.

With ``server=URL`` the detector syncs with a parameter server (:mod:`ctzoo.perf.server`) every ``sync_every_s``
and at :meth:`PerfMonitor.close`, so that every process judges against the statistics of all; :attr:`connected`
says whether it currently does.

``profile_budget`` arms on-demand deep profiles (:mod:`ctzoo.perf.deep_profile`): an anomalous event recorded with
``profile=`` (a callable that reruns its inputs under a profiler) is profiled while the budget lasts;
:meth:`PerfMonitor.profiler` ``.arm(n)`` adds to it at run time.

A monitor never raises into the work it watches because of its store: a write that fails (another connection holds
the database's lock past :data:`~ctzoo.perf.provenance.BUSY_TIMEOUT_S`, a full disk, an I/O error, or any other
error raised while writing) is counted (:meth:`PerfMonitor.overhead`'s ``store_errors``) and logged (the first,
then at most one line a minute), and after :data:`MAX_STORE_FAILURES` failures in a row the store is switched off
for the rest of the process, which one warning says; the events are still judged.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ctzoo.perf.deep_profile import DeepProfiler, ProfiledRun
from ctzoo.perf.detectors import AnomalyDetector, DetectorConfig, Label
from ctzoo.perf.events import KEY_FIELDS, Event, Key, checked_context, event_key, process_name
from ctzoo.perf.provenance import ProvenanceRecorder, ProvenanceStore
from ctzoo.perf.server import ParameterServerClient

log = logging.getLogger("ctzoo.perf")
#: After this many failed store writes in a row the monitor stops writing to its store.
MAX_STORE_FAILURES = 5
#: At most one log line about failed store writes per this many seconds (the first is always logged).
STORE_ERROR_LOG_EVERY_S = 60.0


class PerfMonitor:
    """Detector + provenance for one process (``role``: ``serve``, ``infer``, ``pacs``, ``train``)."""

    def __init__(self, store: str | Path | ProvenanceStore | None, config: DetectorConfig = DetectorConfig(),
                 role: str = "ctzoo", window: int = 10, on_event: Callable[[Event, Label], None] | None = None,
                 server: str | None = None, token: str | None = None, rank: int | None = None,
                 sync_every_s: float = 2.0, profile_budget: int = 0) -> None:
        self.role, self.rank = role, rank
        self.config, self.on_event = config, on_event
        self.process = process_name(role if rank is None else f"{role}[rank{rank}]")
        self.detector = AnomalyDetector(config)
        self.store = store if isinstance(store, ProvenanceStore) or store is None else ProvenanceStore(store)
        self.recorder = ProvenanceRecorder(self.store, self.process, config.algorithm, window) if self.store else None
        if self.recorder is not None:  # key states are saved with every write of the totals, periodic and at close
            self.recorder.on_flush = self._save_key_states
        self.profiler = DeepProfiler(self.store, profile_budget)
        self.anomalies_by_key: dict[Key, int] = {}
        self.events_by_key: dict[Key, int] = {}
        self.seconds_spent = 0.0  # CPU in record(): judging, provenance, on_event (what detection costs the process)
        self.store_errors = 0  # failed store writes (see the module docstring)
        self.store_disabled: str | None = None  # why the store was switched off, once it was
        self._failures_in_a_row, self._store_error_logged = 0, -math.inf
        self._later: queue.SimpleQueue | None = None  # record_later()'s events, for its thread
        self._later_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # server: sync with a parameter server (ctzoo.perf.server) so that every process judges against the same
        # statistics; token: its bearer token ($CTZOO_PERF_TOKEN when not given)
        self.client = None if server is None else ParameterServerClient(
            server, token, self.detector, self._lock, {"process": self.process, "role": role, "rank": rank},
            self._counts, sync_every_s)

    def record(self, key: Key, seconds: float, started: float | None = None,
               context: dict[str, Any] | None = None, profile: Callable[[], ProfiledRun] | None = None) -> Label:
        """Judge and keep one event of ``key`` that took ``seconds``; if it is anomalous and deep profiles are
        armed, ``profile`` (its inputs rerun under a profiler) is handed to :attr:`profiler`."""
        clock = time.thread_time()  # this thread's CPU: not the time it waits for the GIL in a busy process
        if self.profiler.busy:  # a deep profile's rerun was competing with this stage for the machine: say so
            context = {**(context or {}), "during_profile": True}
        event = Event(key, float(seconds), time.time() - seconds if started is None else started, self.process,
                      checked_context(context or {}))
        with self._lock:
            label = self.detector.observe(key, event.seconds)
            self.events_by_key[key] = self.events_by_key.get(key, 0) + 1
            if label.anomalous:
                self.anomalies_by_key[key] = self.anomalies_by_key.get(key, 0) + 1
        anomaly_id = self._write_store(self.recorder.record, event, label) if self._store_on() else None
        if label.anomalous and profile is not None:
            self.profiler.offer(anomaly_id, event.seconds, profile)
        if self.on_event is not None:
            self.on_event(event, label)
        spent = time.thread_time() - clock
        with self._lock:
            self.seconds_spent += spent
        return label

    def _store_on(self) -> bool:
        return self.recorder is not None and self.store_disabled is None

    def _write_store(self, write: Callable[..., Any], *args: Any) -> Any:
        """``write(*args)``; on any error (sqlite3.Error, OSError, or a bug in what is written, such as a key the
        store refuses) None, counted, logged and, after :data:`MAX_STORE_FAILURES` in a row, the store switched
        off: the monitored work never sees it."""
        try:
            result = write(*args)
        except Exception as exc:  # noqa: BLE001 (the promise: a store write never fails the work it watches)
            with self._lock:
                self.store_errors += 1
                self._failures_in_a_row += 1
                errors, in_a_row = self.store_errors, self._failures_in_a_row
                now = time.monotonic()
                say = now - self._store_error_logged >= STORE_ERROR_LOG_EVERY_S
                if say:
                    self._store_error_logged = now
                if in_a_row >= MAX_STORE_FAILURES and self.store_disabled is None:
                    self.store_disabled = f"{type(exc).__name__}: {exc}"
                    log.warning("perf: provenance store %s failed %d times in a row (%s); not writing to it any "
                                "more in this process (events are still judged)", self.store.path, in_a_row,
                                self.store_disabled)
                elif say:
                    log.warning("perf: a write to provenance store %s failed (%s: %s; %d so far); the event is "
                                "judged but not kept", self.store.path, type(exc).__name__, exc, errors)
            return None
        self._failures_in_a_row = 0
        return result

    def record_later(self, key: Key, seconds: float, started: float | None = None,
                     context: dict[str, Any] | None = None,
                     profile: Callable[[], ProfiledRun] | None = None) -> None:
        """:meth:`record` on this monitor's own thread, so that a request's answer does not wait for its judging
        and provenance (the service's choice); :meth:`close` records what is still queued."""
        if started is None:
            started = time.time() - seconds
        if self._later is None:  # the thread starts with the first event (checked again under the lock)
            with self._lock:
                if self._later is None:
                    self._later_thread = threading.Thread(target=self._record_queued, name="ctzoo-perf",
                                                          daemon=True)
                    self._later = queue.SimpleQueue()
                    self._later_thread.start()
        self._later.put((key, seconds, started, context, profile))

    def _record_queued(self) -> None:
        while (item := self._later.get()) is not None:
            if item[0] is None:  # drain()'s marker: everything before it is recorded
                item[3].set()
                continue
            try:
                self.record(*item)
            except Exception:  # a bad event must not stop the thread (record() checks the context)
                logging.getLogger("ctzoo.perf").exception("perf: an event could not be recorded")

    def drain(self) -> None:
        """Wait until every event given to :meth:`record_later` so far is recorded (tests, reports)."""
        if self._later_thread is not None:
            done = threading.Event()
            self._later.put((None, 0.0, 0.0, done, None))
            done.wait(30)

    @contextmanager
    def timed(self, model: str, version: str, stage: str, device: str, slices: int | None = None,
              context: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Time the block as one event of stage ``stage``; the yielded dict may be filled with more context."""
        extra: dict[str, Any] = dict(context or {})
        started, clock = time.time(), time.perf_counter()
        try:
            yield extra
        finally:
            self.record(event_key(model, version, stage, device, slices), time.perf_counter() - clock, started,
                        extra)

    def stats(self) -> list[dict[str, Any]]:
        """Per key: count, mean, std, min, max (seconds) and anomalies, as the detector knows them."""
        with self._lock:
            states = dict(self.detector.states)
            anomalies = dict(self.anomalies_by_key)
        return [{**dict(zip(KEY_FIELDS, key)), **s.moments.summary(), "anomalies": anomalies.get(key, 0)}
                for key, s in sorted(states.items())]

    def overhead(self) -> dict[str, float]:
        """What detection has cost this process: events recorded, seconds spent in :meth:`record`, per event."""
        with self._lock:
            events, spent = sum(self.events_by_key.values()), self.seconds_spent
        return {"events": events, "seconds": spent, "us_per_event": 1e6 * spent / events if events else None,
                "store_errors": self.store_errors}

    def _counts(self) -> dict[str, list[int]]:
        """Running ``{key: [events, anomalies]}`` of this process, for the parameter server's per-process table."""
        with self._lock:
            return {"|".join(key): [n, self.anomalies_by_key.get(key, 0)] for key, n in self.events_by_key.items()}

    @property
    def connected(self) -> bool | None:
        """Whether the last sync with the parameter server worked (None: no server, or not tried yet); while
        False, events are judged on this process's own statistics."""
        return None if self.client is None else self.client.connected

    def server_status(self) -> dict[str, Any] | None:
        """The parameter server's URL, ``connected``, syncs done and the last error; None without a server."""
        return None if self.client is None else self.client.status()

    def _save_key_states(self) -> None:
        """The detector's per-key statistics into the store's ``key_states`` (what ``ctzoo perf report`` draws the
        distributions from); called by the recorder each time it writes the totals."""
        with self._lock:  # observe() mutates the states under this lock
            # this process's own events only: synced with a parameter server, the detector's states hold every
            # process's, and a report merging several processes' rows would count the others' again
            states = self.detector.own_state_dict()
        self.store.save_key_states(self.process, states)

    def close(self) -> None:
        if self._later_thread is not None:  # the queued events first
            self._later.put(None)
            self._later_thread.join(30)
        if self.client is not None:  # the last delta first, so the server holds every event of this process
            self.client.close()
        self.profiler.close()  # a profile being taken is stored before the store closes
        if self._store_on():  # its flush writes the totals and, through on_flush, the key states
            self._write_store(self.recorder.close)
        if self.store is not None:
            self._write_store(self.store.close)
