"""Nodes at two homes behind real NAT (tests/support/netlab.py: nftables routers that drop
every connection from outside) share through a real `plugshare relay` in the public
namespace; nodes on one LAN stay direct (a relay that cheats: test_relay_tampering.py).

Every node keeps its default `advertise_direct = true`, as a node behind NAT does, not
knowing it is: the direct addresses it gives are private, dialling them from the other home
gets nothing back (the router drops it, counted), and the link has to fall back on the relay.
"""

from __future__ import annotations

from tests.node.cluster import wait_until
from tests.support.relay_nodes import (LONG, add_node, has, linked_via, peer_row, relay_log,
                                       share_across, sync_both_ways)

def test_a_share_made_at_home_a_is_accepted_and_synced_both_ways_from_home_b_through_the_relay(
        lab, relay, cluster):
    alice = add_node(cluster, "alice", lab.host("a1"), relay.address)
    bob = add_node(cluster, "bob", lab.host("b1"), relay.address)
    invitation = share_across(alice, bob, lab)
    # The code gives alice's private address (useless from home B) and her relay.
    assert [(h, p) for _, h, p in invitation.owner_relays] == [(lab.public.address, relay.port)]
    assert (lab.host("a1").address, alice.peer_port) in [tuple(a) for a in invitation.owner_addresses]

    wait_until(lambda: linked_via(bob, alice, "relay") and linked_via(alice, bob, "relay"), LONG,
               what="alice and bob linked through the relay")
    sync_both_ways(alice, bob, "first")
    # Bob did try alice's direct address first: home A's router dropped it.
    assert lab.inbound_drops("a") > 0
    rows = {p["name"]: p for p in bob.cli_json("peers")["peers"]}
    assert rows["alice"]["via"] == "relay" and rows["alice"]["connected"], rows


def test_a_relay_killed_and_restarted_is_survived(lab, relay, cluster):
    alice = add_node(cluster, "alice", lab.host("a1"), relay.address)
    bob = add_node(cluster, "bob", lab.host("b1"), relay.address)
    share_across(alice, bob, lab)
    wait_until(lambda: linked_via(bob, alice, "relay"), LONG, what="bob linked to alice via the relay")
    sync_both_ways(alice, bob, "before")

    relay.stop()
    wait_until(lambda: not peer_row(alice, bob)["connected"] and not peer_row(bob, alice)["connected"],
               LONG, what="the relayed link to go down with the relay")
    alice.put("io.notes", {"title": "while the relay was down"}, "offline")
    relay.start()  # same key, same address
    wait_until(lambda: linked_via(alice, bob, "relay") and linked_via(bob, alice, "relay"), LONG,
               what="alice and bob linked again through the restarted relay")
    wait_until(lambda: has(bob, "offline", "while the relay was down"), LONG,
               what="the note written while the relay was down, at bob")
    sync_both_ways(alice, bob, "after")


def test_two_nodes_on_one_lan_use_the_direct_path(lab, relay, cluster):
    alice = add_node(cluster, "alice", lab.host("a1"), relay.address)
    carol = add_node(cluster, "carol", lab.host("a2"), relay.address)
    share_across(alice, carol, lab)
    wait_until(lambda: linked_via(carol, alice, "direct") and linked_via(alice, carol, "direct"),
               LONG, what="alice and carol linked directly on their LAN")
    sync_both_ways(alice, carol, "lan")
    for node, other in ((alice, carol), (carol, alice)):
        rows = {p["name"]: p for p in node.cli_json("peers")["peers"]}
        assert rows[other.name]["via"] == "direct", rows


def test_a_node_killed_outright_does_not_take_the_relay_down(lab, relay, cluster):
    """A joined node that vanishes without a goodbye (SIGKILL: its TCP connection ends with
    no TLS close_notify, as when a laptop's link drops) is one member gone; the relay goes
    on serving the others."""
    alice = add_node(cluster, "alice", lab.host("a1"), relay.address)
    bob = add_node(cluster, "bob", lab.host("b1"), relay.address)
    carol = add_node(cluster, "carol", lab.host("b2"), relay.address)
    share_across(alice, bob, lab)
    wait_until(lambda: linked_via(bob, alice, "relay"), LONG, what="bob linked to alice via the relay")
    wait_until(lambda: f"node {carol.node_id} joined" in relay_log(relay), LONG, what="carol joined")

    carol.kill()
    wait_until(lambda: f"node {carol.node_id} left" in relay_log(relay), LONG,
               what="the relay to notice carol is gone")
    alice.put("io.notes", {"title": "after carol left"}, "later")
    wait_until(lambda: has(bob, "later", "after carol left") or relay.process.poll() is not None,
               LONG, what="the note at bob (or the relay exiting)")
    assert relay.process.poll() is None, f"the relay exited: {relay_log(relay)[-3000:]}"
