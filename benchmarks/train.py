"""Is RECIST-Net training waiting for data? And how fast does the detector run per slice?

Rows, all measured in this run on the same model:
  * training steps/s with the real pipeline (PNG decode, resampling, MONAI augmentation in DataLoader
    workers), and with the slices read from the decoded-slice store (``ctzoo data cache``, built here first:
    its build time is reported) vs with the same batches pre-loaded as tensors (the ceiling when data is free);
  * inference (``RecistNet.detect``, 512 x 512 x 3 slices) at batch 1 vs batch 16, slices/s.

    python benchmarks/train.py [--data ROOT] [--config configs/recistnet_mini_cpu.yaml] [--steps 20]
                               [--device auto] [--out benchmarks/results/train.json]

Without --data a 4-case DeepLesion miniature is built in a temporary folder first.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from ctzoo.datasets.deeplesion.info_csv import read_dl_info
from ctzoo.datasets.deeplesion.mini import make_deeplesion_mini
from ctzoo.datasets.deeplesion.slice_cache import build_slice_cache
from ctzoo.training.engine import pick_device, seed_everything
from ctzoo.training.recistnet_task import RecistNetTask, load_train_config


def train_steps(task: RecistNetTask, model, batches, device, steps: int) -> float:
    """Steps per second over ``steps`` optimiser steps drawn from ``batches`` (after two warm-up steps)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    iterator = itertools.cycle(batches) if isinstance(batches, list) else iter(batches)

    def step() -> None:
        loss, _ = task.loss(model, next(iterator), device)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def inference_rate(model, device, batch: int, repeats: int) -> float:
    in_channels = next(model.parameters()).shape[1]  # the first convolution's input channels
    images = torch.rand(batch, in_channels, 512, 512, device=device)
    model.detect(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        model.detect(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="DeepLesion(-format) root; default: a new 4-case mini")
    parser.add_argument("--config", type=Path, default=Path(__file__).parents[1] / "configs/recistnet_mini_cpu.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train.json")
    args = parser.parse_args()
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or make_deeplesion_mini(Path(tmp) / "mini", cases=4, seed=0, progress=False)
        cfg = load_train_config(args.config, root)
        cfg = cfg.model_copy(update={"cache": False})  # measure the real decode, not a warm cache
        task = RecistNetTask(cfg)
        seed_everything(0)
        model = task.build_model().to(device).train()
        loader = task.train_batches(0, cfg.optim.batch_size, cfg.optim.num_workers, 0, 1)
        real = train_steps(task, model, itertools.cycle(loader), device, args.steps)
        preloaded = [batch for batch, _ in zip(itertools.cycle(loader), range(4))]
        cached = train_steps(task, model, preloaded, device, args.steps)
        folders = {row.series_folder for row in read_dl_info(Path(root) / "DL_info.csv")}
        store = build_slice_cache(Path(root) / "Images_png", folders, Path(tmp) / "slice_cache")
        stored_task = RecistNetTask(cfg.model_copy(update={"data": cfg.data.model_copy(
            update={"slice_cache": Path(tmp) / "slice_cache"})}))
        stored_loader = stored_task.train_batches(0, cfg.optim.batch_size, cfg.optim.num_workers, 0, 1)
        from_store = train_steps(stored_task, model, itertools.cycle(stored_loader), device, args.steps)
    model.eval()
    single = inference_rate(model, device, 1, 8)
    batched = inference_rate(model, device, 16, 2)
    rows = [
        {"measure": "train steps/s, pre-loaded tensors (baseline)", "value": cached, "ratio": 1.0},
        {"measure": f"train steps/s, real pipeline ({cfg.optim.num_workers} workers)", "value": real,
         "ratio": real / cached},
        {"measure": f"train steps/s, slices from the store ({cfg.optim.num_workers} workers)", "value": from_store,
         "ratio": from_store / cached},
        {"measure": "inference slices/s, batch 1 (baseline)", "value": single, "ratio": 1.0},
        {"measure": "inference slices/s, batch 16", "value": batched, "ratio": batched / single},
    ]
    print(f"{'measure':52s} {'value':>10s} {'ratio':>8s}")
    for row in rows:
        print(f"{row['measure']:52s} {row['value']:10.2f} {row['ratio']:7.2f}x")
    machine = {"platform": platform.platform(), "device": str(device),
               "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
               "torch": torch.__version__, "cpus": torch.get_num_threads()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    document = {"benchmark": "train", "config": str(args.config), "batch_size": cfg.optim.batch_size,
                "train_size": list(cfg.train_size), "machine": machine, "rows": rows, "slice_store": store}
    args.out.write_text(json.dumps(document, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
