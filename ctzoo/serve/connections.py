"""How ``ctzoo serve`` holds its HTTP connections: every connection must finish its request headers in time, the
requests worked on at once are bounded, and the event loop's accept errors are logged once a minute.

Without these, a client that opens connections and never finishes its headers (sends nothing, or a header line
every few seconds) held each one forever: uvicorn's ``timeout_keep_alive`` only closes a connection idle after a
response, and any byte received cancels it. A few hundred such sockets used up the process's file descriptors, the
health probes could no longer connect, and asyncio logged every failed ``accept()`` with its traceback (76 MB of log
in 40 s).

* **Header deadline** (``header_timeout_s``): a connection is closed when its request line and headers have not
  all arrived ``header_timeout_s`` after it opened, or after its previous response (keep-alive). The body is not
  covered: the request deadline (``--request-timeout-s``) bounds it.
* **Concurrency** (``max_connections``, uvicorn's ``limit_concurrency``): beyond that many open connections or
  requests being worked on, a request is answered 503 at once.
* **Accept errors** (:class:`AcceptErrorsOncePerWindow`): asyncio's ``socket.accept() out of system resource``
  (EMFILE: too many open files) goes to the log once per ``window_s``, on one line with the number left out.
"""

from __future__ import annotations

import asyncio
import logging
import time

# the h11 that uvicorn's protocol is built on (h11 comes with uvicorn, not as a dependency of ours)
from uvicorn.protocols.http.h11_impl import H11Protocol, h11

#: Seconds a connection has to send its request line and headers.
HEADER_TIMEOUT_S = 10.0
#: Open connections or requests in progress beyond which a request is answered 503 (uvicorn's limit_concurrency);
#: well under the usual 1024 open files a process may have.
MAX_CONNECTIONS = 512
#: Seconds an idle keep-alive connection stays open after a response.
KEEP_ALIVE_S = 5


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers do not all arrive within
    ``header_timeout_s`` of it opening or of its previous response."""

    header_timeout_s = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._await_headers()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the request line and headers are in (or the connection is done)
            self._headers_in()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # waiting for the next request
            self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_in()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        self._headers_in()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_late)

    def _headers_in(self) -> None:
        if getattr(self, "_header_deadline", None) is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_late(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def header_deadline_protocol(header_timeout_s: float) -> type[HeaderDeadlineProtocol]:
    """:class:`HeaderDeadlineProtocol` with a deadline of ``header_timeout_s`` (uvicorn's ``http=``)."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout_s": float(header_timeout_s)})


def uvicorn_connection_options(header_timeout_s: float = HEADER_TIMEOUT_S,
                               max_connections: int = MAX_CONNECTIONS) -> dict:
    """The keyword arguments of ``uvicorn.run``/``uvicorn.Config`` that bound connections (module docstring)."""
    return {"http": header_deadline_protocol(header_timeout_s), "limit_concurrency": max_connections,
            "timeout_keep_alive": KEEP_ALIVE_S}


class AcceptErrorsOncePerWindow(logging.Filter):
    """A filter for the ``asyncio`` logger: of its ``socket.accept() out of system resource`` records, the first
    of each ``window_s`` passes, as one line without the traceback and with how many were left out before it;
    every other record passes unchanged."""

    MESSAGE = "socket.accept() out of system resource"

    def __init__(self, window_s: float = 60.0, clock=time.monotonic) -> None:
        super().__init__()
        self.window_s, self.clock = window_s, clock
        self.last: float | None = None
        self.left_out = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.MESSAGE):
            return True
        now = self.clock()
        if self.last is not None and now - self.last < self.window_s:
            self.left_out += 1
            return False
        error = record.exc_info[1] if record.exc_info else None
        reason = (getattr(error, "strerror", None) or type(error).__name__) if error is not None else "unknown"
        earlier = f"; {self.left_out} more in the last {self.window_s:g} s not logged" if self.last is not None else ""
        record.msg, record.args = (f"{self.MESSAGE} ({reason}): new connections wait{earlier}; raise the open-files "
                                   "limit (ulimit -n) or lower --max-connections"), ()
        record.exc_info = record.exc_text = None
        self.last, self.left_out = now, 0
        return True


def limit_accept_errors(window_s: float = 60.0) -> AcceptErrorsOncePerWindow:
    """Install :class:`AcceptErrorsOncePerWindow` on the ``asyncio`` logger (replacing one installed before)."""
    log = logging.getLogger("asyncio")
    for old in [f for f in log.filters if isinstance(f, AcceptErrorsOncePerWindow)]:
        log.removeFilter(old)
    limiter = AcceptErrorsOncePerWindow(window_s)
    log.addFilter(limiter)
    return limiter
