"""A share's sync outlives what passes: a CouchDB server that restarts, a token process that
dies (and is restarted by its supervisor). Real nodes, a real pouchdb-server this test kills
and starts again on the same port (its data on disk), real token processes.

While a stream waits to start again, the node says "retrying" (why, and when), never "live";
once the cause has passed the stream resumes from its checkpoint, on the same link, without
restarting the node.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from plugshare.node.session import SyncState
from plugshare.node.watch import share_rows
from tests.node.cluster import ApiError, Cluster, cluster, share_between, wait_until  # noqa: F401
from tests.support.pouchdb_disk import PouchDBOnDisk

NOTES = "io.notes"
SLOW = 90.0  # seconds: a retry backs off up to 30 s, and the machine may be loaded


@pytest.fixture
def pouchdb(tmp_path):
    server = PouchDBOnDisk(tmp_path / "pouchdb")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def link_of(node, share="notes") -> dict:
    [link] = node.share(share)["peers"]
    return link


def sync_line(shown: str) -> str:
    """The state of the one link in `share show`'s output (after the peer's name)."""
    [line] = [line for line in shown.splitlines() if line.startswith("sync ")]
    return line.split(None, 2)[2]


def arrived(node, doc_id, rev, timeout=SLOW):
    return wait_until(lambda: (doc := node.get(doc_id)) and doc["_rev"] == rev and doc,
                      timeout, what=f"{doc_id} {rev} on {node.name}")


def test_a_couchdb_restart_is_shown_as_retrying_and_the_sync_resumes_without_a_node_restart(
        cluster: Cluster, pouchdb: PouchDBOnDisk):
    a = cluster.add("a")
    b = cluster.add("b", "--store", "couchdb", "--couchdb-url", pouchdb.url)
    share_between(a, [b], name="notes", doctype=NOTES)
    arrived(b, "before", a.put(NOTES, {"title": "before"}, "before"))
    for node in (a, b):
        wait_until(lambda: link_of(node)["state"] == "live", SLOW, what=f"{node.name} live")
    b_pid = b.pid

    pouchdb.stop(kill=True)
    rev = a.put(NOTES, {"title": "written while b's CouchDB is down"}, "while-down")

    # a's push meets b's dead store; b's own push cannot read its feed. Neither says live.
    for node in (a, b):
        link = wait_until(lambda: (link := link_of(node))["state"] == "retrying" and link,
                          SLOW, what=f"{node.name} to say retrying")
        assert "store failed" in link["error"], link
    # What a person sees: `share show` and `watch`'s shares table (a restart attempt may be
    # under way at the moment of asking: then the state is "initial", never "live").
    sync = wait_until(lambda: (line := sync_line(a.cli_ok("share", "show", "notes")))
                      .startswith("retrying (next attempt in") and line, SLOW,
                      what="share show to say when a's push retries")
    assert "store failed" in sync, sync
    row = wait_until(lambda: (cell := share_rows(b.status(), time.time())[0][-1])
                     .startswith("↻ retrying") and cell, SLOW, what="watch to say retrying")
    assert "store failed" in row, row
    # b's /status still answers, and says what is wrong with its store.
    status = b.status()
    assert status["store"]["backend"] == "couchdb" and "error" in status["store"], status["store"]
    assert [p["connected"] for p in status["peers"]] == [True]

    # A new link while b's store is down (a restarts) costs b nothing but that link.
    a.stop()
    a.start()
    wait_until(lambda: "cannot serve it now" in b.log() or b.running.process.poll() is not None,
               SLOW, what="a to dial b again")
    assert b.running.process.poll() is None, b.log()[-3000:]
    assert b.status()["store"]["error"]

    pouchdb.start()
    arrived(b, "while-down", rev)
    for node in (a, b):
        wait_until(lambda: link_of(node)["state"] == "live", SLOW, what=f"{node.name} live again")
    assert b.pid == b_pid and b.running.process.poll() is None
    # And the other way still flows.
    arrived(a, "after", b.put(NOTES, {"title": "after"}, "after"))


def unless_token_away(read):
    """`read()`, or None while the node answers 503 (its token process is being restarted)."""
    try:
        return read()
    except ApiError as exc:
        if exc.status == 503:
            return None
        raise


def test_the_token_dying_in_the_middle_of_a_catch_up_does_not_stop_the_node_or_the_sync(
        cluster: Cluster):
    a, b = cluster.add("a"), cluster.add("b")
    share_between(a, [b], name="notes", doctype=NOTES)
    b.stop()
    revs = a.put_many(NOTES, [(f"n{i:04d}", {"title": f"note {i}", "body": "x" * 2000})
                              for i in range(1500)])
    b.start()
    b_pid = b.pid
    # Batches flow into b (one token decision each) when its token process is killed.
    wait_until(lambda: b.revs(NOTES), SLOW, what="the catch-up to begin on b")
    token_pid = b.status()["token"]["pid"]
    os.kill(token_pid, signal.SIGKILL)
    wait_until(lambda: unless_token_away(lambda: b.status()["token"]["pid"] != token_pid),
               SLOW, what="b's token process to be restarted")
    wait_until(lambda: unless_token_away(lambda: b.revs(NOTES) == revs), SLOW,
               what="every note on b")
    assert b.running.process.poll() is None and b.pid == b_pid
    wait_until(lambda: link_of(b)["state"] == "live", SLOW, what="b live")


# -- what is shown (pure) -------------------------------------------------------------------


def test_a_link_is_live_only_while_its_streams_run_and_have_caught_up():
    state = SyncState(streams={"push": "running", "pull": "running"})
    assert not state.settle(in_step=False) and state.state == "initial"
    assert state.settle(in_step=True) and state.state == "live"
    state.streams["push"], state.retry_at = "retrying", time.time() + 4
    assert state.settle(in_step=True) and state.state == "retrying"
    assert 0 < state.to_json()["retry_in"] <= 4
    state.streams["push"] = "running"  # started again, not caught up yet
    assert state.settle(in_step=False) and state.state == "initial"
    assert state.retry_at is None and state.to_json()["retry_in"] is None
    state.streams["pull"] = "ended"  # for good: nothing restarts it
    assert state.settle(in_step=True) and state.state == "error"


def test_watch_and_share_show_say_why_a_link_is_retrying_and_when():
    from plugshare.cli import _sync_state
    from plugshare.node.watch import link_state

    link = {"peer": "b", "state": "retrying", "retry_in": 4.2,
            "error": "this node's store failed: CouchDB is unreachable"}
    assert link_state(link) == "↻ retrying in 4 s: this node's store failed: CouchDB is unr…"
    assert _sync_state(link) == ("retrying (next attempt in 4 s): this node's store failed: "
                                 "CouchDB is unreachable")
    peer_side = {**link, "retry_in": None}
    assert link_state(peer_side).startswith("↻ retrying: this node's store")
    assert _sync_state(peer_side).startswith("retrying (the peer starts it again): ")
