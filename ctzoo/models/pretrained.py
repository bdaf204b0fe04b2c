"""Zoo models by name, timm-style: ``create_model(name, pretrained=True)`` builds a registered model and loads the
weights shipped with it; ``save_pretrained`` publishes weights as a model bundle (:mod:`ctzoo.models.bundle`)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from ctzoo.io.atomic import replace_folder
from ctzoo.models.bundle import (
    ARCHITECTURES,
    BUNDLE_FILE,
    NetworkDef,
    bundle_file_text,
    file_digests,
    read_card,
    read_weights,
)
from ctzoo.models.registry import (
    _REGISTRY,
    CARD_JSON,
    CARD_MD,
    CONFIG_FILE,
    WEIGHTS_FILE,
    ArchitectureOverrideError,
    ModelCard,
    ModelEntry,
    WeightsMismatchError,
    _as_json,
    _state_mismatch,
    model_entry,
)


def create_model(name: str, pretrained: bool = False, allow_overrides: bool = False, **overrides: Any) -> nn.Module:
    """Build a registered model from its default config updated by ``overrides``.

    With ``pretrained=True`` the model is built from the shipped ``config.json`` (the config the weights
    were trained with) and loads ``model.safetensors`` with a strict key match. An override that differs from that
    config is refused (:class:`ArchitectureOverrideError`): even one that keeps every weight's shape (a gate, a
    temperature) makes the network compute something its weights were not trained for. ``allow_overrides=True``
    loads the weights into the changed network anyway (fine-tuning it, say); overrides that change the
    architecture are refused still, as the weights cannot load. The module is returned in training mode, as torch
    builds it: call ``.eval()``.
    """
    entry = model_entry(name)
    if not pretrained:
        return entry.builder(**{**entry.default_config, **overrides})
    weights, config_path = entry.weights_dir / WEIGHTS_FILE, entry.weights_dir / CONFIG_FILE
    if not (weights.is_file() and config_path.is_file()):
        raise FileNotFoundError(f"no weights are shipped for {name!r} yet ({WEIGHTS_FILE} and {CONFIG_FILE} are "
                                f"expected in {entry.weights_dir}); use pretrained=False, or publish them with "
                                "save_pretrained()")
    trained = json.loads(config_path.read_text(encoding="utf-8"))
    before = {**entry.default_config, **trained}
    changed = {k: v for k, v in overrides.items() if _as_json(v) != _as_json(before.get(k))}
    model = entry.builder(**{**before, **overrides})
    state = read_weights(entry.weights_dir)
    problems = _state_mismatch(model.state_dict(), state)
    if problems and changed:
        raise ArchitectureOverrideError(
            f"overrides {changed} change the architecture of {name!r} from the config its weights were trained "
            f"with ({config_path}), so they cannot be loaded ({problems}). Drop those overrides, or use "
            "pretrained=False to train the changed model.")
    if problems:
        raise WeightsMismatchError(f"{weights} does not fit {name!r} built from {config_path}: {problems}")
    if changed and not allow_overrides:
        shipped = {k: before.get(k) for k in changed}
        raise ArchitectureOverrideError(
            f"overrides {changed} differ from the config the weights of {name!r} were trained with ({shipped} in "
            f"{config_path}): the network would compute something those weights were not trained for. Drop them, "
            "pass allow_overrides=True to load the weights into the changed network anyway, or use pretrained=False.")
    model.load_state_dict(state, strict=True)
    return model


# ------------------------------------------------------------------------------------------ writing


def _check_config_rebuilds(entry: ModelEntry, config: Mapping[str, Any], model: nn.Module) -> None:
    """Refuse to publish weights that ``create_model(pretrained=True)`` could not load back."""
    try:
        with torch.device("meta"):  # shapes only: no memory and no initialisation cost
            reference = entry.builder(**{**entry.default_config, **config})
    except Exception:  # a builder that computes on tensor values cannot run on meta: build it for real
        reference = entry.builder(**{**entry.default_config, **config})
    problems = _state_mismatch(reference.state_dict(), model.state_dict())
    if problems:
        raise ValueError(f"config does not rebuild the model being published as {entry.name!r}: {problems}")


def save_pretrained(model: nn.Module, name_or_dir: str | os.PathLike[str], config: Mapping[str, Any],
                    card: ModelCard, extra: Callable[[Path], Any] | None = None,
                    expansion: dict[str, Any] | None = None) -> Path:
    """Publish ``model`` with its constructor ``config`` and ``card``; returns the folder written.

    ``name_or_dir`` is a registered name (its ``weights_dir``) or any folder (pass a Path to be explicit).
    ``bundle.json`` records the network and the sha256 of the weights and of a template bank
    (:data:`ctzoo.models.bundle.DIGESTED_FILES`), which loading checks. The files (and whatever ``extra(folder)``
    writes, e.g. a template bank) are written into a temporary folder beside the target and renamed into place,
    so readers see the old weights or the new ones, never a mixture or a half-written file.
    """
    entry = _REGISTRY.get(name_or_dir) if isinstance(name_or_dir, str) else None
    if entry is not None and card.name != entry.name:
        raise ValueError(f"card is for {card.name!r} but the weights are being published as {entry.name!r}")
    if card.name in _REGISTRY and card.task != _REGISTRY[card.name].task:
        raise ValueError(f"card says task {card.task!r}; {card.name!r} is registered as {_REGISTRY[card.name].task!r}")
    target = entry.weights_dir if entry is not None else Path(name_or_dir)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder")
    n_params = sum(p.numel() for p in model.parameters())
    if card.parameters != n_params:
        raise ValueError(f"card says {card.parameters:,} parameters but the model has {n_params:,}")
    config_text = json.dumps(dict(config), indent=2, sort_keys=True) + "\n"  # TypeError for non-JSON values
    if card.name in _REGISTRY:
        _check_config_rebuilds(_REGISTRY[card.name], config, model)
    # state_dict tensors may share storage (tied weights, views), which safetensors refuses: store copies
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        os.chmod(partial, 0o755)  # mkdtemp makes it private; shipped weights must be readable by every user
        safetensors.torch.save_file(tensors, str(partial / WEIGHTS_FILE),
                                    metadata={"format": "pt", "name": card.name, "version": card.version})
        (partial / CONFIG_FILE).write_text(config_text, encoding="utf-8")
        network = None  # a model only its registered builder can build
        if type(model).__name__ in ARCHITECTURES:
            network = NetworkDef(architecture=type(model).__name__, config=json.loads(config_text), expansion=expansion)
        (partial / CARD_JSON).write_text(card.model_dump_json(indent=2) + "\n", encoding="utf-8")
        (partial / CARD_MD).write_text(card.to_markdown(), encoding="utf-8")
        if extra is not None:
            extra(partial)
        # last: the digests of the weights and whatever extra wrote (a template bank), as they are now on disk
        (partial / BUNDLE_FILE).write_text(bundle_file_text(network, file_digests(partial)), encoding="utf-8")
        for written in partial.iterdir():  # safetensors writes owner-only files; shipped weights are for everyone
            os.chmod(written, 0o644)
        replace_folder(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target


# ------------------------------------------------------------------------------------------ reading


def load_card(name: str) -> ModelCard:
    """The model card shipped with ``name``'s weights; FileNotFoundError when none are shipped yet."""
    folder = model_entry(name).weights_dir
    if not (folder / CARD_JSON).is_file():
        raise FileNotFoundError(f"no weights are shipped for {name!r} yet ({folder / CARD_JSON} does not exist)")
    return read_card(folder)


def model_input_spec(name: str) -> dict[str, Any]:
    """How inputs must be prepared for ``name``: the shipped card's ``input_spec`` (what the weights were trained
    with) when weights are shipped, else the registration's."""
    try:
        return dict(load_card(name).input_spec)
    except FileNotFoundError:
        return dict(model_entry(name).input_spec)


def model_version(name: str) -> str:
    """The semantic version of ``name``'s shipped weights."""
    return load_card(name).version
