"""Mergeable per-key statistics for in-situ anomaly detection (Chimbuko's ``RunStats`` and HBOS histograms).

Both states merge exactly: merging the states of several processes gives the state one process would have built
from all their events (up to float rounding for the moments), which is what lets a parameter server combine
serve workers, Ray workers and DDP ranks.

* :class:`RunningMoments`: count, mean, M2, M3, M4, min, max with Welford/Pébay updates and the closed-form
  pairwise merge (Pébay 2008, as Chimbuko's ``RunStats::operator+``).
* :class:`LatencyHistogram`: counts on a fixed fine grid in log2(seconds), ``FINE_BINS_PER_OCTAVE`` bins per
  doubling (a sparse dict). A fixed grid makes merging an exact sum of counts; HBOS then re-bins the merged counts
  into bins of Scott's width (3.49 sigma n^(-1/3)) when it scores, so the scoring histogram is Chimbuko's while the
  stored one stays mergeable. A value is placed at its fine bin's centre: within 0.6 % of its true value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

FINE_BINS_PER_OCTAVE = 64
#: Durations below this are counted as this (a clock's resolution; log2 needs a positive value).
MIN_SECONDS = 1e-7


@dataclass
class RunningMoments:
    """Running count, mean, central moment sums M2..M4, min and max of one key's durations (seconds)."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    m3: float = 0.0
    m4: float = 0.0
    min: float = math.inf
    max: float = -math.inf

    def push(self, x: float) -> None:
        """Add one value (Welford/Pébay one-pass update)."""
        n1 = self.count
        self.count = n = n1 + 1
        delta = x - self.mean
        delta_n = delta / n
        delta_n2 = delta_n * delta_n
        term1 = delta * delta_n * n1
        self.mean += delta_n
        self.m4 += term1 * delta_n2 * (n * n - 3 * n + 3) + 6 * delta_n2 * self.m2 - 4 * delta_n * self.m3
        self.m3 += term1 * delta_n * (n - 2) - 3 * delta_n * self.m2
        self.m2 += term1
        self.min, self.max = min(self.min, x), max(self.max, x)

    def merge(self, other: RunningMoments) -> RunningMoments:
        """The moments of both value sets together (exact closed form); neither input changes."""
        if other.count == 0:
            return RunningMoments(**vars(self))
        if self.count == 0:
            return RunningMoments(**vars(other))
        na, nb = self.count, other.count
        n = na + nb
        delta = other.mean - self.mean
        d2, d3, d4 = delta * delta, delta ** 3, delta ** 4
        m2 = self.m2 + other.m2 + d2 * na * nb / n
        m3 = (self.m3 + other.m3 + d3 * na * nb * (na - nb) / (n * n)
              + 3 * delta * (na * other.m2 - nb * self.m2) / n)
        m4 = (self.m4 + other.m4 + d4 * na * nb * (na * na - na * nb + nb * nb) / n ** 3
              + 6 * d2 * (na * na * other.m2 + nb * nb * self.m2) / (n * n)
              + 4 * delta * (na * other.m3 - nb * self.m3) / n)
        return RunningMoments(n, self.mean + delta * nb / n, m2, m3, m4, min(self.min, other.min),
                              max(self.max, other.max))

    @property
    def std(self) -> float:
        """Sample standard deviation (0 below 2 values)."""
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0

    def summary(self) -> dict:
        """count, mean_s, std_s, min_s, max_s (min and max None before the first value): what routes report."""
        seen = self.count > 0
        return {"count": self.count, "mean_s": self.mean, "std_s": self.std, "min_s": self.min if seen else None,
                "max_s": self.max if seen else None}

    def to_dict(self) -> dict:
        return {k: (None if math.isinf(v) else v) for k, v in vars(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> RunningMoments:
        moments = cls(**{k: v for k, v in data.items() if k not in ("min", "max")})
        moments.min = math.inf if data.get("min") is None else data["min"]
        moments.max = -math.inf if data.get("max") is None else data["max"]
        return moments


def fine_bin(seconds: float) -> int:
    """The fine-grid bin of a duration: floor(log2(seconds) * FINE_BINS_PER_OCTAVE)."""
    return math.floor(math.log2(max(seconds, MIN_SECONDS)) * FINE_BINS_PER_OCTAVE)


def fine_bin_centre(index: int) -> float:
    return 2.0 ** ((index + 0.5) / FINE_BINS_PER_OCTAVE)


@dataclass
class LatencyHistogram:
    """Counts of durations on the fixed fine log grid (``{fine bin: count}``); merging adds counts."""

    counts: dict[int, int] = field(default_factory=dict)

    def push(self, seconds: float) -> None:
        index = fine_bin(seconds)
        self.counts[index] = self.counts.get(index, 0) + 1

    def merge(self, other: LatencyHistogram) -> LatencyHistogram:
        counts = dict(self.counts)
        for index, count in other.counts.items():
            counts[index] = counts.get(index, 0) + count
        return LatencyHistogram(counts)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {str(k): v for k, v in sorted(self.counts.items())}

    @classmethod
    def from_dict(cls, data: dict) -> LatencyHistogram:
        return cls({int(k): int(v) for k, v in data.items()})
