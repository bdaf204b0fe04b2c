"""Baechi's placers (m-TOPO, m-ETF, m-SCT) and the step simulator on synthetic graphs (issue 24): the caps hold,
a graph that cannot fit is refused with the caps that would fit, independent branches spread and costly chains
stay together, the placers come near the brute-force optimum on small graphs and stay put under profile noise,
and the simulator's accounting matches sums done by hand."""

from __future__ import annotations

import itertools
import math
import random
import re
import statistics
from dataclasses import replace

import numpy as np
import pytest

from ctzoo.scaling.placement.algorithms import CapacityError, coplace_groups, favourite_children, m_etf, m_topo
from ctzoo.scaling.placement.graph import (
    CommModel,
    Device,
    OpNode,
    PlacementError,
    PlacementGraph,
    merge_profiles,
    parse_devices,
)
from ctzoo.scaling.placement.planner import ALGORITHMS, place
from ctzoo.scaling.placement.profile import fit_comm_model, fit_transfer_line
from ctzoo.scaling.placement.simulate import BACKWARD, expert_plan, simulate, single_device_plan

MS = 1e-3
MIB = 2**20
FREE = CommModel(default=(0.0, 0.0))
COMM = CommModel(default=(1e-9, 1e-4))  # ~1 ms per MiB + 0.1 ms: transfers matter, compute dominates
UNLIMITED = 2**50
SCHEDULERS = ["m-etf", "m-sct"]


def op(name: str, forward_ms: float = 1.0, backward_ms: float = 0.0, **memory) -> OpNode:
    return OpNode(name, forward_s={"cuda": forward_ms * MS}, backward_s={"cuda": backward_ms * MS}, **memory)


def gpus(count: int, cap: int = UNLIMITED) -> list[Device]:
    return [Device(f"cuda:{i}", cap) for i in range(count)]


def chain(count: int, forward_ms: float = 10.0, nbytes: int = MIB, training: bool = False, **memory
          ) -> PlacementGraph:
    nodes = [op(f"op{i}", forward_ms, 2 * forward_ms, **memory) for i in range(count)]
    edges = [(f"op{i}", f"op{i + 1}", nbytes) for i in range(count - 1)]
    return PlacementGraph(nodes, edges, training=training)


def random_dag(seed: int, size: int, training: bool = True, groups: int = 0) -> PlacementGraph:
    """Ops of 1-10 ms forward, 1-20 ms backward, up to 4 MiB permanent and temporary memory, 1/4-8 MiB outputs;
    each op reads one or two earlier ops; ``groups`` pairs of ops must share a device."""
    rng = random.Random(seed)
    nodes = [op(f"op{i}", rng.uniform(1, 10), rng.uniform(1, 20), permanent_bytes=rng.randint(0, 4 * MIB),
                temporary_bytes=rng.randint(0, 4 * MIB), output_bytes=rng.randint(MIB // 4, 8 * MIB))
             for i in range(size)]
    edges = [(f"op{i}", f"op{j}", nodes[i].output_bytes)
             for j in range(1, size) for i in rng.sample(range(j), min(j, rng.randint(1, 2)))]
    for group, pair in enumerate(zip(*[iter(rng.sample(range(size), 2 * groups))] * 2)):
        for index in pair:
            nodes[index].group = f"group{group}"
    return PlacementGraph(nodes, edges, training=training)


def footprint(graph: PlacementGraph) -> int:
    return sum(n.permanent_bytes + n.temporary_bytes + n.output_bytes for n in graph.nodes)


def makespan(graph: PlacementGraph, placement: dict[str, str], devices: list[Device], comm: CommModel) -> float:
    return simulate(graph, placement, devices, comm).makespan_s


# --- the simulator's accounting, by hand -------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
def test_a_chain_on_one_device_takes_the_sum_of_its_compute(training):
    graph = chain(5, training=training)
    result = simulate(graph, {n.name: "cuda:0" for n in graph.nodes}, gpus(2), COMM)
    expected = 5 * 10 * MS + (5 * 20 * MS if training else 0.0)
    assert result.makespan_s == pytest.approx(expected)
    assert result.compute_s == pytest.approx({"cuda:0": expected, "cuda:1": 0.0})
    assert result.transfer_s == 0.0
    assert len(result.timeline) == (10 if training else 5)
    assert [label for label, *_ in result.timeline][-1] == ("op0" + BACKWARD if training else "op4")


@pytest.mark.parametrize("training", [False, True])
def test_a_transfer_costs_coef_times_bytes_plus_intercept_and_is_received_once(training):
    comm = CommModel({"cuda->cuda": (2e-9, 3e-4)})
    transfer = 2e-9 * 5 * MIB + 3e-4
    graph = PlacementGraph([op("a", 1, 4), op("b", 2, 5), op("c", 3, 6)],
                           [("a", "b", 5 * MIB), ("a", "c", 5 * MIB)], training=training)
    result = simulate(graph, {"a": "cuda:0", "b": "cuda:1", "c": "cuda:1"}, gpus(2), comm)
    forward = 1 * MS + transfer + 2 * MS + 3 * MS  # the copy on cuda:1 serves b and c
    backward = 6 * MS + 5 * MS + transfer + 4 * MS  # b's and c's gradients are summed there and sent back once
    assert result.makespan_s == pytest.approx(forward + (backward if training else 0.0))
    assert result.transfer_s == pytest.approx(transfer * (2 if training else 1))


def test_a_free_device_runs_its_first_ready_op_unless_held_in_order():
    """b (10 ms, on cuda:1) waits for a (10 ms, cuda:0); c (1 ms, cuda:1) comes later in the model's order but
    is ready at once: list scheduling runs c in b's wait (20 ms), in order c waits for b (21 ms)."""
    graph = PlacementGraph([op("a", 10), op("b", 10), op("c", 1)], [("a", "b", 0)], training=False)
    placement = {"a": "cuda:0", "b": "cuda:1", "c": "cuda:1"}
    assert simulate(graph, placement, gpus(2), FREE).makespan_s == pytest.approx(20 * MS)
    assert simulate(graph, placement, gpus(2), FREE, in_order=True).makespan_s == pytest.approx(21 * MS)


def test_peak_memory_of_a_diamond_matches_the_hand_count():
    """a -> b, a -> c, b -> d, c -> d, 1 ms each, on one device. Inference: at d's start (t = 3 ms) a's output is
    gone (its consumers b, c have run) and c's temporary too: 3000 + 200 + 300 + 40 + 400 = 3940. Training keeps
    every temporary and every output (autograd holds a consumer's inputs until its backward) until the backward:
    3000 + (10 + 20 + 30 + 40) + (100 + 200 + 300 + 400) = 4100. With a on cuda:0 and
    the rest on cuda:1 (free transfers), cuda:1 holds a's copy (100) until c ends: at c's start (t = 2 ms),
    100 + b's output 200 + c's temporary 30 and output 300 + d's permanent 2000 = 2630; at d's start, a's copy
    and c's temporary are gone: 2000 + 200 + 300 + 40 + 400 = 2940; cuda:0 peaks at 1000 + 10 + 100."""
    nodes = [op("a", 1, 1, permanent_bytes=1000, temporary_bytes=10, output_bytes=100),
             op("b", 1, 1, temporary_bytes=20, output_bytes=200), op("c", 1, 1, temporary_bytes=30, output_bytes=300),
             op("d", 1, 1, permanent_bytes=2000, temporary_bytes=40, output_bytes=400)]
    edges = [("a", "b", 100), ("a", "c", 100), ("b", "d", 200), ("c", "d", 300)]
    one = dict.fromkeys("abcd", "cuda:0")
    for training, peak in [(False, 3940), (True, 4100)]:
        graph = PlacementGraph(nodes, edges, training=training)
        assert simulate(graph, one, gpus(2), FREE).peak_bytes == {"cuda:0": peak, "cuda:1": 0}
    split = {"a": "cuda:0", "b": "cuda:1", "c": "cuda:1", "d": "cuda:1"}
    peaks = simulate(PlacementGraph(nodes, edges, training=False), split, gpus(2), FREE).peak_bytes
    assert peaks == {"cuda:0": 1110, "cuda:1": 2940}


def test_malformed_input_is_refused():
    graph = chain(3)
    with pytest.raises(PlacementError, match="m-topo, m-etf, m-sct"):
        place(graph, gpus(2), "m-magic", COMM)
    with pytest.raises(PlacementError, match="cuda:7"):
        simulate(graph, {"op0": "cuda:0", "op1": "cuda:7", "op2": "cuda:0"}, gpus(2), COMM)
    with pytest.raises(PlacementError, match="unplaced: op2"):
        simulate(graph, {"op0": "cuda:0", "op1": "cuda:0"}, gpus(2), COMM)
    with pytest.raises(PlacementError, match="cycle"):
        place(PlacementGraph([op("a"), op("b")], [("a", "b", 1), ("b", "a", 1)]), gpus(2), "m-etf", COMM)
    with pytest.raises(PlacementError, match="empty"):
        place(graph, [], "m-etf", COMM)


# --- memory caps ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_simulated_peaks_never_exceed_the_caps(algorithm):
    """Random 30-op DAGs with three co-placement pairs on 2-4 devices whose caps together hold 0.9-1.4 times
    the graph's memory: every plan's simulated peaks fit its caps and each pair shares a device; what cannot fit
    is refused (placed / refused of the 36: m-ETF 14 / 22, m-SCT 13 / 23, m-TOPO 7 / 29). m-TOPO never frees
    memory, so even its raw placement cannot exceed a cap."""
    placed = refused = 0
    for seed in range(12):
        graph = random_dag(seed, 30, training=seed % 2 == 0, groups=3)
        count = 2 + seed % 3
        for fraction in (0.9, 1.1, 1.4):
            devices = gpus(count, int(footprint(graph) / count * fraction))
            if algorithm == "m-topo":
                try:
                    raw = m_topo(graph, devices, COMM)
                except CapacityError:
                    raw = None
                if raw is not None:
                    peaks = simulate(graph, raw, devices, COMM).peak_bytes
                    assert all(peaks[d.name] <= d.memory_bytes for d in devices)
            try:
                plan = place(graph, devices, algorithm, COMM)
            except CapacityError:
                refused += 1
                continue
            placed += 1
            result = simulate(graph, plan.placement, devices, COMM)
            assert result.peak_bytes == plan.peak_bytes
            assert all(result.peak_bytes[d.name] <= d.memory_bytes for d in devices), (seed, fraction)
            for group in {n.group for n in graph.nodes} - {None}:
                assert len({plan.placement[n.name] for n in graph.nodes if n.group == group}) == 1
    assert placed >= 5 and refused >= 5, (placed, refused)


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_a_graph_that_cannot_fit_is_refused_with_the_smallest_caps_that_do(algorithm):
    """Three 3 MiB ops on two 2 MiB devices: some device must hold two of them, so 6 MiB each is the least."""
    graph = chain(3, forward_ms=1.0, nbytes=0, permanent_bytes=3 * MIB)
    with pytest.raises(CapacityError) as refusal:
        place(graph, gpus(2, 2 * MIB), algorithm, COMM)
    message = str(refusal.value)
    assert "MiB" in message and "uniform scale" in message, message
    suggested = parse_devices(re.search(r"--devices (\S+)", message).group(1))
    assert all(6 * MIB <= d.memory_bytes <= 6 * MIB * 1.01 for d in suggested), message
    assert refusal.value.devices == suggested and 3.0 <= refusal.value.scale <= 3.0 * 1.01
    assert place(graph, suggested, algorithm, COMM).peak_bytes["cuda:0"] <= suggested[0].memory_bytes
    with pytest.raises(CapacityError):
        place(graph, gpus(2, 6 * MIB - 1), algorithm, COMM)


def three_gpus(mib: float) -> list[Device]:
    return [Device(f"cuda:{i}", int(mib * MIB)) for i in (1, 2, 3)]


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_caps_above_ones_that_fit_fit_too_and_a_refusal_suggests_caps_near_the_least(algorithm):
    """A greedy placer can fit caps and miss larger ones (m-ETF on this DAG, alone: three devices of 97.2-98.2 and
    99.6-100.4 MiB, then from 103.8 MiB; it once refused 102 MiB and suggested 103.92): the retries with budgets
    cut below the caps make every cap from the least that fits up fit, here in steps of 1 MiB. Caps below it
    are refused with caps that fit and are no larger than the least found here (the bisection once suggested
    104.02 MiB for 90 MiB, stepping over 98 MiB)."""
    graph = random_dag(25, 30)

    def accepted(mib: float) -> bool:
        try:
            plan = place(graph, three_gpus(mib), algorithm, CommModel(), suggest_caps=False)
        except CapacityError:
            return False
        return all(peak <= mib * MIB for peak in plan.peak_bytes.values())

    fits = [mib for mib in range(90, 111) if accepted(mib)]
    least = fits[0]
    assert 90 < least and fits == list(range(least, 111)), fits
    with pytest.raises(CapacityError) as refusal:
        place(graph, three_gpus(90), algorithm, CommModel())
    suggested = parse_devices(re.search(r"--devices (\S+)", str(refusal.value)).group(1))
    assert refusal.value.devices == suggested
    assert all(device.memory_bytes <= least * MIB for device in suggested), str(refusal.value)
    plan = place(graph, suggested, algorithm, CommModel())
    assert all(plan.peak_bytes[d.name] <= d.memory_bytes for d in suggested)


# --- what the schedules achieve ------------------------------------------------------------------------------


def fork_join(branches: int, length: int) -> PlacementGraph:
    """A free source feeding ``branches`` independent chains of ``length`` 10 ms ops (20 ms backward) into a free
    sink."""
    nodes, edges = [op("source", 0.0)], []
    for branch in range(branches):
        previous = "source"
        for step in range(length):
            name = f"b{branch}.{step}"
            nodes.append(op(name, 10.0, 20.0, temporary_bytes=MIB, output_bytes=MIB))
            edges.append((previous, name, MIB))
            previous = name
        edges.append((previous, "sink", MIB))
    return PlacementGraph(nodes + [op("sink", 0.0)], edges, training=True)


@pytest.mark.parametrize("algorithm", SCHEDULERS)
@pytest.mark.parametrize("branches,devices", [(2, 2), (4, 2), (3, 3), (6, 3), (2, 4), (8, 4), (3, 2)])
def test_independent_branches_spread_over_the_devices(algorithm, branches, devices):
    """With free transfers the step is serial / min(branches, devices) to float rounding (tolerance 1e-9
    relative) when the branches divide evenly; 3 branches on 2 devices take the optimal 2 branch-times."""
    graph = fork_join(branches, 3)
    serial = makespan(graph, {n.name: "cuda:0" for n in graph.nodes}, gpus(devices), FREE)
    expected = serial / min(branches, devices) * (math.ceil(branches / devices) / (branches / devices)
                                                  if branches > devices else 1.0)
    placement = ALGORITHMS[algorithm](graph, gpus(devices), FREE)
    assert makespan(graph, placement, gpus(devices), FREE) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("algorithm", SCHEDULERS)
def test_a_chain_with_costly_transfers_stays_on_one_device(algorithm):
    graph = chain(8, training=True)
    costly = CommModel(default=(1e-6, 1e-3))  # 1 s per MiB against 10 ms ops
    placement = ALGORITHMS[algorithm](graph, gpus(3), costly)
    assert len(set(placement.values())) == 1
    assert makespan(graph, placement, gpus(3), costly) == pytest.approx(8 * 30 * MS)


def brute_force_optimum(graph: PlacementGraph, devices: list[Device], comm: CommModel) -> float:
    """The best simulated step over every assignment (the first op pinned to cuda:0: the devices are alike)."""
    names = [n.name for n in graph.nodes]
    return min(makespan(graph, {name: devices[d].name for name, d in zip(names, (0,) + rest)}, devices, comm)
               for rest in itertools.product(range(len(devices)), repeat=len(names) - 1))


def test_m_etf_and_m_sct_come_near_the_brute_force_optimum():
    """30 random DAGs of 5-8 ops (training or inference) on 2-3 devices, transfers ~1 ms per MiB + 1 ms, against
    the best of all device assignments in the same simulator. Measured worst / mean simulated step over the
    optimum: m-ETF 1.189 / 1.028, m-SCT 1.408 / 1.038 (m-TOPO, which ignores time, 1.759 / 1.231). m-SCT's
    worst is an op with five children, each transfer as long as a child's compute: no favourite survives the
    rounding and the urgent-time rule runs a short leaf before the critical path, as Hanen and Munier's rule
    (made for transfers shorter than compute) does. Bounds asserted: worst 1.3 and 1.5, mean 1.1."""
    comm = CommModel(default=(1e-9, 1e-3))
    ratios: dict[str, list[float]] = {"m-etf": [], "m-sct": []}
    for seed in range(30):
        rng = random.Random(1000 + seed)
        size, count = rng.randint(5, 8), rng.choice([2, 3])
        graph = random_dag(seed, size, training=rng.random() < 0.5)
        best = brute_force_optimum(graph, gpus(count), comm)
        for algorithm, found in ratios.items():
            found.append(makespan(graph, ALGORITHMS[algorithm](graph, gpus(count), comm), gpus(count), comm) / best)
    assert min(min(found) for found in ratios.values()) >= 1 - 1e-9  # nothing beats the optimum
    assert max(ratios["m-etf"]) <= 1.3 and max(ratios["m-sct"]) <= 1.5, ratios
    assert statistics.mean(ratios["m-etf"]) <= 1.1 and statistics.mean(ratios["m-sct"]) <= 1.1, ratios


def perturbed(graph: PlacementGraph, seed: int, spread: float = 0.2) -> PlacementGraph:
    """Every compute time, memory size and edge size scaled by its own factor in [1 - spread, 1 + spread]."""
    rng = random.Random(seed)

    def noisy(value: float) -> float:
        return value * rng.uniform(1 - spread, 1 + spread)

    nodes = [replace(n, forward_s={k: noisy(v) for k, v in n.forward_s.items()},
                     backward_s={k: noisy(v) for k, v in n.backward_s.items()},
                     permanent_bytes=int(noisy(n.permanent_bytes)), temporary_bytes=int(noisy(n.temporary_bytes)),
                     output_bytes=int(noisy(n.output_bytes))) for n in graph.nodes]
    return PlacementGraph(nodes, [(s, d, int(noisy(b))) for s, d, b in graph.edges], training=graph.training)


@pytest.mark.parametrize("algorithm", SCHEDULERS)
def test_placements_are_stable_under_profile_noise(algorithm):
    """20 random 30-op DAGs on 3 devices, each placed from its profile and again from the profile with +-20 %
    noise (no placement came out the same: greedy ties fall differently). Measured over the 20, the noisy plan
    run on the true profile against the true profile's plan: m-ETF 0.94 / median 1.03 / worst 1.14, m-SCT
    0.88 / 0.99 / 1.12. The noisy plan's predicted step against the original prediction: m-ETF 0.93-1.25,
    m-SCT 0.88-1.18, about what the noise does to an unchanged plan (0.97-1.25 and 0.95-1.13). Asserted:
    worst 1.25 and median 1.05 on the true profile, predictions within 0.75-1.35."""
    ratios, predicted = [], []
    for seed in range(20):
        graph = random_dag(seed, 30, training=seed % 2 == 0)
        noisy = perturbed(graph, 100 + seed)
        original = makespan(graph, ALGORITHMS[algorithm](graph, gpus(3), COMM), gpus(3), COMM)
        replaced = ALGORITHMS[algorithm](noisy, gpus(3), COMM)
        ratios.append(makespan(graph, replaced, gpus(3), COMM) / original)
        predicted.append(makespan(noisy, replaced, gpus(3), COMM) / original)
    assert max(ratios) <= 1.25 and statistics.median(ratios) <= 1.05, sorted(ratios)
    assert all(0.75 <= ratio <= 1.35 for ratio in predicted), sorted(predicted)


# --- smaller pieces -----------------------------------------------------------------------------------------


def test_the_lp_picks_the_child_behind_the_heavy_edge_as_favourite():
    graph = PlacementGraph([op("source"), op("heavy"), op("light")],
                           [("source", "heavy", 64 * MIB), ("source", "light", 1024)])
    assert favourite_children(graph, gpus(2), COMM) == {"source": "heavy"}


def test_chain_co_placement_and_profile_groups():
    """Chain links a -> b -> c and f -> g merge; c has two out-edges and f two in-edges, so the rest do not;
    the profile puts d and e in one group."""
    nodes = [op(name) for name in "abcdefg"]
    nodes[3].group = nodes[4].group = "x"
    edges = [(s, d, MIB) for s, d in ["ab", "bc", "cd", "ce", "df", "ef", "fg"]]
    graph = PlacementGraph(nodes, edges)
    assert coplace_groups(graph) == {"a": "a", "b": "a", "c": "a", "d": "x", "e": "x", "f": "f", "g": "f"}
    for algorithm in ALGORITHMS:
        placement = place(graph, gpus(3), algorithm, FREE, coplace=True).placement
        assert placement["a"] == placement["b"] == placement["c"] and placement["f"] == placement["g"]
        assert placement["d"] == placement["e"]


def test_m_topo_fills_devices_in_order_up_to_an_even_share():
    """Four 1 MiB ops on two devices: the share is 4/2 + 1 = 3 MiB."""
    graph = chain(4, nbytes=0, permanent_bytes=MIB)
    assert list(m_topo(graph, gpus(2), COMM).values()) == ["cuda:0"] * 3 + ["cuda:1"]
    assert set(m_topo(graph, gpus(2), COMM, uniform=False).values()) == {"cuda:0"}


def test_a_slow_cpu_takes_no_ops_it_would_finish_later():
    graph = PlacementGraph([replace(op(f"op{i}", 10.0), forward_s={"cuda": 10 * MS, "cpu": 100 * MS})
                            for i in range(4)], [("op0", f"op{i}", MIB) for i in range(1, 4)], training=False)
    devices = [Device("cuda:0", UNLIMITED), Device("cpu", UNLIMITED)]
    assert set(m_etf(graph, devices, FREE).values()) == {"cuda:0"}


def test_baselines():
    graph = chain(4, nbytes=0, permanent_bytes=MIB)
    devices = [Device("cpu", 8 * MIB), Device("cuda:0", 8 * MIB)]
    for node in graph.nodes:  # the CPU is slower
        node.forward_s["cpu"], node.backward_s["cpu"] = 1.0, 2.0
    assert set(single_device_plan(graph, devices, COMM).values()) == {"cuda:0"}
    assert set(single_device_plan(graph, [Device("cpu", 8 * MIB), Device("cuda:0", MIB)], COMM).values()) == {"cpu"}
    assert single_device_plan(graph, gpus(2, 3 * MIB), COMM) is None
    assert list(expert_plan(chain(4), gpus(2), COMM).values()) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    small_first = [Device("cuda:0", MIB), Device("cuda:1", 3 * MIB)]
    assert list(expert_plan(graph, small_first, COMM).values()) == ["cuda:0"] + ["cuda:1"] * 3
    assert expert_plan(graph, gpus(2, MIB), COMM) is None


def test_place_returns_a_timed_simulated_plan():
    graph = random_dag(3, 20)
    for algorithm in ALGORITHMS:
        plan = place(graph, gpus(3), algorithm, COMM)
        result = simulate(graph, plan.placement, gpus(3), COMM)
        assert plan.algorithm == algorithm and plan.predicted_step_s == result.makespan_s
        assert plan.peak_bytes == result.peak_bytes and 0 < plan.placement_s < 5
        assert plan.meta["transfer_s"] == result.transfer_s


# --- device kinds, saved inputs, the transfer fit ---------------------------------------------------------


def test_a_device_kind_the_profile_has_no_timings_for_is_refused_not_borrowed():
    """A cuda profile placed on cuda and cpu used to time the CPU with the GPU's figures (129 of 161 nodes went
    to the CPU): now the kind without timings is refused, naming it and how to profile it."""
    graph = chain(4, training=True)
    devices = [Device("cuda:0", UNLIMITED), Device("cpu", UNLIMITED)]
    for run in (lambda: place(graph, devices, "m-sct", COMM), lambda: single_device_plan(graph, devices, COMM),
                lambda: simulate(graph, {n.name: "cuda:0" for n in graph.nodes}, devices, COMM)):
        with pytest.raises(PlacementError, match=r"no cpu timings .*--device cpu --device cuda"):
            run()


def test_profiles_of_two_kinds_merge_and_the_model_stays_on_the_faster_one():
    cuda = chain(6, training=True)
    cpu = chain(6, forward_ms=100.0, training=True)
    for node in cpu.nodes:
        node.forward_s = {"cpu": node.forward_s.pop("cuda")}
        node.backward_s = {"cpu": node.backward_s.pop("cuda")}
    merged = merge_profiles([cuda, cpu])
    assert merged.timed_kinds() == {"cpu", "cuda"} and merged.nodes[0].forward_s == {"cuda": 10 * MS, "cpu": 0.1}
    devices = [Device("cuda:0", UNLIMITED), Device("cpu", UNLIMITED)]
    for algorithm in ALGORITHMS:
        if algorithm != "m-topo":  # m-topo fills devices in order, whatever their speed
            assert set(place(graph=merged, devices=devices, algorithm=algorithm, comm=COMM).placement.values()) \
                == {"cuda:0"}
    assert set(single_device_plan(merged, devices[::-1], COMM).values()) == {"cuda:0"}
    with pytest.raises(PlacementError, match="different graphs"):
        merge_profiles([cuda, chain(5, training=True)])


def test_a_consumer_that_saves_nothing_frees_its_input_at_its_forward():
    """a (4 MiB out) -> b, an ``add`` that saves nothing (1 MiB out) -> c, a conv that saves b's output. In
    training a's output is freed once b has run forward, not at b's backward; a profile that does not record
    what was saved keeps the conservative rule (every input held until its consumer's backward)."""
    nodes = [op("a", output_bytes=4 * MIB), op("b", output_bytes=MIB, saved_inputs=[]),
             op("c", saved_inputs=["b"])]
    graph = PlacementGraph(nodes, [("a", "b", 4 * MIB), ("b", "c", MIB)], training=True)
    placement = dict.fromkeys("abc", "cuda:0")
    result = simulate(graph, placement, gpus(1), COMM)
    assert result.kept_for_backward == {"cuda:0": MIB}
    assert result.peak_bytes["cuda:0"] == 5 * MIB  # a's and b's outputs, only while b runs
    old = PlacementGraph([replace(n, saved_inputs=None) for n in nodes], graph.edges, training=True)
    assert simulate(old, placement, gpus(1), COMM).kept_for_backward == {"cuda:0": 5 * MIB}
    relu = replace(nodes[1], saves_output=True)  # an op that saves its own output keeps it until its backward
    graph = PlacementGraph([nodes[0], relu, replace(nodes[2], saved_inputs=[])], graph.edges, training=True)
    assert simulate(graph, placement, gpus(1), COMM).kept_for_backward == {"cuda:0": MIB}


def test_the_transfer_fit_ignores_slow_outliers_and_keeps_the_latency_below_the_smallest_copy():
    """1.4-2.5 us small copies and a few slow repeats once gave a 4177 us intercept by plain least squares."""
    sizes = np.array([2.0**k for k in range(10, 25, 2)])
    seconds = 1e-10 * sizes + 2e-6
    seconds[[2, 6]] *= [40.0, 3.0]  # two slow outliers, one small, one large
    coef, intercept, clamped = fit_transfer_line(sizes, seconds)
    assert coef == pytest.approx(1e-10, rel=0.02) and intercept == pytest.approx(2e-6, rel=0.1) and not clamped
    naive = np.polyfit(sizes, seconds, 1)[1]
    assert naive > 10 * intercept  # what plain least squares made of it
    notes = []
    flat_after_the_first = [1e-6, 1.6e-6, 1.7e-6, 1.8e-6, 3e-6]  # the best line starts above the first point
    comm = fit_comm_model({"cpu->cuda": list(zip([1e3, 1e4, 1e5, 1e6, 1e7], flat_after_the_first))}, notes)
    assert comm.pairs["cpu->cuda"][1] == 1e-6 and notes and "clamped" in notes[0]
