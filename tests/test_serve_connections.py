"""``ctzoo serve``'s connections against clients that never finish their headers (:mod:`ctzoo.serve.connections`),
on a real uvicorn run with the options ``ctzoo serve`` runs it with (``test_serve.serving``).

A socket that sent nothing was still open after 90 s, one trickling a header line every 3 s after 120 s; a few
hundred of them used up the process's file descriptors, and asyncio logged each failed accept with its traceback.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time

import httpx
import pytest
import test_serve
from test_serve import TOKEN, serving

from ctzoo.serve.app import create_app
from ctzoo.serve.connections import limit_accept_errors

repo = test_serve.repo  # the exported repository (a module fixture: exported once for this module too)
HEADER_TIMEOUT_S = 1.0
LIVE = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n"


@pytest.fixture(scope="module")
def app(repo):
    return create_app(repo, [TOKEN], device="cpu", threads=1)


def _closed(conn: socket.socket) -> bool:
    """Whether the server has closed ``conn`` (what it sent before is read and dropped)."""
    try:
        while data := conn.recv(65536):
            del data
        return True  # b"": closed by the server
    except BlockingIOError:
        return False
    except (ConnectionResetError, BrokenPipeError):
        return True


def _keep_alive_then_stall(port: int) -> socket.socket:
    """A connection whose first request is answered, then the first line of a second one."""
    conn = socket.create_connection(("127.0.0.1", port))
    conn.sendall(LIVE + b"\r\n")
    assert b" 200 " in conn.recv(65536).split(b"\r\n")[0]
    conn.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
    return conn


def test_connections_that_never_finish_their_headers_are_closed_after_the_header_timeout(app):
    with serving(app, header_timeout_s=HEADER_TIMEOUT_S) as port:
        silent = socket.create_connection(("127.0.0.1", port))
        trickling = socket.create_connection(("127.0.0.1", port))
        trickling.sendall(LIVE)
        kept_alive = _keep_alive_then_stall(port)
        started = time.monotonic()
        open_ = {"silent": silent, "trickling": trickling, "kept alive, then stalled": kept_alive}
        for conn in open_.values():
            conn.setblocking(False)
        closed_after = {}
        while open_ and time.monotonic() - started < HEADER_TIMEOUT_S + 10:
            for name, conn in list(open_.items()):
                try:
                    if name != "silent":  # a header line now and then (any byte stopped uvicorn's keep-alive timer)
                        conn.send(b"X-Slow: 1\r\n")
                except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                    pass
                if _closed(conn):
                    closed_after[name] = time.monotonic() - started
                    del open_[name]
                    conn.close()
            time.sleep(0.2)
        assert not open_, f"still open after {HEADER_TIMEOUT_S + 10} s: {sorted(open_)}"
        assert all(HEADER_TIMEOUT_S * 0.7 < seconds < HEADER_TIMEOUT_S + 5 for seconds in closed_after.values()), \
            closed_after
        assert httpx.get(f"http://127.0.0.1:{port}/v2/health/live").status_code == 200  # a whole request is served


def test_beyond_max_connections_a_request_gets_503_at_once(app):
    with serving(app, header_timeout_s=30, max_connections=3) as port:
        url = f"http://127.0.0.1:{port}/v2/health/live"
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        time.sleep(0.3)
        started = time.monotonic()
        assert httpx.get(url, timeout=10).status_code == 503
        assert time.monotonic() - started < 5
        for conn in idle:
            conn.close()
        deadline = time.monotonic() + 10
        while httpx.get(url, timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "still 503 once the idle connections closed"
            time.sleep(0.1)


def test_accept_errors_are_logged_once_a_minute_on_one_line(caplog):
    """asyncio's own handler reports every failed accept (EMFILE) with its traceback; one line a minute remains,
    saying how many were left out. Other asyncio errors pass as they are."""
    now = [1000.0]
    limiter = limit_accept_errors(window_s=60)
    limiter.clock = lambda: now[0]
    loop = asyncio.new_event_loop()
    listening = socket.socket()
    try:
        caplog.set_level(logging.ERROR, logger="asyncio")
        context = {"message": "socket.accept() out of system resource",
                   "exception": OSError(errno.EMFILE, "Too many open files"), "socket": listening}
        for _ in range(100):
            loop.call_exception_handler(context)
        now[0] += 61
        loop.call_exception_handler(context)
        loop.call_exception_handler({"message": "something else", "exception": ValueError("x")})
    finally:
        loop.close()
        listening.close()
        logging.getLogger("asyncio").removeFilter(limiter)
    records = [r for r in caplog.records if r.name == "asyncio"]
    assert [r.getMessage().split(":")[0] for r in records] == ["socket.accept() out of system resource (Too many "
                                                              "open files)"] * 2 + ["something else"]
    assert records[0].exc_info is None and "\n" not in records[0].getMessage()
    assert "99 more in the last 60 s not logged" in records[1].getMessage()
    assert "--max-connections" in records[1].getMessage()
    assert records[2].exc_info is not None  # untouched
