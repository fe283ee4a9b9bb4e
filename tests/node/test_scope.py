"""A document's doctype is fixed, and a document that leaves a share's scope leaves its
members too: real nodes, real links, the real command line.

"Never arrives" is shown by order, as in test_sync.py: a marker written after a document in
the same share has arrived, so the document would have too had it been accepted.
"""

from __future__ import annotations

import json
import uuid

import pytest

from tests.node.cluster import Cluster, ClusterNode, cluster, share_between, wait_until  # noqa: F401

NOTES, TASKS = "io.notes", "io.tasks"


def _gone(node: ClusterNode, doc_id: str) -> bool:
    return node.get(doc_id) is None


def _refused_put(node: ClusterNode, *args: str) -> dict:
    done = node.cli("--json", "doc", "put", *args)
    assert done.returncode == 1, done.stdout
    return json.loads(done.stdout)


@pytest.mark.parametrize("encrypt", [False, True], ids=["plain", "encrypted"])
def test_the_cli_cannot_change_a_docs_doctype_even_after_deleting_it(cluster: Cluster,
                                                                     encrypt: bool):
    owner, member = cluster.add("owner"), cluster.add("member")
    share_between(owner, [member], name="notes", doctype=NOTES, encrypt=encrypt)
    rev = owner.cli_json("doc", "put", NOTES, json.dumps({"title": "first"}), "--id", "a1")["rev"]
    wait_until(lambda: member.get("a1"), what="a1 on the member")

    error = _refused_put(owner, TASKS, json.dumps({"title": "now a task"}), "--id", "a1",
                         "--rev", rev)
    assert error["error"] == "bad_request", error
    assert repr(NOTES) in error["reason"] and repr(TASKS) in error["reason"], error
    assert owner.get("a1")["_rev"] == rev and owner.get("a1")["doctype"] == NOTES

    # Deleted, the id is still the io.notes doc's: re-creating it as a task is refused too
    # (the member holds the io.notes tombstone; the copies would never meet again).
    owner.cli_json("doc", "rm", "a1", "--rev", rev)
    wait_until(lambda: _gone(member, "a1"), what="a1 deleted on the member")
    error = _refused_put(owner, TASKS, json.dumps({"title": "a task"}), "--id", "a1")
    assert repr(NOTES) in error["reason"] and repr(TASKS) in error["reason"], error
    # ...and re-creating it under its own doctype still works, and reaches the member.
    again = owner.cli_json("doc", "put", NOTES, json.dumps({"title": "back"}), "--id", "a1")
    wait_until(lambda: (doc := member.get("a1")) and doc["_rev"] == again["rev"],
               what="a1 re-created on the member")


def test_a_replicated_doc_cannot_change_the_doctype_of_a_deleted_local_one(cluster: Cluster):
    owner, member = cluster.add("owner"), cluster.add("member")
    rev = owner.put(NOTES, {"title": "a note"}, "x")
    owner.delete("x", rev)
    share_between(owner, [member], name="tasks", doctype=TASKS)
    member.put(TASKS, {"title": "a task with the deleted note's id"}, "x")
    marker = member.put(TASKS, {"title": "marker"}, "after-x")
    wait_until(lambda: owner.get("after-x"), what="the member's marker on the owner")
    assert owner.get("x") is None  # still the deleted io.notes doc
    audit = owner.cli_json("audit", "--tail", "200")["entries"]
    refused = [e for e in audit if e["doc_id"] == "x" and e["action"] == "share-receive"]
    assert refused and not refused[-1]["allowed"], refused
    assert repr(NOTES) in refused[-1]["reason"] and repr(TASKS) in refused[-1]["reason"]
    assert owner.get("after-x")["_rev"] == marker


def _has(node: ClusterNode, doc_id: str, rev: str | None = None) -> bool:
    doc = node.get(doc_id)
    return doc is not None and (rev is None or doc["_rev"] == rev)


@pytest.mark.parametrize("encrypt", [False, True], ids=["plain", "encrypted"])
def test_a_doc_edited_out_of_a_share_leaves_every_member(cluster: Cluster, encrypt: bool):
    owner, m1, m2 = cluster.add("owner"), cluster.add("m1"), cluster.add("m2")
    # Selectors on the fields an encrypted share keeps in clear, so both kinds run the same.
    share_between(owner, [m1, m2], name="work", doctype=NOTES, selector={"subject": "work"},
                  encrypt=encrypt)
    share_between(owner, [m1], name="alices", doctype=NOTES, selector={"author": "alice"},
                  encrypt=encrypt)
    rev_d1 = owner.put(NOTES, {"subject": "work", "t": "only in work"}, "d1")
    rev_d2 = owner.put(NOTES, {"subject": "work", "author": "alice", "t": "in both"}, "d2")
    for member in (m1, m2):
        for doc_id, rev in (("d1", rev_d1), ("d2", rev_d2)):
            wait_until(lambda: _has(member, doc_id, rev), what=f"{doc_id} on {member.name}")

    m2.stop()
    out_d1 = owner.put(NOTES, {"subject": "home", "t": "private now"}, "d1", rev_d1)
    out_d2 = owner.put(NOTES, {"subject": "home", "author": "alice", "t": "still alice's"},
                       "d2", rev_d2)
    # The owner keeps its edits, with no conflict: the removals are deleted leaves.
    for doc_id, rev in (("d1", out_d1), ("d2", out_d2)):
        doc = owner.get(doc_id, conflicts=True)
        assert doc["_rev"] == rev and not doc.get("_conflicts"), doc
    # m1 loses d1; d2 is still covered by "alices", which m1 holds: its new version arrives.
    wait_until(lambda: _gone(m1, "d1"), what="d1 removed from m1")
    assert wait_until(lambda: _has(m1, "d2", out_d2) and m1.get("d2"))["t"] == "still alice's"
    # m2 was stopped: it learns of both removals when it catches up (it holds only "work").
    m2.start()
    wait_until(lambda: _gone(m2, "d1") and _gone(m2, "d2"), timeout=60,
               what="d1 and d2 removed from m2 after its restart")

    # A member's later edit of a doc that left the share does not bring it back at the owner.
    m1.put(NOTES, {"subject": "work", "t": "m1 brings it back"}, "d1")
    marker = m1.put(NOTES, {"subject": "work", "t": "marker"}, "after-d1")
    wait_until(lambda: _has(owner, "after-d1", marker), what="m1's marker on the owner")
    doc = owner.get("d1", conflicts=True)
    assert doc["_rev"] == out_d1 and doc["t"] == "private now" and not doc.get("_conflicts")
    audit = owner.cli_json("audit", "--tail", "500")["entries"]
    assert any(e["doc_id"] == "d1" and e["action"] == "share-receive" and not e["allowed"]
               for e in audit)
    # Edited back into the share, the doc reaches the members again.
    back = owner.put(NOTES, {"subject": "work", "t": "shared again"}, "d2", out_d2)
    wait_until(lambda: _has(m2, "d2", back), what="d2 back on m2")


def test_a_doc_a_write_member_edits_out_of_a_share_leaves_the_others(cluster: Cluster):
    """Editing a doc out of a share's scope is, for the share, deleting it: a member with
    write permission may do it, and the owner and the other members lose their copies; the
    member keeps its edit, outside the share. A read-only member's edit stays its own."""
    owner, writer, reader = cluster.add("owner"), cluster.add("writer"), cluster.add("reader")
    share_between(owner, [writer, reader], name="work", doctype=NOTES,
                  selector={"subject": "work"}, read_only=[reader])
    rev = owner.put(NOTES, {"subject": "work", "t": "shared"}, "d1")
    for node in (writer, reader):
        wait_until(lambda: _has(node, "d1", rev), what=f"d1 on {node.name}")
    out = writer.put(NOTES, {"subject": "home", "t": "the writer's now"}, "d1", rev)
    for node in (owner, reader):
        wait_until(lambda: _gone(node, "d1"), what=f"d1 removed from {node.name}")
    doc = writer.get("d1", conflicts=True)
    assert doc["_rev"] == out and doc["t"] == "the writer's now" and not doc.get("_conflicts")


def test_a_removal_crosses_between_couchdb_nodes(cluster: Cluster, couchdb_url: str):
    # Node names make the database names: unique per run, as the server lives for the session.
    tag = uuid.uuid4().hex[:6]
    store = ("--store", "couchdb", "--couchdb-url", couchdb_url)
    owner, member = cluster.add(f"rm-o-{tag}", *store), cluster.add(f"rm-m-{tag}", *store)
    share_between(owner, [member], name="work", doctype=NOTES, selector={"subject": "work"})
    rev = owner.put(NOTES, {"subject": "work", "t": "shared"}, "d1")
    wait_until(lambda: _has(member, "d1", rev), what="d1 on the member")
    out = owner.put(NOTES, {"subject": "home", "t": "private now"}, "d1", rev)
    wait_until(lambda: _gone(member, "d1"), what="d1 removed from the member")
    doc = owner.get("d1", conflicts=True)
    assert doc["_rev"] == out and not doc.get("_conflicts"), doc
