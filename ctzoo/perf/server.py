"""The parameter server that merges the statistics of many detector processes, and its client (Chimbuko's PS).

Serve workers, Ray drivers, DDP ranks and PACS workers each judge their events in situ; to judge against the same
statistics, each sends the server what it learned since its last sync (its *delta*: per-key moments and
histograms, :meth:`~ctzoo.perf.detectors.AnomalyDetector.take_delta`) and adopts the merged global states the
server answers with (:meth:`~ctzoo.perf.detectors.AnomalyDetector.adopt_global`). Merges are exact, so the global
state is what one detector fed every process's events would hold. A process that cannot reach the server goes on
judging on its own statistics, says so once, and catches up when the server is back.

Protocol (JSON over HTTP, ``Authorization: Bearer <token>`` on every route; stdlib only, as ctzoo.perf is layer 1):

``POST /v1/sync``
    ``{"process", "nonce", "role", "rank", "seq", "server_id", "delta": {key: state}, "counts": {key: [events,
    anomalies]}, "keys": [key]}``: ``seq`` numbers a process's deltas; a delta whose ``seq`` the server has merged
    already (its answer was lost, the client sent it again) is not merged twice. ``nonce`` is random per process
    incarnation: a restarted process that reuses its name (``role@host:pid``: PID 1 in a container) starts its
    ``seq`` again, and a new nonce tells the server so. ``server_id`` is the server the client last synced with
    (null at first): when it is not this one (the server restarted and lost its memory), the server answers 409
    with its ``server_id`` and merges nothing, and the client sends its whole own history as its next delta, so
    the restarted server is reseeded. ``counts`` are the process's running totals per key (events seen,
    anomalies found); ``keys`` every key the process knows. Answer: ``{"server_id", "states": {key: state}}``, the
    global states of the keys this process has named (in ``keys``, its deltas or its counts), not every key.
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
keeps everything in memory; after a restart it is reseeded by the processes' next syncs (see ``server_id``).
A key no process has named for ``expire_after_s`` (:data:`EXPIRE_AFTER_S`, 7 days), and a process not seen for
as long, are forgotten, so the server's memory follows the keys in use, not every key ever seen.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import secrets
import sys
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
#: Keys no process has named, and processes not seen, for this long (seconds) are forgotten by the server.
EXPIRE_AFTER_S = 7 * 24 * 3600.0
#: How often (seconds) the server looks for what to forget.
EXPIRE_CHECK_S = 60.0
#: How long (seconds) a client may take to send a request before its connection is closed.
CLIENT_TIMEOUT_S = 30.0


class BadRequest(ValueError):
    """A request the server refuses with 400 (the message says why)."""


class StaleServer(Exception):
    """A client last synced with another server (this one restarted): answered 409 with this ``server_id``."""

    def __init__(self, server_id: str) -> None:
        super().__init__(server_id)
        self.server_id = server_id


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

    def __init__(self, expire_after_s: float = EXPIRE_AFTER_S) -> None:
        self.server_id = secrets.token_hex(8)
        self.expire_after_s = expire_after_s
        self.states: dict[str, KeyState] = {}
        self.key_seen: dict[str, float] = {}  # when a process last named each key (see expire)
        self.processes: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._expired_at = time.monotonic()

    def sync(self, payload: Any) -> dict[str, Any]:
        """Merge one client's delta (unless its ``seq`` was merged before) and return the global states of the
        keys that client named; :class:`StaleServer` when it last synced with another server (see the module
        docstring)."""
        if not isinstance(payload, dict):
            raise BadRequest("the body is a JSON object")
        process = payload.get("process")
        if not isinstance(process, str) or not 0 < len(process) <= 300:
            raise BadRequest("process: a name of 1-300 characters")
        role, rank = payload.get("role", ""), payload.get("rank")
        if not isinstance(role, str) or len(role) > 100 or not (rank is None or isinstance(rank, int)):
            raise BadRequest("role is a string, rank an integer or null")
        seq = _count(payload.get("seq"), "seq")
        nonce, known_server = payload.get("nonce"), payload.get("server_id")
        if not all(value is None or isinstance(value, str) and len(value) <= 100 for value in (nonce, known_server)):
            raise BadRequest("nonce and server_id are strings of up to 100 characters, or null")
        if known_server is not None and known_server != self.server_id:  # nothing merged: the client reseeds
            raise StaleServer(self.server_id)
        delta, counts, keys = payload.get("delta", {}), payload.get("counts", {}), payload.get("keys", [])
        if not isinstance(delta, dict) or not isinstance(counts, dict):
            raise BadRequest("delta and counts are JSON objects")
        if not isinstance(keys, list) or not all(isinstance(name, str) for name in keys):
            raise BadRequest("keys is a list of key names")
        parsed = {name: parse_state(name, data) for name, data in delta.items()}
        totals = {}
        for name, pair in counts.items():
            if len(name.split("|")) != len(KEY_FIELDS) or not isinstance(pair, list) or len(pair) != 2:
                raise BadRequest(f"counts[{name[:80]!r}]: [events, anomalies] of a key")
            totals[name] = (_count(pair[0], f"{name} events"), _count(pair[1], f"{name} anomalies"))
        named = set(keys).union(delta, totals)
        now = time.time()
        with self._lock:
            entry = self.processes.setdefault(process, {"role": role, "rank": rank, "seq": -1, "syncs": 0,
                                                        "keys": {}, "nonce": nonce})
            if entry.get("nonce") != nonce:  # a new incarnation under the same name: its seq starts again
                entry.update(seq=-1, nonce=nonce)
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
            entry.update(role=role, rank=rank, syncs=entry["syncs"] + 1, last_seen=now)
            entry.setdefault("named", set()).update(named)
            self.key_seen.update(dict.fromkeys(entry["named"], now))
            self._expire(now)
            return {"server_id": self.server_id, "states": self._state_dict(entry["named"])}

    def _expire(self, now: float) -> None:
        """Forget the keys no process named and the processes not seen for ``expire_after_s`` (under the lock;
        looked for at most every :data:`EXPIRE_CHECK_S`)."""
        if time.monotonic() - self._expired_at < min(EXPIRE_CHECK_S, self.expire_after_s):
            return
        self._expired_at = time.monotonic()
        oldest = now - self.expire_after_s
        for process in [p for p, entry in self.processes.items() if entry.get("last_seen", now) < oldest]:
            del self.processes[process]
        for name in [n for n, seen in self.key_seen.items() if seen < oldest]:
            del self.key_seen[name]
            self.states.pop(name, None)
            for entry in self.processes.values():
                entry["keys"].pop(name, None)
                entry.get("named", set()).discard(name)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("perf server: %d keys, %d processes after expiry", len(self.states), len(self.processes))

    def _state_dict(self, names: set[str] | None = None) -> dict[str, dict]:
        if names is None:
            return {name: state.to_dict() for name, state in self.states.items()}
        return {name: self.states[name].to_dict() for name in names if name in self.states}

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

    def setup(self) -> None:
        # seconds a client may take to send its request: a stalled one does not hold a thread forever
        self.timeout = self.server.client_timeout_s
        super().setup()

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
        try:
            self.end_headers()
            self.wfile.write(data)
        except OSError as exc:  # the client went away before its answer (BrokenPipeError, ConnectionResetError)
            self.close_connection = True
            log.warning("perf server: %s went away before its answer (%s)", self.address_string(), type(exc).__name__)

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
            body = self.rfile.read(length)
            problem = None if len(body) == length else f"a truncated body ({len(body)} of {length} bytes)"
        except OSError as exc:  # TimeoutError: stalled past client_timeout_s; ConnectionResetError
            problem = f"no whole body ({type(exc).__name__})"
        if problem is not None:  # the client died or stalled while sending: no answer, it would not be read
            self.close_connection = True
            log.warning("perf server: %s sent %s; connection closed", self.address_string(), problem)
            return None
        try:
            payload = json.loads(body)
            reply = self.server.statistics.sync(payload)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and BadRequest are ValueErrors
            return self._answer(HTTPStatus.BAD_REQUEST, {"error": str(exc)[:500]})
        except StaleServer as exc:
            return self._answer(HTTPStatus.CONFLICT, {"error": "this server restarted: send the whole own state",
                                                      "server_id": exc.server_id})
        self._answer(HTTPStatus.OK, reply)


class ParameterServer(ThreadingHTTPServer):
    """The HTTP server around one :class:`GlobalStatistics`. ``port`` 0 picks a free port (see :attr:`url`);
    :meth:`serve_forever` in the caller's thread, or :meth:`start` in a daemon thread; :meth:`close` stops it."""

    daemon_threads = True

    def __init__(self, token: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 max_body_bytes: int = MAX_BODY_BYTES, expire_after_s: float = EXPIRE_AFTER_S,
                 client_timeout_s: float = CLIENT_TIMEOUT_S) -> None:
        if not token:
            raise ValueError(f"the parameter server needs a token (${TOKEN_ENV} or a token file)")
        self.expected_header = f"Bearer {token}".encode()
        self.max_body_bytes, self.client_timeout_s = max_body_bytes, client_timeout_s
        self.statistics = GlobalStatistics(expire_after_s)
        self._thread: threading.Thread | None = None
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One log line where socketserver would print a traceback on stderr (with DEBUG logging, both)."""
        error = sys.exc_info()[1]
        log.warning("perf server: a request from %s failed (%s: %s)", client_address[0], type(error).__name__, error,
                    exc_info=log.isEnabledFor(logging.DEBUG))

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
    When the server answers that it is not the one this client last synced with (it restarted), the client sends
    its whole own history (:meth:`~ctzoo.perf.detectors.AnomalyDetector.own_state_dict`) at once, so that the
    global statistics it adopts still hold its events. The global states are parsed and checked outside ``lock``
    and swapped in under it, so :meth:`PerfMonitor.record` does not wait for a sync.
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
        self._nonce = secrets.token_hex(8)  # this incarnation, apart from an earlier process of the same name
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
            reply = self._exchange(timeout_s or self.timeout_s)
            if reply is StaleServer:  # the server restarted: reseed it with this process's whole history, once
                log.warning("perf: parameter server %s restarted; sending it this process's statistics again",
                            self.url)
                with self.lock:
                    self.detector.take_delta()  # moves what was learned since into the own state
                    self._pending = self.detector.own_state_dict()
                    keys = self.detector.known_keys()
                self._seq, self.server_id = self._seq + 1, None
                reply = self._exchange(timeout_s or self.timeout_s, keys)
            if not isinstance(reply, dict):
                return False
            self._pending = None
            prepared, refused = self.detector.prepare_global(reply["states"])  # the slow part, outside the lock
            with self.lock:
                self.detector.adopt_prepared(prepared)
            self._warn_refused(refused)
            self.syncs += 1
            self.server_id = reply.get("server_id")
            if self.connected is False:
                log.warning("perf: parameter server %s reachable again; judging on the global statistics", self.url)
            self.connected, self.last_error = True, None
            return True

    def _exchange(self, timeout_s: float, keys: list[str] | None = None) -> dict[str, Any] | type | None:
        """Post the pending delta (taking a new one first when none is pending): the server's answer, or
        :class:`StaleServer` when the server is not the one last synced with, or None when that failed."""
        if self._pending is None:
            with self.lock:
                self._pending = self.detector.take_delta()
                keys = self.detector.known_keys()
            self._seq += 1
        if keys is None:
            with self.lock:
                keys = self.detector.known_keys()
        body = {**self.identity, "nonce": self._nonce, "seq": self._seq, "server_id": self.server_id,
                "delta": self._pending, "counts": self.counts(), "keys": keys}
        try:
            reply = self._post("/v1/sync", body, timeout_s)
            if not isinstance(reply.get("states"), dict):
                raise ValueError("the answer has no states")
            return reply
        except urllib.error.HTTPError as exc:
            if exc.code == HTTPStatus.CONFLICT and self.server_id is not None:
                return StaleServer
            if exc.code in (HTTPStatus.BAD_REQUEST, HTTPStatus.REQUEST_ENTITY_TOO_LARGE):
                self._drop_refused_delta(exc)  # sent again it would be refused again, for ever
            else:
                self._unreachable(exc)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:  # URLError, timeouts: OSErrors
            self._unreachable(exc)
        return None

    def _drop_refused_delta(self, exc: urllib.error.HTTPError) -> None:
        """The server refused the delta itself (400/413): drop it, so that the next sync sends what was learned
        since. Its events stay in this process's own state (the store's key states) but the global statistics,
        which this process judges with from its next sync on, never get them (the warning says)."""
        try:
            reason = json.loads(exc.read()).get("error", "")
        except (OSError, ValueError, AttributeError):
            reason = ""
        self._pending = None
        self.last_error = f"HTTP {exc.code}: {reason or exc.reason}"[:600]
        log.warning("perf: parameter server %s refused this process's statistics (%s); they are not sent again "
                    "and the global statistics will not hold them", self.url, self.last_error)

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
        """Stop the thread and sync a last time, all within about ``timeout_s`` (an unreachable or hung server
        must not hold up exit): a sync still running in the thread uses up that time, and the last one is
        skipped when none is left."""
        deadline = time.monotonic() + timeout_s
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        left = deadline - time.monotonic()
        if left < 0.1 or not self._sync_lock.acquire(timeout=left):
            log.warning("perf: no time left for the last sync with parameter server %s", self.url)
            return
        self._sync_lock.release()
        self.sync(max(0.1, deadline - time.monotonic()))


def fetch_stats(url: str, token: str | None = None, timeout_s: float = 10.0) -> dict[str, Any]:
    """``GET /v1/stats`` of the server at ``url`` (token: ``$CTZOO_PERF_TOKEN`` when not given)."""
    request = urllib.request.Request(url.rstrip("/") + "/v1/stats", headers={
        "Authorization": f"Bearer {token or os.environ.get(TOKEN_ENV, '')}"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())
