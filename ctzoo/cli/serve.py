"""``ctzoo serve``: the KServe v2 inference service over a model repository (:mod:`ctzoo.serve.app`)."""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import stat
import sys
import threading
from pathlib import Path

import click

from ctzoo.cli.decode_options import decode_option, resolve_decoder
from ctzoo.cli.limits import volume_limit_options, volume_limits
from ctzoo.cli.perf_options import perf_monitor, perf_options
from ctzoo.serve.budget import ServeLimits
from ctzoo.serve.connections import HEADER_TIMEOUT_S, MAX_CONNECTIONS

TOKENS_ENV = "CTZOO_SERVE_TOKENS"
logger = logging.getLogger("ctzoo.serve")


def read_tokens(token_file: Path | None) -> list[str]:
    """Tokens from ``$CTZOO_SERVE_TOKENS`` (comma-separated) and ``token_file`` (one per line; blank lines and
    lines starting with ``#`` are skipped; a UTF-8 byte order mark is no part of the first token). A token that no
    client could ever send (a character other than printable ASCII) is a ClickException naming where it is."""
    tokens = []
    for position, token in enumerate(os.environ.get(TOKENS_ENV, "").split(","), 1):
        if token.strip():
            tokens.append(_sendable(token.strip(), f"token {position} of ${TOKENS_ENV}"))
    if token_file is not None:
        text = _token_file_text(token_file)  # first: a file that is no token file needs no advice on its mode
        mode = token_file.stat().st_mode
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            click.echo(f"warning: {token_file} is readable by other users (chmod 600 it)", err=True)
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                tokens.append(_sendable(line.strip(), f"the token on line {number} of {token_file}"))
    return tokens


def _sendable(token: str, where: str) -> str:
    """``token``, if a client can send it: the service reads the Authorization header as Latin-1 and hashes tokens
    as UTF-8, so a token with a character outside printable ASCII could never match (the message never shows
    the token, a secret)."""
    if not all(" " <= char <= "~" for char in token):
        raise click.ClickException(f"{where} holds a character other than printable ASCII (a control character or "
                                   "a non-ASCII letter), so no client could ever send it; use random hex or "
                                   "base64 tokens")
    return token


def _token_file_text(token_file: Path) -> str:
    """The text of ``token_file``; a binary file given by mistake is one error line that shows none of its bytes
    (a token file's contents are secrets)."""
    try:
        # utf-8-sig: an editor's byte order mark would otherwise become part of the first token (which never matches)
        text = token_file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        text = None
    if text is None or "\0" in text:  # NUL: binary that happens to decode as UTF-8
        raise click.ClickException(f"{token_file}: not a text token file (one token per line)") from None
    return text


def console_logging(access_log: bool = True) -> None:
    """Show the service's own lines on stderr whatever ``-v`` says: the lifecycle lines (``ctzoo serve:
    shutting down ...``) as they are, and, unless ``access_log`` is false, the access log with a timestamp
    (``2025-01-31T12:00:00.123 GET /v2/health/ready 200 0.4 ms``). Neither goes on to the root logger's handler
    (no duplicates with ``-v``); calling this again replaces the handlers it added before."""
    for name, fmt, level in (("ctzoo.serve.lifecycle", "%(message)s", logging.INFO),
                             ("ctzoo.serve.access", "%(asctime)s.%(msecs)03d %(message)s",
                              logging.INFO if access_log else logging.WARNING)):
        log = logging.getLogger(name)
        log.handlers = [h for h in log.handlers if not getattr(h, "_ctzoo_serve", False)]
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(fmt, datefmt="%Y-%m-%dT%H:%M:%S"))
        handler._ctzoo_serve = True
        log.addHandler(handler)
        log.setLevel(level)
        log.propagate = False


def run_until_signalled(app, **uvicorn_options) -> None:
    """``uvicorn.run``, ending normally (exit status 0) after SIGINT or SIGTERM: uvicorn shuts down gracefully on
    either, then re-raises the signal to the handler it found, which by default would kill the process with it
    (or raise KeyboardInterrupt, 'Aborted!'); here that handler does nothing. The previous handlers are back
    once uvicorn returns."""
    import uvicorn

    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        return uvicorn.run(app, **uvicorn_options)
    previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.run(app, **uvicorn_options)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/ctzoo/serve``, else ``~/.local/state/ctzoo/serve``."""
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "ctzoo" / "serve"


_STATE_LOCKS: list = []  # open lock files, held for the life of the process


def claim_state_dir(state: Path) -> Path:
    """Make ``state`` this process's own (an exclusive lock on ``state/lock``; ClickException if another service
    holds it), empty its ``tmp`` folder (what a killed service left) and make it the process's temporary folder,
    so zip extraction and every library's temporary file land where the next start-up removes them."""
    import fcntl
    import shutil
    import tempfile

    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = open(state / "lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise click.ClickException(f"{state} is in use by another ctzoo serve; give this one its own --state-dir")
    _STATE_LOCKS.append(lock)
    scratch = state / "tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(mode=0o700)
    tempfile.tempdir = os.environ["TMPDIR"] = str(scratch)  # native libraries (GDCM, ONNX Runtime) read TMPDIR
    return state


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@click.command()
@click.option("--repository", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Model repository written by 'ctzoo export' (REPO/<name>/1/model.onnx + ctzoo.json).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; loopback by default. Put a TLS reverse proxy in front of anything else.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help=f"Accepted bearer tokens, one per line (also: ${TOKENS_ENV}, comma-separated).")
@click.option("--insecure-no-auth", is_flag=True, help="Serve WITHOUT authentication (local experiments only).")
@click.option("--metrics-no-auth", is_flag=True,
              help="Let /metrics be scraped without a token (it needs one by default).")
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=512, show_default=True,
              help="Largest request body (after decompression); larger ones get 413.")
@click.option("--request-timeout-s", type=click.FloatRange(min=0, min_open=True), default=60, show_default=True,
              help="Inference requests taking longer get 504.")
@click.option("--backend", type=click.Choice(["onnx", "torch"]), default="onnx", show_default=True,
              help="onnx: each model's exported graph in ONNX Runtime. torch: its bundle's network in PyTorch (the "
              "module the graph was exported from: same tensors in and out), e.g. on a GPU without onnxruntime-gpu.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="--backend torch: auto runs bf16 on CUDA where it agrees with fp32 on the sample CT (else fp32), "
              "fp32 on the CPU. An ONNX graph runs in its own precision (ctzoo export --fp16).")
@decode_option
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Intra-op threads: ONNX Runtime's per model, or PyTorch's (default: all cores).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: a GPU where the backend can use one (onnx: onnxruntime-gpu's TensorRT/CUDA; torch: CUDA), "
              "else CPU. cuda: fail without one.")
@click.option("--tensorrt/--no-tensorrt", default=True, show_default=True,
              help="Try ONNX Runtime's TensorRT provider before CUDA (engines are built on first use, minutes).")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=None,
              help="Rows per merged batch (default: each model's ctzoo.json).")
@click.option("--max-queue-delay-ms", type=click.FloatRange(min=0), default=None,
              help="How long the first request waits for others to merge with (default: ctzoo.json).")
@click.option("--no-batching", is_flag=True, help="Run every request alone (no dynamic batching).")
@click.option("--no-access-log", is_flag=True,
              help="Do not print a line per request on stderr (method, path, status, milliseconds).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The service's own folder: study uploads while they run, temporary files (default "
              "$XDG_STATE_HOME/ctzoo/serve or ~/.local/state/ctzoo/serve). Emptied at start-up; one service each.")
@volume_limit_options
@click.option("--max-tensor-elements", type=click.IntRange(min=1), default=ServeLimits.max_tensor_elements,
              show_default=True, help="Most elements over all inputs of one /infer request.")
@click.option("--max-tensor-side", type=click.IntRange(min=1), default=ServeLimits.max_tensor_side,
              show_default=True, help="Longest non-batch axis of an /infer input (the models take 512 px slices).")
@click.option("--max-requests-per-model", type=click.IntRange(min=1), default=ServeLimits.max_requests_per_model,
              show_default=True, help="Requests worked on at once per model; more wait (then 503).")
@click.option("--max-inflight-mb", type=click.FloatRange(min=0, min_open=True), default=ServeLimits.max_inflight_mb,
              show_default=True, help="Memory the requests in flight may expect to decode, whole server, in MiB "
              "(about half the service's memory); more wait (then 503), one request alone over it gets 413.")
@click.option("--queue-wait-s", type=click.FloatRange(min=0), default=ServeLimits.queue_wait_s, show_default=True,
              help="How long a request waits for a place before 503 with Retry-After.")
@click.option("--header-timeout-s", type=click.FloatRange(min=0, min_open=True), default=HEADER_TIMEOUT_S,
              show_default=True, help="A connection that has not sent its whole request line and headers this long "
              "after it opened (or after its previous response) is closed.")
@click.option("--max-connections", type=click.IntRange(min=1), default=MAX_CONNECTIONS, show_default=True,
              help="Open connections or requests in progress beyond which a request gets 503 at once; keep it well "
              "under the open-files limit (ulimit -n).")
@perf_options(on_by_default=True, deep_profiles=True)
def serve(repository: Path, host: str, port: int, token_file: Path | None, insecure_no_auth: bool,
          metrics_no_auth: bool, max_upload_mb: float, request_timeout_s: float, backend: str, precision: str,
          decode: str, threads: int | None, device: str, tensorrt: bool, max_batch_size: int | None,
          max_queue_delay_ms: float | None, no_batching: bool, no_access_log: bool, state_dir: Path | None,
          header_timeout_s: float, max_connections: int, **budget_options) -> None:
    """Serve the models of a repository over HTTP: KServe v2 / Open Inference Protocol.

    Any KServe v2 client works, e.g. tritonclient.http (JSON and binary tensors). Every route needs
    'Authorization: Bearer <token>' except the health probes /v2/health/live and /v2/health/ready
    (on shutdown the port closes at once, so probes fail to connect); the service refuses to start without a token
    unless --insecure-no-auth is given. Concurrent requests for a model are merged into batches
    (--max-batch-size, --max-queue-delay-ms, --no-batching). Prometheus metrics: /metrics.

    Every request gets an access-log line on stderr: time, method, path (no query string), status
    and milliseconds, never bodies, headers or tokens (--no-access-log turns it off). SIGINT or
    SIGTERM stops the service gracefully (exit status 0).

    Whole studies: POST /studies/<model> with a NIfTI, NRRD or MHA file or a zipped DICOM series as
    the body; the answer is what 'ctzoo infer --backend onnx' writes (?format=json, nifti for a
    segmenter's label map, dicom for the SR or SEG of DICOM input).

    --backend torch serves the same tensors from each bundle's own network in PyTorch (on a GPU
    without onnxruntime-gpu; bf16 where --precision allows); studies then run it too.

    Hostile uploads are bounded: sizes declared by headers are checked before anything is read
    (--max-volume-voxels, --max-decoded-mb, --max-inflate-ratio, --max-tensor-elements,
    --max-tensor-side: 413 naming the option), MHA/NRRD files must carry their voxels (400), and
    requests in flight are limited per model and in memory (--max-requests-per-model,
    --max-inflight-mb: they wait up to --queue-wait-s, then 503 with Retry-After). The body is read
    inside --request-timeout-s; past it the client gets 504 and the study is told to stop at its next
    check (between slice chunks and model batches, before writing), keeping its place and memory until
    it has; then its files are removed. A connection must send its request headers within
    --header-timeout-s, and beyond --max-connections requests get 503.

    --perf (on by default; --no-perf) judges each /infer request's decode, queue and encode stages,
    each batch's formation and model run, and each study's upload, read, preprocess, predict, finish
    and write; anomalies are counted in /metrics and listed by /v2/perf/anomalies (statistics:
    /v2/perf/stats); the provenance store is STATE/perf.sqlite unless --perf-store says otherwise.
    With --perf-server, every replica judges against the statistics of all. --perf-profile N (or, at
    run time, POST /v2/perf/profile?count=N) reruns the next N anomalous model runs under ONNX
    Runtime's profiler (torch.profiler with --backend torch) and keeps each profile with its
    anomaly (GET /v2/perf/profiles/<id>: the Chrome trace).

    \b
    Examples:
      ctzoo export recistnet-mini --out models && export CTZOO_SERVE_TOKENS=$(openssl rand -hex 24)
      ctzoo serve --repository models
      curl -H "Authorization: Bearer $CTZOO_SERVE_TOKENS" localhost:8000/v2/models/recistnet-mini
      curl -H "Authorization: Bearer $CTZOO_SERVE_TOKENS" --data-binary @ct.nii.gz \\
           localhost:8000/studies/recistnet-mini
    """
    import faulthandler

    from ctzoo.serve.app import create_app
    from ctzoo.serve.connections import limit_accept_errors, uvicorn_connection_options
    from ctzoo.serve.studies import study_router

    try:  # a native crash (a decoder, a runtime) leaves every thread's Python stack in the log
        faulthandler.enable()
    except (OSError, ValueError, AttributeError):  # stderr is no file descriptor (a CliRunner in tests): no dump
        pass

    tokens = read_tokens(token_file)
    if not tokens and not insecure_no_auth:
        raise click.ClickException(f"no API token: set {TOKENS_ENV}=token1,token2 or pass --token-file FILE "
                                   "(for a local experiment only: --insecure-no-auth)")
    if tokens and insecure_no_auth:
        raise click.ClickException("--insecure-no-auth was given together with tokens; drop one of them")
    if any(len(t) < 16 for t in tokens):
        click.echo("warning: a token is shorter than 16 characters; use long random tokens", err=True)
    if not _is_loopback(host):
        click.echo(f"warning: listening on {host}, beyond this machine, over plain HTTP: put a TLS reverse proxy "
                   "in front", err=True)
    state = claim_state_dir(state_dir or default_state_dir())
    monitor = perf_monitor(budget_options, "serve", state / "perf.sqlite")
    limits = ServeLimits(volume_limits(budget_options, self_contained_only=True), **budget_options)
    decoder = resolve_decoder(decode, device)
    try:
        app = create_app(repository, tokens, insecure_no_auth=insecure_no_auth, device=device, threads=threads,
                         tensorrt=tensorrt, backend=backend, precision=precision, max_upload_mb=max_upload_mb,
                         request_timeout_s=request_timeout_s, batching=not no_batching, max_batch_size=max_batch_size,
                         max_queue_delay_ms=max_queue_delay_ms, metrics_no_auth=metrics_no_auth, limits=limits,
                         perf=monitor,
                         extra_routers=[study_router(device, threads, state, request_timeout_s, decoder)])
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    for model in app.state.repository.values():
        reason = f" ({model.precision_reason})" if model.precision_reason else ""
        rows = model.max_batch_size if model.batching else 1
        # the admission limit comes first: a batch can merge no more requests than are let in at once
        capped = "" if rows <= limits.max_requests_per_model else \
            f" rows, at most {limits.max_requests_per_model} requests each (--max-requests-per-model)"
        click.echo(f"serving {model.name} version {model.version} on {model.engine.name}{reason}, batches of up to "
                   f"{rows}{capped}", err=True)
    click.echo(f"KServe v2 on http://{host}:{port}/v2 (metrics: /metrics)", err=True)
    console_logging(access_log=not no_access_log)
    limit_accept_errors()
    level = logging.getLogger().getEffectiveLevel()
    # uvicorn's own access log stays off: it would log query strings
    try:
        run_until_signalled(app, host=host, port=port, access_log=False, log_level=max(level, logging.INFO),
                            **uvicorn_connection_options(header_timeout_s, max_connections))
    finally:
        if monitor is not None:
            monitor.close()  # the reduction totals, written last
