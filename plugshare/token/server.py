"""The token process's side of the token protocol: a trio Unix-socket server that runs every
request through a dispatcher, and the process hardening that keeps keys out of other eyes.

Access control is the socket itself: the file is created 0600, and every connection's peer
credentials (SO_PEERCRED) must carry this process's uid. The server trusts nothing a client
sends: a malformed stream gets one "bad_request" answer and is hung up on, a failing command
gets an error answer, and neither affects any other connection.

The dispatcher's `handle(cmd, args)` is synchronous and runs on the event loop, so commands run
one at a time in arrival order, across all connections: the token's state needs no locking.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import resource
import select
import socket as stdlib_socket
import stat
import struct
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import trio

from plugshare.errors import PlugshareError

from .errors import TokenError
from .sockets import close_socket, receive_some, send_all
from .wire import (
    INTERNAL_REASON,
    MAX_FRAME,
    Decoder,
    Request,
    WireError,
    encode_error,
    encode_result,
    error_kind,
)

__all__ = ["MAX_CONNECTIONS", "Dispatcher", "close_socket", "harden_process", "is_dumpable", "receive_some",
           "send_all", "serve"]

SETTLE_EVERY = 0.02  # seconds: the longest a busy token holds answers to settle them together
NOT_DURABLE_REASON = "the token could not make its decision durable"
log = logging.getLogger("plugshare.token.server")

MAX_CONNECTIONS = 64
RECEIVE_SIZE = 256 * 1024
FLUSH_SIZE = 1024 * 1024
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
# accept() errors that mean "out of resources for now", not "the listener is broken".
_ACCEPT_TRANSIENT = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


class Dispatcher(Protocol):
    """The command set: runs one command, returns a msgpack-able result, raises TokenError
    subclasses for refusals (anything else is a bug, answered as "internal")."""

    def handle(self, cmd: str, args: dict[str, Any]) -> Any: ...


# --- process hardening -------------------------------------------------------------------

_PR_GET_DUMPABLE = 3
_PR_SET_DUMPABLE = 4
_hardening_warned = False


def _prctl(option: int, arg: int = 0) -> int | None:
    """prctl(2) through libc, or None where there is no such call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    result = prctl(option, arg, 0, 0, 0)
    if result < 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")
    return result


def _warn_once(message: str) -> None:
    global _hardening_warned
    if not _hardening_warned:
        _hardening_warned = True
        log.warning("process hardening incomplete: %s", message)


def harden_process() -> None:
    """Make this process non-dumpable (no ptrace or /proc/<pid>/mem by the same uid, and no
    core dumps) and set the core-file limit to 0. Logs once where that is not supported."""
    try:
        if _prctl(_PR_SET_DUMPABLE, 0) is None:
            _warn_once(f"prctl(PR_SET_DUMPABLE) is not available on {sys.platform}")
    except OSError as error:
        _warn_once(f"prctl(PR_SET_DUMPABLE, 0) failed: {error}")
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as error:
        _warn_once(f"cannot set RLIMIT_CORE to 0: {error}")


def is_dumpable() -> bool:
    """Whether this process may be dumped or traced by its uid (True where unknown)."""
    try:
        result = _prctl(_PR_GET_DUMPABLE)
    except OSError:
        return True
    return True if result is None else result != 0


# --- the listening socket ----------------------------------------------------------------


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead token process; refuse anything else at `path`."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise PlugshareError(f"{path} exists and is not a socket; move it away or pick another path")
    probe = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        os.unlink(path)  # nobody listens: stale
        return
    finally:
        probe.close()
    raise PlugshareError(f"another token process is already serving on {path}; stop it first")


def _bind(path: Path) -> stdlib_socket.socket:
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise PlugshareError(f"socket path {path} is longer than {_SUN_PATH_MAX} bytes; use a shorter one")
    _remove_stale_socket(path)
    sock = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o177)  # the file is born 0600: no window where others can connect
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _peer_credentials(sock: stdlib_socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of the Unix socket `sock`."""
    pid, uid, _gid = _UCRED.unpack(
        sock.getsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_PEERCRED, _UCRED.size)
    )
    return pid, uid


# --- serving -----------------------------------------------------------------------------


def _answer(dispatcher: Dispatcher, request: Request, max_frame: int) -> bytes:
    """The frame answering one request; never raises for anything the dispatcher does."""
    try:
        result = dispatcher.handle(request.cmd, request.args)
    except TokenError as error:
        kind, reason = error_kind(error), str(error)
        try:
            return encode_error(request.id, kind, reason, max_frame=max_frame)
        except WireError:  # a reason over the frame cap
            return encode_error(request.id, kind, reason[:1000] + "...")
    except Exception:
        log.exception("command %r (request %d) failed", request.cmd, request.id)
        return encode_error(request.id, "internal", INTERNAL_REASON)
    try:
        return encode_result(request.id, result, max_frame=max_frame)
    except WireError as error:
        log.error("command %r (request %d): cannot send its result: %s", request.cmd, request.id, error)
        return encode_error(request.id, "internal", INTERNAL_REASON)


async def _serve_connection(sock: stdlib_socket.socket, dispatcher: Dispatcher, max_frame: int) -> None:
    decoder = Decoder("request", max_frame=max_frame)
    group = _AnswerGroup()
    while True:
        data = await receive_some(sock, RECEIVE_SIZE)
        if not data:
            return
        if not group.answers:
            group.started = time.monotonic()
        try:
            decoder.feed(data)
            while (request := decoder.next_message()) is not None:
                group.add(request.id, _answer(dispatcher, request, max_frame))
                # a pipelining client must not make us hoard answers past FLUSH_SIZE
                if group.size >= FLUSH_SIZE:
                    await _settle_and_send(sock, dispatcher, group)
        except WireError as error:
            log.warning("closing a connection that sent a malformed request: %s", error)
            group.add(0, encode_error(0, "bad_request", str(error)))
            await _settle_and_send(sock, dispatcher, group)
            return
        # Group commit: while more requests are already waiting (a sync in full flow),
        # decide them too and settle once for all, holding answers at most SETTLE_EVERY.
        if group.answers and (not _readable_now(sock)
                              or time.monotonic() - group.started >= SETTLE_EVERY):
            await _settle_and_send(sock, dispatcher, group)


class _AnswerGroup:
    """Answers decided but not yet sent (their decisions not yet settled)."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.answers: list[bytes] = []
        self.size = 0
        self.started = 0.0

    def add(self, request_id: int, answer: bytes) -> None:
        self.ids.append(request_id)
        self.answers.append(answer)
        self.size += len(answer)

    def take(self) -> tuple[list[int], list[bytes]]:
        taken = self.ids, self.answers
        self.ids, self.answers, self.size = [], [], 0
        return taken


async def _settle_and_send(sock: stdlib_socket.socket, dispatcher: Dispatcher,
                           group: _AnswerGroup) -> None:
    """Make durable what the group's answers decided, then send them: an audit entry is on
    disk before the answer it justifies leaves the token. One checkpoint first lets other
    connections decide what they already received, so that one flush covers them too (theirs
    then finds nothing left to flush). If the flush fails, each answer becomes an internal
    error: a decision that is not durable is not announced."""
    ids, answers = group.take()
    await trio.lowlevel.checkpoint()
    if not _settle(dispatcher):
        answers = [encode_error(request_id, "internal", NOT_DURABLE_REASON) for request_id in ids]
    await send_all(sock, answers[0] if len(answers) == 1 else b"".join(answers))


def _readable_now(sock: stdlib_socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def _settle(dispatcher: Dispatcher) -> bool:
    """Let the dispatcher make durable what the answers about to leave decided (the token
    flushes its audit log and state): once per group of requests that arrived together.
    False (and logged) if it failed; the next command's flush tries again."""
    settle = getattr(dispatcher, "settle", None)
    if settle is None:
        return True
    try:
        settle()
    except Exception:
        log.exception("the token could not make its state durable")
        return False
    return True


class _Server:
    def __init__(self, dispatcher: Dispatcher, max_connections: int, max_frame: int) -> None:
        self.dispatcher = dispatcher
        self.max_connections = max_connections
        self.max_frame = max_frame
        self.connections = 0

    def admit(self, sock: stdlib_socket.socket) -> bool:
        try:
            pid, uid = _peer_credentials(sock)
        except OSError as error:
            log.warning("refused a connection: cannot read its peer credentials: %s", error)
            return False
        if uid != os.getuid():
            log.warning("refused a connection from pid %d running as uid %d (only uid %d may connect)",
                        pid, uid, os.getuid())
            return False
        if self.connections >= self.max_connections:
            log.warning("refused a connection from pid %d: already %d connections", pid, self.connections)
            return False
        return True

    async def handle(self, sock: stdlib_socket.socket) -> None:
        self.connections += 1
        try:
            await _serve_connection(sock, self.dispatcher, self.max_frame)
        except OSError:
            pass  # the client went away (reset, broken pipe)
        except Exception:  # a server bug must cost one connection, never the process
            log.exception("connection handler failed")
        finally:
            self.connections -= 1
            close_socket(sock)


async def _accept(listen: stdlib_socket.socket) -> stdlib_socket.socket | None:
    await trio.lowlevel.wait_readable(listen)
    try:
        conn, _ = listen.accept()
    except BlockingIOError:
        return None
    except OSError as error:
        if error.errno not in _ACCEPT_TRANSIENT:
            raise
        log.error("accept failed (%s); pausing 0.1 s", error)
        await trio.sleep(0.1)
        return None
    conn.setblocking(False)
    return conn


async def serve(
    socket_path: str | Path,
    dispatcher: Dispatcher,
    *,
    max_connections: int = MAX_CONNECTIONS,
    max_frame: int = MAX_FRAME,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the token protocol on the Unix socket `socket_path` until cancelled.

    `task_status.started` is called with the path once the socket accepts connections. The
    socket file is removed on the way out.
    """
    path = Path(socket_path)
    listen = _bind(path)
    identity = os.stat(path)
    server = _Server(dispatcher, max_connections, max_frame)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started(path)
            while True:
                conn = await _accept(listen)
                if conn is None:
                    continue
                if server.admit(conn):
                    nursery.start_soon(server.handle, conn)
                else:
                    conn.close()
    finally:
        close_socket(listen)
        _unlink_if_ours(path, identity)


def _unlink_if_ours(path: Path, identity: os.stat_result) -> None:
    """Remove the socket file unless another process has replaced it meanwhile."""
    try:
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) == (identity.st_dev, identity.st_ino):
            os.unlink(path)
    except OSError:
        pass
