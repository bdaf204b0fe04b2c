"""``ctzoo perf``: the tools around in-situ latency anomaly detection (:mod:`ctzoo.perf`).

One module per subcommand (``perf_report``, ``perf_server``); this file only assembles them.
"""

from __future__ import annotations

import click

from ctzoo.cli.perf_report import report
from ctzoo.cli.perf_server import server


@click.group()
def perf() -> None:
    """Latency anomalies of ctzoo's own work (Chimbuko's design).

    \b
    Switch detection on with --perf on ctzoo serve, infer, pacs and train; each process judges every stage
    it times (SSTD or HBOS) and keeps only anomalies, their neighbours and one normal sample per key in a
    provenance store (SQLite). Then:
      ctzoo perf server --port 8765        merge the statistics of many processes (parameter server)
      ctzoo perf report STORE --out R.html one self-contained page: timeline, distributions, provenance
    """


perf.add_command(report)
perf.add_command(server)
