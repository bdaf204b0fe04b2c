"""The template segmenter (and its same-budget MONAI UNet baseline) on labelled CT: config, task, evaluation,
and the side-by-side run (``configs/template_seg_*.yaml``).

Data: the TotalSegmentator sample volumes (train on ``example_ct_sm`` minus its superior ``val_slices`` slab,
validate on that slab, test on the embedded DICOM sample, another patient; ``data.train_patient: sample_ct_dicom``
swaps the two patients, the val slab still coming from the training patient, as there is no third labelled one)
or any Medical Segmentation Decathlon folder (split by case order). Templates always come from the training
slices only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from pydantic import Field, model_validator
from torch import nn

from ctzoo.config import StrictConfig, field_differences, load_config, recorded_fields
from ctzoo.datasets.seg_preprocessing import SegPreprocessing
from ctzoo.datasets.segmentation import (
    ABDOMEN_CLASSES,
    SegCase,
    msd_cases,
    read_msd_index,
    split_slab,
    totalsegmentator_cases,
)
from ctzoo.datasets.segmentation_slices import (
    SegAugmentConfig,
    case_to_slices,
    template_set,
    template_slice_dataset,
)
from ctzoo.io.atomic import atomic_path
from ctzoo.models.bundle import read_weights
from ctzoo.models.checkpoint import load_checkpoint
from ctzoo.models.seg_networks import TemplateSegModelConfig, build_seg_model  # noqa: F401  (config API)
from ctzoo.models.template_seg import TemplateSegNet, count_parameters
from ctzoo.scaling.compress import CompressionConfig
from ctzoo.scaling.placement.graph import Plan
from ctzoo.scaling.zoo_expand import (
    ExpansionInit,
    checkpoint_network,
    expanded_model,
    expansion_record,
    lemon_optim,
)
from ctzoo.training import resume_check
from ctzoo.training.engine import OptimConfig, fit, pick_device
from ctzoo.training.epoch_loader import EpochLoader, KeptLoader
from ctzoo.training.seg_evaluation import (
    CONDITIONS,
    Condition,
    comparison_markdown,
    evaluate_conditions,
    evaluate_segmenter,
    middle_slice_overlay,
)

log = logging.getLogger(__name__)


class SegDataConfig(SegPreprocessing):
    """Which labelled CT to use, which classes, and how to preprocess it (the :class:`SegPreprocessing` fields)."""

    source: Literal["totalsegmentator", "msd"] = "totalsegmentator"
    root: Path | None = Field(None, description="msd: the folder holding dataset.json")
    classes: dict[str, tuple[str, ...]] | Literal["abdomen"] | None = Field(
        None, description="class name -> source label-name patterns (fnmatch); 'abdomen': liver, spleen, "
                          "stomach, aorta, vertebrae; null: abdomen for totalsegmentator, every label for msd")
    train_patient: Literal["example_ct_sm", "sample_ct_dicom"] = Field(
        "example_ct_sm", description="totalsegmentator: the labelled patient trained on (minus its val slab); the "
                                     "other one is the test patient")
    val_slices: int = Field(8, ge=1, description="totalsegmentator: superior slab of the training volume "
                                                 "held out for validation (never trained on)")
    val_fraction: float = Field(0.2, ge=0, lt=1, description="msd: share of cases for validation (> 0: best.pt is "
                                                              "chosen on them; at least one case)")
    test_fraction: float = Field(0.2, ge=0, lt=1, description="msd: share of cases for testing (> 0: a run ends by "
                                                               "testing; at least one case)")
    max_templates: int = Field(64, ge=1, description="template bank size (evenly thinned candidates)")

    @model_validator(mode="after")
    def _train_patient_is_totalsegmentator(self) -> SegDataConfig:
        # by value, not by the fields set: a checkpoint's dumped msd task_config carries the default and must load
        if self.source != "totalsegmentator" and self.train_patient != "example_ct_sm":
            raise ValueError("data.train_patient names a TotalSegmentator sample patient; msd splits by case order")
        return self

    @model_validator(mode="after")
    def _every_split_has_cases(self) -> SegDataConfig:
        # rejected here, not handled later: with no val case training never writes best.pt (val Dice nan), with no
        # test case the run has nothing to compare the models on, after all the training
        for split, why in (("val", "best.pt is chosen on the val cases"),
                           ("test", "a run ends by testing its models on the test cases")):
            if self.source == "msd" and getattr(self, f"{split}_fraction") == 0:
                raise ValueError(f"data.{split}_fraction must be > 0 (at least one case): {why}")
        return self

    @property
    def preprocessing(self) -> SegPreprocessing:
        return SegPreprocessing(**{k: getattr(self, k) for k in SegPreprocessing.model_fields})


class TemplateSegTrainConfig(StrictConfig):
    """``configs/template_seg_*.yaml``."""

    task: Literal["template_seg"] = "template_seg"
    data: SegDataConfig = SegDataConfig()
    model: TemplateSegModelConfig = TemplateSegModelConfig()
    optim: OptimConfig = OptimConfig()
    augment: SegAugmentConfig = SegAugmentConfig()
    repeats: int = Field(4, ge=1, description="passes over the training slices per epoch")
    eval_batch_size: int = Field(16, ge=1)
    baseline_unet: bool = Field(True, description="train_with_baseline: also train the same-budget UNet")
    init_from_expansion: ExpansionInit | None = Field(
        None, description="start the model of the expanded checkpoint's kind (template_seg or unet) from it (LEMON)")
    distributed: CompressionConfig = Field(default_factory=CompressionConfig,
                                           description="gradient exchange under torchrun (CSER, two-way, PowerSGD)")
    placement: Path | None = Field(None, description="plan.json of ctzoo place for the template segmenter: train it "
                                                     "spread over this machine's devices (the UNet baseline is not "
                                                     "placed; not with torchrun)")
    init_weights: Path | None = Field(None, description="start the template segmenter from the weights in this "
                                                        "folder's model.safetensors (a bundle, or a state dict of "
                                                        "exactly model's network, e.g. cut out of a search supernet)")


def expansion_kind(cfg: TemplateSegTrainConfig) -> str | None:
    """The model kind (template_seg | unet) of ``cfg.init_from_expansion``'s checkpoint, or None."""
    if cfg.init_from_expansion is None:
        return None
    meta = load_checkpoint(cfg.init_from_expansion.checkpoint)
    architecture = meta.get("architecture", {}) if isinstance(meta, dict) else {}
    if architecture.get("builder") == "segmentation":
        return architecture["model"]["kind"]
    if architecture.get("builder") == "zoo":
        return "template_seg"
    raise ValueError(f"{cfg.init_from_expansion.checkpoint}: not an expanded segmentation model")


def load_seg_config(path: str | Path, data_root: str | Path | None = None) -> TemplateSegTrainConfig:
    """Read a template-segmenter config; ``data_root`` replaces ``data.root``."""
    cfg = load_config(path, TemplateSegTrainConfig)
    if data_root is not None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": Path(data_root)})})
    return cfg


@dataclass
class SegData:
    """Cases per split (``train``, ``val``, ``test``) and the class names (label ``c`` = ``class_names[c - 1]``)."""

    cases: dict[str, list[SegCase]]
    class_names: list[str]


def seg_classes(data: SegDataConfig) -> dict[str, tuple[str, ...]]:
    """Class name -> source label-name patterns of ``data``, without reading any volume."""
    classes = ABDOMEN_CLASSES if data.classes == "abdomen" else data.classes
    if data.source == "totalsegmentator":
        return classes or ABDOMEN_CLASSES
    if data.root is None:
        raise ValueError("data.root must name the MSD folder (the one holding dataset.json)")
    if classes is None:
        names, _ = read_msd_index(data.root)
        classes = {names[i]: (names[i],) for i in sorted(names) if i != 0}
    return classes


def load_seg_data(data: SegDataConfig) -> SegData:
    """The cases and classes ``data`` describes (see the module docstring for the splits)."""
    classes = seg_classes(data)
    if data.source == "totalsegmentator":
        patients = {case.name: case for cases in totalsegmentator_cases(classes).values() for case in cases}
        rest, slab = split_slab(patients.pop(data.train_patient), data.val_slices, "superior")
        return SegData({"train": [rest], "val": [slab], "test": list(patients.values())}, list(classes))
    return SegData(msd_cases(data.root, classes, data.val_fraction, data.test_fraction), list(classes))


def build_seg_network(cfg: TemplateSegTrainConfig, num_classes: int) -> nn.Module:
    """The network ``cfg`` trains: ``cfg.model``'s (the template segmenter from ``cfg.init_weights`` when set), or
    the expanded one of ``init_from_expansion`` when that holds a model of the same kind."""
    if expansion_kind(cfg) == cfg.model.kind:
        return expanded_model(cfg.init_from_expansion, TemplateSegNet if cfg.model.kind == "template_seg" else UNet)
    model = build_seg_model(cfg.model, num_classes)
    if cfg.init_weights is not None and cfg.model.kind == "template_seg":
        try:
            model.load_state_dict(read_weights(cfg.init_weights))
        except RuntimeError as error:
            raise ValueError(f"init_weights {cfg.init_weights} do not fit the network of model: {error}") from None
    return model


def example_slices(cfg: TemplateSegTrainConfig, num_classes: int, batch_size: int) -> tuple[torch.Tensor, ...]:
    """Random inputs shaped as ``cfg`` feeds its network, for tracing and profiling: image ``(B, 1, H, W)`` and,
    for the template segmenter, template ``(B, 1 + C, H, W)`` (an image and binary class masks)."""
    size = tuple(cfg.data.size)
    image = torch.randn(batch_size, 1, *size)
    if cfg.model.kind != "template_seg":
        return (image,)
    masks = (torch.rand(batch_size, num_classes, *size) > 0.7).float()
    return image, torch.cat([torch.randn(batch_size, 1, *size), masks], dim=1)


class TemplateSegTask:
    """The :class:`ctzoo.training.engine.Task` for the template segmenter and the UNet baseline.

    Training items: augmented 2-D slices of the training cases, each with a random template (another training
    slice); validation: Dice per class on the val cases (``primary_metric`` dice_mean).
    """

    name = "template_seg"
    primary_metric = "dice_mean"

    def __init__(self, cfg: TemplateSegTrainConfig, data: SegData | None = None) -> None:
        self.cfg = cfg
        self.data = data or load_seg_data(cfg.data)
        self.prep = cfg.data.preprocessing
        self.class_names = self.data.class_names
        train = [case_to_slices(c, self.prep) for c in self.data.cases["train"]]
        self.train_set = template_slice_dataset(train, len(self.class_names), self.prep, cfg.augment, cfg.repeats)
        self.templates = template_set(train, len(self.class_names), cfg.data.max_templates)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self.loader = KeptLoader()

    def build_model(self) -> nn.Module:
        return build_seg_network(self.cfg, len(self.class_names))

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        return example_slices(self.cfg, len(self.class_names), batch_size)

    def train_batches(self, epoch_seed: int, batch_size: int, num_workers: int, rank: int, world_size: int):
        """This epoch's batches, from one loader kept for the run (its workers start once)."""
        return self.loader.epoch(
            epoch_seed, (batch_size, num_workers, rank, world_size),
            lambda: EpochLoader(self.train_set, batch_size, num_workers, rank=rank, world_size=world_size,
                                drop_last=len(self.train_set) >= batch_size * world_size))  # no 1-slice tail

    def close(self) -> None:
        """Stop the training loader's workers (``fit`` calls this when it is done)."""
        self.loader.close()

    def loss(self, model: nn.Module, batch: dict[str, Any], device: torch.device):
        image, label = batch["image"].to(device), batch["label"].to(device)
        template_model = isinstance(getattr(model, "module", model), TemplateSegNet)  # DDP wraps it
        logits = model(image, batch["template"].to(device)) if template_model else model(image)
        return self.loss_fn(logits.float(), label), {}

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        result = evaluate_segmenter(model, self.data.cases["val"], self.prep, self.templates, device,
                                    self.class_names, hd95=False, batch_size=self.cfg.eval_batch_size,
                                    template_check=False)  # every epoch: half the time, same best.pt
        return {k: v for k, v in result.items() if k.startswith("dice_")}


def seg_data_record(data: SegDataConfig) -> dict[str, dict[str, str]]:
    """What a checkpoint records of the MSD folder it trained on: a digest (SHA-256) of its ``dataset.json`` (the
    cases and their order, which the split follows), so that the same data may be read from another ``data.root``
    (``--data-root``, ``--resume``) but no other data (:mod:`ctzoo.training.resume_check`). Empty for the
    TotalSegmentator samples (always the same) and where the file cannot be read (loading the data says why)."""
    if data.source != "msd" or data.root is None:
        return {}
    try:
        digest = hashlib.sha256((Path(data.root) / "dataset.json").read_bytes()).hexdigest()[:16]
    except OSError:
        return {}
    return {resume_check.DATA_FILES: {"dataset.json": digest}}


def checkpoint_state(cfg: TemplateSegTrainConfig, class_names: list[str]) -> dict[str, Any]:
    """``fit(..., extra_state=...)``: what a checkpoint needs beyond the engine's payload to be rebuilt
    (:func:`load_seg_model` reads ``model_kind``), and what it was trained on (:func:`check_trained_data`)."""
    state = {"model_kind": cfg.model.kind, "class_names": class_names, "task_config": cfg.model_dump(mode="json"),
             **seg_data_record(cfg.data)}
    return state | (expansion_record(cfg.init_from_expansion) if expansion_kind(cfg) == cfg.model.kind else {})


#: Per source, the data fields that choose each split's cases and what each label means. A checkpoint is scored and
#: published only with its own: its template bank is cut from its training cases, its test cases must be ones it
#: never trained on, and its output channel ``c`` means its own ``c``-th class.
SPLIT_FIELDS = {"totalsegmentator": ("source", "classes", "train_patient", "val_slices"),
                "msd": ("source", "root", "classes", "val_fraction", "test_fraction")}


def _split_record(data: Mapping[str, Any], source: str, class_names: list[str]) -> dict[str, Any]:
    """The :data:`SPLIT_FIELDS` of ``source`` that a dumped data config holds, its ``classes`` spelt out as the
    mapping it stands for (``null`` and ``abdomen`` are the classes they name), so that equal classes compare equal."""
    record = {k: data[k] for k in SPLIT_FIELDS[source] if k in data}
    if "classes" in record:
        classes = record["classes"]
        if classes == "abdomen" or (classes is None and source == "totalsegmentator"):
            classes = ABDOMEN_CLASSES
        record["classes"] = {name: [name] for name in class_names} if classes is None else classes  # msd: each label
    return record


def check_trained_data(cfg: TemplateSegTrainConfig, checkpoint: str | Path, class_names: list[str]) -> None:
    """Refuse (``ValueError``, one line) to score or publish ``checkpoint`` with data or classes (``class_names``,
    the data's) other than it was trained on: the comparison of ``--resume``
    (:func:`ctzoo.training.resume_check.config_changes`) over :data:`SPLIT_FIELDS` and the class names. Another
    ``data.root`` holding the same ``dataset.json`` is the same data (:func:`seg_data_record`)."""
    state, source = load_checkpoint(checkpoint), cfg.data.source
    recorded = state.get("task_config", {}).get("data")
    saved = state | ({"task_config": {"data": _split_record(recorded, source, state.get("class_names", []))}}
                     if recorded is not None else {})
    current = {"task_config": {"data": _split_record(cfg.data.model_dump(mode="json"), source, class_names)},
               "class_names": list(class_names), **seg_data_record(cfg.data)}
    if changes := resume_check.config_changes(saved, current):
        raise ValueError(f"{checkpoint} was trained on other data or classes than the config gives "
                         f"({'; '.join(changes)}): give the run's own config (RUN/config.json)")


def trained_model_config(cfg: TemplateSegTrainConfig, checkpoint: str | Path,
                         warn: bool = True) -> TemplateSegModelConfig:
    """The ``model`` config the network of ``checkpoint`` was trained as: its recorded ``task_config``'s (kind:
    its ``model_kind``), each field it does not record from ``cfg``. Where ``cfg`` says otherwise (``warn``) a
    warning names what differs: ``gate`` and ``temperature`` hold no weights, so loading the state dict into a
    network built from another config would succeed and score another model without a word."""
    state = load_checkpoint(checkpoint)
    recorded = state.get("task_config", {}).get("model", {})
    own = recorded_fields(TemplateSegModelConfig, recorded, cfg.model)
    own = own.model_copy(update={"kind": state.get("model_kind", own.kind)})
    given = cfg.model.model_copy(update={"kind": own.kind})  # the recorded kind always won: not worth a warning
    if warn and (differences := field_differences(given, own)):
        log.warning("%s: building the checkpoint's own network, not the config's model: %s", checkpoint, differences)
    return own


def load_seg_model(cfg: TemplateSegTrainConfig, checkpoint: str | Path, num_classes: int) -> nn.Module:
    """The model of ``checkpoint`` as it was trained (:func:`trained_model_config`: its recorded model config wins
    over ``cfg.model``, with a warning), weights loaded, eval mode. ``ValueError`` where it was trained for another
    number of classes than ``num_classes``, or its weights do not fit the network."""
    model_cfg = trained_model_config(cfg, checkpoint)
    state = load_checkpoint(checkpoint)
    trained = state.get("class_names")
    if trained is not None and len(trained) != num_classes:
        raise ValueError(f"{checkpoint} was trained for {len(trained)} classes {list(trained)}, not {num_classes}")
    model = checkpoint_network(state, lambda: build_seg_model(model_cfg, num_classes))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:  # an older checkpoint without class names, or another network
        raise ValueError(f"{checkpoint}: its weights do not fit the network it records "
                         f"({str(error).splitlines()[0]})") from None
    return model.eval()


def trained_preprocessing(cfg: TemplateSegTrainConfig, checkpoint: str | Path) -> SegPreprocessing:
    """The preprocessing the model of ``checkpoint`` was trained with: its recorded ``task_config``'s, each field it
    does not record from ``cfg``. Where ``cfg`` says otherwise a warning names what differs: a model scored (or
    published) on slices of another spacing, size or window than it learnt from would lose its Dice without a word.
    """
    state = load_checkpoint(checkpoint)
    recorded = state.get("task_config", {}).get("data", {})
    own = recorded_fields(SegPreprocessing, recorded, cfg.data.preprocessing)
    if differences := field_differences(cfg.data.preprocessing, own):
        log.warning("%s: using the checkpoint's own preprocessing, not the config's: %s", checkpoint, differences)
    return own


def _write_json(document: dict[str, Any], path: Path) -> None:
    with atomic_path(path) as partial:  # json has no NaN: write null
        partial.write_text(json.dumps(_jsonable(document), indent=2) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def evaluate_template_seg(cfg: TemplateSegTrainConfig, out: str | Path, split: Literal["val", "test"] = "test",
                          checkpoint: str | Path | None = None, device: str = "auto",
                          data: SegData | None = None) -> dict[str, Any]:
    """Dice/HD95 per class of a checkpoint on ``split``; writes ``out/metrics.json`` and ``out/overlay.png``
    (the middle slice of the first case: predicted contours solid, true dashed). Returns the metrics.

    The slices (and the template bank) are prepared as the model was trained: the checkpoint's preprocessing
    (:func:`trained_preprocessing`, with a warning where ``cfg`` differs), which ``metrics.json`` records; ``cfg``
    gives the data, classes, template count and batch size: the data and classes the checkpoint was trained on
    (:func:`check_trained_data`), or ``ValueError``."""
    if checkpoint is None:
        raise ValueError("a checkpoint is needed (e.g. RUN/template_seg/best.pt)")
    out, dev = Path(out), pick_device(device)
    data = data or load_seg_data(cfg.data)
    check_trained_data(cfg, checkpoint, data.class_names)
    prep, names = trained_preprocessing(cfg, checkpoint), data.class_names
    templates = template_set([case_to_slices(c, prep) for c in data.cases["train"]], len(names),
                             cfg.data.max_templates)
    model = load_seg_model(cfg, checkpoint, len(names))
    metrics = evaluate_segmenter(model, data.cases[split], prep, templates, dev, names,
                                 batch_size=cfg.eval_batch_size)
    metrics = {"split": split, "checkpoint": str(checkpoint), "model": type(model).__name__,
               "parameters": count_parameters(model), "preprocessing": prep.model_dump(mode="json"), **metrics}
    _write_json(metrics, out / "metrics.json")
    middle_slice_overlay({type(model).__name__: (model, False)}, data.cases[split][0], prep, templates, names, dev,
                         out / "overlay.png")
    return metrics


def _kinds(cfg: TemplateSegTrainConfig) -> dict[str, TemplateSegTrainConfig]:
    """The models a run trains, each with its config: the template segmenter, then the UNet baseline."""
    kinds = ["template_seg"] + (["unet"] if cfg.baseline_unet else [])
    return {kind: cfg.model_copy(update={"model": cfg.model.model_copy(update={"kind": kind})}) for kind in kinds}


def check_resume(cfg: TemplateSegTrainConfig, out: str | Path) -> None:
    """Refuse (``ValueError``) to resume the models of ``out`` that have a ``last.pt`` with a config other than
    their own (:mod:`ctzoo.training.resume_check`; ``fit`` checks the rest of its records, the class names,
    once the data is read)."""
    for kind, run_cfg in _kinds(cfg).items():
        if (Path(out) / kind / "last.pt").exists():
            record = {"task_config": run_cfg.model_dump(mode="json"), "model_kind": kind}
            resume_check.check_resume(Path(out) / kind / "last.pt", record)


def train_with_baseline(cfg: TemplateSegTrainConfig, out: str | Path, device: str = "auto",
                        progress: bool = True, resume: bool = False,
                        conditions: Mapping[str, Condition] = CONDITIONS) -> dict[str, Any]:
    """Train the template segmenter into ``out/template_seg`` and (``cfg.baseline_unet``) the same-budget MONAI
    UNet into ``out/unet`` — identical data, augmentation, optimiser, epochs and seeds — then test both (best
    validation checkpoint) and the "template copy" baseline (the nearest training template's masks, no network)
    under every robustness condition (:data:`ctzoo.training.seg_evaluation.CONDITIONS`).

    Writes ``out/comparison.json``, ``out/comparison.md`` and ``out/overlay.png``; returns the comparison.
    ``cfg.model.kind`` is ignored: the first model is always the template segmenter. ``resume`` continues each
    model from its ``last.pt`` where one exists (a model not started yet starts afresh). ``conditions``: the
    robustness conditions tested (``clean`` must be among them: it is what a published card reports).
    """
    out, dev = Path(out), pick_device(device)
    plan = Plan.load(cfg.placement) if cfg.placement is not None else None
    data = load_seg_data(cfg.data)
    models, training = {}, {}
    for kind, run_cfg in _kinds(cfg).items():
        task = TemplateSegTask(run_cfg, data)
        optim = lemon_optim(cfg.optim, cfg.init_from_expansion) if expansion_kind(cfg) == kind else cfg.optim
        summary = fit(task, optim, out / kind, resume=resume and (out / kind / "last.pt").exists(),
                      device=device, progress=progress, extra_state=checkpoint_state(run_cfg, data.class_names),
                      compression=cfg.distributed, placement=plan if kind == "template_seg" else None)
        best = out / kind / "best.pt"
        models[kind] = load_seg_model(run_cfg, best if best.exists() else out / kind / "last.pt",
                                      len(data.class_names))
        training[kind] = {**summary, "parameters": count_parameters(models[kind])}
        templates = task.templates  # the same training slices for every kind
    prep, names, test = cfg.data.preprocessing, data.class_names, data.cases["test"]
    contenders = {"template_seg": (models["template_seg"], False), "template copy": (models["template_seg"], True)}
    if "unet" in models:
        contenders["unet"] = (models["unet"], False)
    rows, results = [], {}
    for name, (model, copy_template) in contenders.items():
        results[name] = evaluate_conditions(model, test, prep, templates, dev, names, copy_template, conditions)
        parameters = 0 if copy_template else count_parameters(model)
        rows += [{"model": name, "condition": condition, "parameters": parameters,
                  **{k: v for k, v in metrics.items() if k not in ("cases", "notes")}}
                 for condition, metrics in results[name].items()]
    comparison = {"test_cases": [c.name for c in test], "class_names": names,
                  "conditions": {k: c.description for k, c in conditions.items()},
                  "training": training, "rows": rows, "details": results}
    _write_json(comparison, out / "comparison.json")
    table = comparison_markdown(rows, names, conditions)
    wall = ", ".join(f"{k} {v['wall_s']:.0f} s ({v['epochs']} epochs)" for k, v in training.items())
    with atomic_path(out / "comparison.md") as partial:
        partial.write_text(f"# Template segmenter vs same-budget UNet\n\nTest: {', '.join(c.name for c in test)}; "
                           f"Dice and HD95 (mm) per class on the {prep.spacing_mm:g} mm slice grid. "
                           f"Training wall time: {wall} on {dev}.\n\n{table}")
    middle_slice_overlay(contenders, test[0], prep, templates, names, dev, out / "overlay.png")
    return comparison
