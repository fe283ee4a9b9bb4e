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
