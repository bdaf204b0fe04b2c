"""The data Baechi's placers work on (arXiv 2301.08695; notes in
``../shared/papers/scaling-lemon-cser-compress-baechi.md`` section 4): a profiled forward graph, the devices
with their memory caps, the communication-cost model, and a plan.

Everything here is plain data with a JSON form, so that ``ctzoo place profile`` (torch side, :mod:`.profile`),
the placers (:mod:`.algorithms`), the simulator (:mod:`.simulate`) and execution (:mod:`.execute`) meet on files:

* :class:`PlacementGraph` -- ``profile.json``: the forward graph at module (or op) granularity. Each
  :class:`OpNode` has its forward and backward compute seconds (per device kind, ``"cpu"`` / ``"cuda"``),
  ``permanent_bytes`` (parameters, their gradients and optimiser state: held for the whole step),
  ``temporary_bytes`` (activations kept for backward, workspace), ``output_bytes`` (what its consumers receive)
  and ``group`` (its co-placement group: an op and its parameters, gradient ops with their forward op are one
  node here already; ``group`` joins further nodes that must share a device). Edges carry the bytes sent.
* :class:`Device` -- a name (``cuda:0``, ``cpu``, or a logical ``cpu:1``...), its kind, its memory cap.
  :func:`parse_devices` reads ``cuda:0=20GiB,cuda:1=20GiB,cpu=64GiB``.
* :class:`CommModel` -- seconds to move ``n`` bytes between two devices: ``coef * n + intercept`` per ordered
  device-kind pair (fitted from a measured transfer benchmark), 0 on the same device.
* :class:`Plan` -- ``plan.json``: node -> device, the algorithm, the predicted step time and peak memory per
  device, how long placing took, and what its profile was made for (``profiled``: training or inference, batch,
  input shapes, parameter bytes), which :func:`plan_mismatches` checks a run or another profile against.

Only the forward graph is placed; a node's backward runs on its forward node's device.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ctzoo.io.atomic import atomic_path

SCHEMA_VERSION = 1
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class PlacementError(ValueError):
    """A plan, profile or device list that cannot be used; the message says what and how to fix it."""


@dataclass
class OpNode:
    """One node of the forward graph (a module call, or a function such as ``add`` between modules)."""

    name: str                       # unique; for a module, its qualified name in the model (``backbone.layer1``)
    kind: str = "module"            # "module", "function", "method", "input", "output"
    forward_s: dict[str, float] = field(default_factory=dict)   # device kind -> seconds
    backward_s: dict[str, float] = field(default_factory=dict)  # device kind -> seconds
    permanent_bytes: int = 0
    temporary_bytes: int = 0
    output_bytes: int = 0
    group: str | None = None        # nodes with the same group must share a device
    # training: the input nodes whose tensors autograd saves for this node's backward (a convolution's input;
    # not an ``add``'s); None in profiles made before this was recorded (then every input counts as saved)
    saved_inputs: list[str] | None = None
    saves_output: bool = False      # training: autograd saves this node's own output (``ReLU``, ``sigmoid``)

    def compute_s(self, device_kind: str, training: bool = True) -> float:
        """Forward (+ backward when ``training``) seconds on a device of ``device_kind``. A kind the profile has
        no timings for is a :class:`PlacementError`: another kind's figure would say a CPU is as fast as a GPU."""
        return self.forward_seconds(device_kind) + (self.backward_seconds(device_kind) if training else 0.0)

    def forward_seconds(self, device_kind: str) -> float:
        return self._seconds(self.forward_s, device_kind, "forward")

    def backward_seconds(self, device_kind: str) -> float:
        return self._seconds(self.backward_s, device_kind, "backward")

    def _seconds(self, table: dict[str, float], device_kind: str, what: str) -> float:
        if device_kind not in table:
            raise PlacementError(f"profile: node {self.name} has no {what} time on {device_kind}: profile that "
                                 f"kind (ctzoo place profile --device {device_kind})")
        return table[device_kind]


@dataclass
class PlacementGraph:
    """The profiled forward graph: ``nodes`` in a topological order and ``edges`` ``(src, dst, bytes)``."""

    nodes: list[OpNode]
    edges: list[tuple[str, str, int]]
    model: str = ""                 # what was profiled (config path, bundle, zoo name)
    batch_size: int = 1
    input_shape: list[int] = field(default_factory=list)
    training: bool = True           # backward times and optimiser state included
    meta: dict[str, Any] = field(default_factory=dict)  # machine, torch version, rounds...

    def __post_init__(self) -> None:
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise PlacementError("profile: node names must be unique")
        known = set(names)
        for src, dst, _ in self.edges:
            if src not in known or dst not in known:
                raise PlacementError(f"profile: edge {src} -> {dst} names an unknown node")
        self.by_name = {n.name: n for n in self.nodes}

    def timed_kinds(self) -> set[str]:
        """The device kinds every node has timings for (forward, and backward in training)."""
        tables = [n.forward_s for n in self.nodes] + ([n.backward_s for n in self.nodes] if self.training else [])
        return set.intersection(*(set(t) for t in tables)) if tables else {"cpu", "cuda"}

    def check_timed(self, devices: list[Device]) -> None:
        """PlacementError naming each device kind among ``devices`` that the profile has no timings for."""
        missing = sorted({d.kind for d in devices} - self.timed_kinds())
        if missing:
            kinds = " ".join(f"--device {kind}" for kind in sorted(self.timed_kinds() | set(missing)))
            raise PlacementError(
                f"the profile{f' of {self.model}' if self.model else ''} has no {' or '.join(missing)} timings "
                f"(it has {', '.join(sorted(self.timed_kinds())) or 'none'}), so it cannot place on "
                f"{', '.join(d.name for d in devices if d.kind in missing)}: profile every kind "
                f"(ctzoo place profile SOURCE {kinds}) or give one profile per kind (ctzoo place plan A.json "
                "B.json)")

    def summary(self) -> dict[str, Any]:
        """What the profile was made for, which a plan records and a run is checked against: training or
        inference, the batch, the input shapes, the model's parameter bytes (None when not recorded)."""
        return {"training": self.training, "batch_size": self.batch_size,
                "input_shapes": self.meta.get("input_shapes", [self.input_shape]),
                "parameter_bytes": self.meta.get("parameter_bytes")}

    def successors(self, name: str) -> list[str]:
        return [d for s, d, _ in self.edges if s == name]

    def predecessors(self, name: str) -> list[str]:
        return [s for s, d, _ in self.edges if d == name]

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA_VERSION, "model": self.model, "batch_size": self.batch_size,
                "input_shape": self.input_shape, "training": self.training, "meta": self.meta,
                "nodes": [asdict(n) for n in self.nodes], "edges": [list(e) for e in self.edges]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlacementGraph:
        if data.get("schema") != SCHEMA_VERSION:
            raise PlacementError(f"profile schema {data.get('schema')!r} is not {SCHEMA_VERSION}: profile again "
                                 "with this ctzoo (ctzoo place profile)")
        try:
            nodes = [OpNode(**n) for n in data["nodes"]]
            edges = [(str(s), str(d), int(b)) for s, d, b in data["edges"]]
        except (KeyError, TypeError, ValueError) as error:
            raise PlacementError(f"profile is malformed: {error}") from None
        return cls(nodes, edges, data.get("model", ""), int(data.get("batch_size", 1)),
                   list(data.get("input_shape", [])), bool(data.get("training", True)), dict(data.get("meta", {})))

    def save(self, path: str | Path) -> None:
        _write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> PlacementGraph:
        return cls.from_dict(_read_json(path, "profile"))


def merge_profiles(graphs: list[PlacementGraph]) -> PlacementGraph:
    """One profile with every kind's timings from profiles of one model on several device kinds (``ctzoo place
    profile --device cpu`` and ``--device cuda``): the first profile's memory figures, its meta (with
    ``device_kinds``), and its transfer model, else the first that has one. PlacementError when they differ in
    graph, mode or batch."""
    first, *others = graphs
    if not others:
        return first
    for other in others:
        if ([n.name for n in other.nodes] != [n.name for n in first.nodes]
                or [e[:2] for e in other.edges] != [e[:2] for e in first.edges]):
            raise PlacementError(f"profiles of {first.model!r} and {other.model!r} have different graphs: merge "
                                 "only profiles of one model")
        if (other.training, other.batch_size) != (first.training, first.batch_size):
            raise PlacementError(f"profiles to merge differ in mode or batch ({first.summary()} against "
                                 f"{other.summary()}): profile each kind with the same options")
    nodes = []
    for k, node in enumerate(first.nodes):
        forward, backward = dict(node.forward_s), dict(node.backward_s)
        for other in others:
            forward.update({kind: s for kind, s in other.nodes[k].forward_s.items() if kind not in forward})
            backward.update({kind: s for kind, s in other.nodes[k].backward_s.items() if kind not in backward})
        nodes.append(replace(node, forward_s=forward, backward_s=backward))
    meta = dict(first.meta)
    comm = next((g.meta["comm"] for g in graphs if "comm" in g.meta), None)
    if comm is not None:
        meta["comm"] = comm
    merged = PlacementGraph(nodes, list(first.edges), first.model, first.batch_size, list(first.input_shape),
                            first.training, meta)
    merged.meta["device_kinds"] = sorted(merged.timed_kinds())
    return merged


@dataclass(frozen=True)
class Device:
    name: str                       # "cuda:0", "cpu", "cpu:1" (logical CPU devices share the one torch CPU)
    memory_bytes: int

    @property
    def kind(self) -> str:
        return self.name.split(":")[0]

    @property
    def torch_device(self) -> str:
        """What torch calls it: ``cpu`` for every logical CPU device."""
        return "cpu" if self.kind == "cpu" else self.name


def parse_size(text: str) -> int:
    """``20GiB``, ``512MB``, ``1.5GiB``, ``1000000`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise PlacementError(f"memory size {text!r} is not a number with an optional unit (B, KB, MB, GB, KiB, "
                             "MiB, GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_devices(text: str) -> list[Device]:
    """``cuda:0=20GiB,cuda:1=20GiB,cpu=64GiB`` -> devices, in the order given (the first is where inputs start)."""
    devices = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, size = part.partition("=")
        name = name.strip()
        if not sep:
            raise PlacementError(f"device {part!r} has no memory cap: write NAME=SIZE, e.g. cuda:0=20GiB")
        if not re.fullmatch(r"(cpu|cuda)(:[0-9]+)?", name):
            raise PlacementError(f"unknown device {name!r}: use cpu, cpu:N (a logical CPU device) or cuda:N")
        devices.append(Device(name, parse_size(size)))
    if not devices:
        raise PlacementError("no devices given: e.g. --devices cuda:0=20GiB,cpu=64GiB")
    if len({d.name for d in devices}) != len(devices):
        raise PlacementError(f"a device is named twice in {text!r}")
    return devices


@dataclass
class CommModel:
    """Transfer seconds = ``coef * bytes + intercept`` per ordered device-kind pair ``"cpu->cuda"``; a pair not
    measured falls back to ``default``; the same device costs nothing."""

    pairs: dict[str, tuple[float, float]] = field(default_factory=dict)  # "src_kind->dst_kind" -> (coef, intercept)
    default: tuple[float, float] = (1e-10, 1e-5)                        # 10 GB/s, 10 us

    def seconds(self, nbytes: int, src: Device | str, dst: Device | str) -> float:
        src_name = src.name if isinstance(src, Device) else src
        dst_name = dst.name if isinstance(dst, Device) else dst
        if src_name == dst_name or nbytes <= 0:
            return 0.0
        key = f"{src_name.split(':')[0]}->{dst_name.split(':')[0]}"
        coef, intercept = self.pairs.get(key, self.default)
        return coef * nbytes + intercept

    def to_dict(self) -> dict[str, Any]:
        return {"pairs": {k: list(v) for k, v in self.pairs.items()}, "default": list(self.default)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CommModel:
        return cls({k: (float(v[0]), float(v[1])) for k, v in data.get("pairs", {}).items()},
                   tuple(float(x) for x in data.get("default", (1e-10, 1e-5))))


@dataclass
class Plan:
    """``plan.json``: where every node runs, and what the simulator predicts for it."""

    algorithm: str
    placement: dict[str, str]                    # node name -> device name
    devices: list[Device]
    predicted_step_s: float | None = None
    peak_bytes: dict[str, int] = field(default_factory=dict)  # device name -> predicted peak
    placement_s: float | None = None             # how long the placer took
    model: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    profiled: dict[str, Any] | None = None        # PlacementGraph.summary() of its profile; None in older plans

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA_VERSION, "algorithm": self.algorithm, "model": self.model,
                "devices": {d.name: d.memory_bytes for d in self.devices}, "placement": self.placement,
                "predicted_step_s": self.predicted_step_s, "peak_bytes": self.peak_bytes,
                "placement_s": self.placement_s, "profiled": self.profiled, "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION:
            raise PlacementError(f"not a ctzoo placement plan (schema {SCHEMA_VERSION}): make one with ctzoo place")
        try:
            devices = [Device(str(name), int(size)) for name, size in data["devices"].items()]
            placement = {str(k): str(v) for k, v in data["placement"].items()}
        except (KeyError, AttributeError, TypeError, ValueError) as error:
            raise PlacementError(f"plan is malformed: {error}") from None
        known = {d.name for d in devices}
        unknown = sorted(set(placement.values()) - known)
        if unknown:
            raise PlacementError(f"plan places nodes on {', '.join(unknown)}, which its devices do not list")
        return cls(str(data.get("algorithm", "?")), placement, devices, data.get("predicted_step_s"),
                   {str(k): int(v) for k, v in (data.get("peak_bytes") or {}).items()}, data.get("placement_s"),
                   str(data.get("model", "")), dict(data.get("meta") or {}), data.get("profiled"))

    def save(self, path: str | Path) -> None:
        _write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_dict(_read_json(path, "plan"))


def plan_mismatches(plan: Plan, actual: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` for using ``plan`` where ``actual`` (keys of :meth:`PlacementGraph.summary`; a key
    left out is not checked) describes the run or profile. Errors: a training run on an inference plan (no room
    for gradients and optimiser state), other parameter bytes (another, e.g. expanded, model). Warnings: an
    inference run on a training plan, another batch or input shape (the plan's memory figures scale with them),
    and a plan too old to say what it was profiled for."""
    profiled = plan.profiled
    if not profiled:
        return [], ["the plan does not record what it was profiled for (made by an older ctzoo): its memory "
                    "figures cannot be checked against this run; place the model again to have them checked"]
    errors, warnings = [], []
    if actual.get("training") and profiled.get("training") is False:
        errors.append("the plan was profiled for inference, so its memory figures leave out gradients, "
                      "optimiser state and activations kept for backward: profile for training and place again")
    if actual.get("training") is False and profiled.get("training"):
        warnings.append("the plan was profiled for training: it reserves memory inference does not use")
    planned, got = profiled.get("parameter_bytes"), actual.get("parameter_bytes")
    if planned is not None and got is not None and planned != got:
        errors.append(f"the plan was profiled for a model of {planned} parameter bytes, this one has {got} "
                      "(another or an expanded model): profile this model and place it again")
    for key, what in (("batch_size", "batch"), ("input_shapes", "input shapes")):
        if key in actual and profiled.get(key) is not None and actual[key] != profiled[key]:
            warnings.append(f"the plan was profiled with {what} {profiled[key]}, this run has {actual[key]}: "
                            "activation memory scales with it, so the caps may not hold; profile with the "
                            "same batch to check")
    return errors, warnings


def _read_json(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise PlacementError(f"{what} {path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PlacementError(f"{what} {path} is not JSON ({error})") from None


def _write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Written whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=1) + "\n", "utf-8")
