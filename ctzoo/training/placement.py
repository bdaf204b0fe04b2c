"""The zoo's models and their inputs for placement (``ctzoo place``, ``fit(placement=...)``, ``ctzoo infer
--placement``): from a training config, a model bundle folder or a zoo name.

This sits in :mod:`ctzoo.training` (not beside the profiler in :mod:`ctzoo.scaling.placement`) because a training
config is read by its task, and the layers let training import scaling, not the other way round.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from ctzoo.config import read_yaml
from ctzoo.models.bundle import ModelBundle, load_bundle
from ctzoo.models.template_seg import TemplateSegNet

__all__ = ["bundle_example_inputs", "load_model_for_placement"]

#: Slices per batch when a bundle is profiled (``ctzoo infer``'s default batch size).
BUNDLE_BATCH_SIZE = 8


def load_model_for_placement(source: str | Path, batch_size: int | None = None,
                             training: bool = True) -> tuple[str, nn.Module, tuple[torch.Tensor, ...]]:
    """``(name, model, example_inputs)`` for ``source``: a training config YAML (the model its task builds; inputs
    shaped as it trains, batch ``optim.batch_size``, or as it evaluates when not ``training``), a model bundle
    folder or a zoo name (the bundle's network with its weights; ``BUNDLE_BATCH_SIZE`` slices). ``batch_size``
    overrides the batch. The model is the caller's own (a copy, never a shared bundle network)."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"training config {path} does not exist")
        return _from_config(path, batch_size, training)
    bundle = load_bundle(source)
    model = copy.deepcopy(bundle.network())
    return f"{bundle.name} {bundle.version}", model, bundle_example_inputs(bundle, batch_size or BUNDLE_BATCH_SIZE)


def bundle_example_inputs(bundle: ModelBundle, batch_size: int) -> tuple[torch.Tensor, ...]:
    """Random inputs shaped as inference feeds ``bundle``'s network: a detector's ``(B, C, S, S)`` slices at its
    largest size; a segmenter's ``(B, 1, H, W)`` slices and, for a template segmenter, ``(B, 1 + C, H, W)``
    templates."""
    prep = bundle.preprocessing
    if bundle.task == "detection":
        side = prep.max_size // 32 * 32  # RecistNet needs multiples of 32
        return (torch.randn(batch_size, prep.in_channels, side, side),)
    image = torch.randn(batch_size, 1, *prep.size)
    if not isinstance(bundle.network(), TemplateSegNet):
        return (image,)
    masks = (torch.rand(batch_size, len(bundle.class_names), *prep.size) > 0.7).float()
    return image, torch.cat([torch.randn(batch_size, 1, *prep.size), masks], dim=1)


def _from_config(path: Path, batch_size: int | None, training: bool):
    document = read_yaml(path)
    task = document.get("task", "recistnet") if isinstance(document, dict) else "recistnet"
    if task == "template_seg":
        from ctzoo.training.template_seg_task import build_seg_network, example_slices, load_seg_config, seg_classes

        cfg = load_seg_config(path)
        classes = len(seg_classes(cfg.data))
        inputs = example_slices(cfg, classes, batch_size or cfg.optim.batch_size)
        return str(path), build_seg_network(cfg, classes), inputs
    from ctzoo.training.recistnet_task import build_recistnet, example_images, load_train_config

    cfg = load_train_config(path)
    return str(path), build_recistnet(cfg), example_images(cfg, batch_size or cfg.optim.batch_size, training)
