"""Share key rotation, key grants and expiry in the token, on both keystores.

`token` is the owner (node-a), `second_token` a member (node-b, same keystore kind),
`third_token` and `fourth_token` more members (soft keystores). Times are explicit `now`
values or a clock patched into the token module: nothing sleeps."""

from __future__ import annotations

import shutil
import time
import types
from collections.abc import Iterator
from pathlib import Path

import attrs
import msgpack
import pytest

from plugshare.sharing import manifest as mf
from plugshare.sharing.manifest import Manifest
from plugshare.token.inside import (
    OWNER,
    AccessDenied,
    InvalidArgument,
    InvitationRefused,
    NotFound,
    RollbackError,
    SoftKeystore,
    Token,
)
from plugshare.token import sharekey
from plugshare.token import token as token_module
from plugshare.token.envelope import sealed_kid
from plugshare.token.identity import Identity, verify_signature

from .test_shares import NOTES, audited, invite, join, note, redeem, stored, travelled


def _soft_token(tmp_path: Path, name: str) -> Iterator[Token]:
    token, _ = Token.create(
        tmp_path / f"state-{name}", SoftKeystore(tmp_path / f"keystore-{name}", None), name=name
    )
    try:
        yield token
    finally:
        token.close()


@pytest.fixture
def third_token(tmp_path: Path) -> Iterator[Token]:
    yield from _soft_token(tmp_path, "node-c")


@pytest.fixture
def fourth_token(tmp_path: Path) -> Iterator[Token]:
    yield from _soft_token(tmp_path, "node-d")


class Clock:
    """A clock patched into the token module, so lazy expiry checks see a chosen time."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = time.time()
        fake = types.SimpleNamespace(
            time=lambda: self.now, monotonic=time.monotonic, strftime=time.strftime,
            gmtime=time.gmtime,
        )
        monkeypatch.setattr(token_module, "time", fake)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    return Clock(monkeypatch)


def seal(owner: Token, share_id: str, doc_id: str) -> dict:
    return stored(owner.encrypt_doc(note(doc_id), generation=1, share_id=share_id))


def snapshot(token: Token, where: Path) -> Path:
    """A copy of the token's state directory as it is on disk now (what a thief keeps)."""
    token.flush()
    shutil.copytree(token._dir, where)
    return where


def reopen(token: Token) -> Token:
    token.close()
    return Token.open(token._dir, token._keystore)


def restore(copy: Path, state_dir: Path) -> None:
    shutil.rmtree(state_dir)
    shutil.copytree(copy, state_dir)


def share_data_keys(token: Token, share_id: str) -> list[str]:
    """The data key records of a share in the token's (sealed) state."""
    return [k for k, r in token._state.data_keys.items() if r.scope == f"share:{share_id}"]


# --- rotation on revoke ---------------------------------------------------------------------


def test_revoking_a_member_rotates_the_key_and_only_the_others_get_it(
    token: Token, second_token: Token, third_token: Token, tmp_path: Path
) -> None:
    share = token.create_share("trip", NOTES, encrypted=True)
    sid, k1 = share.share_id, share.key_id
    assert k1 is not None and token.share_key_ids(sid) == (k1,)
    join(token, second_token, "trip")
    join(token, third_token, "trip")
    before = seal(token, sid, "before")
    assert second_token.decrypt_doc(before, OWNER)["text"] == "hello"
    stolen = snapshot(second_token, tmp_path / "b-copy")  # node-b's home, kept by its owner

    revoked = token.revoke_member("trip", second_token.fingerprint)
    k2 = revoked.key_id
    assert k2 is not None and k2 != k1 and token.share_key_ids(sid) == (k1, k2)
    after = seal(token, sid, "after")
    assert sealed_kid(after) == k2  # written from now on under the new key
    assert token.decrypt_doc(before, OWNER)["text"] == token.decrypt_doc(after, OWNER)["text"]

    grants = token.key_grants(sid)
    assert set(grants) == {third_token.fingerprint}  # not the revoked member, not the owner
    assert token.key_grants(sid) == grants  # made once per key and member, then kept

    # the remaining member lacks the new key until it takes its grant with the manifest
    assert not third_token.has_current_share_key(sid) or third_token.share(sid).key_id != k2
    held, changed = third_token.accept_manifest(travelled(revoked), grants, sender=token.node_id)
    assert changed and held == revoked and third_token.has_current_share_key(sid)
    assert third_token.share_key_ids(sid) == (k1, k2)
    assert third_token.decrypt_doc(after, OWNER)["text"] == "hello"
    assert third_token.decrypt_doc(before, OWNER)["text"] == "hello"
    assert [e.allowed for e in audited(third_token, "accept_key_grant")] == [True]

    # node-b has not heard of its revocation (offline, or its copy): it holds the old key only
    assert second_token.decrypt_doc(before, OWNER)["text"] == "hello"  # the past stays readable
    with pytest.raises(NotFound, match=f"holds no key {k2}"):
        second_token.decrypt_doc(after, OWNER)
    # node-c's grant, put under node-b's name with the manifest node-b holds, opens nothing
    second_token.accept_manifest(second_token.share(sid), {second_token.fingerprint: grants[
        third_token.fingerprint]})
    assert second_token.share_key_ids(sid) == (k1,)
    refused = audited(second_token, "accept_key_grant")
    assert [e.allowed for e in refused] == [False] and "refused" in refused[0].reason

    # once it learns it, its keys are destroyed: nothing of the share opens there any more
    second_token.accept_manifest(travelled(revoked), grants, sender=token.node_id)
    assert second_token.share_key_ids(sid) == () and share_data_keys(second_token, sid) == []
    for doc in (before, after):
        with pytest.raises(AccessDenied, match="this node was revoked from share 'trip'"):
            second_token.decrypt_doc(doc, OWNER)
    destroyed = audited(second_token, "destroy_share_key")
    assert len(destroyed) == 1 and "revoked" in destroyed[0].reason
    assert second_token.key_grants(sid) == {}  # a revoked member forwards nothing

    # its home put back as it was before: the rollback anchor refuses it
    state_dir = second_token._dir
    second_token.close()
    restore(stolen, state_dir)
    with pytest.raises(RollbackError, match="older copy"):
        Token.open(state_dir, second_token._keystore)


def test_the_copy_of_a_revoked_members_state_cannot_open_later_documents(
    token: Token, second_token: Token, third_token: Token, tmp_path: Path
) -> None:
    """Even a state copy that the anchor accepts (the member never saw its revocation and
    was not used since) holds only keys that documents written after it no longer use."""
    share = token.create_share("trip", NOTES, encrypted=True)
    sid = share.share_id
    join(token, second_token, "trip")
    join(token, third_token, "trip")
    copy = snapshot(second_token, tmp_path / "b-copy")
    state_dir = second_token._dir
    second_token.close()
    token.revoke_member("trip", second_token.fingerprint)
    third_token.accept_manifest(travelled(token.share(sid)), token.key_grants(sid))
    later = [seal(token, sid, "by-owner"), seal(third_token, sid, "by-member")]
    restore(copy, state_dir)
    thief = Token.open(state_dir, second_token._keystore)
    try:
        assert thief.share_status(sid) == "active"  # it does not know
        for doc in later:
            with pytest.raises(NotFound, match="holds no key"):
                thief.decrypt_doc(doc, OWNER)
        assert not thief.decide_incoming(sid, token.fingerprint, later[0]).allowed
    finally:
        thief.close()


# --- rotation on leave ----------------------------------------------------------------------


def test_applying_a_leave_rotates_the_key(
    token: Token, second_token: Token, third_token: Token
) -> None:
    share = token.create_share("trip", NOTES, encrypted=True)
    sid, k1 = share.share_id, share.key_id
    join(token, second_token, "trip")
    join(token, third_token, "trip")
    before = seal(token, sid, "before")
    request = second_token.leave_request("trip")
    second_token.leave_share("trip")
    assert second_token.share_key_ids(sid) == () and share_data_keys(second_token, sid) == []
    assert "left" in audited(second_token, "destroy_share_key")[0].reason

    smaller = token.apply_leave_request(request, second_token.fingerprint)
    k2 = smaller.key_id
    assert k2 not in (None, k1) and token.share_key_ids(sid) == (k1, k2)
    after = seal(token, sid, "after")
    assert sealed_kid(after) == k2
    grants = token.key_grants(sid)
    assert set(grants) == {third_token.fingerprint}
    third_token.accept_manifest(travelled(smaller), grants)
    assert third_token.decrypt_doc(after, OWNER)["text"] == "hello"
    with pytest.raises(AccessDenied, match="this node left share 'trip'"):
        second_token.decrypt_doc(before, OWNER)
    with pytest.raises(NotFound, match="holds no key"):  # a key it never had
        second_token.decrypt_doc(after, OWNER)
    # the one who left learns it was removed, and still opens nothing
    second_token.accept_manifest(travelled(smaller), grants)
    with pytest.raises(AccessDenied, match="left share 'trip'"):
        second_token.decrypt_doc(after, OWNER)
    assert second_token.share_key_ids(sid) == ()


def test_a_rejoined_member_gets_every_key(token: Token, second_token: Token) -> None:
    share = token.create_share("trip", NOTES, encrypted=True)
    sid = share.share_id
    join(token, second_token, "trip")
    second_token.accept_manifest(travelled(token.revoke_member("trip", second_token.node_id)))
    assert second_token.share_key_ids(sid) == ()
    during = seal(token, sid, "during")
    assert len(token.share_key_ids(sid)) == 2 and sealed_kid(during) == token.share_key_ids(sid)[-1]
    join(token, second_token, "trip", "read")
    assert second_token.share_key_ids(sid) == token.share_key_ids(sid)
    assert second_token.has_current_share_key(sid)
    assert second_token.decrypt_doc(during, OWNER)["text"] == "hello"


# --- grants ---------------------------------------------------------------------------------


def test_forged_altered_and_misdirected_grants_are_refused(
    token: Token, second_token: Token, third_token: Token, fourth_token: Token
) -> None:
    share = token.create_share("trip", NOTES, encrypted=True)
    sid = share.share_id
    for member in (second_token, third_token, fourth_token):
        join(token, member, "trip")
    revoked = token.revoke_member("trip", fourth_token.fingerprint)
    after = seal(token, sid, "after")
    grants = token.key_grants(sid)
    b, c = second_token.fingerprint, third_token.fingerprint
    assert set(grants) == {b, c}
    mine = grants[b]
    altered = mine[:-70] + bytes([mine[-70] ^ 1]) + mine[-69:]
    mallory = Identity.generate()
    forged = sharekey.wrap_keys(mallory, sid, [b"k" * 32], second_token.x25519_public_bytes, b)
    # node-d still has the old key and may wrap it: but it is not the owner
    by_member = fourth_token.wrap_share_key_for(sid, second_token.x25519_public_bytes, b)
    for bad in (
        {b: altered}, {b: forged}, {b: by_member}, {b: grants[c]}, {b: b"PSK1 short"},
        {b: "not bytes"}, {b"\x00" * 31: mine}, [mine],
    ):
        held, _ = second_token.accept_manifest(travelled(revoked), bad)
        assert held == revoked  # the manifest is taken all the same
        assert not second_token.has_current_share_key(sid)
        with pytest.raises(NotFound, match="holds no key"):
            second_token.decrypt_doc(after, OWNER)
    refusals = audited(second_token, "accept_key_grant")
    assert len(refusals) == 8 and not any(e.allowed for e in refusals)
    assert "not made by the expected sender" in refusals[1].reason  # mallory's
    assert "not made by the expected sender" in refusals[2].reason  # node-d's
    assert "does not verify" in refusals[3].reason  # node-c's

    # others' grants that do not verify are not kept for forwarding either
    second_token.accept_manifest(travelled(revoked), {c: altered})
    assert second_token.key_grants(sid) == {}

    # the owner's grants, as they come through msgpack: taken
    wire = msgpack.unpackb(msgpack.packb(grants, use_bin_type=True), raw=False)
    assert wire == grants
    held, changed = second_token.accept_manifest(travelled(revoked), wire)
    assert not changed and second_token.has_current_share_key(sid)
    assert second_token.decrypt_doc(after, OWNER)["text"] == "hello"
    assert audited(second_token, "accept_key_grant")[-1].allowed
    # hex-keyed (JSON) grants are understood too; a current key is not unwrapped again
    third_token.accept_manifest(travelled(revoked), {k.hex(): v for k, v in grants.items()})
    assert third_token.decrypt_doc(after, OWNER)["text"] == "hello"
    n = len(audited(third_token, "accept_key_grant"))
    third_token.accept_manifest(travelled(revoked), grants)
    assert len(audited(third_token, "accept_key_grant")) == n


def test_a_member_forwards_the_owners_grants(
    token: Token, second_token: Token, third_token: Token, fourth_token: Token
) -> None:
    share = token.create_share("trip", NOTES, encrypted=True)
    sid = share.share_id
    for member in (second_token, third_token, fourth_token):
        join(token, member, "trip")
    for member in (second_token, third_token):  # everyone holds v4 (node-d admitted)
        member.accept_manifest(travelled(token.share(sid)))
    revoked = token.revoke_member("trip", fourth_token.fingerprint)
    after = seal(token, sid, "after")

    # only node-b hears from the owner; node-c hears from node-b
    second_token.accept_manifest(travelled(revoked), token.key_grants(sid))
    forwarded = second_token.key_grants(sid)
    assert set(forwarded) == {third_token.fingerprint}  # not itself, not the revoked node-d
    assert forwarded == {third_token.fingerprint: token.key_grants(sid)[third_token.fingerprint]}
    wire = msgpack.unpackb(msgpack.packb(forwarded, use_bin_type=True), raw=False)
    held, changed = third_token.accept_manifest(
        travelled(revoked), wire, sender=second_token.fingerprint
    )
    assert changed and third_token.has_current_share_key(sid)
    assert third_token.decrypt_doc(after, OWNER)["text"] == "hello"
    accepted = audited(third_token, "accept_key_grant")
    assert [(e.principal, e.allowed) for e in accepted] == [
        (f"peer:{second_token.node_id}", True)
    ]
    # a member's token makes no grant of its own
    assert fourth_token.key_grants(sid) == {}


# --- expiry ---------------------------------------------------------------------------------


def test_expiry_fields_are_signed_and_optional() -> None:
    owner = Identity.generate()
    draft = Manifest.create(
        name="trip", owner_key=owner.public_key_bytes, owner_name="a",
        rule=mf.ShareRule(NOTES), encrypted=True, expires=2_000_000_000, key_id="ab" * 16,
    )
    member = Identity.generate()
    draft = mf.with_member(draft, member.fingerprint, "b", "read",
                           x25519=member.x25519_public_bytes, expires=1_900_000_000)
    signed = mf.sign(draft, owner.sign)
    d = msgpack.unpackb(msgpack.packb(signed.to_dict()), raw=False)
    assert d["expires"] == 2e9 and d["key_id"] == "ab" * 16
    assert d["members"][1]["expires"] == 1.9e9
    assert d["members"][1]["x25519"] == member.x25519_public_bytes.hex()
    back = Manifest.from_dict(d)
    assert back == signed and back.member(member.fingerprint).expires == 1.9e9
    mf.verify(back, verify_signature)
    for tamper in (
        lambda x: x.update(expires=2.1e9),
        lambda x: x.pop("expires"),
        lambda x: x["members"][1].update(expires=2.1e9),
        lambda x: x["members"][1].pop("expires"),
        lambda x: x["members"][1].update(x25519="11" * 32),
        lambda x: x.update(key_id="cd" * 16),
    ):
        changed = msgpack.unpackb(msgpack.packb(d), raw=False)
        tamper(changed)
        with pytest.raises(mf.BadSignature):
            mf.verify(Manifest.from_dict(changed), verify_signature)
    # without them (an older manifest) nothing is added to what was signed
    plain = mf.sign(attrs.evolve(draft, expires=None, key_id=None, members=(
        draft.members[0], attrs.evolve(draft.members[1], x25519=None, expires=None))),
        owner.sign)
    assert not {"expires", "key_id"} & set(plain.to_dict())
    assert set(plain.to_dict()["members"][1]) == {"fingerprint", "name", "permission", "status"}
    with pytest.raises(mf.MalformedManifest, match="key id"):
        attrs.evolve(draft, encrypted=False)
    with pytest.raises(mf.MalformedManifest, match="expiry"):
        attrs.evolve(draft, expires=float("inf"))


def test_an_expired_share_destroys_the_members_keys_not_the_owners(
    token: Token, second_token: Token, tmp_path: Path
) -> None:
    t0 = time.time()
    with pytest.raises(InvalidArgument, match="not in the future"):
        token.create_share("old", NOTES, encrypted=True, expires=t0 - 1)
    share = token.create_share("trip", NOTES, encrypted=True, expires=t0 + 3600)
    sid = share.share_id
    assert share.expires == t0 + 3600 and mf.Manifest.from_dict(share.to_dict()) == share
    join(token, second_token, "trip")
    doc = seal(token, sid, "d1")
    assert second_token.decrypt_doc(doc, OWNER)["text"] == "hello"
    assert second_token.enforce_expiry(now=t0 + 60) == []
    copy = snapshot(second_token, tmp_path / "b-copy")

    late = t0 + 7200
    # the owner stops admitting the member and the share, but keeps its keys and data
    assert not token.decide_outgoing(sid, second_token.fingerprint, now=late).allowed
    incoming = token.decide_incoming(sid, second_token.fingerprint, doc, now=late)
    assert not incoming.allowed and "has expired" in incoming.reason
    assert not token.may_connect(second_token.fingerprint, now=late)
    assert token.may_connect(second_token.fingerprint, now=t0 + 60)
    assert token.common_shares(second_token.fingerprint, now=late) == []
    assert not token.is_known_member(second_token.fingerprint, now=late)
    assert token.enforce_expiry(now=late) == []
    assert token.share_key_ids(sid) == (share.key_id,)
    assert token.decrypt_doc(doc, OWNER)["text"] == "hello"
    with pytest.raises(InvitationRefused, match="has expired"):
        redeem(token, second_token, invite(token, "trip", ttl=86400, now=t0), now=late)
    with pytest.raises(InvalidArgument, match="has expired"):
        invite(token, "trip", now=late)

    # the member's token destroys its copy of the keys, audited and sealed at once
    assert second_token.enforce_expiry(now=late) == [sid]
    assert second_token.enforce_expiry(now=late) == []
    assert second_token.share_key_ids(sid) == () and share_data_keys(second_token, sid) == []
    destroyed = audited(second_token, "destroy_share_key")
    assert len(destroyed) == 1 and "share 'trip' has expired" in destroyed[0].reason
    with pytest.raises(AccessDenied, match="share 'trip' has expired"):
        second_token.decrypt_doc(doc, OWNER)
    assert not second_token.decide_outgoing(sid, token.fingerprint, now=late).allowed
    assert second_token.share_status(sid, now=late) == "expired"
    second_token = reopen(second_token)
    try:  # the keys are gone for good, and the state says why
        assert second_token.share_key_ids(sid) == () and share_data_keys(second_token, sid) == []
        with pytest.raises(AccessDenied, match="share 'trip' has expired"):
            second_token.decrypt_doc(doc, OWNER)
        state_dir = second_token._dir
        second_token.close()
        restore(copy, state_dir)
        with pytest.raises(RollbackError):
            Token.open(state_dir, second_token._keystore)
    finally:
        second_token.close()


def test_the_clock_alone_ends_access_lazily(
    token: Token, second_token: Token, clock: Clock
) -> None:
    share = token.create_share("trip", NOTES, encrypted=True, expires=clock.now + 3600)
    sid = share.share_id
    join(token, second_token, "trip")
    doc = seal(token, sid, "d1")
    assert second_token.decrypt_doc(doc, OWNER)["text"] == "hello"
    clock.now += 7200  # offline: nobody calls enforce_expiry
    assert second_token.share_status(sid) == "expired"
    with pytest.raises(AccessDenied, match="share 'trip' has expired"):
        second_token.decrypt_doc(doc, OWNER)
    assert second_token.share_key_ids(sid) == ()
    assert len(audited(second_token, "destroy_share_key")) == 1
    with pytest.raises(AccessDenied, match="has expired"):
        second_token.encrypt_doc(note("late"), generation=1, share_id=sid)
    assert not token.may_connect(second_token.fingerprint)
    assert not token.decide_incoming(sid, second_token.fingerprint, doc).allowed
    assert token.decrypt_doc(doc, OWNER)["text"] == "hello"  # the owner's data stays its own


def test_an_expired_membership_ends_that_member_only(
    token: Token, second_token: Token, third_token: Token, clock: Clock
) -> None:
    t0 = clock.now
    share = token.create_share("trip", NOTES, encrypted=True)
    sid = share.share_id
    with pytest.raises(InvalidArgument, match="not in the future"):
        token.issue_invitation("trip", permission="read", ttl=60, addresses=[], now=t0,
                               membership_expires=t0)
    inv = token.issue_invitation("trip", permission="write", ttl=60, addresses=[], now=t0,
                                 membership_expires=t0 + 3600)
    manifest, wrapped = redeem(token, second_token, inv, now=t0)
    assert manifest.member(second_token.fingerprint).expires == t0 + 3600
    second_token.join_share(inv, travelled(manifest), wrapped)
    join(token, third_token, "trip")
    doc = seal(token, sid, "d1")
    b = second_token.fingerprint
    assert second_token.decrypt_doc(doc, OWNER)["text"] == "hello"
    assert token.decide_incoming(sid, b, doc).allowed

    clock.now = t0 + 7200
    with pytest.raises(AccessDenied, match="membership of share 'trip' has expired"):
        second_token.decrypt_doc(doc, OWNER)
    assert second_token.share_key_ids(sid) == () and share_data_keys(second_token, sid) == []
    assert second_token.share_status(sid) == "expired"
    assert second_token.common_shares(token.fingerprint) == []
    refused = token.decide_incoming(sid, b, doc)
    assert not refused.allowed and "membership of 'node-b'" in refused.reason
    assert not token.decide_outgoing(sid, b).allowed
    assert not token.may_connect(b) and token.common_shares(b) == []
    assert token.key_grants(sid).keys() == {third_token.fingerprint}
    # the other member is untouched
    assert token.decide_outgoing(sid, third_token.fingerprint).allowed
    assert third_token.decrypt_doc(doc, OWNER)["text"] == "hello"
    assert third_token.enforce_expiry() == []


def test_joining_an_already_expired_membership_keeps_no_key(
    token: Token, second_token: Token
) -> None:
    t0 = 1_700_000_000  # long ago: the joiner's clock says it is over
    share = token.create_share("trip", NOTES, encrypted=True)
    inv = token.issue_invitation("trip", permission="read", ttl=3600, addresses=[], now=t0,
                                 membership_expires=t0 + 60)
    manifest, wrapped = redeem(token, second_token, inv, now=t0)
    second_token.join_share(inv, travelled(manifest), wrapped)
    assert second_token.share_key_ids(share.share_id) == ()
    assert "expired" in audited(second_token, "destroy_share_key")[0].reason
    with pytest.raises(AccessDenied, match="has expired"):
        second_token.decrypt_doc(seal(token, share.share_id, "d1"), OWNER)


# --- older members and older state ----------------------------------------------------------


def test_a_member_admitted_without_its_x25519_key_gets_no_grant(
    token: Token, second_token: Token, third_token: Token
) -> None:
    """A member listed before members carried their X25519 key cannot be wrapped to: the
    owner says so when it rotates, and grants the others."""
    share = token.create_share("trip", NOTES, encrypted=True)
    sid = share.share_id
    join(token, second_token, "trip")
    old_style = mf.sign(  # as a manifest made by an older owner lists a member
        mf.with_member(token.share(sid), third_token.fingerprint, "node-c", "write"),
        token._identity.sign,
    )
    token._book.put(old_style)
    assert old_style.member(third_token.fingerprint).x25519 is None
    assert "x25519" not in old_style.to_dict()["members"][2]
    rotated = token.revoke_member("trip", second_token.fingerprint)
    assert rotated.key_id != share.key_id
    assert token.key_grants(sid) == {}
    warned = [e for e in audited(token, "create_share_key") if "invite them again" in e.reason]
    assert len(warned) == 1 and "'node-c'" in warned[0].reason


def test_a_state_sealed_before_rotation_still_loads() -> None:
    from plugshare.token import state as state_codec
    from plugshare.token.audit import new_meta
    from plugshare.token.credentials import new_credential

    state = state_codec.TokenState(
        name="n", signing_key=b"s" * 32, agreement_key=b"a" * 32, audit_key=b"k" * 32,
        owner=new_credential()[1], current_master=1, next_rule=1,
        shares={"s1": state_codec.ShareRecord({"share_id": "s1"})},
        invitations={"ab": state_codec.InvitationRecord("s1", "read", 5)},
    )
    doc = msgpack.unpackb(state_codec.encode(state, new_meta(b"f" * 32)), raw=False)
    for field in ("grants", "grants_key", "ended", "ended_kids"):  # as an older token sealed it
        del doc["state"]["shares"]["s1"][field]
    del doc["state"]["invitations"]["ab"]["membership_expires"]
    loaded, _ = state_codec.decode(msgpack.packb(doc, use_bin_type=True), "old state")
    record = loaded.shares["s1"]
    assert record.grants == {} and record.grants_key is None
    assert record.ended is None and record.ended_kids == []
    assert loaded.invitations["ab"].membership_expires is None


# --- forgetting a share that ended (`plugshare share rm`) ------------------------------------


def test_a_share_that_ended_can_be_forgotten_and_its_copies_still_say_why(
    token: Token, second_token: Token
) -> None:
    share = token.create_share("trip", NOTES, encrypted=True)
    sid = share.share_id
    join(token, second_token, "trip")
    copy = seal(token, sid, "sealed-before")
    assert second_token.decrypt_doc(copy, OWNER)["_id"] == "sealed-before"
    with pytest.raises(mf.MembershipError, match="leave it"):
        second_token.forget_share("trip")  # still a member: not forgettable
    with pytest.raises(mf.MembershipError, match="owner"):
        token.forget_share("trip")
    second_token.leave_share("trip")
    second_token.forget_share("trip")
    assert [m.share_id for m in second_token.shares()] == []
    with pytest.raises(NotFound):
        second_token.share("trip")
    with pytest.raises(AccessDenied, match="forgotten"):
        second_token.decrypt_doc(copy, OWNER)  # not "tampered": it says why
    assert any(e.action == "forget_share" for e in second_token.audit_tail(20))
    reopened = reopen(second_token)
    try:
        assert reopened.shares() == []
        with pytest.raises(AccessDenied, match="forgotten"):
            reopened.decrypt_doc(copy, OWNER)
    finally:
        reopened.close()
