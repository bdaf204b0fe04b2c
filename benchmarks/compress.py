"""Gradient compression on a zoo model: accuracy and bytes per step for uncompressed DDP, PowerSGD, CSER and the
two-way compressed method, each a real ``torchrun`` run of ``ctzoo train`` (gloo on CPUs, NCCL on GPUs).

The model is the template segmenter (``configs/template_seg_abdomen.yaml``, its UNet baseline off), trained with
``--nproc`` processes for ``--epochs`` epochs from the same seed; accuracy is the validation Dice (mean over the
organs) of the last and the best epoch. Bytes are what each worker sends up plus receives down per optimiser step
(``comm_bytes_per_step`` in metrics.csv); "reduction" is against the uncompressed all-reduce measured in the same
run. Time per step at 1, 10 and 25 Gbit/s is an estimate: the measured compute time per step (this machine, all
processes) plus the bytes over the link, with no overlap of communication and computation.

    python benchmarks/compress.py [--epochs 16] [--nproc 2] [--out benchmarks/results/compress.json]

Needs the TotalSegmentator samples (``ctzoo data fetch-samples``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "none": {"compression": "none"},
    "powersgd": {"compression": "powersgd", "powersgd_rank": 2},
    "cser": {"compression": "cser", "ratio": 1 / 128, "period": 16, "reset_ratio": 0.25},
    "cser_frequent": {"compression": "cser", "ratio": 1 / 128, "period": 8, "reset_ratio": 0.125},
    "cser_wide": {"compression": "cser", "ratio": 1 / 64, "period": 16, "reset_ratio": 0.25},
    # two-way under AdamW: 10 uncompressed steps, then Adam's preconditioned momentum, compressed both ways
    "twoway_sign": {"compression": "twoway", "compressor": "sign", "server_compressor": "sign", "warmup_steps": 10},
    "twoway_topk": {"compression": "twoway", "compressor": "topk", "ratio": 1 / 64, "server_compressor": "topk",
                    "warmup_steps": 10},
    # a quarter of the run uncompressed, as 1-bit Adam warms up (15-25 %)
    "twoway_sign_warm50": {"compression": "twoway", "compressor": "sign", "server_compressor": "sign",
                           "warmup_steps": 50},
}
LINKS_GBIT = (1, 10, 25)


def run(method: str, settings: dict, base: dict, folder: Path, nproc: int, epochs: int) -> dict:
    config = {**base, "baseline_unet": False, "distributed": settings,
              "optim": {**base["optim"], "epochs": epochs, "eval_every": 1}}
    path = folder / f"{method}.yaml"
    path.write_text(yaml.safe_dump(config))
    out = folder / method
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "ctzoo", "train", str(path), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{method}: torchrun failed:\n{(done.stdout + done.stderr)[-3000:]}")
    rows = list(csv.DictReader((out / "template_seg" / "metrics.csv").open()))
    dice = [float(r["val_dice_mean"]) for r in rows if r.get("val_dice_mean")]
    steps, wall = int(rows[-1]["step"]), float(rows[-1]["wall_s"])
    bytes_per_step = sum(float(r["comm_bytes_per_step"]) for r in rows) / len(rows)
    return {"method": method, "settings": settings, "final_dice": dice[-1], "best_dice": max(dice),
            "dice_curve": dice, "steps": steps, "wall_s": wall, "compute_s_per_step": wall / steps,
            "bytes_per_step": bytes_per_step, "reduction_reported": float(rows[-1]["comm_reduction"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "template_seg_abdomen.yaml")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compress.json")
    args = parser.parse_args()
    base = yaml.safe_load(args.config.read_text())
    results = []
    with tempfile.TemporaryDirectory(prefix="ctzoo-compress-bench-") as folder:
        for method in args.methods:
            print(f"{method}: torchrun x{args.nproc}, {args.epochs} epochs", flush=True)
            results.append(run(method, METHODS[method], base, Path(folder), args.nproc, args.epochs))
    reference = next((r for r in results if r["method"] == "none"), results[0])
    print(f"\n{'method':<9} {'final Dice':>10} {'best Dice':>9} {'bytes/step':>11} {'reduction':>9} "
          + " ".join(f"{f'ms/step@{g}G':>12}" for g in LINKS_GBIT))
    for row in results:
        row["reduction"] = reference["bytes_per_step"] / row["bytes_per_step"]
        row["dice_vs_none"] = row["final_dice"] - reference["final_dice"]
        row["ms_per_step"] = {str(g): 1000 * (row["compute_s_per_step"] + row["bytes_per_step"] * 8 / (g * 1e9))
                              for g in LINKS_GBIT}
        print(f"{row['method']:<9} {row['final_dice']:>10.4f} {row['best_dice']:>9.4f} "
              f"{row['bytes_per_step']:>11,.0f} {row['reduction']:>8.1f}x "
              + " ".join(f"{row['ms_per_step'][str(g)]:>12.1f}" for g in LINKS_GBIT))
    result = {"benchmark": "compress", "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "args": {k: str(v) for k, v in vars(args).items()},
              "note": "ms/step = measured compute per step + bytes over the link (no overlap)", "rows": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
