"""A live change crosses in one round trip: between real nodes (`plugshare run` on loopback,
pinned TLS, the embedded store, the token process), a small live batch carries its docs with
its offer, so the receiving node never asks for them (`rep.missing`): its
`sync.batch_received` event says `inline`. Every wait is bounded and ends on what the nodes
report."""

from __future__ import annotations

import json
import time

import httpx

from tests.node.cluster import cluster, share_between, wait_until  # noqa: F401

NOTES = "io.notes"


def received_by(node) -> int:
    """Docs `node` counts as received in share notes (its /status), 0 before its link shows."""
    for entry in node.status()["shares"]:
        if entry["name"] == "notes" and entry["peers"]:
            return entry["peers"][0]["received"]
    return 0


def test_a_live_edit_arrives_with_its_docs_in_one_round_trip(cluster):
    alice, bob = cluster.add("alice"), cluster.add("bob")
    alice.put(NOTES, {"title": "before"}, "n0")
    share_between(alice, [bob], name="notes", doctype=NOTES)
    # The initial sync's own batch is counted (and its event gone by) before bob is watched.
    wait_until(lambda: received_by(bob) >= 1, what="the initial sync's batch on bob")

    assert bob.running is not None
    deadline = time.monotonic() + 60
    received = []
    with httpx.Client(timeout=httpx.Timeout(60.0)) as client:
        with client.stream("GET", f"{bob.running.api_url}/events", params={"share": "notes"},
                           headers={"Authorization": f"Bearer {bob.running.credential}"}) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            next(line for line in lines if line)  # subscribed: a heartbeat comes first
            rev = alice.put(NOTES, {"title": "live edit"}, "n1")
            for line in lines:
                assert time.monotonic() < deadline, f"no batch on bob yet: {received}"
                if not line:
                    continue
                event = json.loads(line)
                if event["type"] == "sync.batch_received":
                    received.append(event["data"])
                    break
    assert bob.get("n1")["_rev"] == rev
    [batch] = received
    assert (batch["written"], batch["refused"]) == (1, 0)
    assert batch["inline"] is True, batch  # its docs came with the offer: no rep.missing
