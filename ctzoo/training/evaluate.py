"""``ctzoo eval`` for RECIST-Net: load a checkpoint or zoo model, score a split, write the FROC table and curve."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ctzoo.config import field_differences, recorded_fields
from ctzoo.datasets.deeplesion.dataset import (
    SlicePreprocessing,
    deeplesion_dataloader,
    deeplesion_dataset,
)
from ctzoo.models.checkpoint import load_checkpoint
from ctzoo.models.recistnet import RecistNet
from ctzoo.scaling.zoo_expand import checkpoint_network
from ctzoo.training.calibration import (
    detection_correctness,
    operating_points,
    plot_reliability,
    reliability,
)
from ctzoo.training.engine import pick_device
from ctzoo.training.froc import FrocResult, plot_froc
from ctzoo.training.recistnet_task import (
    eval_transforms,
    evaluate_decodings,
    load_train_config,
)

log = logging.getLogger(__name__)


def load_recistnet(checkpoint: Path | None, model_name: str | None, preprocessing: SlicePreprocessing,
                   model_cfg: dict, device: torch.device) -> tuple[RecistNet, SlicePreprocessing]:
    """A RECIST-Net in eval mode from a training checkpoint or from the zoo, and the slice preprocessing it was
    trained with: the checkpoint's ``train_config`` or the zoo card's; ``preprocessing`` and ``model_cfg`` (the
    eval config's) only where a checkpoint records none. A model scored on other input than it learnt from
    would lose its sensitivity without a word."""
    if model_name is not None:
        from ctzoo.models import create_model, load_bundle

        own = load_bundle(model_name).preprocessing
        return create_model(model_name, pretrained=True).to(device).eval(), own
    state = load_checkpoint(checkpoint, map_location=device)
    saved = state.get("train_config", {})
    own = recorded_fields(SlicePreprocessing, saved.get("data", {}), preprocessing)
    model = checkpoint_network(state, lambda: RecistNet(in_channels=own.in_channels,
                                                        **saved.get("model", model_cfg)))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), own


def evaluate_recistnet(config: Path, out: Path, split: str = "test", checkpoint: Path | None = None,
                       model_name: str | None = None, data_root: Path | None = None,
                       device: str = "auto", decodes: tuple[str, ...] = ("both",),
                       lesion_free_per_series: int = 0) -> FrocResult:
    """Score ``split`` and write ``froc.json``, ``froc.png``, ``reliability.png`` and ``detections.json`` into
    ``out``; return the FROC result of the first of ``decodes``.

    DeepLesion's protocol: the split's key slices, each slice prepared as the model was trained (its own
    preprocessing, whatever the config says; the config gives the data, ``eval_size``, ``max_lesions`` and
    ``min_score``). ``lesion_free_per_series`` adds that many lesion-free context slices per series, whose every
    detection is a false positive (on real DeepLesion they may hold lesions nobody marked).

    Every mode of ``decodes`` (:data:`ctzoo.models.recist_grouping.DECODE_MODES`) is scored from the same forward
    passes; the first one's detections are written, its reliability (ECE) and operating points (score thresholds
    at 0.125 to 2 FPs per image) go into ``froc.json`` beside every mode's FROC. Detections are given in the
    evaluated image frame (resampled to the config's spacing, padded or cropped to ``eval_size``), with the key
    slice's File_name. A lesion whose centre the crop cuts off counts as missed (DeepLesion scores every lesion of
    every key slice), so an ``eval_size`` smaller than the resampled slices lowers the sensitivity, with a warning.
    """
    cfg = load_train_config(config, data_root)
    dev = pick_device(device)
    model, own = load_recistnet(checkpoint, model_name, cfg.data, cfg.model.model_dump(), dev)
    if differences := field_differences(cfg.data, own):
        log.warning("scoring with the model's own preprocessing, not the config's: %s", differences)
    data = cfg.data.model_copy(update=own.model_dump())
    dataset = deeplesion_dataset(data, split, transform=eval_transforms(cfg.eval_size),
                                 lesion_free_per_series=lesion_free_per_series)
    loader = deeplesion_dataloader(dataset, batch_size=4, shuffle=False, num_workers=0)
    scored = evaluate_decodings(model, loader, dev, tuple(dict.fromkeys(decodes)), cfg.max_lesions, cfg.min_score)
    primary = decodes[0]
    result, detections, truth = scored[primary]
    if result.num_off_image:
        log.warning("%d of %d lesions lie off the %s x %s evaluation image (eval_size smaller than the resampled "
                    "slice) and count as missed", result.num_off_image, result.num_lesions, *cfg.eval_size)
    scores, correct = detection_correctness(detections, truth)
    calibration = reliability(scores, correct, min_score=0.05)
    source = str(checkpoint or model_name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "froc.json").write_text(json.dumps({
        "split": split, "source": source, "decode": primary, "preprocessing": own.model_dump(mode="json"),
        "lesion_free_per_series": lesion_free_per_series, **result.to_dict(),
        "decodes": {mode: found.to_dict() for mode, (found, _, _) in scored.items()},
        "calibration": calibration,
        "operating_points": operating_points(detections, truth)}, indent=2))
    plot_froc([(f"{source} ({split}, {mode})", found) for mode, (found, _, _) in scored.items()], out / "froc.png")
    plot_reliability(calibration, out / "reliability.png", f"{Path(source).name} ({split}, {primary})")
    (out / "detections.json").write_text(json.dumps([
        {"file_name": d["file_name"], "scores": d["scores"].round(5).tolist(),
         "points": d["points"].round(3).tolist(), "boxes": d["boxes"].round(3).tolist(),
         "diameters_mm": d["diameters_mm"].round(3).tolist()} for d in detections], indent=1))
    return result


def findings_on_lesion_free_ct(source: str | Path, scans: dict[str, Path], score_threshold: float) -> dict[str, Any]:
    """What a detector bundle (zoo name or folder) reports on real CT without known lesions, at ``score_threshold``:
    per scan the findings (lesions after merging across slices, as ``ctzoo infer`` writes them), the slices, their
    ratio, and each finding's score and long axis. Every finding counts as a false positive."""
    from ctzoo.inference.tasks import model_task, run_task
    from ctzoo.io import read_volume, reorient_lps

    task = model_task(source, "torch", "cpu", score_threshold)
    rows = []
    for name, path in scans.items():
        volume = read_volume(path, progress=False)
        lesions = run_task(task, volume)["lesions"]
        slices = int(reorient_lps(volume).size[2])  # the axial slices the detector looked at
        rows.append({"scan": name, "slices": slices, "findings": len(lesions),
                     "findings_per_slice": round(len(lesions) / slices, 4),
                     "scores": [lesion["score"] for lesion in lesions],
                     "long_axis_mm": [lesion["long_axis_mm"] for lesion in lesions]})
    findings, slices = sum(r["findings"] for r in rows), sum(r["slices"] for r in rows)
    return {"score_threshold": score_threshold, "findings": findings, "slices": slices,
            "findings_per_slice": round(findings / max(slices, 1), 4), "scans": rows}
