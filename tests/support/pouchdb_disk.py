"""A pouchdb-server whose data lives on disk (LevelDB) and that a test can stop and start again
on the same port: a CouchDB server that goes away under a node and comes back with its data.

It runs with the same launcher (the patches that bring pouchdb-server in line with CouchDB,
see tests/support/pouchdb.py) as the in-memory one; only `--in-memory` is left out, so each
database is a LevelDB directory under `workdir`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

from tests.support.pouchdb import (
    _LAUNCHER_JS,
    PouchDBServerError,
    _answers,
    _stop,
    ensure_installed,
)
from tests.support.ports import free_loopback_port

STARTUP_TIMEOUT = 60.0


class PouchDBOnDisk:
    """`start()` / `stop(kill=...)` as often as wanted; `url` stays the same across restarts."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._uuid = uuid.uuid4().hex
        self._process: subprocess.Popen | None = None
        (workdir / "config.json").write_text(json.dumps({
            "couchdb": {"uuid": self._uuid},  # tells our server apart from any other
            "log": {"level": "warning"},
        }))
        (workdir / "launch.js").write_text(_LAUNCHER_JS)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        assert not self.running, "pouchdb-server is already running"
        node = shutil.which("node")
        if node is None:
            raise PouchDBServerError("node is not on PATH: install Node.js (>= 18) and npm")
        main = ensure_installed()
        # The port was free when chosen; after a stop it may linger in TIME_WAIT for clients,
        # which does not stop a listener (node sets SO_REUSEADDR). Retry a few times anyway.
        for _ in range(20):
            with open(self.workdir / "server.out", "ab") as output:
                self._process = subprocess.Popen(
                    [node, str(self.workdir / "launch.js"), str(main),
                     "--host", "127.0.0.1", "--port", str(self.port),
                     "--dir", str(self.workdir), "--config", str(self.workdir / "config.json"),
                     "--no-stdout-logs", "--no-color"],
                    cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=output,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while time.monotonic() < deadline and self._process.poll() is None:
                if _answers(self.url, self._uuid):
                    return
                time.sleep(0.05)
            if self._process.poll() is None:
                _stop(self._process)
                raise PouchDBServerError(f"pouchdb-server did not answer on {self.url}:\n"
                                         + self.output())
            time.sleep(0.25)  # exited: most likely the port is not released yet
        raise PouchDBServerError(f"pouchdb-server could not start on {self.url}:\n"
                                 + self.output())

    def stop(self, *, kill: bool = False) -> None:
        """Stop it: SIGTERM to its process group, or SIGKILL (nothing flushed, as a crash)."""
        if self._process is None:
            return
        if kill and self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
        else:
            _stop(self._process)
        self._process = None

    def output(self) -> str:
        try:
            return (self.workdir / "server.out").read_text(errors="replace")[-2000:]
        except FileNotFoundError:
            return ""
