"""In-situ latency anomaly detection with provenance, after Chimbuko (arXiv 2008.13742): every stage of ctzoo's work
is timed, judged normal or anomalous at once against mergeable per-key statistics (SSTD or HBOS), and only the
anomalies, a window of their neighbours and one normal sample per key are kept.

:mod:`~ctzoo.perf.stats` (mergeable moments and histograms), :mod:`~ctzoo.perf.detectors` (SSTD, HBOS),
:mod:`~ctzoo.perf.events` (keys, size buckets, context rules), :mod:`~ctzoo.perf.provenance` (the SQLite store),
:mod:`~ctzoo.perf.monitor` (what a process switches on), :mod:`~ctzoo.perf.deep_profile` (on-demand ONNX Runtime and
torch profiles of anomalous model runs). Depends on nothing else in ctzoo, so every layer may use
it.
"""

from ctzoo.perf.deep_profile import DeepProfiler, profile_onnxruntime, profile_torch
from ctzoo.perf.detectors import AnomalyDetector, DetectorConfig, KeyState, Label
from ctzoo.perf.events import Event, event_key, request_hash, slice_bucket
from ctzoo.perf.monitor import PerfMonitor
from ctzoo.perf.provenance import ProvenanceStore

__all__ = ["AnomalyDetector", "DeepProfiler", "DetectorConfig", "Event", "KeyState", "Label", "PerfMonitor",
           "ProvenanceStore", "event_key", "profile_onnxruntime", "profile_torch", "request_hash", "slice_bucket"]
