"""A ``ctzoo train`` checkpoint as a model bundle, so that every path (export, infer, serve, PACS) takes it.

RECIST-Net checkpoints (``RUN/best.pt``) carry their ``train_config``; template-segmenter ones
(``RUN/template_seg/best.pt``) their ``task_config`` and class names, and need the template bank folder they are
to retrieve from (re-embedded here with the checkpoint's weights, since embeddings belong to the weights that
computed them). Runs started from a LEMON-expanded model record the expansion, and the bundle does too.
The card is honest about what the checkpoint is: no test-set evaluation, the last validation scores it holds.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ctzoo.models.checkpoint import CheckpointError, load_checkpoint
from ctzoo.models.pretrained import save_pretrained
from ctzoo.models.registry import ModelCard
from ctzoo.scaling.zoo_expand import checkpoint_network


@dataclass
class _Converted:
    model: nn.Module
    config: dict[str, Any]
    card: ModelCard
    bank: Any = None
    expansion: dict[str, Any] | None = None  # the run started from a LEMON-expanded model


def bundle_from_checkpoint(path: Path, out: Path, templates: Path | None = None) -> Path:
    """Write the bundle of checkpoint ``path`` into the folder ``out`` (replaced atomically) and return it."""
    converted = _convert(Path(path), templates)
    extra = converted.bank.save if converted.bank is not None else None
    return save_pretrained(converted.model, Path(out), converted.config, converted.card, extra=extra,
                           expansion=converted.expansion)


def _convert(path: Path, templates: Path | None) -> _Converted:
    state = load_checkpoint(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    epochs = int(state.get("epoch", -1)) + 1
    version = f"0.0.0+epoch{epochs}.{digest[:8]}"  # semver build metadata: which weights, not a release
    if "model_kind" in state:
        converted = _template_seg_checkpoint(path, state, version, epochs, templates)
    elif "train_config" in state:
        if templates is not None:
            raise CheckpointError("--templates is for template-segmenter checkpoints, not RECIST-Net ones")
        converted = _recistnet_checkpoint(path, state, version, epochs)
    else:
        raise CheckpointError(f"{path}: neither a RECIST-Net checkpoint (no 'train_config') nor a "
                              "template-segmenter one (no 'model_kind'): was it written by ctzoo train?")
    converted.expansion = state.get("expanded_from")
    return converted


def _load_state(model: nn.Module, state: dict[str, Any], path: Path) -> nn.Module:
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: the weights do not fit the model its train_config describes: "
                              f"{str(exc).splitlines()[0]}") from None
    return model.eval()


def _recistnet_checkpoint(path: Path, state: dict[str, Any], version: str, epochs: int) -> _Converted:
    from pydantic import ValidationError

    from ctzoo.datasets.deeplesion.dataset import SlicePreprocessing
    from ctzoo.models.recistnet import RecistNet
    from ctzoo.training.recistnet_task import RecistNetTrainConfig

    if isinstance(state["train_config"], dict) and state["train_config"].get("eval_split") == "test":
        raise CheckpointError(f"{path} was chosen on the test split (eval_split: test, which ctzoo train no longer "
                              "accepts): its scores are not validation scores; retrain with eval_split: val")
    try:
        cfg = RecistNetTrainConfig.model_validate(state["train_config"])
    except ValidationError as exc:
        raise CheckpointError(f"{path}: its train_config is not a RECIST-Net config: {exc}") from None
    prep = SlicePreprocessing(**{k: getattr(cfg.data, k) for k in SlicePreprocessing.model_fields})
    model_config = {"in_channels": prep.in_channels, **cfg.model.model_dump()}
    model = _load_state(checkpoint_network(state, lambda: RecistNet(**model_config)), state, path)
    spec = {**prep.model_dump(mode="json"), "size_multiple": 32}
    card = _checkpoint_card(path, state, "detection", version, epochs, model, "RecistNet", model_config, spec,
                            f"DeepLesion-format data at {cfg.data.root} (split train)")
    return _Converted(model, model_config, card)


def _template_seg_checkpoint(path: Path, state: dict[str, Any], version: str, epochs: int,
                             templates: Path | None) -> _Converted:
    from pydantic import ValidationError

    from ctzoo.models.template_bank import TemplateBank
    from ctzoo.training.template_seg_task import TemplateSegTrainConfig, build_seg_model

    if state["model_kind"] != "template_seg":
        raise CheckpointError(f"{path} holds a {state['model_kind']!r} model (the baseline); only the template "
                                "segmenter (RUN/template_seg/best.pt) and RECIST-Net export")
    try:
        cfg = TemplateSegTrainConfig.model_validate(state["task_config"])
    except (KeyError, ValidationError) as exc:
        raise CheckpointError(f"{path}: no usable task_config: {exc}") from None
    names = list(state.get("class_names") or [])
    if templates is None:
        raise CheckpointError(f"{path} is a template segmenter: give its template bank with --templates DIR (a "
                                "folder holding templates.safetensors and templates.json)")
    try:
        bank = TemplateBank.load(templates)
    except (FileNotFoundError, ValueError) as exc:
        raise CheckpointError(f"--templates: {exc}") from None
    if names and list(bank.class_names) != names:
        raise CheckpointError(f"the template bank's classes {bank.class_names} differ from the checkpoint's "
                                f"{names}")
    names = names or list(bank.class_names)
    model = _load_state(checkpoint_network(state, lambda: build_seg_model(cfg.model, len(names))), state, path)
    prep = cfg.data.preprocessing
    if tuple(bank.images.shape[2:]) != tuple(prep.size):
        raise CheckpointError(f"the template bank's slices are {tuple(bank.images.shape[2:])} pixels, the model's "
                                f"input is {tuple(prep.size)}")
    # Embeddings belong to the weights that computed them (see ctzoo.models.template_bank): re-embed the bank
    # with these weights, so that nearest-template retrieval means what it meant in training.
    bank = bank.embedded_by(model)
    spec = {**prep.model_dump(mode="json"), "classes": names}
    model_config = {"spatial_dims": 2, "in_channels": 1, "num_classes": len(names), **cfg.model.model_dump(mode="json")}
    model_config.pop("kind", None)
    card = _checkpoint_card(path, state, "segmentation", version, epochs, model, "TemplateSegNet", model_config, spec,
                            f"{cfg.data.source} slices; template bank from {templates}")
    return _Converted(model, model_config, card, bank)


def _run_folder(path: Path, task_folder: str | None = None) -> Path:
    """The run folder of a checkpoint: RUN/best.pt, or RUN/template_seg/best.pt for a template-segmenter run."""
    folder = path.resolve().parent
    return folder.parent if task_folder and folder.name == task_folder else folder



def _checkpoint_card(path: Path, state: dict[str, Any], task: str, version: str, epochs: int, model: nn.Module,
                     architecture: str, model_config: dict[str, Any], spec: dict[str, Any], data: str) -> ModelCard:
    """An honest card for weights that were never published: what the checkpoint itself records."""
    from ctzoo.models import Metric, TrainingInfo

    rows = [r for r in state.get("history") or [] if isinstance(r, dict)]
    scored = [r for r in rows if any(k.startswith("val_") for k in r)] or [{}]
    metrics = {key[4:]: Metric(value=float(value), split="val") for key, value in scored[-1].items()
               if key.startswith("val_") and isinstance(value, (int, float)) and np.isfinite(value)}
    run = _run_folder(path, "template_seg" if task == "segmentation" else None)
    try:  # written by ctzoo train beside the checkpoint when the run finished
        summary = json.loads((path.resolve().parent / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = {}
    wall = summary.get("wall_s", rows[-1].get("wall_s", 0.0) if rows else 0.0)
    return ModelCard(
        name=_card_name(run.name),
        version=version, task=task,
        description=f"Exported from the training checkpoint {path.resolve()} (epoch {epochs}); not a published "
                    "zoo model.",
        architecture=f"{architecture}({', '.join(f'{k}={v!r}' for k, v in model_config.items())})",
        parameters=sum(p.numel() for p in model.parameters()), input_spec=spec,
        training=TrainingInfo(data=data, config_file=str(run / "config.json"),
                              command="recorded in the run folder's config.json",
                              device=str(summary.get("device", "unknown")), epochs=max(epochs, 0),
                              wall_time_s=float(wall or 0.0)),
        metrics=metrics,
        limitations=["A training checkpoint, not a published zoo model: no test-set evaluation is recorded; the "
                     "metrics are the last validation scores the checkpoint holds.",
                     "Research use only; not a medical device."],
        licence="not stated (unpublished checkpoint)", created=datetime.date.today())


def _card_name(name: str) -> str:
    """A valid card name from a run folder's name (lower case, only letters, digits, '_', '-', '.')."""
    return re.sub(r"[^a-z0-9_.-]", "-", name.lower()).lstrip("_.-") or "checkpoint"
