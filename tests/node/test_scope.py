"""A document's doctype is fixed, and a document that leaves a share's scope leaves its
members too: real nodes, real links, the real command line.

"Never arrives" is shown by order, as in test_sync.py: a marker written after a document in
the same share has arrived, so the document would have too had it been accepted.
"""

from __future__ import annotations

import json

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
