"""The simulated step of a placement plan, and the two baselines a plan is judged against.

:func:`simulate` list-schedules the profile on the placed devices: each device, once free, starts the first op
in the model's (topological) order whose inputs have arrived, one op at a time (as Baechi's m-ETF simulation
and a dataflow executor run them; ``in_order=True`` holds each device strictly to that order, as PyTorch's eager
forward issues ops onto a CUDA stream). A tensor crossing devices is sent as soon as it is produced and costs
``comm.seconds(bytes, src, dst)`` on one serialised channel per ordered device pair (Baechi's send/recv
channels, arXiv 2301.08695 section 4), and a device receives a tensor once: later consumers there reuse the
copy. In training the backward pass follows in reverse order on the same devices, once the whole forward has run
(the loss needs every output); gradients of the same sizes flow back along the reversed edges, a received copy's
gradient is sent back once, after all of its consumers there have run backward.

Memory (Baechi's accounting, the notes section 4.2): ``permanent_bytes`` are held for the whole step;
``temporary_bytes`` from the forward op until its backward has run (training) or until the op ends (inference);
``output_bytes`` from the op until its last consumer has run, and a received copy from its transfer until its
consumers on that device have run. In training, autograd keeps only what a consumer saves for its backward: a
tensor lives until the backward of each consumer that saved it (``OpNode.saved_inputs``: a convolution saves
its input, an ``add`` or ``cat`` nothing) and otherwise only until that consumer's forward; an op that saves its
own output (``saves_output``: ``ReLU``) keeps it until its own backward; the graph's outputs are saved by the
output node (the loss reads them), so they live until the backward begins. A profile made before
``saved_inputs`` was recorded (``None``) keeps the older, conservative rule: every input is saved, a tensor
lives until its last consumer's backward. Gradient buffers of activations are not modelled (the profile has no
figure for them); they live only during the backward, when temporaries are being freed.

Caps: :func:`smallest_fitting_scale` bisects for a uniform scale of the devices' caps at which a plan fits,
:func:`format_bytes` prints a size so that :func:`~ctzoo.scaling.placement.graph.parse_size` reads it back.

Baselines: :func:`single_device_plan` (everything on the fastest device that holds it) and :func:`expert_plan`
(the usual hand placement: the topological order cut into contiguous, compute-balanced segments, one per device).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from ctzoo.scaling.placement.graph import CommModel, Device, OpNode, PlacementError, PlacementGraph

BACKWARD = ":backward"  # the timeline labels a node's backward op NAME:backward


@dataclass
class SimResult:
    makespan_s: float                    # the step: forward (+ backward) until the last op ends
    peak_bytes: dict[str, int]           # device name -> its peak memory over the step
    compute_s: dict[str, float]          # device name -> seconds it computes (busy, not waiting)
    transfer_s: float                    # seconds of cross-device transfers, all channels together
    timeline: list[tuple[str, str, float, float]] = field(default_factory=list)  # (node, device, start, end)
    # device name -> activation bytes held from the forward into the backward (training): what autograd saves,
    # outputs and received copies a consumer saved; the activation memory at the end of the forward
    kept_for_backward: dict[str, int] = field(default_factory=dict)


def topological_order(graph: PlacementGraph) -> list[str]:
    """The nodes in a topological order, keeping the profile's own order wherever the edges allow (the profile
    lists nodes in the order the forward ran them); a cycle is a malformed profile."""
    index = {node.name: i for i, node in enumerate(graph.nodes)}
    waiting = dict.fromkeys(index, 0)
    consumers: dict[str, list[str]] = {name: [] for name in index}
    for src, dst, _ in graph.edges:
        consumers[src].append(dst)
        waiting[dst] += 1
    heap = [(index[name], name) for name, count in waiting.items() if count == 0]
    heapq.heapify(heap)
    order = []
    while heap:
        _, name = heapq.heappop(heap)
        order.append(name)
        for consumer in consumers[name]:
            waiting[consumer] -= 1
            if waiting[consumer] == 0:
                heapq.heappush(heap, (index[consumer], consumer))
    if len(order) != len(index):
        stuck = sorted(set(index) - set(order), key=index.get)[:3]
        raise PlacementError(f"profile: the graph has a cycle through {', '.join(stuck)}: profile again")
    return order


def forward_seconds(node: OpNode, kind: str) -> float:
    return node.forward_seconds(kind)


def backward_seconds(node: OpNode, kind: str) -> float:
    return node.backward_seconds(kind)


def check_placement(graph: PlacementGraph, placement: dict[str, str], devices: list[Device]) -> dict[str, Device]:
    """Device name -> device, once every node is placed on a listed device and nothing else is placed."""
    by_name = {device.name: device for device in devices}
    if not devices or len(by_name) != len(devices):
        raise PlacementError("the device list is empty or names a device twice")
    graph.check_timed(devices)
    missing = [node.name for node in graph.nodes if node.name not in placement]
    if missing:
        raise PlacementError(f"the placement leaves {len(missing)} node(s) unplaced: {', '.join(missing[:5])}")
    strangers = sorted(set(placement) - set(graph.by_name))
    if strangers:
        raise PlacementError(f"the placement names nodes the profile lacks: {', '.join(strangers[:5])}")
    unknown = sorted(set(placement.values()) - set(by_name))
    if unknown:
        raise PlacementError(f"the placement uses {', '.join(unknown)}, which the devices "
                             f"({', '.join(by_name)}) do not list")
    return by_name


@dataclass
class _Clocks:
    """The simulated step's shared state: when each device and channel is next free, what ran, what was held."""

    device_free: dict[str, float]
    channel_free: dict[tuple[str, str], float] = field(default_factory=dict)
    transfer_s: float = 0.0
    timeline: list[tuple[str, str, float, float]] = field(default_factory=list)
    memory: list[tuple[float, int, str, int]] = field(default_factory=list)  # (time, order, device, +-bytes)

    def send(self, nbytes: int, src: Device, dst: Device, ready: float, comm: CommModel) -> tuple[float, float]:
        channel = (src.name, dst.name)
        start = max(ready, self.channel_free.get(channel, 0.0))
        end = start + comm.seconds(nbytes, src, dst)
        self.channel_free[channel] = end
        self.transfer_s += end - start
        return start, end

    def run(self, label: str, device: str, ready: float, seconds: float) -> tuple[float, float]:
        start = max(ready, self.device_free[device])
        self.device_free[device] = start + seconds
        self.timeline.append((label, device, start, start + seconds))
        return start, start + seconds

    def hold(self, device: str, nbytes: int, start: float, end: float) -> None:
        """``nbytes`` live on ``device`` over [start, end]. At one instant, memory freed by earlier work goes back
        before new allocations (as an allocator reuses it), and an instant-long hold still counts."""
        if nbytes:
            self.memory.append((start, 1, device, nbytes))
            self.memory.append((end, 0 if end > start else 2, device, -nbytes))


Copy = tuple[str, str, int]  # (source node, receiving device, bytes): one received tensor
Edges = dict[str, list[tuple[str, int]]]  # node -> (other end, bytes), inputs or outputs


def adjacency(graph: PlacementGraph) -> tuple[Edges, Edges]:
    """Each node's inputs (producer, bytes) and outputs (consumer, bytes), in edge order."""
    inputs: Edges = {node.name: [] for node in graph.nodes}
    outputs: Edges = {node.name: [] for node in graph.nodes}
    for src, dst, nbytes in graph.edges:
        inputs[dst].append((src, nbytes))
        outputs[src].append((dst, nbytes))
    return inputs, outputs


@dataclass
class _Pass:
    """One pass (forward, or backward) to list-schedule: its order, what each op waits for, when its inputs are
    there once those have run, its seconds, and what to send once it has run."""

    order: list[str]
    waits_for: dict[str, set[str]]
    ready: Callable[[str], float]
    seconds: Callable[[str], float]
    label: Callable[[str], str]
    sent: Callable[[str], None]
    end: dict[str, float]  # filled as ops run


def _list_schedule(work: _Pass, placement: dict[str, str], clocks: _Clocks, in_order: bool) -> None:
    """Each device, once free, starts the first op of the pass's order among its ops whose inputs have arrived
    (``in_order``: only its next op in that order, as PyTorch's eager forward issues them); decisions are taken
    in time order, so an op never waits for one that could only start later."""
    rank = {name: i for i, name in enumerate(work.order)}
    left = {name: len(waits) for name, waits in work.waits_for.items()}
    unlocks: dict[str, list[str]] = {name: [] for name in work.order}
    for name, waits in work.waits_for.items():
        for other in waits:
            unlocks[other].append(name)
    queue: dict[str, deque[str]] = {device: deque() for device in clocks.device_free}
    for name in work.order:
        queue[placement[name]].append(name)
    known: dict[str, dict[str, float]] = {device: {} for device in clocks.device_free}  # device -> op -> ready
    for name in work.order:
        if left[name] == 0:
            known[placement[name]][name] = work.ready(name)
    while len(work.end) < len(work.order):
        best: tuple[float, int, str] | None = None
        for device, ready in known.items():
            if in_order:
                head = queue[device][0] if queue[device] else None
                ready = {head: ready[head]} if head in ready else {}
            if ready:
                when = max(clocks.device_free[device], min(ready.values()))
                name = min((n for n, r in ready.items() if r <= when), key=rank.get)
                best = min(best or (when, rank[name], name), (when, rank[name], name))
        when, _, name = best
        device = placement[name]
        del known[device][name]
        queue[device].remove(name)
        work.end[name] = clocks.run(work.label(name), device, when, work.seconds(name))[1]
        work.sent(name)
        for other in unlocks[name]:
            left[other] -= 1
            if left[other] == 0:
                known[placement[other]][other] = work.ready(other)


def _forward(graph: PlacementGraph, order: list[str], inputs: Edges, outputs: Edges, placement: dict[str, str],
             devices: dict[str, Device], comm: CommModel, clocks: _Clocks, in_order: bool
             ) -> tuple[dict[str, float], dict[Copy, tuple[float, float]]]:
    """Forward ends and each copy's (transfer start, arrival); an output is sent as soon as its op has run."""
    copies: dict[Copy, tuple[float, float]] = {}
    end: dict[str, float] = {}

    def ready(name: str) -> float:
        return max((end[src] if placement[src] == placement[name] else copies[(src, placement[name], nbytes)][1]
                    for src, nbytes in inputs[name]), default=0.0)

    def sent(name: str) -> None:
        for dst, nbytes in outputs[name]:
            key = (name, placement[dst], nbytes)
            if placement[dst] != placement[name] and key not in copies:
                copies[key] = clocks.send(nbytes, devices[placement[name]], devices[placement[dst]], end[name], comm)

    work = _Pass(order, {name: {src for src, _ in inputs[name]} for name in order}, ready,
                 lambda name: forward_seconds(graph.by_name[name], devices[placement[name]].kind), str, sent, end)
    _list_schedule(work, placement, clocks, in_order)
    return end, copies


def _backward(graph: PlacementGraph, order: list[str], inputs: Edges, outputs: Edges, placement: dict[str, str],
              devices: dict[str, Device], comm: CommModel, clocks: _Clocks, in_order: bool, begin: float
              ) -> dict[str, float]:
    """Backward ends, in reverse order from ``begin``; a copy's gradient, summed over its users on the receiving
    device, goes back once the last of them has run backward."""
    end: dict[str, float] = {}
    users_left: dict[Copy, int] = {}
    for dst in order:
        for src, nbytes in inputs[dst]:
            if placement[src] != placement[dst]:
                key = (src, placement[dst], nbytes)
                users_left[key] = users_left.get(key, 0) + 1
    gradients: dict[Copy, float] = {}

    def ready(name: str) -> float:
        return max([begin] + [end[dst] if placement[dst] == placement[name] else gradients[(name, placement[dst], b)]
                              for dst, b in outputs[name]])

    def sent(name: str) -> None:
        for src, nbytes in inputs[name]:
            key = (src, placement[name], nbytes)
            if key in users_left:
                users_left[key] -= 1
                if users_left[key] == 0:
                    gradients[key] = clocks.send(nbytes, devices[placement[name]], devices[placement[src]],
                                                 end[name], comm)[1]

    work = _Pass(order[::-1], {name: {dst for dst, _ in outputs[name]} for name in order}, ready,
                 lambda name: backward_seconds(graph.by_name[name], devices[placement[name]].kind),
                 lambda name: name + BACKWARD, sent, end)
    _list_schedule(work, placement, clocks, in_order)
    return end


def simulate(graph: PlacementGraph, placement: dict[str, str], devices: list[Device], comm: CommModel,
             training: bool | None = None, in_order: bool = False) -> SimResult:
    """Step time, peak memory per device and timeline of ``placement`` (see the module docstring for the model);
    ``training`` defaults to the profile's; ``in_order`` runs each device's ops strictly in the model's order."""
    by_name = check_placement(graph, placement, devices)
    training = graph.training if training is None else training
    order = topological_order(graph)
    inputs, outputs = adjacency(graph)
    clocks = _Clocks(dict.fromkeys(by_name, 0.0))
    end, copies = _forward(graph, order, inputs, outputs, placement, by_name, comm, clocks, in_order)
    start = {name: began for name, _, began, _ in clocks.timeline}
    forward_end = max(end.values(), default=0.0)
    backward_end = (_backward(graph, order, inputs, outputs, placement, by_name, comm, clocks, in_order,
                              forward_end) if training else {})
    kept = dict.fromkeys(by_name, 0)  # bytes held from the forward into the backward, per device

    def release(users: list[str], producer: str, own: bool) -> tuple[float, bool]:
        """(when a tensor of ``producer`` used by ``users`` is freed, whether it is kept for the backward): after
        the backward of a user that saved it (``own``: or of the producer, when it saved its output), else
        after the last user's forward."""
        times = [(end[user], False) for user in users]
        if training:
            times += [(backward_end[user], True) for user in users if saves_input(user, producer)]
            times += [(backward_end[producer], True)] if own and graph.by_name[producer].saves_output else []
        when = max((t for t, _ in times), default=forward_end)
        return when, any(backward for _, backward in times)

    def saves_input(user: str, producer: str) -> bool:  # a profile that does not record it: every input saved
        saved = graph.by_name[user].saved_inputs
        return saved is None or producer in saved

    for name in order:
        node, device = graph.by_name[name], placement[name]
        clocks.hold(device, node.temporary_bytes, start[name], backward_end.get(name, end[name]))
        freed, backward = release([consumer for consumer, _ in outputs[name]], name, own=True)
        clocks.hold(device, node.output_bytes, start[name], freed)
        kept[device] += node.output_bytes * backward + node.temporary_bytes * training
    for (src, device, nbytes), (sent, _) in copies.items():
        users = [dst for dst, b in outputs[src] if placement[dst] == device and b == nbytes]
        freed, backward = release(users, src, own=False)
        clocks.hold(device, nbytes, sent, freed)
        kept[device] += nbytes * backward
    peak = _peaks(graph, placement, clocks)
    compute = dict.fromkeys(by_name, 0.0)
    for _, device, began, ended in clocks.timeline:
        compute[device] += ended - began
    makespan = max((ended for *_, ended in clocks.timeline), default=0.0)
    return SimResult(makespan, peak, compute, clocks.transfer_s, clocks.timeline, kept)


def _peaks(graph: PlacementGraph, placement: dict[str, str], clocks: _Clocks) -> dict[str, int]:
    level = dict.fromkeys(clocks.device_free, 0)
    for node in graph.nodes:  # held for the whole step
        level[placement[node.name]] += node.permanent_bytes
    peak = dict(level)
    for _, _, device, delta in sorted(clocks.memory):
        level[device] += delta
        peak[device] = max(peak[device], level[device])
    return peak


def _fitting(graph: PlacementGraph, placement: dict[str, str], devices: list[Device], comm: CommModel
             ) -> SimResult | None:
    result = simulate(graph, placement, devices, comm)
    if all(result.peak_bytes[device.name] <= device.memory_bytes for device in devices):
        return result
    return None


def format_bytes(nbytes: float) -> str:
    """``3.51MiB``: rounded up at two decimals (a cap printed here holds what it stands for), in a form
    :func:`~ctzoo.scaling.placement.graph.parse_size` reads back."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{math.ceil(nbytes / size * 100) / 100:.2f}{unit}"
    return f"{math.ceil(nbytes)}B"


def scaled(devices: list[Device], scale: float) -> list[Device]:
    return [Device(device.name, math.ceil(device.memory_bytes * scale)) for device in devices]


def smallest_fitting_scale(fits: Callable[[list[Device]], bool], graph: PlacementGraph, devices: list[Device]
                           ) -> float | None:
    """A uniform scale of the caps above 1 (where ``fits`` failed) at which ``fits`` holds, by bisection to 0.5 %
    between 1 and the scale where every device could hold every byte of the graph. None when not even a few
    doublings beyond that fit.

    Not necessarily the least: ``fits`` runs a greedy placer, and more memory does not always help one, so a
    bisection can step over smaller caps that fit. The planner's retries with budgets cut below the caps make
    that rare; measured on 24 random DAGs (m-ETF and m-SCT), the scale found was within 1.2 % of the least
    that fits on a 0.5 MiB grid."""
    everything = (sum(n.permanent_bytes + n.temporary_bytes + n.output_bytes for n in graph.nodes)
                  + sum(nbytes for *_, nbytes in graph.edges))
    low, high = 1.0, max(2.0, 1.01 * everything / max(1, min(d.memory_bytes for d in devices)))
    for _ in range(4):
        if fits(scaled(devices, high)):
            break
        low, high = high, high * 2
    else:
        return None
    while high / low > 1.005:
        middle = math.sqrt(low * high)
        low, high = (low, middle) if fits(scaled(devices, middle)) else (middle, high)
    return high


def single_device_plan(graph: PlacementGraph, devices: list[Device], comm: CommModel) -> dict[str, str] | None:
    """Everything on the fastest single device whose cap holds the simulated peak; None when none does."""
    best: tuple[float, dict[str, str]] | None = None
    for device in devices:
        placement = {node.name: device.name for node in graph.nodes}
        result = _fitting(graph, placement, devices, comm)
        if result is not None and (best is None or result.makespan_s < best[0]):
            best = (result.makespan_s, placement)
    return None if best is None else best[1]


def expert_plan(graph: PlacementGraph, devices: list[Device], comm: CommModel) -> dict[str, str] | None:
    """The usual hand placement: the topological order cut into at most ``len(devices)`` contiguous segments,
    device i taking segment i, with the largest segment compute time as small as it can be (bisection on that
    bottleneck) while each segment's memory (every byte its ops hold, never freed) fits its device. Nodes of one
    ``group`` follow the group's first node. None when no such split fits, or its simulated peak does not."""
    order = topological_order(graph)
    nodes = [graph.by_name[name] for name in order]
    seconds = [[node.compute_s(device.kind, training=graph.training) for node in nodes] for device in devices]
    footprint = [node.permanent_bytes + node.temporary_bytes + node.output_bytes for node in nodes]

    def split(bottleneck: float) -> list[int] | None:
        segments, device, load, held = [], 0, 0.0, 0
        for i in range(len(nodes)):
            while load + seconds[device][i] > bottleneck or held + footprint[i] > devices[device].memory_bytes:
                device, load, held = device + 1, 0.0, 0
                if device == len(devices):
                    return None
            load, held = load + seconds[device][i], held + footprint[i]
            segments.append(device)
        return segments

    low, high = 0.0, sum(max(column) for column in zip(*seconds)) * (1 + 1e-9) + 1e-12
    if not nodes or split(high) is None:
        return None if nodes else {}
    for _ in range(60):  # ~1e-18 of the total: far below any profiled time
        middle = (low + high) / 2
        low, high = (low, middle) if split(middle) is not None else (middle, high)
    placement = {name: devices[d].name for name, d in zip(order, split(high))}
    group_device: dict[str, str] = {}
    for node in nodes:
        if node.group is not None:
            placement[node.name] = group_device.setdefault(node.group, placement[node.name])
    return placement if _fitting(graph, placement, devices, comm) is not None else None
