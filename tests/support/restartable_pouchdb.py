"""A pouchdb-server a test can stop and start again, on the same port, its data on disk.

`running_pouchdb_server()` (tests/support/pouchdb.py) serves from memory for the whole session;
a test of what a node does while its CouchDB is down needs a server of its own that it can
kill (SIGKILL: a crash, not a clean stop) and bring back with its databases intact. This one
keeps them in LevelDB files under `workdir` (pouchdb-server without `--in-memory`), with the
same launcher (the CouchDB-conforming patches) as the shared server.
"""

from __future__ import annotations

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
    STARTUP_TIMEOUT,
    PouchDBServerError,
    _answers,
    _free_loopback_port,
    _stop,
    ensure_installed,
)


class RestartablePouchDB:
    """`start()`, `kill()`, `start()` again: the same url, the same databases."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = _free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._uuid = uuid.uuid4().hex
        self._process: subprocess.Popen | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(
            {"couchdb": {"uuid": self._uuid}, "log": {"level": "warning"}}))
        (workdir / "launch.js").write_text(_LAUNCHER_JS)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> str:
        """Start the server (its port may have been taken meanwhile: then this fails)."""
        assert not self.running, "already running"
        node = shutil.which("node")
        if node is None:
            raise PouchDBServerError("node is not on PATH: install Node.js (>= 18) and npm")
        main = ensure_installed()
        with open(self.workdir / "server.out", "ab") as output:
            self._process = subprocess.Popen(
                [node, str(self.workdir / "launch.js"), str(main),
                 "--host", "127.0.0.1", "--port", str(self.port),
                 "--dir", str(self.workdir), "--config", str(self.workdir / "config.json"),
                 "--no-stdout-logs", "--no-color"],
                cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=output,
                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            if _answers(self.url, self._uuid):
                return self.url
            time.sleep(0.1)
        self.stop()
        tail = (self.workdir / "server.out").read_text(errors="replace")[-2000:]
        raise PouchDBServerError(f"pouchdb-server did not come up on {self.url}:\n{tail}")

    def kill(self) -> None:
        """SIGKILL the server's process group, as a crash would."""
        if self._process is not None and self._process.poll() is None:
            try:
                os.killpg(self._process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._process.wait()

    def stop(self) -> None:
        if self._process is not None:
            _stop(self._process)
