"""A timm-style registry of zoo models, with their weights and model cards shipped inside the package.

A model registers a builder, the constructor config it defaults to, its task and the input it expects
(MONAI-bundle style). Published weights live in ``ctzoo/models/weights/<name>/``:

* ``model.safetensors``: the state dict (safetensors, not pickle, so loading weights never runs code);
* ``config.json``: the exact constructor config the weights were trained with;
* ``card.json`` and ``MODEL_CARD.md``: the model card (:class:`ModelCard`) for machines and for people.

That folder is the model's bundle (:mod:`ctzoo.models.bundle`, which also holds the card reader; ``create_model``
and ``save_pretrained`` are in :mod:`ctzoo.models.pretrained`). Nothing is ever downloaded:
``create_model(name, pretrained=True)`` reads only that folder, so it works offline and the weights are versioned
together with the code that builds their architecture.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fnmatch
import importlib.metadata
import importlib.resources
import json
import os
import re
from collections.abc import Callable, Mapping
from datetime import date
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

TASKS: tuple[str, ...] = ("detection", "segmentation")
WEIGHTS_FILE, CONFIG_FILE, CARD_JSON, CARD_MD = "model.safetensors", "config.json", "card.json", "MODEL_CARD.md"
_NAME = r"^[a-z0-9][a-z0-9_.-]*$"  # a valid folder name on every OS and one word on a command line
SEMVER = r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$"
B = TypeVar("B", bound=Callable[..., nn.Module])


class UnknownModelError(KeyError):
    """No model is registered under that name; the message lists the known names and close matches."""

    def __str__(self) -> str:  # KeyError would print the message quoted, as a repr
        return str(self.args[0])


class WeightsMismatchError(RuntimeError):
    """The shipped weights do not fit the model built from their config (keys or shapes differ)."""


class ArchitectureOverrideError(WeightsMismatchError, ValueError):
    """An override given with ``pretrained=True`` differs from the config the weights were trained with: it changes
    the architecture (the weights cannot load), or what the network computes (refused unless allowed)."""


class _Strict(BaseModel):
    # strict: a card is evidence, so '12' is not silently an int; frozen: a loaded card is not edited in place
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class TrainingInfo(_Strict):
    """How the weights were made: enough for someone else to make them again."""

    data: str = Field(description="dataset, version and split trained on")
    config_file: str = Field(description="training config file, relative to the repository root")
    command: str = Field(description="the command that reproduces the weights")
    device: str = Field(description="accelerator (and count) trained on")
    epochs: int = Field(ge=0, description="epochs trained")
    epochs_planned: int | None = Field(None, ge=0, description="epochs of the schedule (more than trained: cut off)")
    best_epoch: int | None = Field(None, ge=1, description="the epoch whose weights these are (chosen on validation)")
    wall_time_s: float | None = Field(ge=0, description="training wall time in seconds; None where the card cannot "
                                                       "vouch for it (a run recorded but not verified)")
    notes: str = Field("", description="what else a reader must know: a run stopped early, resumed elsewhere")


    def epochs_text(self, unit: str = "") -> str:
        """"30", "95 of 120 planned", each followed by ``unit`` (e.g. " epochs") and by "; weights from epoch N (best
        on validation)" when that is known."""
        text = str(self.epochs)
        if self.epochs_planned is not None and self.epochs_planned != self.epochs:
            text += f" of {self.epochs_planned} planned"
        text += unit
        if self.best_epoch is not None:
            text += f"; weights from epoch {self.best_epoch} (best on validation)"
        return text


class OperatingPoint(_Strict):
    """The score threshold a detector reports lesions at, chosen on validation data for a stated false-positive
    rate, and what it gives there and on real CT without known lesions (other data: the card shows them apart)."""

    score_threshold: float = Field(ge=0, le=1, description="lesions scoring at least this are reported")
    fp_per_image: float = Field(ge=0, description="the false positives per image it was chosen for")
    split: str = Field(min_length=1, description="the data it was chosen on, and what data that is (synthetic "
                                                 "lesions or real; never the test split)")
    sensitivity: float | None = Field(None, ge=0, le=1, description="sensitivity there on that split")
    lesion_free_findings_per_slice: float | None = Field(
        None, ge=0, description="findings per slice at this threshold on real CT without known lesions")
    note: str = ""


#: Detectors without an operating point in their card report lesions scoring at least this.
DEFAULT_SCORE_THRESHOLD = 0.3


class Metric(_Strict):
    """One evaluation result and the split it was measured on."""

    value: float
    split: str = Field(min_length=1, description="the split and what data it is, e.g. 'test: synthetic lesions in "
                                                 "real CT', 'test: real CT, 1 patient'")


def _software_versions() -> dict[str, str]:
    """Versions that produced the weights, as MONAI bundles record them (results drift across releases)."""
    found = {}
    for name in ("ctzoo", "torch", "monai", "numpy", "safetensors"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):  # e.g. ctzoo run from a checkout
            found[name] = importlib.metadata.version(name)
    return found


class ModelCard(_Strict):
    """What a published model is, how it was trained, how well it does and where it fails."""

    name: str = Field(pattern=_NAME)
    version: str = Field(pattern=SEMVER, description="semantic version of the weights")
    task: Literal["detection", "segmentation"]
    description: str = Field(min_length=1)
    intended_use: str = Field("", description="who may use it for what, on which input; '' in cards published "
                                              "before ctzoo recorded it")
    architecture: str = Field(min_length=1)
    parameters: int = Field(ge=0)
    input_spec: dict[str, Any]
    training: TrainingInfo
    metrics: dict[str, Metric]
    operating_point: OperatingPoint | None = None
    limitations: list[str]
    licence: str = Field(min_length=1)
    created: date
    software: dict[str, str] = Field(default_factory=_software_versions)

    def to_markdown(self) -> str:
        """Render the card as MODEL_CARD.md."""
        t, software = self.training, ", ".join(f"{k} {v}" for k, v in self.software.items()) or "not recorded"
        wall = None if t.wall_time_s is None else round(t.wall_time_s)
        lines = [f"# {self.name} {self.version}", "",
                 f"{self.task.capitalize()} · {self.architecture} · {self.parameters:,} parameters", "",
                 self.description, "",
                 "## Intended use", "", self.intended_use or "Not stated on this card: see its limitations.", "",
                 "## Inputs", "", *_table(("Field", "Value"), list(self.input_spec.items())), "",
                 "## Training", "", *_table(("Field", "Value"), [
                     ("Data", t.data), ("Config", f"`{t.config_file}`"), ("Device", t.device),
                     ("Epochs", t.epochs_text()),
                     ("Wall time", "not given (see the notes)" if wall is None
                      else f"{wall // 3600}:{wall // 60 % 60:02d}:{wall % 60:02d} (h:mm:ss)"),
                     ("Software", software), *([("Notes", t.notes)] if t.notes else [])]), "",
                 "## Metrics", "", *_table(("Metric", "Split", "Value"),
                                           [(k, m.split, f"{m.value:.4g}") for k, m in self.metrics.items()]), "",
                 *self._operating_point_lines(),
                 "## Limitations", "", *([f"- {item}" for item in self.limitations] or ["None recorded."]), "",
                 "## How to reproduce", "", "```bash", t.command, "```", "", "Load the published weights with:", "",
                 "```python", "from ctzoo.models import create_model",
                 f'model = create_model("{self.name}", pretrained=True).eval()', "```", "",
                 "## Licence", "", f"{self.licence}. Card created {self.created.isoformat()}.", ""]
        return "\n".join(lines)

    def _operating_point_lines(self) -> list[str]:
        point = self.operating_point
        if point is None:
            return []
        rows = [("Score threshold", f"{point.score_threshold:g}"),
                ("Chosen on", f"{point.split}, for {point.fp_per_image:g} false positives per image")]
        if point.sensitivity is not None:
            rows.append(("Sensitivity there", f"{point.sensitivity:.3f}"))
        lines = ["## Operating point", "", *_table(("Field", "Value"), rows), ""]
        if point.lesion_free_findings_per_slice is not None:  # other data than the split above: a table of its own
            lines += ["Real CT without known lesions, at this threshold (every finding a false positive):", "",
                      *_table(("Field", "Value"), [("Findings per slice",
                                                    f"{point.lesion_free_findings_per_slice:.3f}")]), ""]
        # each table ends at a blank line: a line right below one would be read as one more row
        return lines + ([point.note, ""] if point.note else [])


def _cell(value: Any) -> str:
    """One table cell: a '|' escaped (it would end the cell and shift the rest), line breaks as <br> (a newline
    would end the row, the rest falling out of the table)."""
    text = value if isinstance(value, str) else json.dumps(value)
    return "<br>".join(text.replace("|", "\\|").splitlines())


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    """Markdown table lines (cells as :func:`_cell` writes them)."""
    cells = [tuple(_cell(c) for c in r) for r in rows]
    if not rows:
        return ["None recorded."]
    return ["| " + " | ".join(r) + " |" for r in [header, ("---",) * len(header), *cells]]


@dataclasses.dataclass
class ModelEntry:
    """One registered model: how to build it, what it expects, where its weights are (``weights_dir`` may be
    reassigned, e.g. by tests, without touching the package)."""

    name: str
    task: str
    description: str
    builder: Callable[..., nn.Module]
    default_config: dict[str, Any]
    input_spec: dict[str, Any]
    weights_dir: Path

    @property
    def has_weights(self) -> bool:
        """Whether published weights, their config and card are present."""
        return all((self.weights_dir / f).is_file() for f in (WEIGHTS_FILE, CONFIG_FILE, CARD_JSON))


_REGISTRY: dict[str, ModelEntry] = {}


@overload
def register_model(name: str, *, builder: None = None, default_config: Mapping[str, Any], task: str,
                   description: str, input_spec: Mapping[str, Any],
                   weights_dir: str | os.PathLike[str] | None = None) -> Callable[[B], B]: ...
@overload
def register_model(name: str, *, builder: Callable[..., nn.Module], default_config: Mapping[str, Any], task: str,
                   description: str, input_spec: Mapping[str, Any],
                   weights_dir: str | os.PathLike[str] | None = None) -> ModelEntry: ...
def register_model(name: str, *, builder: Callable[..., nn.Module] | None = None, default_config: Mapping[str, Any],
                   task: str, description: str, input_spec: Mapping[str, Any],
                   weights_dir: str | os.PathLike[str] | None = None) -> ModelEntry | Callable[[B], B]:
    """Register a model builder under ``name``; returns the entry, or a decorator when ``builder`` is omitted.

    ``default_config`` holds the builder's keyword arguments and must be JSON-serialisable (it becomes the
    published ``config.json``). ``weights_dir`` defaults to the package folder ``ctzoo/models/weights/<name>/``.
    """
    kwargs = dict(default_config=default_config, task=task, description=description, input_spec=input_spec,
                  weights_dir=weights_dir)
    if builder is None:
        def decorate(fn: B) -> B:
            register_model(name, builder=fn, **kwargs)  # type: ignore[arg-type]
            return fn
        return decorate
    if not re.match(_NAME, name):
        raise ValueError(f"model name {name!r} must be lower-case letters, digits, '_', '-' or '.'")
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered; unregister_model({name!r}) first to replace it")
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}")
    json.dumps(dict(default_config))  # fail now, not when the first weights are published
    # importlib.resources finds the package wherever pip installed it (or the checkout, when editable);
    # pip always unpacks wheels, so the Traversable is a real folder
    folder = Path(str(importlib.resources.files("ctzoo.models") / "weights" / name))
    entry = ModelEntry(name=name, task=task, description=description, builder=builder,
                       default_config=dict(default_config), input_spec=dict(input_spec),
                       weights_dir=Path(weights_dir) if weights_dir is not None else folder)
    _REGISTRY[name] = entry
    return entry


def unregister_model(name: str) -> ModelEntry:
    """Remove a model from the registry (for tests) and return its entry."""
    model_entry(name)  # the helpful error for an unknown name
    return _REGISTRY.pop(name)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching the shell-style ``pattern``, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def model_entry(name: str) -> ModelEntry:
    """The entry for ``name``; :class:`UnknownModelError` (a KeyError) names close matches if there is none."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownModelError(f"no model named {name!r}.{hint} Known models: {', '.join(list_models()) or 'none'}.")


def _as_json(value: Any) -> Any:
    # config.json stores tuples as lists: compare overrides the way they would be stored
    return json.loads(json.dumps(value))


def _state_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> str:
    """How ``found`` differs from the model's state dict ``expected``, naming every key; '' when it fits."""
    shapes = [f"{k} (weights {tuple(found[k].shape)}, model {tuple(expected[k].shape)})"
              for k in sorted(expected.keys() & found.keys()) if found[k].shape != expected[k].shape]
    parts = (("missing keys", sorted(expected.keys() - found.keys())),
             ("unexpected keys", sorted(found.keys() - expected.keys())), ("shape mismatches", shapes))
    return "; ".join(f"{label}: {', '.join(keys)}" for label, keys in parts if keys)
