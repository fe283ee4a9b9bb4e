"""Real nodes and a real `plugshare relay` process on loopback: nodes that tell each other no
direct address (as behind NAT) share and sync both ways through the relay, and come back by
themselves after the relay restarts; a node that can be reached directly is upgraded to it."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

import pytest
import tomli_w

from plugshare.sharing.invitation import Invitation

from tests.node.cluster import Cluster, cluster, free_port, share_between, wait_until  # noqa: F401

LONG = 90.0  # generous deadlines: these start real processes on a loaded machine


class RelayProcess:
    """`plugshare relay` in a subprocess; its address is the `ID@HOST:PORT` it prints."""

    def __init__(self, key, port: int | None = None):
        self.key = key
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.address = ""

    def start(self) -> RelayProcess:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "plugshare", "relay", "--listen", f"127.0.0.1:{self.port}",
             "--key", str(self.key)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=os.environ.copy())
        line = self.process.stdout.readline()
        assert line.startswith("relay "), f"the relay printed {line!r}"
        self.address = line.split()[1]
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=30)
            self.process = None


@pytest.fixture
def relay(tmp_path):
    running = RelayProcess(tmp_path / "relay" / "relay.key").start()
    yield running
    running.stop()


def behind_nat(node, relay_address: str, *, advertise_direct: bool = False) -> None:
    """Give `node` the relay, and (behind NAT) have it tell peers no direct address."""
    path = node.home / "node.toml"
    config = tomllib.loads(path.read_text())
    config.setdefault("peer", {}).update(relays=[relay_address], advertise_direct=advertise_direct)
    path.write_text(tomli_w.dumps(config))


def peer_row(node, other) -> dict | None:
    return next((p for p in node.api("GET", "/peers")["peers"] if p["id"] == other.node_id), None)


def linked_via(node, other, via: str) -> bool:
    row = peer_row(node, other)
    return bool(row and row["connected"] and row["via"] == via)


def synced(node, doc_id: str, field: str, value) -> bool:
    doc = node.get(doc_id)
    return bool(doc and doc.get(field) == value)


def test_two_nodes_behind_nat_share_and_sync_both_ways_through_the_relay(cluster, relay):
    alice = cluster.add("alice", start=False)
    bob = cluster.add("bob", start=False)
    for node in (alice, bob):
        behind_nat(node, relay.address)
        node.start()
    alice.cli_json("share", "create", "notes", "--doctype", "io.notes")
    code = alice.cli_json("share", "invite", "notes")["code"]
    invitation = Invitation.decode(code)  # no direct address: only the relay leads to alice
    assert invitation.owner_addresses == () and len(invitation.owner_relays) == 1
    bob.cli_json("share", "accept", "--no-progress", code)
    wait_until(lambda: linked_via(bob, alice, "relay"), LONG, what="bob linked to alice via the relay")
    alice.put("io.notes", {"title": "from alice"}, "a1")
    wait_until(lambda: synced(bob, "a1", "title", "from alice"), LONG, what="alice's note at bob")
    bob.put("io.notes", {"title": "from bob"}, "b1")
    wait_until(lambda: synced(alice, "b1", "title", "from bob"), LONG, what="bob's note at alice")
    row = peer_row(alice, bob)
    assert row["via"] == "relay" and all("@" in a or str(bob.peer_port) not in a for a in row["addresses"])
    peers_text = alice.cli_ok("peers")
    assert "via relay" in peers_text

    # The relay restarts (same key, same port): both nodes rejoin and sync resumes.
    relay.stop()
    wait_until(lambda: not linked_via(alice, bob, "relay"), LONG, what="the relayed link to go down")
    relay.start()
    wait_until(lambda: linked_via(alice, bob, "relay") and linked_via(bob, alice, "relay"), LONG,
               what="the nodes to link again through the restarted relay")
    alice.put("io.notes", {"title": "after the restart"}, "a2")
    wait_until(lambda: synced(bob, "a2", "title", "after the restart"), LONG, what="sync after the restart")
    bob.put("io.notes", {"title": "bob after the restart"}, "b2")
    wait_until(lambda: synced(alice, "b2", "title", "bob after the restart"), LONG,
               what="sync back after the restart")


def test_a_relayed_link_is_upgraded_to_direct_when_the_peer_can_be_reached(cluster, relay):
    alice = cluster.add("alice", start=False)  # behind NAT: reached only through the relay
    bob = cluster.add("bob", start=False)  # tells its direct address
    behind_nat(alice, relay.address)
    behind_nat(bob, relay.address, advertise_direct=True)
    alice.start()
    bob.start()
    share_between(alice, [bob], name="notes", doctype="io.notes")
    # bob reached alice through the relay; alice learns bob's direct address from the link
    # and upgrades: both ends then keep the direct link and close the relayed one.
    wait_until(lambda: linked_via(alice, bob, "direct") and linked_via(bob, alice, "direct"), LONG,
               what="the link to be upgraded to direct")
    assert "upgraded from the relay to direct" in alice.log() + bob.log()
    bob.put("io.notes", {"title": "direct"}, "d1")
    wait_until(lambda: synced(alice, "d1", "title", "direct"), LONG, what="sync over the direct link")
