"""A relay that cheats on the sessions it forwards (tests/support/tamper_relay.py, a proxy in
the public namespace in front of the real relay) is caught by the nodes' end-to-end pinned
TLS: a flipped byte, a replayed record or a session handed to another node than the one
dialled ends the link before anything crosses; the nodes go on, and link again once the
relay is honest."""

from __future__ import annotations

import pytest

from tests.node.cluster import wait_until
from tests.support.relay_nodes import (LONG, add_node, has, peer_row, relay_id,
                                       share_across, sync_both_ways)
from tests.support.tamper_relay import TamperRelay


@pytest.mark.parametrize("cheat", ["flip", "replay", "redirect"])
def test_a_relay_that_tampers_replays_or_redirects_is_detected_and_the_link_refused(
        lab, relay, cluster, tmp_path, cheat):
    public = lab.public
    proxy_address = (public.address, public.free_port())
    carol = add_node(cluster, "carol", lab.host("b2"), relay.address)  # the wrong node
    proxy = TamperRelay(tmp_path / "proxy", public.command_prefix, proxy_address,
                        (public.address, relay.port), redirect_to=carol.node_id)
    try:
        # Alice (home A) and bob (home B) are given the proxy, pinned to the real relay's id,
        # and give each other no direct address (they know they are behind NAT): every link
        # between them goes through the proxy at once.
        through_proxy = f"{relay_id(relay)}@{proxy_address[0]}:{proxy_address[1]}"
        alice = add_node(cluster, "alice", lab.host("a1"), through_proxy, advertise_direct=False)
        bob = add_node(cluster, "bob", lab.host("b1"), through_proxy, advertise_direct=False)
        share_across(alice, bob, lab)
        sync_both_ways(alice, bob, "honest")

        proxy.set_mode(cheat)  # closes the sessions it carries: the nodes redial through it
        wait_until(lambda: proxy.count(cheat) >= 2, LONG,
                   what=f"the relay to {cheat} two sessions (the nodes redialling)")
        alice.put("io.notes", {"title": "written while the relay cheats"}, "cheated")
        before = proxy.count(cheat)
        wait_until(lambda: proxy.count(cheat) > before, LONG,
                   what=f"the relay to {cheat} a session after the write")
        assert not peer_row(bob, alice)["connected"] and not peer_row(alice, bob)["connected"]
        assert bob.get("cheated") is None, "a document crossed a relay that cheats"
        if cheat == "redirect":  # handed carol when asking for alice: bob did not take her
            row = peer_row(bob, carol)
            assert row is None or not row["connected"], row
        # What the nodes' TLS said: a record that does not decrypt (flipped or replayed:
        # out of sequence), or another node's certificate than the one dialled.
        detected = {"flip": "BAD_RECORD_MAC", "replay": "BAD_RECORD_MAC",
                    "redirect": f"is node {carol.node_id}, not the expected"}[cheat]
        assert detected in bob.log() + alice.log()
        assert relay.process.poll() is None, "the cheating took the relay down"

        proxy.set_mode("honest")
        wait_until(lambda: has(bob, "cheated", "written while the relay cheats"), LONG,
                   what="the note at bob once the relay is honest again")
        sync_both_ways(alice, bob, "again")
    finally:
        print(f"===== tampering relay =====\n{proxy.log_file.read_text()[-3000:]}")
        proxy.stop()
