"""Baechi's placers (Jeon et al., SoCC 2020; extended version arXiv 2301.08695; notes in
``../shared/papers/scaling-lemon-cser-compress-baechi.md`` section 4): place a profiled forward graph on
memory-capped devices in well under a second, instead of the hours a learned placer takes.

* **m-TOPO** (:func:`m_topo`): walk the ops in topological order filling device 0, then 1, ...; each device is
  capped at min(its cap, Σmem/|devices| + the largest op's mem) (Baechi's uniform variant, which spreads the
  graph) and falls back to the plain caps when that share is too tight.
* **m-ETF** (:func:`m_etf`): earliest-start-time list scheduling with memory: an op may go to a device only where
  its memory fits what is free there at that time, cross-device inputs wait on serialised channels, received
  tensors are cached per device.
* **m-SCT** (:func:`m_sct`): Hanen and Munier's small-communication-time scheduling: an LP relaxation picks each
  op's favourite child (the one to run next on the same device), then m-ETF's scheduler runs with two more
  rules (favourite child first, otherwise the most urgent op).

All three keep the nodes of one co-placement group on one device, placing the group as a whole on its first op
(its memory reserved there). :func:`~ctzoo.scaling.placement.planner.place` runs one, times it, checks the
simulated plan against the caps and, when nothing fits, says which caps would. Nothing here needs torch: the
placers read plain data.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import coo_matrix

from ctzoo.scaling.placement.graph import CommModel, Device, PlacementError, PlacementGraph
from ctzoo.scaling.placement.simulate import adjacency, topological_order

SCT_THRESHOLD = 0.1  # Baechi's --sct_threshold: x_ij below it makes j the favourite child of i


class CapacityError(PlacementError):
    """The graph does not fit the devices' memory. ``scale`` is the smallest uniform scale of the caps found to
    fit and ``devices`` the devices with those caps (both None when the placer itself gave up)."""

    def __init__(self, message: str, scale: float | None = None, devices: list[Device] | None = None) -> None:
        super().__init__(message)
        self.scale = scale
        self.devices = devices


def _group_roots(graph: PlacementGraph, chains: bool) -> dict[str, str]:
    """Node -> the first node of its co-placement group (a name no other group can share): the profile's
    groups, and with ``chains`` every chain link op -> next (op has one out-edge, next one in-edge) joined."""
    order = topological_order(graph)
    parent = {name: name for name in order}
    position = {name: i for i, name in enumerate(order)}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    def join(a: str, b: str) -> None:
        first, second = sorted((root(a), root(b)), key=position.get)
        parent[second] = first

    first_of: dict[str, str] = {}
    for name in order:
        group = graph.by_name[name].group
        if group is not None:
            join(first_of.setdefault(group, name), name)
    if chains:
        inputs, outputs = adjacency(graph)
        for src, dst, _ in graph.edges:
            if len(outputs[src]) == 1 and len(inputs[dst]) == 1:
                join(src, dst)
    return {name: root(name) for name in order}


def coplace_groups(graph: PlacementGraph) -> dict[str, str]:
    """Baechi's co-placement reduction (``grouper.py``): node -> group, starting from the profile's groups and
    merging op and next whenever op has exactly one out-edge and next exactly one in-edge (a chain link, where a
    transfer can only delay). A group is called by its first node's profile group, else by its first node.
    :func:`~ctzoo.scaling.placement.planner.place` applies it only when asked (``coplace=True``): a module-level
    profile is already coarse, and a sequential backbone is one long chain, which this would weld onto one
    device, the very device the model did not fit on."""
    roots = _group_roots(graph, chains=True)
    return {name: graph.by_name[root].group or root for name, root in roots.items()}


@dataclass
class _Problem:
    """What every placer reads: the graph's order and edges, co-placement groups, op seconds per device."""

    graph: PlacementGraph
    devices: list[Device]
    comm: CommModel
    order: list[str]
    inputs: dict[str, list[tuple[str, int]]]
    outputs: dict[str, list[tuple[str, int]]]
    groups: dict[str, str]                 # node -> group
    members: dict[str, list[str]]          # group -> its nodes
    level: dict[str, float]                # bottom level: the longest compute path from the node to an exit
    rank: dict[str, int]                   # position in the topological order
    duration: dict[str, list[float]]       # node -> its seconds (with backward when training) per device

    @classmethod
    def build(cls, graph: PlacementGraph, devices: list[Device], comm: CommModel, coplace: bool) -> _Problem:
        if not devices or len({device.name for device in devices}) != len(devices):
            raise PlacementError("the device list is empty or names a device twice")
        order = topological_order(graph)
        inputs, outputs = adjacency(graph)
        groups = _group_roots(graph, chains=coplace)
        members: dict[str, list[str]] = {}
        for name in order:
            members.setdefault(groups[name], []).append(name)
        duration = {name: [graph.by_name[name].compute_s(d.kind, graph.training) for d in devices] for name in order}
        level: dict[str, float] = {}
        for name in reversed(order):
            level[name] = duration[name][0] + max((level[dst] for dst, _ in outputs[name]), default=0.0)
        return cls(graph, devices, comm, order, inputs, outputs, groups, members, level,
                   {name: i for i, name in enumerate(order)}, duration)

    def reservation(self, group: str, device: int, device_of: dict[str, int], received) -> tuple[int, int]:
        """(permanent, transient) bytes the group needs on ``device``: its ops' memory and the inputs it would
        receive from outside (counted unless already there, so a future producer is assumed elsewhere)."""
        nodes = [self.graph.by_name[name] for name in self.members[group]]
        copies = {(src, device, nbytes) for name in self.members[group] for src, nbytes in self.inputs[name]
                  if self.groups[src] != group and device_of.get(src) != device
                  and (src, device, nbytes) not in received}
        return (sum(n.permanent_bytes for n in nodes),
                sum(n.temporary_bytes + n.output_bytes for n in nodes) + sum(key[2] for key in copies))


@dataclass
class _Memory:
    """One device's memory in a placer: permanent bytes only grow, so every past transient peak must still fit
    beside the permanent total (the simulator counts permanent memory for the whole step)."""

    cap: int
    permanent: int = 0
    transient: int = 0
    transient_peak: int = 0

    def fits(self, permanent: int, transient: int) -> bool:
        return self.permanent + permanent + max(self.transient_peak, self.transient + transient) <= self.cap

    def hold(self, permanent: int, transient: int) -> None:
        self.permanent += permanent
        self.transient += transient
        self.transient_peak = max(self.transient_peak, self.transient)


def _topo_fill(problem: _Problem, caps: list[int]) -> dict[str, str]:
    """m-TOPO: ops in topological order onto the current device until the next does not fit, then the next
    device; memory is never freed, so the simulated peak cannot exceed what was counted."""
    memory = [_Memory(cap) for cap in caps]
    device_of: dict[str, int] = {}
    group_device: dict[str, int] = {}
    received: set[tuple[str, int, int]] = set()
    current = 0
    for name in problem.order:
        group = problem.groups[name]
        if group not in group_device:  # the group's first op: the whole group's memory goes here
            while not memory[current].fits(*problem.reservation(group, current, device_of, received)):
                current += 1
                if current == len(caps):
                    raise CapacityError(f"m-topo: {name} does not fit on any device after the ones before it")
            memory[current].hold(*problem.reservation(group, current, device_of, received))
            group_device[group] = current
        device_of[name] = group_device[group]
        received |= {(src, device_of[name], nbytes) for src, nbytes in problem.inputs[name]
                     if device_of[src] != device_of[name]}
    return {name: problem.devices[d].name for name, d in device_of.items()}


def check_problem(graph: PlacementGraph, devices: list[Device], comm: CommModel, coplace: bool = False) -> None:
    """PlacementError for a malformed graph (a cycle, unknown nodes) or device list, before any placer runs: such
    input is not a memory problem and must not be reported as one."""
    graph.check_timed(devices)
    _Problem.build(graph, devices, comm, coplace)


def m_topo(graph: PlacementGraph, devices: list[Device], comm: CommModel, *, coplace: bool = False,
           uniform: bool = True) -> dict[str, str]:
    """Baechi's m-TOPO (arXiv 2301.08695, "m-TOPO"; uniform variant unless ``uniform=False``)."""
    problem = _Problem.build(graph, devices, comm, coplace)
    if uniform:
        # an op's mem counts the inputs it may receive: the shares then hold the copies the fill creates
        sizes = [n.permanent_bytes + n.temporary_bytes + n.output_bytes + sum(b for _, b in problem.inputs[n.name])
                 for n in graph.nodes]
        share = sum(sizes) // len(devices) + max(sizes, default=0)
        try:
            return _topo_fill(problem, [min(device.memory_bytes, share) for device in devices])
        except CapacityError:
            pass  # received copies and groups can overflow the even share: fill to the devices' own caps
    return _topo_fill(problem, [device.memory_bytes for device in devices])


@dataclass
class _Option:
    node: str
    device: int
    start: float
    finish: float
    copies: dict[tuple[str, int, int], float]  # the inputs it would newly receive -> arrival


@dataclass
class _Schedule:
    """m-ETF's event-driven list schedule (arXiv 2301.08695, "m-ETF"). Memory frees are applied only once
    ``now`` has passed them, and ``now`` moves only when no ready op fits anywhere, so an op never starts before
    the frees it counted on (every op starts at or after ``now``)."""

    problem: _Problem
    memory: list[_Memory]
    device_free: list[float]
    last_op: list[str | None]
    now: float = 0.0
    end: dict[str, float] = field(default_factory=dict)
    device_of: dict[str, int] = field(default_factory=dict)
    channel_free: dict[tuple[int, int], float] = field(default_factory=dict)
    received: dict[tuple[str, int, int], float] = field(default_factory=dict)   # cached copies -> arrival
    copy_users: dict[str, dict[tuple[str, int, int], list[str]]] = field(default_factory=dict)  # by source
    group_device: dict[str, int] = field(default_factory=dict)
    reserved: dict[str, int] = field(default_factory=dict)   # group -> transient bytes reserved, not yet used
    unplaced: dict[str, int] = field(default_factory=dict)   # group -> members not yet placed
    users_left: dict[str, int] = field(default_factory=dict)  # node -> consumers not yet placed
    frees: list[tuple[float, int, int, int]] = field(default_factory=list)  # heap (time, seq, device, bytes)
    sequence: Iterator[int] = field(default_factory=itertools.count)  # keeps the heap's order stable
    # an op's option on a device changes only when that device's state (stamp), ``now`` or its group's binding
    # does: (node, device) -> (stamp, now, bound, option or None where it does not fit)
    stamp: list[int] = field(default_factory=list)
    cached: dict[tuple[str, int], tuple[int, float, bool, _Option | None]] = field(default_factory=dict)

    @classmethod
    def begin(cls, problem: _Problem) -> _Schedule:
        count = len(problem.devices)
        return cls(problem, [_Memory(d.memory_bytes) for d in problem.devices], [0.0] * count, [None] * count,
                   stamp=[0] * count, unplaced={group: len(nodes) for group, nodes in problem.members.items()},
                   users_left={name: len(edges) for name, edges in problem.outputs.items()})

    def options(self, name: str) -> list[_Option]:
        """Where ``name`` could start: on its group's device, or on every device its group's memory fits."""
        bound = self.group_device.get(self.problem.groups[name])
        found = []
        for device in [bound] if bound is not None else range(len(self.problem.devices)):
            key = (name, device)
            state = (self.stamp[device], self.now, bound is not None)
            if self.cached.get(key, (None,))[:3] != state:
                self.cached[key] = (*state, self._option(name, device, bound is not None))
            if self.cached[key][3] is not None:
                found.append(self.cached[key][3])
        return found

    def _option(self, name: str, device: int, bound: bool) -> _Option | None:
        ready, copies = self._inputs_ready(name, device)
        if not bound and not self.memory[device].fits(*self._needs(name, device, copies)):
            return None
        start = max(ready, self.device_free[device], self.now)
        return _Option(name, device, start, start + self.problem.duration[name][device], copies)

    def _needs(self, name: str, device: int, copies: dict) -> tuple[int, int]:
        """(permanent, transient) bytes placing ``name`` on ``device`` takes: its group's reservation (for an op
        alone in its group, exactly its memory and the copies it would receive)."""
        group = self.problem.groups[name]
        if len(self.problem.members[group]) > 1:
            return self.problem.reservation(group, device, self.device_of, self.received)
        node = self.problem.graph.by_name[name]
        return node.permanent_bytes, node.temporary_bytes + node.output_bytes + sum(key[2] for key in copies)

    def _inputs_ready(self, name: str, device: int) -> tuple[float, dict[tuple[str, int, int], float]]:
        ready, copies, channel = self.now, {}, {}  # channel: this op's own transfers, queued after the booked
        for src, nbytes in sorted(self.problem.inputs[name], key=lambda edge: self.end[edge[0]]):
            origin, key = self.device_of[src], (src, device, nbytes)
            if origin == device:
                ready = max(ready, self.end[src])
            elif key in self.received or key in copies:
                ready = max(ready, self.received.get(key, copies.get(key, 0.0)))
            else:
                queued = channel.get((origin, device), self.channel_free.get((origin, device), 0.0))
                sent = max(self.end[src], queued, self.now)
                channel[(origin, device)] = copies[key] = sent + self.problem.comm.seconds(
                    nbytes, self.problem.devices[origin], self.problem.devices[device])
                ready = max(ready, copies[key])
        return ready, copies

    def commit(self, option: _Option) -> None:
        name, device = option.node, option.device
        node, group = self.problem.graph.by_name[name], self.problem.groups[name]
        self.stamp[device] += 1
        if group not in self.group_device:  # the group's first op: reserve the whole group's memory here
            permanent, transient = self._needs(name, device, option.copies)
            self.group_device[group], self.reserved[group] = device, transient
            self.memory[device].hold(permanent, transient)
        allocated = node.temporary_bytes + node.output_bytes + sum(key[2] for key in option.copies)
        covered = min(allocated, self.reserved[group])
        self.reserved[group] -= covered
        self.memory[device].hold(0, allocated - covered)
        self.unplaced[group] -= 1
        if self.unplaced[group] == 0:  # what the group reserved and did not use
            self.memory[device].transient -= self.reserved.pop(group)
        for key, arrival in option.copies.items():
            channel = (self.device_of[key[0]], device)
            self.channel_free[channel] = max(self.channel_free.get(channel, 0.0), arrival)
        self.received.update(option.copies)
        self.end[name], self.device_of[name], self.last_op[device] = option.finish, device, name
        self.device_free[device] = option.finish
        if not self.problem.graph.training:  # training keeps temporaries for the backward
            self._free_at(option.finish, device, node.temporary_bytes)
        for src, nbytes in self.problem.inputs[name]:
            if self.device_of[src] != device:
                self.copy_users.setdefault(src, {}).setdefault((src, device, nbytes), []).append(name)
            self.users_left[src] -= 1
            if self.users_left[src] == 0:
                self._free_output(src)

    def _free_output(self, src: str) -> None:
        """All of ``src``'s consumers are placed: its output, and each copy of it, go when their last user ends
        (in training only during the backward, after every op this forward schedule places: never here)."""
        if self.problem.graph.training:
            return
        consumers = [dst for dst, _ in self.problem.outputs[src]]
        self._free_at(max(self.end[dst] for dst in consumers), self.device_of[src],
                      self.problem.graph.by_name[src].output_bytes)
        for (_, device, nbytes), users in self.copy_users.pop(src, {}).items():
            self._free_at(max(self.end[user] for user in users), device, nbytes)

    def _free_at(self, when: float, device: int, nbytes: int) -> None:
        if nbytes:
            heapq.heappush(self.frees, (when, next(self.sequence), device, nbytes))

    def release(self) -> None:
        while self.frees and self.frees[0][0] <= self.now:
            _, _, device, nbytes = heapq.heappop(self.frees)
            self.memory[device].transient -= nbytes
            self.stamp[device] += 1

    def wait(self) -> bool:
        """Nothing ready fits: move ``now`` to the next free; False when nothing is left to free."""
        if not self.frees:
            return False
        self.now = max(self.now, self.frees[0][0])
        self.release()
        return True


Chooser = Callable[[list[_Option], _Schedule], _Option]


def _best_per_node(options: list[_Option]) -> dict[str, _Option]:
    """Each op's earliest option: the device where it finishes first (on identical devices, as in Baechi, that
    is where it starts first; next to a slower CPU it keeps ops off the CPU unless it finishes them sooner)."""
    best: dict[str, _Option] = {}
    for option in options:
        kept = best.get(option.node)
        if kept is None or (option.finish, option.start) < (kept.finish, kept.start):
            best[option.node] = option
    return best


def _earliest_start(options: list[_Option], schedule: _Schedule) -> _Option:
    """m-ETF's rule: the op that can start first (ties: the longer path to the end, then the profile order)."""
    problem = schedule.problem
    return min(_best_per_node(options).values(), key=lambda o: (o.start, -problem.level[o.node], problem.rank[o.node]))


def _list_schedule(problem: _Problem, choose: Chooser, algorithm: str) -> dict[str, str]:
    schedule = _Schedule.begin(problem)
    waiting = {name: len({src for src, _ in problem.inputs[name]}) for name in problem.order}
    ready = [name for name in problem.order if waiting[name] == 0]
    while ready:
        schedule.release()
        options = [option for name in ready for option in schedule.options(name)]
        if not options:
            if schedule.wait():
                continue
            raise CapacityError(f"{algorithm}: {ready[0]} does not fit in the memory left on any device")
        chosen = choose(options, schedule)
        schedule.commit(chosen)
        ready.remove(chosen.node)
        for dst in dict.fromkeys(dst for dst, _ in problem.outputs[chosen.node]):
            waiting[dst] -= 1
            if waiting[dst] == 0:
                ready.append(dst)
    return {name: problem.devices[device].name for name, device in schedule.device_of.items()}


def m_etf(graph: PlacementGraph, devices: list[Device], comm: CommModel, *, coplace: bool = False
          ) -> dict[str, str]:
    """Baechi's m-ETF (arXiv 2301.08695, "m-ETF"): see :class:`_Schedule`."""
    return _list_schedule(_Problem.build(graph, devices, comm, coplace), _earliest_start, "m-etf")


def _lp_seconds(comm: CommModel, devices: list[Device], nbytes: int) -> float:
    """An edge's c_ij: the transfer between the first two devices, or the model's default with one device."""
    if len(devices) > 1:
        return comm.seconds(nbytes, devices[0], devices[1])
    coef, intercept = comm.default
    return coef * nbytes + intercept if nbytes > 0 else 0.0


def favourite_children(graph: PlacementGraph, devices: list[Device], comm: CommModel,
                       threshold: float = SCT_THRESHOLD, *, coplace: bool = False) -> dict[str, str]:
    """Node -> its favourite child, from Hanen and Munier's LP relaxation (arXiv 2301.08695, "m-SCT"): minimise w
    subject to s_i + p_i + c_ij x_ij <= s_j per edge, Σ_j x_ij >= outdeg(i) - 1, Σ_i x_ij >= indeg(j) - 1,
    s_i + p_i <= w, 0 <= x <= 1, s >= 0, solved with HiGHS; x_ij < ``threshold`` makes j i's favourite. p_i is
    the op's compute (with backward when training) on the first device, c_ij the edge's transfer between the
    first two devices (the model's default pair with one device), 0 inside a co-placement group."""
    problem = _Problem.build(graph, devices, comm, coplace)
    merged: dict[tuple[str, str], int] = {}
    for src, dst, nbytes in graph.edges:  # parallel edges are one data dependency
        merged[(src, dst)] = merged.get((src, dst), 0) + nbytes
    edges = list(merged)
    n, m = len(problem.order), len(edges)
    index = {name: i for i, name in enumerate(problem.order)}
    p = np.array([problem.duration[name][0] for name in problem.order])
    rows, cols, values, bounds_ub = [], [], [], []

    def constraint(entries: list[tuple[int, float]], bound: float) -> None:
        for col, value in entries:
            rows.append(len(bounds_ub))
            cols.append(col)
            values.append(value)
        bounds_ub.append(bound)

    for k, (src, dst) in enumerate(edges):
        cost = 0.0 if problem.groups[src] == problem.groups[dst] else _lp_seconds(comm, devices, merged[(src, dst)])
        constraint([(index[src], 1.0), (index[dst], -1.0), (n + k, cost)], -p[index[src]])
    for end in (0, 1):  # Σ_j x_ij >= outdeg(i) - 1, then Σ_i x_ij >= indeg(j) - 1
        incident: dict[str, list[int]] = {}
        for k, edge in enumerate(edges):
            incident.setdefault(edge[end], []).append(k)
        for ks in incident.values():
            if len(ks) > 1:
                constraint([(n + k, -1.0) for k in ks], 1.0 - len(ks))
    for i in range(n):
        constraint([(i, 1.0), (n + m, -1.0)], -p[i])
    matrix = coo_matrix((values, (rows, cols)), shape=(len(bounds_ub), n + m + 1)).tocsr()
    objective = np.zeros(n + m + 1)
    objective[-1] = 1.0
    bounds = [(0, None)] * n + [(0, 1)] * m + [(0, None)]
    result = linprog(objective, A_ub=matrix, b_ub=np.array(bounds_ub), bounds=bounds, method="highs")
    if result.status != 0:  # the LP is always feasible and bounded; should HiGHS still fail, plain m-ETF is left
        return {}
    favourite: dict[str, str] = {}
    parent_taken: set[str] = set()
    for k in np.argsort(result.x[n:n + m], kind="stable"):
        src, dst = edges[k]
        if result.x[n + k] < threshold and src not in favourite and dst not in parent_taken:
            favourite[src] = dst
            parent_taken.add(dst)
    return favourite


def _sct_rules(favourite: dict[str, str]) -> Chooser:
    """m-SCT's choice (arXiv 2301.08695, "m-SCT"; Hanen-Munier): a device's last op's favourite child runs there
    next when that device is its earliest option and it starts no later than the most urgent op could start
    everywhere; otherwise the most urgent op (smallest urgent time = latest start over the devices it fits,
    i.e. the first op that no longer gains from waiting for a particular device) goes to its earliest option."""
    def choose(options: list[_Option], schedule: _Schedule) -> _Option:
        best = _best_per_node(options)
        urgent: dict[str, float] = {}
        for option in options:
            urgent[option.node] = max(urgent.get(option.node, 0.0), option.start)
        level, rank = schedule.problem.level, schedule.problem.rank
        most_urgent = min(best, key=lambda n: (urgent[n], best[n].start, -level[n], rank[n]))
        favoured = [o for o in best.values() if favourite.get(schedule.last_op[o.device]) == o.node]
        if favoured:
            first = min(favoured, key=lambda o: (o.start, rank[o.node]))
            if first.start <= urgent[most_urgent]:
                return first
        return best[most_urgent]
    return choose


def m_sct(graph: PlacementGraph, devices: list[Device], comm: CommModel, *, coplace: bool = False,
          threshold: float = SCT_THRESHOLD, favourites: dict[str, str] | None = None) -> dict[str, str]:
    """Baechi's m-SCT: m-ETF's scheduler with the favourite-child and urgent-time rules (:func:`_sct_rules`) on
    :func:`favourite_children` (pass ``favourites`` to reuse a solved LP: it does not depend on the caps)."""
    if favourites is None:
        favourites = favourite_children(graph, devices, comm, threshold, coplace=coplace)
    return _list_schedule(_Problem.build(graph, devices, comm, coplace), _sct_rules(favourites), "m-sct")
