"""The search space over the template segmenter (:class:`~ctzoo.models.template_seg.TemplateSegNet`).

Decisions, named as the constraint syntax names them:

* ``level<k>.width``: a multiplier of the level's base channels (``round(base * m)``, at least 1);
* ``level<k>.units``: convolutions in the level's residual unit (its first one strides);
* ``level<k>.kernel``: the level's convolution kernel;
* ``level<k>.fusion``: whether cosine-prototype fusion with the template runs at the level;
* ``gate``: the fusion gate of every fused level (``"sigmoid"`` or ``"none"``).

``choices`` are what the supernet holds weights for and never change; ``allowed`` narrows them per decision
(:meth:`SearchSpace.constrain`), which the search samples from. Constraint strings: ``level2.kernel=5`` (drop a
value), ``level0.fusion=true`` (lock one), ``level*.units=1`` (every level).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

LEVEL_DECISIONS = ("width", "units", "kernel", "fusion")
GATES = ("sigmoid", "none")
Value = float | int | bool | str


@dataclass(frozen=True)
class LevelChoice:
    """One encoder level of an :class:`Architecture`."""

    width: float
    units: int
    kernel: int
    fusion: bool


@dataclass(frozen=True)
class Architecture:
    """One choice per decision: ``levels[k]`` for encoder level ``k`` and the global ``gate``."""

    levels: tuple[LevelChoice, ...]
    gate: str

    def decisions(self) -> dict[str, Value]:
        """``{"level0.width": 0.5, ..., "gate": "sigmoid"}`` in the space's decision order."""
        values: dict[str, Value] = {f"level{k}.{name}": getattr(level, name)
                                    for k, level in enumerate(self.levels) for name in LEVEL_DECISIONS}
        return values | {"gate": self.gate}

    def to_json(self) -> dict[str, Any]:
        """``{"levels": [{"width", "units", "kernel", "fusion"}, ...], "gate"}``."""
        return {"levels": [{name: getattr(level, name) for name in LEVEL_DECISIONS} for level in self.levels],
                "gate": self.gate}

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Architecture:
        levels = tuple(LevelChoice(float(v["width"]), int(v["units"]), int(v["kernel"]), bool(v["fusion"]))
                       for v in document["levels"])
        return cls(levels, str(document["gate"]))

    @property
    def id(self) -> str:
        """Stable 10-hex-digit id: a hash of the canonical JSON (same choices, same id, on every machine)."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha1(text.encode()).hexdigest()[:10]

    def to_vector(self) -> list[float]:
        """Fixed-length ordinal embedding, ``4 * levels + 1`` floats in :func:`vector_labels` order: per level the
        width multiplier, units, kernel and fusion (0/1), then the gate (1 = sigmoid). Raw values: standardise
        before distances."""
        return [float(v == "sigmoid") if isinstance(v, str) else float(v) for v in self.decisions().values()]

    def describe(self) -> str:
        """Short human string, e.g. ``w .5/1/1/.75 u 1/2/2/1 k 3/5/3/3 fuse 0,2 sigmoid``."""
        def short(width: float) -> str:
            return f"{width:g}".removeprefix("0")

        fused = ",".join(str(k) for k, level in enumerate(self.levels) if level.fusion) or "-"
        return (f"w {'/'.join(short(v.width) for v in self.levels)} u {'/'.join(str(v.units) for v in self.levels)}"
                f" k {'/'.join(str(v.kernel) for v in self.levels)} fuse {fused} {self.gate}")


def vector_labels(num_levels: int) -> list[str]:
    """The name of each entry of :meth:`Architecture.to_vector`."""
    return [f"level{k}.{name}" for k in range(num_levels) for name in LEVEL_DECISIONS] + ["gate"]


def format_value(value: Value) -> str:
    """How a choice is written in constraint strings and errors: ``true``, ``0.75``, ``5``, ``sigmoid``."""
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class SearchSpace:
    """The decisions and their values (see the module docstring).

    Args:
        base_channels: full widths per encoder level (the last is the bottleneck), as ``TemplateSegNet.channels``.
        strides: downsampling between levels (``len(base_channels) - 1``).
        widths, units, kernels, fusion, gates: the choices of every level (gates: global).
        num_classes, in_channels, spatial_dims, temperature: the segmenter's fixed settings.
        allowed: the narrowed decisions, ``{decision: values}`` (the others allow all their choices).
    """

    base_channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    widths: tuple[float, ...] = (0.5, 0.75, 1.0)
    units: tuple[int, ...] = (1, 2)
    kernels: tuple[int, ...] = (3, 5)
    fusion: tuple[bool, ...] = (False, True)
    gates: tuple[str, ...] = GATES
    num_classes: int = 5
    in_channels: int = 1
    spatial_dims: int = 2
    temperature: float = 10.0
    allowed: dict[str, tuple[Value, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.strides) != len(self.base_channels) - 1:
            raise ValueError(f"need len(strides) == len(base_channels) - 1, got {self.base_channels}, {self.strides}")
        if any(k % 2 == 0 for k in self.kernels):
            raise ValueError(f"kernels must be odd (centred), got {self.kernels}")
        if not set(self.gates) <= set(GATES):
            raise ValueError(f"gates must be among {GATES}, got {self.gates}")
        for name, values in self.allowed.items():
            if not values or not set(values) <= set(self.choices(name)):
                raise ValueError(f"allowed[{name!r}] = {values} must be a non-empty subset of {self.choices(name)}")

    @property
    def num_levels(self) -> int:
        return len(self.base_channels)

    def decision_names(self) -> list[str]:
        return [f"level{k}.{name}" for k in range(self.num_levels) for name in LEVEL_DECISIONS] + ["gate"]

    def choices(self, decision: str) -> tuple[Value, ...]:
        """Every value ``decision`` has weights for (ignores constraints)."""
        if decision == "gate":
            return self.gates
        level, _, name = decision.partition(".")
        if (not level.startswith("level") or not level[5:].isdigit() or int(level[5:]) >= self.num_levels
                or name not in LEVEL_DECISIONS):
            raise KeyError(f"unknown decision {decision!r}; the decisions are level0..level{self.num_levels - 1} "
                           f".{{{','.join(LEVEL_DECISIONS)}}} and gate")
        return {"width": self.widths, "units": self.units, "kernel": self.kernels, "fusion": self.fusion}[name]

    def allowed_values(self, decision: str) -> tuple[Value, ...]:
        """The values ``decision`` may take under the constraints, in choice order."""
        return self.allowed.get(decision, self.choices(decision))

    def channels(self, level: int, width: float) -> int:
        """Channels of encoder level ``level`` at multiplier ``width``."""
        return max(1, round(self.base_channels[level] * width))

    def max_channels(self) -> tuple[int, ...]:
        """The supernet's widths: every level at its widest choice."""
        return tuple(self.channels(k, max(self.widths)) for k in range(self.num_levels))

    def check(self, arch: Architecture, constrained: bool = False) -> None:
        """Raise ``ValueError`` unless ``arch`` fits the space (``constrained``: also the constraints)."""
        if len(arch.levels) != self.num_levels:
            raise ValueError(f"architecture has {len(arch.levels)} levels, the space {self.num_levels}")
        wrong = self._outside(arch, constrained)
        if wrong:
            raise ValueError(f"architecture {arch.id} is outside the space: {', '.join(wrong)}")

    def allows(self, arch: Architecture) -> bool:
        """Whether ``arch`` is one of the architectures the constraints allow (:func:`sample` may draw it)."""
        return len(arch.levels) == self.num_levels and not self._outside(arch, constrained=True)

    def _outside(self, arch: Architecture, constrained: bool) -> list[str]:
        """``arch``'s ``decision=value`` s outside the choices (``constrained``: outside the allowed values)."""
        values = self.allowed_values if constrained else self.choices
        return [f"{name}={format_value(v)}" for name, v in arch.decisions().items() if v not in values(name)]

    # ------------------------------------------------------------------------------------------ constraints

    def constrain(self, drop: Sequence[str] = (), lock: Sequence[str] = ()) -> SearchSpace:
        """A space narrowed by ``drop`` (``"level2.kernel=5"``: never sample 5) and ``lock`` (``"gate=none"``:
        always sample none); ``level*.`` applies to every level. Raises ``ValueError`` for an unknown decision or
        value, or a constraint that would leave a decision no value."""
        allowed = {name: self.allowed_values(name) for name in self.decision_names()}
        for constraint, is_lock in [*((c, True) for c in lock), *((c, False) for c in drop)]:
            for decision, value in self._parse(constraint):
                if value not in allowed[decision]:
                    raise ValueError(f"{constraint!r}: {decision}={format_value(value)} is already excluded "
                                     f"(allowed: {', '.join(map(format_value, allowed[decision]))})")
                kept = (value,) if is_lock else tuple(v for v in allowed[decision] if v != value)
                if not kept:
                    raise ValueError(f"{constraint!r} would leave {decision} no value")
                allowed[decision] = kept
        narrowed = {name: values for name, values in allowed.items() if values != self.choices(name)}
        return replace(self, allowed=narrowed)

    def _parse(self, constraint: str) -> list[tuple[str, Value]]:
        """``"level*.kernel=5"`` -> ``[("level0.kernel", 5), ...]``."""
        decision, sep, text = (part.strip() for part in constraint.partition("="))
        if not sep or not text:
            raise ValueError(f"constraint {constraint!r} must read DECISION=VALUE, e.g. level2.kernel=5")
        names = ([f"level{k}.{decision[len('level*.'):]}" for k in range(self.num_levels)]
                 if decision.startswith("level*.") else [decision])
        parsed = []
        for name in names:
            try:
                choices = self.choices(name)
            except KeyError as error:
                raise ValueError(f"constraint {constraint!r}: {error.args[0]}") from None
            matches = [v for v in choices if _same(v, text)]
            if not matches:
                raise ValueError(f"constraint {constraint!r}: {name} has no value {text!r} "
                                 f"(choices: {', '.join(map(format_value, choices))})")
            parsed.append((name, matches[0]))
        return parsed

    # ------------------------------------------------------------------------------------------ JSON

    def to_json(self) -> dict[str, Any]:
        """Every field; ``allowed`` only lists the narrowed decisions."""
        document = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: ({n: list(v) for n, v in value.items()} if k == "allowed" else
                    list(value) if isinstance(value, tuple) else value) for k, value in document.items()}

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> SearchSpace:
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in document.items() if k != "allowed"}
        space = cls(**values)
        allowed = {name: tuple(v for v in space.choices(name) for text in picked if _same(v, format_value(text)))
                   for name, picked in document.get("allowed", {}).items()}
        return replace(space, allowed=allowed)


def _same(value: Value, text: str) -> bool:
    """Whether constraint text ``text`` names ``value`` (numbers compare as numbers: ``1`` names ``1.0``)."""
    if isinstance(value, bool):
        return text.lower() == format_value(value)
    if isinstance(value, (int, float)):
        try:
            return math.isclose(float(text), value)
        except ValueError:
            return False
    return text == value


def _architecture(space: SearchSpace, values: Sequence[Value]) -> Architecture:
    """The architecture of one value per decision, in :meth:`SearchSpace.decision_names` order."""
    per = len(LEVEL_DECISIONS)
    levels = tuple(LevelChoice(*values[k * per:(k + 1) * per]) for k in range(space.num_levels))
    return Architecture(levels, str(values[-1]))


def sample(space: SearchSpace, rng: random.Random | int | None = None) -> Architecture:
    """An architecture drawn uniformly: each decision independently uniform over its allowed values."""
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    return _architecture(space, [rng.choice(space.allowed_values(n)) for n in space.decision_names()])


def enumerate_architectures(space: SearchSpace) -> Iterator[Architecture]:
    """Every allowed architecture, in choice order (:func:`count_architectures` of them)."""
    for values in itertools.product(*(space.allowed_values(n) for n in space.decision_names())):
        yield _architecture(space, values)


def count_architectures(space: SearchSpace) -> int:
    return math.prod(len(space.allowed_values(n)) for n in space.decision_names())


def count_unscored(space: SearchSpace, scored: Iterable[Architecture]) -> int:
    """How many allowed architectures of ``space`` are not among ``scored`` (the architectures a run has scored
    so far, which may include ones the constraints no longer allow: those do not count)."""
    return count_architectures(space) - len({arch.id for arch in scored if space.allows(arch)})


def extreme(space: SearchSpace, largest: bool) -> Architecture:
    """The smallest (or largest) allowed architecture: every decision at its least (or most) value, fusion
    off (on), gate none (sigmoid)."""
    pick = max if largest else min
    values = [pick(space.allowed_values(n), key=lambda v: GATES[::-1].index(v) if isinstance(v, str) else v)
              for n in space.decision_names()]
    return _architecture(space, values)
