"""Single-path one-shot search over the template segmenter, one analyst iteration at a time.

An iteration (:func:`search_iteration`) narrows the space by the analyst's constraints, trains the supernet on
the template segmenter's own data pipeline (:class:`~ctzoo.training.template_seg_task.TemplateSegTask`: the same
slices, templates, augmentation and Dice-CE loss) for more epochs with one uniformly sampled architecture per step
(SPOS), continuing its checkpoint (``RUN/supernet/last.pt``, the training engine's resume), then scores fresh random
candidates with the shared weights (:func:`evaluate_candidates`) and appends them to ``RUN/candidates.json``::

    {"schema": 1, "space": <SearchSpace JSON, constraints so far>,
     "iterations": [{"iteration": 0, "constraints": {"drop": [...], "lock": [...]}, "steps": N,
                     "candidates": [ids]}],
     "candidates": [{"id", "iteration", "architecture": <Architecture JSON>, "description", "vector": [float],
                     "dice", "latency_ms", "params", "flops", "reference" (only on an included one: true)}]}

Each iteration's constraints apply on top of the earlier ones; ``steps`` and ``epochs`` count its optimiser steps and
supernet epochs, and ``scored_on`` names the split its candidates were scored on (:func:`scoring_split`): ``val``
where the data has validation patients of their own (MSD folders), so the test cases stay unseen by the search;
``test`` for the TotalSegmentator sample, whose only patient not trained on is the test one (the val slab belongs
to the training patient): the search picks on it there, so a pick's Dice on it is optimistic. ``dice`` is always a
number: a search whose scoring cases hold none of its classes is refused before training
(:func:`require_scorable`), as is one with no architecture left to score (each candidate is scored once, and
constraints only narrow the space).

An iteration interrupted after its training (while scoring, say) leaves the supernet ahead of what
``candidates.json`` records; running it again scores with that training instead of training once more
(:func:`recorded_training`). The supernet's checkpoint records the task's config, so a resumed search refuses
another config (other data, classes or recipe) rather than mixing candidates scored under two.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctzoo.datasets.seg_preprocessing import SegPreprocessing, labels_to_slices, resample_slices
from ctzoo.datasets.segmentation import SegCase
from ctzoo.io.atomic import atomic_path
from ctzoo.models.seg_networks import TemplateSegModelConfig
from ctzoo.nas.explorer import CANDIDATES_FILE, SCHEMA
from ctzoo.nas.explorer import read_candidates as read_run
from ctzoo.nas.measure import measure
from ctzoo.nas.space import (
    Architecture,
    LevelChoice,
    SearchSpace,
    count_architectures,
    count_unscored,
    enumerate_architectures,
    extreme,
    sample,
)
from ctzoo.nas.supernet import TemplateSuperNet, extract
from ctzoo.training.engine import fit, pick_device
from ctzoo.training.resume_check import check_resume, resume_record
from ctzoo.training.seg_evaluation import evaluate_segmenter
from ctzoo.training.template_seg_task import (
    SegData,
    SegDataConfig,
    TemplateSegTask,
    TemplateSegTrainConfig,
    checkpoint_state,
)


def space_for(cfg: TemplateSegTrainConfig, num_classes: int) -> SearchSpace:
    """The default search space around ``cfg``'s template segmenter (its channels, 2-D slices)."""
    channels = cfg.model.channels
    return SearchSpace(base_channels=tuple(channels), strides=(2,) * (len(channels) - 1), num_classes=num_classes,
                       temperature=cfg.model.temperature)


class SuperNetTask(TemplateSegTask):
    """The template segmenter's task training a :class:`TemplateSuperNet`: each step one architecture drawn
    uniformly from ``space`` (default :func:`space_for`; reseeded per epoch, so a resumed run draws as an
    uninterrupted one); validation is the largest allowed architecture's Dice on the val cases."""

    name = "template_supernet"

    def __init__(self, cfg: TemplateSegTrainConfig, space: SearchSpace | None = None, data: SegData | None = None,
                 seed: int = 0) -> None:
        super().__init__(cfg, data)
        self.space = space or space_for(cfg, len(self.class_names))
        self.seed = seed
        self.rng = random.Random(seed)

    def build_model(self) -> nn.Module:
        return TemplateSuperNet(self.space)

    def before_epoch(self, model: nn.Module, device: torch.device, epoch: int) -> None:
        self.rng = random.Random(f"{self.seed}:{epoch}")

    def loss(self, model: nn.Module, batch: dict[str, Any], device: torch.device):
        arch = sample(self.space, self.rng)
        logits = model(batch["image"].to(device), batch["template"].to(device), arch)
        return self.loss_fn(logits.float(), batch["label"].to(device)), {}

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        return super().evaluate(extract(model, extreme(self.space, largest=True)), device)


@dataclass
class ValidationSet:
    """What candidates are scored on: labelled cases, their preprocessing, the training templates
    (images, masks, sources; :func:`~ctzoo.datasets.segmentation_slices.template_set`) and the class names."""

    cases: Sequence[SegCase]
    prep: SegPreprocessing
    templates: tuple[torch.Tensor, torch.Tensor, Sequence[str]]
    class_names: Sequence[str]


def scoring_split(data_cfg: SegDataConfig, data: SegData) -> str:
    """The split candidates are scored on: ``val`` when its cases are patients of their own (an MSD folder's
    split), so that the search never looks at the test cases; ``test`` for the TotalSegmentator sample (its val
    slab is a part of the training patient, so the other patient is the only unseen one) or an empty val split."""
    return "val" if data_cfg.source != "totalsegmentator" and data.cases["val"] else "test"


def recorded_training(iterations: Sequence[Mapping[str, Any]], checkpoint: Mapping[str, Any] | None) -> tuple[int, int]:
    """``(epochs, steps)`` of supernet training that the run's recorded ``iterations`` account for: what the next
    iteration trains on from. A checkpoint ahead of them is an interrupted iteration's training, which the next one
    takes over instead of training again. Iterations of a file written before they recorded ``epochs``: the
    checkpoint's own count (``(0, 0)`` without one)."""
    if all("epochs" in entry for entry in iterations):
        return sum(entry["epochs"] for entry in iterations), sum(entry["steps"] for entry in iterations)
    return (checkpoint["epoch"] + 1, checkpoint["step"]) if checkpoint else (0, 0)


def classes_in_truth(validation: ValidationSet) -> list[str]:
    """The classes present in the truth of ``validation``'s cases on the network's slice grid, where
    :func:`~ctzoo.training.seg_evaluation.evaluate_segmenter` scores them: a candidate's Dice is their mean."""
    present: set[int] = set()
    for case in validation.cases:
        _, geometry = resample_slices(case.image, validation.prep)
        present.update(torch.unique(labels_to_slices(case.labels, case.image, geometry)).tolist())
    return [name for label, name in enumerate(validation.class_names, 1) if label in present]


def require_scorable(validation: ValidationSet) -> None:
    """ValueError unless some class is present in ``validation``'s truth: without one every candidate's Dice is
    undefined, so a search could rank nothing."""
    if not classes_in_truth(validation):
        raise ValueError(f"none of the classes {', '.join(validation.class_names)} is in the labels of the cases "
                         f"candidates are scored on ({', '.join(c.name for c in validation.cases) or 'none'}): no "
                         "candidate could get a Dice; choose classes those cases label")


def evaluate_candidates(supernet: TemplateSuperNet, archs: Sequence[Architecture], validation: ValidationSet,
                        device: str | torch.device = "cpu", size: tuple[int, ...] | None = None,
                        **measure_options: Any) -> list[dict[str, Any]]:
    """Each architecture's extracted sub-network scored with the shared weights: mean Dice over the classes present
    (MONAI ``DiceMetric``, via :func:`~ctzoo.training.seg_evaluation.evaluate_segmenter`) and
    :func:`~ctzoo.nas.measure.measure`'s cost at ``size`` (default: the preprocessing's slice size). Returns the
    ``candidates.json`` entries without ``iteration``. ValueError when ``validation`` has nothing to score
    (:func:`require_scorable`)."""
    require_scorable(validation)
    size = tuple(size or validation.prep.size)
    results = []
    for arch in archs:
        net = extract(supernet, arch).eval()
        scores = evaluate_segmenter(net, validation.cases, validation.prep, validation.templates, device,
                                    validation.class_names, hd95=False, template_check=False)
        cost = measure(net.cpu(), size, device=str(device), **measure_options)
        results.append({"id": arch.id, "architecture": arch.to_json(), "description": arch.describe(),
                        "vector": arch.to_vector(), "dice": float(scores["dice_mean"]),
                        "latency_ms": cost["latency_ms"], "params": cost["params"], "flops": cost["flops"]})
    return results


#: Spaces of at most this many allowed architectures are enumerated to draw fresh ones: drawing from the whole
#: space and rejecting the scored ones could miss the few left unscored in a narrowed space.
ENUMERATED_SPACE = 4096


def fresh_architectures(space: SearchSpace, count: int, scored: Mapping[str, Architecture],
                        rng: random.Random) -> list[Architecture]:
    """Up to ``count`` distinct allowed architectures, drawn uniformly, that are not in ``scored`` (id ->
    architecture; it may hold some the constraints no longer allow). Fewer when the space has fewer left
    (:func:`~ctzoo.nas.space.count_unscored`)."""
    wanted = min(count, count_unscored(space, scored.values()))
    if count_architectures(space) <= ENUMERATED_SPACE:
        return rng.sample([arch for arch in enumerate_architectures(space) if arch.id not in scored], wanted)
    picked: dict[str, Architecture] = {}
    for _ in range(100 * max(count, 1)):  # bounded; in a space this large nearly every draw is unscored
        if len(picked) >= wanted:
            break
        arch = sample(space, rng)
        if arch.id not in scored:
            picked.setdefault(arch.id, arch)
    return list(picked.values())


def read_candidates(run: str | Path) -> dict[str, Any] | None:
    """``RUN/candidates.json`` as the search writes it (``schema``, ``space``, ``iterations``, ``candidates``),
    checked by the one reader of that file (:func:`ctzoo.nas.explorer.read_candidates`: ValueError naming what is
    wrong); None before the first iteration."""
    if not (Path(run) / CANDIDATES_FILE).exists():
        return None
    checked = read_run(run)
    return {"schema": SCHEMA, **{key: checked[key] for key in ("space", "iterations", "candidates")}}


def architecture_of(space: SearchSpace, model: TemplateSegModelConfig) -> Architecture:
    """The architecture of ``space`` that is the network ``model`` (a template-seg ``model:`` block) describes:
    the same channels, units, kernels, fused levels and gate (e.g. the shipped model's, to score it alongside the
    candidates). ValueError when the space cannot express it."""
    if len(model.channels) != space.num_levels:
        raise ValueError(f"the search space has {space.num_levels} levels, the model {len(model.channels)}")
    levels = []
    for k, channels in enumerate(model.channels):
        widths = [w for w in space.choices(f"level{k}.width") if space.channels(k, w) == channels]
        units = 2 if model.subunits is None else model.subunits[k]
        kernel = 3 if model.kernel_sizes is None else model.kernel_sizes[k]
        fused = model.fusion_levels is None or k in model.fusion_levels
        if not widths:
            raise ValueError(f"the search space cannot express {model.channels} channels (base "
                             f"{list(space.base_channels)}, widths {list(space.choices(f'level{k}.width'))})")
        levels.append(LevelChoice(widths[0], units, kernel, fused))
    arch = Architecture(tuple(levels), model.gate)
    space.check(arch)
    return arch


def architectures_to_score(space: SearchSpace, candidates: Sequence[dict[str, Any]], include: Sequence[Architecture],
                           count: int, rng: random.Random) -> tuple[list[Architecture], dict[str, Architecture]]:
    """An iteration's architectures: those of ``include`` not among the run's ``candidates`` (its
    ``candidates.json`` entries) and up to ``count`` fresh ones (:func:`fresh_architectures`); and the included
    ones by id. Empty when the space has nothing left to score. ValueError for an ``include`` outside the space's
    choices."""
    scored = {c["id"]: Architecture.from_json(c["architecture"]) for c in candidates}
    for arch in include:
        space.check(arch)
    extra = {arch.id: arch for arch in include if arch.id not in scored}
    return [*extra.values(), *fresh_architectures(space, count, scored | extra, rng)], extra


def load_supernet(checkpoint: str | Path, space: SearchSpace | None = None) -> TemplateSuperNet:
    """The supernet of a ``RUN/supernet/*.pt`` checkpoint (its recorded space unless ``space`` is given), eval."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    supernet = TemplateSuperNet(space or SearchSpace.from_json(state["space"]))
    supernet.load_state_dict(state["model"])
    return supernet.eval()


def search_iteration(cfg: TemplateSegTrainConfig, run: str | Path, epochs: int = 1, candidates: int = 8,
                     drop: Sequence[str] = (), lock: Sequence[str] = (), seed: int = 0, device: str = "auto",
                     data: SegData | None = None, progress: bool = False, include: Sequence[Architecture] = (),
                     **measure_options: Any) -> dict[str, Any]:
    """One analyst iteration in ``run`` (see the module docstring): constrain, train ``epochs`` more epochs of
    ``cfg.optim``, score ``candidates`` fresh architectures, update ``run/candidates.json``. ``include``: more
    architectures scored this iteration (those not scored before), e.g. a shipped model's (:func:`architecture_of`)
    so the explorer shows where it stands; ValueError for one outside the space's choices. Refused (ValueError)
    before any training, leaving the run as it was, when the scoring cases hold none of the classes
    (:func:`require_scorable`), the space has no architecture left to score, or ``cfg`` differs from the config
    the run's supernet was trained with (or scores on another split). Returns the file's new content."""
    run = Path(run)
    document = read_candidates(run) or {"schema": SCHEMA, "space": None, "iterations": [], "candidates": []}
    stored = SearchSpace.from_json(document["space"]) if document["space"] else None
    task = SuperNetTask(cfg, stored, data, seed)
    space = task.space = task.space.constrain(drop, lock)
    split = scoring_split(cfg.data, task.data)
    earlier = {entry.get("scored_on", "test") for entry in document["iterations"]}  # before the key: test
    if earlier - {split}:
        raise ValueError(f"{run}: its earlier iterations scored candidates on the {', '.join(sorted(earlier))} cases, "
                         f"this config's data would score them on {split}: their Dice would not compare; start a new "
                         "search elsewhere")
    validation = ValidationSet(task.data.cases[split], task.prep, task.templates, task.class_names)
    require_scorable(validation)
    iteration = len(document["iterations"])
    archs, extra = architectures_to_score(space, document["candidates"], include, candidates,
                                          random.Random(f"{seed}:candidates:{iteration}"))
    if not archs:  # refused before training: the run stays as it was
        raise ValueError(f"{run}: all {count_architectures(space):,} architectures its space allows have been "
                         "scored, none is left to search (constraints only narrow it): export one, or start a new "
                         "search elsewhere")
    last = run / "supernet" / "last.pt"
    before = torch.load(last, map_location="cpu", weights_only=False) if last.exists() else None
    done_epochs, done_steps = recorded_training(document["iterations"], before)
    optim = cfg.optim.model_copy(update={"epochs": done_epochs + epochs})
    state = {**checkpoint_state(cfg, task.class_names), "space": space.to_json()}
    if before is not None:  # another config is refused even when an interrupted iteration left nothing to train
        check_resume(last, resume_record(optim.model_dump(), state))
    if before is None or before["epoch"] + 1 < optim.epochs:
        fit(task, optim, run / "supernet", resume=before is not None, device=device, progress=progress,
            extra_state=state)
    after = torch.load(last, map_location="cpu", weights_only=False)
    supernet = TemplateSuperNet(space)
    supernet.load_state_dict(after["model"])
    scored = evaluate_candidates(supernet.eval(), archs, validation, device=pick_device(device),
                                 **measure_options)
    document["space"] = space.to_json()
    document["iterations"].append({"iteration": iteration, "constraints": {"drop": list(drop), "lock": list(lock)},
                                   "steps": after["step"] - done_steps, "epochs": after["epoch"] + 1 - done_epochs,
                                   "scored_on": split, "candidates": [c["id"] for c in scored]})
    document["candidates"] += [{"id": c["id"], "iteration": iteration, **{k: v for k, v in c.items() if k != "id"},
                                **({"reference": True} if c["id"] in extra else {})}
                               for c in scored]
    with atomic_path(run / CANDIDATES_FILE) as partial:
        partial.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return document
