"""The simulated network itself (tests/support/netlab.py): NAT keeps homes closed to the
outside, lets them out, a LAN is direct, and nothing is left behind."""

from __future__ import annotations

import errno
import select
import socket
import subprocess
import sys

import pytest
import trio

from tests.node.cluster import wait_until
from tests.support.netlab import (PREFIX, entered_netns, lab_namespaces, netlab, open_in,
                                  require_netlab, run_in)


@pytest.fixture
def lab():
    with netlab(hosts_per_home=(2, 1)) as made:
        yield made


def _listen(host) -> socket.socket:
    with entered_netns(host.ns):
        return socket.create_server((host.address, 0))


def _dial(ns: str, address: tuple[str, int]) -> socket.socket:
    """A TCP connection being opened from namespace `ns` (non-blocking: it may never open)."""
    with entered_netns(ns):
        sock = socket.socket()
    sock.setblocking(False)
    assert sock.connect_ex(address) == errno.EINPROGRESS
    return sock


def _still_opening(sock: socket.socket) -> bool:
    """Neither connected nor refused: its SYNs get no answer."""
    _, writable, _ = select.select([], [sock], [], 0)
    return not writable


def test_a_server_at_home_is_unreachable_from_the_other_home_and_from_public(lab):
    a1 = lab.host("a1")
    listener = _listen(a1)
    port = listener.getsockname()[1]
    home_a = lab.homes["a"]
    attempts = [(lab.host("b1").ns, (a1.address, port)),       # routed to it, and NATed out of B
                (lab.public.ns, (a1.address, port)),           # public routes A's LAN to A
                (lab.public.ns, (home_a.wan_address, port))]   # no port is forwarded
    for ns, address in attempts:
        before = lab.inbound_drops("a")
        with _dial(ns, address) as sock:
            wait_until(lambda: lab.inbound_drops("a") > before, 60,
                       what=f"router A dropping the connection from {ns} to {address}")
            assert _still_opening(sock), f"{ns} reached {address} through home A's router"
    listener.close()


def test_two_hosts_on_one_lan_reach_each_other_directly(lab):
    a1, a2 = lab.host("a1"), lab.host("a2")
    with _listen(a1) as listener:
        with entered_netns(a2.ns), socket.create_connection(
                listener.getsockname()[:2], timeout=60) as client:
            client.sendall(b"hello")
            accepted, peer = listener.accept()
            with accepted:
                assert accepted.recv(5) == b"hello"
    # Its own address, not a router's: nothing translated on the LAN.
    assert peer[0] == a2.address
    assert lab.inbound_drops("a") == 0


_ECHO_PEER = """
import socket, sys
with socket.create_server((sys.argv[1], 0)) as server:
    print(server.getsockname()[1], flush=True)
    conn, peer = server.accept()
    with conn:
        conn.sendall(peer[0].encode())
"""

_DIAL = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60) as sock:
    print(sock.recv(100).decode())
"""


async def test_home_reaches_public_through_its_router_nat(lab):
    a1, home_a = lab.host("a1"), lab.homes["a"]
    server = await open_in(lab.public.ns, [sys.executable, "-c", _ECHO_PEER, lab.public.address],
                           stdout=subprocess.PIPE)
    try:
        port = int((await server.stdout.receive_some(100)).decode().strip())
        dialled = await run_in(a1.ns, [sys.executable, "-c", _DIAL, lab.public.address, str(port)],
                               capture_stdout=True)
    finally:
        server.kill()
        await server.wait()
    # Public saw the router's WAN address, not a1's private one: masqueraded.
    assert dialled.stdout.decode().strip() == home_a.wan_address
    assert lab.inbound_drops("a") == 0  # the answers came back in as established


def _host_links() -> set[str]:
    done = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True)
    return {line.split(":")[1].strip() for line in done.stdout.splitlines()}


def test_teardown_leaves_no_namespace_veth_or_process_even_when_the_test_fails():
    require_netlab()
    links_before = _host_links()

    async def start_sleeper(ns: str) -> int:
        process = await open_in(ns, ["sleep", "600"])
        return process.pid

    with pytest.raises(RuntimeError, match="the test failed"):
        with netlab() as lab:
            made = lab.namespaces
            assert sorted(lab_namespaces(lab.tag)) == sorted(made)
            pid = trio.run(start_sleeper, lab.host("b1").ns)
            raise RuntimeError("the test failed")
    assert lab_namespaces(lab.tag) == []
    assert _host_links() == links_before, "a veth or bridge landed in the host's namespace"
    assert not _running(pid), "a process started in the lab outlived it"


def _running(pid: int) -> bool:
    """Alive: a zombie (killed, not yet reaped) is not."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_crashed_runs_namespaces_are_removed_and_a_live_runs_are_kept():
    require_netlab()
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid no run has any more
    crashed = f"{PREFIX}-{gone.pid}-abcdef-pub"
    live = f"{PREFIX}-{1}-abcdef-pub"  # pid 1 always runs: a parallel session's lab
    for ns in (crashed, live):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        with netlab():
            assert crashed not in lab_namespaces()
            assert live in lab_namespaces()
    finally:
        for ns in (crashed, live):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_real_nodes_in_the_lab_share_on_a_lan(tmp_path):
    """Cluster nodes placed on lab hosts: run in their namespace, listen on its address,
    driven through their API and command line from the test process."""
    from tests.node.cluster import Cluster, share_between

    with netlab(hosts_per_home=(2, 1)) as lab:
        cluster = Cluster(tmp_path)
        try:
            alice = cluster.add("alice", place=lab.host("a1"))
            bob = cluster.add("bob", place=lab.host("a2"))
            share_between(alice, [bob], name="notes", doctype="io.notes")
            alice.put("io.notes", {"title": "from a1"}, "n1")
            wait_until(lambda: bob.get("n1"), 60, what="n1 on bob")
            # The command line runs in a1's namespace too, and sees bob at a2's address.
            peers = alice.cli_json("peers")["peers"]
            assert any(lab.host("a2").address in str(p) for p in peers), peers
        finally:
            cluster.close()
            print(cluster.logs())


def test_without_namespaces_the_tests_skip_but_fail_under_ci(monkeypatch):
    import os

    from _pytest.outcomes import Failed, Skipped

    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # as a user who cannot make namespaces
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(Skipped, match="need root"):
        require_netlab()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(Failed, match="CI=true but the network-namespace tests cannot run"):
        require_netlab()
