"""Real nodes and a real `plugshare relay` process on loopback: nodes that tell each other no
direct address (as behind NAT) share and sync both ways through the relay, and come back by
themselves after the relay restarts; a node that can be reached directly is upgraded to it;
the relay out of file descriptors serves again once they are back."""

from __future__ import annotations

import os
import resource
import socket
import struct
import time

import pytest

from plugshare.relay.protocol import RELAY_VERSION
from plugshare.sharing.invitation import Invitation

from tests.node.cluster import cluster, share_between, wait_until  # noqa: F401
from tests.relay.processes import RelayProcess, behind_nat

LONG = 90.0  # generous deadlines: these start real processes on a loaded machine


@pytest.fixture
def relay(tmp_path):
    (tmp_path / "relay").mkdir()
    running = RelayProcess(tmp_path / "relay" / "relay.key").start()
    yield running
    running.stop()
    print("===== relay =====\n" + (tmp_path / "relay" / "relay.log").read_text()[-6000:])


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
    wait_until(lambda: alice.status()["relays"] == [{"relay": relay.address, "joined": True}], LONG,
               what="alice joined to the relay")
    assert f"relay    {relay.address} (joined)" in alice.cli_ok("status")
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
    assert "connected via relay" in peers_text
    assert "paired a session" in (relay.key.parent / "relay.log").read_text()

    # The relay restarts (same key, same port): both nodes rejoin and sync resumes.
    relay.stop()
    wait_until(lambda: not linked_via(alice, bob, "relay"), LONG, what="the relayed link to go down")
    wait_until(lambda: alice.status()["relays"][0]["joined"] is False, LONG, what="alice to see the relay gone")
    relay.start()
    wait_until(lambda: linked_via(alice, bob, "relay") and linked_via(bob, alice, "relay"), LONG,
               what="the nodes to link again through the restarted relay")
    alice.put("io.notes", {"title": "after the restart"}, "a2")
    wait_until(lambda: synced(bob, "a2", "title", "after the restart"), LONG, what="sync after the restart")
    bob.put("io.notes", {"title": "bob after the restart"}, "b2")
    wait_until(lambda: synced(alice, "b2", "title", "bob after the restart"), LONG,
               what="sync back after the restart")


def test_nodes_that_can_reach_each_other_directly_do_not_use_the_relay(cluster, relay, tmp_path):
    alice = cluster.add("alice", start=False)
    bob = cluster.add("bob", start=False)
    for node in (alice, bob):
        behind_nat(node, relay.address, advertise_direct=True)  # relays given, and reachable
        node.start()
    share_between(alice, [bob], name="notes", doctype="io.notes")
    wait_until(lambda: linked_via(alice, bob, "direct") and linked_via(bob, alice, "direct"), LONG,
               what="a direct link")
    bob.put("io.notes", {"title": "direct"}, "d1")
    wait_until(lambda: synced(alice, "d1", "title", "direct"), LONG, what="sync over the direct link")
    assert "paired a session" not in (tmp_path / "relay" / "relay.log").read_text()


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


def test_members_behind_nat_reach_each_other_through_the_relay_the_owner_tells_them(cluster, relay):
    """bob and carol never exchanged a code: they learn each other's relay from the owner's
    address hints (taken from the owner only) and from the owner-signed manifest, where each
    member's relays are recorded when it joins, and link through it."""
    nodes = [cluster.add(name, start=False) for name in ("alice", "bob", "carol")]
    for node in nodes:
        behind_nat(node, relay.address)
        node.start()
    alice, bob, carol = nodes
    share_between(alice, [bob, carol], name="notes", doctype="io.notes")
    wait_until(lambda: linked_via(bob, carol, "relay") and linked_via(carol, bob, "relay"), LONG,
               what="bob and carol linked through the relay")
    alice.stop()  # the owner away: the members still sync with each other
    bob.put("io.notes", {"title": "bob to carol"}, "m1")
    wait_until(lambda: synced(carol, "m1", "title", "bob to carol"), LONG, what="bob's note at carol")
    # Both members forget every address and restart with the owner still away: the relays
    # each gave when joining, in the owner-signed manifest, are all that leads them together.
    for node in (bob, carol):
        node.stop()
        (node.home / "peers.json").unlink()
    for node in (bob, carol):
        node.start()
    wait_until(lambda: linked_via(bob, carol, "relay"), LONG, what="bob and carol linked from the manifest")
    carol.put("io.notes", {"title": "carol to bob"}, "m2")
    wait_until(lambda: synced(bob, "m2", "title", "carol to bob"), LONG, what="carol's note at bob")


def test_a_relay_out_of_file_descriptors_says_so_once_and_serves_again(relay):
    # Idle connections run the relay out of descriptors: it keeps running, says so once
    # (not at every retry: a flood must not fill its log), and once they close it answers
    # again under the same limit.
    pid = relay.process.pid
    limit = len(os.listdir(f"/proc/{pid}/fd")) + 8
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
    log = relay.key.parent / "relay.log"
    held = []
    try:
        for _ in range(40):
            held.append(socket.create_connection((relay.host, relay.port), timeout=10))
        wait_until(lambda: "cannot accept" in log.read_text() or relay.process.poll() is not None,
                   what="the relay out of descriptors")
        time.sleep(3)  # time for retries: a warning each would show here
        assert relay.process.poll() is None, log.read_text()[-3000:]
        assert log.read_text().count("cannot accept") == 1, log.read_text()[-3000:]
    finally:
        for sock in held:
            sock.close()

    def refuses_an_oversize_frame() -> bool:
        try:
            with socket.create_connection((relay.host, relay.port), timeout=5) as sock:
                sock.sendall(struct.pack(">BH", RELAY_VERSION, 65535))
                return bool(sock.recv(4096))
        except OSError:
            return False

    wait_until(refuses_an_oversize_frame, what="the relay answering again")
    assert "accepting relay connections again" in log.read_text()
