"""Choose a placement: run one of Baechi's placers (:mod:`.algorithms`), check its simulated plan against the caps,
fall back to a baseline that fits when the placer finds none, and otherwise refuse with the caps that would fit.
``ctzoo place plan`` and the benchmark call :func:`place`."""

from __future__ import annotations

import time
from typing import Callable

from ctzoo.scaling.placement.algorithms import CapacityError, check_problem, favourite_children, m_etf, m_sct, m_topo
from ctzoo.scaling.placement.graph import CommModel, Device, PlacementError, PlacementGraph, Plan, parse_size
from ctzoo.scaling.placement.simulate import (
    expert_plan,
    format_bytes,
    simulate,
    single_device_plan,
    smallest_fitting_scale,
)

ALGORITHMS: dict[str, Callable[..., dict[str, str]]] = {"m-topo": m_topo, "m-etf": m_etf, "m-sct": m_sct}


MEMORY_RETRIES = 8  # placer runs per attempt after the first, each with budgets cut below the caps
BUDGET_STEP = 0.01  # of each cap: what a retry cuts from every budget after the placer found no placement


def _attempt(placer: Callable[[list[Device]], dict[str, str]], graph: PlacementGraph, devices: list[Device],
             comm: CommModel) -> tuple[dict[str, str] | None, str, float]:
    """(placement, "", placer seconds) when the simulated peaks fit the caps, else (None, why not, seconds), why
    being the first run's failure (the one at the caps themselves).

    Two reasons to run the placer again with smaller budgets, up to :data:`MEMORY_RETRIES` times. A placer's own
    schedule runs each op's forward and backward as one and picks ops by its rule, the simulated step runs two
    passes, each device taking its first ready op: their memory timelines differ, and a simulated peak can
    exceed what the placer counted. The overshoot then comes off that device's budget (Baechi's
    ``placer_memory_fraction``, found per device). And a greedy placer can find nothing within caps where it
    places the graph within smaller ones (measured: m-ETF on a random DAG fits three devices of 100 MiB, not of
    102 MiB: with more room an early op lands where a later one then finds none). On its
    :class:`CapacityError` every budget loses :data:`BUDGET_STEP` of its cap; a placement found within the
    smaller budgets fits the caps."""
    budgets, seconds, why = list(devices), 0.0, ""
    for _ in range(1 + MEMORY_RETRIES):
        started = time.perf_counter()
        try:
            placement, error = placer(budgets), None
        except CapacityError as refused:
            placement, error = None, refused
        seconds += time.perf_counter() - started
        if placement is None:
            why = why or str(error)
            cut = {d.name: int(d.memory_bytes * BUDGET_STEP) for d in devices}
        else:
            peaks = simulate(graph, placement, devices, comm).peak_bytes
            cut = {d.name: peaks[d.name] - d.memory_bytes for d in devices if peaks[d.name] > d.memory_bytes}
            if not cut:
                return placement, "", seconds
            why = why or "; ".join(f"{name} would peak {format_bytes(excess)} over its cap"
                                   for name, excess in cut.items())
        budgets = [Device(b.name, b.memory_bytes - cut.get(b.name, 0)) for b in budgets]
    return None, why, seconds


def _fallback(graph: PlacementGraph, devices: list[Device], comm: CommModel) -> tuple[str, dict[str, str]] | None:
    """When the placer gives up: the baselines that may still fit, best first. The list schedulers are greedy:
    they spread a graph for speed, and the copies that costs can leave no room for a later op even where the
    whole graph would fit on one of the devices (measured: recistnet-mini's inference profile, 37 MiB on one
    device, refused by m-SCT on two devices of 75 MiB). A plan that fits beats a refusal."""
    for name, baseline in (("one device", single_device_plan), ("expert split", expert_plan)):
        placement = baseline(graph, devices, comm)
        if placement is not None:
            return name, placement
    return None


def _fits(placer: Callable, graph: PlacementGraph, caps: list[Device], comm: CommModel) -> bool:
    return _attempt(placer, graph, caps, comm)[0] is not None or _fallback(graph, caps, comm) is not None


def _refusal(placer: Callable, graph: PlacementGraph, devices: list[Device], comm: CommModel, algorithm: str,
             why: str) -> CapacityError:
    """The error for a graph that does not fit: why, and a uniform scale of the caps that does (with the placer or
    a fallback; :func:`smallest_fitting_scale` says how it is found and how small it is), as a ready
    ``--devices`` value whose printed (rounded-up) caps were themselves checked to fit."""
    scale = smallest_fitting_scale(lambda caps: _fits(placer, graph, caps, comm), graph, devices)
    head = f"{algorithm} cannot place {graph.model or 'the graph'} within the devices' memory ({why})"
    for _ in range(5):  # rounding for print can, rarely, land on a cap this heuristic placer misses: step up
        if scale is None:
            break
        caps = {d.name: format_bytes(d.memory_bytes * scale) for d in devices}
        suggested = [Device(name, parse_size(cap)) for name, cap in caps.items()]
        if _fits(placer, graph, suggested, comm):
            spec = ",".join(f"{name}={cap}" for name, cap in caps.items())
            return CapacityError(f"{head}. The caps fit at a uniform scale of x{scale:.3f} (found by bisection "
                                 "to 0.5 % and checked; a greedy placer may also fit some smaller caps): "
                                 f"--devices {spec}", scale, suggested)
        scale *= 1.01
    return CapacityError(f"{head}; no larger caps were found to fit either")


def place(graph: PlacementGraph, devices: list[Device], algorithm: str, comm: CommModel,
          coplace: bool = False, fallback: bool = True, suggest_caps: bool = True) -> Plan:
    """Run ``algorithm`` (a key of :data:`ALGORITHMS`), simulate its placement and return the plan. When the
    placer finds no placement within the caps, the plan is a baseline that fits (:func:`_fallback`; ``meta``
    says ``fallback`` and why the placer failed); when none fits either, a :class:`CapacityError` naming the
    caps that would. ``fallback=False``: the placer's own plan or the error; ``suggest_caps=False``: the error
    without the search for the caps that would fit (a caller searching caps itself)."""
    if algorithm not in ALGORITHMS:
        raise PlacementError(f"unknown placement algorithm {algorithm!r}: use one of {', '.join(ALGORITHMS)}")
    check_problem(graph, devices, comm, coplace)
    options, started = {}, time.perf_counter()
    if algorithm == "m-sct":  # the LP does not depend on the caps: solved once, also for the retries and search
        options["favourites"] = favourite_children(graph, devices, comm, coplace=coplace)
    lp_s = time.perf_counter() - started

    def placer(budgets: list[Device]) -> dict[str, str]:
        return ALGORITHMS[algorithm](graph, budgets, comm, coplace=coplace, **options)

    placement, why, placer_s = _attempt(placer, graph, devices, comm)
    meta: dict = {"coplace": coplace}
    if placement is None:
        baseline = _fallback(graph, devices, comm) if fallback else None
        if baseline is None:
            if not suggest_caps:
                raise CapacityError(f"{algorithm} cannot place {graph.model or 'the graph'} within the devices' "
                                    f"memory ({why})")
            raise _refusal(placer, graph, devices, comm, algorithm, why)
        meta.update(fallback=baseline[0], placer_failed=why)
        placement = baseline[1]
    result = simulate(graph, placement, devices, comm)
    return Plan(algorithm, placement, list(devices), result.makespan_s, result.peak_bytes, lp_s + placer_s,
                graph.model, {**meta, "compute_s": result.compute_s, "transfer_s": result.transfer_s},
                graph.summary())
