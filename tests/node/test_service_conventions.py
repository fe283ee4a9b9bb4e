"""A node that runs as a service: one log line per fact, log levels from the command line and
node.toml, journald's own timestamps, systemd readiness (Type=notify), and Ctrl-C in a
terminal (SIGINT to the whole process group) stopping node and token once, cleanly.

Real `plugshare run` processes; the systemd side is played by the test with a real datagram
socket (NOTIFY_SOCKET) and a real JOURNAL_STREAM naming the log file's device and inode."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w

from tests.node.cluster import wait_until
from tests.node.conftest import init_node


_launched: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_node_outlives_its_test():
    yield
    while _launched:
        process = _launched.pop()
        if process.poll() is None:  # a test that failed half-way
            process.kill()
            process.wait()


def launch(home: Path, *args: str, env: dict | None = None, new_group: bool = False,
           stdout=None) -> tuple[subprocess.Popen, Path]:
    """`plugshare run ARGS` with its log in home/node.log; returns once the API answers."""
    log_path = home / "node.log"
    log = stdout or open(log_path, "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "plugshare", "--home", str(home), "run", *args],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        start_new_session=new_group,
    )
    _launched.append(process)
    wait_until(lambda: process.poll() is not None or (home / "run.json").exists(),
               60, what="the node to start")
    assert process.poll() is None, log_path.read_text()
    return process, log_path


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    if process.poll() is not None:
        return process.returncode
    process.send_signal(sig)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


def set_log_level(home: Path, level: str) -> None:
    config = home / "node.toml"
    data = tomllib.loads(config.read_text())
    data.setdefault("log", {})["level"] = level
    config.write_text(tomli_w.dumps(data))


@pytest.fixture
def home(tmp_path) -> Path:
    home = tmp_path / "svc"
    init_node(home, "--name", "svc")
    return home


def test_the_api_address_is_logged_once(home):
    process, log = launch(home)
    stop(process)
    text = log.read_text()
    url = re.search(r"http://127\.0\.0\.1:\d+", text).group(0)
    assert text.count(url) == 1, text
    assert "Running on" not in text, text


def token_info(home: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "plugshare", "--home", str(home), "status",
                           "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout
    return json.loads(done.stdout)["token"]


def test_ctrl_c_meant_for_the_terminal_does_not_stop_the_token_child(home):
    """A terminal's Ctrl-C sends SIGINT to the whole foreground process group, the token
    child included. The node stops its child itself: the child must not exit on its own
    (the node would see it die and restart it while stopping)."""
    process, log = launch(home)
    before = token_info(home)
    os.kill(before["pid"], signal.SIGINT)
    time.sleep(1)  # ample for a child that obeys SIGINT to exit and be restarted
    after = token_info(home)
    assert (after["pid"], after["restarts"]) == (before["pid"], 0), log.read_text()
    stop(process)


def test_ctrl_c_in_a_terminal_stops_node_and_token_once(home):
    process, log = launch(home, new_group=True)
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=30) == 0
    text = log.read_text()
    assert "restarting" not in text, text
    assert re.search(r"token process pid \d+ stopped", text), text
    assert text.rstrip().endswith("node stopped"), text


def test_quiet_logs_warnings_only_and_verbose_logs_debug(home, tmp_path):
    process, log = launch(home, "-q")
    stop(process)
    quiet = log.read_text()
    assert " INFO " not in quiet and "serving the local API" not in quiet, quiet
    process, log = launch(home, "-v")
    stop(process)
    assert " DEBUG " in log.read_text()


def test_the_log_level_comes_from_node_toml_and_the_flag_wins(home):
    set_log_level(home, "warning")
    process, log = launch(home)
    stop(process)
    assert " INFO " not in log.read_text()
    process, log = launch(home, "-v")
    stop(process)
    assert " INFO " in log.read_text()


def test_a_bad_log_level_in_node_toml_is_a_clear_error(home):
    set_log_level(home, "loud")
    done = subprocess.run([sys.executable, "-m", "plugshare", "--home", str(home), "run"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "[log] level" in done.stderr and "loud" in done.stderr, done.stderr


def test_under_journald_lines_carry_no_timestamp_of_their_own(home):
    """systemd sets JOURNAL_STREAM to the device:inode of the stream it connected to stderr;
    journald stamps each line, so a second timestamp is noise."""
    log_path = home / "node.log"
    with open(log_path, "w") as log:
        st = os.fstat(log.fileno())
        process, _ = launch(home, env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
                            stdout=log)
        stop(process)
    lines = [line for line in log_path.read_text().splitlines() if "plugshare." in line]
    assert lines
    assert not any(re.match(r"\d{4}-\d\d-\d\d", line) for line in lines), lines


def test_a_journal_stream_that_is_not_stderr_keeps_timestamps(home):
    """An inherited JOURNAL_STREAM (stderr redirected elsewhere) must not change the format."""
    process, log = launch(home, env={"JOURNAL_STREAM": "1:1"})
    stop(process)
    assert re.search(r"^\d{4}-\d\d-\d\d .*plugshare\.", log.read_text(), re.M)


def test_readiness_and_stopping_are_notified_to_systemd(home, tmp_path):
    """Type=notify: READY=1 once the API answers, STOPPING=1 when it begins to stop."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(60)
        process, log = launch(home, env={"NOTIFY_SOCKET": path})
        try:
            ready = sock.recv(4096).decode()
            assert "READY=1" in ready.split("\n"), ready
            assert (home / "run.json").exists()
            status = subprocess.run([sys.executable, "-m", "plugshare", "--home", str(home),
                                     "status", "--json"], capture_output=True, text=True,
                                    timeout=60)
            assert status.returncode == 0, status.stdout
            process.send_signal(signal.SIGTERM)
            stopping = sock.recv(4096).decode()
            assert "STOPPING=1" in stopping.split("\n"), stopping
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_an_abstract_notify_socket_is_reached(home):
    """NOTIFY_SOCKET may name an abstract socket ('@name')."""
    name = f"plugshare-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(60)
        process, _ = launch(home, env={"NOTIFY_SOCKET": "@" + name})
        try:
            assert "READY=1" in sock.recv(4096).decode()
        finally:
            stop(process)


def test_the_log_names_peers_by_node_id(tmp_path):
    """A person reads node ids (`plugshare peers`, `share show`), never raw fingerprints."""
    from tests.node.cluster import Cluster, share_between

    cluster = Cluster(tmp_path / "c")
    try:
        alice, bob = cluster.add("alice"), cluster.add("bob")
        share_between(alice, [bob], name="notes", doctype="io.notes")
        wait_until(lambda: bob.node_id in alice.log(), 30, what="alice to log bob's link")
        bob.stop()
        wait_until(lambda: "closed" in alice.log() or "ended" in alice.log(), 30,
                   what="alice to log the link's end")
        assert not re.search(r"\b[0-9a-f]{64}\b", alice.log()), alice.log()
    finally:
        cluster.close()
