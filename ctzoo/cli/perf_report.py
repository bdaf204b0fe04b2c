"""``ctzoo perf report STORE``: the provenance store as one self-contained HTML page (:mod:`ctzoo.perf.report`)."""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path

import click

from ctzoo.io.atomic import atomic_path
from ctzoo.perf.report import DEFAULT_LIMIT, read_report_data, render_report_html  # plotly is imported on use

#: ``--since 90m`` / ``2h`` / ``3d``: a duration back from now.
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str | None, now: float | None = None) -> float | None:
    """``--since`` as Unix time: a duration back from now (``90m``, ``2h``, ``3d``) or an ISO 8601 date/time
    (local time unless it names its offset)."""
    if text is None:
        return None
    duration = _DURATION.match(text.strip())
    if duration:
        return (time.time() if now is None else now) - float(duration[1]) * _UNIT_SECONDS[duration[2]]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither a duration (90m, 2h, 3d) nor an ISO date/time "
                                 "(2025-05-01T12:00)", param_hint="--since") from None


@click.command("report")
@click.argument("store", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The HTML file to write. Default: perf-report.html beside STORE.")
@click.option("--since", default=None, metavar="WHEN",
              help="Show only anomalies that started since WHEN: a duration back from now (90m, 2h, 3d) or an "
              "ISO date/time. Totals and distributions always cover the whole store.")
@click.option("--limit", type=click.IntRange(min=1), default=DEFAULT_LIMIT, show_default=True,
              help="Show at most this many anomalies, the newest.")
def report(store: Path, out: Path | None, since: str | None, limit: int) -> None:
    """Write one self-contained HTML page (no network needed to open it) from a perf provenance STORE.

    \b
    The page shows:
      the events seen, stored and the reduction (seen/stored) per process and overall;
      the anomaly timeline, one row per process (hover: stage, seconds, key);
      the latency distribution of every key (its statistics merged over processes), anomalies in red;
      the provenance of an anomaly on click: key, seconds, score/threshold, context, its window and
      its deep profile where one was taken (slowest operators; whether the slowness reproduced).
    """
    out = out if out is not None else store.parent / "perf-report.html"
    try:
        data = read_report_data(store, since=parse_since(since), limit=limit)
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    page = render_report_html(data)
    with atomic_path(out) as partial:
        partial.write_text(page, encoding="utf-8")
    click.echo(f"{out}: {data['anomalies_total']} anomalies ({len(data['anomalies'])} shown), "
               f"{len(data['keys'])} keys, {len(page) / 2**20:.1f} MiB")
