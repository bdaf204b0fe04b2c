"""The ``ctzoo serve`` HTTP service: KServe v2 / Open Inference Protocol over a model repository.

Routes (``{m}`` a model name; every model route also answers under ``/v2/models/{m}/versions/{v}/...``):

=====================================  ====================================================================
``GET  /v2/health/live``               liveness (no token needed)
``GET  /v2/health/ready``              readiness: all models loaded (no token needed; 503 once the lifespan ends)
``GET  /v2``                           server metadata (name, version, extensions)
``GET  /v2/models/{m}``                model metadata: name, versions, platform, inputs/outputs
``GET  /v2/models/{m}/ready``          model readiness
``GET  /v2/models/{m}/config``         Triton's ModelConfig as JSON (ctzoo.json as text: ``parameters.ctzoo``)
``POST /v2/models/{m}/infer``          inference: JSON tensors and/or the binary tensor data extension
``POST /v2/repository/index``          the served models (Triton's repository extension, read-only)
``GET  /v2/perf/anomalies``             latest latency anomalies with their provenance windows (``perf`` on;
                                       ``?request=ID``: those of one request, its id hashed here)
``GET  /v2/perf/stats``                 per-key latency statistics of the anomaly detector (``perf`` on)
``POST /v2/perf/profile?count=N``       deep-profile the next N anomalous model runs (``perf`` on)
``GET  /v2/perf/profiles/{id}``         a deep profile's Chrome trace (gzip JSON)
``GET  /metrics``                      Prometheus metrics (token required unless ``metrics_no_auth``)
=====================================  ====================================================================

Security: a bearer token (``Authorization: Bearer T``) is required everywhere but the two health probes (liveness
and readiness, which Kubernetes and load balancers call without credentials and which reveal nothing but up/ready),
compared in constant time against SHA-256 digests of the configured tokens; there is no way to run without tokens
except the explicit ``insecure_no_auth``. Bodies are limited to ``max_upload_mb``, checked on ``Content-Length``
before reading and on the bytes actually streamed (413); each inference has ``request_timeout_s`` (504), body
read included. Every other per-request limit (tensor shapes declared before any tensor is built, a compressed
body inflating only to what its header declares, requests and bytes in flight: 413, or 503 with ``Retry-After``)
belongs to :class:`~ctzoo.serve.budget.ServeLimits` (``limits``), enforced by
:class:`~ctzoo.serve.budget.InflightBudget`. Errors are ``{"error": "..."}`` with a 4xx status naming what is
wrong with the request; 5xx means a fault of the server (503: the queue is full, the server is busy, or the
service is stopping).

Logging: request bodies, headers (tokens), query strings, request ids and tensor values are never logged (they may
identify patients). The access log, logger ``ctzoo.serve.access`` at INFO, has one line per request:
``METHOD PATH STATUS DURATION ms`` (e.g. ``POST /v2/models/m/infer 200 12.3 ms``), the path without its query
string, control characters escaped (``\\x0a``) and cut to 200 characters, so a client cannot forge log lines.
Logger ``ctzoo.serve.lifecycle`` (INFO) says ``ctzoo serve: shutting down (N requests served)`` when the lifespan
ends and ``ctzoo serve: stopped`` once the batchers have stopped. ``ctzoo serve`` shows both on stderr.

Metrics (a registry per app): ``ctzoo_requests_total{model,endpoint,code}``,
``ctzoo_request_stage_seconds{model,stage}`` (stages decode, queue, inference, encode, total),
``ctzoo_batch_size{model}`` (rows per model run), ``ctzoo_batch_requests{model}`` (requests merged per run),
``ctzoo_queue_depth{model}``. ``/metrics`` needs a token by default because the model names and traffic are
information too; pass ``metrics_no_auth=True`` (``--metrics-no-auth``) for a scraper without one, e.g. when the
port is reachable only from the monitoring network.

Hook for more endpoints (e.g. study-level routes): ``create_app(..., extra_routers=[router])`` includes each
router behind the same token check. Their handlers reach the models through ``request.app.state.repository``:
``{name: ServedModel}`` with ``.engine`` (what runs it, :mod:`ctzoo.serve.engines`), ``.config`` (the
ctzoo.json dict), ``.folder`` and ``await model.infer({input: np.ndarray}) -> {output: np.ndarray}``, which
validates the inputs (``ServeError`` 400, turned into a JSON error by the app) and goes through the model's
micro-batcher like any inference request. ``app.state.metrics`` and ``app.state.settings`` are there too.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ctzoo import __version__
from ctzoo.perf import PerfMonitor, event_key, request_hash
from ctzoo.serve.batching import MicroBatcher, QueueFullError
from ctzoo.serve.budget import InflightBudget, Reservation, ServeLimits
from ctzoo.serve.repository import ServedModel, load_repository
from ctzoo.serve.v2_codec import (
    HEADER_LENGTH,
    ServeError,
    content_encoding,
    decode_request,
    encode_response,
    inflate,
    request_budget,
)

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("ctzoo.serve.access")
lifecycle_logger = logging.getLogger("ctzoo.serve.lifecycle")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?(?:/(infer|ready|config))?/?$")
#: characters that could break or disguise a log line: C0/C1 controls (CR, LF, ESC...), Unicode line and
#: paragraph separators, zero-width and bidirectional formatting characters, the byte order mark
_UNSAFE_FOR_LOG = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
MAX_LOGGED_PATH = 200
#: The most deep profiles armed at once (POST /v2/perf/profile): each is a rerun of a model batch.
MAX_PROFILES_ARMED = 100


def loggable(text: str, limit: int = MAX_LOGGED_PATH) -> str:
    """``text`` (a client-chosen path or method) safe for one log line: unsafe characters escaped as ``\\xNN`` or
    ``\\uNNNN``, and cut to ``limit`` characters (ending in ``...``)."""
    text = _UNSAFE_FOR_LOG.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}",
                               text[:limit + 1])  # escapes only lengthen: the rest would be cut anyway
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class Settings:
    max_upload_bytes: int = 512 << 20
    request_timeout_s: float = 60.0
    metrics_no_auth: bool = False
    auth: bool = True
    limits: ServeLimits = field(default_factory=ServeLimits)


class ServeMetrics:
    """The service's Prometheus metrics, in a registry of their own; also the batchers' observer."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("ctzoo_requests", "HTTP requests by model, endpoint and status code",
                                ["model", "endpoint", "code"], registry=registry)
        self.latency = Histogram("ctzoo_request_stage_seconds", "Inference request latency per stage (decode, "
                                 "queue, inference, encode, total)", ["model", "stage"], buckets=LATENCY_BUCKETS,
                                 registry=registry)
        self.batch_size = Histogram("ctzoo_batch_size", "Rows per model run (the merged batch)", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=registry)
        self.batch_requests = Histogram("ctzoo_batch_requests", "Requests merged into one model run", ["model"],
                                        buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry)
        self.depth = Gauge("ctzoo_queue_depth", "Requests waiting in the model's batching queue", ["model"],
                           registry=registry)
        self.perf_events = Counter("ctzoo_perf_events", "Stage events judged by the latency anomaly detector",
                                   ["model", "stage"], registry=registry)
        self.perf_anomalies = Counter("ctzoo_perf_anomalies", "Stage events judged anomalous (ctzoo perf)",
                                      ["model", "stage"], registry=registry)
        self.served = 0  # HTTP requests answered (any route and status), for the shutdown line

    def perf_event(self, event, label) -> None:
        """The perf monitor's ``on_event``: count events and anomalies by model and stage."""
        self.perf_events.labels(event.model, event.stage).inc()
        if label.anomalous:
            self.perf_anomalies.labels(event.model, event.stage).inc()

    def queue_depth(self, model: str, depth: int) -> None:
        self.depth.labels(model).set(depth)

    def batch(self, model: str, rows: int, requests: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(rows)
        self.batch_requests.labels(model).observe(requests)

    def request(self, model: str, queue_seconds: float, inference_seconds: float) -> None:
        self.latency.labels(model, "queue").observe(queue_seconds)
        self.latency.labels(model, "inference").observe(inference_seconds)


class _AccessMiddleware:
    """Counts every HTTP request by model, endpoint and status, times inference requests end to end and writes
    the access log: method, path, status, milliseconds; no query strings, headers or bodies, the path made safe
    by :func:`loggable`. A pure ASGI middleware: bodies stream through untouched."""

    def __init__(self, app, metrics: ServeMetrics, models: dict[str, ServedModel]) -> None:
        self.app, self.metrics, self.models = app, metrics, models

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - started
            model, endpoint = _classify(scope["path"], self.models)
            self.metrics.requests.labels(model, endpoint, str(status)).inc()
            self.metrics.served += 1
            if endpoint == "infer" and model != "_unknown":
                self.metrics.latency.labels(model, "total").observe(seconds)
            if access_logger.isEnabledFor(logging.INFO):
                access_logger.info("%s %s %d %.1f ms", loggable(scope["method"], 16), loggable(scope["path"]),
                                   status, seconds * 1000)


def _classify(path: str, models: dict[str, ServedModel]) -> tuple[str, str]:
    """(model label, endpoint label) of a path; unknown model names collapse into one label value."""
    match = _MODEL_PATH.match(path)
    if match:
        return (match.group(1) if match.group(1) in models else "_unknown"), match.group(2) or "metadata"
    endpoints = {"/v2": "server", "/v2/": "server", "/v2/health/live": "live", "/v2/health/ready": "ready",
                 "/metrics": "metrics", "/v2/repository/index": "index"}
    return "", endpoints.get(path, "other")


def token_checker(tokens: Sequence[str]):
    """A FastAPI dependency accepting ``Authorization: Bearer <one of tokens>`` (401 otherwise)."""
    digests = [hashlib.sha256(token.encode()).digest() for token in tokens]

    async def require_token(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ServeError("missing bearer token: send 'Authorization: Bearer <token>'", status=401)
        digest = hashlib.sha256(given.strip().encode()).digest()
        valid = False
        for known in digests:  # no early exit: the time taken does not depend on which token matched
            valid |= hmac.compare_digest(known, digest)
        if not valid:
            raise ServeError("invalid bearer token", status=401)

    return require_token


async def read_body(request: Request, limit: int, received: Reservation | None = None) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes: from
    ``Content-Length`` before anything is read, else while counting the streamed chunks. ``received``: the
    in-flight budget's reservation for the body, grown by each chunk as it arrives (never by what
    ``Content-Length`` announces: a client that announces much and stalls holds only what it sent)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise ServeError(f"Content-Length must be an integer, got {length!r:.40}")
        if int(length) > limit:
            raise ServeError(f"the body of {int(length)} bytes exceeds the {limit}-byte upload limit", status=413)
        if received is not None:
            received.check_fits(int(length))
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ServeError(f"the body exceeds the {limit}-byte upload limit", status=413)
            if received is not None:
                await received.grow(len(chunk))
            chunks.append(chunk)
    except ClientDisconnect:
        raise ServeError("the client disconnected while sending the body") from None
    return b"".join(chunks)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer", **(headers or {})} if status == 401 else headers
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(repository: Path, tokens: Sequence[str] = (), *, insecure_no_auth: bool = False,
               device: str = "auto", threads: int | None = None, tensorrt: bool = True, backend: str = "onnx",
               precision: str = "auto", max_upload_mb: float = 512,
               request_timeout_s: float = 60.0, batching: bool = True, max_batch_size: int | None = None,
               max_queue_delay_ms: float | None = None, metrics_no_auth: bool = False,
               limits: ServeLimits | None = None, perf: PerfMonitor | None = None,
               extra_routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The service for the models in ``repository`` (loaded now; see :func:`load_repository`).

    ``backend``: ``onnx`` (each model's exported graph in ONNX Runtime) or ``torch`` (its bundle's network in
    PyTorch, in ``precision``); ``device``, ``threads``, ``tensorrt``: see :func:`load_repository`.
    ``tokens``: accepted bearer tokens; at least one is required unless ``insecure_no_auth``. ``max_batch_size``
    and ``max_queue_delay_ms`` override each model's ctzoo.json (for the batcher, request validation and
    ``/config`` alike); ``batching=False`` runs every request alone.
    ``limits``: the per-request budget (:mod:`ctzoo.serve.budget`; default :class:`ServeLimits`()). ``perf``: a
    :class:`~ctzoo.perf.PerfMonitor` judging every request's stages (decode, queue, model, encode) in situ; its
    anomalies are counted in /metrics and listed by ``/v2/perf/anomalies`` and ``/v2/perf/stats``.
    """
    tokens = [t.strip() for t in tokens if t and t.strip()]
    if not tokens and not insecure_no_auth:
        raise ValueError("no API token configured: set CTZOO_SERVE_TOKENS or pass a token file "
                         "(or, for a local test only, explicitly disable auth)")
    limits = limits or ServeLimits()
    settings = Settings(int(max_upload_mb * (1 << 20)), float(request_timeout_s), metrics_no_auth, bool(tokens),
                        limits)
    budget = InflightBudget(limits)
    models = load_repository(repository, device=device, threads=threads, tensorrt=tensorrt, backend=backend,
                             precision=precision)
    metrics = ServeMetrics()
    for model in models.values():
        model.override_batching(max_batch_size, max_queue_delay_ms, batching)
        model.batcher = MicroBatcher(model.name, model.run, model.max_batch_size, model.max_queue_delay_ms,
                                     enabled=model.batching, observer=metrics, max_elements=limits.max_tensor_elements)
        metrics.queue_depth(model.name, 0)
    if not tokens:
        logger.warning("authentication is OFF (insecure_no_auth): anyone who reaches the port can use the models")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.ready = True
        yield
        # uvicorn has closed its port by now (new probes cannot connect); an in-process caller still sees 503
        app.state.ready = False
        lifecycle_logger.info("ctzoo serve: shutting down (%d requests served)", metrics.served)
        for model in models.values():
            await model.batcher.stop()
        lifecycle_logger.info("ctzoo serve: stopped")

    app = FastAPI(title="ctzoo serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.repository, app.state.metrics, app.state.settings, app.state.ready = models, metrics, settings, True
    app.state.budget, app.state.perf = budget, perf
    if perf is not None:
        perf.on_event = metrics.perf_event
    auth = [Depends(token_checker(tokens))] if tokens else []

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return _error(exc.status, str(exc), exc.headers)

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
        return _error(503, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))

    @app.exception_handler(Exception)
    async def fault(request: Request, exc: Exception) -> JSONResponse:
        logger.error("internal error on %s %s: %s", request.method, request.url.path, type(exc).__name__,
                     exc_info=exc)
        return _error(500, "internal server error (details are in the server log)")

    # the probes need no token: Kubernetes and load balancers send none, and they reveal nothing but up/ready
    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready(request: Request) -> JSONResponse:
        is_ready = bool(request.app.state.ready)
        return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)

    router = APIRouter(dependencies=auth)

    @router.get("/v2")
    async def server_metadata() -> dict:
        return {"name": "ctzoo", "version": __version__,
                "extensions": ["binary_tensor_data", "model_configuration", "model_repository"]}

    @router.post("/v2/repository/index")
    async def repository_index() -> list:
        return [{"name": m.name, "version": m.version, "state": "READY"} for m in models.values()]

    def served(name: str, version: str | None = None) -> ServedModel:
        if name not in models:
            raise ServeError(f"unknown model {name!r}; this server has {', '.join(sorted(models))}", status=404)
        model = models[name]
        if version is not None and version != model.version:
            raise ServeError(f"model {name!r} has no version {version!r} (serving version {model.version})",
                             status=404)
        return model

    # the version comes from the path where the route has one (never from a query string)
    async def metadata(model_name: str, request: Request) -> dict:
        return served(model_name, request.path_params.get("version")).metadata()

    async def model_ready(model_name: str, request: Request) -> dict:
        return {"name": served(model_name, request.path_params.get("version")).name, "ready": True}

    async def model_config(model_name: str, request: Request) -> dict:
        return served(model_name, request.path_params.get("version")).triton_config()

    async def infer(model_name: str, request: Request) -> Response:
        model = served(model_name, request.path_params.get("version"))
        try:
            return await asyncio.wait_for(_infer(model, request), settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise ServeError(f"inference took longer than the {settings.request_timeout_s:g} s request timeout",
                             status=504) from None

    async def _infer(model: ServedModel, request: Request) -> Response:
        # the body is read before the model's slot is taken (a client still uploading holds no slot, so slow
        # uploads cannot lock the model), under its memory reservation and the request's deadline
        content_encoding(request.headers.get("content-encoding"))  # 415 before the body is read
        async with budget.growing("the request body") as received:
            body = await read_body(request, settings.max_upload_bytes, received)
            inflated, held = await run_in_threadpool(request_budget, body, request.headers.get("content-encoding"),
                                                     request.headers.get(HEADER_LENGTH),
                                                     min(settings.max_upload_bytes, limits.max_tensor_bytes),
                                                     limits.check_tensor_shape, limits.max_tensor_elements)
            arrived = time.perf_counter()
            async with budget.slot(model.name):
                admit_s = time.perf_counter() - arrived  # waiting for one of the model's request slots
                async with budget.reserve(held, "the request", held=received.nbytes):
                    return await _decode_and_run(model, request, body, inflated, admit_s)

    async def _decode_and_run(model: ServedModel, request: Request, body: bytes, inflated: int,
                              admit_s: float) -> Response:
        started = time.perf_counter()

        def decode():
            raw = inflate(body, request.headers.get("content-encoding"), inflated) if inflated else body
            decoded = decode_request(raw, request.headers.get(HEADER_LENGTH), limits.check_tensor_shape)
            names = model.check_outputs(decoded.outputs)
            return decoded, names, model.validate(decoded.inputs)  # before batching: a bad request fails alone

        decoded, names, inputs = await run_in_threadpool(decode)
        decode_s = time.perf_counter() - started
        metrics.latency.labels(model.name, "decode").observe(decode_s)
        timing: dict | None = None
        if perf is not None:  # the v2 id as a hash (a client may put anything there), so a client finds its request
            timing = {"admit_s": admit_s, "request": None if decoded.id is None else request_hash(decoded.id)}
        outputs = await model.infer(inputs, validated=True, timing=timing)
        started = time.perf_counter()
        content, headers = await run_in_threadpool(encode_response, model.name, model.version,
                                                   {name: outputs[name] for name in names}, decoded)
        encode_s = time.perf_counter() - started
        metrics.latency.labels(model.name, "encode").observe(encode_s)
        if perf is not None:
            _perf_events(model, inputs, timing, decode_s, encode_s)
        return Response(content, headers=headers)

    def _perf_events(model: ServedModel, inputs: dict, timing: dict, decode_s: float, encode_s: float) -> None:
        """The request's own stages (decode, queue, encode), and, from one request per batch, the batch's
        formation and model run: a model run is one event however many requests it merged (counting it once per
        request would count one slow run as several anomalies). Judged on the monitor's thread: the answer does
        not wait for it."""
        rows = int(next(iter(inputs.values())).shape[0])
        shared = {"shape": "x".join(map(str, next(iter(inputs.values())).shape[1:])), "backend": model.engine.name,
                  "queue_depth": timing.get("queue_depth"), "batch_rows": timing.get("batch_rows", rows),
                  "batch_requests": timing.get("batch_requests", 1)}
        own = {**shared, "rows": rows, "request": timing["request"], "admit_s": timing["admit_s"],
               "queue_s": timing.get("queue_s")}
        device = model.engine.device
        # queue: all the waiting between arrival and the model run (a request slot, then the batcher's queue)
        waited = timing["admit_s"] + timing.get("queue_s", 0.0)
        for stage, seconds in (("decode", decode_s), ("queue", waited), ("encode", encode_s)):
            perf.record_later(event_key(model.name, model.version, stage, device, rows), seconds, context=own)
        if timing.get("batch_first"):  # the batch's events, keyed by its rows (merged requests take longer)
            members = ",".join(h for h in timing["batch_members"] if h is not None)
            batch = {**shared, "requests": members}
            size, started = shared["batch_rows"], timing["model_started"]
            if "batch_s" in timing:  # with the micro-batcher: how long it held the batch open for more rows
                perf.record_later(event_key(model.name, model.version, "batch", device, size), timing["batch_s"],
                                  started - timing["batch_s"], batch)
            rerun = None  # armed deep profiles: the batch's inputs again under the engine's profiler
            if perf.profiler.armed:
                rerun = functools.partial(model.profile_run, timing["batch_inputs"])
            perf.record_later(event_key(model.name, model.version, "model", device, size), timing["model_s"],
                              started, batch, profile=rerun)

    for prefix in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{version}"):
        router.add_api_route(prefix, metadata, methods=["GET"])
        router.add_api_route(prefix + "/ready", model_ready, methods=["GET"])
        router.add_api_route(prefix + "/config", model_config, methods=["GET"])
        router.add_api_route(prefix + "/infer", infer, methods=["POST"])
    def monitor() -> PerfMonitor:
        if perf is None:
            raise ServeError("latency anomaly detection is off: start ctzoo serve with --perf", status=404)
        return perf

    @router.get("/v2/perf/anomalies")
    async def perf_anomalies(limit: int = 50, request: str | None = None) -> dict:
        """The latest anomalies; ``request``: a request's id (v2 ``id`` or X-Request-ID), hashed here with this
        process's key, for only the anomalies that name it or have it in their window."""
        await run_in_threadpool(monitor().drain)  # the events of requests answered before this one are judged
        store = monitor().store
        wanted = None if request is None else request_hash(request)
        found = await run_in_threadpool(store.anomalies, max(1, min(limit, 1000)), wanted) if store else []
        return {"anomalies": found, "reduction": await run_in_threadpool(store.reduction) if store else None}

    @router.get("/v2/perf/stats")
    async def perf_stats() -> dict:
        current = monitor()
        await run_in_threadpool(current.drain)
        return {"algorithm": current.config.algorithm, "process": current.process, "keys": current.stats(),
                "parameter_server": current.server_status(),  # None without --perf-server; else connected or not
                "overhead": current.overhead(), "profiles": current.profiler.status()}

    @router.post("/v2/perf/profile")
    async def perf_profile(count: int = 1) -> dict:
        """Arm deep profiles: the next ``count`` anomalous model runs are rerun under the profiler."""
        if not 1 <= count <= MAX_PROFILES_ARMED:
            raise ServeError(f"count must be 1 to {MAX_PROFILES_ARMED}, got {count}")
        current = monitor()
        if current.store is None:
            raise ServeError("deep profiles are kept in the provenance store, and this service has none", status=409)
        current.profiler.arm(max(0, min(count, MAX_PROFILES_ARMED - current.profiler.budget)))  # at most 100 armed
        return current.profiler.status()

    @router.get("/v2/perf/profiles/{profile_id}")
    async def perf_profile_trace(profile_id: int) -> Response:
        store = monitor().store
        trace = await run_in_threadpool(store.profile_trace, profile_id) if store is not None else None
        if trace is None:
            raise ServeError(f"no deep profile {profile_id} with a trace (see /v2/perf/anomalies)", status=404)
        return Response(trace, media_type="application/gzip", headers={
            "Content-Disposition": f'attachment; filename="ctzoo-profile-{profile_id}.json.gz"'})

    app.include_router(router)

    metrics_auth = [] if metrics_no_auth else auth

    @app.get("/metrics", dependencies=metrics_auth)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    for extra in extra_routers:
        app.include_router(extra, dependencies=auth)
    app.add_middleware(_AccessMiddleware, metrics=metrics, models=models)
    return app
