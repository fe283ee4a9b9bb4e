"""A stand-in token process for the transport tests and bench/token_wire.py:
python -m tests.token.echo_token --socket PATH [--no-harden]

It hardens itself, serves `EchoDispatcher` with the real `serve`, and prints `ready PATH` once
the socket accepts connections, like `python -m plugshare.token` does.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import time
from typing import Any

import trio

from plugshare.token.server import harden_process, is_dumpable, serve
from plugshare.token.wire import error_from


class EchoDispatcher:
    """Commands for exercising the transport, not the token."""

    def handle(self, cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "noop":
            return None
        if cmd == "echo":
            return args
        if cmd == "raise":  # a refusal of the given kind
            raise error_from(args["kind"], args["reason"])
        if cmd == "crash":  # a bug: must reach the client as "internal", without this text
            raise RuntimeError(f"secret detail {args.get('detail', '')}")
        if cmd == "unpackable":
            return {1, 2, 3}
        if cmd == "sleep":  # blocks the whole token, as a slow command would
            time.sleep(args["seconds"])
            return "slept"
        if cmd == "pid":
            return os.getpid()
        if cmd == "is_dumpable":
            return is_dumpable()
        if cmd == "big":
            return b"x" * args["size"]
        raise error_from("invalid_argument", f"unknown command {cmd!r}")


class SettlingDispatcher(EchoDispatcher):
    """Also numbers decisions (`decide`); `settle` writes the last number durably to a file,
    as the token's flush makes its audit entries durable."""

    def __init__(self, settle_file: str) -> None:
        self.decided = 0
        self.settle_file = settle_file

    def handle(self, cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "decide":
            self.decided += 1
            return {"decision": self.decided}
        return super().handle(cmd, args)

    def settle(self) -> None:
        fd = os.open(self.settle_file, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, str(self.decided).encode().ljust(20), 0)
            os.fsync(fd)
        finally:
            os.close(fd)


async def main(socket_path: str, harden: bool, exit_after: float | None,
               settle_file: str | None = None) -> None:
    if harden:
        harden_process()
    elif not is_dumpable():  # a uid change clears the flag; a normal process has it set
        ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
    async with trio.open_nursery() as nursery:
        dispatcher = SettlingDispatcher(settle_file) if settle_file else EchoDispatcher()
        path = await nursery.start(serve, socket_path, dispatcher)
        print(f"ready {path}", flush=True)
        if exit_after is not None:
            await trio.sleep(exit_after)
            os._exit(3)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--no-harden", action="store_true")
    parser.add_argument("--fail", help="exit at once with this message on stderr (tests start failures)")
    parser.add_argument("--hang", action="store_true", help="never get ready (tests the ready timeout)")
    parser.add_argument("--ignore-term", action="store_true", help="ignore SIGTERM (tests the kill)")
    parser.add_argument("--exit-after", type=float, help="exit with status 3 this long after ready")
    parser.add_argument("--settle-file", help="number decisions and settle them to this file")
    parser.add_argument("--as-uid", type=int, help="drop to this uid first (started as root)")
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if options.fail:
        print(options.fail, file=sys.stderr, flush=True)
        sys.exit(2)
    if options.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if options.as_uid is not None:
        os.setuid(options.as_uid)  # everything is imported already: /root is closed to this uid
    if options.hang:
        print("starting, slowly", file=sys.stderr, flush=True)
        time.sleep(3600)
    try:
        trio.run(main, options.socket, not options.no_harden, options.exit_after,
                 options.settle_file)
    except KeyboardInterrupt:
        pass
