"""What ctzoo changes of MPyC's connections between the parties (:mod:`ctzoo.smap.party` runs the protocol over
them): the start with a timeout and clear failures (:func:`connect`), mutual TLS authentication that names the party
(:func:`authenticate_peers`), a lost peer ending the run at once (:func:`watch_connections`) and a silent one after
a timeout (:func:`watch_progress`), listening on the party's own address only (:func:`listen_on_own_address`) and an
end without pickles (:func:`close_connections`).

**No pickles from peers.** MPyC's ``shutdown`` synchronises the parties with ``transfer``, which unpickles what each
peer sends: any party could run code on every other party. So a party never calls it: :func:`close_connections`
ends the run with a barrier of field elements and closes the connections itself, and, in case some path of MPyC
still reached ``transfer``, :func:`refuse_pickles` makes the runtime module's ``pickle.loads`` accept plain integers
only (what MPyC's own barrier sends) and refuse everything else before any object is built.

Each function changes the one MPyC runtime of its process (``mpc``); MPyC is imported only where needed, since it
parses the command line when first imported (:func:`ctzoo.smap.party.run_party`).
"""

from __future__ import annotations

import asyncio
import io
import os
import pickle
import sys
import types
from typing import Any

#: The exit status of a party whose peer dropped out mid-run.
EXIT_DROPPED = 3


class PartyDropped(RuntimeError):
    """Another party did not connect in time."""


class AuthenticationFailed(RuntimeError):
    """A TLS handshake with a peer failed, or a peer's certificate names another party than it claims."""


class CannotListen(RuntimeError):
    """This party cannot listen on its own address (the port is taken, or the host is not this machine's)."""


async def connect(mpc: Any, connect_timeout: float) -> None:
    """Connect to every peer (:meth:`mpc.start`), or raise :class:`AuthenticationFailed` at the first failed
    authentication (:func:`authenticate_peers`) or :class:`PartyDropped` after ``connect_timeout`` seconds."""
    start = asyncio.ensure_future(mpc.start())
    done, _ = await asyncio.wait({start, mpc._ctzoo_failure}, timeout=connect_timeout,
                                 return_when=asyncio.FIRST_COMPLETED)
    if start in done:
        try:
            start.result()
        except OSError as error:  # only from listening: MPyC retries its own connections to peers until they answer
            own = mpc.parties[mpc.pid]
            host = f"[{own.host}]" if ":" in own.host else own.host
            raise CannotListen(f"party {mpc.pid} cannot listen on {host}:{own.port}: {error.strerror or error} (is the "
                               "port in use, is the host this machine's address?); nothing was sent") from None
        mpc._ctzoo_started = True
        getattr(mpc, "_ctzoo_after_start", lambda: None)()
        return
    start.cancel()
    if mpc._ctzoo_failure in done:
        raise mpc._ctzoo_failure.result()
    missing = unconnected(mpc)
    # a party that stopped at start (a refused key) before this one reached it cannot say so: it is gone
    raise PartyDropped(f"parties {missing} did not connect within {connect_timeout:g} s: check that every "
                       "party runs with the same --party list and --keys from one ctzoo smap keys run (a party "
                       "that refused a key stops at once, with its own message); nothing was sent")


def unconnected(mpc: Any, besides: int | None = None) -> list[int]:
    """The other parties (but ``besides``) that this one has no connection with."""
    return [peer.pid for peer in mpc.parties
            if peer.pid not in (mpc.pid, besides) and peer.protocol is None]


def fail_start(mpc: Any, error: Exception) -> None:
    if not mpc._ctzoo_failure.done():
        mpc._ctzoo_failure.set_result(error)


def ignore_stranger(mpc: Any, reason: str) -> None:
    """A connection to this party's port that failed the TLS handshake: anyone may open one (a port scanner, a load
    balancer's health check, a client without a certificate), so it must not end the run; it is only noted."""
    sys.stderr.write(f"party {mpc.pid}: ignored a connection that failed the TLS handshake ({reason}): not a party "
                     "of this run; still listening\n")
    sys.stderr.flush()


def authenticate_peers(mpc: Any) -> None:
    """With TLS: end this party's start with a clear :class:`AuthenticationFailed` at the first failed handshake
    with a party it connects to (MPyC would retry forever), and refuse a peer with a certificate of this run's CA
    that names another party than the index it claims (MPyC checks the name only of servers). A failed handshake of
    a connection *to* this party is ignored (:func:`ignore_stranger`): the peer is unauthenticated, and a party
    with a key from another run fails as the client it is, while this one's ``--connect-timeout`` still ends a
    wait for a party that never authenticates."""
    import ssl

    from ctzoo.smap.keys import check_peer_certificate

    class ReportingSSLObject(ssl.SSLObject):
        def do_handshake(self):
            try:
                return super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except ssl.SSLError as error:
                if self.server_side:
                    ignore_stranger(mpc, str(error.reason or error))
                    raise
                fail_start(mpc, AuthenticationFailed(
                    f"party {mpc.pid}: a TLS handshake with a peer failed ({error.reason or error}): every party's "
                    "--keys must come from the same `ctzoo smap keys` run; nothing was sent"))
                raise

    create_default_context = ssl.create_default_context

    def create_reporting_context(*args, **kwargs):
        context = create_default_context(*args, **kwargs)
        context.sslobject_class = ReportingSSLObject
        return context

    ssl.create_default_context = create_reporting_context
    report_broken_handshakes(mpc)
    set_protocol = mpc.set_protocol

    def set_authenticated_protocol(peer_pid, protocol):
        try:
            check_peer_certificate(protocol.transport.get_extra_info("peercert"), peer_pid)
        except ValueError as error:
            protocol.transport.close()
            return fail_start(mpc, AuthenticationFailed(f"party {mpc.pid}: {error}; nothing was sent"))
        set_protocol(peer_pid, protocol)

    mpc.set_protocol = set_authenticated_protocol


def report_broken_handshakes(mpc: Any) -> None:
    """A party this one connects to that rejects its certificate (or fails and exits itself) closes the connection
    mid-handshake without an alert that reaches this party, and asyncio drops the half-made connection silently
    (MPyC's client would retry forever): report that as the failed authentication it is, rather than wait for the
    connect timeout. A connection to this party closed mid-handshake is a stranger's (:func:`ignore_stranger`).
    asyncio's private TLS protocol (Python >= 3.11) is the only place that sees it; without it, the timeout's
    message still says what to check."""
    from asyncio import sslproto

    handshaking = getattr(getattr(sslproto, "SSLProtocolState", None), "DO_HANDSHAKE", None)
    if handshaking is None:
        return

    def reporting(method):
        def report_then_call(protocol, *args):
            if getattr(protocol, "_state", None) == handshaking and getattr(protocol, "_server_side", False):
                ignore_stranger(mpc, "it closed the connection")
            elif getattr(protocol, "_state", None) == handshaking:
                fail_start(mpc, AuthenticationFailed(
                    f"party {mpc.pid}: a peer broke off the TLS handshake (it did not accept this party's "
                    "certificate, or failed itself): every party's --keys must come from the same `ctzoo smap keys` "
                    "run; nothing was sent"))
            return method(protocol, *args)
        return report_then_call

    sslproto.SSLProtocol.eof_received = reporting(sslproto.SSLProtocol.eof_received)
    sslproto.SSLProtocol.connection_lost = reporting(sslproto.SSLProtocol.connection_lost)


def watch_connections(mpc: Any) -> None:
    """Make a lost connection to a peer end this party's process at once, with a clear message and
    :data:`EXIT_DROPPED` (module docstring): the secret program cannot go on without the peer's shares, nothing has
    been opened, and only an exit stops MPyC's already scheduled work."""
    from mpyc import asyncoro

    def connection_lost(exchanger, exc):
        if getattr(mpc, "_ctzoo_ending", False) and not awaits_data(exchanger):
            return peer_closed(mpc, exchanger.peer_pid)  # the end: it sent everything this party waits for
        if exchanger.peer_pid is None:  # without TLS: a connection that closed before it said which party it is
            return None
        if not getattr(mpc, "_ctzoo_started", False):  # a peer that failed to start itself, e.g. to authenticate
            # or that gave up waiting for a third: name those still missing, the likely cause of both
            missing = unconnected(mpc, besides=exchanger.peer_pid)
            also = f"; parties {missing} had not connected either" if missing else ""
            return fail_start(mpc, PartyDropped(f"party {exchanger.peer_pid} left before every party had "
                                                f"connected (see its error){also}; nothing was sent"))
        # at the closing barrier this party's own coordinates were opened to it, but still nothing is written
        lost = "nothing written" if getattr(mpc, "_ctzoo_ending", False) else "nothing was opened and nothing written"
        sys.stderr.write(f"Error: party {exchanger.peer_pid} dropped out (its connection was lost): the run is "
                         f"aborted, {lost}; start every party again\n")
        sys.stderr.flush()
        os._exit(EXIT_DROPPED)

    asyncoro.MessageExchanger.connection_lost = connection_lost


def watch_progress(mpc: Any, peer_timeout: float) -> None:
    """Make a peer that sends nothing for ``peer_timeout`` seconds while this party waits for a message from it end
    this party's process, with a message naming it and :data:`EXIT_DROPPED`: a frozen peer (stopped, swapping, a
    debugger) or one cut off without its connection closing (a pulled cable, a dropping firewall) would otherwise
    leave every other party waiting forever, since no connection is lost. Checked by a timer of the event loop, which
    reads what arrived before it runs, so a party busy computing does not count its own delay against a peer whose
    messages arrived meanwhile; but a peer busy with the same long computation sends nothing either, so no party may
    compute for ``peer_timeout`` between two messages while its peers wait (``--insecure-plaintext`` computes its
    t-SNE once the connections are closed)."""
    from mpyc import asyncoro

    loop = mpc._loop
    heard = {peer.pid: loop.time() for peer in mpc.parties if peer.pid != mpc.pid}  # the last bytes from each peer
    data_received = asyncoro.MessageExchanger.data_received

    def note_bytes(exchanger, data):
        data_received(exchanger, data)
        if exchanger.peer_pid is not None:
            heard[exchanger.peer_pid] = loop.time()

    asyncoro.MessageExchanger.data_received = note_bytes
    interval = min(5.0, peer_timeout / 4)

    def check() -> None:
        for peer in mpc.parties:
            exchanger = peer.protocol
            if (peer.pid in heard and isinstance(exchanger, asyncoro.MessageExchanger) and awaits_data(exchanger)
                    and loop.time() - heard[peer.pid] > peer_timeout):
                sys.stderr.write(f"Error: party {peer.pid} sent nothing for {peer_timeout:g} s while this party "
                                 "waited for it (frozen, or its network is cut off; --peer-timeout): the run is "
                                 "aborted and nothing written; start every party again\n")
                sys.stderr.flush()
                os._exit(EXIT_DROPPED)
        loop.call_later(interval, check)

    loop.call_later(interval, check)


def split_address(address: str) -> tuple[str, str]:
    """``(host, port)`` of a ``HOST:PORT`` party address, an IPv6 host without its ``[]`` (what sockets take)."""
    host, _, port = address.rpartition(":")
    return (host[1:-1] if host.startswith("[") and host.endswith("]") else host), port


def listen_on_own_address(mpc: Any, address: str) -> None:
    """Make MPyC listen on this party's own host (``127.0.0.1`` on loopback) rather than on every interface, its
    default."""
    loop, host = mpc._loop, split_address(address)[0]
    create_server = loop.create_server

    async def create_server_on_host(factory, **options):
        options.setdefault("host", host)
        return await create_server(factory, **options)

    loop.create_server = create_server_on_host


def awaits_data(exchanger: Any) -> bool:
    """Whether this party still waits for a message from the peer of ``exchanger`` (MPyC's placeholder futures)."""
    return any(isinstance(payload, asyncio.Future) and not payload.done() for payload in exchanger.buffers.values())


def peer_closed(mpc: Any, peer_pid: int) -> None:
    """Note that the connection with ``peer_pid`` is closed at the end of the run (:func:`close_connections`)."""
    mpc._ctzoo_open.discard(peer_pid)
    if not mpc._ctzoo_open and not mpc._ctzoo_all_closed.done():
        mpc._ctzoo_all_closed.set_result(None)


class ClosingCheckFailed(RuntimeError):
    """The parties' closing barrier opened another value than every party's 1: a peer does not run this protocol."""


async def close_connections(mpc: Any, close_timeout: float = 30.0) -> None:
    """End the run in place of MPyC's ``shutdown`` (module docstring): wait for this party's scheduled work, then a
    barrier of field elements (every party secret-shares a 1 with every party and the sum is opened: once this party
    holds every peer's share, it holds everything the peer sent before it), then close every connection and wait
    (at most ``close_timeout`` seconds) until they are closed, so that what this party sent last is delivered.

    A peer that closes from here on, once it sent all this party waits for, ends the run normally
    (:func:`watch_connections`); the connections stay registered with MPyC, so a share that arrived just before the
    close is still read. Raises :class:`ClosingCheckFailed` when the opened sum is not the number of parties."""
    while mpc._pc_level > mpc._program_counter[1]:  # as MPyC's shutdown: this party's scheduled work is done
        await asyncio.sleep(0)
    parties = len(mpc.parties)
    mpc._ctzoo_open = {peer.pid for peer in mpc.parties if peer.pid != mpc.pid}
    mpc._ctzoo_all_closed = mpc._loop.create_future()
    mpc._ctzoo_ending = True  # before this party's share goes out: a peer that has it may close at once
    present = mpc.input(mpc.SecInt(16)(1), senders=list(range(parties)))
    total = int(await mpc.output(mpc.sum(present)))
    for peer in mpc.parties:
        if peer.pid != mpc.pid and peer.pid in mpc._ctzoo_open:
            peer.protocol.close_connection()
    try:
        await asyncio.wait_for(asyncio.shield(mpc._ctzoo_all_closed), close_timeout)
    except asyncio.TimeoutError:
        pass  # a peer that does not finish the TLS close: everything is sent, nothing more to wait for
    if total != parties:
        raise ClosingCheckFailed(f"party {mpc.pid}: the parties' closing check opened {total}, not {parties}: a peer "
                                 "does not run this protocol (another ctzoo version, or a tampered one); the map is "
                                 "not written")


def integers_only(data: bytes) -> int:
    """:func:`pickle.loads` for MPyC's runtime module (:func:`refuse_pickles`): a pickled plain integer, else
    :class:`pickle.UnpicklingError` before any object is built (no class or function is ever looked up)."""

    class NoGlobals(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            raise pickle.UnpicklingError(f"a peer sent a pickle of {module}.{name}: refused (ctzoo accepts no "
                                         "pickled objects from peers)")

    value = NoGlobals(io.BytesIO(data)).load()
    if type(value) is not int:
        raise pickle.UnpicklingError(f"a peer sent a pickled {type(value).__name__}: refused (only integers)")
    return value


def refuse_pickles(runtime_module: Any) -> None:
    """Make MPyC's runtime module (``mpyc.runtime``) unpickle plain integers only (:func:`integers_only`); what
    this party pickles for its peers is unchanged."""
    runtime_module.pickle = types.SimpleNamespace(dumps=pickle.dumps, loads=integers_only,
                                                  UnpicklingError=pickle.UnpicklingError)
