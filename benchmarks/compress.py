"""Gradient compression on a zoo model: accuracy and bytes per step for uncompressed DDP, PowerSGD, CSER and the
two-way compressed method, each a real ``torchrun`` run of ``ctzoo train`` (gloo on CPUs, NCCL on GPUs).

The model is the template segmenter (``configs/template_seg_abdomen.yaml``, its UNet baseline off), trained with
``--nproc`` processes for ``--epochs`` epochs from the same seed; accuracy is the validation Dice (mean over the
organs) of the last and the best epoch. Bytes are what each worker sends plus receives per optimiser step, as
``ctzoo train`` logs them, averaged over the run: the training exchange (``comm_bytes_per_step`` in metrics.csv,
CSER's final whole-model average included; see ``ctzoo.scaling.compress``: an all-gather counts the worker's payload
sent and the ``--nproc - 1`` others' received, an all-reduce its size each way), so the two-way methods' bytes grow
with ``--nproc``; plus CSER's per-epoch consensus (``consensus_bytes``: one model each worker sends worker 0 so that
it validates and saves the workers' average), counted once per worker as logged, and shown in a column of its own.
"reduction" is the uncompressed all-reduce's total against the method's, both measured in the same benchmark; with
no successful uncompressed run the columns against it are left out. Time per step at 1, 10 and 25 Gbit/s is an
estimate: the training time per step (the sum of the epochs' ``train_s``: the loader's batches, forward, backward,
the gradient exchange as it ran on this machine, the optimiser step, and CSER's final average; not validation,
checkpoints or the consensus), with the other runs of ``--parallel`` sharing the machine, plus the bytes over the
link, with no overlap of communication and computation.

    python benchmarks/compress.py [--epochs 16] [--nproc 2] [--out benchmarks/results/compress.json]
    python benchmarks/compress.py --device cuda --epochs 200 --eval-every 5 --parallel 10   # docs/scaling.md's

Needs the TotalSegmentator samples (``ctzoo data fetch-samples``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml

sys.path.append(str(Path(__file__).resolve().parent))  # appended: a benchmark never shadows an installed module
from _provenance import Provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "none": {"compression": "none"},
    "powersgd": {"compression": "powersgd", "powersgd_rank": 2},
    "cser": {"compression": "cser", "ratio": 1 / 128, "period": 16, "reset_ratio": 0.25},
    "cser_frequent": {"compression": "cser", "ratio": 1 / 128, "period": 8, "reset_ratio": 0.125},
    "cser_wide": {"compression": "cser", "ratio": 1 / 64, "period": 16, "reset_ratio": 0.25},
    "cser_h32": {"compression": "cser", "ratio": 1 / 128, "period": 32, "reset_ratio": 0.5},
    "cser_light": {"compression": "cser", "ratio": 1 / 256, "period": 16, "reset_ratio": 0.25},
    # two-way under AdamW: 10 uncompressed steps, then Adam's preconditioned momentum, compressed both ways
    "twoway_sign": {"compression": "twoway", "compressor": "sign", "server_compressor": "sign", "warmup_steps": 10},
    "twoway_topk": {"compression": "twoway", "compressor": "topk", "ratio": 1 / 64, "server_compressor": "topk",
                    "warmup_steps": 10},
    # 50 uncompressed steps: a quarter of a 200-step run, as 1-bit Adam warms up (15-25 %); 5 % of 1,000 steps
    "twoway_sign_warm50": {"compression": "twoway", "compressor": "sign", "server_compressor": "sign",
                           "warmup_steps": 50},
    "twoway_topk_warm50": {"compression": "twoway", "compressor": "topk", "ratio": 1 / 64, "server_compressor":
                           "topk", "warmup_steps": 50},
    "twoway_topk256_warm20": {"compression": "twoway", "compressor": "topk", "ratio": 1 / 256,
                              "server_compressor": "topk", "warmup_steps": 20},
}
LINKS_GBIT = (1, 10, 25)


def run(method: str, settings: dict, base: dict, folder: Path, args: argparse.Namespace) -> dict:
    config = {**base, "baseline_unet": False, "distributed": settings,
              "optim": {**base["optim"], "epochs": args.epochs, "eval_every": args.eval_every,
                        **({"seed": args.seed} if args.seed is not None else {})}}
    path = folder / f"{method}.yaml"
    path.write_text(yaml.safe_dump(config))
    out = folder / method
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
               "-m", "ctzoo", "train", str(path), "--out", str(out), "--device", args.device]
    threads = max(1, (os.cpu_count() or 2) // (args.nproc * args.parallel))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{method}: torchrun failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return summarize(method, settings, out)


def summarize(method: str, settings: dict, out: Path) -> dict:
    """One run's row, from the ``metrics.csv`` that ``ctzoo train`` wrote into ``out``."""
    rows = list(csv.DictReader((out / "template_seg" / "metrics.csv").open()))
    curve = []  # (step, megabytes sent up + received down so far, consensus included, val Dice)
    training = consensus = train_s = 0.0
    previous = 0
    for row in rows:
        training += float(row["comm_bytes_per_step"]) * (int(row["step"]) - previous)
        consensus += float(row.get("consensus_bytes") or 0)  # CSER's, once per epoch; absent in the others
        train_s += float(row["train_s"])
        previous = int(row["step"])
        if row.get("val_dice_mean"):
            curve.append((previous, (training + consensus) / 1e6, float(row["val_dice_mean"])))
    dice = [point[2] for point in curve]
    if not dice:
        raise RuntimeError(f"{method}: no validation Dice in {out / 'template_seg' / 'metrics.csv'}")
    steps = int(rows[-1]["step"])
    return {"method": method, "settings": settings, "final_dice": dice[-1], "best_dice": max(dice),
            "dice_curve": dice, "curve_step_mb_dice": curve, "steps": steps, "wall_s": float(rows[-1]["wall_s"]),
            "compute_s_per_step": train_s / steps, "bytes_per_step": (training + consensus) / steps,
            "training_bytes_per_step": training / steps, "consensus_bytes_per_step": consensus / steps,
            "reduction_reported": float(rows[-1]["comm_reduction"])}


def plot(results: list[dict], reference: dict | None, path: Path) -> None:
    """Validation Dice against optimiser steps and against the megabytes each worker moved (consensus included)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_step, by_bytes) = plt.subplots(1, 2, figsize=(13, 5))
    for row in results:
        steps, megabytes, dice = zip(*row["curve_step_mb_dice"])
        label = f"{row['method']} ({row['reduction']:.1f}x)" if "reduction" in row else row["method"]
        by_step.plot(steps, dice, label=label, linewidth=2.5 if row is reference else 1.2)
        by_bytes.plot(megabytes, dice, label=label, linewidth=2.5 if row is reference else 1.2)
    low = min(min(row["dice_curve"]) for row in results)
    top = (reference or max(results, key=lambda row: row["final_dice"]))["final_dice"]
    for axis, xlabel in ((by_step, "optimiser step"), (by_bytes, "MB sent + received per worker (log)")):
        axis.set_xlabel(xlabel)
        axis.set_ylabel("validation Dice (mean over organs)")
        axis.set_ylim(max(low, top - 0.15), None)
        axis.grid(alpha=0.3)
    by_bytes.set_xscale("log")
    by_step.legend(fontsize=8)
    figure.suptitle("Gradient compression: accuracy against steps and against bytes")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "template_seg_abdomen.yaml")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=1, help="validation Dice every this many epochs")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seed", type=int, help="training seed (default: the config's)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (the CPUs are shared out)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda: several processes share a GPU "
                                                         "over gloo when there are fewer GPUs than --nproc")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compress.json")
    parser.add_argument("--runs-dir", type=Path, help="keep the runs (configs, metrics.csv, checkpoints) here")
    parser.add_argument("--collect", action="store_true", help="train nothing: tabulate the runs already in "
                                                                   "--runs-dir (e.g. a benchmark cut short)")
    args = parser.parse_args()
    if args.collect and not args.runs_dir:
        parser.error("--collect needs --runs-dir")
    provenance = Provenance(args.config)
    results = train_all(args)
    failed = [row for row in results if "error" in row]
    results = [row for row in results if "error" not in row]
    report(results, failed, args, provenance)


def train_all(args: argparse.Namespace) -> list[dict]:
    """Every method's row (or its error), training them ``args.parallel`` at a time."""
    base = yaml.safe_load(args.config.read_text())
    with tempfile.TemporaryDirectory(prefix="ctzoo-compress-bench-") as temporary:
        folder = args.runs_dir or Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)

        def one(method: str) -> dict:
            try:
                if args.collect:
                    return summarize(method, METHODS[method], folder / method)
                print(f"{method}: torchrun x{args.nproc}, {args.epochs} epochs", flush=True)
                row = run(method, METHODS[method], base, folder, args)
            # one failed method must not lose the others' runs (a kept run may be cut short or unreadable)
            except (RuntimeError, OSError, KeyError, ValueError, IndexError) as error:
                message = str(error) if isinstance(error, RuntimeError) else f"{method}: {error!r}"
                print(message, flush=True)
                return {"method": method, "settings": METHODS[method], "error": message[-2000:]}
            print(f"{method}: final Dice {row['final_dice']:.4f}, {row['bytes_per_step']:,.0f} bytes/step, "
                  f"{row['wall_s']:.0f} s", flush=True)
            return row

        with ThreadPoolExecutor(args.parallel) as pool:
            return list(pool.map(one, args.methods))


def report(results: list[dict], failed: list[dict], args: argparse.Namespace, provenance: Provenance) -> None:
    """Write the JSON (failures included) first, then the table against the uncompressed run and the plot; with no
    successful uncompressed run the columns against it are left out, and with no successful run at all it stops
    with the failures' count (after writing them). ``provenance``: started before the runs (``--collect``: before
    reading them, so its machine is the one that tabulated; ``trained_on_gpu`` names the runs' GPU)."""
    result = {"benchmark": "compress", "trained_on_gpu": _gpu_name(args),
              "args": {k: str(v) for k, v in vars(args).items()},
              "note": "bytes/step: training exchange (sent + received) + CSER's per-epoch consensus (sent to worker "
                      "0), averaged over the run; final Dice: the last epoch's model (CSER: the workers' average); "
                      "ms/step = training time per step (sum of train_s: no validation, checkpoints or consensus; "
                      "--parallel runs sharing the machine) + bytes over the link, no overlap",
              "baseline": None, "rows": results, "failed": failed, "provenance": provenance.record()}
    write_json(result, args.out)
    for row in failed:
        print(f"{row['method']:<22} failed: {row['error'].strip().splitlines()[-1]}")
    if not results:
        raise SystemExit(f"every method failed ({len(failed)}): nothing to tabulate; wrote {args.out}")
    reference = next((row for row in results if row["method"] == "none"), None)
    if reference is None:
        print("no successful uncompressed run ('none'): the columns against it are left out")
    else:
        result["baseline"] = "none"
    print_table(results, reference)
    write_json(result, args.out)
    plot(results, reference, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))


def print_table(results: list[dict], reference: dict | None) -> None:
    """Print one line per method and add the derived columns to its row: ms/step per link speed, and against the
    uncompressed ``reference`` (when there is one) the reduction and the Dice difference."""
    against = f"{'vs none':>8} " if reference else ""
    print(f"\n{'method':<22} {'final Dice':>10} {against}{'best Dice':>9} {'bytes/step':>11} {'consensus':>10} "
          + (f"{'reduction':>9} " if reference else "") + " ".join(f"{f'ms/step@{g}G':>12}" for g in LINKS_GBIT))
    for row in results:
        row["ms_per_step"] = {str(g): 1000 * (row["compute_s_per_step"] + row["bytes_per_step"] * 8 / (g * 1e9))
                              for g in LINKS_GBIT}
        relative = reduction = ""
        if reference:
            row["reduction"] = reference["bytes_per_step"] / row["bytes_per_step"]
            row["dice_vs_none"] = row["final_dice"] - reference["final_dice"]
            row["within_1pct_of_none"] = row["final_dice"] >= 0.99 * reference["final_dice"]
            relative = f"{100 * row['dice_vs_none'] / reference['final_dice']:>+7.1f}% "
            reduction = f"{row['reduction']:>8.1f}x "
        print(f"{row['method']:<22} {row['final_dice']:>10.4f} {relative}{row['best_dice']:>9.4f} "
              f"{row['bytes_per_step']:>11,.0f} {row['consensus_bytes_per_step']:>10,.0f} {reduction}"
              + " ".join(f"{row['ms_per_step'][str(g)]:>12.1f}" for g in LINKS_GBIT))


def _gpu_name(args: argparse.Namespace) -> str | None:
    """The GPU the runs trained on: this machine's, or (--collect) the one their summaries name."""
    if args.collect:
        names = set()
        for path in args.runs_dir.glob("*/template_seg/summary.json"):
            with contextlib.suppress(OSError, ValueError):  # a run cut off mid-write: its name is not needed
                names.add(json.loads(path.read_text()).get("device_name"))
        return ", ".join(sorted(name for name in names if name)) or None
    return torch.cuda.get_device_name(0) if args.device != "cpu" and torch.cuda.is_available() else None


if __name__ == "__main__":
    main()
