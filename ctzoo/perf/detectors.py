"""Label each timed event normal or anomalous in situ, as Chimbuko does: SSTD or HBOS per key.

* **SSTD**: anomalous when |t - mu| > alpha sigma (alpha 6 by default), from the key's running moments; score
  |t - mu| / sigma.
* **HBOS**: the key's merged histogram re-binned to Scott's width; a bin's score is -log2(p + 78.88e-32) (an
  empty bin scores 100); threshold = min + ``hbos_threshold`` x (max - min) of the scores (0.99 by
  default); a value outside the histogram gets the maximum score. In log2(seconds) (:func:`hbos_table` says
  why), and with the score range always including an empty bin's, this flags the values that land in a bin where
  the key has no data, which is what finds latencies *between* the modes of a multi-modal stage that SSTD, whose
  sigma spans the modes, cannot.

Choices (Chimbuko's where it has one): by default only events at least ``min_ratio`` (3) times and ``min_excess_s``
(25 ms) slower than the key's median can be anomalous (``direction="both"`` also judges as many times faster, as
Chimbuko judges both sides): a stage that got faster because the machine got quieter is not a fault, and on a busy
host a stage's time jitters by tens of percent, which is not what an operator is looking for. The first event of
each key is not judged and not learned (warm-up: session creation, CUDA JIT); a key is judged only once it has
``min_samples`` events; an event is judged against the statistics *before* it, and an event judged anomalous is not
learned (``learn_anomalies``), so a run of slow calls does not teach the detector that slow is normal, until it
lasts: after ``relearn_after`` (50) anomalies of a key in a row, with no normal event between them, the detector
takes them for a new regime (a new model version under an old name, a PACS moved to a remote site), learns them
and says so in one log line; a lasting shift is flagged for a bounded number of events, not for ever (with HBOS
about ``relearn_after``; with SSTD more, the longer the key's history, as the new regime must move its mean and
sigma). State merges are exact (:mod:`ctzoo.perf.stats`), so a parameter server can hand every process the same
global statistics.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal

from ctzoo.perf.stats import (
    FINE_BINS_PER_OCTAVE,
    LatencyHistogram,
    RunningMoments,
    fine_bin,
    histogram_problem,
    moments_problem,
)

#: Chimbuko's offset inside the HBOS logarithm: the score of an empty bin is -log2 of it, 100.
HBOS_EPSILON = 78.88e-32
EMPTY_BIN_SCORE = -math.log2(HBOS_EPSILON)
#: Fewer bins than this many fine bins would make Scott's width meaningless; more cost time for nothing.
MAX_SCORING_BINS = 4096
#: The scoring histogram is rebuilt once its key has this much more data (a fraction of its count) and at least
#: REBUILD_MIN_EVENTS more events (rebuilding costs about 0.5 ms: not after every event of a young key), and before
#: it flags an event, once it is REBUILD_MIN_EVENTS events behind (an anomaly is judged against fresh statistics).
REBUILD_GROWTH = 0.05
REBUILD_MIN_EVENTS = 16

Key = tuple[str, ...]

log = logging.getLogger("ctzoo.perf")


@dataclass(frozen=True)
class DetectorConfig:
    """How events are judged (see the module docstring)."""

    algorithm: Literal["hbos", "sstd"] = "hbos"
    direction: Literal["slow", "both"] = "slow"  # slow: only events slower than usual can be anomalous
    min_ratio: float = 3.0  # ... and only at least this many times the key's median (not jitter on a busy host)
    # ... and at least this much longer than it: a Python thread waits for the GIL in 5 ms switch intervals, so a
    # busy service stretches any stage by several of them (a 2 ms encode taking 12 ms is scheduling, not a fault)
    min_excess_s: float = 0.025
    sstd_sigma: float = 6.0
    hbos_threshold: float = 0.99
    min_samples: int = 20
    skip_first: bool = True
    learn_anomalies: bool = False
    # this many anomalies of a key in a row (no normal event between them) are a new regime: learned (0: never)
    relearn_after: int = 50


@dataclass(frozen=True)
class Label:
    """The verdict on one event: ``anomalous``, its ``score`` and the ``threshold`` it was compared with (both in
    the algorithm's units); ``judged`` is False during a key's warm-up."""

    anomalous: bool
    score: float
    threshold: float
    judged: bool = True


@dataclass
class KeyState:
    """What a detector knows about one key: running moments and the fine-grid histogram, plus the first event
    seen (skipped) flag. Merging two states merges both parts exactly."""

    moments: RunningMoments = field(default_factory=RunningMoments)
    histogram: LatencyHistogram = field(default_factory=LatencyHistogram)

    def push(self, seconds: float) -> None:
        self.moments.push(seconds)
        self.histogram.push(seconds)

    def merge(self, other: KeyState) -> KeyState:
        return KeyState(self.moments.merge(other.moments), self.histogram.merge(other.histogram))

    def to_dict(self) -> dict:
        return {"moments": self.moments.to_dict(), "histogram": self.histogram.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> KeyState:
        return cls(RunningMoments.from_dict(data["moments"]), LatencyHistogram.from_dict(data["histogram"]))

    def problem(self) -> str | None:
        """Why no stream of durations gives this state (impossible moments, a histogram that does not match
        them); None when one does."""
        return moments_problem(self.moments) or histogram_problem(self.histogram, self.moments)


@dataclass(frozen=True)
class HbosTable:
    """A key's scoring histogram in log2(seconds): bins of Scott's width from ``low`` (one empty bin of padding on
    each side of the data), each bin's score, the threshold, and the median (for ``direction="slow"``)."""

    low: float
    width: float
    scores: tuple[float, ...]
    threshold: float
    count: int
    median: float

    def score(self, seconds: float) -> float:
        value = _log2_centre(fine_bin(seconds))  # log2 seconds, on the grid the histogram was counted on
        index = math.floor((value - self.low) / self.width)
        return self.scores[index] if 0 <= index < len(self.scores) else EMPTY_BIN_SCORE


def _log2_centre(index: int) -> float:
    return (index + 0.5) / FINE_BINS_PER_OCTAVE


def hbos_table(state: KeyState, threshold: float) -> HbosTable:
    """Re-bin ``state``'s histogram to Scott's width (3.49 sigma n^(-1/3)) and score every bin.

    One departure from Chimbuko's HBOS, measured on the service under load (tests/test_perf_serve.py): the bins
    are in **log2(seconds)**, not seconds. Stage latencies are multiplicative (a busy machine stretches a stage by
    a factor) and skewed, so equal-width bins in seconds leave the right tail full of empty bins that flag
    ordinary slow-ish calls; in log2 the bins follow the spread at every scale. The score range always includes
    an empty bin's score, and one empty bin pads each side of the data.
    """
    counts, n = state.histogram.counts, state.histogram.total
    centres = {index: _log2_centre(index) for index in counts}
    low, high = min(centres.values()), max(centres.values())
    mean = sum(c * centres[i] for i, c in counts.items()) / n
    sigma = math.sqrt(sum(c * (centres[i] - mean) ** 2 for i, c in counts.items()) / max(n - 1, 1))
    width = 3.49 * sigma * n ** (-1 / 3)
    if not width > 0 or (high - low) / width > MAX_SCORING_BINS:
        width = (high - low) / MAX_SCORING_BINS if high > low else 1.0 / FINE_BINS_PER_OCTAVE
    bins = max(1, math.ceil((high - low) / width)) + 2  # an empty bin on each side
    low -= width
    binned = [0] * bins
    for index, count in counts.items():
        binned[min(int((centres[index] - low) / width), bins - 2)] += count
    scores = tuple(-math.log2(c / n + HBOS_EPSILON) for c in binned)
    lowest = min(scores)
    return HbosTable(low, width, scores, lowest + threshold * (EMPTY_BIN_SCORE - lowest), n, _median(counts, n))


def _median(counts: dict[int, int], n: int) -> float:
    seen = 0
    for index in sorted(counts):
        seen += counts[index]
        if 2 * seen >= n:
            return _log2_centre(index)
    return 0.0


class AnomalyDetector:
    """Per-key states and the verdict on each new event (:meth:`observe`); :meth:`state_dict` and
    :meth:`merge_states` are what a parameter server exchanges."""

    def __init__(self, config: DetectorConfig = DetectorConfig()) -> None:
        self.config = config
        self.states: dict[Key, KeyState] = {}
        self._tables: dict[Key, HbosTable] = {}
        self._seen: set[Key] = set()
        # what this process learned since it last took its delta for a parameter server (see take_delta), and
        # the deltas it took before: its own statistics, apart from the other processes' in the global states
        self._delta: dict[Key, KeyState] = {}
        self._own: dict[Key, KeyState] = {}
        self._anomalous_run: dict[Key, list[float]] = {}  # a key's anomalies since its last normal event

    def observe(self, key: Key, seconds: float) -> Label:
        """Judge one event of ``key`` lasting ``seconds`` against what is known so far, then learn it (unless it
        was judged anomalous and ``learn_anomalies`` is off)."""
        if self.config.skip_first and key not in self._seen:
            self._seen.add(key)
            return Label(False, 0.0, 0.0, judged=False)
        state = self.states.setdefault(key, KeyState())
        if state.moments.count < self.config.min_samples:
            self._learn(key, state, seconds)
            return Label(False, 0.0, 0.0, judged=False)
        label = self._judge(key, state, seconds)
        if not label.anomalous or self.config.learn_anomalies:
            self._learn(key, state, seconds)
            self._anomalous_run.pop(key, None)
        else:
            self._note_anomaly(key, state, seconds)
        return label

    def _note_anomaly(self, key: Key, state: KeyState, seconds: float) -> None:
        """Keep an anomaly unlearned, unless it makes ``relearn_after`` in a row: then the run is a new regime,
        and all of it is learned (the events that follow are judged against it)."""
        run = self._anomalous_run.setdefault(key, [])
        run.append(seconds)
        if self.config.relearn_after and len(run) >= self.config.relearn_after:
            log.warning("perf: %s was anomalous %d times in a row (median %.3g s, was %.3g s); learning it as its "
                        "new regime", "|".join(key), len(run), sorted(run)[len(run) // 2],
                        2.0 ** self._tables[key].median)
            for value in run:
                self._learn(key, state, value)
            del self._anomalous_run[key]
            # judged against the new regime at once: a cached table would wait for 5 % more events to be rebuilt
            # (1,000 after 20,000), flagging every one of them
            self._tables.pop(key, None)

    def _learn(self, key: Key, state: KeyState, seconds: float) -> None:
        state.push(seconds)
        delta = self._delta.get(key)
        if delta is None:
            delta = self._delta[key] = KeyState()
        delta.push(seconds)

    def _judge(self, key: Key, state: KeyState, seconds: float) -> Label:
        table = self._tables.get(key)
        if table is None or state.moments.count >= max(table.count * (1 + REBUILD_GROWTH),
                                                         table.count + REBUILD_MIN_EVENTS):
            table = self._tables[key] = hbos_table(state, self.config.hbos_threshold)
        median = 2.0 ** table.median
        slower = seconds >= self.config.min_ratio * median and seconds - median >= self.config.min_excess_s
        faster = seconds <= median / self.config.min_ratio and median - seconds >= self.config.min_excess_s
        eligible = slower or (self.config.direction == "both" and faster)
        if self.config.algorithm == "sstd":
            sigma, mean = state.moments.std, state.moments.mean
            score = abs(seconds - mean) / sigma if sigma > 0 else (0.0 if seconds == mean else math.inf)
            return Label(eligible and score > self.config.sstd_sigma, score, self.config.sstd_sigma)
        score = table.score(seconds)
        if eligible and score > table.threshold and state.moments.count >= table.count + REBUILD_MIN_EVENTS:
            # an anomaly is judged against fresh statistics: a table 5 % behind a long history is hundreds of
            # events old, and a new regime's first events leave its bins sparse in the meantime
            self._tables.pop(key)
            return self._judge(key, state, seconds)
        return Label(eligible and score > table.threshold, score, table.threshold)

    def state_dict(self) -> dict[str, dict]:
        """Every key's state, JSON-friendly (keys joined with ``|``)."""
        return {"|".join(key): state.to_dict() for key, state in self.states.items()}

    def take_delta(self) -> dict[str, dict]:
        """What this detector learned since the last call (per key, :meth:`state_dict`'s form), and start a new
        delta: what a process sends its parameter server. A delta that did not reach the server is still part of
        :attr:`states`; send the same one again (the server merges each delta once)."""
        delta, self._delta = self._delta, {}
        for key, state in delta.items():
            self._own[key] = self._own[key].merge(state) if key in self._own else state
        return {"|".join(key): state.to_dict() for key, state in delta.items()}

    def own_state_dict(self) -> dict[str, dict]:
        """Like :meth:`state_dict`, but only what this process learned itself: equal to it without a parameter
        server; with one, :attr:`states` also hold every other process's events, and a store that merges the
        states of several processes must be given these, or it would count the others' events again."""
        own = dict(self._own)
        for key, state in self._delta.items():
            own[key] = own[key].merge(state) if key in own else state
        return {"|".join(key): state.to_dict() for key, state in own.items()}

    def known_keys(self) -> list[str]:
        """Every key this detector has seen (also those still in warm-up), joined with ``|``: the keys whose
        global states it asks a parameter server for."""
        return sorted("|".join(key) for key in self._seen.union(self.states))

    def prepare_global(self, states: dict[str, dict]) -> tuple[dict[Key, KeyState], dict[str, str]]:
        """A parameter server's global ``states`` parsed and checked (``(usable, refused with why)``): the slow
        part of :meth:`adopt_global`, which touches nothing of this detector, so it needs no lock."""
        usable, refused = {}, {}
        for name, data in states.items():
            merged = _global_state(data)
            if isinstance(merged, str):
                refused[name] = merged
            else:
                usable[tuple(name.split("|"))] = merged
        return usable, refused

    def adopt_prepared(self, usable: dict[Key, KeyState]) -> None:
        """The quick part of :meth:`adopt_global`: each key's global state merged with this detector's delta."""
        for key, merged in usable.items():
            if key in self._delta:
                merged = merged.merge(self._delta[key])
            self.states[key] = merged
            self._tables.pop(key, None)

    def adopt_global(self, states: dict[str, dict]) -> dict[str, str]:
        """Judge against the parameter server's global ``states`` from now on: each key's state becomes the global
        one merged with what this detector learned since it took its last delta (the global already holds every
        delta sent). Exact, as merges are: no event is lost or counted twice. Keys the server does not know yet
        (learned only after the delta was taken) keep their local state, and so do keys whose global state is
        impossible (:meth:`KeyState.problem`: a server that merged a bad delta), which are returned with why."""
        usable, refused = self.prepare_global(states)
        self.adopt_prepared(usable)
        return refused

    def merge_states(self, states: dict[str, dict]) -> None:
        """Merge states of other processes (:meth:`state_dict` output) into this detector's."""
        for name, data in states.items():
            key = tuple(name.split("|"))
            self.states[key] = self.states.get(key, KeyState()).merge(KeyState.from_dict(data))
            self._tables.pop(key, None)


def _global_state(data: object) -> KeyState | str:
    """A parameter server's state of one key, or why it cannot be judged with (what is read under the user's
    timed block must not raise there)."""
    try:
        state = KeyState.from_dict(data)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        return f"not a key state ({type(exc).__name__}: {exc})"
    return state.problem() or state
