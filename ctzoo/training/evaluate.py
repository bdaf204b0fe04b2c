"""``ctzoo eval`` for RECIST-Net: load a checkpoint or zoo model, score a split, write the FROC table and curve."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ctzoo.datasets.deeplesion.dataset import deeplesion_dataloader, deeplesion_dataset
from ctzoo.datasets.keypoint_transforms import recist_eval_transforms
from ctzoo.models.recistnet import RecistNet
from ctzoo.scaling.zoo_expand import checkpoint_network
from ctzoo.training.engine import pick_device
from ctzoo.training.froc import FrocResult, plot_froc
from ctzoo.training.recistnet_task import evaluate_detector, load_train_config


def load_recistnet(checkpoint: Path | None, model_name: str | None, in_channels: int, model_cfg: dict,
                   device: torch.device) -> RecistNet:
    """A RECIST-Net in eval mode from a training checkpoint (its own config wins) or from the zoo."""
    if model_name is not None:
        from ctzoo.models import create_model

        return create_model(model_name, pretrained=True).to(device).eval()
    state = torch.load(checkpoint, map_location=device, weights_only=False)
    saved = state.get("train_config", {}).get("model", model_cfg)
    model = checkpoint_network(state, lambda: RecistNet(in_channels=in_channels, **saved))
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def evaluate_recistnet(config: Path, out: Path, split: str = "test", checkpoint: Path | None = None,
                       model_name: str | None = None, data_root: Path | None = None,
                       device: str = "auto") -> FrocResult:
    """Score ``split`` and write ``froc.json``, ``froc.png`` and ``detections.json`` into ``out``.

    Detections are given in the evaluated image frame (resampled to the config's spacing, padded or
    cropped to ``eval_size``), with the key slice's File_name.
    """
    cfg = load_train_config(config, data_root)
    dev = pick_device(device)
    model = load_recistnet(checkpoint, model_name, cfg.data.in_channels, cfg.model.model_dump(), dev)
    dataset = deeplesion_dataset(cfg.data, split, transform=recist_eval_transforms(cfg.eval_size))
    loader = deeplesion_dataloader(dataset, batch_size=4, shuffle=False, num_workers=0)
    result, detections = evaluate_detector(model, loader, dev, cfg.max_lesions, cfg.min_score)
    out.mkdir(parents=True, exist_ok=True)
    (out / "froc.json").write_text(json.dumps({"split": split, "source": str(checkpoint or model_name),
                                               **result.to_dict()}, indent=2))
    plot_froc([(f"{checkpoint or model_name} ({split})", result)], out / "froc.png")
    (out / "detections.json").write_text(json.dumps([
        {"file_name": d["file_name"], "scores": d["scores"].round(5).tolist(),
         "points": d["points"].round(3).tolist(), "boxes": d["boxes"].round(3).tolist(),
         "diameters_mm": d["diameters_mm"].round(3).tolist()} for d in detections], indent=1))
    return result
