"""Does RECIST-Net learn as well with its augmentation resampled on the device as in the loader?

Trains the CPU recipe twice on the same DeepLesion-format miniature, seed and epochs, once per
``augment.resample_on`` (``loader``, then ``device``). Each run's model is chosen on val (``best.pt``: the best val
sensitivity at 4 FPs of the validations every ``--eval-every`` epochs), then scored once on the test split
(DeepLesion's FROC). Records per mode: the val curve, the chosen epoch, test sensitivities, the training wall time.
The miniature's lesions are synthetic, on real CT: a comparison of the two modes, not a DeepLesion result.

    python benchmarks/augment_modes.py --data data/deeplesion-mini [--epochs 20] [--eval-every 5]
                                       [--config configs/recistnet_mini_cpu.yaml] [--device auto]
                                       [--out benchmarks/results/augment_modes.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from ctzoo.training.engine import fit
from ctzoo.training.evaluate import evaluate_recistnet
from ctzoo.training.recistnet_task import RecistNetTask, load_train_config

sys.path.append(str(Path(__file__).resolve().parent))  # appended: a benchmark never shadows an installed module
from _provenance import Provenance  # noqa: E402

LESION_FREE_PER_SERIES = 0  # DeepLesion's protocol: the test split's key slices only


def train_and_test(config: Path, root: Path, mode: str, epochs: int, eval_every: int, device: str,
                   out: Path) -> dict:
    """One mode: fit, the model chosen on val, its test FROC."""
    cfg = load_train_config(config, root)
    cfg = cfg.model_copy(update={"augment": cfg.augment.model_copy(update={"resample_on": mode})})
    start = time.perf_counter()
    summary = fit(RecistNetTask(cfg), cfg.optim.model_copy(update={"epochs": epochs, "eval_every": eval_every}),
                  out, device=device, progress=False)
    wall = time.perf_counter() - start
    test = evaluate_recistnet(config, out / "test", "test", checkpoint=out / "best.pt", data_root=root, device=device,
                              lesion_free_per_series=LESION_FREE_PER_SERIES)
    history = torch.load(out / "last.pt", weights_only=False)["history"]
    val = [(h["epoch"], h["val_sensitivity_4fp"]) for h in history if "val_sensitivity_4fp" in h]
    sensitivities = dict(zip(test.fps_per_image, test.sensitivities))
    return {"mode": mode, "train_wall_s": wall, "best_val_sensitivity_4fp": summary["best_sensitivity_4fp"],
            "best_epoch": max(val, key=lambda pair: pair[1])[0], "val_sensitivity_4fp": val,
            "train_loss": [(h["epoch"], h["train_loss"]) for h in history],
            "test_sensitivity_1fp": sensitivities[1], "test_sensitivity_4fp": sensitivities[4],
            "test_froc_mean_0p5_4": test.mean_sensitivity_0p5_to_4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="DeepLesion(-format) root")
    parser.add_argument("--config", type=Path, default=Path(__file__).parents[1] / "configs/recistnet_mini_cpu.yaml")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "augment_modes.json")
    args = parser.parse_args()
    run = Provenance(args.config)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("loader", "device"):
            runs.append(train_and_test(args.config, args.data, mode, args.epochs, args.eval_every, args.device,
                                       Path(tmp) / mode))
            print(f"{mode}: best epoch {runs[-1]['best_epoch']}, test sensitivity at 1/4 FPs "
                  f"{runs[-1]['test_sensitivity_1fp']:.3f}/{runs[-1]['test_sensitivity_4fp']:.3f}, "
                  f"{runs[-1]['train_wall_s']:.0f} s", flush=True)
    document = {"benchmark": "augment_modes", "config": str(args.config), "data": str(args.data),
                "epochs": args.epochs, "eval_every": args.eval_every, "synthetic_lesions": True,
                "lesion_free_per_series": LESION_FREE_PER_SERIES, "runs": runs, "provenance": run.record()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2))
    print(f"{'mode':8s} {'best epoch':>10s} {'test sens@1FP':>14s} {'test sens@4FP':>14s} {'train s':>8s}")
    for run in runs:
        print(f"{run['mode']:8s} {run['best_epoch']!s:>10s} {run['test_sensitivity_1fp']:14.3f} "
              f"{run['test_sensitivity_4fp']:14.3f} {run['train_wall_s']:8.0f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
