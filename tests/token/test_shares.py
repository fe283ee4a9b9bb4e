"""Sharing inside the token, on both keystores: share manifests, invitations, membership
changes, and the decisions the network and replication layers ask for.

`token` is the owner (node-a), `second_token` a joiner (node-b); `third_token` is one more
node, on a soft keystore."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from plugshare.sharing import manifest as mf
from plugshare.sharing.invitation import Invitation, InvitationError, InvalidTtl
from plugshare.sharing.manifest import Manifest, ShareRule
from plugshare.token.inside import (
    OWNER,
    AccessDenied,
    AlreadyExists,
    AuditEntry,
    AuthenticationError,
    InvalidArgument,
    InvitationRefused,
    LeaveRequestRefused,
    NotFound,
    RuleError,
    SoftKeystore,
    Token,
    fingerprint_of,
)
from plugshare.token import state as state_codec
from plugshare.token.audit import new_meta
from plugshare.token.shares import INVITATION_GRACE, LEAVE_DOMAIN

from .conftest import KeystoreFactory

NOTES = "io.plugshare.notes"
PHOTOS = "io.plugshare.photos"
ADDRESSES = [("127.0.0.1", 7400), ("::1", 7401)]
T0 = 1_700_000_000  # a fixed "now" for invitation times


@pytest.fixture
def third_token(tmp_path: Path) -> Iterator[Token]:
    token, _ = Token.create(
        tmp_path / "state-c", SoftKeystore(tmp_path / "keystore-c", None), name="node-c"
    )
    try:
        yield token
    finally:
        token.close()


class Mallory:
    """A key that is no member's: forges manifests and leave requests."""

    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.public_key = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.fingerprint = fingerprint_of(self.public_key)

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)


def invite(owner: Token, share: str, permission: str = "write", *, ttl: int = 3600,
           now: float | None = None) -> Invitation:
    code = owner.issue_invitation(
        share, permission=permission, ttl=ttl, addresses=ADDRESSES, now=now
    ).encode()
    return Invitation.decode(code)  # as the joiner gets it: a line of text


def redeem(owner: Token, joiner: Token, inv: Invitation, *, now: float | None = None,
           name: str | None = None) -> tuple[Manifest, bytes | None]:
    return owner.redeem_invitation(
        inv.share_id, inv.secret,
        joiner_public_key=joiner.public_key_bytes,
        joiner_name=name or joiner.name,
        joiner_x25519=joiner.x25519_public_bytes,
        now=now,
    )


def travelled(manifest: Manifest) -> Manifest:
    """The manifest as it arrives from the network (as a dict, decoded again)."""
    return Manifest.from_dict(msgpack.unpackb(msgpack.packb(manifest.to_dict()), raw=False))


def join(owner: Token, joiner: Token, share: str, permission: str = "write") -> Manifest:
    inv = invite(owner, share, permission)
    manifest, wrapped = redeem(owner, joiner, inv)
    return joiner.join_share(inv, travelled(manifest), wrapped)


def audited(token: Token, action: str, n: int = 200) -> list[AuditEntry]:
    return [e for e in token.audit_tail(n) if e.action == action]


def note(doc_id: str = "n1", **fields) -> dict:
    return {"_id": doc_id, "_rev": f"1-{'ab' * 16}", "doctype": NOTES, "author": "alice",
            "text": "hello", **fields}


def stored(sealed: dict, generation: int = 1) -> dict:
    return {**sealed, "_rev": f"{generation}-{'cd' * 16}"}


# --- creating and finding shares ------------------------------------------------------------


def test_create_share_signs_version_one_and_validates(token: Token) -> None:
    share = token.create_share("notes", NOTES, {"tags": {"$in": ["shared"]}})
    assert share.version == 1 and share.owner == token.fingerprint
    assert share.owner_key == token.public_key_bytes
    assert [(m.name, m.permission, m.status) for m in share.members] == [("node-a", "write", "active")]
    assert share.rule == ShareRule(NOTES, {"tags": {"$in": ["shared"]}})
    assert not share.encrypted and not token.has_share_key(share.share_id)
    mf.verify(share, Token.verify)  # signed by this token's key
    assert token.share("notes") == share == token.share(share.share_id)
    assert token.shares() == [share] and token.share_status("notes") == "owner"

    with pytest.raises(AlreadyExists, match="'notes'"):
        token.create_share("notes", PHOTOS)
    with pytest.raises(RuleError, match="unknown operator"):
        token.create_share("bad", NOTES, {"$nope": 1})
    with pytest.raises(RuleError, match="JSON object"):
        token.create_share("bad", NOTES, ["not", "a", "selector"])  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="share name"):
        token.create_share("", NOTES)
    with pytest.raises(RuleError, match="sealed"):  # could never match a sealed document
        token.create_share("secret", NOTES, {"place": "home"}, encrypted=True)
    with pytest.raises(NotFound, match="no share named 'photos'"):
        token.share("photos")
    assert token.shares() == [share]
    assert [e.allowed for e in audited(token, "create_share")] == [True]


def test_sign_refuses_the_share_domains(token: Token) -> None:
    for prefix in (mf.SIGNING_DOMAIN, LEAVE_DOMAIN):
        with pytest.raises(InvalidArgument, match="reserved"):
            token.sign(prefix + b"members: everyone")


def test_token_and_sharing_modules_import_in_either_order() -> None:
    for first in ("plugshare.sharing.invitation", "plugshare.sharing.manifest", "plugshare.token"):
        code = f"import {first}; from plugshare.token.inside import Token; Token.create_share"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


# --- the whole flow -------------------------------------------------------------------------


def test_create_invite_redeem_join_revoke(token: Token, second_token: Token) -> None:
    share = token.create_share("notes", NOTES)
    sid = share.share_id
    assert not token.may_connect(second_token.fingerprint)  # a stranger, nothing open
    inv = invite(token, "notes", "write")
    assert inv.owner_fingerprint == token.fingerprint and inv.share_id == sid
    assert inv.owner_addresses == tuple(ADDRESSES) and inv.permission == "write"
    # while an invitation is open, a stranger may connect, but only to redeem it
    assert token.may_connect(second_token.fingerprint)
    assert not token.is_known_member(second_token.fingerprint)

    manifest, wrapped = redeem(token, second_token, inv)
    assert wrapped is None and manifest.version == 2
    assert manifest.member(second_token.fingerprint) == mf.Member(
        second_token.fingerprint, "node-b", "write", "active", second_token.x25519_public_bytes
    )
    assert [p.node_id for p in token.list_peers()] == [second_token.node_id]  # pinned

    joined = second_token.join_share(inv, travelled(manifest), None)
    assert joined == manifest and second_token.shares() == [manifest]
    assert second_token.share_status("notes") == "active"
    assert [(p.node_id, p.name) for p in second_token.list_peers()] == [(token.node_id, "node-a")]
    for here, there in ((token, second_token), (second_token, token)):
        assert here.may_connect(there.fingerprint) and here.is_known_member(there.node_id)
        assert [m.share_id for m in here.common_shares(there.fingerprint)] == [sid]
        assert here.decide_outgoing(sid, there.fingerprint).allowed
    assert token.decide_incoming(sid, second_token.fingerprint, note()).allowed
    assert second_token.decide_incoming(sid, token.fingerprint, note()).allowed

    revoked = token.revoke_member("notes", "node-b")
    assert revoked.version == 3 and revoked.member(second_token.fingerprint).status == "revoked"
    refused = token.decide_incoming(sid, second_token.fingerprint, note("n2"))
    assert not refused.allowed and "revoked" in refused.reason
    assert not token.may_connect(second_token.fingerprint)
    assert not token.decide_outgoing(sid, second_token.fingerprint).allowed

    # the member learns it from any peer; it keeps the manifest to show "revoked"
    held, changed = second_token.accept_manifest(travelled(revoked), sender=token.fingerprint)
    assert changed and held == revoked
    assert second_token.accept_manifest(travelled(revoked)) == (revoked, False)
    assert second_token.share_status(sid) == "revoked" and second_token.shares() == [revoked]
    assert second_token.common_shares(token.fingerprint) == []
    assert not second_token.may_connect(token.fingerprint)
    out = second_token.decide_outgoing(sid, token.fingerprint)
    assert not out.allowed and "revoked" in out.reason
    assert not second_token.decide_incoming(sid, token.fingerprint, note("n3")).allowed

    joins = audited(token, "redeem_invitation")
    assert [(e.principal, e.allowed) for e in joins] == [(f"peer:{second_token.node_id}", True)]
    assert [e.allowed for e in audited(second_token, "accept_manifest")] == [True]
    assert [e.allowed for e in audited(second_token, "join_share")] == [True]


def test_encrypted_share_key_reaches_the_joiner_and_is_gone_after_revocation(
    token: Token, second_token: Token
) -> None:
    share = token.create_share("trip", NOTES, {"author": "alice"}, encrypted=True)
    sid = share.share_id
    assert share.encrypted and token.has_share_key(sid)
    inv = invite(token, "trip")
    manifest, wrapped = redeem(token, second_token, inv)
    assert isinstance(wrapped, bytes)
    # the key must come with an encrypted share; a refusal stores nothing
    with pytest.raises(InvalidArgument, match="encrypted"):
        second_token.join_share(inv, manifest, None)
    assert second_token.shares() == [] and not second_token.has_share_key(sid)
    second_token.join_share(inv, manifest, wrapped)
    assert second_token.has_share_key(sid)

    # the joiner seals for the share, the owner opens it, and the owner's token accepts it
    sealed = stored(second_token.encrypt_doc(note("trip-1"), generation=1, share_id=sid))
    assert "text" not in sealed
    assert token.decrypt_doc(sealed, OWNER)["text"] == "hello"
    assert token.decide_incoming(sid, second_token.fingerprint, sealed).allowed
    in_clear = token.decide_incoming(sid, second_token.fingerprint, note("trip-2"))
    assert not in_clear.allowed and "in clear" in in_clear.reason
    token.mark_sensitive(NOTES)  # a key of this doctype, not of the share
    other_key = stored(token.encrypt_doc(note("trip-3"), generation=1))
    wrong = token.decide_incoming(sid, second_token.fingerprint, other_key)
    assert not wrong.allowed and "not a key of share 'trip'" in wrong.reason
    tombstone = {"_id": "trip-1", "_rev": "2-ef", "_deleted": True, "doctype": NOTES}
    assert token.decide_incoming(sid, second_token.fingerprint, tombstone).allowed

    revoked = token.revoke_member("trip", second_token.fingerprint)
    second_token.accept_manifest(travelled(revoked), sender=token.node_id)
    assert not second_token.has_share_key(sid)
    with pytest.raises(AccessDenied, match="this node was revoked from share 'trip'"):
        second_token.decrypt_doc(sealed, OWNER)
    with pytest.raises(AccessDenied, match="revoked"):
        second_token.encrypt_doc(note("late"), generation=1, share_id=sid)


# --- invitations ------------------------------------------------------------------------------


def test_an_invitation_admits_one_node_only(
    token: Token, second_token: Token, third_token: Token
) -> None:
    token.create_share("notes", NOTES)
    inv = invite(token, "notes", "read")
    first, _ = redeem(token, second_token, inv)
    with pytest.raises(InvitationRefused, match="already used by another node"):
        redeem(token, third_token, inv)
    # the same joiner again (its answer was lost): the same manifest, nothing more
    again, _ = redeem(token, second_token, inv)
    assert again == first and token.share("notes").version == 2
    assert not token.may_connect(third_token.fingerprint)  # nothing open any more
    refusal = audited(token, "redeem_invitation")[1]
    assert refusal.principal == f"peer:{third_token.node_id}" and not refusal.allowed
    assert "already used" in refusal.reason
    # a fresh code still works for the third node
    join(token, third_token, "notes")
    assert token.share("notes").may_write(third_token.fingerprint)
    assert not token.share("notes").may_write(second_token.fingerprint)


def test_an_expired_invitation_is_refused_and_uses_nothing(
    token: Token, second_token: Token, third_token: Token
) -> None:
    token.create_share("notes", NOTES)
    inv = invite(token, "notes", ttl=60, now=T0)
    assert inv.expires_at == T0 + 60
    assert token.may_connect(second_token.fingerprint, now=T0 + 59)
    assert not token.may_connect(second_token.fingerprint, now=T0 + 60)
    with pytest.raises(InvitationRefused, match="expired"):
        redeem(token, second_token, inv, now=T0 + 60)
    assert token.share("notes").version == 1 and token.list_peers() == []
    manifest, _ = redeem(token, second_token, inv, now=T0 + 59)  # still unused
    assert manifest.is_active_member(second_token.fingerprint)

    # long-expired records are pruned: the code is then simply unknown
    stale = invite(token, "notes", ttl=60, now=T0)
    invite(token, "notes", ttl=60, now=T0 + 60 + INVITATION_GRACE)
    with pytest.raises(InvitationRefused, match="unknown invitation"):
        redeem(token, third_token, stale, now=T0 + 61 + INVITATION_GRACE)

    with pytest.raises(InvalidTtl):
        token.issue_invitation("notes", permission="read", ttl=0, addresses=ADDRESSES)
    with pytest.raises(InvalidTtl, match="at most 365 days"):
        token.issue_invitation("notes", permission="read", ttl=400 * 86400, addresses=ADDRESSES)
    with pytest.raises(InvitationError, match="permission"):
        token.issue_invitation("notes", permission="admin", ttl=60, addresses=ADDRESSES)


def test_invitation_refusals_name_the_reason(
    token: Token, second_token: Token, third_token: Token
) -> None:
    notes = token.create_share("notes", NOTES)
    token.create_share("photos", PHOTOS)
    photos_inv = invite(token, "photos")
    with pytest.raises(InvitationRefused, match="for another share"):
        token.redeem_invitation(
            notes.share_id, photos_inv.secret, joiner_public_key=second_token.public_key_bytes,
            joiner_name="node-b", joiner_x25519=second_token.x25519_public_bytes,
        )
    with pytest.raises(InvitationRefused, match="unknown invitation"):
        token.redeem_invitation(
            notes.share_id, b"\x01" * 16, joiner_public_key=second_token.public_key_bytes,
            joiner_name="node-b", joiner_x25519=second_token.x25519_public_bytes,
        )
    with pytest.raises(InvalidArgument, match="Ed25519"):
        token.redeem_invitation(
            photos_inv.share_id, photos_inv.secret, joiner_public_key=b"short",
            joiner_name="node-b", joiner_x25519=second_token.x25519_public_bytes,
        )
    with pytest.raises(InvalidArgument, match="member name"):
        redeem(token, second_token, photos_inv, name=" padded ")
    with pytest.raises(InvalidArgument, match="owner"):
        redeem(token, token, photos_inv)
    # none of that used the photos invitation up
    join(token, second_token, "notes")
    manifest, _ = redeem(token, second_token, photos_inv)
    assert manifest.is_active_member(second_token.fingerprint)

    # an active member presenting another code: refused, and the code stays usable
    spare = invite(token, "notes")
    with pytest.raises(InvitationRefused, match="already an active member"):
        redeem(token, second_token, spare)
    redeem(token, third_token, spare)

    # only the owner invites
    with pytest.raises(AccessDenied, match="only the owner"):
        second_token.issue_invitation("notes", permission="read", ttl=60, addresses=ADDRESSES)
    assert [e.allowed for e in audited(second_token, "issue_invitation")] == [False]
    refusals = [e for e in audited(token, "redeem_invitation") if not e.allowed]
    assert len(refusals) == 6 and all(e.reason for e in refusals)


def test_a_revoked_member_may_be_invited_again(token: Token, second_token: Token) -> None:
    share = token.create_share("notes", NOTES)
    join(token, second_token, "notes", "write")
    revoked = token.revoke_member("notes", second_token.node_id)
    second_token.accept_manifest(revoked)
    manifest = join(token, second_token, "notes", "read")
    assert manifest.version == 4
    assert manifest.member(second_token.fingerprint) == mf.Member(
        second_token.fingerprint, "node-b", "read", "active", second_token.x25519_public_bytes
    )
    assert second_token.share_status(share.share_id) == "active"
    assert token.is_known_member(second_token.fingerprint)
    assert not token.decide_incoming(share.share_id, second_token.fingerprint, note()).allowed
    assert not second_token.decide_outgoing(share.share_id, token.fingerprint).allowed  # read-only
    assert token.decide_outgoing(share.share_id, second_token.fingerprint).allowed


# --- manifests from peers ---------------------------------------------------------------------


def test_forged_replayed_and_unsigned_manifests_are_refused(
    token: Token, second_token: Token, third_token: Token
) -> None:
    share = token.create_share("notes", NOTES)
    v2 = join(token, second_token, "notes")
    v3, _ = redeem(token, third_token, invite(token, "notes"))
    assert second_token.accept_manifest(travelled(v3), sender=token.fingerprint) == (v3, True)
    mallory = Mallory()
    everyone_writes = tuple(attrs.evolve(m, permission="write") for m in v3.members)
    forged = mf.sign(attrs.evolve(v3, members=everyone_writes, version=4), mallory.sign)
    own = mf.sign(
        Manifest.create(name="notes", owner_key=mallory.public_key, owner_name="mallory",
                        rule=share.rule, share_id=share.share_id),
        mallory.sign,
    )
    unsigned = mf.revoke(v3, second_token.fingerprint)  # the owner never signed this v4
    other = token.create_share("other", PHOTOS)  # a share the member never joined
    sender = third_token.fingerprint
    with pytest.raises(mf.BadSignature):
        second_token.accept_manifest(forged, sender=sender)
    with pytest.raises(mf.OwnerChanged):
        second_token.accept_manifest(own, sender=sender)
    with pytest.raises(mf.StaleManifest):
        second_token.accept_manifest(travelled(v2), sender=sender)
    with pytest.raises(mf.UnsignedManifest):
        second_token.accept_manifest(unsigned, sender=sender)
    with pytest.raises(NotFound, match="only by creating or joining"):
        second_token.accept_manifest(other, sender=sender)
    with pytest.raises(mf.MalformedManifest):
        second_token.accept_manifest(v3.to_dict(), sender=sender)  # type: ignore[arg-type]
    assert second_token.share("notes") == v3 and second_token.share_status("notes") == "active"
    refusals = [e for e in audited(second_token, "accept_manifest") if not e.allowed]
    assert len(refusals) == 6
    assert {e.principal for e in refusals} == {f"peer:{third_token.node_id}"}
    # a joiner checks the first manifest against the owner named by the invitation
    inv = invite(token, "other")
    with pytest.raises(mf.OwnerChanged):
        third_token.join_share(inv, mf.sign(attrs.evolve(own, share_id=other.share_id),
                                             mallory.sign), None)
    with pytest.raises(mf.MembershipError, match="does not list this node"):
        third_token.join_share(inv, other, None)  # signed, but not admitting it
    with pytest.raises(InvalidArgument, match="owns that share"):
        token.join_share(inv, other, None)
    assert third_token.shares() == []  # it never joined: all of that stored nothing


# --- decisions ----------------------------------------------------------------------------


def test_decide_incoming_checks_membership_permission_and_scope(
    token: Token, second_token: Token, third_token: Token
) -> None:
    share = token.create_share("notes", NOTES, {"tags": {"$in": ["shared"]}})
    sid = share.share_id
    join(token, second_token, "notes", "write")
    join(token, third_token, "notes", "read")
    writer, reader = second_token.fingerprint, third_token.fingerprint
    shared = note("n1", tags=["shared"])

    def refused(sender: bytes, meta: dict, share_id: str = sid, **kw) -> str:
        decision = token.decide_incoming(share_id, sender, meta, **kw)
        assert not decision.allowed
        return decision.reason

    assert token.decide_incoming(sid, writer, shared).allowed
    assert "only has read permission" in refused(reader, shared)
    assert "is not a member" in refused(Mallory().fingerprint, shared)
    assert "not held" in refused(writer, shared, share_id="no-such-share")
    assert "not 'io.plugshare.notes'" in refused(writer, {**shared, "doctype": PHOTOS})
    assert "selector" in refused(writer, note("n2", tags=["private"]))
    assert "selector" in refused(writer, note("n3"))  # no tags at all
    assert "not an object" in refused(writer, ["n1"])  # type: ignore[arg-type]
    # a tombstone carries only its doctype: enough, but it is needed
    tombstone = {"_id": "n1", "_rev": "2-ef", "_deleted": True, "doctype": NOTES}
    assert token.decide_incoming(sid, writer, tombstone).allowed
    assert "no doctype" in refused(writer, {"_id": "n1", "_rev": "2-ef", "_deleted": True})
    # a local document outside the share is neither overwritten nor deleted by a member
    private = note("n1", tags=["private"])
    assert "outside share" in refused(writer, shared, existing=private)
    assert "outside share" in refused(writer, tombstone, existing=private)
    assert token.decide_incoming(sid, writer, shared, existing=note("n1", tags=["shared"]))

    assert token.share_in_scope(sid, shared) and token.share_in_scope(sid, tombstone)
    assert not token.share_in_scope(sid, note("n2", tags=["private"]))
    assert not token.share_in_scope("no-such-share", shared)

    token.revoke_member("notes", "node-b")
    assert "revoked" in refused(writer, shared)
    receives = audited(token, "share-receive")
    assert len(receives) == 14
    assert receives[0].allowed and receives[0].doc_id == "n1" and receives[0].doctype == NOTES
    assert receives[0].principal == f"peer:{second_token.node_id}"
    assert [e.doc_id for e in receives if not e.allowed][:2] == ["n1", "n1"]


def test_decide_outgoing_and_common_shares(
    token: Token, second_token: Token, third_token: Token
) -> None:
    notes = token.create_share("notes", NOTES)
    photos = token.create_share("photos", PHOTOS)
    join(token, second_token, "notes")
    join(token, second_token, "photos")
    join(token, third_token, "photos")
    assert [m.name for m in token.common_shares(second_token.fingerprint)] == ["notes", "photos"]
    assert [m.name for m in token.common_shares(third_token.fingerprint)] == ["photos"]
    assert token.common_shares(token.fingerprint) == []
    # members of a share may sync directly, without the owner
    second_token.accept_manifest(token.share("photos"))
    assert second_token.may_connect(third_token.fingerprint)
    assert second_token.decide_outgoing(photos.share_id, third_token.fingerprint).allowed
    refusal = second_token.decide_outgoing(notes.share_id, third_token.fingerprint)
    assert not refusal.allowed and "not a member" in refusal.reason
    assert not token.decide_outgoing(notes.share_id, token.fingerprint).allowed
    assert not token.decide_outgoing("no-such-share", second_token.fingerprint).allowed
    sends = audited(second_token, "share-send")
    assert [e.allowed for e in sends] == [True, False]
    assert sends[1].principal == f"peer:{third_token.node_id}"


def test_shares_of_the_same_name_are_told_apart_by_id(token: Token, second_token: Token) -> None:
    theirs = token.create_share("notes", NOTES)
    ours = second_token.create_share("notes", NOTES)
    join(token, second_token, "notes")
    with pytest.raises(InvalidArgument, match="name one by its id"):
        second_token.share("notes")
    assert second_token.share(theirs.share_id).owner == token.fingerprint
    assert second_token.share(ours.share_id) == ours


# --- leaving -------------------------------------------------------------------------------


def test_leave_request_flow(token: Token, second_token: Token, third_token: Token) -> None:
    share = token.create_share("notes", NOTES, encrypted=True)
    sid = share.share_id
    join(token, second_token, "notes")
    join(token, third_token, "notes")
    request = second_token.leave_request("notes")
    # signed on the manifest it holds (v2: it has not seen v3, which admitted node-c)
    assert request["purpose"] == "plugshare/leave-request/v1" and request["version"] == 2
    second_token.leave_share("notes")
    second_token.leave_share("notes")  # leaving twice does nothing
    assert second_token.share_status(sid) == "left" and not second_token.has_share_key(sid)
    assert second_token.common_shares(token.fingerprint) == []
    assert not second_token.decide_outgoing(sid, token.fingerprint).allowed
    left = second_token.decide_incoming(sid, token.fingerprint, note())
    assert not left.allowed and "left" in left.reason

    # only the member itself, signing with its pinned key, can ask
    with pytest.raises(AuthenticationError, match="another member"):
        token.apply_leave_request(request, third_token.fingerprint)
    with pytest.raises(AuthenticationError, match="not signed"):
        token.apply_leave_request({**request, "version": 3}, second_token.fingerprint)
    with pytest.raises(InvalidArgument, match="fields"):
        token.apply_leave_request({"purpose": request["purpose"]}, second_token.fingerprint)
    with pytest.raises(AccessDenied, match="only the owner"):
        third_token.apply_leave_request(request, second_token.fingerprint)
    v4 = token.apply_leave_request(msgpack.unpackb(msgpack.packb(request)), second_token.node_id)
    assert v4.version == 4 and v4.member(second_token.fingerprint) is None
    assert token.apply_leave_request(request, second_token.fingerprint) == v4  # already gone
    assert not token.may_connect(second_token.fingerprint)
    assert third_token.accept_manifest(v4)[1] and third_token.share_status(sid) == "active"

    # invited again, the old request cannot throw it out: a replay
    again = join(token, second_token, "notes")
    assert again.version == 5 and second_token.share_status(sid) == "active"
    assert second_token.has_share_key(sid)
    with pytest.raises(LeaveRequestRefused, match="replay"):
        token.apply_leave_request(request, second_token.fingerprint)
    with pytest.raises(LeaveRequestRefused, match="only at v5"):
        forged_version = {**request, "version": 9}
        forged_version["signature"] = second_token._identity.sign(
            LEAVE_DOMAIN + msgpack.packb([sid, second_token.fingerprint, 9])
        ).hex()
        token.apply_leave_request(forged_version, second_token.fingerprint)
    assert token.share("notes").is_active_member(second_token.fingerprint)

    with pytest.raises(mf.MembershipError, match="owner cannot leave"):
        token.leave_share("notes")
    with pytest.raises(mf.MembershipError, match="owner cannot leave"):
        token.leave_request("notes")
    applied = audited(token, "apply_leave_request")
    assert [e.allowed for e in applied] == [False, False, False, True, True, False, False]


# --- persistence ----------------------------------------------------------------------------


def test_the_share_book_survives_close_and_reopen(
    token: Token, make_keystore: KeystoreFactory, second_token: Token, third_token: Token,
    tmp_path: Path,
) -> None:
    share = token.create_share("trip", NOTES, encrypted=True)
    sid = share.share_id
    used = invite(token, "trip")
    redeem(token, second_token, used)
    open_inv = invite(token, "trip", "read")
    member, _ = Token.create(tmp_path / "state-m", SoftKeystore(tmp_path / "ks-m", None),
                             name="node-m")
    try:
        join(token, member, "trip")
        request = member.leave_request("trip")
        member.leave_share("trip")
        state_dir = member._dir
        member.close()
        member = Token.open(state_dir, SoftKeystore(tmp_path / "ks-m", None))
        assert member.share_status(sid) == "left" and not member.has_share_key(sid)
        assert not member.decide_outgoing(sid, token.fingerprint).allowed
        assert member.leave_request("trip")["version"] == request["version"]
    finally:
        member.close()

    held = token.shares()
    state_dir = token._dir
    token.close()
    token = Token.open(state_dir, make_keystore())
    try:
        assert token.shares() == held and token.share_status("trip") == "owner"
        assert token.has_share_key(sid)
        with pytest.raises(InvitationRefused, match="already used"):
            redeem(token, third_token, used)
        assert token.may_connect(third_token.fingerprint)  # the open one is still open
        manifest, wrapped = redeem(token, third_token, open_inv)
        assert manifest.member(third_token.fingerprint).permission == "read"
        third_token.join_share(open_inv, manifest, wrapped)
        assert third_token.has_share_key(sid)
        assert token.is_known_member(second_token.fingerprint)
        token.apply_leave_request(request, member.fingerprint)
        assert token.audit_verify()[0]
    finally:
        token.close()


def test_a_state_sealed_before_sharing_still_loads() -> None:
    from plugshare.token.credentials import new_credential

    state = state_codec.TokenState(
        name="n", signing_key=b"s" * 32, agreement_key=b"a" * 32, audit_key=b"k" * 32,
        owner=new_credential()[1], current_master=1, next_rule=1,
    )
    doc = msgpack.unpackb(state_codec.encode(state, new_meta(b"f" * 32)), raw=False)
    del doc["state"]["shares"], doc["state"]["invitations"]  # as an older token sealed it
    loaded, _ = state_codec.decode(msgpack.packb(doc, use_bin_type=True), "old state")
    assert loaded.shares == {} and loaded.invitations == {}
    assert loaded.name == "n" and loaded.signing_key == b"s" * 32
