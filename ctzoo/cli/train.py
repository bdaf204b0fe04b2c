"""``ctzoo train`` and ``ctzoo eval``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from ctzoo.cli.device_option import device_option
from ctzoo.cli.perf_options import perf_monitor, perf_options
from ctzoo.config import ConfigError, read_yaml

_CONFIG = click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
_DATA_ROOT = click.option("--data-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
                          help="Replace data.root of CONFIG (the folder with DL_info.csv and Images_png/).")


def config_task(config: Path) -> str:
    """The ``task:`` of a training config (recistnet when absent), read before the config is validated."""
    try:
        document = read_yaml(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    return str(document.get("task", "recistnet")) if isinstance(document, dict) else "recistnet"


def _load_run_config(load, config: Path, epochs: int | None, data_root: Path | None):
    """Load CONFIG with ``load(config, data_root)`` and apply --epochs."""
    try:
        cfg = load(config, data_root)
    except (ConfigError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if epochs is not None:
        cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"epochs": epochs})})
    return cfg


RUN_FILES = ("last.pt", "best.pt", "metrics.csv")  # what a started training run leaves in its folder
RUN_SUBFOLDERS = ("template_seg", "unet")  # where a template_seg run trains its two models


def refuse_earlier_run(out: Path, resume: bool) -> None:
    """Without --resume, refuse an OUT that holds a training run (its own or a template_seg run's models): a fresh
    run would overwrite its checkpoints, metrics and config.json from epoch 0."""
    if resume:
        return
    folders = (out, *(out / name for name in RUN_SUBFOLDERS))
    if any((folder / name).exists() for folder in folders for name in RUN_FILES):
        raise click.ClickException(f"{out} holds a training run: --resume continues it, or choose another --out")


def _check_resume(check_resume) -> None:
    """Run ``check_resume()`` (a resumed run: refuse a config its checkpoints were not trained with)."""
    try:
        check_resume()
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


def _record_config(cfg, out: Path, check_resume=None) -> None:
    """Run ``check_resume()`` if given, then record the config used in OUT/config.json: only then, so that a
    refused resume leaves the run's record as it was."""
    if check_resume is not None:
        _check_resume(check_resume)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.model_dump_json(indent=2))


def _train_template_seg(config: Path, out: Path, resume: bool, epochs: int | None, data_root: Path | None,
                        device: str) -> None:
    from ctzoo.training.template_seg_task import check_resume, load_seg_config, train_with_baseline

    cfg = _load_run_config(load_seg_config, config, epochs, data_root)
    refuse_earlier_run(out, resume)
    _record_config(cfg, out, (lambda: check_resume(cfg, out)) if resume else None)
    try:
        train_with_baseline(cfg, out, device=device, resume=resume)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo((out / "comparison.md").read_text())


def _rank_store(out: Path) -> tuple[Path, int | None]:
    """The provenance store of this process and its rank (None outside torchrun). One file per rank, not one
    shared file: SQLite's WAL works only on one host's local disk, and a multi-node run writes OUT on a shared
    file system; separate files also keep the ranks from waiting on each other's write locks within a step."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rank = int(os.environ["RANK"])
        return out / f"perf.rank{rank}.sqlite", rank
    return out / "perf.sqlite", None


_DEVICE = device_option("auto", "auto (CUDA when present, else CPU), cpu, cuda or cuda:N.")


@click.command()
@_CONFIG
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Run folder: checkpoints (last.pt, best.pt), metrics.csv, tensorboard/, training_curves.png.")
@click.option("--resume", is_flag=True, help="Continue from OUT/last.pt exactly where it stopped, with the run's "
              "config: only optim.epochs, num_workers, eval_every and the cache and placement settings may change.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override optim.epochs.")
@_DATA_ROOT
@_DEVICE
@perf_options
def train(config: Path, out: Path, resume: bool, epochs: int | None, data_root: Path | None, device: str,
          **perf: object) -> None:
    """Train the model that CONFIG describes (e.g. configs/recistnet_mini_cpu.yaml).

    A template_seg config (configs/template_seg_abdomen.yaml) trains the template segmenter into
    OUT/template_seg and, with baseline_unet, a same-budget MONAI UNet into OUT/unet, then tests both
    (and robustness: intensity shift, noise, 5 mm slices) into OUT/comparison.md and comparison.json.

    \b
    One GPU or the CPU:   ctzoo train CONFIG --out runs/x
    Several GPUs (DDP):   torchrun --nproc_per_node 4 -m ctzoo train CONFIG --out runs/x
    After an interruption: the same command with --resume.

    Every epoch writes OUT/last.pt (and OUT/best.pt at the best validation score), a row of
    OUT/metrics.csv, TensorBoard scalars and OUT/training_curves.png.

    A config with placement: PLAN.json (made by ctzoo place) trains the model spread over this
    machine's devices as the plan places it, in one process (not under torchrun); its checkpoints
    are the unplaced model's.

    --perf times every step of every rank: data_wait (blocked on the next batch), forward_backward,
    comm_hook (DDP: the gradient exchange, inside forward_backward) and optimizer_step, keyed by task,
    run name (OUT's name), stage, device and batch size, with rank, world size, step, epoch and
    backend as context. Each rank keeps its own store, OUT/perf.sqlite or OUT/perf.rankN.sqlite
    under torchrun; --perf-server merges the statistics of all ranks (and of other jobs).
    """
    if config_task(config) == "template_seg":
        if perf.pop("perf"):
            raise click.UsageError("--perf times the recistnet training loop; template_seg runs do not support it")
        return _train_template_seg(config, out, resume, epochs, data_root, device)
    from ctzoo.scaling.placement.graph import Plan
    from ctzoo.scaling.zoo_expand import expansion_record, lemon_optim
    from ctzoo.training.engine import fit
    from ctzoo.training.recistnet_task import RecistNetTask, data_record, load_train_config
    from ctzoo.training.resume_check import check_resume, resume_record

    cfg = _load_run_config(load_train_config, config, epochs, data_root)
    optim = lemon_optim(cfg.optim, cfg.init_from_expansion)
    extra_state = {"train_config": json.loads(cfg.model_dump_json()), **data_record(cfg.data),
                   **expansion_record(cfg.init_from_expansion)}
    record = resume_record(optim.model_dump(), extra_state)
    refuse_earlier_run(out, resume)
    if resume:
        _check_resume(lambda: check_resume(out / "last.pt", record))
    try:  # the data and the plan load before OUT is written to: a start that fails there leaves nothing behind
        plan = Plan.load(cfg.placement) if cfg.placement is not None else None
        task = RecistNetTask(cfg)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    _record_config(cfg, out)
    monitor = perf_monitor(perf, "train", *_rank_store(out))
    try:
        summary = fit(task, optim, out, resume=resume, device=device, extra_state=extra_state,
                      compression=cfg.distributed, monitor=monitor, placement=plan)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        if monitor is not None:
            monitor.close()  # the last sync with the parameter server, then the store's totals
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary, from the process that logged
        click.echo(json.dumps(summary, indent=2))


@click.command("eval")
@_CONFIG
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A checkpoint written by ctzoo train (best.pt / last.pt).")
@click.option("--model", "model_name", default=None, help="A zoo model name instead of --checkpoint.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Where froc.json, froc.png, reliability.png and detections.json go.")
@click.option("--decode", type=click.Choice(["both", "grouping", "centre", "all"]), default="both", show_default=True,
              help="Detectors: which candidates are grouped into lesions. grouping = RECIST-Net's own decoder "
                   "(end points + centre, geometric grouping); centre = centre-heatmap peaks with regressed end "
                   "points (CenterNet-style); both = their union (the zoo's default); all = the three, from one "
                   "forward pass (the ablation), 'both' written as detections.")
@click.option("--lesion-free-per-series", type=click.IntRange(min=0), default=0, show_default=True,
              help="Detectors: also score this many lesion-free context slices per series (every detection on "
                   "them is a false positive). 0 keeps DeepLesion's protocol, which published DeepLesion figures "
                   "use; recistnet-mini's committed figures and its card's threshold were scored with 1.")
@_DATA_ROOT
@_DEVICE
def evaluate(config: Path, checkpoint: Path | None, model_name: str | None, split: str, out: Path, decode: str,
             lesion_free_per_series: int, data_root: Path | None, device: str) -> None:
    """Score a model on a split: detectors (RECIST-Net) by FROC, segmenters by Dice and HD95.

    \b
    Detectors, DeepLesion's protocol: FROC over the split's key slices, each prepared as the
    model was trained (its checkpoint's or card's preprocessing; the config gives the data).
    Noisy lesions are excluded; all detections are pooled into one FROC curve; a hit is box
    IoU >= 0.5 (VOC +1 convention); a second hit on a found lesion counts as neither; sensitivity
    at 0.5, 1, 2, 4, 8, 16 false positives per image and the mean over 0.5-4; for hits, the
    error of the long and short axis in mm. Calibration: a reliability diagram and its expected
    calibration error (ECE), and the score thresholds at 0.125 to 2 FPs per image (choose a
    model's operating point on --split val). Writes froc.json, froc.png, reliability.png and
    detections.json.

    \b
    Segmenters (task template_seg): Dice and HD95 (mm) per class on the split's volumes, with the
    nearest training template per slice, and again with that template's class masks rotated between
    classes (dice_mean_wrong_template: does the model read its template?); writes metrics.json and
    overlay.png (needs --checkpoint).
    """
    from ctzoo.training.evaluate import evaluate_recistnet

    if (checkpoint is None) == (model_name is None):
        raise click.UsageError("give exactly one of --checkpoint and --model")
    if config_task(config) == "template_seg":
        return _evaluate_template_seg(config, checkpoint, model_name, split, out, data_root, device)
    try:
        decodes = ("both", "grouping", "centre") if decode == "all" else (decode,)
        result = evaluate_recistnet(config, out, split, checkpoint=checkpoint, model_name=model_name,
                                    data_root=data_root, device=device, decodes=decodes,
                                    lesion_free_per_series=lesion_free_per_series)
    except (ConfigError, ValueError, FileNotFoundError, KeyError) as exc:
        raise click.ClickException(str(exc)) from exc
    report = json.loads((out / "froc.json").read_text())
    for mode, scored in report["decodes"].items():
        click.echo(f"decode {mode}: sensitivity at 4 FPs/image {scored['sensitivities'][3]:.3f}")
    click.echo(result.table())
    click.echo(f"calibration ECE {report['calibration']['ece']:.3f}; score thresholds: " + ", ".join(
        f"{p['score_threshold']:.3f} at {p['fp_per_image']:g} FP/image" for p in report["operating_points"]))
    click.echo(f"wrote {out / 'froc.json'}, {out / 'froc.png'}, {out / 'reliability.png'}, {out / 'detections.json'}")


def _evaluate_template_seg(config: Path, checkpoint: Path | None, model_name: str | None, split: str, out: Path,
                           data_root: Path | None, device: str) -> None:
    from ctzoo.training.template_seg_task import evaluate_template_seg, load_seg_config

    if checkpoint is None or split == "train":
        raise click.UsageError("segmenters are scored from --checkpoint on --split val or test")
    try:
        metrics = evaluate_template_seg(load_seg_config(config, data_root), out, split, checkpoint, device=device)
    except (ConfigError, ValueError, FileNotFoundError, KeyError) as exc:
        raise click.ClickException(str(exc)) from exc
    from ctzoo.training.seg_evaluation import template_check_line

    click.echo(json.dumps({k: v for k, v in metrics.items() if k.startswith(("dice", "hd95"))}, indent=2))
    if (line := template_check_line(metrics)) is not None:
        click.echo(line)
    click.echo(f"wrote {out / 'metrics.json'}, {out / 'overlay.png'}")
