"""Does LEMON save compute on a zoo model? Grow a trained small template segmenter into a large one and train on,
against the large one trained from scratch — same data, augmentation, seed and schedule family, both measured
in this run.

  1. small: the template segmenter at half width, trained from scratch (``--small-epochs``);
  2. scratch: the large one (``--channels``) from scratch, ``--epochs`` epochs, warm-up + cosine;
  3. lemon: the small one expanded losslessly (``--width-mult``, ``--depth-add``) and trained with LEMON's
     recipe: the same peak learning rate and warm-up, cosine decay ending at ``--decay-fraction`` of the epochs.

Validation Dice (mean over the organs) is measured after every epoch. Target: ``--target-fraction`` of the best
Dice the scratch run reaches. The table gives the optimiser steps and wall time (training plus the per-epoch
validation, the same for both) each large run needed
to first reach the target, and the saving; "incl. small" adds the small model's training to LEMON's side
(the paper's accounting leaves it out: the small model is one the zoo already has).

    python benchmarks/expand.py [--epochs 16] [--device auto] [--out benchmarks/results/expand.json]

Needs the TotalSegmentator samples (``ctzoo data fetch-samples``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from ctzoo.scaling.zoo_expand import ExpansionInit, expand_source, lemon_optim, save_expanded
from ctzoo.training.engine import fit
from ctzoo.training.template_seg_task import TemplateSegTask, load_seg_config, load_seg_data

sys.path.append(str(Path(__file__).resolve().parent))  # appended: a benchmark never shadows an installed module
from _provenance import Provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def curve(run: Path) -> list[dict]:
    """Per-epoch rows of a run: step, cumulative wall time (training and validation), val Dice."""
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    return [{"epoch": int(r["epoch"]), "step": int(r["step"]), "wall_s": float(r["wall_s"]),
             "dice": float(r["val_dice_mean"])} for r in rows if r.get("val_dice_mean")]


def fmt(value, spec: str) -> str:
    return format(value, spec) if value is not None else "never"


def first_reaching(rows: list[dict], target: float) -> dict | None:
    return next((r for r in rows if r["dice"] >= target), None)


def train(cfg, data, out: Path, device: str, optim=None, channels=None, init: ExpansionInit | None = None) -> float:
    update = {"baseline_unet": False, "init_from_expansion": init}
    if channels is not None:
        update["model"] = cfg.model.model_copy(update={"channels": tuple(channels)})
    run_cfg = cfg.model_copy(update=update)
    task = TemplateSegTask(run_cfg, data)
    started = time.perf_counter()
    fit(task, optim or run_cfg.optim, out, device=device, progress=False,
        extra_state={"model_kind": "template_seg", "task_config": json.loads(run_cfg.model_dump_json()),
                     "class_names": data.class_names})
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "template_seg_abdomen.yaml")
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128], help="the large model")
    parser.add_argument("--width-mult", type=float, default=2.0)
    parser.add_argument("--depth-add", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=16, help="epochs of each large run")
    parser.add_argument("--small-epochs", type=int, default=16)
    parser.add_argument("--decay-fraction", type=float, default=0.5)
    parser.add_argument("--target-fraction", type=float, default=0.98)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "expand.json")
    args = parser.parse_args()
    provenance = Provenance(args.config)
    warnings.simplefilter("ignore", UserWarning)  # the sample CT's repaired UIDs, said once per read

    cfg = load_seg_config(args.config)
    cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"epochs": args.epochs, "eval_every": 1})})
    data = load_seg_data(cfg.data)
    small_channels = [round(c / args.width_mult) for c in args.channels]
    with tempfile.TemporaryDirectory(prefix="ctzoo-expand-bench-") as folder:
        work = Path(folder)
        small_optim = cfg.optim.model_copy(update={"epochs": args.small_epochs})
        print(f"small {small_channels}: {args.small_epochs} epochs from scratch", flush=True)
        small_s = train(cfg, data, work / "small", args.device, small_optim, small_channels)
        print(f"scratch {args.channels}: {args.epochs} epochs", flush=True)
        train(cfg, data, work / "scratch", args.device, channels=args.channels)

        from ctzoo.scaling.zoo_expand import load_source_model

        source = load_source_model(str(work / "small" / "last.pt"))
        expanded, report, checks = expand_source(source, args.width_mult, args.depth_add)
        save_expanded(work / "expanded.pt", source, expanded, report, 0, checks)
        init = ExpansionInit(checkpoint=work / "expanded.pt", decay_fraction=args.decay_fraction)
        print(f"lemon: expanded {report.parameters_before:,} -> {report.parameters_after:,} parameters "
              f"(max relative difference {report.max_rel_diff:.1e}), {args.epochs} epochs", flush=True)
        train(cfg, data, work / "lemon", args.device, lemon_optim(cfg.optim, init), init=init)
        curves = {name: curve(work / name) for name in ("small", "scratch", "lemon")}

    best_scratch = max(r["dice"] for r in curves["scratch"])
    target = args.target_fraction * best_scratch
    small_total = curves["small"][-1]
    rows = []
    for name in ("scratch", "lemon"):
        hit = first_reaching(curves[name], target)
        rows.append({"run": name, "best_dice": max(r["dice"] for r in curves[name]),
                     "epoch": hit["epoch"] if hit else None, "steps": hit["step"] if hit else None,
                     "wall_s": hit["wall_s"] if hit else None})
    scratch, lemon = rows
    saving = {}
    if scratch["steps"] and lemon["steps"]:
        saving = {"steps": 1 - lemon["steps"] / scratch["steps"], "wall": 1 - lemon["wall_s"] / scratch["wall_s"],
                  "steps_incl_small": 1 - (lemon["steps"] + small_total["step"]) / scratch["steps"],
                  "wall_incl_small": 1 - (lemon["wall_s"] + small_total["wall_s"]) / scratch["wall_s"]}

    print(f"\ntarget: val Dice >= {target:.4f} ({args.target_fraction:.0%} of the scratch run's best, "
          f"{best_scratch:.4f})")
    print(f"{'run':<10} {'best Dice':>9} {'epoch':>6} {'steps':>6} {'wall s':>8}")
    for row in rows:
        print(f"{row['run']:<10} {row['best_dice']:>9.4f} {fmt(row['epoch'], 'd'):>6} {fmt(row['steps'], 'd'):>6} "
              f"{fmt(row['wall_s'], '.1f'):>8}")
    print(f"{'small':<10} {max(r['dice'] for r in curves['small']):>9.4f} {small_total['epoch']:>6d} "
          f"{small_total['step']:>6d} {small_total['wall_s']:>8.1f}   (trained once, before expanding)")
    if saving:
        print(f"LEMON saving vs scratch: {saving['steps']:.1%} of steps, {saving['wall']:.1%} of training time; "
              f"counting the small model too: {saving['steps_incl_small']:.1%} / {saving['wall_incl_small']:.1%}")
    else:
        print("LEMON saving: not measurable (a run never reached the target)")
    result = {"benchmark": "expand",
              "device": str(torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu"
                            else "cpu"), "args": vars(args) | {"out": str(args.out), "config": str(args.config)},
              "small_channels": small_channels, "expansion": report.as_dict(), "target_dice": target,
              "rows": rows, "saving": saving, "curves": curves, "small_train_s": small_s,
              "provenance": provenance.record()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
