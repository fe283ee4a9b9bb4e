"""The node's side of the token protocol: one Unix-socket connection to the token process,
shared by every trio task of the node.

Each call sends a request with a fresh id and parks on its own waiter; one reader task reads
answers and wakes the waiter with the matching id, so calls from many tasks overlap on one
connection. Refusals come back as the token's own exception classes (see `wire.error_from`).

When the connection breaks, every call in flight raises `TokenUnavailable` (it may or may not
have run, so it is never retried), and the next call reconnects once, with a short timeout, so
a restarted token process is picked up without the node doing anything.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from .sockets import close_socket, receive_some, send_all
from .wire import MAX_FRAME, Decoder, Response, TokenUnavailable, WireError, encode_request, error_from

__all__ = ["TokenClient"]

log = logging.getLogger("plugshare.token.client")

RECEIVE_SIZE = 256 * 1024
CONNECT_TIMEOUT = 1.0
SEND_TIMEOUT = 10.0


class _Waiter:
    """One call's slot: the reader fills `response` (or `error`) and sets `event`."""

    __slots__ = ("event", "response", "error")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.response: Response | None = None
        self.error: Exception | None = None


class _Connection:
    """One socket to the token process and the calls in flight on it."""

    def __init__(self, sock: socket.socket, max_frame: int) -> None:
        self.sock = sock
        self.max_frame = max_frame
        self.pending: dict[int, _Waiter] = {}
        self.send_lock = trio.StrictFIFOLock()
        self.broken: str | None = None  # why, once broken
        self.highest_id = 0  # ids above this were never sent here: an answer for one is a bug

    def unavailable(self) -> TokenUnavailable:
        """A fresh exception for this broken connection (one instance per raise, so concurrent
        raisers do not share a traceback)."""
        return TokenUnavailable(self.broken or "the connection to the token process is closed")

    def fail(self, why: str) -> None:
        """Mark broken, wake every waiter with TokenUnavailable(why), and close the socket."""
        if self.broken is not None:
            return
        self.broken = why
        pending, self.pending = self.pending, {}
        for waiter in pending.values():
            waiter.error = self.unavailable()
            waiter.event.set()
        close_socket(self.sock)  # wakes the reader and any parked sender

    async def read_answers(self) -> None:
        decoder = Decoder("response", max_frame=self.max_frame)
        try:
            while self.broken is None:
                data = await receive_some(self.sock, RECEIVE_SIZE)
                if not data:
                    self.fail("the token process closed the connection")
                    return
                decoder.feed(data)
                while (response := decoder.next_message()) is not None:
                    self._deliver(response)
        except WireError as error:
            log.error("token process sent a malformed answer: %s", error)
            self.fail(f"the token process sent a malformed answer: {error}")
        except (trio.ClosedResourceError, OSError) as error:
            self.fail(f"the connection to the token process broke: {error}")
        finally:
            self.fail("the connection to the token process is closed")

    def _deliver(self, response: Response) -> None:
        waiter = self.pending.pop(response.id, None)
        if waiter is not None:
            waiter.response = response
            waiter.event.set()
        elif response.id == 0:  # the server could not parse our stream and hangs up
            self.fail(f"the token process refused our request: {response.reason}")
        elif response.id > self.highest_id:
            raise WireError(f"answer for request {response.id}, which was never sent")
        # else: an answer for a call that was cancelled while waiting; dropped.

    async def call(self, id: int, cmd: str, args: dict[str, Any]) -> Any:
        frame = encode_request(id, cmd, args, max_frame=self.max_frame)
        await trio.lowlevel.checkpoint_if_cancelled()  # cancelled before sending: nothing sent
        waiter = _Waiter()
        self.pending[id] = waiter
        self.highest_id = id
        try:
            await self._send(frame)
            await waiter.event.wait()
        finally:
            self.pending.pop(id, None)
        if waiter.error is not None:
            raise waiter.error
        response = waiter.response
        assert response is not None
        if response.ok:
            return response.result
        raise error_from(response.kind or "", response.reason or "")

    async def _send(self, frame: bytes) -> None:
        if self.broken is not None:
            raise self.unavailable()
        if not self.send_lock.locked():
            # Fast path: nobody is mid-frame, and the kernel usually takes it all at once.
            try:
                sent = self.sock.send(frame)
            except BlockingIOError:
                sent = 0
            except OSError as error:
                self.fail(f"cannot send to the token process: {error}")
                raise self.unavailable() from error
            if sent == len(frame):
                return
            frame = frame[sent:]
        await self._send_slowly(frame)

    async def _send_slowly(self, frame: bytes) -> None:
        # Shielded: a frame cut short by a cancellation would desynchronise the stream for
        # every other caller. The timeout bounds how long a stuck token can hold us.
        with trio.CancelScope(shield=True):
            with trio.move_on_after(SEND_TIMEOUT) as scope:
                try:
                    async with self.send_lock:
                        await send_all(self.sock, frame)
                except (trio.ClosedResourceError, OSError) as error:
                    self.fail(f"cannot send to the token process: {error}")
                    raise self.unavailable() from error
            if scope.cancelled_caught:
                self.fail(f"sending to the token process took over {SEND_TIMEOUT} s")
                raise self.unavailable()


class TokenClient:
    """A connection to the token process, shared by all tasks. Open with `TokenClient.open`."""

    def __init__(self, socket_path: str | Path, nursery: trio.Nursery | None = None, *,
                 connect_timeout: float = CONNECT_TIMEOUT, max_frame: int = MAX_FRAME) -> None:
        self.socket_path = Path(socket_path)
        self.connect_timeout = connect_timeout
        self.max_frame = max_frame
        self._nursery = nursery  # where reader tasks run
        self._connection: _Connection | None = None
        self._next_id = 1
        self._connect_lock = trio.Lock()
        self._closed = False

    @classmethod
    @asynccontextmanager
    async def open(cls, socket_path: str | Path, *, connect_timeout: float = CONNECT_TIMEOUT,
                   max_frame: int = MAX_FRAME) -> AsyncIterator[TokenClient]:
        """Connect to the token process at `socket_path` (raises TokenUnavailable if it is not
        there) and close the connection on the way out."""
        client = cls(socket_path, connect_timeout=connect_timeout, max_frame=max_frame)
        sock = await client._open_socket()  # before the nursery, so a failure is not grouped
        body_error: BaseException | None = None
        async with trio.open_nursery() as nursery:
            client._nursery = nursery
            client._adopt(sock)
            try:
                yield client
            except BaseException as error:
                # Re-raised outside the nursery below, so the caller sees its own exception
                # rather than an ExceptionGroup around it.
                body_error = error
            finally:
                client.close()
                nursery.cancel_scope.cancel()
        if body_error is not None:
            raise body_error

    @classmethod
    async def connect(cls, socket_path: str | Path, nursery: trio.Nursery, **options: Any) -> TokenClient:
        """A connected client whose reader tasks run in `nursery` (prefer `open`)."""
        client = cls(socket_path, nursery, **options)
        await client._connect()
        return client

    @property
    def connected(self) -> bool:
        return self._connection is not None and self._connection.broken is None

    async def call(self, cmd: str, /, **args: Any) -> Any:
        """Run `cmd` in the token with `args`; returns its result or raises its refusal.

        Raises TokenUnavailable when the token process cannot be reached (after one reconnect
        attempt) or the connection breaks before the answer arrives.
        """
        connection = self._connection
        if connection is None or connection.broken is not None:
            connection = await self._reconnect(connection)
        id = self._next_id
        self._next_id = id + 1
        return await connection.call(id, cmd, args)

    async def _reconnect(self, seen: _Connection | None) -> _Connection:
        if self._closed:
            raise TokenUnavailable("the token client is closed")
        async with self._connect_lock:
            if self._connection is seen:  # nobody reconnected while we waited for the lock
                await self._connect()
            assert self._connection is not None
            if self._connection.broken is not None:
                raise self._connection.unavailable()
            return self._connection

    async def _connect(self) -> None:
        self._adopt(await self._open_socket())

    async def _open_socket(self) -> socket.socket:
        stream = None
        with trio.move_on_after(self.connect_timeout):
            try:
                stream = await trio.open_unix_socket(str(self.socket_path))
            except OSError as error:
                raise TokenUnavailable(
                    f"cannot reach the token process at {self.socket_path}: {error.strerror or error}"
                ) from error
        if stream is None:
            raise TokenUnavailable(f"connecting to the token process at {self.socket_path} timed out")
        # A plain non-blocking socket from here on (see server.send_all for why).
        sock = socket.socket(fileno=stream.socket.detach())
        sock.setblocking(False)
        return sock

    def _adopt(self, sock: socket.socket) -> None:
        if self._closed:
            sock.close()
            raise TokenUnavailable("the token client is closed")
        assert self._nursery is not None, "use TokenClient.open or TokenClient.connect"
        connection = _Connection(sock, self.max_frame)
        self._connection = connection
        self._nursery.start_soon(connection.read_answers)

    def close(self) -> None:
        """Close the connection; calls in flight and later calls raise TokenUnavailable."""
        self._closed = True
        if self._connection is not None:
            self._connection.fail("the token client is closed")

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> TokenClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
