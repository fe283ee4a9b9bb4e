"""Runs the token process as a child of the node: start it, wait until it serves, restart it
when it dies, stop it on the way out.

The child is `python -m <module> *argv`; it announces readiness with one stdout line
``ready <socket_path>``. Its stderr is relayed to the log ("plugshare.token.child") and its
tail kept, so a child that fails to start explains why in the TokenUnavailable raised here.
Restarts back off exponentially (0.1 s doubling to 5 s) while the child keeps dying young.
"""

from __future__ import annotations

import collections
import logging
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from .wire import TokenUnavailable

__all__ = ["TokenProcess"]

log = logging.getLogger("plugshare.token.supervisor")
child_log = logging.getLogger("plugshare.token.child")

READY_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
BACKOFF_MIN = 0.1
BACKOFF_MAX = 5.0
STABLE_AFTER = 10.0  # a child that lived this long resets the back-off
_TAIL_LINES = 40


class _Child:
    """One started child process and the tasks draining its pipes."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self.stderr_done = trio.Event()
        self.ready_line: trio.MemorySendChannel[str | None]
        self.ready_line, self.ready_lines = trio.open_memory_channel[str | None](1)

    def tail(self) -> str:
        return "\n".join(self.stderr_tail) or "(nothing on stderr)"

    async def drain_stdout(self) -> None:
        """Hand the first line to the starter, then keep the pipe empty."""
        first = True
        async for line in _lines(self.process.stdout):
            if first:
                first = False
                self.ready_line.send_nowait(line)
            else:
                child_log.info("stdout: %s", line)
        if first:
            self.ready_line.send_nowait(None)  # EOF before any line
        await _close(self.process.stdout)

    async def drain_stderr(self) -> None:
        try:
            async for line in _lines(self.process.stderr):
                self.stderr_tail.append(line)
                child_log.info("%s", line)
        finally:
            self.stderr_done.set()
            await _close(self.process.stderr)


async def _close(stream: trio.abc.AsyncResource | None) -> None:
    if stream is not None:
        await trio.aclose_forcefully(stream)


async def _lines(stream: trio.abc.ReceiveStream | None) -> AsyncIterator[str]:
    if stream is None:
        return
    buffer = b""
    try:
        while data := await stream.receive_some(65536):
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                yield line.decode("utf-8", "replace").rstrip("\r")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    if buffer:
        yield buffer.decode("utf-8", "replace")


class TokenProcess:
    """The token process, kept running: ``async with TokenProcess(argv, path).run() as proc``."""

    def __init__(self, argv: Sequence[str], socket_path: str | Path, *, module: str = "plugshare.token",
                 ready_timeout: float = READY_TIMEOUT, stop_timeout: float = STOP_TIMEOUT) -> None:
        self.command = [sys.executable, "-m", module, *argv]
        self.socket_path = Path(socket_path)
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.restarts = 0
        self._child: _Child | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        """The current child's pid (None between a death and the restart)."""
        child = self._child
        return child.process.pid if child is not None and child.process.returncode is None else None

    @asynccontextmanager
    async def run(self) -> AsyncIterator[TokenProcess]:
        """Start the child (raises TokenUnavailable if it does not get ready), keep it running
        while the block runs, and stop it afterwards."""
        error: BaseException | None = None
        async with trio.open_nursery() as nursery:
            try:
                await self._start(nursery)
                nursery.start_soon(self._keep_running, nursery)
                yield self
            except BaseException as raised:
                # Re-raised outside the nursery below, so the caller sees this exception
                # rather than an ExceptionGroup around it.
                error = raised
            finally:
                self._stopping = True
                with trio.CancelScope(shield=True):
                    await self._stop()
                nursery.cancel_scope.cancel()
        if error is not None:
            raise error

    async def _start(self, nursery: trio.Nursery) -> None:
        process = await trio.lowlevel.open_process(
            self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        child = _Child(process)
        self._child = child
        nursery.start_soon(child.drain_stdout)
        nursery.start_soon(child.drain_stderr)
        line: str | None = None
        try:
            with trio.move_on_after(self.ready_timeout) as timeout:
                line = await child.ready_lines.receive()
        except BaseException:  # cancelled while it starts: leave no orphan behind
            with trio.CancelScope(shield=True):
                await self._kill(child)
            raise
        if line is not None and line.startswith("ready "):
            if Path(line[len("ready "):]) != self.socket_path:
                log.warning("token process says %r, expected ready %s", line, self.socket_path)
            log.info("token process pid %d ready on %s", process.pid, self.socket_path)
            return
        why = f"was not ready after {self.ready_timeout} s" if timeout.cancelled_caught else (
            f"printed {line!r} instead of 'ready <path>'" if line is not None else "exited before it was ready")
        await self._kill(child)
        with trio.move_on_after(1):
            await child.stderr_done.wait()
        raise TokenUnavailable(
            f"the token process ({' '.join(self.command[1:])}) {why}; "
            f"exit status {process.returncode}; its stderr ends with:\n{child.tail()}"
        )

    async def _keep_running(self, nursery: trio.Nursery) -> None:
        delay = BACKOFF_MIN
        while True:
            child = self._child
            assert child is not None
            started = trio.current_time()
            await child.process.wait()
            if self._stopping:
                return
            if trio.current_time() - started >= STABLE_AFTER:
                delay = BACKOFF_MIN
            log.warning("token process pid %d exited with status %s; restarting in %.1f s",
                        child.process.pid, child.process.returncode, delay)
            while True:
                await trio.sleep(delay)
                if self._stopping:
                    return
                delay = min(delay * 2, BACKOFF_MAX)
                self.restarts += 1
                try:
                    await self._start(nursery)
                    break
                except (TokenUnavailable, OSError) as error:  # OSError: could not spawn
                    if self._stopping:
                        return  # stopped while this child was starting: nothing went wrong
                    log.error("token process restart %d failed: %s; next try in %.1f s",
                              self.restarts, error, delay)

    async def _stop(self) -> None:
        child = self._child
        if child is None or child.process.returncode is not None:
            return
        child.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(self.stop_timeout):
            await child.process.wait()
            log.info("token process pid %d stopped", child.process.pid)
            return
        log.warning("token process pid %d ignored SIGTERM for %.0f s; killing it",
                    child.process.pid, self.stop_timeout)
        await self._kill(child)

    async def _kill(self, child: _Child) -> None:
        if child.process.returncode is None:
            child.process.kill()
        await child.process.wait()
