"""Is RECIST-Net training waiting for data? And how fast does the detector run per slice?

Rows, all measured in this run on the same model, every batch full (the miniature's training items repeated:
``repeats`` in the JSON) and every epoch loaded and augmented anew; the step rates in ``--rounds`` rounds, each
round's baseline measured just before its rows, the medians of the rates and of the per-round ratios reported (every
round's figures in the JSON):
  * training steps/s fed by the training loader, vs the same model on 4 batches pre-loaded as tensors (the ceiling
    when data is free): PNG decode, resampling and MONAI augmentation in the workers; the slices read from the
    decoded-slice store instead (``ctzoo data cache``, built here first: its build time is reported); the store
    with the augmentation on the training device (``augment: {resample_on: device}``: the loader reads the HU
    under each sample's window and draws, the device resamples for spacing and augmentation at once and windows,
    per batch), with the recipe's workers (at least 1) and with none; and the in-memory cache (``cache: true``,
    as the miniature's recipes do: resampled and windowed slices, or their HU planes on the device) with either;
  * the augmentation's own cost, on loaded slices (what a worker does per item once loading is cached): per sample
    in one process with the augmentation in the loader, and with it on the device (the worker's draws and window
    of the HU planes, then the device's resample and windowing per batch);
  * inference (``RecistNet.detect``, 512 x 512 x 3 slices) at batch 1 vs batch 16, slices/s;
  * the per-epoch costs outside the steps: the loader's start (a loader rebuilt every epoch starts its workers
    every epoch, as the engine did before; the run-long ``EpochLoader`` starts them once), the epoch's files
    (checkpoints, summary, metrics, curves: written in the loop before, now a CPU snapshot in the loop and the
    writing in a background thread) and one validation pass; then ``fit`` itself for 3 epochs, each epoch's
    measured costs from its metrics.csv.

    python benchmarks/train.py [--data ROOT] [--config configs/recistnet_mini_cpu.yaml] [--steps 20] [--rounds 3]
                               [--device auto] [--out benchmarks/results/train.json]

Without --data a 4-case DeepLesion miniature is built in a temporary folder first.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from ctzoo.datasets.batch_augment import augment_batch
from ctzoo.datasets.deeplesion.dataset import LoadDeepLesiond, collate_lesions, key_slice_items
from ctzoo.datasets.deeplesion.info_csv import read_dl_info
from ctzoo.datasets.deeplesion.mini import make_deeplesion_mini
from ctzoo.datasets.deeplesion.slice_cache import build_slice_cache
from ctzoo.training.engine import RunLog, fit, pick_device, seed_everything, write_epoch_files
from ctzoo.training.epoch_loader import EpochLoader
from ctzoo.training.epoch_writer import cpu_snapshot
from ctzoo.training.recistnet_task import RecistNetTask, load_train_config

sys.path.append(str(Path(__file__).resolve().parent))  # appended: a benchmark never shadows an installed module
from _provenance import Provenance  # noqa: E402


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


def first_batch_s(loader: EpochLoader, seed: int) -> float:
    """Seconds from asking for the epoch to its first batch; the rest of the epoch is drawn (and not timed)."""
    start = time.perf_counter()
    batches = iter(loader.start_epoch(seed))
    next(batches)
    seconds = time.perf_counter() - start
    for _ in batches:
        pass
    return seconds


def augmentation_ms(task: RecistNetTask, device_task: RecistNetTask, device, repeats: int = 3) -> dict:
    """Milliseconds of the augmentation alone on loaded slices: per sample in this process for each mode's loader
    half, and per batch for the device half (medians of ``repeats``)."""
    cfg = task.cfg
    items = key_slice_items(read_dl_info(cfg.data.root / cfg.data.info_csv), "train")
    items = [item for item, _ in zip(itertools.cycle(items), range(cfg.optim.batch_size))]
    loaded = [LoadDeepLesiond(cfg.data)(item) for item in items]
    planes = [LoadDeepLesiond(cfg.data, resample=False)(item) for item in items]  # what the device mode caches

    def per_sample(transform, loaded: list) -> tuple[float, list]:
        times, outs = [], []
        for r in range(repeats):
            start = time.perf_counter()
            for i, sample in enumerate(loaded):
                transform.set_random_state(seed=r * len(loaded) + i)
                outs.append(transform(sample))
            times.append(1000 * (time.perf_counter() - start) / len(loaded))
        return median(times), outs[: len(loaded)]

    loader_ms, _ = per_sample(task.train_transform, loaded)
    window_ms, windows = per_sample(device_task.train_transform, planes)
    batch = collate_lesions(windows)
    augment_batch(batch, cfg.train_size, device, cfg.data)  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        augment_batch(batch, cfg.train_size, device, cfg.data)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return {"loader_ms_per_sample": loader_ms, "window_ms_per_sample": window_ms,
            "device_ms_per_batch": median(times), "batch": len(loaded)}


def epochs_of(loader: EpochLoader) -> Iterator[dict]:
    """The loader's batches epoch after epoch, each epoch's items loaded and augmented anew (``itertools.cycle`` would
    replay the first epoch's batches from memory, and measure no loading at all)."""
    for seed in itertools.count():
        yield from loader.start_epoch(seed)


def pipeline_rate(cfg, model, device, steps: int, workers: int) -> float:
    """Train steps/s of ``model`` fed by the training loader of ``cfg`` with ``workers`` worker processes."""
    task = RecistNetTask(cfg)
    try:
        return train_steps(task, model, epochs_of(task.train_batches(0, cfg.optim.batch_size, workers, 0, 1)), device,
                           steps)
    finally:
        task.close()


def full_batch_repeats(cfg) -> int:
    """Passes over the training items per epoch that make every batch full (at least 4 of them): a small miniature
    holds fewer training items than a batch (the default 4-case one: 3), and a short batch costs the model and the
    loader less than the recipe's."""
    items = len(key_slice_items(read_dl_info(cfg.data.root / cfg.data.info_csv), "train", cfg.data.drop_noisy,
                                cfg.data.negatives_per_series))
    step = math.lcm(items, cfg.optim.batch_size) // items
    return step * math.ceil(4 * cfg.optim.batch_size / (items * step))


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def epoch_costs(task: RecistNetTask, model, device, workers: int, out: Path, repeats: int = 3) -> dict:
    """Each per-epoch cost outside the steps, before and now, measured here (medians of ``repeats``)."""
    batch = task.cfg.optim.batch_size
    def loader() -> EpochLoader:
        return EpochLoader(task.train_set, batch, workers, collate_fn=collate_lesions)

    rebuilt = []
    for seed in range(repeats):
        fresh = loader()
        rebuilt.append(first_batch_s(fresh, seed))
        fresh.close()
    kept_loader = loader()
    first_batch_s(kept_loader, 0)  # its workers start here, once
    kept = median([first_batch_s(kept_loader, seed) for seed in range(1, repeats + 1)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_steps(task, model, itertools.cycle([next(iter(kept_loader))]), device, 1)  # Adam's state exists
    history = [{"epoch": e + 1, "train_loss": 1.0 / (e + 1), "val_sensitivity_4fp": 0.1 * e} for e in range(10)]
    runlog = RunLog(out, [])
    in_loop, snapshot = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        payload = cpu_snapshot({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "history": history})
        snapshot.append(time.perf_counter() - start)
        write_epoch_files(out, payload, True, runlog, history, {"epochs": 10})
        in_loop.append(time.perf_counter() - start)
    runlog.close()
    kept_loader.close()
    start = time.perf_counter()
    task.evaluate(model.eval(), device)
    evaluation = time.perf_counter() - start
    model.train()
    return {"loader_start_rebuilt_s": median(rebuilt), "loader_start_kept_s": kept, "files_in_loop_s": median(in_loop),
            "files_snapshot_s": median(snapshot), "checkpoint_mb": (out / "last.pt").stat().st_size / 2**20,
            "evaluation_s": evaluation, "workers": workers}


def fit_epochs(task: RecistNetTask, out: Path, device: str, epochs: int = 3) -> dict:
    """``fit`` for ``epochs`` epochs (validation each): each epoch's costs as its metrics.csv states them."""
    summary = fit(task, task.cfg.optim.model_copy(update={"epochs": epochs, "eval_every": 1}), out, device=device,
                  progress=False)
    import csv

    rows = list(csv.DictReader((out / "metrics.csv").open()))
    keys = ("first_batch_s", "train_s", "eval_s", "write_wait_s")
    return {"epochs": [{"epoch": int(r["epoch"]), **{k: float(r[k]) for k in keys}} for r in rows],
            "epoch_files_s": summary["epoch_files_s"], "epoch_files_wait_s": summary["epoch_files_wait_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="DeepLesion(-format) root; default: a new 4-case mini")
    parser.add_argument("--config", type=Path, default=Path(__file__).parents[1] / "configs/recistnet_mini_cpu.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the step-rate rows: medians are reported")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train.json")
    args = parser.parse_args()
    provenance = Provenance(args.config)
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or make_deeplesion_mini(Path(tmp) / "mini", cases=4, seed=0, progress=False)
        recipe = load_train_config(args.config, root)
        # each row says where it loads from and augments, whatever the recipe chose
        cfg = recipe.model_copy(update={"cache": False,  # measure the real decode, not a warm cache
                                        "repeats": full_batch_repeats(recipe),
                                        "augment": recipe.augment.model_copy(update={"resample_on": "loader"})})
        task = RecistNetTask(cfg)
        seed_everything(0)
        model = task.build_model().to(device).train()
        preloaded = [batch for batch, _ in zip(epochs_of(task.train_batches(0, cfg.optim.batch_size, 0, 0, 1)),
                                                range(4))]
        folders = {row.series_folder for row in read_dl_info(Path(root) / "DL_info.csv")}
        store = build_slice_cache(Path(root) / "Images_png", folders, Path(tmp) / "slice_cache")
        stored = cfg.model_copy(update={"data": cfg.data.model_copy(update={"slice_cache": Path(tmp) / "slice_cache"})})
        on_device = {"augment": cfg.augment.model_copy(update={"resample_on": "device"})}
        workers = max(1, cfg.optim.num_workers)
        variants = [  # (what the row says, the config, loader workers)
            (f"real pipeline: PNG decode, augmentation in the loader ({workers} workers)", cfg, workers),
            (f"slices from the store, augmentation in the loader ({workers} workers)", stored, workers),
            (f"store, augmentation on the device ({workers} workers)", stored.model_copy(update=on_device), workers),
            ("store, augmentation on the device (0 workers: read between steps)",
             stored.model_copy(update=on_device), 0),
            (f"in-memory cache (cache: true), augmentation in the loader ({workers} workers)",
             cfg.model_copy(update={"cache": True}), workers),
            ("in-memory cache, augmentation on the device (0 workers)",
             cfg.model_copy(update={"cache": True, **on_device}), 0),
        ]
        # rounds of every row, each against the baseline measured just before it: this VM's speed drifts by the
        # minute, and a ratio is only as good as its baseline's timing
        rounds = []
        for _ in range(args.rounds):
            baseline = train_steps(task, model, preloaded, device, args.steps)
            rounds.append([baseline] + [pipeline_rate(variant, model, device, args.steps, n) for _, variant, n in
                                        variants])
        cached = median([r[0] for r in rounds])
        rates = [(label, median([r[k + 1] for r in rounds]), median([r[k + 1] / r[0] for r in rounds]))
                 for k, (label, _, _) in enumerate(variants)]
        device_task = RecistNetTask(stored.model_copy(update=on_device))
        augmentation = augmentation_ms(task, device_task, device)
        task.close()
        (Path(tmp) / "costs").mkdir()
        costs = epoch_costs(task, model, device, workers, Path(tmp) / "costs")
        # without hard-negative mining, whose new items need a new loader (every 5th epoch in the CPU recipe)
        run = fit_epochs(RecistNetTask(recipe.model_copy(update={"hard_negatives": None,
                                                                 "repeats": cfg.repeats})), Path(tmp) / "run",
                         str(device))
    model.eval()
    single = inference_rate(model, device, 1, 8)
    batched = inference_rate(model, device, 16, 2)
    rows = [
        {"measure": "train steps/s, pre-loaded tensors (baseline)", "value": cached, "ratio": 1.0},
        *({"measure": f"train steps/s, {label}", "value": rate, "ratio": ratio} for label, rate, ratio in rates),
        {"measure": "augmentation ms per sample, in the loader (one process; before)",
         "value": augmentation["loader_ms_per_sample"], "ratio": 1.0},
        {"measure": "augmentation ms per sample, on the device: the loader's draws and window",
         "value": augmentation["window_ms_per_sample"],
         "ratio": augmentation["window_ms_per_sample"] / augmentation["loader_ms_per_sample"]},
        {"measure": f"augmentation ms per sample, on the device: its resample and windowing of a batch of "
                    f"{augmentation['batch']}",
         "value": augmentation["device_ms_per_batch"] / augmentation["batch"],
         "ratio": augmentation["device_ms_per_batch"] / augmentation["batch"] / augmentation["loader_ms_per_sample"]},
        {"measure": "inference slices/s, batch 1 (baseline)", "value": single, "ratio": 1.0},
        {"measure": "inference slices/s, batch 16", "value": batched, "ratio": batched / single},
        {"measure": f"loader start per epoch, s, rebuilt each epoch ({costs['workers']} workers; before)",
         "value": costs["loader_start_rebuilt_s"], "ratio": 1.0},
        {"measure": "loader start per epoch, s, kept for the run (now)", "value": costs["loader_start_kept_s"],
         "ratio": costs["loader_start_kept_s"] / costs["loader_start_rebuilt_s"]},
        {"measure": f"epoch files in the loop, s ({costs['checkpoint_mb']:.1f} MB last.pt; before)",
         "value": costs["files_in_loop_s"], "ratio": 1.0},
        {"measure": "epoch files: the loop's CPU snapshot, s (now)", "value": costs["files_snapshot_s"],
         "ratio": costs["files_snapshot_s"] / costs["files_in_loop_s"]},
    ]
    print(f"{'measure':72s} {'value':>10s} {'ratio':>8s}")
    for row in rows:
        print(f"{row['measure']:72s} {row['value']:10.2f} {row['ratio']:7.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    document = {"benchmark": "train", "config": str(args.config), "batch_size": cfg.optim.batch_size,
                "repeats": cfg.repeats, "rounds": rounds,
                "recipe": {"cache": recipe.cache, "workers": recipe.optim.num_workers,
                           "resample_on": recipe.augment.resample_on},
                "train_size": list(cfg.train_size), "device": str(device), "rows": rows, "slice_store": store,
                "augmentation": augmentation, "epoch_costs": costs, "fit": run,
                "provenance": provenance.record()}
    args.out.write_text(json.dumps(document, indent=2))
    print(f"validation pass: {costs['evaluation_s']:.2f} s; fit, per epoch "
          + ", ".join(f"{k} " + "/".join(f"{e[k]:.2f}" for e in run["epochs"]) for k in run["epochs"][0]
                      if k != "epoch")
          + f"; epoch files {run['epoch_files_s']:.2f} s in the background, {run['epoch_files_wait_s']:.2f} s waited")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
