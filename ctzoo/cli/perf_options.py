"""The latency anomaly options shared by ``ctzoo serve``, ``ctzoo infer`` and ``ctzoo train`` (:mod:`ctzoo.perf`)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import click

from ctzoo.perf.server import TOKEN_ENV


def perf_options(command=None, *, on_by_default: bool = False, deep_profiles: bool = False):
    """Add --perf/--no-perf, --perf-algorithm, --perf-store, --perf-server, --perf-min-samples and --perf-window to
    a click command; the command gets them as keyword arguments and builds its monitor with :func:`perf_monitor`.
    ``@perf_options(on_by_default=True)``: --perf unless --no-perf (``serve``: the benchmark measured its cost at
    about 1 % of the service's throughput, docs/perf.md#the-benchmark). ``deep_profiles=True`` adds
    --perf-profile N, for a command that reruns anomalous model runs under a profiler
    (:mod:`ctzoo.perf.deep_profile`)."""
    if command is None:
        return functools.partial(perf_options, on_by_default=on_by_default, deep_profiles=deep_profiles)
    options = [
        click.option("--perf/--no-perf", default=on_by_default, show_default=True,
                     help="Judge every stage this command times for latency anomalies in situ (Chimbuko's SSTD or "
                     "HBOS, per model, version, stage, device and size bucket); anomalies, 10 neighbouring events "
                     "each and one normal sample per key go to the provenance store (ctzoo perf report draws it)."),
        click.option("--perf-algorithm", type=click.Choice(["hbos", "sstd"]), default="hbos", show_default=True,
                     help="hbos: per-key histograms (finds latencies between the modes of a stage); sstd: |t - "
                     "mean| > 6 sigma."),
        click.option("--perf-store", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="The provenance store (SQLite) [default: the command's own, see its help]."),
        click.option("--perf-server", metavar="URL", default=None,
                     help=f"A parameter server (ctzoo perf server) merging the statistics of every process that "
                     f"names it, so all judge against the same ones; token from ${TOKEN_ENV}. A process that "
                     "cannot reach it warns once and judges on its own statistics until it can."),
        click.option("--perf-min-samples", type=click.IntRange(min=2), default=20, show_default=True,
                     help="Events a key needs (over every process, with --perf-server) before any is judged."),
        click.option("--perf-window", type=click.IntRange(min=0), default=10, show_default=True,
                     help="Neighbouring events kept with each anomaly (its provenance window): half just before "
                     "it, half just after it."),
    ]
    if deep_profiles:
        options.append(click.option(
            "--perf-profile", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
            help="Deep-profile the next N anomalous model runs: each one's inputs are run again under the "
            "profiler (ONNX Runtime's per-operator profile in serve, torch.profiler's in infer --backend torch), "
            "one at a time on a thread of its own, and the profile "
            "is stored with the anomaly (its slowest operators, whether the slowness reproduces, and a Chrome "
            "trace). 0: off until armed at run time."))
    return functools.reduce(lambda wrapped, option: option(wrapped), reversed(options), command)


def perf_monitor(options: dict[str, Any], role: str, default_store: Path, rank: int | None = None):
    """Pop the options of :func:`perf_options` from ``options``; a :class:`~ctzoo.perf.PerfMonitor` for a process
    of ``role`` (and ``rank``), storing into ``--perf-store`` or ``default_store``; None without --perf."""
    perf, algorithm = options.pop("perf"), options.pop("perf_algorithm")
    store, server, min_samples = options.pop("perf_store"), options.pop("perf_server"), options.pop("perf_min_samples")
    window, profile_budget = options.pop("perf_window"), options.pop("perf_profile", 0)
    if not perf:
        if server is not None or store is not None:
            click.echo("warning: --perf-server and --perf-store do nothing without --perf", err=True)
        return None
    from ctzoo.perf import DetectorConfig, PerfMonitor

    config = DetectorConfig(algorithm=algorithm, min_samples=min_samples)
    monitor = PerfMonitor(store or default_store, config, role=role, server=server, rank=rank, window=window,
                          profile_budget=profile_budget)
    click.echo(f"perf: judging {role} stages ({algorithm}) into {monitor.store.path}"
               + (f", statistics merged by {server}" if server else ""), err=True)
    return monitor
