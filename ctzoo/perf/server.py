"""The parameter server that merges the statistics of many detector processes, and its client (Chimbuko's PS).

Serve workers, Ray drivers, DDP ranks and PACS workers each judge their events in situ; to judge against the same
statistics, each sends the server what it learned since its last sync (its *delta*: per-key moments and
histograms, :meth:`~ctzoo.perf.detectors.AnomalyDetector.take_delta`) and adopts the merged global states the
server answers with (:meth:`~ctzoo.perf.detectors.AnomalyDetector.adopt_global`). Merges are exact, so the global
state is what one detector fed every process's events would hold. A process that cannot reach the server goes on
judging on its own statistics, says so once, and catches up when the server is back.

Protocol (JSON over HTTP, ``Authorization: Bearer <token>`` on every route; stdlib only, as ctzoo.perf is layer 1):

``POST /v1/sync``
    ``{"process", "role", "rank", "seq", "delta": {key: state}, "counts": {key: [events, anomalies]}}``: ``seq``
    numbers a process's deltas; a delta whose ``seq`` the server has merged already (its answer was lost, the
    client sent it again) is not merged twice. ``counts`` are the process's running totals per key (events seen,
    anomalies found). Answer: ``{"server_id", "states": {key: state}}``, the global states.
``GET /v1/stats``
    Per key the merged count (events learned), mean, std, min, max, and events and anomalies summed over
    processes (a key whose events were all skipped or anomalous is listed with count 0); per process
    its role, rank, syncs, last seen, and per key what it contributed (``learned``: events merged into the global
    state, ``events``, ``anomalies``). What operators and tests read.
``GET /v1/states``
    The global states themselves (``{key: state}``).

Keys travel joined with ``|``: ``model|version|stage|device|bucket``. Bodies over ``max_body_bytes`` get 413,
malformed ones, and states that no stream of durations gives (:meth:`~ctzoo.perf.detectors.KeyState.problem`),
400; a missing or wrong token 401 (compared in constant time); a bad request never stops the server. The server
keeps everything in memory: after a restart the global statistics start again from what the processes send next.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ctzoo.perf.detectors import AnomalyDetector, KeyState
from ctzoo.perf.events import KEY_FIELDS

log = logging.getLogger("ctzoo.perf")

TOKEN_ENV = "CTZOO_PERF_TOKEN"
DEFAULT_PORT = 8765
#: A delta holds a few hundred histogram bins per key; 16 MiB is thousands of keys.
MAX_BODY_BYTES = 16 * 1024 * 1024


class BadRequest(ValueError):
    """A request the server refuses with 400 (the message says why)."""


def _number(value: Any, what: str, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{what}: not a finite number")
    return float(value)


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"{what}: not a count")
    return value


def parse_state(name: str, data: Any) -> KeyState:
    """A key state as a client sent it, checked so that a bad one cannot poison the global state (BadRequest)."""
    if len(name.split("|")) != len(KEY_FIELDS):
        raise BadRequest(f"key {name[:80]!r}: not model|version|stage|device|bucket")
    if not isinstance(data, dict) or not isinstance(data.get("moments"), dict) or not isinstance(
            data.get("histogram"), dict):
        raise BadRequest(f"{name}: a state is {{'moments': {{...}}, 'histogram': {{...}}}}")
    moments = data["moments"]
    if set(moments) != {"count", "mean", "m2", "m3", "m4", "min", "max"}:
        raise BadRequest(f"{name}: moments are count, mean, m2, m3, m4, min, max")
    checked = {"count": _count(moments["count"], f"{name} count")}
    for field in ("mean", "m2", "m3", "m4"):
        checked[field] = _number(moments[field], f"{name} {field}")
    for field in ("min", "max"):
        checked[field] = _number(moments[field], f"{name} {field}", allow_none=True)
    try:
        bins = {str(int(index)): _count(count, f"{name} bin {index}") for index, count in data["histogram"].items()}
    except ValueError as exc:
        raise BadRequest(f"{name}: histogram bins are integers") from exc
    state = KeyState.from_dict({"moments": checked, "histogram": bins})
    problem = state.problem()  # well-formed, but could no stream of durations give it?
    if problem:
        raise BadRequest(f"{name}: {problem}")
    return state


class GlobalStatistics:
    """The merged per-key states and what each process contributed; thread-safe."""

    def __init__(self) -> None:
        self.server_id = secrets.token_hex(8)
        self.states: dict[str, KeyState] = {}
        self.processes: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def sync(self, payload: Any) -> dict[str, Any]:
        """Merge one client's delta (unless its ``seq`` was merged before) and return the global states."""
        if not isinstance(payload, dict):
            raise BadRequest("the body is a JSON object")
        process = payload.get("process")
        if not isinstance(process, str) or not 0 < len(process) <= 300:
            raise BadRequest("process: a name of 1-300 characters")
        role, rank = payload.get("role", ""), payload.get("rank")
        if not isinstance(role, str) or len(role) > 100 or not (rank is None or isinstance(rank, int)):
            raise BadRequest("role is a string, rank an integer or null")
        seq = _count(payload.get("seq"), "seq")
        delta, counts = payload.get("delta", {}), payload.get("counts", {})
        if not isinstance(delta, dict) or not isinstance(counts, dict):
            raise BadRequest("delta and counts are JSON objects")
        parsed = {name: parse_state(name, data) for name, data in delta.items()}
        totals = {}
        for name, pair in counts.items():
            if len(name.split("|")) != len(KEY_FIELDS) or not isinstance(pair, list) or len(pair) != 2:
                raise BadRequest(f"counts[{name[:80]!r}]: [events, anomalies] of a key")
            totals[name] = (_count(pair[0], f"{name} events"), _count(pair[1], f"{name} anomalies"))
        with self._lock:
            entry = self.processes.setdefault(process, {"role": role, "rank": rank, "seq": -1, "syncs": 0,
                                                        "keys": {}})
            contributed = entry["keys"]
            if seq > entry["seq"]:  # a delta sent again after a lost answer is merged once
                for name, state in parsed.items():
                    self.states[name] = self.states[name].merge(state) if name in self.states else state
                    mine = contributed.setdefault(name, {"learned": 0, "events": 0, "anomalies": 0})
                    mine["learned"] += state.moments.count
                entry["seq"] = seq
            for name, (events, anomalies) in totals.items():
                mine = contributed.setdefault(name, {"learned": 0, "events": 0, "anomalies": 0})
                mine["events"], mine["anomalies"] = events, anomalies
            entry.update(role=role, rank=rank, syncs=entry["syncs"] + 1, last_seen=time.time())
            return {"server_id": self.server_id, "states": self._state_dict()}

    def _state_dict(self) -> dict[str, dict]:
        return {name: state.to_dict() for name, state in self.states.items()}

    def state_dict(self) -> dict[str, dict]:
        with self._lock:
            return self._state_dict()

    def stats(self) -> dict[str, Any]:
        """Per key (merged) and per process (contributions): see the module docstring."""
        with self._lock:
            keys = []
            # also the keys with events but nothing learned yet (a process skips each key's first event)
            names = set(self.states).union(*(p["keys"] for p in self.processes.values()))
            for name in sorted(names):
                mine = [p["keys"][name] for p in self.processes.values() if name in p["keys"]]
                state = self.states.get(name, KeyState())
                keys.append({**dict(zip(KEY_FIELDS, name.split("|"))), "key": name, **state.moments.summary(),
                             "events": sum(c["events"] for c in mine), "anomalies": sum(c["anomalies"] for c in mine),
                             "processes": len(mine)})
            processes = [{"process": process, "role": p["role"], "rank": p["rank"], "syncs": p["syncs"],
                          "last_seen": p.get("last_seen"), "keys": json.loads(json.dumps(p["keys"]))}
                         for process, p in sorted(self.processes.items())]
        return {"server_id": self.server_id, "keys": keys, "processes": processes}


class _Handler(BaseHTTPRequestHandler):
    server: ParameterServer
    timeout = 30  # seconds a client may take to send its request: a stalled one does not hold a thread forever

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        log.debug("perf server: %s %s", self.address_string(), format % args)

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status >= 400:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        given = self.headers.get("Authorization", "").encode()
        if hmac.compare_digest(given, self.server.expected_header):
            return True
        self._answer(HTTPStatus.UNAUTHORIZED, {"error": "a valid 'Authorization: Bearer <token>' is needed"})
        return False

    def do_GET(self) -> None:
        if not self._authorised():
            return
        if self.path == "/v1/stats":
            return self._answer(HTTPStatus.OK, self.server.statistics.stats())
        if self.path == "/v1/states":
            return self._answer(HTTPStatus.OK, {"states": self.server.statistics.state_dict()})
        self._answer(HTTPStatus.NOT_FOUND, {"error": "routes: POST /v1/sync, GET /v1/stats, GET /v1/states"})

    def do_POST(self) -> None:
        if not self._authorised():
            return
        if self.path != "/v1/sync":
            return self._answer(HTTPStatus.NOT_FOUND, {"error": "routes: POST /v1/sync, GET /v1/stats"})
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._answer(HTTPStatus.LENGTH_REQUIRED, {"error": "a Content-Length is needed"})
        if length > self.server.max_body_bytes:  # refused before reading a byte of it
            return self._answer(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                {"error": f"bodies are at most {self.server.max_body_bytes} bytes"})
        if length < 0:
            return self._answer(HTTPStatus.BAD_REQUEST, {"error": "negative Content-Length"})
        try:
            payload = json.loads(self.rfile.read(length))
            reply = self.server.statistics.sync(payload)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and BadRequest are ValueErrors
            return self._answer(HTTPStatus.BAD_REQUEST, {"error": str(exc)[:500]})
        self._answer(HTTPStatus.OK, reply)


class ParameterServer(ThreadingHTTPServer):
    """The HTTP server around one :class:`GlobalStatistics`. ``port`` 0 picks a free port (see :attr:`url`);
    :meth:`serve_forever` in the caller's thread, or :meth:`start` in a daemon thread; :meth:`close` stops it."""

    daemon_threads = True

    def __init__(self, token: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 max_body_bytes: int = MAX_BODY_BYTES) -> None:
        if not token:
            raise ValueError(f"the parameter server needs a token (${TOKEN_ENV} or a token file)")
        self.expected_header = f"Bearer {token}".encode()
        self.max_body_bytes = max_body_bytes
        self.statistics = GlobalStatistics()
        self._thread: threading.Thread | None = None
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def start(self) -> ParameterServer:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="ctzoo-perf-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
        self.server_close()


class ParameterServerClient:
    """Syncs one process's detector with a parameter server: every ``sync_every_s`` from a daemon thread, and at
    :meth:`close`. ``lock`` guards ``detector`` (the monitor's lock); ``identity`` is ``process``, ``role``,
    ``rank``; ``counts()`` gives the process's running ``{key: [events, anomalies]}``. ``background=False``: no
    thread, the caller calls :meth:`sync`.

    When the server cannot be reached, one warning says so and :attr:`connected` turns False; the detector keeps
    its own statistics (everything it learned stays in them) and the unsent delta is sent again at the next try.
    """

    def __init__(self, url: str, token: str | None, detector: AnomalyDetector, lock: threading.Lock,
                 identity: dict[str, Any], counts: Callable[[], dict[str, list[int]]], sync_every_s: float = 2.0,
                 timeout_s: float = 5.0, background: bool = True) -> None:
        self.url, self.detector, self.lock, self.identity = url.rstrip("/"), detector, lock, identity
        self.token = token or os.environ.get(TOKEN_ENV, "")
        self.counts, self.sync_every_s, self.timeout_s = counts, sync_every_s, timeout_s
        self.connected: bool | None = None  # None until the first sync was tried
        self.last_error: str | None = None
        self.syncs = 0
        self.server_id: str | None = None
        self._seq = 0
        self._pending: dict[str, dict] | None = None  # a delta taken but not yet acknowledged by the server
        self._refused: set[str] = set()  # keys whose global state was impossible at the last sync (warned once)
        self._sync_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ctzoo-perf-sync", daemon=True) if background else None
        if self._thread is not None:
            self._thread.start()

    def _run(self) -> None:
        self.sync()  # at once: a process that starts late judges on the global statistics from its first events
        while not self._stop.wait(self.sync_every_s):
            self.sync()

    def sync(self, timeout_s: float | None = None) -> bool:
        """Send the delta, adopt the global states; False (and the local statistics kept) when that failed."""
        with self._sync_lock:
            if self._pending is None:
                with self.lock:
                    self._pending = self.detector.take_delta()
                self._seq += 1
            body = {**self.identity, "seq": self._seq, "delta": self._pending, "counts": self.counts()}
            try:
                reply = self._post("/v1/sync", body, timeout_s or self.timeout_s)
                states = reply["states"]
            except urllib.error.HTTPError as exc:
                if exc.code in (HTTPStatus.BAD_REQUEST, HTTPStatus.REQUEST_ENTITY_TOO_LARGE):
                    self._drop_refused_delta(exc)  # sent again it would be refused again, for ever
                else:
                    self._unreachable(exc)
                return False
            except (OSError, ValueError, KeyError, TypeError) as exc:  # URLError, timeouts are OSErrors
                self._unreachable(exc)
                return False
            self._pending = None
            with self.lock:
                refused = self.detector.adopt_global(states)
            self._warn_refused(refused)
            self.syncs += 1
            self.server_id = reply.get("server_id")
            if self.connected is False:
                log.warning("perf: parameter server %s reachable again; judging on the global statistics", self.url)
            self.connected, self.last_error = True, None
            return True

    def _drop_refused_delta(self, exc: urllib.error.HTTPError) -> None:
        """The server refused the delta itself (400/413): drop it, so that the next sync sends what was learned
        since. Its events stay in this process's statistics; the global ones never get them (the warning says)."""
        try:
            reason = json.loads(exc.read()).get("error", "")
        except (OSError, ValueError, AttributeError):
            reason = ""
        self._pending = None
        self.last_error = f"HTTP {exc.code}: {reason or exc.reason}"[:600]
        log.warning("perf: parameter server %s refused this process's statistics (%s); they stay in its own "
                    "statistics and are not sent again", self.url, self.last_error)

    def _warn_refused(self, refused: dict[str, str]) -> None:
        """One warning per key whose global state the detector would not judge with (at every sync: noise)."""
        for name in refused.keys() - self._refused:
            log.warning("perf: parameter server %s sent an impossible state of %s (%s); judging that key on this "
                        "process's statistics", self.url, name[:200], refused[name])
        self._refused = set(refused)

    def _post(self, path: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())

    def _unreachable(self, exc: BaseException) -> None:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) and not isinstance(
            exc, urllib.error.HTTPError) else exc
        self.last_error = f"{type(exc).__name__}: {reason}"
        if self.connected is not False:  # once per outage, not at every retry
            log.warning("perf: parameter server %s unreachable (%s); judging on this process's statistics",
                        self.url, self.last_error)
        self.connected = False

    def status(self) -> dict[str, Any]:
        return {"url": self.url, "connected": self.connected, "syncs": self.syncs, "last_error": self.last_error}

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread and sync a last time (a short timeout: an unreachable server must not hold up exit)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sync(timeout_s)


def fetch_stats(url: str, token: str | None = None, timeout_s: float = 10.0) -> dict[str, Any]:
    """``GET /v1/stats`` of the server at ``url`` (token: ``$CTZOO_PERF_TOKEN`` when not given)."""
    request = urllib.request.Request(url.rstrip("/") + "/v1/stats", headers={
        "Authorization": f"Bearer {token or os.environ.get(TOKEN_ENV, '')}"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())
