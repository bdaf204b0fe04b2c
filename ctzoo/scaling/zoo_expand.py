"""``ctzoo expand`` for the zoo's architectures: load a source, expand it, check it, save a loadable checkpoint.

Sources: a zoo model name (``recistnet-mini``, ``template-seg-abdomen``) or a ``ctzoo train`` checkpoint
(RECIST-Net ``RUN/best.pt``; template segmenter ``RUN/template_seg/best.pt``; the same-budget UNet baseline
``RUN/unet/best.pt``). The expanded checkpoint (``OUT/expanded.pt``) records how to rebuild the source
architecture and the expansion (width multiplier, added depth, seed): :func:`load_expanded` rebuilds the source
network, re-applies the expansion to get the same module structure and loads the expanded weights. ``ctzoo train``
starts from it with ``init_from_expansion`` (:class:`ExpansionInit`).
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn

from ctzoo.config import StrictConfig
from ctzoo.io.atomic import atomic_path
from ctzoo.models.bundle import NETWORK_REBUILDERS
from ctzoo.models.checkpoint import load_checkpoint
from ctzoo.scaling.expand import ExpansionReport, compare_outputs, expand_model

__all__ = ["ExpansionInit", "SourceModel", "checkpoint_network", "expand_source", "expanded_model",
           "expansion_record", "lemon_optim", "load_expanded", "load_source_model"]

log = logging.getLogger(__name__)
FORMAT = "ctzoo-expanded/1"
#: LEMON holds the relative output difference of an expanded model to float rounding; we check 1e-5.
TOLERANCE = 1e-5
#: The expansion method, recorded with every expansion: 2 = circular copies with the readers' columns projected
#: and identity branches ending in their zeroed norm (method 1, before it, gave other structures and dead ReLUs).
#: The structure is rebuilt by expanding the source again, so a record of another method cannot be rebuilt.
EXPANSION_METHOD = 2


class ExpansionInit(StrictConfig):
    """``init_from_expansion`` in a ``ctzoo train`` config: start from an expanded checkpoint.

    LEMON's recipe for expanded models keeps the from-scratch peak learning rate and decays it faster: here the
    cosine decay ends after ``decay_fraction`` of the epochs (then the final rate is kept); the warm-up is the
    config's unless ``warmup_epochs`` says otherwise (LEMON's ViT runs keep theirs).
    """

    checkpoint: Path = Field(description="OUT/expanded.pt written by ctzoo expand")
    lemon_schedule: bool = Field(True, description="LEMON's schedule (else the config's own optim schedule)")
    decay_fraction: float = Field(0.6, gt=0, le=1, description="cosine decay ends at this fraction of the epochs")
    warmup_epochs: float | None = Field(None, ge=0, description="warm-up of the expanded model (default: the config's)")


def lemon_optim(optim, init: ExpansionInit | None):
    """The OptimConfig an expanded model trains with: ``optim`` itself, or LEMON's faster decay."""
    if init is None or not init.lemon_schedule:
        return optim
    warmup = optim.warmup_epochs if init.warmup_epochs is None else init.warmup_epochs
    return optim.model_copy(update={"decay_epochs": init.decay_fraction * optim.epochs, "warmup_epochs": warmup})


@dataclass
class SourceModel:
    """A model to expand, how to rebuild its architecture, and inputs to trace and check it with."""

    model: nn.Module
    architecture: dict[str, Any]  # {"builder": "zoo"|"recistnet"|"segmentation", ...}, see build_architecture
    example_inputs: tuple[torch.Tensor, ...]
    real_inputs: tuple[torch.Tensor, ...] | None
    description: str


def build_architecture(architecture: dict[str, Any]) -> nn.Module:
    """A freshly initialised network of the source architecture ``architecture`` describes."""
    builder = architecture["builder"]
    if builder == "bundle":  # a model bundle's own network definition (a user's bundle, or a zoo one)
        from ctzoo.models.bundle import NetworkDef, build_network

        return build_network(NetworkDef.model_validate(architecture["network"]))
    if builder == "zoo":
        from ctzoo.models import create_model

        return create_model(architecture["name"], pretrained=False)
    if builder == "recistnet":
        from ctzoo.models.recistnet import RecistNet

        return RecistNet(**architecture["kwargs"])
    if builder == "segmentation":
        from ctzoo.models.seg_networks import TemplateSegModelConfig, build_seg_model

        return build_seg_model(TemplateSegModelConfig(**architecture["model"]), architecture["num_classes"])
    raise ValueError(f"unknown architecture builder {builder!r}")


def _example_inputs(model: nn.Module, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Small random inputs the network accepts (two images, so batch statistics exist)."""
    from monai.networks.nets import UNet

    from ctzoo.models.recistnet import RecistNet
    from ctzoo.models.template_seg import TemplateSegNet

    if isinstance(model, RecistNet):
        in_channels = model.encoder.stem.conv.in_channels if model.backbone == "light" else \
            model.encoder.net.conv1.in_channels
        return (torch.randn(2, in_channels, 96, 96, generator=generator),)
    if isinstance(model, TemplateSegNet):
        size = 8 * model.size_divisor
        return (torch.randn(2, model.in_channels, size, size, generator=generator),
                torch.cat([torch.randn(1, model.in_channels, size, size, generator=generator),
                           (torch.rand(1, model.num_classes, size, size, generator=generator) > 0.7).float()], 1))
    if isinstance(model, UNet):
        size = 8 * 2 ** (len(model.channels) - 1)
        return (torch.randn(2, model.in_channels, size, size, generator=generator),)
    raise ValueError(f"no example inputs known for a {type(model).__name__}")


def _real_inputs(model: nn.Module, prep) -> tuple[torch.Tensor, ...] | None:
    """Slices of the embedded sample CT prepared as inference prepares them with ``prep`` (SlicePreprocessing
    or SegPreprocessing; None where none is known)."""
    if prep is None:
        return None
    from ctzoo.inference.sample_inputs import prepared_sample
    from ctzoo.models.recistnet import RecistNet
    from ctzoo.models.template_seg import TemplateSegNet

    if isinstance(model, RecistNet):
        return (prepared_sample("detection", prep)["image"],)
    from ctzoo.models.bundle import load_bundle

    # the zoo segmenter's bank supplies real templates (any labelled slice checks losslessness)
    zoo = load_bundle("template-seg-abdomen")
    inputs = prepared_sample("segmentation", prep, zoo.template_bank, zoo.network())
    if isinstance(model, TemplateSegNet):
        if model.num_classes != len(zoo.class_names):
            return None
        return inputs["image"], inputs["template"]
    return (inputs["image"],)


def load_source_model(source: str) -> SourceModel:
    """A zoo model name or a ``ctzoo train`` checkpoint, ready to expand."""
    from ctzoo.models import list_models, model_entry
    from ctzoo.models.bundle import load_bundle

    generator = torch.Generator().manual_seed(0)
    if source in list_models():
        if not model_entry(source).has_weights:
            raise ValueError(f"zoo model {source!r} ships no weights: nothing to expand")
        bundle = load_bundle(source)
        model = copy.deepcopy(bundle.network())
        return SourceModel(model, {"builder": "zoo", "name": source}, _example_inputs(model, generator),
                           _real_inputs(model, bundle.preprocessing), f"zoo model {source}")
    path = Path(source)
    if path.is_dir():  # a model bundle folder (ctzoo zoo publish --out, ctzoo export)
        bundle = load_bundle(path)
        model = copy.deepcopy(bundle.network())
        architecture = {"builder": "bundle", "network": bundle.network_def.model_dump(mode="json")}
        return SourceModel(model, architecture, _example_inputs(model, generator),
                           _real_inputs(model, bundle.preprocessing), f"bundle {path}")
    if not path.is_file():
        raise ValueError(f"{source}: neither a zoo model ({', '.join(list_models())}), a bundle folder nor a "
                         "checkpoint file")
    state = load_checkpoint(path)
    if "train_config" in state:  # the config as ctzoo train saved it (model_dump): read, not re-validated
        from ctzoo.datasets.deeplesion.dataset import SlicePreprocessing

        data, network = state["train_config"]["data"], state["train_config"]["model"]
        prep = SlicePreprocessing(**{k: data[k] for k in SlicePreprocessing.model_fields if k in data})
        architecture = {"builder": "recistnet", "kwargs": {"in_channels": prep.in_channels, **network}}
    elif "model_kind" in state:
        from ctzoo.datasets.seg_preprocessing import SegPreprocessing
        from ctzoo.models.seg_networks import TemplateSegModelConfig

        task_config = state["task_config"]
        network = TemplateSegModelConfig.model_validate(task_config.get("model", {}))
        model_config = {**network.model_dump(mode="json"), "kind": state["model_kind"]}
        architecture = {"builder": "segmentation", "model": model_config,
                        "num_classes": len(state["class_names"])}
        prep = SegPreprocessing.model_validate(task_config.get("data", {}).get("preprocessing", {}))
    else:
        raise ValueError(f"{path}: not a RECIST-Net or template-segmenter checkpoint of ctzoo train")
    if "expanded_from" in state:
        raise ValueError(f"{path} was trained from an expanded model; expand its source further instead "
                         "(expanding twice is not recorded)")
    model = build_architecture(architecture)
    model.load_state_dict(state["model"])
    model.eval()
    return SourceModel(model, architecture, _example_inputs(model, generator), _real_inputs(model, prep),
                       f"checkpoint {path}")


def expand_source(source: SourceModel, width_mult: float, depth_add: int, seed: int = 0
                  ) -> tuple[nn.Module, ExpansionReport, dict[str, tuple[float, float]]]:
    """Expand ``source`` and check it on random and (where available) real CT inputs: (model, report, checks).

    ``checks`` maps ``random``/``real_ct`` to (max absolute, max relative) output difference; the report holds
    the worst. Raises ``AssertionError`` above :data:`TOLERANCE` relative."""
    expanded, report = expand_model(source.model, source.example_inputs, width_mult, depth_add, seed)
    checks = {"random": compare_outputs(source.model, expanded, source.example_inputs)}
    if source.real_inputs is not None:
        checks["real_ct"] = compare_outputs(source.model, expanded, source.real_inputs)
    report.max_abs_diff = max(a for a, _ in checks.values())
    report.max_rel_diff = max(r for _, r in checks.values())
    if report.max_rel_diff > TOLERANCE:
        raise AssertionError(f"expansion is not lossless: relative output difference {report.max_rel_diff:.2e} > "
                             f"{TOLERANCE:.0e} ({checks})")
    return expanded, report, checks


def save_expanded(path: Path, source: SourceModel, expanded: nn.Module, report: ExpansionReport, seed: int,
                  checks: dict[str, tuple[float, float]]) -> None:
    payload = {"format": FORMAT, "source": source.description, "architecture": source.architecture,
               "expansion": {"width_mult": report.width_mult, "depth_add": report.depth_add, "seed": seed,
                             "method": EXPANSION_METHOD},
               "example_shapes": [list(t.shape) for t in source.example_inputs],
               "model": expanded.state_dict(), "report": report.as_dict(),
               "checks": {k: {"max_abs_diff": a, "max_rel_diff": r} for k, (a, r) in checks.items()}}
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)
    with atomic_path(path.with_suffix(".json")) as temporary:
        temporary.write_text(json.dumps({k: v for k, v in payload.items() if k != "model"}, indent=2))


def save_expanded_bundle(folder: Path, source_name: str, expanded: nn.Module, report: ExpansionReport, seed: int,
                         source: SourceModel) -> Path:
    """The expanded model as a model bundle in ``folder``, which every path runs (it computes what the source
    bundle ``source_name`` computes): the source's card, renamed ``<name>-expanded`` and saying so, and a
    ``bundle.json`` whose network is the source's expanded again."""
    from ctzoo.models.bundle import load_bundle
    from ctzoo.models.pretrained import save_pretrained

    bundle = load_bundle(source_name)
    card = bundle.card
    how = (f"LEMON-expanded from {card.name} {card.version}: width x{report.width_mult:g}, "
           f"{report.blocks_added} identity blocks added, seed {seed}; it computes the source's function "
           f"(max relative output difference {report.max_rel_diff:.1e}) and has not been trained further.")
    card = card.model_copy(update={"name": f"{card.name}-expanded", "description": f"{card.description} {how}",
                                   "parameters": sum(p.numel() for p in expanded.parameters()),
                                   "limitations": [how, *card.limitations]})
    record = {"kind": "lemon", "architecture": {"builder": "bundle",
                                                "network": bundle.network_def.model_dump(mode="json")},
              "expansion": {"width_mult": report.width_mult, "depth_add": report.depth_add, "seed": seed,
                             "method": EXPANSION_METHOD}}
    # the source's templates embedded by the expanded network: embeddings belong to the weights that computed them,
    # and a wider network embeds into more features than the source's bank holds
    bank = bundle.template_bank.embedded_by(expanded) if bundle.template_bank is not None else None
    extra = bank.save if bank is not None else None
    return save_pretrained(expanded, Path(folder), bundle.network_def.config, card, extra=extra, expansion=record)


def expanded_structure(record: dict[str, Any]) -> nn.Module:
    """The expanded network ``record`` (``{"architecture": ..., "expansion": ...}``) describes, with fresh
    weights: the source architecture rebuilt and expanded again (the expansion is deterministic)."""
    expansion = record["expansion"]
    if expansion.get("method") != EXPANSION_METHOD:
        raise ValueError(f"this model was expanded by an earlier ctzoo (expansion method {expansion.get('method', 1)}"
                         f", this ctzoo rebuilds method {EXPANSION_METHOD}): its weights do not fit the structure "
                         "rebuilt now; expand the source again with ctzoo expand")
    source = build_architecture(record["architecture"])
    model, _ = expand_model(source, _example_inputs(source, torch.Generator().manual_seed(0)),
                            expansion["width_mult"], expansion["depth_add"], expansion["seed"])
    return model


def load_expanded(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The expanded model of ``OUT/expanded.pt`` and its metadata (source, expansion, report)."""
    state = load_checkpoint(path)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path} is not an expanded checkpoint written by ctzoo expand")
    model = expanded_structure(state)
    model.load_state_dict(state["model"])
    return model, {k: v for k, v in state.items() if k != "model"}


def expansion_record(init: ExpansionInit | None) -> dict[str, Any]:
    """What a training checkpoint of an expanded model records so that it can be rebuilt without the expanded
    checkpoint (``fit(extra_state=...)``): ``{"expanded_from": {"architecture", "expansion"}}``, or nothing."""
    if init is None:
        return {}
    state = load_checkpoint(init.checkpoint)
    return {"expanded_from": {"architecture": state["architecture"], "expansion": state["expansion"]}}


def checkpoint_network(state: dict[str, Any], default: Callable[[], nn.Module]) -> nn.Module:
    """The network a training checkpoint's weights fit: the expanded structure for runs started with
    ``init_from_expansion``, else ``default()``. Weights are not loaded."""
    record = state.get("expanded_from")
    return expanded_structure(record) if record else default()


def expanded_model(init: ExpansionInit, expected: type) -> nn.Module:
    """The model a training run starts from with ``init_from_expansion``; it must be an ``expected``."""
    model, meta = load_expanded(init.checkpoint)
    if not isinstance(model, expected):
        raise ValueError(f"{init.checkpoint} holds an expanded {type(model).__name__}; this config trains a "
                         f"{expected.__name__}")
    report = meta["report"]
    log.info("starting from %s: %s expanded x%s width, +%d blocks, %d -> %d parameters", init.checkpoint,
             meta["source"], report["width_mult"], report["blocks_added"], report["parameters_before"],
             report["parameters_after"])
    return model


NETWORK_REBUILDERS["lemon"] = expanded_structure  # bundles of expanded networks rebuild through LEMON
