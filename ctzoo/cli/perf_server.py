"""``ctzoo perf server``: the parameter server of :mod:`ctzoo.perf.server`."""

from __future__ import annotations

import os
import signal
import stat
import threading
from pathlib import Path

import click

from ctzoo.cli.serve import _is_loopback
from ctzoo.perf.server import DEFAULT_PORT, EXPIRE_AFTER_S, TOKEN_ENV


def read_token(token_file: Path | None) -> str:
    """The token from ``token_file`` (its first non-blank line) or ``$CTZOO_PERF_TOKEN``; ClickException when
    neither has one."""
    if token_file is not None:
        if token_file.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH):
            click.echo(f"warning: {token_file} is readable by other users (chmod 600 it)", err=True)
        token = next((line.strip() for line in token_file.read_text(encoding="utf-8").splitlines() if line.strip()),
                     "")
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise click.ClickException(f"no token: set {TOKEN_ENV} or pass --token-file FILE (every process that syncs "
                                   f"with this server sends it, from its own {TOKEN_ENV})")
    if len(token) < 16:
        click.echo("warning: the token is shorter than 16 characters; use a long random one", err=True)
    return token


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; loopback by default (plain HTTP: beyond one machine, put it on a private "
              "network or behind a TLS proxy).")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
              help="Port (0: any free one; the line printed at start says which).")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help=f"The bearer token clients must send, first line of the file [default: ${TOKEN_ENV}].")
@click.option("--expire-after-hours", type=click.FloatRange(min=0, min_open=True), default=EXPIRE_AFTER_S / 3600,
              show_default=True, help="Forget the keys no process has named, and the processes not seen, for this "
              "long (the memory follows the keys in use).")
def server(host: str, port: int, token_file: Path | None, expire_after_hours: float) -> None:
    """Merge the latency statistics of many processes, so that every one judges against the same ones.

    Chimbuko's parameter server: each process started with --perf --perf-server URL (ctzoo serve
    replicas, ctzoo infer, every rank of ctzoo train, ...) sends what its detector learned since its
    last sync (every 2 s and when it ends) and gets the merged per-key statistics back. Merges are
    exact: the global statistics are those one process would have built from every event. A process
    that cannot reach the server says so once and judges on its own statistics until it can.

    \b
    Routes (all need 'Authorization: Bearer <token>'):
      POST /v1/sync     a process's delta in, the global statistics out
      GET  /v1/stats    per key: count, mean, std, min, max, events, anomalies;
                        per process: role, rank, syncs, last seen, contribution per key
      GET  /v1/states   the merged moments and histograms

    The statistics live in memory: a restarted server is reseeded by each process's next sync,
    which sends its whole history when it sees the server changed.
    Ctrl-C or SIGTERM stops it.

    \b
    Example:
      export CTZOO_PERF_TOKEN=$(openssl rand -hex 24)
      ctzoo perf server --port 8765 &
      torchrun --nproc_per_node 2 -m ctzoo train CONFIG --out runs/x --perf --perf-server http://127.0.0.1:8765
      curl -H "Authorization: Bearer $CTZOO_PERF_TOKEN" localhost:8765/v1/stats
    """
    from ctzoo.perf.server import ParameterServer

    token = read_token(token_file)
    if not _is_loopback(host):
        click.echo(f"warning: listening on {host}, beyond this machine, over plain HTTP", err=True)
    try:
        parameter_server = ParameterServer(token, host, port, expire_after_s=expire_after_hours * 3600)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc}") from exc
    click.echo(f"ctzoo perf server: listening on {parameter_server.url} (GET /v1/stats)", err=True)
    stop = threading.Event()
    # Ctrl-C and SIGTERM only set the event (no KeyboardInterrupt landing at a random point, no 'Aborted!'):
    # serve_forever runs in a thread, the main thread waits for the event, then shuts the server down (exit 0)
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        parameter_server.start()
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        parameter_server.close()
        click.echo("ctzoo perf server: stopped", err=True)
