"""Turn a finished RECIST-Net run into a zoo model: evaluate it, write its weights and an honest model card."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch

from ctzoo.datasets.samples import REAL_CT_SCANS, real_ct_scan
from ctzoo.models import Metric, ModelCard, TrainingInfo, model_entry, save_pretrained
from ctzoo.models.checkpoint import load_checkpoint
from ctzoo.models.registry import OperatingPoint
from ctzoo.models.seg_networks import template_seg_config
from ctzoo.training.evaluate import evaluate_recistnet, findings_on_lesion_free_ct, load_recistnet
from ctzoo.training.recistnet_task import load_train_config

#: What the miniature's splits are, for every figure measured on them (the card says it beside the split).
MINIATURE_DATA = "synthetic lesions in real CT"
RECIST_INTENDED_USE = (
    "Research and software development only: not for diagnosis, treatment or any clinical decision, and not a "
    "medical device. Input: a CT volume in Hounsfield units (a DICOM series, or NIfTI/NRRD/MHA), of the chest, "
    "abdomen or pelvis, in any orientation (read as axial slices). Output: lesion candidates with RECIST long and "
    "short axes and an uncalibrated score, for a person to review; its figures are on synthetic lesions (Metrics, "
    "Limitations).")
SEG_INTENDED_USE = (
    "Research and software development only: not for diagnosis, treatment planning or any clinical decision, and "
    "not a medical device. Input: an abdominal CT volume in Hounsfield units (a DICOM series, or NIfTI/NRRD/MHA), "
    "segmented on axial slices. Output: a label map of the classes under Inputs and their volumes in mL, for a "
    "person to check; its figures are on one test patient (Metrics, Limitations).")

LESION_LIMITATION = ("Its lesions are synthetic: DeepLesion's types, shapes and sizes where three scans leave room "
                     "(median long axis ~14 mm against DeepLesion's ~20 mm; few mediastinal, pelvic and bone "
                     "lesions); see ctzoo data stats.")


def miniature_limitations(root: Path) -> list[str]:
    """What a model trained on the miniature at ``root`` can claim, from its ``lesions.json`` (held-out scan)."""
    summary = root / "lesions.json"
    held = json.loads(summary.read_text()).get("test_source") if summary.is_file() else None
    split = (f"Its test split is every patient drawn from {held}, a scan that training and validation never show: "
             "the test metrics are on anatomy it has not seen." if held else
             "The same anatomy appears in the training and test splits.")
    return ["Trained on a miniature built from real CT scans with synthetic lesions: its numbers show that the "
            f"pipeline learns, not how it does on patients. {split}", LESION_LIMITATION,
            "Research use only; not a medical device."]


def _held_out_scan(root: Path) -> str | None:
    """The REAL_CT_SCANS name of the scan a miniature holds out, or None."""
    summary = root / "lesions.json"
    held = json.loads(summary.read_text()).get("test_source") if summary.is_file() else None
    return None if held is None else next(n for n in REAL_CT_SCANS if held.split(" ")[0].startswith(n))


def choose_operating_point(config: Path, checkpoint: Path, data_root: Path | None, bundle: Path,
                           fp_per_image: float, work: Path) -> OperatingPoint:
    """The lowest score threshold keeping val at ``fp_per_image`` false positives per image, and what the published
    ``bundle`` reports there on the real CT scans without known lesions (every finding a false positive)."""
    evaluate_recistnet(config, work, "val", checkpoint=checkpoint, data_root=data_root, device="cpu")
    val = json.loads((work / "froc.json").read_text())
    point = next((p for p in val["operating_points"] if p["fp_per_image"] == fp_per_image), None)
    if point is None:
        rates = ", ".join(f"{p['fp_per_image']:g}" for p in val["operating_points"])
        raise ValueError(f"no operating point for {fp_per_image:g} FP/image; choose one of {rates}")
    root = load_train_config(config, data_root).data.root
    held = _held_out_scan(root)
    free = findings_on_lesion_free_ct(bundle, {scan: real_ct_scan(scan) for scan in REAL_CT_SCANS},
                                      point["score_threshold"])
    per_scan = "; ".join(f"{r['scan']}{' (never trained on)' if r['scan'] == held else ''}: {r['findings']} over "
                         f"{r['slices']} slices" for r in free["scans"])
    return OperatingPoint(
        score_threshold=point["score_threshold"], fp_per_image=fp_per_image, sensitivity=point["sensitivity"],
        split=f"val of the miniature at {root.name}" + (f" ({held} held out)" if held else "") + f": {MINIATURE_DATA}",
        lesion_free_findings_per_slice=free["findings_per_slice"],
        note=f"Chosen by ctzoo zoo publish --operating-fp {fp_per_image:g}. Real CT without known lesions at this "
             f"threshold, every finding a false positive: {per_scan}. Calibration on val: ECE "
             f"{val['calibration']['ece']:.3f}.")


def _miniature_options(root: Path) -> str:
    """The make-deeplesion-mini options that rebuild the miniature at ``root`` (from its lesions.json)."""
    summary = root / "lesions.json"
    if not summary.is_file():
        return ""
    built = json.loads(summary.read_text())
    return f" --cases {built['cases']} --seed {built['seed']}"


def _device_words(summary: dict) -> str:
    """The device a run trained on, from its summary.json: "cpu", "cuda (NVIDIA H200)", "cuda (...), 4 processes"."""
    words = summary.get("device", "unknown")
    if summary.get("device_name"):
        words += f" ({summary['device_name']})"
    if summary.get("world_size", 1) > 1:
        words += f", {summary['world_size']} processes"
    return words


def publish_recistnet(run_dir: Path, config: Path, name: str, version: str, split: str = "test",
                      data_root: Path | None = None, command: str = "", target: Path | None = None,
                      notes: str = "", operating_fp: float | None = None) -> Path:
    """Evaluate ``run_dir/best.pt`` on ``split`` and publish it as zoo model ``name`` (or into ``target``).

    The card records the FROC sensitivities measured here, the training config and command, the device and
    the wall time from ``run_dir/summary.json``, and what the miniature lets it claim (a held-out scan).
    ``operating_fp``: also choose the card's operating point on val for this many false positives per image
    (:func:`choose_operating_point`), which every command then reports at.
    """
    cfg = load_train_config(config, data_root)
    as_written = load_train_config(config)  # the card names the config's own data root, not a local override
    checkpoint = run_dir / "best.pt" if (run_dir / "best.pt").exists() else run_dir / "last.pt"
    state = load_checkpoint(checkpoint)
    model, own = load_recistnet(checkpoint, None, cfg.data, cfg.model.model_dump(), torch.device("cpu"))
    model_config = {"in_channels": own.in_channels, **state.get("train_config", {}).get("model",
                                                                                     cfg.model.model_dump())}
    result = evaluate_recistnet(config, run_dir / f"eval-{split}", split, checkpoint=checkpoint,
                                data_root=data_root, device="cpu")
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    if not summary.get("complete", True):  # a run cut off before its last epoch says so on its card
        stopped = f"The run stopped after epoch {summary['epochs_done']} of {summary['epochs']}."
        notes = f"{stopped} {notes}".strip()
    measured_on = f"{split}: {MINIATURE_DATA}"
    metrics = {f"sensitivity_at_{fp:g}_fp": Metric(value=round(s, 4), split=measured_on)
               for fp, s in zip(result.fps_per_image, result.sensitivities)}
    metrics["froc_mean_0.5_to_4"] = Metric(value=round(result.mean_sensitivity_0p5_to_4, 4), split=measured_on)
    entry = model_entry(name)
    card = ModelCard(
        name=name, version=version, task=entry.task, description=entry.description, intended_use=RECIST_INTENDED_USE,
        architecture=f"RecistNet({', '.join(f'{k}={v!r}' for k, v in model_config.items())})",
        parameters=sum(p.numel() for p in model.parameters()),
        input_spec=own.model_dump() | {"size_multiple": 32},
        training=TrainingInfo(data=f"DeepLesion-format miniature at {as_written.data.root} (split train): "
                                   f"{MINIATURE_DATA}",
                              config_file=str(config),
                              command=command or f"ctzoo data make-deeplesion-mini {as_written.data.root}"
                                                 f"{_miniature_options(cfg.data.root)} && "
                                                 f"ctzoo train {config} --out runs/{name}",
                              device=_device_words(summary),
                              epochs=int(summary.get("epochs_done", state["epoch"] + 1)),
                              epochs_planned=summary.get("epochs", cfg.optim.epochs),
                              best_epoch=int(state["epoch"]) + 1 if checkpoint.name == "best.pt" else None,
                              wall_time_s=float(summary.get("wall_s", 0.0)), notes=notes),
        metrics=metrics, limitations=miniature_limitations(cfg.data.root),
        licence="Apache-2.0 (weights); data: see NOTICE of the miniature", created=datetime.date.today())
    folder = save_pretrained(model, target or name, config=model_config, card=card,
                             expansion=state.get("expanded_from"))
    if operating_fp is None:
        return folder
    point = choose_operating_point(config, checkpoint, data_root, folder, operating_fp, run_dir / "eval-val")
    return save_pretrained(model, folder, config=model_config, card=card.model_copy(update={"operating_point": point}),
                           expansion=state.get("expanded_from"))


def template_limitation(drop: float, dice: float, dice_wrong: float, source: str) -> str:
    """The card's limitation for a template segmenter whose template check (:func:`evaluate_segmenter`) found no
    measurable effect: users would otherwise take the bank and its lookup for what drives the result."""
    return (f"The template has no measurable effect on this model: with each slice's nearest template given its "
            f"class masks rotated between organs, its test mean Dice is {dice_wrong:.3f} against {dice:.3f} with the "
            f"right ones (drop {drop:+.3f}; {source}). It segments from the image alone, like a plain UNet, and other "
            "templates will not adapt it.")


SEG_LIMITATIONS = [
    "Trained on 22 axial slices of one non-contrast CT (TotalSegmentator sample example_ct_sm) and tested on one "
    "contrast-enhanced CT of another patient: its numbers show that the method learns and transfers, not how it "
    "does on a population.",
    "2-D, 3 mm in-plane; the stomach, collapsed in the training scan and distended in the test scan, is mostly "
    "missed (see the Dice per class).",
    "Research use only; not a medical device.",
]


def seg_card_metrics(clean: dict[str, dict], names: list[str], test_cases: list[str], test: str, source: Path
                     ) -> tuple[dict[str, Metric], list[str]]:
    """The card's metrics (measured on split ``test``) from the ``clean`` rows of a run's ``comparison.json``
    (``source``, which stores a value it could not measure as null), and limitations naming what it could not
    measure: a class absent from every test case has no Dice, a model that found no class of them no HD95.
    ``ValueError`` where the test cases hold no voxel of any class: nothing to put on the card."""
    mine = clean["template_seg"]
    if mine["dice_mean"] is None:
        raise ValueError(f"{source}: the test cases {test_cases} hold no voxel of any class {names}: no Dice to "
                         "publish; test on cases with labels")
    absent = [c for c in names if mine[f"dice_{c}"] is None]
    metrics = {f"dice_{c}": Metric(value=round(mine[f"dice_{c}"], 4), split=test) for c in names if c not in absent}
    metrics["dice_mean"] = Metric(value=round(mine["dice_mean"], 4), split=test)
    if mine["hd95_mean"] is not None:
        metrics["hd95_mean_mm"] = Metric(value=round(mine["hd95_mean"], 2), split=test)
    if "hd95_missed" in mine:  # the organs that mean could not measure: the model never predicted them
        metrics["hd95_missed_classes"] = Metric(value=mine["hd95_missed"], split=test)
    for other in ("unet", "template copy"):
        if other in clean:
            metrics[f"dice_mean_{other.replace(' ', '_')}_baseline"] = Metric(value=round(clean[other]["dice_mean"], 4),
                                                                              split=test)
    unmeasured = [f"No Dice for {', '.join(absent)}: not in the test cases ({', '.join(test_cases)}); the mean Dice "
                  "is over the other classes."] if absent else []
    if mine["hd95_mean"] is None:
        unmeasured.append("No HD95: the model found none of the classes in the test cases.")
    return metrics, unmeasured


def publish_template_seg(run_dir: Path, config: Path, name: str, version: str, data_root: Path | None = None,
                         command: str = "", target: Path | None = None, description: str | None = None,
                         notes: str = "", extra_metrics: dict[str, Metric] | None = None,
                         limitations: list[str] | None = None) -> Path:
    """Publish ``run_dir/template_seg/best.pt`` (``last.pt`` without one; a ``ctzoo train
    configs/template_seg_*.yaml`` run) as zoo model ``name`` with its template bank (the training slices, embedded
    by these weights) and a card holding the test metrics of ``run_dir/comparison.json``: the model's Dice per
    class and HD95, and the same-budget UNet's and the template copy's mean Dice for comparison. The template bank and
    the card's ``input_spec`` follow the checkpoint's preprocessing (a warning names where ``config`` differs).

    ``description`` (default: the registered model's), ``notes`` (the training table's), ``extra_metrics`` (added
    to the measured ones) and ``limitations`` (default :data:`SEG_LIMITATIONS`) are for a model not registered
    in the zoo, e.g. a searched architecture (:func:`ctzoo.nas.handoff.export_candidate`)."""
    from ctzoo.datasets.segmentation_slices import case_to_slices, template_set
    from ctzoo.models.template_bank import TemplateBank
    from ctzoo.training.seg_evaluation import TEMPLATE_EFFECT_MIN_DROP
    from ctzoo.training.template_seg_task import (
        check_trained_data,
        load_seg_config,
        load_seg_data,
        load_seg_model,
        trained_preprocessing,
    )

    cfg = load_seg_config(config, data_root)
    data = load_seg_data(cfg.data)
    run_dir = Path(run_dir)
    checkpoint = run_dir / "template_seg" / "best.pt"
    checkpoint = checkpoint if checkpoint.exists() else checkpoint.with_name("last.pt")
    check_trained_data(cfg, checkpoint, data.class_names)  # the bank from its training cases, its classes named
    # the bank and the card's input_spec: the slices the weights learnt from, whatever the publish config says
    prep, names = trained_preprocessing(cfg, checkpoint), data.class_names
    model = load_seg_model(cfg, checkpoint, len(names))
    comparison = json.loads((run_dir / "comparison.json").read_text())
    clean = {row["model"]: row for row in comparison["rows"] if row["condition"] == "clean"}
    mine, test = clean["template_seg"], f"test: real CT, {', '.join(comparison['test_cases'])}"
    metrics, unmeasured = seg_card_metrics(clean, names, comparison["test_cases"], test, run_dir / "comparison.json")
    images, masks, sources = template_set([case_to_slices(c, prep) for c in data.cases["train"]], len(names),
                                          cfg.data.max_templates)
    bank = TemplateBank.build(model, images, masks, names, sources)
    limitations = unmeasured + list(SEG_LIMITATIONS if limitations is None else limitations)
    if "dice_drop_wrong_template" in mine:  # the template check of the run's evaluation
        drop = mine["dice_drop_wrong_template"]
        metrics["dice_drop_wrong_template"] = Metric(value=round(drop, 4), split=test)
        if drop < TEMPLATE_EFFECT_MIN_DROP:
            limitations.insert(0, template_limitation(drop, mine["dice_mean"], mine["dice_mean_wrong_template"],
                                                      "comparison.json of the training run"))
    metrics |= extra_metrics or {}
    from ctzoo.training.template_seg_task import trained_model_config  # the network as trained, not as cfg says

    model_config = template_seg_config(trained_model_config(cfg, checkpoint, warn=False), len(names))
    state = load_checkpoint(checkpoint)
    trained = comparison.get("training", {}).get("template_seg", {})
    wall = trained.get("wall_s", 0.0)
    card = ModelCard(
        name=name, version=version, task="segmentation",
        description=description or model_entry(name).description, intended_use=SEG_INTENDED_USE,
        architecture=f"TemplateSegNet({', '.join(f'{k}={v!r}' for k, v in model_config.items())})",
        parameters=sum(p.numel() for p in model.parameters()),
        input_spec={**prep.model_dump(mode="json"), "classes": names},
        training=TrainingInfo(data=f"{cfg.data.source} cases: train {[c.name for c in data.cases['train']]}, "
                                   f"test {[c.name for c in data.cases['test']]}; {len(bank)} template slices",
                              config_file=str(config),
                              command=command or f"ctzoo data fetch-samples && ctzoo train {config} --out runs/{name}",
                              device=str(trained.get("device", "cpu")),
                              epochs=int(trained.get("epochs", cfg.optim.epochs)), epochs_planned=cfg.optim.epochs,
                              best_epoch=int(state["epoch"]) + 1 if checkpoint.name == "best.pt" else None,
                              wall_time_s=float(wall), notes=notes),
        metrics=metrics, limitations=limitations,
        licence="Apache-2.0 (weights and template slices, from TotalSegmentator's Apache-2.0 samples)",
        created=datetime.date.today())
    return save_pretrained(model, target or name, config=model_config, card=card, extra=bank.save,
                           expansion=state.get("expanded_from"))
