"""Chimbuko's detectors in ctzoo.perf: exact merges of partial states, and HBOS finding what SSTD cannot."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctzoo.perf.detectors import AnomalyDetector, DetectorConfig, KeyState
from ctzoo.perf.stats import RunningMoments

KEY = ("recistnet-mini", "0.3.0", "predict", "cpu", "slices<=32")
#: What "quiet" means on a stream without injected events: at most this share of events flagged.
FALSE_ALARM_RATE = 0.01


def _bimodal(rng: np.random.Generator, n: int) -> np.ndarray:
    """Two stage latencies, as a cached and an uncached read: 10 ms and 30 ms, 0.4 ms spread each."""
    fast = rng.random(n) < 0.6
    return np.where(fast, rng.normal(0.010, 0.0004, n), rng.normal(0.030, 0.0004, n))


def test_merged_partial_states_equal_one_pass_over_all_events():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.lognormal(-4, 0.5, 3000), rng.normal(0.2, 0.01, 1000)])
    whole = KeyState()
    for v in values:
        whole.push(float(v))
    parts = [KeyState() for _ in range(4)]
    for k, v in enumerate(values):
        parts[k % 4 if k < 2000 else 3].push(float(v))  # unequal shares
    merged = parts[0].merge(parts[1]).merge(parts[2].merge(parts[3]))
    assert merged.histogram.counts == whole.histogram.counts  # exact
    for name in ("count", "min", "max"):
        assert getattr(merged.moments, name) == getattr(whole.moments, name)
    for name in ("mean", "m2", "m3", "m4"):
        assert math.isclose(getattr(merged.moments, name), getattr(whole.moments, name), rel_tol=1e-9), name
    assert math.isclose(merged.moments.std, float(np.std(values, ddof=1)), rel_tol=1e-9)
    empty = RunningMoments()
    assert merged.moments.merge(empty).to_dict() == merged.moments.to_dict()


def test_merged_detectors_judge_like_one_detector():
    rng = np.random.default_rng(1)
    values = _bimodal(rng, 4000)
    one, a, b = AnomalyDetector(), AnomalyDetector(), AnomalyDetector()
    for k, v in enumerate(values):
        one.states.setdefault(KEY, KeyState()).push(float(v))
        (a if k % 2 else b).states.setdefault(KEY, KeyState()).push(float(v))
    a.merge_states(b.state_dict())
    probes = [0.0101, 0.02, 0.0302, 0.05]
    assert [one._judge(KEY, one.states[KEY], p) for p in probes] == [a._judge(KEY, a.states[KEY], p) for p in probes]


@pytest.mark.parametrize("algorithm", ["hbos", "sstd"])
def test_both_stay_quiet_without_injected_events(algorithm):
    rng = np.random.default_rng(2)
    detector = AnomalyDetector(DetectorConfig(algorithm=algorithm))
    labels = [detector.observe(KEY, float(v)) for v in _bimodal(rng, 5000)]
    flagged = sum(label.anomalous for label in labels)
    assert flagged <= FALSE_ALARM_RATE * len(labels), flagged


def test_hbos_finds_latencies_between_the_modes_where_sstd_cannot():
    rng = np.random.default_rng(3)
    stream = _bimodal(rng, 5000)
    injected = rng.choice(np.arange(500, 5000), 50, replace=False)  # 1 %, after the warm-up
    stream[injected] = rng.uniform(0.016, 0.024, injected.size)  # between the modes
    truth = np.zeros(stream.size, bool)
    truth[injected] = True
    results = {}
    for algorithm in ("hbos", "sstd"):  # from 1.5 times and 5 ms over the median (the defaults are for busy services)
        detector = AnomalyDetector(DetectorConfig(algorithm=algorithm, min_ratio=1.5, min_excess_s=0.005))
        flagged = np.array([detector.observe(KEY, float(v)).anomalous for v in stream])
        recall = (flagged & truth).sum() / truth.sum()
        false_alarms = (flagged & ~truth).sum() / (~truth).sum()
        results[algorithm] = (recall, false_alarms)
    assert results["hbos"][0] >= 0.9 and results["hbos"][1] <= FALSE_ALARM_RATE, results
    assert results["sstd"][0] <= 0.1, results  # sigma spans both modes: the gap is within 1 sigma of the mean


def test_first_event_per_key_is_skipped_and_warm_up_is_not_judged():
    detector = AnomalyDetector(DetectorConfig(min_samples=5))
    first = detector.observe(KEY, 5.0)  # a session being created
    assert not first.judged and KEY not in detector.states
    for _ in range(5):
        assert not detector.observe(KEY, 0.01).judged
    assert detector.observe(KEY, 0.01).judged


@pytest.mark.parametrize("algorithm", ["hbos", "sstd"])
def test_a_lasting_shift_is_flagged_for_a_bounded_number_of_events_and_then_learned(algorithm, caplog):
    import logging

    rng = np.random.default_rng(3)
    config = DetectorConfig(algorithm=algorithm)
    detector, key = AnomalyDetector(config), ("pacs", "1", "upload", "-", "17-32")
    for seconds in 0.02 * rng.lognormal(0, 0.1, 2000):
        detector.observe(key, float(seconds))
    with caplog.at_level(logging.WARNING, logger="ctzoo.perf"):
        shifted = [detector.observe(key, float(s)).anomalous for s in 0.08 * rng.lognormal(0, 0.1, 1000)]
    assert config.relearn_after <= sum(shifted) <= 3 * config.relearn_after, sum(shifted)
    assert sum(shifted[500:]) <= 5  # the new regime is normal now
    assert any("learning it as its new regime" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("history", [200, 2000, 20000])
def test_hbos_recovers_from_a_lasting_shift_in_about_relearn_after_events_however_long_the_history(history):
    """After ``relearn_after`` anomalies in a row the new regime is learned and judged against at once: before, the
    cached scoring table waited for 5 % more events (1,000 after 20,000 events of history) and every one of them
    was flagged. SSTD's recovery grows with the history (its mean and sigma are every learned event's: 50 events
    of the new regime hardly move them), as docs/perf.md says."""
    rng = np.random.default_rng(0)
    key = ("m", "1", "predict", "cpu", "1")
    flagged = {}
    for algorithm in ("hbos", "sstd"):
        detector = AnomalyDetector(DetectorConfig(algorithm=algorithm, relearn_after=50))
        for seconds in 0.020 * rng.uniform(0.95, 1.05, history):
            detector.observe(key, float(seconds))
        shifted = 0.080 * rng.uniform(0.95, 1.05, 3000)
        flagged[algorithm] = sum(detector.observe(key, float(seconds)).anomalous for seconds in shifted)
    assert 50 <= flagged["hbos"] <= 60, flagged
    if history == 20000:
        assert flagged["sstd"] > 300, flagged
