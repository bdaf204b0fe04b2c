"""The architecture-search benchmark's own choices (``benchmarks/nas.py``): which candidates are retrained (the top
Pareto layers), the rule standing in for the analyst, and the paired interval."""

import importlib.util
import random
import statistics
from pathlib import Path

import pytest
from scipy import stats

from ctzoo.nas import SearchSpace, sample

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("nas_benchmark", ROOT / "benchmarks" / "nas.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def candidates(count: int, seed: int = 0) -> list[dict]:
    rng, space = random.Random(seed), SearchSpace(base_channels=(8, 16, 32, 64), num_classes=3)
    result = []
    for index in range(count):
        arch = sample(space, rng)
        result.append({"id": f"c{index:02d}", "architecture": arch.to_json(), "latency_ms": rng.uniform(5, 40),
                       "dice": None if index == 0 else rng.uniform(0.3, 0.6)})
    return result


def dominated(a: dict, b: dict) -> bool:
    """b dominates a."""
    return (b["dice"] >= a["dice"] and b["latency_ms"] <= a["latency_ms"]
            and (b["dice"] > a["dice"] or b["latency_ms"] < a["latency_ms"]))


def test_the_retrained_candidates_are_the_top_pareto_layers(bench):
    pool = candidates(40)
    scored = [c for c in pool if c["dice"] is not None]
    layer, left, rank = 0, list(scored), {}
    while left:  # brute-force non-dominated sorting
        layer += 1
        front = [c for c in left if not any(dominated(c, other) for other in left)]
        rank.update({c["id"]: layer for c in front})
        left = [c for c in left if c["id"] not in {f["id"] for f in front}]
    for count in (1, 5, 12, 39, 60):
        picked = bench.pareto_layers(pool, count)
        assert len(picked) == min(count, 39) and len({c["id"] for c in picked}) == len(picked)
        assert all(c["dice"] is not None for c in picked)  # unscored candidates are never picked
        worst = max(rank[c["id"]] for c in picked)
        assert {c["id"] for c in scored if rank[c["id"]] < worst} <= {c["id"] for c in picked}  # earlier layers whole
        last = [c for c in scored if rank[c["id"]] == worst]  # the last layer used is cut by Dice
        kept = [c for c in picked if rank[c["id"]] == worst]
        assert min(c["dice"] for c in kept) >= max((c["dice"] for c in last if c not in kept), default=0)


def test_the_analyst_rule_drops_the_value_that_hurts_dice_most(bench):
    space = SearchSpace(base_channels=(8, 16, 32, 64), num_classes=3)
    pool = candidates(30, seed=1)
    for c in pool:
        c["dice"] = 0.5 - (0.2 if c["architecture"]["levels"][2]["kernel"] == 5 else 0.0)
    assert bench.analyst_drop(pool, space) == "level2.kernel=5"
    for c in pool:
        c["dice"] = 0.5 - (0.2 if c["architecture"]["gate"] == "sigmoid" else 0.0)
    assert bench.analyst_drop(pool, space) == "gate=sigmoid"
    assert space.constrain(drop=[bench.analyst_drop(pool, space)]).allowed_values("gate") == ("none",)


def test_the_paired_interval_is_the_t_interval(bench):
    values = [0.022, 0.007, 0.023]
    interval = stats.t.interval(0.95, len(values) - 1, loc=statistics.fmean(values), scale=stats.sem(values))
    assert bench.t_interval(values) == pytest.approx(list(interval))
    assert bench.t_interval([0.1]) is None
