"""Template segmenter vs the same-size MONAI UNet with error bars: 2-fold swap cross-validation x seeds.

Only two labelled CT patients are at hand: the TotalSegmentator sample ``example_ct_sm`` (30 slices of 3 mm,
non-contrast) and the embedded DICOM sample ``sample_ct_dicom`` (20 slices of 2 mm, contrast-enhanced), both with
TotalSegmentator's organ labels. Fold A trains on example_ct_sm and tests on sample_ct_dicom; fold B the reverse
(``data.train_patient``). Validation is the training patient's superior ``val_slices`` slab (never trained on):
there is no third labelled patient to keep out of both training and testing. For every fold and seed,
``train_with_baseline`` trains both models on identical data, augmentation, optimiser, epochs and seed
(``optim.seed``), and each model is tested on the other patient twice:

* ``last``: the weights after the last epoch, no choice made (the figure the README reports);
* ``best``: the checkpoint with the best val-slab Dice (chosen on the training patient alone).

Per fold and model: mean ± sd over seeds of the mean Dice and of each class's Dice; the paired difference
template_seg − unet per seed with its mean ± sd and a 95 % t-interval ("inside the noise" when the interval holds
0); parameters; training wall time; inference compute per slice on the test volume (ms/slice measured in this
run at ``--threads`` torch threads, batch ``eval_batch_size``, the template model's bank look-up included, and
GFLOP/slice counted by ``torch.utils.flop_counter``). Also pooled over both folds.

Resumable: a run whose ``cv.json`` exists is read, not redone; an interrupted training resumes from ``last.pt``.

    OMP_NUM_THREADS=2 python benchmarks/segmenter_cv.py [--config configs/template_seg_abdomen.yaml]
        [--seeds 0 1 2] [--work runs/segcv] [--threads 2] [--out benchmarks/results/segmenter_cv.json]

Needs the TotalSegmentator samples (``ctzoo data fetch-samples``). 65 minutes for the committed run on a 2-core
CPU that other jobs shared (load average about 4); rerunning with every ``cv.json`` in place only aggregates.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

# before torch loads OpenMP: waiting threads sleep instead of spinning. On a 2-core machine shared with other
# work, spinning made a training step of the template segmenter 3.6x slower at 2 threads (13.8 s vs 3.9 s,
# measured); the wait policy does not change the arithmetic, so results are those of any 2-thread run.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from scipy import stats
from torch.utils.flop_counter import FlopCounterMode

from ctzoo.datasets.seg_preprocessing import resample_slices, window_slices
from ctzoo.datasets.segmentation_slices import case_to_slices, template_set
from ctzoo.inference.segment_volume import segment_slices
from ctzoo.training.seg_evaluation import build_bank
from ctzoo.training.template_seg_task import (
    TemplateSegTrainConfig,
    _write_json,
    evaluate_template_seg,
    load_seg_config,
    load_seg_data,
    load_seg_model,
    train_with_baseline,
)

sys.path.append(str(Path(__file__).resolve().parent))  # appended: a benchmark never shadows an installed module
from _provenance import Provenance, load_average  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FOLDS = {"A": "example_ct_sm", "B": "sample_ct_dicom"}  # fold -> the patient trained on; the other is tested
KINDS = ("template_seg", "unet")
PROTOCOLS = ("last", "best")


def dice(metrics: dict, class_names: list[str]) -> dict[str, float]:
    return {"mean": metrics["dice_mean"], **{c: metrics[f"dice_{c}"] for c in class_names}}


def compute_per_slice(model, templates, class_names, test_case, cfg: TemplateSegTrainConfig,
                      repeats: int = 3) -> dict:
    """ms/slice (median of ``repeats`` passes over the test volume, after one warm-up) and GFLOP/slice of
    ``segment_slices`` as evaluation runs it; ``bank_ms``: embedding the template bank, once per model."""
    prep = cfg.data.preprocessing
    slices = window_slices(resample_slices(test_case.image, prep)[0], prep)
    started = time.perf_counter()
    bank = build_bank(model, templates, class_names)
    bank_ms = (time.perf_counter() - started) * 1000 if bank is not None else 0.0
    with FlopCounterMode(display=False) as counter:  # also the warm-up
        segment_slices(model, bank, slices, cfg.eval_batch_size, "cpu", progress=False)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        segment_slices(model, bank, slices, cfg.eval_batch_size, "cpu", progress=False)
        times.append(time.perf_counter() - started)
    return {"ms_per_slice": statistics.median(times) * 1000 / len(slices), "slices": len(slices),
            "gflop_per_slice": counter.get_total_flops() / len(slices) / 1e9, "bank_ms": bank_ms,
            "torch_threads": torch.get_num_threads(), "load_average": load_average()}


def run(cfg: TemplateSegTrainConfig, fold: str, seed: int, work: Path) -> dict:
    """Train both models of one fold and seed (or resume), test them on the other patient; cached in cv.json."""
    folder = work / f"fold{fold}-train-{FOLDS[fold]}" / f"seed{seed}"
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train_patient": FOLDS[fold]}),
                                 "optim": cfg.optim.model_copy(update={"seed": seed})})
    recipe = json.loads(json.dumps(cfg.model_dump(mode="json")))
    if (folder / "cv.json").exists():
        cached = json.loads((folder / "cv.json").read_text())
        if cached["config"] != recipe:
            raise SystemExit(f"{folder} holds a run of another recipe (config or --epochs); pass another --work")
        return cached
    comparison = train_with_baseline(cfg, folder, device="cpu", progress=False, resume=True)  # best.pt, tested
    data = load_seg_data(cfg.data)
    names, test, prep = data.class_names, data.cases["test"], cfg.data.preprocessing
    templates = template_set([case_to_slices(c, prep) for c in data.cases["train"]], len(names),
                             cfg.data.max_templates)  # what the models were trained and tested with
    models = {}
    for kind in KINDS:
        kind_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"kind": kind})})
        last = evaluate_template_seg(kind_cfg, folder / kind / "test-last", "test", folder / kind / "last.pt",
                                     "cpu", data)
        best = comparison["details"][kind]["clean"]
        training = comparison["training"][kind]
        model = load_seg_model(kind_cfg, folder / kind / "last.pt", len(names))
        best_epoch = int(torch.load(folder / kind / "best.pt", map_location="cpu", weights_only=False)["epoch"]) + 1
        models[kind] = {
            "parameters": training["parameters"], "train_wall_s": training["wall_s"], "epochs": training["epochs"],
            "best_epoch": best_epoch, "val_dice_best": training["best_dice_mean"],
            "test_dice": {"last": dice(last, names), "best": dice(best, names)},
            "test_hd95_mean": {"last": last["hd95_mean"], "best": best["hd95_mean"]},
            "best_robustness_dice": {c: m["dice_mean"] for c, m in comparison["details"][kind].items()},
            "compute": compute_per_slice(model, templates, names, test[0], cfg)}
    result = {"config": recipe, "fold": fold, "train_patient": FOLDS[fold], "test_patient": test[0].name, "seed": seed,
              "train_slices": len(data.cases["train"][0].labels), "val_slices": len(data.cases["val"][0].labels),
              "class_names": names, "models": models,
              "template_copy_dice": dice(comparison["details"]["template copy"]["clean"], names)}
    _write_json(result, folder / "cv.json")  # atomic: a run cut off here is redone, not half read
    return result


# ------------------------------------------------------------------------------------------------- aggregation


def spread(values: list[float]) -> dict:
    """mean, sample sd (None below 2 values) and the values."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "values": values}


def paired(differences: list[float]) -> dict:
    """:func:`spread` of paired differences plus a 95 % t-interval of their mean; ``inside_noise`` when the
    interval holds 0 (None below 2 pairs: no interval)."""
    summary = spread(differences)
    if summary["sd"] is None:
        return {**summary, "ci95": None, "inside_noise": None}
    half = stats.t.ppf(0.975, len(differences) - 1) * summary["sd"] / math.sqrt(len(differences))
    low, high = summary["mean"] - half, summary["mean"] + half
    return {**summary, "ci95": [low, high], "inside_noise": bool(low <= 0 <= high)}


def summarise(runs: list[dict]) -> dict:
    """Per fold and for all runs pooled ("both"): each model's spread over seeds, and the paired difference
    template_seg − unet per protocol."""
    groups = {f"fold {fold}": [r for r in runs if r["fold"] == fold] for fold in sorted({r["fold"] for r in runs})}
    if len(groups) > 1:
        groups["both folds"] = runs
    summary = {}
    for group, members in groups.items():
        names = members[0]["class_names"]
        models = {}
        for kind in KINDS:
            rows = [r["models"][kind] for r in members]
            models[kind] = {
                "parameters": rows[0]["parameters"],
                "test_dice": {p: {key: spread([row["test_dice"][p][key] for row in rows]) for key in ["mean", *names]}
                              for p in PROTOCOLS},
                "train_wall_s": spread([row["train_wall_s"] for row in rows]),
                "ms_per_slice": spread([row["compute"]["ms_per_slice"] for row in rows]),
                "gflop_per_slice": spread([row["compute"]["gflop_per_slice"] for row in rows])}
        summary[group] = {
            "runs": [f"{r['train_patient']} -> {r['test_patient']}, seed {r['seed']}" for r in members],
            "models": models,
            "template_copy_dice": spread([r["template_copy_dice"]["mean"] for r in members]),
            "difference_template_minus_unet": {
                p: paired([r["models"]["template_seg"]["test_dice"][p]["mean"] - r["models"]["unet"]["test_dice"][p]
                           ["mean"] for r in members]) for p in PROTOCOLS}}
    return summary


def plus_minus(s: dict, digits: int = 3) -> str:
    return f"{s['mean']:.{digits}f}" + ("" if s["sd"] is None else f" ± {s['sd']:.{digits}f}")


def table(summary: dict, class_names: list[str], folds: dict[str, dict[str, str]]) -> str:
    """Markdown: per group and model mean ± sd over seeds (test Dice of the last epoch per class), then the paired
    differences; ``folds``: fold -> {"train": patient, "test": patient}, for the legend."""
    lines = [", ".join(f"fold {f}: train {p['train']}, test {p['test']}" for f, p in folds.items())
             + "; mean ± sd over seeds.", "",
             "| runs | model | parameters | mean Dice, last epoch | mean Dice, best val | "
             + " | ".join(class_names) + " | train s | ms/slice | GFLOP/slice |", "|---|---|---:|" + "---:|" * (
                 len(class_names) + 5)]
    for group, s in summary.items():
        for kind, m in s["models"].items():
            last, best = m["test_dice"]["last"], m["test_dice"]["best"]
            lines.append(f"| {group} | {kind} | {m['parameters']:,} | {plus_minus(last['mean'])} | "
                         f"{plus_minus(best['mean'])} | " + " | ".join(plus_minus(last[c], 2) for c in class_names)
                         + f" | {plus_minus(m['train_wall_s'], 0)} | {plus_minus(m['ms_per_slice'], 1)} | "
                         f"{m['gflop_per_slice']['mean']:.2f} |")
    lines += ["", "| runs | tested | template_seg − unet per seed | mean ± sd | 95 % CI | inside the noise |",
              "|---|---|---|---:|---:|---|"]
    for group, s in summary.items():
        for protocol, d in s["difference_template_minus_unet"].items():
            ci = "n/a" if d["ci95"] is None else f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
            verdict = {None: "n/a", True: "yes", False: "no"}[d["inside_noise"]]
            lines.append(f"| {group} | {'last epoch' if protocol == 'last' else 'best val'} | "
                         + ", ".join(f"{v:+.3f}" for v in d["values"]) + f" | {plus_minus(d, 3)} | {ci} | {verdict} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "template_seg_abdomen.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--folds", nargs="+", default=list(FOLDS), choices=list(FOLDS))
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (training and timing)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "segcv")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "segmenter_cv.json")
    args = parser.parse_args()
    provenance = Provenance(args.config)
    torch.set_num_threads(args.threads)
    cfg = load_seg_config(args.config)
    if not cfg.baseline_unet or cfg.data.source != "totalsegmentator":
        raise SystemExit(f"{args.config}: needs data.source totalsegmentator and baseline_unet: true")
    if args.epochs is not None:
        cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"epochs": args.epochs})})
    runs = []
    for fold in args.folds:
        for seed in args.seeds:
            runs.append(run(cfg, fold, seed, args.work))
            print(f"fold {fold} seed {seed}: last-epoch test Dice " + ", ".join(
                f"{k} {m['test_dice']['last']['mean']:.3f}" for k, m in runs[-1]["models"].items()), flush=True)
    summary = summarise(runs)
    folds = {f: {"train": FOLDS[f], "test": next(p for p in FOLDS.values() if p != FOLDS[f])} for f in args.folds}
    result = {
        "benchmark": "segmenter_cv", "config": str(args.config.resolve().relative_to(ROOT)),
        "epochs": cfg.optim.epochs, "seeds": args.seeds,
        "folds": folds,
        "protocol": "README figure: test Dice of the last epoch (no choice made); also reported: the checkpoint with "
                    "the best val-slab Dice (val = the training patient's superior slices, never trained on). "
                    "Noise: a paired difference is inside the noise when its 95 % t-interval holds 0.",
        "command": "python benchmarks/segmenter_cv.py " + " ".join(sys.argv[1:]),
        "provenance": provenance.record(
            device="cpu", note="each run's load average when its ms/slice was timed is in runs[].models[].compute"),
        "summary": summary, "runs": [{k: v for k, v in r.items() if k != "config"} for r in runs],
        "table": table(summary, runs[0]["class_names"], folds)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    _write_json(result, args.out)
    print(result["table"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
