"""Leave-one-scan-out FROC for RECIST-Net: how does the recipe do on anatomy it never trained on?

The DeepLesion-format miniature draws every patient from one of three real CT scans. For each scan this
benchmark builds a miniature whose whole test split, and nothing else, comes from that scan
(``ctzoo data make-deeplesion-mini --test-source``), trains the recipe on the other two scans (model chosen on
their val patients), and on the held-out scan measures:

* FROC on the test split with the three decoders: ``grouping`` (RECIST-Net's own), ``centre`` and ``both``;
* findings per slice on the held-out scan *without* synthetic lesions (real CT, no known lesion: every finding
  is a false positive) at the zoo's score threshold and at the threshold chosen on val for 1 FP per image;
* calibration (ECE) on val;
* with ``--compare OLD_WORK``: the same fold's model of an earlier run (another recipe or another miniature) on
  *this* fold's test split, so two recipes are compared on the same unseen lesions.

The folds re-split one plain miniature (``--base``, built when missing), so the three folds share its images.
Resumable: a fold's data, training and evaluation are skipped when their outputs exist (training resumes).

    python benchmarks/loso.py [--epochs 40] [--cases 240] [--base data/deeplesion-mini] [--work runs/loso]
                              [--scans sample_ct example_ct ...] [--compare runs/loso-old]
                              [--out benchmarks/results/loso.json]

Needs the TotalSegmentator samples (fetched on first use). About 15 minutes per fold on a 2-core CPU at
40 epochs, plus about 11 for the base miniature.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ctzoo.datasets.samples import REAL_CT_SCANS, real_ct_scan
from ctzoo.training.checkpoint_bundle import bundle_from_checkpoint
from ctzoo.training.evaluate import evaluate_recistnet, findings_on_lesion_free_ct

sys.path.append(str(Path(__file__).resolve().parent))  # appended: a benchmark never shadows an installed module
from _provenance import Provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DECODES = ("grouping", "centre", "both")
ZOO_THRESHOLD = 0.3  # the score threshold ctzoo infer / serve / pacs use by default
REPORT = (0.5, 1.0, 2.0, 4.0)
LESION_FREE_PER_SERIES = 0  # DeepLesion's protocol: val and test score their key slices only


def ctzoo(*args: str) -> None:
    """Run one ctzoo command as a user would, failing loudly."""
    subprocess.run([sys.executable, "-m", "ctzoo", *args], check=True)


def finished_epochs(run: Path) -> int:
    last = run / "last.pt"
    return int(torch.load(last, map_location="cpu", weights_only=False)["epoch"]) + 1 if last.exists() else 0


def fold(scan: str, args: argparse.Namespace) -> dict:
    work = args.work / scan
    data, run = work / "data", work / "run"
    started = time.perf_counter()
    if not (data / "lesions.json").exists():  # the base miniature's cases, re-split: the images are the same
        ctzoo("data", "make-deeplesion-mini", str(data), "--test-source", scan, "--from", str(args.base), "--force")
    done = finished_epochs(run)
    if done < args.epochs:
        ctzoo("train", str(args.config), "--out", str(run), "--epochs", str(args.epochs), "--data-root", str(data),
              "--device", args.device, *(["--resume"] if done else []))
    checkpoint = run / "best.pt"
    evaluate_recistnet(args.config, work / "eval-test", "test", checkpoint=checkpoint, data_root=data,
                       device=args.device, decodes=("both", "grouping", "centre"),
                       lesion_free_per_series=LESION_FREE_PER_SERIES)
    tested = json.loads((work / "eval-test" / "froc.json").read_text())
    evaluate_recistnet(args.config, work / "eval-val", "val", checkpoint=checkpoint, data_root=data,
                       device=args.device, lesion_free_per_series=LESION_FREE_PER_SERIES)
    val = json.loads((work / "eval-val" / "froc.json").read_text())
    val_threshold = next(p["score_threshold"] for p in val["operating_points"] if p["fp_per_image"] == 1.0)
    bundle = bundle_from_checkpoint(checkpoint, work / "bundle")
    lesion_free = {f"{t:g}": findings_on_lesion_free_ct(bundle, {scan: real_ct_scan(scan)}, t)
                   for t in (ZOO_THRESHOLD, val_threshold)}
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    baseline = None
    if args.compare is not None:
        old = args.compare / scan / "run" / "best.pt"
        evaluate_recistnet(args.config, work / "eval-test-compare", "test", checkpoint=old, data_root=data,
                           device=args.device, decodes=DECODES, lesion_free_per_series=LESION_FREE_PER_SERIES)
        compared = json.loads((work / "eval-test-compare" / "froc.json").read_text())
        baseline = {"checkpoint": str(old),
                    "sensitivity": {mode: dict(zip([f"{f:g}" for f in compared["decodes"][mode]["fps_per_image"]],
                                                   compared["decodes"][mode]["sensitivities"])) for mode in DECODES},
                    "froc_mean_0p5_to_4": {mode: compared["decodes"][mode]["mean_sensitivity_0p5_to_4"]
                                           for mode in DECODES}}
    return {
        "held_out_scan": scan, "epochs": args.epochs, "best_epoch": int(state["epoch"]) + 1,
        "test_images": tested["num_images"], "test_lesions": tested["num_lesions"],
        "sensitivity": {mode: dict(zip([f"{f:g}" for f in tested["decodes"][mode]["fps_per_image"]],
                                       tested["decodes"][mode]["sensitivities"])) for mode in DECODES},
        "froc_mean_0p5_to_4": {mode: tested["decodes"][mode]["mean_sensitivity_0p5_to_4"] for mode in DECODES},
        "val_sensitivity_4fp": val["sensitivities"][3], "val_ece": val["calibration"]["ece"],
        "val_threshold_1fp": val_threshold,
        "lesion_free_findings_per_slice": {t: r["findings_per_slice"] for t, r in lesion_free.items()},
        "lesion_free": lesion_free, "baseline": baseline, "seconds": round(time.perf_counter() - started, 1)}


def table(folds: list[dict]) -> str:
    head = "| held-out scan | decode | " + " | ".join(f"sens @ {f:g} FP" for f in REPORT) + " | mean 0.5-4 |"
    lines = [head, "|" + "---|" * (3 + len(REPORT))]
    for mode in DECODES:
        for f in folds:
            lines.append(f"| {f['held_out_scan']} | {mode} | " + " | ".join(
                f"{f['sensitivity'][mode][f'{r:g}']:.3f}" for r in REPORT)
                + f" | {f['froc_mean_0p5_to_4'][mode]:.3f} |")
        means = [np.mean([f["sensitivity"][mode][f"{r:g}"] for f in folds]) for r in REPORT]
        lines.append(f"| **mean of {len(folds)}** | {mode} | " + " | ".join(f"**{m:.3f}**" for m in means)
                     + f" | **{np.mean([f['froc_mean_0p5_to_4'][mode] for f in folds]):.3f}** |")
    lines += ["", "| held-out scan | findings/slice at 0.3 (zoo) | val threshold for 1 FP/image | findings/slice there "
              "| val ECE |", "|---|---:|---:|---:|---:|"]
    for f in folds:
        rates = list(f["lesion_free_findings_per_slice"].values())
        lines.append(f"| {f['held_out_scan']} | {rates[0]:.3f} | {f['val_threshold_1fp']:.3f} | {rates[-1]:.3f} "
                     f"| {f['val_ece']:.3f} |")
    compared = [f for f in folds if f.get("baseline")]
    if compared:
        lines += ["", "| held-out scan | decode | this run @ 4 FP | compared run @ 4 FP | this run mean 0.5-4 "
                  "| compared mean 0.5-4 |", "|---|---|---:|---:|---:|---:|"]
        for f in compared:
            for mode in DECODES:
                lines.append(f"| {f['held_out_scan']} | {mode} | {f['sensitivity'][mode]['4']:.3f} | "
                             f"{f['baseline']['sensitivity'][mode]['4']:.3f} | {f['froc_mean_0p5_to_4'][mode]:.3f} | "
                             f"{f['baseline']['froc_mean_0p5_to_4'][mode]:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "recistnet_mini_cpu.yaml")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--cases", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scans", nargs="+", default=list(REAL_CT_SCANS), choices=list(REAL_CT_SCANS))
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "loso")
    parser.add_argument("--base", type=Path, default=ROOT / "data" / "deeplesion-mini",
                        help="the plain miniature the folds re-split (built here when missing)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compare", type=Path, default=None,
                        help="an earlier --work folder: its fold models are scored on this run's test splits too")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "loso.json")
    args = parser.parse_args()
    provenance = Provenance(args.config)
    if not (args.base / "lesions.json").exists():
        ctzoo("data", "make-deeplesion-mini", str(args.base), "--cases", str(args.cases), "--seed", str(args.seed))
    base = json.loads((args.base / "lesions.json").read_text())
    if (base["cases"], base["seed"], base.get("test_source")) != (args.cases, args.seed, None):
        raise SystemExit(f"{args.base} holds {base['cases']} cases of seed {base['seed']}; pass --base for "
                         f"{args.cases} cases of seed {args.seed}")
    folds = [fold(scan, args) for scan in args.scans]
    result = {
        "benchmark": "loso", "data": "synthetic lesions in three real CT scans (DeepLesion-format miniature); "
        "each fold tests on the scan it holds out",
        "config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
        "compare": None if args.compare is None else str(args.compare),
        "epochs": args.epochs, "cases": args.cases, "seed": args.seed, "zoo_threshold": ZOO_THRESHOLD,
        "lesion_free_per_series": LESION_FREE_PER_SERIES,
        "command": "python benchmarks/loso.py " + " ".join(sys.argv[1:]),
        "folds": folds,
        "mean": {mode: {f"{r:g}": float(np.mean([f["sensitivity"][mode][f"{r:g}"] for f in folds])) for r in REPORT}
                 for mode in DECODES},
        "table": table(folds), "provenance": provenance.record()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(result["table"])


if __name__ == "__main__":
    main()
