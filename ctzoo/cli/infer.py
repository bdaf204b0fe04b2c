"""``ctzoo infer``: run zoo models over many CT volumes with the batch pipeline (:mod:`ctzoo.inference.pipeline`)."""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from ctzoo.cli.decode_options import decode_option, resolve_decoder
from ctzoo.cli.info import USER_ERRORS, load_rules, rules_option, series_option
from ctzoo.cli.limits import volume_limit_options, volume_limits
from ctzoo.cli.paths import require_folder
from ctzoo.cli.perf_options import perf_monitor, perf_options

#: The shell's convention for a process ended by SIGINT (128 + 2).
EXIT_INTERRUPTED = 130
#: The same for SIGTERM (128 + 15).
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM (``systemctl stop``, ``kill``, Slurm, Kubernetes), raised where Ctrl-C raises KeyboardInterrupt, so
    the run stops the same orderly way: the case being written finishes, the workers are shut down, summary.csv
    lists the cases that finished, and no partial file is left."""


def _raise_terminated(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` in this (the main) thread while the block runs; elsewhere (a thread, as
    in some test runners) signals cannot be handled and nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_status(stop: KeyboardInterrupt) -> int:
    return EXIT_TERMINATED if isinstance(stop, Terminated) else EXIT_INTERRUPTED


def _ctrl_c_exits_130(command: Callable[..., None]) -> Callable[..., None]:
    """Exit 130 on Ctrl-C (143 on SIGTERM) before the models run too (loading a model, scanning the inputs), instead
    of click's "Aborted!" with exit 1 (or death by the signal): a script must be able to tell "stopped" from "some
    cases failed"."""

    @functools.wraps(command)
    def interruptible(*args: Any, **kwargs: Any) -> None:
        try:
            with _sigterm_as_interrupt():
                command(*args, **kwargs)
        except KeyboardInterrupt as stop:
            click.echo("interrupted" + (" (SIGTERM)" if isinstance(stop, Terminated) else ""), err=True)
            raise SystemExit(_exit_status(stop)) from None

    return interruptible


@click.command()
@click.argument("inputs", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--model", "model_names", multiple=True, default=("recistnet-mini",), show_default=True,
              help="Zoo model (ctzoo zoo list) or a model bundle folder (ctzoo zoo publish, ctzoo export). Repeat to "
                   "run several models over the same cases.")
@click.option("--backend", type=click.Choice(["torch", "onnx"]), default="torch", show_default=True,
              help="PyTorch eager, or ONNX Runtime (exported once and cached, checked against PyTorch).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present, else CPU), cpu or cuda.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="PyTorch backend: bf16 autocast, used only where it agrees with fp32 on the sample CT (checked "
                   "on the device at start; bf16 fails with the check's numbers otherwise). auto: bf16 on CUDA "
                   "where the check passes, fp32 on the CPU. ONNX graphs run in their own precision.")
@click.option("--compile", "compile_model", is_flag=True,
              help="PyTorch backend: torch.compile the network for fixed shapes (every batch padded to "
                   "--batch-size). Compiling takes tens of seconds per model copy on a CPU; long jobs win it back "
                   "(docs/batch-inference.md).")
@click.option("--cuda-graphs", is_flag=True,
              help="With --compile on CUDA: compile in torch's reduce-overhead mode, each fixed-shape batch replayed "
                   "as one CUDA graph (no per-kernel launch cost; implies --compile).")
@decode_option
@click.option("--preprocess-on", "preprocess_on", type=click.Choice(["readers", "model"]), default="readers",
              show_default=True,
              help="Where each slice's network input is computed (reorient, resample, window). readers: in the "
                   "reader processes on the CPU. model: on the model's device (the GPU), the readers only reading; "
                   "PyTorch backend, shared layout, local engine; same inputs (docs/batch-inference.md).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("ctzoo-out"), show_default=True,
              help="Output folder: OUT/<case>/... per case and OUT/summary.csv.")
@click.option("--layout", type=click.Choice(["auto", "copies", "shared"]), default="auto", show_default=True,
              help="How the work shares this machine. copies: worker processes each run whole cases (read, "
                   "preprocess, predict) on a copy of the model, so readers never preempt a model. shared: one model "
                   "here fed by reader processes. auto: copies on the CPU, shared on a GPU, with --placement "
                   "or --perf-profile (see docs/batch-inference.md).")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="copies: model copies in worker processes (0: one, in this process) [default: one per case, up "
                   "to one per core, at most 8; one case runs here]. shared: reader processes that read, decode "
                   "and preprocess volumes while the model runs (0: in-process) [default: CPUs - 1, at most 4; on a "
                   "GPU one per case up to CPUs - 1, at most 16].")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Slices per forward pass; slices of consecutive volumes share batches.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads of each model copy [copies default: the cores shared out among the copies] or "
                   "of the one model [shared default: the backend's, all cores].")
@click.option("--resume", is_flag=True,
              help="Skip cases this model version and weights already finished (status-<model>.json) with the "
                   "same options (backend, precision, score threshold, --series, --rules, overlay) from an unchanged "
                   "input (the size and modification time of each of its files, a .mhd/.nhdr's voxel files "
                   "included); run the others again.")
@click.option("--overlay/--no-overlay", default=None,
              help="Draw overlay PNGs (default: only for the embedded sample, when no INPUT is given).")
@click.option("--score-threshold", type=click.FloatRange(0, 1), default=None,
              help="Detectors: keep lesions scoring at least this [default: the model's operating point, chosen on "
                   "validation data and stated in its card (ctzoo zoo show NAME)].")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this machine's pipeline. ray: the same stages as Ray Data tasks on a Ray cluster "
                   "(RAY_ADDRESS, or a local Ray instance).")
@click.option("--placement", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A plan.json of ctzoo place: run the model spread over this machine's devices as the plan "
                   "places it (--backend torch, local engine, one --model; the plan's home device replaces "
                   "--device).")
@series_option
@rules_option
@volume_limit_options
@perf_options(deep_profiles=True)
@_ctrl_c_exits_130
def infer(inputs: tuple[Path, ...], model_names: tuple[str, ...], backend: str, device: str, precision: str,
          compile_model: bool, cuda_graphs: bool, decode: str, preprocess_on: str, out: Path,
          layout: str, workers: int | None, batch_size: int, threads: int | None, resume: bool, overlay: bool | None,
          score_threshold: float | None, engine: str, placement: Path | None, series: str | None,
          rules_file: Path | None, **limit_options) -> None:
    """Run zoo models over CT volumes: detect lesions (RECIST-Net) or segment organs.

    INPUTS are any mix of DICOM folders (searched recursively: every CT series in a folder holding
    DICOM files is a case, read from that folder's own files and named after it, or <folder>_s<N>
    where it holds several, N as 'ctzoo info' numbers them), zipped DICOM series, NIfTI, NRRD or MHA
    files, and text files listing such inputs one per line. Folders of ctzoo infer results (OUT, case
    folders) are skipped. Without INPUTS the embedded sample CT is used (case 'sample_ct').

    \b
    Per case, in OUT/<case>/:
      detectors:  detections.json (docs/recistnet.md's schema: five RECIST points per lesion in voxel
                  indices of the input as stored and in patient LPS mm), sr.dcm (DICOM SR TID 1500
                  with long and short axis, for DICOM input), overlay.png on request
      segmenters: labels.nii.gz (on the input grid), segmentation.json (volume per class),
                  seg.dcm (DICOM SEG, for DICOM input), labels_overlay.png on request
      status-<model>.json, written last: what --resume trusts
    OUT/summary.csv lists every case with its status, error, read_s and seconds (the case's own wall
    time, from the start of its reading to its outputs written). A case that fails is recorded there
    and the batch goes on. Ctrl-C (and SIGTERM) lets the case being written finish, leaves no partial
    file and keeps summary.csv listing the cases that finished (--resume runs the rest).
    Lesions and overlays name their slice as a viewer does: InstanceNumber (DICOM) and z in mm, with
    the 0-based index beside them.

    \b
    Exit status:
      0    every case ok
      1    any case failed (see summary.csv), or the run could not start (unknown model, no cases)
      2    a bad command line
      130  interrupted (Ctrl-C, SIGINT)
      143  stopped by SIGTERM (systemctl stop, kill), which stops the run as Ctrl-C does

    \b
    Progress: a bar on a terminal; otherwise (logs, CI, systemd) an INFO line every 10 s with cases
    and slices done, slices/s and a rough ETA, and one line per finished case.

    Size limits (--max-volume-voxels, --max-decoded-mb, --max-inflate-ratio) are checked from each
    input's headers before it is read; a case over one fails with a message naming the option.

    --perf judges every case's read, preprocess, predict, finish and write stages (in this process,
    with either engine) for latency anomalies; the provenance store is OUT/perf.sqlite unless
    --perf-store says otherwise, and --perf-server merges the statistics with other processes'.
    --perf-profile N reruns the next N anomalous predict batches under torch.profiler (--backend
    torch, local engine) and keeps each profile with its anomaly.

    \b
    Examples:
      ctzoo infer                                   the embedded sample CT
      ctzoo infer /data/export --out results        every series under /data/export
      ctzoo infer cases.txt --backend onnx --workers 4 --resume
      ctzoo infer cases.txt --layout shared --workers 2 --threads 4
    """
    import tqdm

    from ctzoo.cli.bundles import resolve_bundles
    from ctzoo.datasets.samples import sample_ct_dicom
    from ctzoo.inference.backends import resolve_device
    from ctzoo.inference.inputs import CaseInput, discover_cases
    from ctzoo.inference.pipeline import PipelineOptions
    from ctzoo.inference.precision import check_request
    from ctzoo.inference.series_cases import split_series

    # tqdm's monitor thread, started by the first progress bar, would outlive it: the next model's run would find a
    # thread running and start its workers from a fork server, seconds slower than forking them
    # (ctzoo.inference.start_method). The thread only tunes how often a stalled bar redraws
    tqdm.tqdm.monitor_interval = 0
    if placement is not None:
        _check_placement_options(model_names, backend, engine)
    compile_model = "cuda-graphs" if cuda_graphs else compile_model
    try:
        check_request(precision, backend, placed=placement is not None, compile=bool(compile_model))
        if cuda_graphs and not resolve_device(device).startswith("cuda"):
            raise ValueError("--cuda-graphs replays CUDA graphs: it needs a CUDA device (--device cuda)")
        if decode == "nvimgcodec" and engine != "local":
            raise ValueError("--decode nvimgcodec decodes in this machine's readers: use it with --engine local")
        if preprocess_on == "model" and (backend != "torch" or engine != "local" or layout == "copies"):
            raise ValueError("--preprocess-on model computes the inputs where the PyTorch model is: use it with "
                             "--backend torch, --engine local and the shared layout")
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    require_folder(out)  # before the models load: a file in the way would otherwise fail the run at its end
    # every model before anything else: a typo must not cost a scan of the inputs
    bundles = resolve_bundles(model_names, backend)
    network = _placed_network(bundles[model_names[0]], placement, batch_size) if placement is not None else None
    try:
        rules = load_rules(rules_file)
        # OUT may be inside an input folder (`ctzoo infer .`): its results are no input of the next run
        cases = discover_cases(inputs, exclude=[out]) if inputs else [CaseInput("sample_ct", sample_ct_dicom())]
        if series is None:  # a case per CT series of a folder holding several; --series picks one in every folder
            cases = split_series(cases, rules)
    except USER_ERRORS as exc:
        raise click.ClickException(str(exc)) from exc
    if not cases:
        raise click.ClickException("no cases to run")
    monitor = perf_monitor(limit_options, "infer", out / "perf.sqlite")
    if monitor is not None and monitor.profiler.armed and (backend != "torch" or engine != "local"):
        click.echo("warning: --perf-profile: ctzoo infer takes deep profiles with --backend torch and the local "
                   "engine (ctzoo serve profiles ONNX graphs); none will be taken", err=True)
        monitor.profiler.budget = 0
    decoder = resolve_decoder(decode, device if network is None else network.home, engine)
    options = PipelineOptions(out=out, batch_size=batch_size, workers=workers, layout=layout, resume=resume,
                              overlay=(not inputs) if overlay is None else overlay, series=series, rules=rules,
                              limits=volume_limits(limit_options), perf=monitor, decoder=decoder)
    click.echo(f"{len(cases)} case(s) -> {out}", err=True)
    rows: list[dict] = []
    try:
        with _progress_logging():
            for model_name in model_names:
                rows = _run_model(bundles[model_name], cases, options, backend, device, (precision, compile_model),
                                  threads, score_threshold, engine, rows, network, preprocess_on == "model")
    except KeyboardInterrupt as stop:  # the pipeline has recorded the cases that finished and removed partial files
        click.echo(f"interrupted{' (SIGTERM)' if isinstance(stop, Terminated) else ''}: {out / 'summary.csv'} lists "
                   "the cases that finished; --resume runs the rest", err=True)
        raise SystemExit(_exit_status(stop)) from None
    finally:
        if monitor is not None:
            monitor.close()  # the last sync with the parameter server, then the store's totals
    failed = [r for r in rows if r["status"] != "ok"]
    for row in rows:
        line = f"{row['case']} [{row['model']}]: " + (f"{row['findings']} finding(s) {row['detail']}".rstrip()
                                                     if row["status"] == "ok" else f"FAILED: {row['error']}")
        click.echo(line)
        if row["status"] == "ok" and row.get("dicom_error"):  # its JSON/NIfTI results stand
            click.echo(f"warning: {row['case']} [{row['model']}]: {row['dicom_error']}", err=True)
    no_dicom = sum(1 for r in rows if r["status"] == "ok" and r.get("dicom_error"))
    click.echo(f"summary: {out / 'summary.csv'} ({len(rows) - len(failed)} ok, {len(failed)} failed"
               + (f"; {no_dicom} ok without their DICOM result" if no_dicom else "") + ")", err=True)
    if failed:
        raise SystemExit(1)


@contextlib.contextmanager
def _progress_logging() -> Iterator[None]:
    """Let the pipeline's INFO progress lines (logger ``ctzoo.inference``) through while the models run, unless
    logging is already more verbose (-vv); the level is put back afterwards. On a terminal the pipeline draws a
    bar and logs no progress, so no line breaks the bar."""
    logger = logging.getLogger("ctzoo.inference")
    level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_placement_options(model_names: tuple[str, ...], backend: str, engine: str) -> None:
    """--placement runs one PyTorch model in this process: not ONNX graphs, not Ray workers."""
    if backend != "torch":
        raise click.UsageError("--placement places the PyTorch model across this machine's devices: use it with "
                               "--backend torch (ONNX Runtime runs the exported graph whole)")
    if engine != "local":
        raise click.UsageError("--placement runs the placed model in this process: use it with --engine local "
                               "(Ray workers load their own copies of the model)")
    if len(model_names) != 1:
        raise click.UsageError("--placement holds the plan of one model: give exactly one --model")


def _placed_network(bundle, plan_path: Path, batch_size: int):
    """The bundle's network (a copy) placed as the plan at ``plan_path`` says; warnings where the plan was
    profiled for training or for another batch than ``batch_size``."""
    import copy

    from ctzoo.scaling.placement.execute import check_plan_for_run, place_model
    from ctzoo.scaling.placement.graph import PlacementError, Plan
    from ctzoo.training.placement import bundle_example_inputs

    try:
        plan = Plan.load(plan_path)
        network = copy.deepcopy(bundle.network())
        for warning in check_plan_for_run(plan, network, False, batch_size):
            click.echo(f"warning: {plan_path}: {warning}", err=True)
        return place_model(network, plan, bundle_example_inputs(bundle, 1))
    except PlacementError as exc:
        raise click.ClickException(f"{plan_path}: {exc}") from exc


def _run_model(bundle, cases, options, backend: str, device: str, torch_options: tuple[str, bool | str],
               threads: int | None,
               score_threshold: float | None, engine: str, earlier_rows: list[dict], network=None,
               preprocess_on_model: bool = False) -> list[dict]:
    import dataclasses

    from ctzoo.inference.allocator import keep_freed_memory
    from ctzoo.inference.backends import resolve_device
    from ctzoo.inference.pipeline import run_pipeline
    from ctzoo.inference.precision import choose_precision
    from ctzoo.inference.schedule import choose_schedule, default_readers
    from ctzoo.inference.tasks import model_task

    precision, compile_model = torch_options
    try:
        if engine == "ray":
            from ctzoo.inference.ray_engine import run_ray

            readers = default_readers() if options.workers is None else options.workers
            return earlier_rows + run_ray(cases, str(bundle.folder), dataclasses.replace(options, workers=readers),
                                          backend=backend, device=device, threads=threads,
                                          score_threshold=score_threshold, other_rows=earlier_rows,
                                          precision=precision, compile=compile_model)
        home = resolve_device(device if network is None else network.home)
        # deep profiles rerun a batch where the model runs, in this process: one model, not copies
        profiling = options.perf is not None and options.perf.profiler.armed
        can_copy = network is None and not profiling and not preprocess_on_model  # each needs the one model here
        schedule = choose_schedule(home, len(cases), layout=options.layout, workers=options.workers,
                                   threads=threads, can_copy=can_copy)
        choice = choose_precision(bundle, precision, backend, home, placed=network is not None)
        task = model_task(bundle, backend, home, score_threshold, schedule.threads, network=network,
                          precision=choice.precision, compile=compile_model)
    except (KeyError, FileNotFoundError, RuntimeError, ValueError) as exc:  # bad model/device/backend, Ray failure
        raise click.ClickException(str(exc)) from exc
    compiled = {False: "", True: ", compiled", "cuda-graphs": ", compiled, replayed as CUDA graphs"}[compile_model]
    click.echo(f"{bundle.name}: {schedule.describe()}; {choice.describe()}{compiled}"
               f"{f'; inputs computed on {home}' if preprocess_on_model else ''}", err=True)
    keep_freed_memory()  # a batch job: freed memory is kept for the next batch (ctzoo.inference.allocator)
    options = dataclasses.replace(options, layout=schedule.layout, workers=schedule.workers,
                                  copy_threads=schedule.threads or 1,
                                  preprocess_device=home if preprocess_on_model else None)
    return earlier_rows + run_pipeline(cases, task, options, other_rows=earlier_rows)
