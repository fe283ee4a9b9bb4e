"""`plugshare demo`: live sync to look at. Two or three throwaway nodes on loopback in a temp
dir, a share of `io.demo.notes` between them, a note written on each node every second, and
`watch` on all of them. Ctrl-C (or SIGTERM) stops the writers and the nodes and removes the
temp dir, whatever state the demo was in.

The nodes are real: each is `plugshare init` + `plugshare run` in a subprocess, and the share
is set up with the same commands a person would type.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import attrs
import click

from plugshare.errors import PlugshareError
from plugshare.node.events import ApiTarget
from plugshare.node.home import Home

NAMES = ("alice", "bob", "carol")
SHARE = "notes"
DOCTYPE = "io.demo.notes"
START_TIMEOUT_S = 60.0
COMMAND_TIMEOUT_S = 120.0  # `share accept` waits for the initial sync
STOP_TIMEOUT_S = 10.0


class DemoError(PlugshareError):
    """A step of the demo failed (a node did not start, a share command failed)."""


class DemoStopped(Exception):
    """Ctrl-C or SIGTERM came while the demo was being set up."""


@attrs.define
class DemoNode:
    name: str
    home: Path
    process: subprocess.Popen | None = None
    api_url: str | None = None

    def target(self) -> ApiTarget:
        return ApiTarget.of_home(Home(self.home), label=self.name)

    def credential(self) -> str:
        return Home(self.home).owner_credential()


class DemoCluster:
    """Throwaway nodes in a temp dir. Leaving the `with` block — normally, on an error or on
    Ctrl-C — stops the writers and the nodes and removes the dir."""

    def __init__(self, count: int = 2, *, say: Callable[[str], None] = lambda _: None):
        if not 1 <= count <= len(NAMES):
            raise DemoError(f"the demo runs 1 to {len(NAMES)} nodes, not {count}")
        self.say = say
        self.root = Path(tempfile.mkdtemp(prefix="plugshare-demo-"))
        self.nodes = [DemoNode(name, self.root / name) for name in NAMES[:count]]
        self._stop_requested = threading.Event()
        self._stop_writers = threading.Event()
        self._writers: list[threading.Thread] = []

    def request_stop(self) -> None:
        """Make the set-up stop at the next step or wait (safe in a signal handler: a signal
        never interrupts the demo halfway through starting a process)."""
        self._stop_requested.set()

    @property
    def stopping(self) -> bool:
        return self._stop_requested.is_set()

    def check_stop(self) -> None:
        """Raise DemoStopped if a stop was requested."""
        if self.stopping:
            raise DemoStopped()

    def __enter__(self) -> DemoCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- nodes ----------------------------------------------------------------------------

    def start_nodes(self) -> None:
        self.say(f"demo: starting {len(self.nodes)} nodes in {self.root}")
        for node in self.nodes:
            self.check_stop()
            self._plugshare(node, "init", "--name", node.name, "--api-listen", "127.0.0.1:0",
                            "--peer-listen", "127.0.0.1:0", "--no-discovery")
            self.check_stop()
            log = open(node.home / "node.log", "w")
            # A session of its own: the terminal's Ctrl-C reaches the demo only, which then
            # stops the nodes in order.
            node.process = subprocess.Popen(
                [sys.executable, "-m", "plugshare", "--home", str(node.home), "run"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_stop_with_parent)
            log.close()
            node.api_url = self._wait_until_running(node)
            self.say(f"demo: {node.name} is running (pid {node.process.pid}, "
                     f"API {node.api_url})")

    def _wait_until_running(self, node: DemoNode) -> str:
        home = Home(node.home)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            self.check_stop()
            if node.process.poll() is not None:
                raise DemoError(f"node {node.name} exited with {node.process.returncode}: "
                                f"{_tail(node.home / 'node.log')}")
            runtime = home.runtime()
            if runtime and runtime.get("pid") == node.process.pid and runtime.get("api"):
                return runtime["api"]
            time.sleep(0.05)
        raise DemoError(f"node {node.name} did not start within {START_TIMEOUT_S:g} s: "
                        f"{_tail(node.home / 'node.log')}")

    # -- the share ------------------------------------------------------------------------

    def create_share(self) -> None:
        """The first node creates the share, invites every other node, and they accept."""
        owner, *members = self.nodes
        self._plugshare(owner, "share", "create", SHARE, "--doctype", DOCTYPE)
        self.say(f"demo: {owner.name} created share {SHARE!r} of {DOCTYPE}")
        for member in members:
            invited = self._plugshare(owner, "--json", "share", "invite", SHARE)
            try:
                code = json.loads(invited)["code"]
            except (ValueError, KeyError, TypeError):
                raise DemoError(f"`share invite --json` printed no code: {invited[:200]!r}")
            self._plugshare(member, "share", "accept", code)
            self.say(f"demo: {member.name} joined {SHARE!r}")

    # -- writers --------------------------------------------------------------------------

    def start_writers(self, interval: float = 1.0) -> None:
        """On each node, a note every `interval` seconds through its API."""
        for node in self.nodes:
            thread = threading.Thread(target=self._write_notes, args=(node, interval),
                                      name=f"demo-writer-{node.name}", daemon=True)
            thread.start()
            self._writers.append(thread)
        self.say(f"demo: writing a note on each node every {interval:g} s")

    def _write_notes(self, node: DemoNode, interval: float) -> None:
        import httpx

        headers = {"authorization": f"Bearer {node.credential()}"}
        with httpx.Client(timeout=5.0, headers=headers) as client:
            n = 0
            while not self._stop_writers.wait(interval):
                n += 1
                note = {"title": f"note {n} from {node.name}", "from": node.name, "n": n,
                        "written_at": time.time()}
                try:
                    url = node.target().locate()[0]
                    client.post(f"{url}/data/{DOCTYPE}/", json=note)
                except (httpx.HTTPError, PlugshareError):
                    pass  # the node is away: `watch` shows it; the next note tries again

    # -- the end --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the writers and the nodes, remove the temp dir."""
        self._stop_requested.set()
        self._stop_writers.set()
        for thread in self._writers:
            thread.join(10)
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.terminate()
        for node in self.nodes:
            if node.process is None:
                continue
            try:
                node.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def _plugshare(self, node: DemoNode, *args: str) -> str:
        """Run the real command line for `node`; its stdout, or a DemoError saying why.
        A stop request kills the command and raises DemoStopped."""
        self.check_stop()
        what = f"`plugshare {' '.join(args)}` on {node.name}"
        command = [sys.executable, "-m", "plugshare", "--home", str(node.home), *args]
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=err, text=True, start_new_session=True)
            deadline = time.monotonic() + COMMAND_TIMEOUT_S
            try:
                while process.poll() is None:
                    self.check_stop()
                    if time.monotonic() > deadline:
                        raise DemoError(f"{what} took over {COMMAND_TIMEOUT_S:g} s")
                    time.sleep(0.02)
            finally:
                if process.poll() is None:
                    process.kill()
                process.wait()  # a command killed halfway must be gone before the cleanup
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        if process.returncode != 0:
            why = stderr.strip().splitlines()[-1:] or [f"exit {process.returncode}"]
            raise DemoError(f"{what} failed: {why[0]}")
        return stdout


def _tail(log: Path, lines: int = 3) -> str:
    try:
        return " | ".join(log.read_text().strip().splitlines()[-lines:]) or "(no output)"
    except OSError:
        return "(no log)"


def _stop_with_parent() -> None:
    """In a node's child process: SIGTERM it when the demo dies, even by SIGKILL (which
    leaves the demo no chance to stop it), so no node outlives the demo."""
    if sys.platform == "linux":
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


# SIGHUP: the terminal closed (or `tmux kill-session`); the nodes, in sessions of their own,
# do not hear it, so the demo must stop them.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
VIEW_EXIT_GRACE = 5.0  # seconds the full-screen view has to return after a stop signal


class _ExitWatchdog:
    """After a stop signal, the terminal view must return within VIEW_EXIT_GRACE. Its
    shutdown can block for good when the terminal vanished with output still queued (seen
    with `tmux kill-server`: textual's writer thread and its queue wait on each other); then
    this stops the nodes, removes the temp dir and ends the process from its own thread."""

    def __init__(self, cluster: DemoCluster):
        self._cluster = cluster
        self._timer: threading.Timer | None = None

    def arm(self) -> None:
        if self._timer is None:
            self._timer = threading.Timer(VIEW_EXIT_GRACE, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _expire(self) -> None:
        self._cluster.close()
        os._exit(0)


@contextlib.contextmanager
def _signals_stop(cluster: DemoCluster):
    """While set up and torn down, SIGINT/SIGTERM/SIGHUP only ask the cluster to stop."""
    def handler(signum, frame) -> None:
        cluster.request_stop()

    previous = {signum: signal.signal(signum, handler)
                for signum in STOP_SIGNALS}
    try:
        yield lambda: [signal.signal(signum, handler) for signum in previous]
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@click.command()
@click.option("--nodes", type=click.IntRange(2, 3), default=2, show_default=True,
              help="How many throwaway nodes.")
@click.option("--plain", is_flag=True, help="Print the events as lines instead of the "
                                              "full-screen view.")
def demo(nodes: int, plain: bool) -> None:
    """Watch live sync: throwaway nodes on loopback share notes, each writes one every
    second. Ctrl-C stops everything and removes the temp dir (--home is not used)."""
    from plugshare.node.watch import open_watch

    cluster = DemoCluster(nodes, say=click.echo)
    with _signals_stop(cluster) as take_signals_back:
        try:
            with cluster:
                cluster.start_nodes()
                cluster.create_share()
                cluster.start_writers()
                cluster.check_stop()
                click.echo("demo: watching (Ctrl-C stops the demo)")
                # The view handles Ctrl-C/SIGTERM itself (and returns); then the clean-up
                # needs them back so a second Ctrl-C does not cut it short.
                watchdog = _ExitWatchdog(cluster)
                try:
                    open_watch([node.target() for node in cluster.nodes], plain=plain,
                               recent=0, stop_requested=lambda: cluster.stopping,
                               on_stop_signal=watchdog.arm)
                finally:
                    watchdog.disarm()
                    take_signals_back()
        except DemoStopped:
            pass
    try:
        click.echo(f"demo: stopped the nodes and removed {cluster.root}")
    except OSError:
        pass  # the terminal is gone (SIGHUP): nobody to tell
