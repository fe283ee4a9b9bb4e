"""A node whose token process dies while documents are arriving from a peer keeps running: the
token is restarted at once (README: meanwhile every request answers 503), and the sync picks up
again. Found by the convergence test's token kills (tests/node/chaos.py, `token_kills`).

Today the node exits instead: the incoming batch's `share.incoming` call meets the token's
socket while the new process is not listening yet, and the TokenUnavailable escapes
PeerReplication._run_pull (replicator.py) through the session's nursery up to the node, which
stops with "Error: cannot reach the token process at .../token.sock: Connection refused".
"""

from __future__ import annotations

import os
import signal
import threading

import httpx

from tests.node.cluster import ApiError, Cluster, cluster, share_between, wait_until  # noqa: F401

NOTES = "io.notes"


def _token_restarts(node) -> int | None:
    try:
        return node.status()["token"]["restarts"]
    except ApiError as exc:
        if exc.status == 503:  # the token is coming back
            return None
        raise


def test_a_token_killed_while_a_peer_writes_is_restarted_and_the_node_keeps_syncing(
        cluster: Cluster):
    a, b = cluster.add("a"), cluster.add("b")
    share_between(a, [b], name="notes", doctype=NOTES)
    stop = threading.Event()
    written: list[str] = []

    def keep_writing() -> None:  # b's docs keep arriving at a, one batch after another
        while not stop.is_set():
            doc_id = f"b{len(written)}"
            try:
                b.put(NOTES, {"n": len(written)}, doc_id)
            except (ApiError, httpx.TransportError):
                continue
            written.append(doc_id)

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        wait_until(lambda: len(written) > 20 and a.get(written[10]), what="sync under way")
        os.kill(a.status()["token"]["pid"], signal.SIGKILL)
        wait_until(lambda: a.running.process.poll() is not None or _token_restarts(a) == 1,
                   what="a new token process (or the node's exit)")
    finally:
        stop.set()
        writer.join()
    assert a.running.process.poll() is None, "node a exited:\n" + a.log()[-1500:]
    last = b.put(NOTES, {"n": "last"}, "after-the-restart")
    wait_until(lambda: (doc := a.get("after-the-restart")) and doc["_rev"] == last,
               timeout=60, what="b's doc written after the token restart on a")
