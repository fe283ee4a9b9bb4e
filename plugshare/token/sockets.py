"""Non-blocking Unix-socket I/O on trio, shared by the token's server and its client.

Plain non-blocking sockets with trio's wait_readable/wait_writable rather than trio's socket
streams: a small frame then costs one send() and no trip through the scheduler, which
roughly halves a round trip."""

from __future__ import annotations

import socket as stdlib_socket

import trio


async def send_all(sock: stdlib_socket.socket, data: bytes) -> None:
    """Send all of `data` on non-blocking `sock`; returns without yielding when the kernel
    takes it at once (the usual case). Raises OSError when the peer is gone."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        view = view[sent:]


async def receive_some(sock: stdlib_socket.socket, size: int) -> bytes:
    """The next bytes from non-blocking `sock` (b"" at end of stream); always yields."""
    while True:
        await trio.lowlevel.wait_readable(sock)
        try:
            return sock.recv(size)
        except BlockingIOError:  # woken spuriously
            continue


def close_socket(sock: stdlib_socket.socket) -> None:
    """Close `sock`, waking any task waiting on it with trio.ClosedResourceError."""
    if sock.fileno() >= 0:
        trio.lowlevel.notify_closing(sock)
        sock.close()
