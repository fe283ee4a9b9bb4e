"""Peer links over TCP + TLS on trio: the I/O around the sans-I/O `Link`.

* `serve_peers` listens, runs the accepting handshake on every connection, asks `accept_peer`
  about the authenticated fingerprint, and runs `handler(connection)` for each accepted peer.
  A connection that misbehaves (bad frames, failed handshake, silence) is dropped and logged;
  the listener keeps serving everyone else.
* `connect_peer` dials a peer, checks the delegation in its certificate and pins the identity's
  fingerprint, proves our identity with `prove` (an async call to the token), and yields a
  `PeerConnection` for the duration of an ``async with`` block.
* `keep_connected` keeps a link to one peer up, trying its known addresses with back-off.

The node process holds no identity key: the server presents an ephemeral TLS key certified by
the token (`plugshare.token.tls.server_ssl_context`), and the connecting side's proof is
``await prove(server_id, nonce)``, the token's signature of
``client_auth_payload(server_id, nonce, local.node_id)``, awaited within the handshake timeout.

A `PeerConnection` runs three tasks: a receiver (feeds the link, queues application messages in
a bounded inbox, answers pings), a sender (writes whatever the link has queued) and a keepalive
timer (pings, and declares the peer dead when nothing arrives for `LinkConfig.dead_after`).
`send` waits while more than `TransportConfig.send_buffer_size` bytes are queued, and the
receiver stops reading while the inbox is full, so memory stays bounded in both directions.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, NoReturn

import attrs
import trio

from plugshare.accepting import accept_forever
from plugshare.replication.admission import Admission
from plugshare.replication.backoff import Backoff
from plugshare.replication.link import (
    ApplicationMessage,
    Event,
    HandshakeTimeout,
    Link,
    LinkConfig,
    LinkError,
    LinkState,
    LocalNode,
    PeerAuthenticated,
    PeerClosed,
    PeerHello,
    ProofRequested,
    RemoteProtocolError,
    node_id,
)
from plugshare.token import format_node_id
from plugshare.token.tls import ALPN_PROTOCOL, InvalidPeerCertificate, certificate_identity

__all__ = [
    "FingerprintMismatch",
    "PeerConnectError",
    "PeerConnection",
    "PeerConnectionClosed",
    "PeerRefused",
    "ProofFailed",
    "Prove",
    "Route",
    "TransportConfig",
    "NoRouteAnswered",
    "connect_first",
    "connect_peer",
    "connect_peer_via",
    "keep_connected",
    "serve_peers",
]

logger = logging.getLogger(__name__)

Handler = Callable[["PeerConnection"], Awaitable[None]]
Prove = Callable[[bytes, bytes], Awaitable[bytes]]
"""``await prove(server_id, nonce)``: the token's Ed25519 signature of
``client_auth_payload(server_id, nonce, local.node_id)`` (see `plugshare.token.tls`)."""


@attrs.frozen
class TransportConfig:
    """Buffers and timers of peer connections (bytes, messages, seconds)."""

    link: LinkConfig = LinkConfig()
    send_buffer_size: int = 1024 * 1024
    receive_queue_size: int = 16
    receive_chunk_size: int = 64 * 1024
    close_timeout: float = 2.0
    # Accepted connections whose handshake is not complete (see `admission`): in all, from
    # one source address, and how long one may take (TLS, hello, proof and the token's
    # decision) before it is dropped.
    max_pending_handshakes: int = 64
    max_pending_per_source: int = 8
    pending_handshake_timeout: float = 5.0
    # accept() failing for want of descriptors (EMFILE, ENFILE...): wait this long, doubling up
    # to the maximum, and try again.
    accept_retry: float = 0.1
    accept_retry_max: float = 2.0


@attrs.frozen
class Route:
    """A way to a peer other than a TCP connection to one of its addresses (through a relay):
    `open()` returns a byte stream to it, or raises PeerConnectError; `label` names it in logs
    and status; `via` says what kind of path it is."""

    label: str
    open: Callable[[], Awaitable[trio.abc.Stream]]
    via: str = "relay"


@attrs.frozen
class Incoming:
    """A stream that reached this node other than on its listener (a relayed session), to be
    accepted like a direct connection. `source` is the key its admission counts under."""

    stream: trio.abc.Stream
    remote_address: str
    source: str
    via: str = "relay"


class PeerConnectionClosed(Exception):
    """The connection is closed; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PeerConnectError(Exception):
    """A link to a peer could not be established; the message says why."""


class NoRouteAnswered(PeerConnectError):
    """None of the routes tried at once led to a link; `errors` says why each did not."""

    def __init__(self, errors: list[PeerConnectError]) -> None:
        super().__init__("; ".join(map(str, errors)) or "no address to try")
        self.errors = errors


class FingerprintMismatch(PeerConnectError):
    """The peer's TLS certificate is not for the node we meant to reach."""


class PeerRefused(PeerConnectError):
    """The peer closed the link during the handshake (it does not accept us, or gave up)."""


class ProofFailed(PeerConnectError):
    """`prove` raised (the token refused, or could not be reached) or returned a signature that
    does not verify with our key; the error is the cause."""


def _describe(error: BaseException) -> str:
    """A readable line for an error; trio wraps TLS failures with an empty message."""
    text = str(error)
    if not text and error.__cause__ is not None:
        text = str(error.__cause__) or type(error.__cause__).__name__
    return text or type(error).__name__


# Errors that end one connection; anything else is a bug and propagates.
_CONNECTION_ERRORS = (LinkError, InvalidPeerCertificate, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class PeerConnection:
    """An established, authenticated link to one peer.

    Created by `serve_peers` and `connect_peer`; its I/O tasks run for as long as they keep it.
    """

    def __init__(self, stream: trio.SSLStream, link: Link, *, remote_address: str, config: TransportConfig,
                 via: str = "direct") -> None:
        assert link.state is LinkState.ESTABLISHED and link.peer is not None
        self.via = via
        """How the link runs: "direct" (TCP to the peer) or "relay" (through a relay)."""
        self._stream = stream
        self._link = link
        self._config = config
        self.remote_address = remote_address
        """The ``host:port`` this connection runs to (a hint, not an identity)."""
        self._inbox_send, self._inbox_receive = trio.open_memory_channel[dict[str | bytes, Any]](
            config.receive_queue_size
        )
        self._close_reason: str | None = None
        self._close_error: BaseException | None = None
        self._closed = trio.Event()
        self._output_ready = trio.Event()
        self._drained = trio.Event()
        self._receive_scope = trio.CancelScope()
        self._send_scope = trio.CancelScope()

    @property
    def peer_fingerprint(self) -> bytes:
        """The peer's authenticated node id (SHA-256 of its Ed25519 public key)."""
        return self.peer_hello.node_id

    @property
    def peer_hello(self) -> PeerHello:
        """What the peer said about itself in the handshake."""
        assert self._link.peer is not None
        return self._link.peer

    @property
    def rtt(self) -> float | None:
        """Smoothed round-trip time in seconds, from keepalive pings; None before the first."""
        return self._link.rtt

    @property
    def close_reason(self) -> str | None:
        """Why the connection closed, or None while it is open."""
        return self._close_reason

    async def send(self, message: dict[str, Any]) -> None:
        """Queue an application message, waiting while the send buffer is full.

        Raises PeerConnectionClosed once the connection is closed, LocalProtocolError for a
        link-level ``type``, and a FrameError subclass for a message that cannot be framed.
        """
        await trio.lowlevel.checkpoint()
        while self._close_reason is None and self._link.pending_output >= self._config.send_buffer_size:
            await self._drained.wait()
        if self._close_reason is not None:
            raise PeerConnectionClosed(self._close_reason) from self._close_error
        self._link.send_message(message)
        self._output_ready.set()

    async def receive(self) -> dict[str | bytes, Any]:
        """The next application message. Messages that arrived before a close are still
        delivered; after them this raises PeerConnectionClosed."""
        try:
            return await self._inbox_receive.receive()
        except trio.EndOfChannel:
            assert self._close_reason is not None
            raise PeerConnectionClosed(self._close_reason) from self._close_error

    def __aiter__(self) -> PeerConnection:
        return self

    async def __anext__(self) -> dict[str | bytes, Any]:
        """Iteration ends when the connection closes; see `close_reason` for why."""
        try:
            return await self.receive()
        except PeerConnectionClosed:
            raise StopAsyncIteration from None

    async def aclose(self, reason: str = "closed") -> None:
        """Close the link, telling the peer `reason`, and wait until the stream is closed."""
        self._terminate(reason)
        await self._closed.wait()

    async def wait_closed(self) -> None:
        """Return once the connection is closed, for whatever reason."""
        await self._closed.wait()

    # -- I/O tasks --------------------------------------------------------------------------

    def _terminate(self, reason: str, error: BaseException | None = None) -> None:
        """Begin closing (synchronous, idempotent): stop receiving, flush the close frame."""
        if self._close_reason is not None:
            return
        self._close_reason = reason
        self._close_error = error
        peer = f"{format_node_id(self.peer_fingerprint)} at {self.remote_address}"
        if error is None:
            logger.info("link to peer %s closed: %s", peer, reason)
        else:
            logger.warning("dropped link to peer %s: %s", peer, reason)
        self._link.close(reason)
        self._receive_scope.cancel()
        self._send_scope.deadline = min(self._send_scope.deadline, trio.current_time() + self._config.close_timeout)
        self._inbox_send.close()
        self._output_ready.set()
        self._drained.set()

    async def _run(self) -> None:
        """Run the connection's I/O until it is closed, then close the stream."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_loop)
                nursery.start_soon(self._receive_side)
        finally:
            self._terminate("the connection's tasks were cancelled")
            with trio.CancelScope(shield=True), trio.move_on_after(self._config.close_timeout):
                try:
                    await self._stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            self._closed.set()

    async def _receive_side(self) -> None:
        with self._receive_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keepalive_loop)
                await self._receive_loop()

    async def _receive_loop(self) -> None:
        try:
            while True:
                event = self._link.next_event()
                self._output_ready.set()  # pongs
                if event is None:
                    data = await self._stream.receive_some(self._config.receive_chunk_size)
                    self._link.receive_data(data, trio.current_time())
                elif isinstance(event, ApplicationMessage):
                    await self._inbox_send.send(event.message)
                elif isinstance(event, PeerClosed):
                    self._terminate(f"closed by the peer: {event.reason}")
                    return
                else:  # the link yields handshake events only during the handshake
                    raise AssertionError(f"unexpected link event after the handshake: {event!r}")
        except _CONNECTION_ERRORS as error:
            self._terminate(_describe(error), error)

    async def _keepalive_loop(self) -> None:
        while (deadline := self._link.next_deadline()) is not None:
            await trio.sleep_until(deadline)
            try:
                self._link.tick(trio.current_time())
            except LinkError as error:
                self._terminate(str(error), error)
                return
            self._output_ready.set()

    async def _send_loop(self) -> None:
        with self._send_scope:
            try:
                while True:
                    data = self._link.data_to_send()
                    if data:
                        await self._stream.send_all(data)
                        self._drained.set()
                        self._drained = trio.Event()
                    elif self._link.state is LinkState.CLOSED:
                        return
                    else:
                        await self._output_ready.wait()
                        self._output_ready = trio.Event()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                self._terminate(f"sending failed: {_describe(error)}", error)
            finally:
                self._drained.set()  # wake senders so they see the close


# --- handshakes -------------------------------------------------------------------------------


def _remote_address(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
    except OSError:
        return "an unknown address"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _tls_handshake(stream: trio.SSLStream, deadline: float, timeout: float) -> None:
    """Complete TLS by `deadline` and check that the peer speaks our protocol."""
    with trio.move_on_at(deadline) as scope:
        await stream.do_handshake()
    if scope.cancelled_caught:
        raise HandshakeTimeout(f"TLS handshake not complete after {timeout}s")
    selected = stream.selected_alpn_protocol()
    if selected != ALPN_PROTOCOL:
        raise RemoteProtocolError(f"the peer did not negotiate ALPN {ALPN_PROTOCOL!r} (got {selected!r})")


async def _link_handshake(stream: trio.SSLStream, link: Link, prove: Prove | None = None) -> Event:
    """Exchange handshake messages until the link yields an event other than ProofRequested
    (which `prove` answers), by the link's handshake deadline. Raises LinkError
    (HandshakeTimeout on time-out, including a `prove` that takes too long) or ProofFailed."""
    deadline = link.next_deadline()
    assert deadline is not None
    with trio.move_on_at(deadline):
        while True:
            event = link.next_event()
            if link.pending_output:
                await stream.send_all(link.data_to_send())
            if isinstance(event, ProofRequested):
                assert prove is not None, "only the connecting side is asked for a proof"
                try:
                    # LocalProtocolError from send_proof: a signature by another key, or of other bytes.
                    link.send_proof(await prove(event.server_id, event.nonce))
                except Exception as error:
                    link.close("the connecting node could not prove its identity")
                    raise ProofFailed(f"cannot prove our identity: {_describe(error)}") from error
                continue
            if event is not None:
                return event
            link.receive_data(await stream.receive_some(64 * 1024), trio.current_time())
    link.tick(max(trio.current_time(), deadline))  # raises HandshakeTimeout
    raise AssertionError("the link did not time out at its handshake deadline")


async def _close_after_failure(
    stream: trio.SSLStream, link: Link | None, config: TransportConfig, *, tls_up: bool
) -> None:
    """Best effort: tell the peer why (the link queued a close frame), then close."""
    if tls_up:
        with trio.move_on_after(config.close_timeout):
            try:
                if link is not None and link.pending_output:
                    await stream.send_all(link.data_to_send())
                await stream.aclose()
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
    await trio.aclose_forcefully(stream)


async def _run_with_handler(connection: PeerConnection, handler: Handler) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection._run)
        try:
            await handler(connection)
        except PeerConnectionClosed as closed:
            logger.debug("link to %s ended: %s", format_node_id(connection.peer_fingerprint), closed.reason)
        finally:
            with trio.CancelScope(shield=True):
                await connection.aclose()


# --- listening ----------------------------------------------------------------------------------


async def serve_peers(
    handler: Handler,
    *,
    host: str | None,
    port: int,
    ssl_context: ssl.SSLContext | Callable[[], ssl.SSLContext],
    local: LocalNode,
    accept_peer: Callable[[bytes], bool | Awaitable[bool]],
    config: TransportConfig = TransportConfig(),
    listeners: list[trio.SocketListener] | None = None,
    incoming: trio.MemoryReceiveChannel[Incoming] | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Accept peer links on `host`:`port` (port 0 picks a free one) until cancelled, or on
    `listeners` the caller already bound (so it knows the port before the first hello).

    `ssl_context` comes from ``plugshare.token.tls.server_ssl_context(tls_key, delegation)``, with a
    delegation signed by `local`'s identity key (clients refuse anything else); or it is a
    function returning the current such context, asked for each new connection, so a node can
    certify a new TLS key before the delegation expires without closing its listener. Each
    connection is authenticated; `accept_peer(fingerprint)` decides whether the peer may stay,
    and `handler(connection)` then runs for it (the connection closes when the handler returns;
    a PeerConnectionClosed escaping the handler is expected and swallowed, any other exception
    propagates). With ``nursery.start``, the started value is the list of listeners.

    `incoming` streams (relayed sessions) are handled exactly like accepted connections: the
    same handshake, admission bounds (counted under their `source`), `accept_peer` and handler.
    """
    if listeners is None:
        listeners = await trio.open_tcp_listeners(port, host=host)
    pending = Admission(per_source=config.max_pending_per_source, total=config.max_pending_handshakes)
    pending_scopes: dict[int, trio.CancelScope] = {}

    async def serve_one(raw_stream: trio.abc.Stream, remote: str, source: str, via: str) -> None:
        stream = trio.SSLStream(raw_stream, ssl_context() if callable(ssl_context) else ssl_context, server_side=True)
        accepted_at = trio.current_time()
        timeout = min(config.link.handshake_timeout, config.pending_handshake_timeout)
        link = Link.accepting(local, now=accepted_at, config=attrs.evolve(config.link, handshake_timeout=timeout))
        admitted = pending.admit(source)
        for ticket in admitted.evicted:
            pending_scopes.pop(ticket).cancel()
        scope = trio.CancelScope(deadline=accepted_at + config.pending_handshake_timeout)
        pending_scopes[admitted.ticket] = scope
        tls_up = False
        accepted = False
        try:
            with scope:
                await _tls_handshake(stream, accepted_at + timeout, timeout)
                tls_up = True
                event = await _link_handshake(stream, link)
                if isinstance(event, PeerClosed):
                    raise PeerRefused(f"the peer gave up during the handshake: {event.reason}")
                assert isinstance(event, PeerAuthenticated)
                fingerprint = event.peer.node_id
                allowed = accept_peer(fingerprint)
                if inspect.isawaitable(allowed):
                    allowed = await allowed  # the token decides, in its own process
                if not allowed:
                    link.refuse("this node does not accept your node id")
                    logger.info("refused peer %s from %s: not an accepted peer", format_node_id(fingerprint), remote)
                    await _close_after_failure(stream, link, config, tls_up=True)
                    return
                link.accept()
                accepted = True
            if not accepted:  # the scope was cancelled: evicted, or out of time
                why = "out of time" if trio.current_time() >= scope.deadline else "evicted by newer connections"
                logger.info("dropped peer connection from %s: handshake %s", remote, why)
                link.close(f"handshake not complete: {why}")
                with trio.CancelScope(shield=True):
                    await _close_after_failure(stream, link, config, tls_up=tls_up)
                return
        except BaseException as error:
            with trio.CancelScope(shield=True):
                await _close_after_failure(stream, link, config, tls_up=tls_up)
            if not isinstance(error, (*_CONNECTION_ERRORS, PeerRefused)):
                raise
            logger.warning("dropped peer connection from %s: %s", remote, _describe(error))
            return
        finally:
            pending.release(admitted.ticket)
            pending_scopes.pop(admitted.ticket, None)
        logger.info("accepted peer %s (%r) from %s", format_node_id(fingerprint), event.peer.name, remote)
        await _run_with_handler(PeerConnection(stream, link, remote_address=remote, config=config, via=via), handler)

    async def run_one(tcp_stream: trio.SocketStream) -> None:
        try:
            await serve_one(tcp_stream, _remote_address(tcp_stream), _source_host(tcp_stream), "direct")
        finally:
            await trio.aclose_forcefully(tcp_stream)

    async def run_incoming(item: Incoming) -> None:
        try:
            await serve_one(item.stream, item.remote_address, item.source, item.via)
        finally:
            await trio.aclose_forcefully(item.stream)

    async def take_incoming(nursery: trio.Nursery) -> None:
        assert incoming is not None
        async for item in incoming:
            nursery.start_soon(run_incoming, item)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(partial(accept_forever, retry=config.accept_retry,
                                       retry_max=config.accept_retry_max),
                               listener, nursery, run_one, "peer connections", logger)
        if incoming is not None:
            nursery.start_soon(take_incoming, nursery)
        task_status.started(listeners)
    raise AssertionError("the accept loops never return")


def _source_host(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return ""


# --- connecting ---------------------------------------------------------------------------------


async def _open_tcp(host: str, port: int, timeout: float) -> trio.abc.Stream:
    where = f"{host}:{port}"
    with trio.move_on_after(timeout):
        try:
            return await trio.open_tcp_stream(host, port)
        except OSError as error:
            raise PeerConnectError(f"cannot connect to {where}: {_describe(error)}") from error
    raise PeerConnectError(f"cannot connect to {where}: no answer in {timeout}s")


async def _establish(
    open_stream: Callable[[], Awaitable[trio.abc.Stream]],
    where: str,
    *,
    via: str,
    expected_fingerprint: bytes,
    ssl_context: ssl.SSLContext,
    local: LocalNode,
    prove: Prove,
    config: TransportConfig,
    pinned: Callable[[], None] = lambda: None,
) -> PeerConnection:
    """A link over `open_stream()`; `pinned()` is called once the peer's certificate proved
    it is the node we meant (what is left is the in-band proof)."""
    started = trio.current_time()
    raw_stream: trio.abc.Stream | None = None
    with trio.move_on_at(started + config.link.handshake_timeout):
        raw_stream = await open_stream()
    if raw_stream is None:
        raise PeerConnectError(f"cannot connect to {where}: no answer in {config.link.handshake_timeout}s")
    stream = trio.SSLStream(raw_stream, ssl_context, server_side=False)
    link: Link | None = None
    tls_up = False
    try:
        await _tls_handshake(stream, started + config.link.handshake_timeout, config.link.handshake_timeout)
        tls_up = True
        # Check the server's delegated certificate and pin its identity before sending any
        # application byte.
        fingerprint = node_id(certificate_identity(stream.getpeercert(binary_form=True)))
        if fingerprint != expected_fingerprint:
            raise FingerprintMismatch(
                f"{where} is node {format_node_id(fingerprint)}, not the expected "
                f"{format_node_id(expected_fingerprint)}"
            )
        pinned()
        link = Link.connecting(local, pinned_peer_id=fingerprint, now=started, config=config.link)
        event = await _link_handshake(stream, link, prove)
        if isinstance(event, PeerClosed):
            raise PeerRefused(f"{where} refused the link: {event.reason}")
    except BaseException as error:
        with trio.CancelScope(shield=True):
            await _close_after_failure(stream, link, config, tls_up=tls_up)
        if isinstance(error, _CONNECTION_ERRORS):
            raise PeerConnectError(f"link to {where} failed: {_describe(error)}") from error
        raise
    return PeerConnection(stream, link, remote_address=where, config=config, via=via)


@asynccontextmanager
async def connect_peer(
    host: str,
    port: int,
    *,
    expected_fingerprint: bytes,
    ssl_context: ssl.SSLContext,
    local: LocalNode,
    prove: Prove,
    config: TransportConfig = TransportConfig(),
    dial_limiter: trio.CapacityLimiter | None = None,
) -> AsyncIterator[PeerConnection]:
    """Connect to the node `expected_fingerprint` at `host`:`port`; use as ``async with``.

    `ssl_context` comes from `plugshare.token.tls.client_ssl_context`. The server's certificate
    must carry a current delegation from the identity whose fingerprint is
    `expected_fingerprint`; then ``await prove(server_id, nonce)`` (the token) proves our
    identity, `local.public_key`. Raises PeerConnectError (FingerprintMismatch, PeerRefused,
    ProofFailed, or with the network, TLS, certificate or protocol failure as its cause). The
    connection closes when the block exits. With `dial_limiter`, the attempt (up to an
    established link) holds one of its tokens: it bounds the dials in flight at once.
    """
    async with connect_peer_via(
        Route(f"{host}:{port}", partial(_open_tcp, host, port, config.link.handshake_timeout), via="direct"),
        expected_fingerprint=expected_fingerprint,
        ssl_context=ssl_context,
        local=local,
        prove=prove,
        config=config,
        dial_limiter=dial_limiter,
    ) as connection:
        yield connection


@asynccontextmanager
async def connect_peer_via(
    route: Route,
    *,
    expected_fingerprint: bytes,
    ssl_context: ssl.SSLContext,
    local: LocalNode,
    prove: Prove,
    config: TransportConfig = TransportConfig(),
    dial_limiter: trio.CapacityLimiter | None = None,
) -> AsyncIterator[PeerConnection]:
    """`connect_peer` over the stream `route.open()` returns (a relayed session): the same
    pinned TLS link and proof, end to end."""
    establish = partial(
        _establish,
        route.open,
        route.label,
        via=route.via,
        expected_fingerprint=expected_fingerprint,
        ssl_context=ssl_context,
        local=local,
        prove=prove,
        config=config,
    )
    if dial_limiter is None:
        connection = await establish()
    else:
        async with dial_limiter:
            connection = await establish()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection._run)
        try:
            yield connection
        finally:
            with trio.CancelScope(shield=True):
                await connection.aclose()


RELAY_HEAD_START = 0.5  # seconds the direct routes are tried alone before the relayed ones join


def as_route(address: tuple[str, int] | Route, config: TransportConfig) -> Route:
    if isinstance(address, Route):
        return address
    host, port = address
    return Route(f"{host}:{port}", partial(_open_tcp, host, port, config.link.handshake_timeout), via="direct")


@asynccontextmanager
async def connect_first(
    addresses: Iterable[tuple[str, int] | Route],
    *,
    expected_fingerprint: bytes,
    ssl_context: ssl.SSLContext,
    local: LocalNode,
    prove: Prove,
    config: TransportConfig = TransportConfig(),
    dial_limiter: trio.CapacityLimiter | None = None,
    head_start: float = RELAY_HEAD_START,
) -> AsyncIterator[PeerConnection]:
    """`connect_peer_via` on several routes at once (happy eyeballs), keeping the first link
    that authenticates: every direct address is dialed at once, the relayed routes after
    `head_start` (or as soon as every direct dial failed), so a stale address costs the relay
    fallback a head start, not a handshake timeout. The others are cancelled, or closed if
    they came up too. NoRouteAnswered (with each route's error) if none leads to a link."""
    routes = [as_route(address, config) for address in addresses]
    direct = [route for route in routes if route.via == "direct"]
    relayed = [route for route in routes if route.via != "direct"]
    errors: list[PeerConnectError] = []
    winner: list[PeerConnection] = []
    direct_left = len(direct)  # direct dials not over yet
    direct_pinned = 0  # ...of which the peer's certificate already answered: alive, not stale
    changed = trio.Event()  # set (and replaced) whenever those counts change

    def counts_changed() -> None:
        nonlocal changed
        changed.set()
        changed = trio.Event()

    async def race(route: Route, nursery: trio.Nursery) -> None:
        nonlocal direct_left, direct_pinned
        reached = False

        def reached_peer() -> None:
            nonlocal direct_pinned, reached
            if route.via == "direct":
                reached = True
                direct_pinned += 1
                counts_changed()

        attempt = partial(_establish, route.open, route.label, via=route.via,
                          expected_fingerprint=expected_fingerprint, ssl_context=ssl_context,
                          local=local, prove=prove, config=config, pinned=reached_peer)
        try:
            if dial_limiter is None:
                connection = await attempt()
            else:
                async with dial_limiter:
                    connection = await attempt()
        except PeerConnectError as error:
            errors.append(error)
            return
        finally:
            if route.via == "direct":
                direct_left -= 1
                direct_pinned -= reached
                counts_changed()
        if winner:  # another route came up in the same moment: this one goes
            await _discard(connection, "another route to the peer came up first")
            return
        winner.append(connection)
        nursery.cancel_scope.cancel()

    async def wait_for_direct() -> None:
        """Until the head start is over, unless a direct dial already reached the peer itself
        (then until it is over), or every direct dial failed."""
        deadline = trio.current_time() + head_start
        while direct_left and (direct_pinned or trio.current_time() < deadline):
            with trio.move_on_at(math.inf if direct_pinned else deadline):
                await changed.wait()

    async with trio.open_nursery() as nursery:
        for route in direct:
            nursery.start_soon(race, route, nursery)
        if relayed:
            await wait_for_direct()
            for route in relayed:
                nursery.start_soon(race, route, nursery)
    if not winner:
        raise NoRouteAnswered(errors)
    connection = winner[0]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(connection._run)
        try:
            yield connection
        finally:
            with trio.CancelScope(shield=True):
                await connection.aclose()


async def _discard(connection: PeerConnection, reason: str) -> None:
    """Close an established connection nobody will use (its I/O runs just long enough)."""
    with trio.CancelScope(shield=True):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection._run)
            await connection.aclose(reason)


async def keep_connected(
    handler: Handler,
    *,
    addresses: Callable[[], Iterable[tuple[str, int] | Route]],
    expected_fingerprint: bytes,
    ssl_context: ssl.SSLContext,
    local: LocalNode,
    prove: Prove,
    config: TransportConfig = TransportConfig(),
    backoff: Backoff = Backoff(),
    rng: random.Random | None = None,
    dial_limiter: trio.CapacityLimiter | None = None,
) -> NoReturn:
    """Keep a link to one peer up until cancelled, running `handler` on each connection.

    Each round tries the peer's addresses (`addresses()` is asked again every round, so
    discovery can update them), each a (host, port) or a `Route` (a relay), with
    `connect_first`: direct ones at once, relayed ones after a head start; when none answers,
    or after a link ends, it waits
    per `backoff` (the schedule restarts after every established link) and tries again.
    `prove` is as for `connect_peer`; its failures (ProofFailed) are retried like any other.
    """
    rng = rng or random.Random()
    attempt = 0
    peer = format_node_id(expected_fingerprint)
    while True:
        try:
            async with connect_first(
                addresses(),
                expected_fingerprint=expected_fingerprint,
                ssl_context=ssl_context,
                local=local,
                prove=prove,
                config=config,
                dial_limiter=dial_limiter,
            ) as connection:
                attempt = 0
                try:
                    await handler(connection)
                except PeerConnectionClosed:
                    pass
            logger.info("link to peer %s at %s ended: %s", peer, connection.remote_address, connection.close_reason)
        except NoRouteAnswered as error:
            for each in error.errors:
                logger.info("cannot reach peer %s: %s", peer, each)
        delay = backoff.delay(attempt, rng)
        attempt += 1
        await trio.sleep(delay)
