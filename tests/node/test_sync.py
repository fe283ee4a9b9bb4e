"""Live sync between real nodes: `plugshare run` subprocesses on loopback, real pinned-TLS
peer links, real stores (the embedded one, and CouchDB through pouchdb-server), driven
through the local API and the command line.

Every wait is `wait_until` with a bounded deadline. "Never arrives" is shown by order: a
push reads the changes feed in sequence order, so once a marker written *after* a document
has arrived in the same share, that document would have arrived too had it been sent. Where
nothing of the share may flow any more (revocation), the marker rides another share on the
same link, and a read-only member's tokens are asked what was sent and received.
"""

from __future__ import annotations

import json
import signal
import threading
import uuid

import httpx

from plugshare.store import couchdb_database_name
from tests.node.cluster import DEFAULT_TIMEOUT, Cluster, ClusterNode, cluster, share_between, wait_until  # noqa: F401

NOTES = "io.notes"


def same_docs(*nodes: ClusterNode, doctype: str = NOTES):
    """The id -> winning rev map if every node holds the same one, else None."""
    maps = [node.revs(doctype) for node in nodes]
    return maps[0] if all(m == maps[0] for m in maps[1:]) else None


def converged(*nodes: ClusterNode, doctype: str = NOTES, count: int | None = None,
              timeout: float = DEFAULT_TIMEOUT) -> dict[str, str]:
    """Wait until every node holds the same live docs (`count` of them, if given)."""
    def check():
        revs = same_docs(*nodes, doctype=doctype)
        return revs if revs is not None and (count is None or len(revs) == count) else None

    return wait_until(check, timeout, what=f"{[n.name for n in nodes]} to hold the same "
                                            f"{count if count is not None else ''} {doctype} docs")


def arrived(node: ClusterNode, doc_id: str, rev: str | None = None,
            timeout: float = DEFAULT_TIMEOUT):
    """Wait until `node` serves `doc_id` (at `rev`, if given); the doc."""
    return wait_until(lambda: (doc := node.get(doc_id)) and (rev is None or doc["_rev"] == rev)
                      and doc, timeout, what=f"{doc_id} {rev or ''} on {node.name}")


def notes(prefix: str, n: int, size: int = 100) -> list[tuple[str, dict]]:
    return [(f"{prefix}{i:05d}", {"title": f"{prefix} {i}", "body": "x" * size})
            for i in range(n)]


# -- two nodes ----------------------------------------------------------------------------


def _converge_through_live_edits(a: ClusterNode, b: ClusterNode) -> None:
    # Docs both nodes held before the share existed flow both ways at the join.
    a.put_many(NOTES, notes("a-before-", 10))
    b.put_many(NOTES, notes("b-before-", 5))
    a.put("io.other", {"t": "not shared"}, "a-other")
    share_between(a, [b], name="notes", doctype=NOTES)
    revs = converged(a, b, count=15)
    assert "a-other" not in b.revs()

    # Live edits on both sides at once: new docs, updates, each side's edits of the other's.
    a_new = a.put_many(NOTES, notes("a-live-", 20))
    b_new = b.put_many(NOTES, notes("b-live-", 20))
    a_edit = a.put(NOTES, {"title": "edited on a"}, "b-before-00000", rev=revs["b-before-00000"])
    b_edit = b.put(NOTES, {"title": "edited on b"}, "a-before-00000", rev=revs["a-before-00000"])
    revs = converged(a, b, count=55)
    assert revs["b-before-00000"] == a_edit and revs["a-before-00000"] == b_edit
    assert all(revs[i] == r for i, r in {**a_new, **b_new}.items())
    assert b.get("b-before-00000")["title"] == "edited on a"
    assert a.get("a-before-00000")["title"] == "edited on b"

    # Ping-pong on one doc: each side edits the version it just received: no conflict.
    rev = revs["a-live-00000"]
    for turn in range(4):
        writer, reader = (a, b) if turn % 2 == 0 else (b, a)
        rev = writer.put(NOTES, {"title": f"turn {turn}"}, "a-live-00000", rev=rev)
        arrived(reader, "a-live-00000", rev)
    doc = b.get("a-live-00000", conflicts=True)
    assert doc["title"] == "turn 3" and doc["_rev"].startswith("5-")
    assert not doc.get("_conflicts")


def test_two_nodes_converge_through_live_edits_on_both_sides(cluster: Cluster):
    _converge_through_live_edits(cluster.add("a"), cluster.add("b"))


def test_two_couchdb_nodes_converge_through_live_edits(cluster: Cluster, couchdb_url: str):
    # Node names make the database names: unique per run, as the server lives for the session.
    tag = uuid.uuid4().hex[:6]
    store = ("--store", "couchdb", "--couchdb-url", couchdb_url)
    a, b = cluster.add(f"conv-a-{tag}", *store), cluster.add(f"conv-b-{tag}", *store)
    _converge_through_live_edits(a, b)
    # The docs really are in each node's own database on the server.
    for node in (a, b):
        db = couchdb_database_name("plugshare", node.name, node.node_id)
        rows = httpx.get(f"{couchdb_url}/{db}/_all_docs").json()["rows"]
        assert {r["id"] for r in rows} >= set(node.revs(NOTES))


def test_deletions_replicate_both_ways(cluster: Cluster):
    a, b = cluster.add("a"), cluster.add("b")
    share_between(a, [b], name="notes", doctype=NOTES)
    a.put_many(NOTES, notes("n", 6))
    revs = converged(a, b, count=6)
    tombstone = a.delete("n00000", revs["n00000"])
    b.delete("n00001", revs["n00001"])
    remaining = converged(a, b, count=4)
    assert "n00000" not in remaining and "n00001" not in remaining
    assert a.get("n00001") is None and b.get("n00000") is None
    # The doc can be written again on the other side: the new rev follows the tombstone
    # received from a, and a takes it as the continuation of its own history.
    rev = b.put(NOTES, {"title": "back"}, "n00000")
    assert int(rev.split("-")[0]) == int(tombstone.split("-")[0]) + 1
    assert arrived(a, "n00000", rev)["title"] == "back"
    assert not a.get("n00000", conflicts=True).get("_conflicts")


# -- three nodes --------------------------------------------------------------------------


def test_members_sync_directly_while_the_owner_is_offline(cluster: Cluster):
    owner, b, c = cluster.add("owner"), cluster.add("b"), cluster.add("c")
    share_between(owner, [b, c], name="notes", doctype=NOTES)
    # No discovery here: b and c learn where the other is from the owner (address hints).
    wait_until(lambda: b.peer_connected(c) and c.peer_connected(b), what="a b <-> c link")
    owner.put(NOTES, {"title": "from the owner"}, "o1")
    converged(owner, b, c, count=1)

    owner.stop()
    b_rev = b.put(NOTES, {"title": "from b"}, "b1")
    c_rev = c.put(NOTES, {"title": "from c"}, "c1")
    arrived(c, "b1", b_rev)
    arrived(b, "c1", c_rev)
    # Both members restart while the owner is away: they still find each other.
    b.stop()
    c.stop()
    b.start()
    c.start()
    c_rev = c.put(NOTES, {"title": "c again"}, "c1", rev=c_rev)
    arrived(b, "c1", c_rev)

    owner.start()  # the owner catches up from either member
    converged(owner, b, c, count=3)


def test_edits_made_apart_conflict_the_same_way_on_both_nodes(cluster: Cluster):
    a, b = cluster.add("a"), cluster.add("b")
    share_between(a, [b], name="notes", doctype=NOTES)
    first = a.put(NOTES, {"title": "first"}, "doc")
    arrived(b, "doc", first)

    # The link is down while each side edits: b is stopped while a edits, then a while b edits.
    b.stop()
    a_rev = a.put(NOTES, {"title": "a's edit"}, "doc", rev=first)
    a.stop()
    b.start()
    b_rev = b.put(NOTES, {"title": "b's first edit"}, "doc", rev=first)
    b_rev = b.put(NOTES, {"title": "b's second edit"}, "doc", rev=b_rev)
    a.start()

    def both_see_the_conflict():
        views = [json.loads(n.cli_ok("--json", "doc", "get", "doc", "--conflicts"))
                 for n in (a, b)]
        return views if all(v.get("_conflicts") for v in views) else None

    view_a, view_b = wait_until(both_see_the_conflict, what="the conflict on both nodes")
    # Same winner (the longer history: generation 3 beats 2) and same losing leaf, on both.
    assert view_a["_rev"] == view_b["_rev"] == b_rev
    assert view_a["title"] == view_b["title"] == "b's second edit"
    assert view_a["_conflicts"] == view_b["_conflicts"] == [a_rev]
    # The losing revision is still readable by rev, on the node that never wrote it.
    assert b.api("GET", "/docs/doc", params={"rev": a_rev})["title"] == "a's edit"

    # Resolving (deleting the losing leaf) on one node resolves it on both.
    a.cli_ok("doc", "rm", "doc", "--rev", a_rev)
    wait_until(lambda: not b.get("doc", conflicts=True).get("_conflicts"),
               what="the resolution on b")
    assert converged(a, b, count=1) == {"doc": b_rev}


def test_offline_member_catches_up_on_everything_it_missed(cluster: Cluster):
    a, b = cluster.add("a"), cluster.add("b")
    share_between(a, [b], name="notes", doctype=NOTES)
    revs = a.put_many(NOTES, notes("early-", 5))
    converged(a, b, count=5)

    b.stop()
    a.put_many(NOTES, notes("missed-", 200))
    a.put(NOTES, {"title": "changed"}, "early-00000", rev=revs["early-00000"])
    a.delete("early-00001", revs["early-00001"])
    b.start()
    revs = converged(a, b, count=204)
    assert b.get("early-00000")["title"] == "changed"
    assert "early-00001" not in revs


def test_sigkill_mid_sync_loses_nothing(cluster: Cluster):
    a, b = cluster.add("a"), cluster.add("b")
    share_between(a, [b], name="notes", doctype=NOTES)
    b_revs = b.put_many(NOTES, notes("b-", 50))
    converged(a, b, count=50)

    # a writes 2000 docs while b syncs them live; b is killed halfway through.
    written: dict[str, str] = {}
    writer = threading.Thread(target=lambda: written.update(
        a.put_many(NOTES, notes("a-", 2000, size=1000), concurrency=4)))
    writer.start()
    try:
        # Each look lists every doc b holds: not too often, and with time for a busy machine
        # (30 s ran out under a load average of 20 on 2 cores).
        wait_until(lambda: len(b.revs(NOTES)) >= 300, timeout=120, interval=0.2,
                   what="b to hold some of a's docs")
        assert writer.is_alive(), "a finished writing before b was killed: not mid-sync"
        assert b.kill() == -signal.SIGKILL
        b.start()
    finally:
        writer.join()
    # a is killed right after its last acknowledged write, b perhaps still catching up.
    assert a.kill() == -signal.SIGKILL
    a.start()
    revs = converged(a, b, count=2050, timeout=180)
    assert revs == {**written, **b_revs}  # every acknowledged write, at its acknowledged rev


# -- what must not cross ------------------------------------------------------------------


def test_a_read_only_members_edits_never_leave_its_node(cluster: Cluster):
    owner, writer, reader = cluster.add("owner"), cluster.add("writer"), cluster.add("reader")
    share_between(owner, [writer, reader], name="notes", doctype=NOTES, read_only=[reader])
    assert {m["name"]: m["permission"] for m in owner.share("notes")["members"]} == {
        "owner": "write", "writer": "write", "reader": "read"}
    shared = owner.put(NOTES, {"title": "shared"}, "shared")
    arrived(reader, "shared", shared)

    # The reader may edit its own copy and write new docs of the doctype locally...
    local_edit = reader.put(NOTES, {"title": "reader's edit"}, "shared", rev=shared)
    reader.put(NOTES, {"title": "reader's own"}, "reader-doc")
    # ...and keeps receiving: markers written after its edits reach it from both writers.
    arrived(reader, "owner-marker", owner.put(NOTES, {"title": "m"}, "owner-marker"))
    arrived(reader, "writer-marker", writer.put(NOTES, {"title": "m"}, "writer-marker"))
    wait_until(lambda: reader.peer_connected(writer), what="a reader <-> writer link")

    for node in (owner, writer):
        assert node.get("reader-doc") is None
        assert node.get("shared")["_rev"] == shared
    assert reader.get("shared")["_rev"] == local_edit
    # Its node does not even offer them: nothing sent, and its token refused to push.
    reader_view = reader.share("notes")
    assert reader_view["permission"] == "read"
    assert all(peer["sent"] == 0 for peer in reader_view["peers"]), reader_view["peers"]
    entries = reader.api("GET", "/token/audit", params={"tail": "1000"})["entries"]
    sends = [e for e in entries if e["action"] == "share-send"]
    assert sends and not any(e["allowed"] for e in sends)
    # The writers never received (let alone refused) a document from the reader, while the
    # owner's log does name what the writer sent it.
    def received_from(node: ClusterNode, sender: ClusterNode) -> list[dict]:
        entries = node.api("GET", "/token/audit", params={"tail": "1000"})["entries"]
        return [e for e in entries
                if e["action"] == "share-receive" and sender.node_id in e["principal"]]

    assert any(e["doc_id"] == "writer-marker" and e["allowed"]
               for e in received_from(owner, writer))
    assert received_from(owner, reader) == [] and received_from(writer, reader) == []


def test_docs_outside_the_shares_doctype_or_selector_never_cross(cluster: Cluster):
    a, b = cluster.add("a"), cluster.add("b")
    share_between(a, [b], name="public-notes", doctype=NOTES, selector={"public": True})
    for node, side in ((a, "a"), (b, "b")):
        node.put(NOTES, {"title": "secret", "public": False}, f"{side}-private")
        node.put(NOTES, {"title": "no flag"}, f"{side}-unflagged")
        node.put("io.other", {"title": "other doctype", "public": True}, f"{side}-other")
        node.put(NOTES, {"title": "marker", "public": True}, f"{side}-public")
    # Each side's in-scope doc, written last, arrives: what was written before it and
    # is not there was never sent.
    arrived(b, "a-public")
    arrived(a, "b-public")
    for node, other in ((a, "b"), (b, "a")):
        for doc_id in (f"{other}-private", f"{other}-unflagged", f"{other}-other"):
            assert node.get(doc_id) is None, f"{doc_id} crossed to {node.name}"
    assert a.share("public-notes")["docs"] == b.share("public-notes")["docs"] == 2


def test_a_member_cannot_overwrite_a_private_doc_with_the_same_id(cluster: Cluster):
    a, b = cluster.add("a"), cluster.add("b")
    private_rev = b.put("io.private", {"secret": "b's own"}, "x")
    share_between(a, [b], name="notes", doctype=NOTES)
    a.put(NOTES, {"title": "a's note with b's id"}, "x")
    a.put(NOTES, {"title": "marker"}, "after-x")  # written after x: once here, x was handled
    arrived(b, "after-x")
    doc = b.get("x", conflicts=True)
    assert doc["_rev"] == private_rev and doc["secret"] == "b's own"
    assert not doc.get("_conflicts") and doc["doctype"] == "io.private"
    audit = b.cli_json("audit", "--tail", "200")["entries"]
    assert any(e["doc_id"] == "x" and not e["allowed"] for e in audit)


def test_a_revoked_member_gets_no_new_changes_and_keeps_its_copy(cluster: Cluster):
    a, b = cluster.add("a"), cluster.add("b")
    share_between(a, [b], name="notes", doctype=NOTES)
    share_between(a, [b], name="tasks", doctype="io.tasks")  # stays: the link stays up
    before = a.put_many(NOTES, notes("before-", 3))
    converged(a, b, count=3)

    a.cli_ok("share", "revoke", "notes", "b")
    wait_until(lambda: b.share("notes")["status"] == "revoked", what="b to learn it is revoked")
    assert {m["name"]: m["status"] for m in a.share("notes")["members"]}["b"] == "revoked"

    a.put(NOTES, {"title": "after the revocation"}, "after")
    a.put(NOTES, {"title": "edited after"}, "before-00000", rev=before["before-00000"])
    arrived(b, "a-task", a.put("io.tasks", {"title": "marker"}, "a-task"))
    b_after = b.put(NOTES, {"title": "b after"}, "b-after")
    arrived(a, "b-task", b.put("io.tasks", {"title": "marker"}, "b-task"))

    assert b.get("after") is None and a.get("b-after") is None
    # Its copy stays as it was (plus its own new doc), untouched by a's later edits.
    assert b.revs(NOTES) == {**before, "b-after": b_after}
    assert b.get("before-00000")["title"] == "before- 0"


# -- encrypted shares ---------------------------------------------------------------------


def test_an_encrypted_share_reads_in_clear_and_is_stored_as_ciphertext(
        cluster: Cluster, couchdb_url: str):
    tag = uuid.uuid4().hex[:6]
    store = ("--store", "couchdb", "--couchdb-url", couchdb_url)
    a, b = cluster.add(f"enc-a-{tag}", *store), cluster.add(f"enc-b-{tag}", *store)
    secrets = {f"{field}-{side}": f"{field}-{side}-{uuid.uuid4().hex}"
               for field in ("title", "mood") for side in ("a", "b", "old")}
    # written in clear before the share exists: creating the share re-seals it
    old_rev = a.put("io.diary", {"title": secrets["title-old"], "mood": secrets["mood-old"]},
                    "old-entry")
    share_between(a, [b], name="diary", doctype="io.diary", encrypt=True)
    a_rev = a.put("io.diary", {"title": secrets["title-a"], "mood": secrets["mood-a"]},
                  "a-entry")
    b_rev = b.put("io.diary", {"title": secrets["title-b"], "mood": secrets["mood-b"]},
                  "b-entry")

    # Each reads the other's entry in clear through its API (its token opens it).
    assert arrived(b, "a-entry", a_rev)["title"] == secrets["title-a"]
    assert arrived(a, "b-entry", b_rev)["title"] == secrets["title-b"]
    assert b.get("a-entry")["mood"] == secrets["mood-a"]
    assert a.get("b-entry")["mood"] == secrets["mood-b"]
    assert arrived(b, "old-entry")["title"] == secrets["title-old"]

    # The server holds only ciphertext: no clear value anywhere in either database.
    for node in (a, b):
        db = couchdb_database_name("plugshare", node.name, node.node_id)
        raw = httpx.get(f"{couchdb_url}/{db}/_all_docs", params={"include_docs": "true"})
        docs = {row["id"]: row["doc"] for row in raw.json()["rows"]}
        assert set(docs) >= {"a-entry", "b-entry", "old-entry"}
        for doc_id in ("a-entry", "b-entry", "old-entry"):
            assert "plugshare:sealed" in docs[doc_id] and docs[doc_id]["doctype"] == "io.diary"
            assert "title" not in docs[doc_id] and "mood" not in docs[doc_id]
        for secret in secrets.values():
            assert secret not in raw.text, f"{secret!r} in clear in {db}"
    # nor in the history: the clear first revision was compacted away
    db = couchdb_database_name("plugshare", a.name, a.node_id)
    wait_until(lambda: httpx.get(f"{couchdb_url}/{db}/old-entry",
                                 params={"rev": old_rev}).status_code == 404,
               10, what="the clear revision to be compacted away")
