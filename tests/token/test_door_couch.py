"""The door's commands for the CouchDB API (issue 12): `doc.write_batch` (one decision per
document, by the same function as `doc.write`), `db.list`, `doc.count`, and confining a
command to a share's scope with `share`."""

from __future__ import annotations

import json

import msgpack
import pytest

from plugshare.token import NotFound
from plugshare.token.door import Door
from plugshare.token.envelope import ENVELOPE_FIELD


@pytest.fixture
def door(token_and_owner):
    token, owner = token_and_owner
    return Door(token), owner


def _wire(value):
    return msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False)


def _batch(door, credential, docs, current=None, new_edits=True, **scope):
    return _wire(door.handle("doc.write_batch", {
        "credential": credential, "docs": docs, "current": current or {},
        "new_edits": new_edits, **scope}))["results"]


def test_a_batch_decides_each_doc_and_a_refusal_fails_only_its_own(door, token):
    d, owner = door
    app = token.add_app("notes", "io.notes", "write", {"tag": "work"})
    theirs = {"_id": "t1", "_rev": "1-" + "a" * 32, "doctype": "io.notes", "tag": "home"}
    before = len(token.audit_tail(10_000))
    results = _batch(d, app, [
        {"_id": "ok1", "doctype": "io.notes", "tag": "work"},
        {"_id": "no1", "doctype": "io.notes", "tag": "home"},
        {"_id": "t1", "_rev": theirs["_rev"], "doctype": "io.notes", "tag": "work"},
        {"_id": "bad", "doctype": "io.notes", "_conflicts": []},  # _attachments is taken
    ], {"t1": theirs})
    assert results[0]["doc"]["_id"] == "ok1"
    assert [(r.get("id"), r.get("error")) for r in results[1:]] == [
        ("no1", "forbidden"), ("t1", "forbidden"), ("bad", "bad_request")]
    assert len(token.audit_tail(10_000)) - before == 3  # the malformed doc decided nothing


def test_a_batch_seals_a_sensitive_doctype_and_keeps_a_replicated_history(door):
    d, owner = door
    d.handle("doctype.encrypt", {"credential": owner, "doctype": "io.health"})
    history = {"start": 2, "ids": ["b" * 32, "a" * 32]}
    [result] = _batch(d, owner, [{"_id": "h1", "_rev": "2-" + "b" * 32, "_revisions": history,
                                  "doctype": "io.health", "note": "O-"}], new_edits=False)
    form = result["doc"]
    assert ENVELOPE_FIELD in form and "O-" not in json.dumps(form)
    assert form["_revisions"] == history and form["_rev"] == "2-" + "b" * 32
    clear = _wire(d.handle("doc.read", {"credential": owner, "doc": form}))["doc"]
    assert clear["note"] == "O-"


def test_a_deletion_needs_the_right_to_write_the_doc_it_removes(door, token):
    d, owner = door
    app = token.add_app("notes", "io.notes", "write", {"tag": "work"})
    mine = {"_id": "m", "_rev": "1-" + "a" * 32, "doctype": "io.notes", "tag": "work"}
    theirs = {"_id": "t", "_rev": "1-" + "b" * 32, "doctype": "io.notes", "tag": "home"}
    results = _batch(d, app, [
        {"_id": "m", "_rev": mine["_rev"], "_deleted": True, "doctype": "io.notes",
         "tag": "leaks?"},
        {"_id": "t", "_rev": theirs["_rev"], "_deleted": True, "doctype": "io.notes"},
    ], {"m": mine, "t": theirs})
    assert results[0]["doc"] == {"_id": "m", "_rev": mine["_rev"], "_deleted": True,
                                 "doctype": "io.notes"}  # bare: no body
    assert results[1]["error"] == "forbidden"


def test_db_list_names_what_a_credential_may_open(door, token):
    d, owner = door
    app = token.add_app("notes", "io.notes", "read")
    token.create_share("team", "io.notes", None)
    token.create_share("tasks", "io.tasks", None)
    mine = _wire(d.handle("db.list", {"credential": app}))
    assert mine["principal"] == "app:notes" and mine["any_doctype"] is False
    assert mine["doctypes"] == ["io.notes"]
    assert [s["name"] for s in mine["shares"]] == ["team"]
    everything = _wire(d.handle("db.list", {"credential": owner}))
    assert everything["any_doctype"] is True
    assert [s["name"] for s in everything["shares"]] == ["tasks", "team"]


def test_a_share_scope_confines_reads_counts_and_writes(door, token):
    d, owner = door
    share = token.create_share("work", "io.notes", {"tag": "work"}).share_id
    inside = {"_id": "in", "_rev": "1-" + "a" * 32, "doctype": "io.notes", "tag": "work"}
    outside = {"_id": "out", "_rev": "1-" + "b" * 32, "doctype": "io.notes", "tag": "home"}
    listed = d.handle("doc.list", {"credential": owner, "docs": [inside, outside],
                                   "share": share})
    assert [doc["_id"] for doc in listed["docs"]] == ["in"]
    assert d.handle("doc.count", {"credential": owner, "docs": [inside, outside],
                                  "share": share}) == 1
    with pytest.raises(NotFound):
        d.handle("doc.read", {"credential": owner, "doc": outside, "share": share})
    results = _batch(d, owner, [{"_id": "new", "doctype": "io.notes", "tag": "home"}],
                     share=share)
    assert results[0]["error"] == "forbidden"
    app = token.add_app("other", "io.tasks", "read")
    with pytest.raises(NotFound, match="Database does not exist"):
        d.handle("doc.list", {"credential": app, "docs": [], "share": share})
    with pytest.raises(NotFound, match="Database does not exist"):
        d.handle("doc.list", {"credential": owner, "docs": [], "share": "no-such-share"})
