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
import sys
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
        """Sample standard deviation (0 below 2 values, and for a variance that is not positive)."""
        variance = self.m2 / (self.count - 1) if self.count > 1 else 0.0
        # M2 is a sum of squares, so a negative (or NaN) one can only come from a state that should never have been
        # merged; the detector calls this inside the user's timed block, where it must not raise. 0 is what a
        # spread-less key gives anyway, and SSTD then still flags only events past the ratio and excess floors.
        return math.sqrt(variance) if variance > 0 else 0.0

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


#: The fine bins a duration can fall in: fine_bin() counts anything below MIN_SECONDS as it, and no float is
#: larger than sys.float_info.max.
LOWEST_BIN, HIGHEST_BIN = fine_bin(MIN_SECONDS), fine_bin(sys.float_info.max)
#: How far a mean may lie outside [min, max], relative to their size: float rounding, never seen in fuzzing but
#: cheap to allow (a parameter server that refused an honest delta would have it sent again for ever).
MEAN_SLACK = 1e-12


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def moments_problem(moments: RunningMoments) -> str | None:
    """Why ``moments`` cannot be the running moments of any durations (None when they can).

    A parameter server merges what processes send into the states every process judges with, so one impossible
    state (a negative M2 makes :attr:`RunningMoments.std` meaningless) would reach them all."""
    count = moments.count
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        return f"count {count!r} is not a count"
    for name in ("mean", "m2", "m3", "m4"):
        if not _finite(getattr(moments, name)):
            return f"{name} {getattr(moments, name)!r} is not a finite number"
    low, high = moments.min, moments.max
    if count == 0:
        if (moments.mean, moments.m2, moments.m3, moments.m4) != (0, 0, 0, 0) or (low, high) != (math.inf, -math.inf):
            return "count 0 but moments not 0 or a min or max given"
        return None
    if not (_finite(low) and _finite(high)):
        return f"count {count} needs a finite min and max (null stands for none, before the first value)"
    if low > high:
        return f"min {low} > max {high}"
    slack = MEAN_SLACK * max(abs(low), abs(high))
    if not low - slack <= moments.mean <= high + slack:
        return f"mean {moments.mean} outside [min, max] = [{low}, {high}]"
    for name in ("m2", "m4"):  # sums of even powers of deviations
        if getattr(moments, name) < 0:
            return f"{name} {getattr(moments, name)} is negative (a sum of even powers)"
    return None


def histogram_problem(histogram: LatencyHistogram, moments: RunningMoments) -> str | None:
    """Why ``histogram`` cannot be the fine-grid counts of the durations that ``moments`` (checked by
    :func:`moments_problem` first) describe (None when it can)."""
    counts = histogram.counts
    bad = [(index, n) for index, n in counts.items()
           if isinstance(n, bool) or not isinstance(n, int) or n < 0 or not isinstance(index, int)]
    if bad:
        return f"histogram bin {bad[0][0]!r}: count {bad[0][1]!r} is not a count"
    if histogram.total != moments.count:
        return f"histogram total {histogram.total} differs from the moments' count {moments.count}"
    if moments.count == 0:
        return "count 0 but histogram bins given" if counts else None
    # every duration lies in [min, max] and fine_bin is monotonic; one bin of slack on each side for another
    # machine's log2 rounding a value on a bin's edge the other way
    low = max(LOWEST_BIN, fine_bin(moments.min) - 1)
    high = min(HIGHEST_BIN, fine_bin(moments.max) + 1)
    outside = sorted(index for index in counts if not low <= index <= high)
    if outside:
        return (f"histogram bins {outside[:3]} outside {low}..{high}, the fine bins of durations from min "
                f"{moments.min} to max {moments.max}")
    return None


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
