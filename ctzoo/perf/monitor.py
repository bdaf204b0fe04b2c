"""The in-situ monitor a process keeps switched on: time a stage, judge it, keep its provenance.

``monitor.record(key, seconds, context=...)`` or ``with monitor.timed(model, version, stage, device, slices,
context): ...`` gives every event a :class:`~ctzoo.perf.detectors.Label` at once (SSTD or HBOS against this
process's statistics), hands anomalies and their neighbours to the :class:`ProvenanceRecorder`, and calls
``on_event(event, label)`` (the service counts events and anomalies in Prometheus there). Thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ctzoo.perf.detectors import AnomalyDetector, DetectorConfig, Label
from ctzoo.perf.events import Event, Key, checked_context, event_key, process_name
from ctzoo.perf.provenance import ProvenanceRecorder, ProvenanceStore


class PerfMonitor:
    """Detector + provenance for one process (``role``: ``serve``, ``infer``, ``pacs``, ``train``)."""

    def __init__(self, store: str | Path | None, config: DetectorConfig = DetectorConfig(), role: str = "ctzoo",
                 window: int = 10, on_event: Callable[[Event, Label], None] | None = None) -> None:
        self.config, self.process, self.on_event = config, process_name(role), on_event
        self.detector = AnomalyDetector(config)
        self.store = ProvenanceStore(store) if store is not None else None
        self.recorder = ProvenanceRecorder(self.store, self.process, config.algorithm, window) if self.store else None
        self.anomalies_by_key: dict[Key, int] = {}
        self._lock = threading.Lock()

    def record(self, key: Key, seconds: float, started: float | None = None,
               context: dict[str, Any] | None = None) -> Label:
        """Judge and keep one event of ``key`` that took ``seconds``."""
        event = Event(key, float(seconds), time.time() - seconds if started is None else started, self.process,
                      checked_context(context or {}))
        with self._lock:
            label = self.detector.observe(key, event.seconds)
            if label.anomalous:
                self.anomalies_by_key[key] = self.anomalies_by_key.get(key, 0) + 1
        if self.recorder is not None:
            self.recorder.record(event, label)
        if self.on_event is not None:
            self.on_event(event, label)
        return label

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
        names = ("model", "version", "stage", "device", "bucket")
        return [{**dict(zip(names, key)), "count": s.moments.count, "mean_s": s.moments.mean, "std_s": s.moments.std,
                 "min_s": s.moments.min if s.moments.count else None,
                 "max_s": s.moments.max if s.moments.count else None, "anomalies": anomalies.get(key, 0)}
                for key, s in sorted(states.items())]

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.flush()
        if self.store is not None:
            self.store.close()
