"""`plugshare demo`: real throwaway nodes, cleaned up however the demo ends."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from plugshare.node.demo import DOCTYPE, DemoCluster, DemoError
from plugshare.node.home import Home
from tests.node.test_watch import CLI, Output, interrupt, plugshare_cli


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def test_the_cluster_runs_real_nodes_and_leaves_nothing_behind():
    with DemoCluster(3) as cluster:
        root = cluster.root
        cluster.start_nodes()
        for node in cluster.nodes:
            assert node.process.poll() is None
            status = httpx.get(f"{node.api_url}/status", timeout=10,
                               headers={"authorization": f"Bearer {node.credential()}"}).json()
            assert status["name"] == node.name
        pids = [node.process.pid for node in cluster.nodes]
        assert [n.name for n in cluster.nodes] == ["alice", "bob", "carol"]
    assert not root.exists()
    assert all(wait_gone(pid) for pid in pids)


def test_an_interrupt_or_a_failed_step_still_cleans_up():
    with pytest.raises(KeyboardInterrupt):
        with DemoCluster(1) as cluster:
            cluster.start_nodes()
            pid = cluster.nodes[0].process.pid
            raise KeyboardInterrupt
    assert not cluster.root.exists() and wait_gone(pid)

    with pytest.raises(DemoError, match="`plugshare share invite no-such-share` on alice "
                                        "failed: "):
        with DemoCluster(1) as cluster:
            cluster.start_nodes()
            pid = cluster.nodes[0].process.pid
            cluster._plugshare(cluster.nodes[0], "share", "invite", "no-such-share")
    assert not cluster.root.exists() and wait_gone(pid)
    with pytest.raises(DemoError, match="1 to 3 nodes, not 4"):
        DemoCluster(4)


def _demo_dir(output: Output) -> Path:
    line = output.wait_for("demo: starting")
    return Path(re.search(r" in (\S+)$", line).group(1))


def test_ctrl_c_while_the_demo_starts_stops_everything(tmp_path):
    demo = plugshare_cli("demo", "--plain")
    try:
        output = Output(demo)
        root = _demo_dir(output)
        line = output.wait_for("demo: alice is running")
        alice_pid = int(re.search(r"pid (\d+)", line).group(1))
        assert interrupt(demo) == 0  # bob is still starting
        output.wait_for("demo: stopped the nodes and removed")
        assert "Traceback" not in "".join(output.errors)
        assert not root.exists()
        assert wait_gone(alice_pid)
    finally:
        interrupt(demo)


def _notes(node_dir: Path) -> list[dict]:
    home = Home(node_dir)
    api = home.runtime()["api"]
    answer = httpx.get(f"{api}/data/{DOCTYPE}/", timeout=10,
                       headers={"authorization": f"Bearer {home.owner_credential()}"})
    answer.raise_for_status()
    return answer.json()["docs"]


def test_the_demo_syncs_both_ways_and_ctrl_c_removes_it(tmp_path):
    """Needs the share commands and the replication engine wired into the node."""
    demo = plugshare_cli("demo", "--plain", "--nodes", "2")
    try:
        output = Output(demo)
        root = _demo_dir(output)
        output.wait_for("demo: bob joined 'notes'", timeout=120)
        output.wait_for("demo: watching")
        pids = [json.loads((root / name / "run.json").read_text())["pid"]
                for name in ("alice", "bob")]
        output.wait_for("doc.written")
        deadline = time.monotonic() + 60
        while True:  # each side has the other's notes
            at_alice = {note.get("from") for note in _notes(root / "alice")}
            at_bob = {note.get("from") for note in _notes(root / "bob")}
            if at_alice == at_bob == {"alice", "bob"}:
                break
            assert time.monotonic() < deadline, f"alice has {at_alice}, bob has {at_bob}"
            time.sleep(0.2)
        assert interrupt(demo) == 0
        assert "Traceback" not in "".join(output.errors)
        assert not root.exists()
        assert all(wait_gone(pid) for pid in pids)
    finally:
        interrupt(demo)


def _demo_nodes(root: Path, names=("alice", "bob"), timeout: float = 120) -> list[int]:
    """The pids of the demo's nodes once each has written its run.json."""
    deadline = time.monotonic() + timeout
    while True:
        runs = [root / name / "run.json" for name in names]
        if all(run.exists() for run in runs):
            try:
                return [json.loads(run.read_text())["pid"] for run in runs]
            except (ValueError, KeyError):
                pass  # being written
        assert time.monotonic() < deadline, f"the demo's nodes did not start in {root}"
        time.sleep(0.1)


def test_sighup_stops_the_demo_and_removes_it(tmp_path):
    """Closing the terminal sends SIGHUP: the nodes run in sessions of their own, so only the
    demo hears it, and it must clean up as for Ctrl-C."""
    demo = plugshare_cli("demo", "--plain")
    try:
        output = Output(demo)
        root = _demo_dir(output)
        output.wait_for("demo: watching", timeout=180)
        pids = _demo_nodes(root)
        demo.send_signal(signal.SIGHUP)
        assert demo.wait(60) == 0
        assert "Traceback" not in "".join(output.errors)
        assert not root.exists()
        assert all(wait_gone(pid) for pid in pids)
    finally:
        interrupt(demo)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_tmux_kill_session_stops_the_full_screen_demo(tmp_path):
    """`tmux kill-session` with the full-screen demo in it: nodes stopped, temp dir gone."""
    # A tmux server of the test's own (its socket in tmp_path): the demo inherits this
    # environment whatever other tmux servers run. A demo that ends by itself leaves its last
    # words on screen (the shell stays) so a failure can say what it printed.
    tmux = ["tmux", "-S", str(tmp_path / "tmux.sock"), "-f", "/dev/null"]
    session = "plugshare-demo-test"
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the demo's temp dir lands in tmp_path
    demo = " ".join(shlex.quote(part) for part in (sys.executable, "-c", CLI, "demo"))
    subprocess.run([*tmux, "new-session", "-d", "-s", session, "-x", "120", "-y", "36",
                    f"{demo}; echo DEMO-ENDED $?; sleep 600"], check=True, env=env)

    def screen() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-t", session],
                              capture_output=True, text=True).stdout

    def wait_for(ready, what: str, timeout: float):
        deadline = time.monotonic() + timeout
        while not (found := ready()):
            shown = screen()
            assert "DEMO-ENDED" not in shown, f"the demo ended before {what}:\n{shown}"
            assert time.monotonic() < deadline, f"no {what} in {timeout:g} s:\n{shown}"
            time.sleep(0.2)
        return found

    try:
        root = wait_for(lambda: next(tmp_path.glob("plugshare-demo-*"), None),
                        "temp dir", 60)
        wait_for(lambda: all((root / name / "run.json").exists() for name in ("alice", "bob")),
                 "running nodes", 180)
        pids = _demo_nodes(root)
        wait_for(lambda: "notes" in screen(), "share in the full-screen view", 120)
        subprocess.run([*tmux, "kill-session", "-t", session], check=True)
        assert all(wait_gone(pid) for pid in pids)
        deadline = time.monotonic() + 30
        while root.exists():
            assert time.monotonic() < deadline, f"{root} was left behind"
            time.sleep(0.1)
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


def test_nodes_stop_when_the_demo_is_killed(tmp_path):
    """SIGKILL gives the demo no chance to clean up; its nodes still must not live on."""
    demo = plugshare_cli("demo", "--plain")
    try:
        output = Output(demo)
        root = _demo_dir(output)
        output.wait_for("demo: watching", timeout=180)
        pids = _demo_nodes(root)
        demo.kill()
        demo.wait()
        assert all(wait_gone(pid) for pid in pids)
    finally:
        interrupt(demo)
        shutil.rmtree(root, ignore_errors=True)
