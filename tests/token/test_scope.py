"""A document's doctype is fixed at creation, whichever way a write comes (an app or the
owner through the door, a replicated batch), decided by the token."""

from __future__ import annotations

import pytest

from plugshare.token.door import Door
from plugshare.token.inside import AccessDenied, InvalidArgument, Token

from .test_shares import NOTES, PHOTOS, join, note

TOMBSTONE_REV = "2-" + "e" * 32


def _write(door: Door, credential: str, doc: dict, current: dict | None, generation: int = 3):
    return door.handle("doc.write", {"credential": credential, "doc": doc, "current": current,
                                     "generation": generation})


def test_a_write_may_not_change_a_doctype_even_over_a_tombstone(token_and_owner) -> None:
    token, owner = token_and_owner
    door = Door(token)
    live = note("n1")
    tombstone = {"_id": "n1", "_rev": TOMBSTONE_REV, "_deleted": True, "doctype": NOTES}
    for current in (live, tombstone):
        with pytest.raises(InvalidArgument) as refused:
            _write(door, owner, {"_id": "n1", "doctype": PHOTOS, "t": 1}, current)
        assert repr(NOTES) in str(refused.value) and repr(PHOTOS) in str(refused.value)
    # the same doctype is re-created after its tombstone, as before
    assert _write(door, owner, {"_id": "n1", "doctype": NOTES, "t": 1}, tombstone)["doc"]
    # an app that may not write the old doctype is not told what it was
    app = token.add_app("photos", PHOTOS, "write")
    with pytest.raises(AccessDenied) as refused:
        _write(door, app, {"_id": "n1", "doctype": PHOTOS}, tombstone)
    assert NOTES not in str(refused.value)
    refusals = [e for e in token.audit_tail(10) if e.action == "write" and not e.allowed]
    assert len(refusals) == 3


def test_a_replicated_doc_may_not_change_the_doctype_of_the_local_one(
    token: Token, second_token: Token
) -> None:
    share = token.create_share("photos", PHOTOS)
    join(token, second_token, "photos", "write")
    incoming = {**note("n1"), "doctype": PHOTOS, "_rev": "2-" + "f" * 32}
    for local in (note("n1"), {"_id": "n1", "_rev": TOMBSTONE_REV, "_deleted": True,
                               "doctype": NOTES}):
        decision = token.decide_incoming(share.share_id, second_token.fingerprint, incoming,
                                         existing=local)
        assert not decision.allowed
        assert repr(NOTES) in decision.reason and repr(PHOTOS) in decision.reason


def test_a_write_that_takes_a_doc_out_of_owned_shares_answers_one_removal_each(
    token_and_owner, second_token: Token
) -> None:
    token, owner = token_and_owner
    door = Door(token)
    work = token.create_share("work", NOTES, {"subject": "work"}).share_id
    alices = token.create_share("alices", NOTES, {"author": "alice"}).share_id
    joined = second_token.create_share("theirs", NOTES, {"subject": "work"})
    join(second_token, token, "theirs", "write")
    read_only = second_token.create_share("watched", NOTES, {"subject": "work"})
    join(second_token, token, "watched", "read")
    current = note("n1", subject="work")  # in work, alices, theirs and watched
    edit = {"_id": "n1", "_rev": current["_rev"], "doctype": NOTES, "subject": "home",
            "author": "alice"}

    removals = _write(door, owner, edit, current, 2)["removals"]
    # Out of "work" and "theirs" (a writer may delete there, so it may edit a doc out), not
    # of "alices" (still in scope) nor "watched" (read-only here: not this node's to empty).
    assert sorted(r["left_share"] for r in removals) == sorted([work, joined.share_id])
    assert read_only.share_id not in {r["left_share"] for r in removals}
    removal = next(r for r in removals if r["left_share"] == work)
    assert removal["_deleted"] is True and removal["doctype"] == NOTES
    assert removal["_rev"].startswith("2-") and removal["_rev"] != current["_rev"]
    assert removal["_revisions"] == {"start": 2, "ids": [removal["_rev"][2:],
                                                         current["_rev"][2:]]}
    # Deterministic: the same write over the same revision answers the same removal.
    assert _write(door, owner, edit, current, 2)["removals"] == removals
    # Only its own share carries it; each member applies it like a deletion.
    assert token.share_in_scope(work, removal)
    assert not token.share_in_scope(alices, removal)
    assert not token.share_in_scope(joined.share_id, removal)
    # Nothing to remove: an edit that stays in scope, a re-creation over a tombstone.
    assert _write(door, owner, {**edit, "subject": "work"}, current, 2)["removals"] == []
    tombstone = {"_id": "n1", "_rev": TOMBSTONE_REV, "_deleted": True, "doctype": NOTES}
    assert "removals" not in _write(door, owner, edit, tombstone)
    # nor an edit of a losing leaf (the winner, in the share, stays)
    assert "removals" not in _write(door, owner, {**edit, "_rev": "1-" + "9" * 32}, current, 2)
    entries = [e for e in token.audit_tail(50) if e.action == "share-remove"]
    assert len(entries) == 4 and all(e.allowed and e.doc_id == "n1" for e in entries)


def test_a_member_takes_a_removal_like_a_deletion(token_and_owner, second_token: Token) -> None:
    token, owner = token_and_owner
    share = token.create_share("work", NOTES, {"subject": "work"})
    join(token, second_token, "work", "write")
    door = Door(token)
    current = note("n1", subject="work")
    (removal,) = door.handle("doc.write", {
        "credential": owner, "doc": {**current, "subject": "home"},
        "current": current, "generation": 2})["removals"]
    decision = second_token.decide_incoming(share.share_id, token.fingerprint, removal,
                                            existing=current)
    assert decision.allowed, decision.reason
    # but a removal from another share is not this share's to carry
    other = {**removal, "left_share": "another-share"}
    refused = second_token.decide_incoming(share.share_id, token.fingerprint, other,
                                           existing=current)
    assert not refused.allowed and "another share" in refused.reason


def test_a_stored_doc_with_a_malformed_rev_is_refused_not_a_crash(token_and_owner) -> None:
    token, owner = token_and_owner
    token.create_share("work", NOTES, {"subject": "work"})
    current = {**note("n1", subject="work"), "_rev": "not-a-rev"}
    with pytest.raises(InvalidArgument, match="N-hash"):
        _write(Door(token), owner, {**current, "subject": "home"}, current, 2)
