"""Real nodes for the node/CLI tests: `plugshare init` + `plugshare run` in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import attrs
import pytest


def plugshare(home: Path, *args: str, input: str | None = None, env: dict | None = None,
              timeout: float = 60, command_prefix: Sequence[str] = ()
              ) -> subprocess.CompletedProcess:
    """Run the real command line, as a person would (`command_prefix`, e.g. `ip netns exec
    NS`, runs it somewhere else)."""
    return subprocess.run(
        [*command_prefix, sys.executable, "-m", "plugshare", "--home", str(home), *args],
        capture_output=True, text=True, input=input, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@attrs.define
class RunningNode:
    home: Path
    process: subprocess.Popen
    api_url: str
    node_id: str | None = None  # as `plugshare init` printed it
    command_prefix: Sequence[str] = attrs.field(default=(), kw_only=True)  # where it runs

    def cli(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return plugshare(self.home, *args, command_prefix=self.command_prefix, **kwargs)

    @property
    def credential(self) -> str:
        return (self.home / "owner.credential").read_text().strip()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_node(home: Path, timeout: float = 60, *,
               command_prefix: Sequence[str] = ()) -> RunningNode:
    """`plugshare run` in the background; returns once run.json names the API address.
    `command_prefix` (e.g. `ip netns exec NS`) runs it somewhere else."""
    log = open(home / "node.log", "w")
    process = subprocess.Popen(
        [*command_prefix, sys.executable, "-m", "plugshare", "--home", str(home), "run"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + timeout
    run_file = home / "run.json"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"node exited with {process.returncode}: "
                               + (home / "node.log").read_text())
        try:
            info = json.loads(run_file.read_text())
            if info.get("pid") == process.pid:
                return RunningNode(home, process, info["api"],
                                   command_prefix=tuple(command_prefix))
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("node did not start in time: " + (home / "node.log").read_text())


def init_node(home: Path, *extra: str, command_prefix: Sequence[str] = ()
              ) -> subprocess.CompletedProcess:
    done = plugshare(home, *(["--json"] if "--json" in extra else []), "init", "--api-listen", "127.0.0.1:0", "--peer-listen",
                     "127.0.0.1:0", "--no-discovery", *(a for a in extra if a != "--json"),
                     command_prefix=command_prefix)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture
def node(tmp_path):
    """A running node on the embedded store."""
    home = tmp_path / "alice"
    created = init_node(home, "--json", "--name", "alice")
    running = start_node(home)
    running.node_id = json.loads(created.stdout)["node_id"]
    yield running
    running.stop()
