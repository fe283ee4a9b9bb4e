"""The local API's HTTP/1.1 server: an ASGI app served on trio, the protocol kept by h11.

h11 parses and frames (request line, headers, bodies, chunked coding, keep-alive and
pipelining rules); this module does the I/O around it and holds the bounds a client must not
be able to stretch: time to send a request's headers, silence in the middle of a body, a
client that stops reading, header size, connections at once. The app sees ASGI 3 (`http`
scopes only, no lifespan): `receive` gives the body as it arrives (answering an
`Expect: 100-continue` on the first call), then `http.disconnect` once the client has gone.

Chosen over hypercorn, the server before it: for the same app, its per-request work cost
the node 1.43 ms of CPU per single-document PUT with 8 clients (1.10 with 64), this one 1.04
(0.62): 592 -> 720 and 850 -> 1,329 PUTs/s (README, "Speed").
"""

from __future__ import annotations

import email.utils
import http
import json
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import attrs
import h11
import trio

from plugshare.accepting import accept

log = logging.getLogger("plugshare.api")

RECEIVE_SIZE = 64 * 1024
# An answer given before its request's body was all read: if no more than this is still to
# come, it is read (and dropped) first, so the connection can be kept; else it is closed.
SMALL_BODY = 64 * 1024
_DISCONNECT = {"type": "http.disconnect"}
_ERRORS = {408: "timeout", 431: "headers_too_large", 500: "internal"}

Scope = dict[str, Any]
App = Callable[[Scope, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]],
               Awaitable[None]]


@attrs.frozen
class Limits:
    keep_alive: float = 30.0  # seconds an idle connection is kept between requests
    header_timeout: float = 10.0  # seconds from a request's first byte to its last header
    # (and from a new connection's connect to its first byte)
    body_idle: float = 60.0  # seconds of silence allowed in the middle of a request body
    send_idle: float = 60.0  # seconds a client may leave an answer unread before it is cut
    max_header_bytes: int = 64 * 1024  # request line and headers (431 above)
    max_connections: int = 512  # at the cap an idle one is closed, else new ones wait
    linger: float = 1.0  # seconds an unread body is read and dropped before the close
    graceful: float = 2.0  # seconds requests in flight get to finish at shutdown


async def serve(app: App, sock: socket.socket, *, limits: Limits = Limits(),
                shutdown_trigger: Callable[[], Awaitable[Any]],
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve `app` on the listening socket `sock` (owned: closed on return) until
    `shutdown_trigger()` returns; then stop accepting, close idle connections, and give the
    requests in flight `limits.graceful` seconds."""
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    server = _Server(app, limits)
    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as accepting:
            accepting.start_soon(server.accept_loop, listener, connections)
            task_status.started()
            await shutdown_trigger()
            accepting.cancel_scope.cancel()
        await listener.aclose()
        server.drain()
        with trio.move_on_after(limits.graceful):
            await server.all_closed.wait()
        connections.cancel_scope.cancel()


class _Server:
    def __init__(self, app: App, limits: Limits) -> None:
        self.app = app
        self.limits = limits
        self.draining = False
        self.open = 0
        self.all_closed = trio.Event()
        self.all_closed.set()
        self._slots = trio.Semaphore(limits.max_connections)
        # Connections waiting for their next request, the longest waiting first; and new
        # ones waiting for their first (not closed to make room: they have had no turn yet).
        self._idle: dict[trio.CancelScope, None] = {}
        self._new: set[trio.CancelScope] = set()
        self._room_wanted = False  # a connection accepted at the cap waits for a slot

    async def accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            stream = await accept(listener, "API connections", log)
            if self._slots.value == 0:
                # Idle keep-alive connections must not lock new clients out: the one idle
                # the longest goes (its client reconnects), now or as soon as one is idle.
                self._room_wanted = True
                self._make_room()
            try:
                await self._slots.acquire()
            except BaseException:  # shutting down while it waited for a slot
                with trio.CancelScope(shield=True):
                    await stream.aclose()
                raise
            self._room_wanted = False
            self.open += 1
            self.all_closed = trio.Event() if self.open == 1 else self.all_closed
            nursery.start_soon(self._run, stream)

    async def _run(self, stream: trio.SocketStream) -> None:
        try:
            await _Connection(self, stream).run()
        finally:
            self._slots.release()
            self.open -= 1
            if self.open == 0:
                self.all_closed.set()

    def drain(self) -> None:
        """Stop keeping connections alive, and close those waiting for a request now."""
        self.draining = True
        for scope in [*self._idle, *self._new]:
            scope.cancel()

    def waiting(self, scope: trio.CancelScope, waiting: bool, *, served: bool) -> None:
        """A connection waits for the first byte of a request (`waiting`), or no longer."""
        if not waiting:
            self._idle.pop(scope, None)
            self._new.discard(scope)
        elif not served:
            self._new.add(scope)
        else:
            self._idle[scope] = None
            if self._room_wanted:
                self._make_room()

    def _make_room(self) -> None:
        if self._idle:
            next(iter(self._idle)).cancel()


class _Connection:
    def __init__(self, server: _Server, stream: trio.SocketStream) -> None:
        self.server = server
        self.limits = server.limits
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER,
                                  max_incomplete_event_size=self.limits.max_header_bytes)
        self.gone = trio.Event()  # the client closed, or an exchange with it failed
        self.served = 0  # requests answered on this connection
        try:
            self.client = stream.socket.getpeername()[:2]
            self.local = stream.socket.getsockname()[:2]
        except OSError:
            self.client = self.local = None

    async def run(self) -> None:
        try:
            while not self.gone.is_set():
                request = await self._next_request()
                if request is None:
                    break
                await _Exchange(self, request).run()
                self.served += 1
                if self.gone.is_set():
                    break
                if not self._body_read():
                    await self._linger()  # an answer given before its body was all read
                    break
                if self.h11.our_state is not h11.DONE:  # "Connection: close", HTTP/1.0
                    break
                self.h11.start_next_cycle()
        finally:
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    # -- reading ----------------------------------------------------------------------------

    async def receive(self) -> None:
        """Read more bytes into h11 (b"" at the end of the stream)."""
        try:
            data = await self.stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.gone.set()
        self.h11.receive_data(data)

    async def next_event(self, idle: float) -> Any:
        """The next h11 event, `idle` seconds of silence allowed between reads."""
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            with trio.fail_after(idle):
                await self.receive()

    async def _next_request(self) -> h11.Request | None:
        """The next request; None when the connection is to be closed (the client went, or
        was idle too long, or the server is draining)."""
        if self.server.draining:
            return None
        try:
            event = self.h11.next_event()  # one pipelined already?
            # Between requests a connection may wait `keep_alive` (and is the first to go
            # when new ones need room); a new one's first request is due within
            # `header_timeout`. Either is closed at once when the server shuts down.
            if event is h11.NEED_DATA and not self.h11.trailing_data[0]:
                wait = self.limits.keep_alive if self.served else self.limits.header_timeout
                with trio.CancelScope(deadline=trio.current_time() + wait) as idle:
                    self.server.waiting(idle, True, served=bool(self.served))
                    try:
                        await self.receive()
                    finally:
                        self.server.waiting(idle, False, served=bool(self.served))
                if idle.cancelled_caught:
                    if not self.served and not self.server.draining:
                        await self.refuse(408, "no request came")
                    return None
                event = self.h11.next_event()
            if event is h11.NEED_DATA:
                with trio.move_on_after(self.limits.header_timeout) as slow:
                    event = await self.next_event(math.inf)
                if slow.cancelled_caught:
                    await self.refuse(408, "the request's headers took too long to arrive")
                    return None
        except h11.RemoteProtocolError as exc:
            await self.refuse(exc.error_status_hint, str(exc) or "malformed request")
            return None
        if isinstance(event, h11.Request):
            # h11 bounds what it buffers of an incomplete head; one that came whole in a
            # single read is measured here
            size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
            if size > self.limits.max_header_bytes:
                await self.refuse(431, "the request's headers are too large")
                return None
            return event
        return None  # ConnectionClosed

    def _body_read(self) -> bool:
        """Whether the request's body has all come in (the app may not have asked for it:
        the end of a body-less request is already here)."""
        try:
            while self.h11.their_state is h11.SEND_BODY:
                if self.h11.next_event() is h11.NEED_DATA:
                    return False
        except h11.RemoteProtocolError:
            return False
        return self.h11.their_state is h11.DONE

    async def _linger(self) -> None:
        """Close after an answer whose request body was not all read: half-close, then read
        and drop what comes for a moment. Closing with unread bytes makes the kernel send a
        reset, which can destroy the answer before the client has read it."""
        try:
            await self.stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        with trio.move_on_after(self.limits.linger):
            while True:
                try:
                    if not await self.stream.receive_some(RECEIVE_SIZE):
                        return
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return

    async def wait_gone(self) -> None:
        """Return once the client has closed its side (or an exchange failed). Bytes that
        arrive meanwhile (a pipelined request) are kept for the next cycle."""
        if self.gone.is_set():
            return
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                while not self.gone.is_set():
                    if len(self.h11.trailing_data[0]) >= self.limits.max_header_bytes:
                        return  # the next request is all here: no need to read further
                    await self.receive()

            nursery.start_soon(watch)
            await self.gone.wait()
            nursery.cancel_scope.cancel()

    # -- writing ----------------------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        """Send `data`; a client gone, or not reading for `send_idle` seconds, is cut and
        the rest of the answer dropped."""
        if self.gone.is_set() or not data:
            return
        try:
            with trio.fail_after(self.limits.send_idle):
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            self.gone.set()

    async def refuse(self, status: int, reason: str) -> None:
        """Answer a request that cannot be served (when h11 still allows an answer)."""
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        # the API's error shape, also for what never reached it
        error = _ERRORS.get(status, "bad_request" if status < 500 else "internal")
        body = json.dumps({"error": error, "reason": reason}).encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close"), (b"date", _date())]
        try:
            data = (self.h11.send(h11.Response(status_code=status, headers=headers,
                                               reason=_reason(status)))
                    + self.h11.send(h11.Data(data=body)) + self.h11.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:
            return
        await self.write(data)


class _Exchange:
    """One request and its answer: the ASGI `receive` and `send` of one app call."""

    def __init__(self, connection: _Connection, request: h11.Request) -> None:
        self.connection = connection
        self.request = request
        self.head = request.method == b"HEAD"
        # the body's length: none said, none; None when chunked (which h11 then follows)
        headers = dict(request.headers)
        self.declared: int | None = (
            None if b"transfer-encoding" in headers
            else int(headers.get(b"content-length", 0)))  # h11 checked it is a number
        self.received = 0
        self.body_done = False
        self.started = False
        self.finished = False
        self.pending = b""  # the answer's head, sent with its first body bytes

    def scope(self) -> Scope | None:
        request = self.request
        path, _, query = request.target.partition(b"?")
        try:
            text = path.decode("ascii")
        except UnicodeDecodeError:
            return None
        if not text.startswith("/"):
            return None  # absolute-form or "*": not for this server
        return {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.http_version.decode(), "method": request.method.decode(),
            "scheme": "http", "path": unquote(text), "raw_path": path, "query_string": query,
            "root_path": "", "headers": list(request.headers),
            "client": self.connection.client, "server": self.connection.local,
        }

    async def run(self) -> None:
        connection = self.connection
        scope = self.scope()
        if scope is None:
            await connection.refuse(400, "the request target must be a path")
            return
        try:
            await connection.server.app(scope, self.receive, self.send)
        except Exception:
            log.exception("the API failed on %s %s", scope["method"], scope["path"])
        else:
            if not self.started:
                log.error("the API gave no answer to %s %s", scope["method"], scope["path"])
        if not self.started:
            await connection.refuse(500, "internal error")
        elif not self.finished:
            connection.gone.set()  # an answer cut short: only closing says so

    async def receive(self) -> dict:
        connection = self.connection
        if self.finished or connection.gone.is_set():
            return dict(_DISCONNECT)  # the exchange is over
        if self.body_done:
            await connection.wait_gone()
            return dict(_DISCONNECT)
        if connection.h11.they_are_waiting_for_100_continue:
            await connection.write(connection.h11.send(
                h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")))
        try:
            event = await connection.next_event(connection.limits.body_idle)
        except (trio.TooSlowError, h11.RemoteProtocolError):
            connection.gone.set()  # a body that stalls or breaks its framing: it is over
            return dict(_DISCONNECT)
        if isinstance(event, h11.Data):
            self.received += len(event.data)
            return {"type": "http.request", "body": bytes(event.data), "more_body": True}
        if isinstance(event, h11.EndOfMessage):
            self.body_done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        connection.gone.set()  # closed in the middle of the body
        return dict(_DISCONNECT)

    async def _skip_small_body(self) -> None:
        """Read and drop what is left of a body of at most SMALL_BODY (not when the client
        waits for a 100 Continue: an answer tells it not to send the body)."""
        h11_connection = self.connection.h11
        if self.declared is None or self.declared - self.received > SMALL_BODY \
                or h11_connection.they_are_waiting_for_100_continue:
            return
        while not self.body_done:
            if (await self.receive())["type"] == "http.disconnect":
                return

    async def send(self, message: dict) -> None:
        connection = self.connection
        kind = message["type"]
        if kind == "http.response.start":
            if self.started:
                raise RuntimeError("the answer was started twice")
            headers = list(message.get("headers", ()))
            if not any(name.lower() == b"date" for name, _ in headers):
                headers.append((b"date", _date()))
            if not self.body_done:
                await self._skip_small_body()
            if connection.server.draining or not (self.body_done or connection.gone.is_set()):
                # a body left unread ends the connection after this answer: say so, or the
                # client sends its next request on a connection about to close (RFC 9112, 9.6)
                headers.append((b"connection", b"close"))
            status = message["status"]
            self.pending = connection.h11.send(
                h11.Response(status_code=status, headers=headers, reason=_reason(status)))
            self.started = True
        elif kind == "http.response.body":
            if not self.started or self.finished:
                raise RuntimeError("an answer's body outside of its answer")
            body = message.get("body", b"")
            parts = [self.pending]
            self.pending = b""
            if body and not self.head:
                parts.append(connection.h11.send(h11.Data(data=body)))
            if not message.get("more_body", False):
                parts.append(connection.h11.send(h11.EndOfMessage()))
                self.finished = True
            await connection.write(b"".join(parts))
        else:
            raise RuntimeError(f"unknown ASGI message {kind!r}")


_date_cache: tuple[int, bytes] = (0, b"")


def _date() -> bytes:
    """The Date header's value (RFC 9110, 6.6.1), formatted once a second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True).encode())
    return _date_cache[1]


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""
