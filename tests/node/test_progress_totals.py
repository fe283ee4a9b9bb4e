"""An initial sync between real nodes knows its total: each batch says how many changes are
still coming, so the joining node's `sync.state` events and `/status` carry done, total and
bytes, and `share accept` ends with one summary line naming the docs moved.

Real `plugshare run` nodes on loopback, driven through the command line and the local API;
every wait is bounded and ends on what the nodes report, never on the clock.
"""

from __future__ import annotations

import json
import re

import httpx

from tests.node.cluster import ClusterNode, cluster, wait_until  # noqa: F401

NOTES = "io.notes"
DOCS = 300  # more than one batch (200 changes each)


def notes(n: int) -> list[tuple[str, dict]]:
    return [(f"note-{i:04d}", {"title": f"note {i}", "body": "x" * 100}) for i in range(n)]


def link_of(node: ClusterNode, share: str) -> dict | None:
    """`node`'s /status entry for its one peer link in `share`, if there is one yet."""
    for entry in node.status()["shares"]:
        if entry["name"] == share and entry["peers"]:
            return entry["peers"][0]
    return None


def share_events_until_live(node: ClusterNode, share: str) -> list[dict]:
    """`share`'s events on `node` (replayed from its recent history, then followed) up to
    the `sync.state` saying it is live."""
    assert node.running is not None
    events = []
    with httpx.Client(timeout=30.0) as client:
        with client.stream("GET", f"{node.running.api_url}/events",
                           params={"share": share, "recent": 200},
                           headers={"Authorization": f"Bearer {node.running.credential}"}) as stream:
            assert stream.status_code == 200
            for line in stream.iter_lines():
                if not line:
                    continue
                event = json.loads(line)
                events.append(event)
                if event["type"] == "sync.state" and event["data"]["state"] == "live":
                    return events
    raise AssertionError(f"the events stream ended before {share} was live: {events}")


def test_the_joining_node_knows_the_total_and_the_bytes_of_its_initial_sync(cluster):
    alice, bob = cluster.add("alice"), cluster.add("bob")
    alice.put_many(NOTES, notes(DOCS))
    alice.cli_json("share", "create", "notes", "--doctype", NOTES)
    code = alice.cli_json("share", "invite", "notes")["code"]
    bob.cli_json("share", "accept", "--no-progress", code)

    events = share_events_until_live(bob, "notes")
    batches = [e["data"] for e in events if e["type"] == "sync.batch_received"]
    states = [e["data"] for e in events if e["type"] == "sync.state"]
    assert sum(batch["written"] for batch in batches) == DOCS
    assert len(batches) >= 2 and all(batch["bytes"] > 0 for batch in batches)
    assert batches[0]["pending"] > 0 and batches[-1]["pending"] == 0
    initial = [state for state in states if state["state"] == "initial"]
    assert initial, states
    for state in initial:  # once known, the total never falls behind what is done
        assert state["total"] is not None and state["total"] >= state["done"] > 0, state
    assert initial[0]["total"] >= DOCS  # an upper bound from the first batch on
    live = states[-1]
    assert (live["state"], live["done"], live["total"], live["pending_in"]) == (
        "live", DOCS, DOCS, 0)

    link = wait_until(lambda: link_of(bob, "notes"), what="bob's link in notes")
    assert (link["state"], link["done"], link["total"], link["pending_in"]) == (
        "live", DOCS, DOCS, 0)
    assert link["bytes"] == sum(batch["bytes"] for batch in batches)
    # The sending side counts what it sent: the same docs, the same size.
    sent = wait_until(lambda: (out := link_of(alice, "notes")) and out["sent"] == DOCS and out,
                      what="alice to count the docs bob wrote")
    assert sent["bytes"] == link["bytes"]
    assert len(bob.revs(NOTES)) == DOCS


def test_share_accept_off_a_terminal_ends_with_one_summary_line(cluster):
    alice, carol = cluster.add("alice"), cluster.add("carol")
    alice.put_many(NOTES, notes(DOCS))
    alice.cli_json("share", "create", "notes", "--doctype", NOTES)
    code = alice.cli_json("share", "invite", "notes")["code"]

    accepted = carol.cli("share", "accept", code)  # stdout and stderr are pipes here
    assert accepted.returncode == 0, accepted.stderr
    assert "\x1b" not in accepted.stderr + accepted.stdout  # no progress bar drawn
    summaries = [line for line in accepted.stderr.splitlines() if "initial sync" in line]
    assert len(summaries) == 1, accepted.stderr
    assert re.fullmatch(rf"notes: initial sync done — {DOCS} docs, [0-9.]+ kB in [0-9.]+ s; live",
                        summaries[0]), summaries[0]
    assert len(carol.revs(NOTES)) == DOCS  # live means every doc is there
