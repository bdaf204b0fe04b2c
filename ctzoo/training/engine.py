"""One training loop for every zoo task: checkpoints, bit-for-bit resume, logs, curves, AMP and DDP.

A task (see :class:`Task`) says how to build the model and data and how to compute its loss and
validation metrics; this module does the rest, the same way for every model.

Reproducibility: every epoch starts from seeds derived from ``(seed, epoch)`` alone — torch, numpy,
Python, the data-loader shuffle and, per item, every MONAI random transform (:mod:`ctzoo.training.epoch_loader`).
A run resumed from the checkpoint of epoch e therefore replays epoch e + 1 exactly as an uninterrupted run does
(tested: identical weights), without storing RNG states; what a task changes in training (its mined hard negatives)
the checkpoint keeps (``Task.checkpoint_state``), and the learning rate follows the fraction of the epochs done.

Per-epoch costs off the loop: the loader's workers start once per run, and each epoch's checkpoints, summary,
metrics table and curves are written in a background thread (:mod:`ctzoo.training.epoch_writer`). Each epoch's row
in metrics.csv states what is left: ``first_batch_s`` (the loader's start), ``train_s``, ``eval_s`` (validation)
and ``write_wait_s`` (waiting for the epoch before's files); summary.json the files' total cost.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.distributed as dist
from monai.data.utils import set_rnd
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from ctzoo.config import StrictConfig
from ctzoo.inference.backends import resolve_device
from ctzoo.io.atomic import atomic_path
from ctzoo.training.epoch_writer import EpochWriter, cpu_snapshot
from ctzoo.training.resume_check import config_changes, refusal, resume_record
from ctzoo.training.step_events import StepEvents

log = logging.getLogger(__name__)


class OptimConfig(StrictConfig):
    """How to train: optimiser, schedule, precision and loaders."""

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(1.0, ge=0, description="linear warm-up, then cosine decay to lr * final_lr_ratio")
    final_lr_ratio: float = Field(0.01, ge=0, le=1)
    decay_epochs: float | None = Field(None, gt=0, description="the cosine decay ends here (default: at the last "
                                                             "epoch); later steps keep lr * final_lr_ratio")
    grad_clip: float | None = Field(10.0, gt=0)
    amp: Literal["auto", "off", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, off on the CPU")
    num_workers: int = Field(2, ge=0)
    seed: int = 0
    eval_every: int = Field(1, ge=1, description="validate every N epochs (and after the last)")


class Task(Protocol):
    """What a task gives the engine. ``primary_metric`` is maximised to pick ``best.pt``."""

    name: str
    primary_metric: str

    def build_model(self) -> nn.Module: ...

    def train_batches(self, epoch_seed: int, batch_size: int, num_workers: int,
                      rank: int, world_size: int) -> Iterable[Any]:
        """This epoch's batches, their shuffle and augmentation drawn from ``epoch_seed`` alone (whatever ran
        before: a resumed run replays the epoch), e.g. from one :class:`~ctzoo.training.epoch_loader.EpochLoader`
        kept for the run."""

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]: ...

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]: ...

    # optional: ``before_epoch(model, device, epoch)`` runs before each epoch's batches are drawn (hard-negative
    # mining); a task without it trains on a fixed set. ``checkpoint_state()``: what else of the task every
    # checkpoint keeps (``task_state``: the mined set), which ``restore_checkpoint_state(state)`` gets back on
    # resume, so that a task whose items change in training resumes bit for bit too. ``example_inputs(batch_size)``:
    # a random batch of the network's inputs, which ``fit(placement=...)`` traces the model with. ``close()``:
    # release what the task's batches hold (the loader's worker processes) when training ends


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**31 - 1)


def seed_everything(seed: int, *objects: Any) -> None:
    """Seed torch, numpy, Python and every MONAI Randomizable inside ``objects`` (datasets, transforms)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    for obj in objects:
        set_rnd(obj, seed)


def pick_device(requested: str = "auto") -> torch.device:
    """The device ``requested`` names (auto: CUDA when present); ValueError for one this machine lacks."""
    return torch.device(resolve_device(requested))


def epochs_done(epoch: int, step_in_epoch: int, steps_this_epoch: int) -> float:
    """How many epochs are done once step ``step_in_epoch`` (0-based) of epoch ``epoch`` is taken: the schedule's
    clock. Fractions of each epoch's own steps, so that epochs of different lengths (hard-negative mining adds
    items) keep the warm-up and decay where the config puts them."""
    return epoch + (step_in_epoch + 1) / steps_this_epoch


def lr_factor(done: float, cfg: OptimConfig) -> float:
    """Linear warm-up then cosine decay, as a factor of ``cfg.lr`` for the step that completes ``done`` epochs
    (:func:`epochs_done`): the first step of the run is at 1 / (warm-up steps), the last at ``final_lr_ratio``."""
    total = max(1e-12, min(cfg.decay_epochs or cfg.epochs, cfg.epochs))
    if done < cfg.warmup_epochs:
        return done / cfg.warmup_epochs
    progress = min(1.0, (done - cfg.warmup_epochs) / max(1e-12, total - cfg.warmup_epochs))
    return cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


#: The checkpoint key of a task's own state (``Task.checkpoint_state``).
TASK_STATE = "task_state"


def _task_state(task: Task) -> dict[str, Any]:
    """``{TASK_STATE: ...}`` for a task that keeps state of its own in checkpoints, else nothing."""
    return {TASK_STATE: task.checkpoint_state()} if hasattr(task, "checkpoint_state") else {}


def _atomic_save(payload: Any, path: Path) -> None:
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)


def distributed_backend() -> str:
    """NCCL when every process on this node has a GPU of its own; gloo on CPUs, and when processes share GPUs
    (more processes than GPUs on a node: NCCL refuses two ranks on one device, gloo moves CUDA tensors too)."""
    if not torch.cuda.is_available():
        return "gloo"
    return "nccl" if torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", "1")) else "gloo"


def _distributed() -> tuple[int, int]:
    """(rank, world size), initialising torch.distributed when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = distributed_backend()
        if backend == "gloo" and torch.cuda.is_available():
            log.warning("%s processes share %d GPU(s) on this node: gloo, not NCCL", os.environ.get(
                "LOCAL_WORLD_SIZE"), torch.cuda.device_count())
        dist.init_process_group(backend)
    return (dist.get_rank(), world) if world > 1 else (0, 1)


class RunLog:
    """metrics.csv + TensorBoard + training_curves.png in the run folder (rank 0 only)."""

    def __init__(self, out_dir: Path, resume_history: list[dict[str, Any]]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.out_dir = out_dir
        self.history = list(resume_history)
        self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def add(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """Record ``row`` (in TensorBoard at once); returns the history so far, for :meth:`write`."""
        self.history.append(row)
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()
        return list(self.history)

    def write(self, history: list[dict[str, Any]]) -> None:
        """metrics.csv and training_curves.png of ``history`` (in the epoch writer's thread)."""
        keys = sorted({k for r in history for k in r}, key=lambda k: (k != "epoch", k))
        with atomic_path(self.out_dir / "metrics.csv") as temporary:
            with open(temporary, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=keys)
                writer.writeheader()
                writer.writerows(history)
        plot_curves(history, self.out_dir / "training_curves.png")

    def close(self) -> None:
        self.writer.close()


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Losses (left) and validation metrics (right) per epoch, as a PNG."""
    from matplotlib.figure import Figure

    from ctzoo.datasets.deeplesion.plots import save_figure

    # a Figure of its own, not pyplot's: pyplot's global state is not safe in the epoch writer's thread
    figure = Figure(figsize=(10, 4), dpi=100)
    losses, metrics = figure.subplots(1, 2)
    epochs = [r["epoch"] for r in history]
    for key in sorted({k for r in history for k in r if k.startswith("train_")}):
        losses.plot(epochs, [r.get(key, np.nan) for r in history], marker=".", label=key)
    for key in sorted({k for r in history for k in r if k.startswith("val_")}):
        points = [(r["epoch"], r[key]) for r in history if key in r]
        metrics.plot(*zip(*points), marker="o", label=key)
    losses.set_xlabel("epoch")
    losses.set_yscale("log")
    losses.set_title("training loss")
    metrics.set_xlabel("epoch")
    metrics.set_title("validation")
    for axis in (losses, metrics):
        if axis.lines:
            axis.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)


def _summary(task: Task, cfg: OptimConfig, epochs_done: int, best: float, wall_s: float, dev: torch.device,
             world: int) -> dict[str, Any]:
    summary = {"task": task.name, "epochs": cfg.epochs, "epochs_done": epochs_done,
               "complete": epochs_done >= cfg.epochs,
               "best_" + task.primary_metric: best if math.isfinite(best) else None,  # never improved: JSON null
               "wall_s": wall_s, "device": str(dev), "world_size": world}
    if dev.type == "cuda":  # which card, for model cards and benchmarks ("cuda" alone says little)
        summary["device_name"] = torch.cuda.get_device_name(dev)
    return summary


def _write_summary(out_dir: Path, summary: dict[str, Any]) -> None:
    with atomic_path(out_dir / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))


def write_epoch_files(out_dir: Path, payload: dict[str, Any], new_best: bool, runlog: RunLog,
                       history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """One epoch's files, in the epoch writer's thread: best.pt (when the metric improved), last.pt, summary.json,
    metrics.csv and the curves."""
    if new_best:
        _atomic_save(payload, out_dir / "best.pt")
    _atomic_save(payload, out_dir / "last.pt")
    _write_summary(out_dir, summary)
    runlog.write(history)


def _restore_local_state(setup: Any, path: Path, epoch: int, dev: torch.device) -> None:
    """Give a resumed worker back its own compression state (error-feedback residuals, CSER's local model and
    optimiser), which worker 0's ``last.pt`` cannot hold; without it the run goes on from worker 0's state."""
    if not path.exists():
        if setup.hook_state is not None:  # a mode with per-worker state (CSER, two-way): say what is lost
            log.warning("%s missing: this worker resumes from worker 0's state", path)
        return
    saved = torch.load(path, map_location=dev, weights_only=False)
    if saved["epoch"] != epoch:  # the run stopped between the two saves of one epoch
        log.warning("%s is from epoch %d, last.pt from epoch %d: not used", path, saved["epoch"] + 1, epoch + 1)
        return
    setup.load_local_state(saved["state"])


def _mean_over_ranks(sums: dict[str, float], world: int, dev: torch.device) -> dict[str, float]:
    """The epoch's loss sums averaged over the DDP ranks (every rank calls this; the keys are the same on all)."""
    if world == 1 or not sums:
        return sums
    keys = sorted(sums)
    values = torch.tensor([sums[key] for key in keys], dtype=torch.float64, device=dev)
    dist.all_reduce(values)
    return {key: value / world for key, value in zip(keys, values.tolist())}


def _no_step(epoch: int, batches: Any, batch_size: int, world: int) -> str:
    """Why epoch ``epoch`` has no training step: the training set against the batch of all ranks."""
    dataset = getattr(batches, "dataset", None)
    items = f"({len(dataset)} items) " if dataset is not None and hasattr(dataset, "__len__") else ""
    return (f"epoch {epoch + 1} has no training step: the training set {items}is smaller than batch_size × world "
            f"size ({batch_size} × {world}); lower optim.batch_size or train on fewer processes")


def _load_weights(model: nn.Module, weights: dict[str, Any], path: Path) -> None:
    """``model.load_state_dict(weights)``, failing in one line: the first mismatch, and how many there are."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        problems = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()] or [str(exc)]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        first = problems[0] if len(problems[0]) <= 200 else problems[0][:199] + "…"
        raise ValueError(f"--resume: the weights in {path} do not fit the model this config builds: "
                         f"{first}{more}") from None


def _placed_model(task: Task, plan: Any, batch_size: int, device: str) -> tuple[nn.Module, Any]:
    """``(model, placed)``: the task's model, and with a plan the model placed by it (else None)."""
    model = task.build_model()
    if plan is None:
        return model, None
    from ctzoo.scaling.placement.execute import check_plan_for_run, place_model

    if not hasattr(task, "example_inputs"):
        raise ValueError(f"task {task.name} gives no example_inputs to trace its model with: it cannot be placed")
    if device != "auto":
        log.warning("device %s ignored: the placement plan says where every part of the model runs", device)
    inputs = task.example_inputs(batch_size)
    for warning in check_plan_for_run(plan, model, True, batch_size, [list(t.shape) for t in inputs]):
        log.warning("placement: %s", warning)
    return model, place_model(model, plan, inputs)


@contextlib.contextmanager
def _own_code_on(placed: Any) -> Iterator[None]:
    """Run a task's own code (evaluation, mining) on the model of ``placed``: each op follows the placed
    parameters, and the modules go back where the plan puts them afterwards (that code may move the model)."""
    if placed is None:
        yield
        return
    from ctzoo.scaling.placement.execute import follow_devices

    try:
        with follow_devices():
            yield
    finally:
        placed.place_modules()


def fit(task: Task, cfg: OptimConfig, out_dir: str | Path, resume: bool = False, device: str = "auto",
        extra_state: dict[str, Any] | None = None, progress: bool = True, compression: Any = None,
        monitor: Any = None, placement: Any = None) -> dict[str, Any]:
    """Train ``task`` for ``cfg.epochs``; write ``last.pt`` every epoch and ``best.pt`` at the best validation.

    ``compression`` (:class:`ctzoo.scaling.compress.CompressionConfig`) picks how DDP exchanges gradients under
    torchrun; the bytes each worker moves per step are logged beside the loss (``comm_bytes_per_step``).
    ``monitor`` (a :class:`ctzoo.perf.PerfMonitor`, this rank's own) gets every step's data wait, forward/backward,
    communication hook and optimiser step as latency events (:mod:`ctzoo.training.step_events`).
    ``placement`` (a :class:`ctzoo.scaling.placement.graph.Plan`) trains the model spread over this machine's
    devices as the plan places it (:func:`ctzoo.scaling.placement.execute.place_model`) instead of on ``device``;
    batches start on the plan's home device, and checkpoints are the unplaced model's. One process only (not DDP).
    ``resume`` continues ``out_dir/last.pt`` and refuses (``ValueError``) a config or ``extra_state`` that differs
    from the checkpoint's outside the fields a resumed run may change (:mod:`ctzoo.training.resume_check`).
    Returns the final summary (also written to ``summary.json``, after every epoch with ``complete: false``):
    best metric, epochs, wall time (all segments of a resumed run).
    """
    out_dir = Path(out_dir)
    if placement is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("placement spreads one model over this machine's devices in one process; it cannot be "
                         "combined with DDP (torchrun with several processes): drop placement or torchrun")
    rank, world = _distributed()
    dev = pick_device(device)
    if world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    seed_everything(cfg.seed)
    model, placed = _placed_model(task, placement, cfg.batch_size, device)
    if placed is None:
        model = model.to(dev)
    else:
        dev = torch.device(placed.home)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_epoch, step, best, history, wall_before = 0, 0, -math.inf, [], 0.0
    wall_s = 0.0
    last = out_dir / "last.pt"
    if resume:
        if not last.exists():
            raise FileNotFoundError(f"{last}: nothing to resume from")
        state = torch.load(last, map_location=dev, weights_only=False)
        changes = config_changes(state, resume_record(cfg.model_dump(), extra_state))
        if changes:
            raise ValueError(refusal(last, changes))
        _load_weights(model, state["model"], last)
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step, best, history = state["epoch"] + 1, state["step"], state["best"], state["history"]
        if hasattr(task, "restore_checkpoint_state"):
            task.restore_checkpoint_state(state.get(TASK_STATE, {}))
        wall_before = wall_s = state.get("wall_s", 0.0)  # training time of the earlier segments: wall_s counts all
        log.info("resuming %s at epoch %d", last, start_epoch)
    train_model = nn.parallel.DistributedDataParallel(model) if world > 1 else (model if placed is None else placed)
    events = StepEvents(monitor, task.name, out_dir.name, str(dev), cfg.batch_size, rank, world,
                        dist.get_backend() if world > 1 else None)
    comm = setup = None
    local_file = out_dir / f"compression.rank{rank}.pt"  # what only this worker holds (see local_state)
    if world > 1:
        from ctzoo.scaling.compress import CompressionConfig, setup_compression

        events.time_comm_hooks(train_model)  # before setup_compression registers the hook
        setup = setup_compression(train_model, optimizer, compression or CompressionConfig())
        optimizer, comm = setup.optimizer, setup.stats
        if resume:
            _restore_local_state(setup, local_file, start_epoch - 1, dev)
    elif compression is not None and compression.compression != "none":
        log.warning("distributed.compression=%s only acts under torchrun with several processes",
                    compression.compression)
    use_bf16 = cfg.amp == "bf16" or (cfg.amp == "auto" and dev.type == "cuda")
    runlog = RunLog(out_dir, history) if rank == 0 else None
    writer = EpochWriter() if rank == 0 else None
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            seed = epoch_seed(cfg.seed, epoch)
            if hasattr(task, "before_epoch"):
                with _own_code_on(placed):
                    task.before_epoch(model, dev, epoch)
            batches = task.train_batches(seed, cfg.batch_size, cfg.num_workers, rank, world)
            seed_everything(seed)  # the batches' own draws are seeded per item (see Task.train_batches)
            train_model.train()
            sums: dict[str, float] = {}
            count = 0
            steps_per_epoch = len(batches)
            if steps_per_epoch == 0:  # the same on every rank (equal shares): all stop, none waits in a collective
                raise ValueError(_no_step(epoch, batches, cfg.batch_size, world))
            epoch_started, first_batch_s = time.perf_counter(), 0.0
            # The bar gets the epoch's one iterator: tqdm.auto's bar calls iter() on its iterable when made and again
            # when iterated, and every iter() of a loader with kept workers restarts it, which drew the epoch's order
            # a second time from the advanced shuffle and threw away the batches the workers had already made.
            bar = tqdm(iter(batches), total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                       disable=None if (progress and rank == 0) else True, leave=False)
            for batch in events.batches(bar):
                if count == 0:  # the loader's start: its workers' first batches (once per run when they persist)
                    first_batch_s = time.perf_counter() - epoch_started
                events.begin(step, epoch)
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * lr_factor(epochs_done(epoch, count, steps_per_epoch), cfg)
                with events.stage("forward_backward"):
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                        loss, parts = task.loss(train_model, batch, dev)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"epoch {epoch + 1} step {step}: loss is {loss.item()} "
                                                 f"(parts {parts})")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                events.communication()
                with events.stage("optimizer_step"):
                    # under two-way compression with Adam the buffers hold the preconditioned update past the
                    # warm-up, already held to Adam's step bound: clipping its norm would shrink every step (measured:
                    # no learning)
                    if cfg.grad_clip and not getattr(optimizer, "buffers_hold_updates", False):
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    optimizer.step()
                step += 1
                count += 1
                for key, value in {"loss": loss, **parts}.items():  # detached: a float of a graph tensor warns
                    sums[key] = sums.get(key, 0.0) + float(value.detach() if torch.is_tensor(value) else value)
                bar.set_postfix(loss=f"{sums['loss'] / count:.4f}")
            sums = _mean_over_ranks(sums, world, dev)  # each rank's loss is its share's: log the step's
            finished = epoch + 1 == cfg.epochs and hasattr(optimizer, "finish_training")
            if finished:
                optimizer.finish_training()  # CSER: the local models become their average (counted in the bytes)
            row: dict[str, Any] = {"epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
                                   **{f"train_{k}": v / max(count, 1) for k, v in sums.items()},
                                   "first_batch_s": round(first_batch_s, 3),
                                   "train_s": round(time.perf_counter() - epoch_started, 3)}
            if comm is not None and comm.steps:  # bytes up + down per worker and step, and the reduction vs plain DDP
                row["comm_bytes_per_step"] = round(comm.per_step())
                row["comm_reduction"] = round(comm.uncompressed_per_step() / max(comm.per_step(), 1), 2)
                comm.reset()
            # CSER: rank 0 scores and saves the workers' consensus, not its own local model (every rank takes part)
            consensus = setup.consensus() if setup is not None and not finished else contextlib.nullcontext(0)
            with consensus as consensus_bytes:
                if consensus_bytes:
                    row["consensus_bytes"] = consensus_bytes
                if rank == 0:
                    if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                        eval_started = time.perf_counter()
                        model.eval()
                        with _own_code_on(placed):
                            row.update({f"val_{k}": v for k, v in task.evaluate(model, dev).items()})
                        row["eval_s"] = round(time.perf_counter() - eval_started, 3)
                    row["write_wait_s"] = round(writer.wait(), 3)  # the epoch before's files, written meanwhile
                    row["wall_s"] = wall_s = round(wall_before + time.perf_counter() - started, 2)
                    history_now = runlog.add(row)
                    metric = row.get(f"val_{task.primary_metric}")
                    new_best = metric is not None and metric > best
                    best = metric if new_best else best
                    payload = cpu_snapshot({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                            "epoch": epoch, "step": step, "best": best, "history": history_now,
                                            "config": cfg.model_dump(), "wall_s": row["wall_s"],
                                            **_task_state(task), **(extra_state or {})})
                    # summary.json too after every epoch: a run a scheduler cuts off says what it was and how far
                    # it got
                    writer.submit(write_epoch_files, out_dir, payload, new_best, runlog, history_now,
                                  _summary(task, cfg, epoch + 1, best, row["wall_s"], dev, world))
                    log.info("epoch %d: %s", epoch + 1, json.dumps({k: round(v, 5) if isinstance(v, float) else v
                                                                     for k, v in row.items()}))
            if setup is not None and (local := setup.local_state()):
                local_file.parent.mkdir(parents=True, exist_ok=True)
                _atomic_save({"epoch": epoch, "state": local}, local_file)
            if world > 1:
                dist.barrier()
    finally:
        if hasattr(task, "close"):
            task.close()
        if writer is not None:
            writer.close()
    # the wall time last.pt carries (up to the last epoch's evaluation), so that a run resumed from it always
    # reports more than the segment before it did
    summary = _summary(task, cfg, cfg.epochs, best, wall_s, dev, world)
    if rank == 0:  # what the epochs' files cost, all of it off the loop but the waits
        summary.update(epoch_files_s=round(writer.write_s, 2), epoch_files_wait_s=round(writer.wait_s, 2))
        runlog.close()
        _write_summary(out_dir, summary)
    if world > 1:
        dist.destroy_process_group()
    return summary
