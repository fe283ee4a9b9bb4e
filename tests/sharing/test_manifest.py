"""Share manifests: construction rules, canonical signing with real Ed25519 keys, membership
changes, and the checks a member's token makes before taking a new manifest."""

from __future__ import annotations

import json

import attrs
import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from plugshare.sharing.manifest import (
    SIGNING_DOMAIN,
    BadSignature,
    ConflictingManifest,
    MalformedManifest,
    Manifest,
    ManifestError,
    Member,
    MembershipError,
    OwnerChanged,
    ShareIdChanged,
    ShareRule,
    StaleManifest,
    UnsignedManifest,
    accept_update,
    leave,
    revoke,
    sign,
    verify,
    with_member,
)
from plugshare.token.identity import Identity, verify_signature

OWNER = Identity.generate()
ALICE = Identity.generate()
BOB = Identity.generate()
MALLORY = Identity.generate()


def new_share(owner: Identity = OWNER, **kw) -> Manifest:
    return Manifest.create(
        name=kw.pop("name", "photos"),
        owner_key=owner.public_key_bytes,
        owner_name=kw.pop("owner_name", "laptop"),
        rule=kw.pop("rule", ShareRule("io.photo", {"album": "2024", "size": {"$gt": 10}})),
        **kw,
    )


def signed(m: Manifest, by: Identity = OWNER) -> Manifest:
    return sign(m, by.sign)


# --- construction --------------------------------------------------------------------------


def test_a_new_share_has_its_owner_as_only_member_active_with_write() -> None:
    m = new_share()
    assert m.version == 1 and m.signature is None
    assert m.owner == OWNER.fingerprint and m.owner_key == OWNER.public_key_bytes
    assert [(x.fingerprint, x.permission, x.status) for x in m.members] == [
        (OWNER.fingerprint, "write", "active")
    ]
    assert m.is_active_member(OWNER.fingerprint) and m.may_write(OWNER.fingerprint)
    assert not m.is_active_member(ALICE.fingerprint) and m.member(ALICE.fingerprint) is None


def test_fresh_share_ids_differ() -> None:
    assert new_share().share_id != new_share().share_id


def test_an_owner_key_that_does_not_hash_to_the_owner_fingerprint_is_refused() -> None:
    m = new_share()
    with pytest.raises(MalformedManifest, match="does not match the owner fingerprint"):
        attrs.evolve(m, owner_key=MALLORY.public_key_bytes)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: {"members": ()}, "owner must be the first member"),
        (lambda m: {"members": (attrs.evolve(m.members[0], permission="read"),)}, "owner must"),
        (lambda m: {"members": (Member(ALICE.fingerprint, "a", "write"), *m.members)},
         "owner must"),
        (lambda m: {"members": (m.members[0], Member(ALICE.fingerprint, "a", "read"),
                                Member(ALICE.fingerprint, "b", "write"))}, "listed twice"),
        (lambda m: {"version": 0}, "positive integer"),
        (lambda m: {"version": True}, "positive integer"),
        (lambda m: {"encrypted": "yes"}, "encrypted must be a bool"),
        (lambda m: {"name": ""}, "share name must be a non-empty string"),
        (lambda m: {"name": "a\nb"}, "control characters"),
        (lambda m: {"share_id": "x" * 201}, "limit is 200"),
        (lambda m: {"signature": b""}, "signature must be non-empty"),
    ],
)
def test_malformed_fields_are_refused_with_a_message_naming_them(change, message) -> None:
    m = new_share()
    with pytest.raises(MalformedManifest, match=message):
        attrs.evolve(m, **change(m))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"fingerprint": b"short", "name": "n", "permission": "read"}, "fingerprint must be 32"),
        ({"fingerprint": bytes(32), "name": "n", "permission": "admin"}, "must be one of"),
        ({"fingerprint": bytes(32), "name": "n", "permission": "read", "status": "gone"}, "status"),
        ({"fingerprint": bytes(32), "name": " n", "permission": "read"}, "surrounding spaces"),
    ],
)
def test_malformed_members_are_refused(kwargs, message) -> None:
    with pytest.raises(MalformedManifest, match=message):
        Member(**kwargs)


@pytest.mark.parametrize(
    "selector, message",
    [
        ({"n": float("nan")}, "not a JSON number"),
        ({1: "x"}, "not a string"),
        ({"n": b"bytes"}, "not JSON"),
        ({"n": 2**64}, "64-bit range"),
        (["not", "an", "object"], "JSON object or null"),
    ],
)
def test_selectors_must_be_json_objects(selector, message) -> None:
    with pytest.raises(MalformedManifest, match=message):
        ShareRule("io.photo", selector)


def test_a_deeply_nested_selector_is_refused() -> None:
    selector: dict = {"x": 1}
    for _ in range(20):
        selector = {"$not": selector}
    with pytest.raises(MalformedManifest, match="nested deeper"):
        ShareRule("io.photo", selector)


def test_the_selector_is_copied_so_later_changes_to_the_callers_dict_do_not_leak_in() -> None:
    selector = {"album": "2024"}
    rule = ShareRule("io.photo", selector)
    selector["album"] = "1999"
    assert rule.selector == {"album": "2024"}


# --- signing -------------------------------------------------------------------------------


def test_a_signed_manifest_verifies_with_the_owners_key() -> None:
    m = signed(new_share())
    verify(m, verify_signature)
    assert verify_signature(OWNER.public_key_bytes, m.signed_bytes(), m.signature)


def test_signed_bytes_are_domain_separated_and_exclude_the_signature() -> None:
    m = new_share()
    s = signed(m)
    assert m.signed_bytes().startswith(SIGNING_DOMAIN)
    assert m.signed_bytes() == s.signed_bytes()
    body = msgpack.unpackb(m.signed_bytes()[len(SIGNING_DOMAIN):])
    assert "signature" not in body and body["share_id"] == m.share_id


def test_signed_bytes_do_not_depend_on_selector_key_order() -> None:
    a = new_share(rule=ShareRule("t", {"a": 1, "b": {"x": 1, "y": 2}}), share_id="s1")
    b = new_share(rule=ShareRule("t", {"b": {"y": 2, "x": 1}, "a": 1}), share_id="s1")
    assert a.signed_bytes() == b.signed_bytes()


def test_an_unsigned_manifest_is_refused() -> None:
    with pytest.raises(UnsignedManifest, match="not signed"):
        verify(new_share(), verify_signature)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda m: attrs.evolve(m, name="other"),
        lambda m: attrs.evolve(m, encrypted=not m.encrypted),
        lambda m: attrs.evolve(m, version=m.version + 1),
        lambda m: attrs.evolve(m, rule=ShareRule("io.photo", None)),
        lambda m: attrs.evolve(m, members=(attrs.evolve(m.members[0], name="evil"),)),
        lambda m: attrs.evolve(m, signature=bytes([m.signature[0] ^ 1]) + m.signature[1:]),
    ],
)
def test_any_change_after_signing_breaks_the_signature(tamper) -> None:
    m = signed(new_share())
    with pytest.raises(BadSignature, match="does not verify"):
        verify(tamper(m), verify_signature)


def test_a_manifest_signed_by_someone_else_than_its_owner_is_refused() -> None:
    m = sign(new_share(), MALLORY.sign)
    with pytest.raises(BadSignature):
        verify(m, verify_signature)


def test_a_forger_cannot_pass_off_its_own_key_as_the_owners() -> None:
    # Mallory signs with her key and claims the owner's fingerprint: the carried key would not
    # hash to it, so the manifest cannot even be built or read.
    good = signed(new_share())
    forged = good.to_dict() | {"owner_key": MALLORY.public_key_bytes.hex()}
    forged["signature"] = MALLORY.sign(b"anything").hex()
    with pytest.raises(MalformedManifest, match="does not match the owner fingerprint"):
        Manifest.from_dict(forged)


# --- encoding ------------------------------------------------------------------------------


def test_dict_form_round_trips_through_json_and_msgpack_keeping_the_signature_valid() -> None:
    m = signed(with_member(signed(new_share(encrypted=True)), ALICE.fingerprint, "alice", "read"))
    for codec in (
        lambda d: json.loads(json.dumps(d)),
        lambda d: msgpack.unpackb(msgpack.packb(d)),
    ):
        back = Manifest.from_dict(codec(m.to_dict()))
        assert back == m
        verify(back, verify_signature)


def test_uppercase_hex_reads_back_to_the_same_signed_content() -> None:
    m = signed(new_share())
    d = m.to_dict() | {"owner": m.owner.hex().upper(), "signature": m.signature.hex().upper()}
    verify(Manifest.from_dict(d), verify_signature)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d | {"extra": 1}, "unknown field"),
        (lambda d: {k: v for k, v in d.items() if k != "version"}, "lacks field"),
        (lambda d: d | {"owner": "zz"}, "not hex"),
        (lambda d: d | {"owner": 5}, "must be a hex string"),
        (lambda d: d | {"version": "2"}, "positive integer"),
        (lambda d: d | {"members": "owner"}, "members must be a list"),
        (lambda d: d | {"members": [{"fingerprint": "00"}]}, "member lacks field"),
        (lambda d: d | {"rule": "io.photo"}, "a rule is a map"),
        (lambda d: d | {"rule": {"doctype": "", "selector": None}}, "doctype must be"),
        (lambda d: [d], "a manifest is a map"),
    ],
)
def test_from_dict_names_what_is_wrong(change, message) -> None:
    with pytest.raises(MalformedManifest, match=message):
        Manifest.from_dict(change(new_share().to_dict()))


json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=8) | (
    st.floats(allow_nan=False, allow_infinity=False)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(selector=st.dictionaries(st.text(max_size=6), json_values, max_size=4))
def test_any_json_selector_survives_a_json_round_trip_with_a_valid_signature(selector) -> None:
    m = signed(new_share(rule=ShareRule("t", selector)))
    back = Manifest.from_dict(json.loads(json.dumps(m.to_dict())))
    assert back.signed_bytes() == m.signed_bytes()
    verify(back, verify_signature)


# --- membership changes --------------------------------------------------------------------


def test_adding_members_makes_unsigned_next_versions_with_their_permissions() -> None:
    v1 = signed(new_share())
    v2 = with_member(v1, ALICE.fingerprint, "alice", "write")
    v3 = with_member(signed(v2), BOB.fingerprint, "bob", "read")
    assert (v2.version, v3.version) == (2, 3) and v2.signature is None and v3.signature is None
    assert [x.name for x in v3.members] == ["laptop", "alice", "bob"]
    assert v3.may_write(ALICE.fingerprint) and not v3.may_write(BOB.fingerprint)
    assert v3.is_active_member(BOB.fingerprint)
    assert v1.member(ALICE.fingerprint) is None  # earlier versions are untouched


def test_revoked_members_stay_listed_but_lose_every_right_and_can_be_readmitted() -> None:
    v2 = with_member(new_share(), ALICE.fingerprint, "alice", "write")
    v3 = revoke(v2, ALICE.fingerprint)
    assert v3.version == 3 and v3.member(ALICE.fingerprint).status == "revoked"
    assert not v3.is_active_member(ALICE.fingerprint) and not v3.may_write(ALICE.fingerprint)
    assert [m.fingerprint for m in v3.active_members()] == [OWNER.fingerprint]
    v4 = with_member(v3, ALICE.fingerprint, "alice2", "read")
    assert v4.member(ALICE.fingerprint) == Member(ALICE.fingerprint, "alice2", "read", "active")
    assert len(v4.members) == 2


def test_a_member_who_leaves_is_removed() -> None:
    v2 = with_member(new_share(), ALICE.fingerprint, "alice", "read")
    v3 = leave(v2, ALICE.fingerprint)
    assert v3.version == 3 and v3.member(ALICE.fingerprint) is None
    assert with_member(v3, ALICE.fingerprint, "alice", "read").version == 4


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: with_member(m, ALICE.fingerprint, "again", "read"), "already an active member"),
        (lambda m: with_member(m, OWNER.fingerprint, "me", "read"), "already an active member"),
        (lambda m: revoke(m, OWNER.fingerprint), "owner cannot revoke"),
        (lambda m: leave(m, OWNER.fingerprint), "owner cannot leave"),
        (lambda m: revoke(m, BOB.fingerprint), "is not a member"),
        (lambda m: leave(m, BOB.fingerprint), "is not a member"),
        (lambda m: revoke(revoke(m, ALICE.fingerprint), ALICE.fingerprint), "already revoked"),
    ],
)
def test_meaningless_membership_changes_are_refused(change, message) -> None:
    m = with_member(new_share(), ALICE.fingerprint, "alice", "read")
    with pytest.raises(MembershipError, match=message):
        change(m)


# --- accepting updates ---------------------------------------------------------------------


def test_a_first_manifest_is_taken_when_signed_and_as_the_invitation_said() -> None:
    m = signed(new_share())
    assert accept_update(None, m, verify_signature) is m
    assert accept_update(
        None, m, verify_signature, expected_share_id=m.share_id, expected_owner=OWNER.fingerprint
    ) is m
    with pytest.raises(ShareIdChanged):
        accept_update(None, m, verify_signature, expected_share_id="other")
    with pytest.raises(OwnerChanged):
        accept_update(None, m, verify_signature, expected_owner=MALLORY.fingerprint)


def test_newer_versions_are_taken_even_when_some_were_missed() -> None:
    v1 = signed(new_share())
    v2 = signed(with_member(v1, ALICE.fingerprint, "alice", "read"))
    v3 = signed(with_member(v2, BOB.fingerprint, "bob", "read"))
    assert accept_update(v1, v2, verify_signature) is v2
    assert accept_update(v1, v3, verify_signature) is v3


def test_older_versions_are_refused_as_replay_or_rollback() -> None:
    v1 = signed(new_share())
    v2 = signed(with_member(v1, ALICE.fingerprint, "alice", "read"))
    v3 = signed(revoke(v2, ALICE.fingerprint))
    for old in (v1, v2):
        with pytest.raises(StaleManifest, match="older than the v3 held"):
            accept_update(v3, old, verify_signature)


def test_the_same_version_again_is_a_no_op() -> None:
    v1 = signed(new_share())
    again = Manifest.from_dict(json.loads(json.dumps(v1.to_dict())))
    assert accept_update(v1, again, verify_signature) is v1


def test_the_same_version_with_other_content_is_refused_as_a_forgery() -> None:
    v1 = signed(new_share())
    v2a = signed(with_member(v1, ALICE.fingerprint, "alice", "read"))
    v2b = signed(with_member(v1, BOB.fingerprint, "bob", "write"))
    with pytest.raises(ConflictingManifest, match="forgery"):
        accept_update(v2a, v2b, verify_signature)


def test_unsigned_or_badly_signed_updates_are_refused_before_anything_else() -> None:
    v1 = signed(new_share())
    v2 = with_member(v1, MALLORY.fingerprint, "mallory", "write")
    with pytest.raises(UnsignedManifest):
        accept_update(v1, v2, verify_signature)
    with pytest.raises(BadSignature):
        accept_update(v1, sign(v2, MALLORY.sign), verify_signature)


def test_a_manifest_for_another_share_or_owner_is_refused() -> None:
    v1 = signed(new_share())
    other_share = signed(attrs.evolve(new_share(), version=5))
    with pytest.raises(ShareIdChanged, match="expected"):
        accept_update(v1, other_share, verify_signature)
    # Mallory makes her own, validly signed manifest reusing the share id.
    hijack = signed(attrs.evolve(new_share(MALLORY), share_id=v1.share_id, version=9), MALLORY)
    with pytest.raises(OwnerChanged, match="expected"):
        accept_update(v1, hijack, verify_signature)


def test_every_refusal_is_a_manifest_error_with_a_message() -> None:
    v1 = signed(new_share())
    for bad in (new_share(), sign(new_share(), MALLORY.sign)):
        with pytest.raises(ManifestError) as info:
            accept_update(v1, bad, verify_signature)
        assert str(info.value)


def test_a_rule_may_cap_attachments_and_without_caps_signs_the_bytes_it_always_did() -> None:
    """Issue 13: a share's rule may cap its documents' attachments (size, content types);
    the fields are optional, absent from a rule without them."""
    assert ShareRule("io.photos").to_dict() == {"doctype": "io.photos", "selector": None}
    capped = ShareRule("io.photos", None, 10_000, ["image/*", "application/PDF"])
    assert ShareRule.from_dict(capped.to_dict()) == capped
    assert capped.attachment_refusal("image/png") is None
    assert capped.attachment_refusal("application/pdf; q=1") is None
    assert "text/plain" in capped.attachment_refusal("text/plain")
    for bad in ({"max_attachment_size": -1}, {"max_attachment_size": "big"},
                {"attachment_types": "image/*"}, {"attachment_types": ["png"]}):
        with pytest.raises(MalformedManifest):
            ShareRule.from_dict({"doctype": "io.photos", "selector": None, **bad})
