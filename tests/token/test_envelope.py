"""Envelope encryption on both keystores: sealed and release modes, integrity, share keys,
master-key rotation."""

from __future__ import annotations

import base64
import json

import pytest

from plugshare.token.inside import (
    CLEAR_FIELDS,
    ENVELOPE_FIELD,
    OWNER,
    AccessDenied,
    AuthenticationError,
    IntegrityError,
    InvalidArgument,
    NotFound,
    Token,
    open_doc,
)
from plugshare.token.envelope import seal_doc

NOTES = "io.plugshare.notes"
SECRET = "the combination is 12-34-56"


def note(doc_id: str = "n1", **extra) -> dict:
    return {"_id": doc_id, "doctype": NOTES, "author": "alice", "subject": "safe",
            "text": SECRET, "tags": ["x", 1, 2.5, None, True], "nested": {"a": {"b": []}},
            **extra}


def stored(sealed: dict, generation: int) -> dict:
    """What the store would hold after writing it: `_rev` of that generation."""
    return {**sealed, "_rev": f"{generation}-{'ab' * 16}"}


@pytest.fixture
def sensitive(token: Token) -> Token:
    token.mark_sensitive(NOTES)
    return token


def test_round_trip_keeps_only_metadata_in_clear(sensitive: Token) -> None:
    doc = note()
    sealed = sensitive.encrypt_doc(doc, generation=1)
    assert set(sealed) == {"_id", "doctype", "author", "subject", ENVELOPE_FIELD}
    assert set(sealed) - {ENVELOPE_FIELD} <= CLEAR_FIELDS
    assert SECRET not in json.dumps(sealed)
    assert set(sealed[ENVELOPE_FIELD]) == {"v", "kid", "nonce", "ct"}
    opened = sensitive.decrypt_doc(stored(sealed, 1), OWNER)
    assert opened == {**doc, "_rev": f"1-{'ab' * 16}"}
    again = sensitive.encrypt_doc(doc, generation=1)
    assert again[ENVELOPE_FIELD]["ct"] != sealed[ENVELOPE_FIELD]["ct"]  # fresh nonce


def _flip(sealed: dict, index: int) -> dict:
    env = dict(sealed[ENVELOPE_FIELD])
    ct = bytearray(base64.b64decode(env["ct"]))
    ct[index] ^= 0x01
    env["ct"] = base64.b64encode(bytes(ct)).decode()
    return {**sealed, ENVELOPE_FIELD: env}


@pytest.mark.parametrize(
    "attack",
    [
        "flip first byte", "flip tag", "other id", "other generation", "other doctype",
        "edit author", "drop subject", "nonce swap", "bad base64", "no envelope version",
    ],
)
def test_altered_or_moved_ciphertext_is_refused_and_logged(sensitive: Token, attack: str) -> None:
    sealed = stored(sensitive.encrypt_doc(note(), generation=3), 3)
    other = stored(sensitive.encrypt_doc(note("n2"), generation=3), 3)
    bad = {
        "flip first byte": lambda: _flip(sealed, 0),
        "flip tag": lambda: _flip(sealed, -1),
        "other id": lambda: {**sealed, "_id": "n2"},
        "other generation": lambda: {**sealed, "_rev": f"4-{'cd' * 16}"},
        "other doctype": lambda: {**sealed, "doctype": "io.plugshare.other"},
        "edit author": lambda: {**sealed, "author": "mallory"},
        "drop subject": lambda: {k: v for k, v in sealed.items() if k != "subject"},
        "nonce swap": lambda: {**sealed, ENVELOPE_FIELD: {
            **sealed[ENVELOPE_FIELD], "nonce": other[ENVELOPE_FIELD]["nonce"]}},
        "bad base64": lambda: {**sealed, ENVELOPE_FIELD: {**sealed[ENVELOPE_FIELD], "ct": "!!"}},
        "no envelope version": lambda: {**sealed, ENVELOPE_FIELD: {
            k: v for k, v in sealed[ENVELOPE_FIELD].items() if k != "v"}},
    }[attack]()
    if attack == "other doctype":
        sensitive.mark_sensitive("io.plugshare.other")
    with pytest.raises(IntegrityError):
        sensitive.decrypt_doc(bad, OWNER)
    entry = sensitive.audit_tail(1)[0]
    assert (entry.action, entry.allowed) == ("decrypt", False)
    # nothing lost: the intact document still opens
    assert sensitive.decrypt_doc(sealed, OWNER)["text"] == SECRET


def test_ciphertext_moved_into_another_doc_is_refused(sensitive: Token) -> None:
    a = stored(sensitive.encrypt_doc(note("a"), generation=1), 1)
    b = stored(sensitive.encrypt_doc(note("b"), generation=1), 1)
    moved = {**b, ENVELOPE_FIELD: a[ENVELOPE_FIELD]}
    with pytest.raises(IntegrityError, match="'b'"):
        sensitive.decrypt_doc(moved, OWNER)


def test_release_mode_gives_the_same_plaintext(sensitive: Token) -> None:
    docs = [stored(sensitive.encrypt_doc(note(f"n{i}"), generation=2), 2) for i in range(5)]
    key = sensitive.release_doc_key(docs[0], OWNER)
    assert repr(key).startswith("DocKey(kid=") and "aead" not in repr(key)
    for doc in docs:
        assert open_doc(doc, key) == sensitive.decrypt_doc(doc, OWNER)
    assert sensitive.release_doc_key({"_id": "plain", "doctype": "other", "_rev": "1-a"},
                                     OWNER) is None


def test_reads_are_decided_first(sensitive: Token) -> None:
    app = sensitive.authenticate(sensitive.add_app("notes", NOTES, "read", {"author": "bob"}))
    doc = stored(sensitive.encrypt_doc(note(), generation=1), 1)
    with pytest.raises(AccessDenied, match="no rule"):
        sensitive.decrypt_doc(doc, app)
    with pytest.raises(AccessDenied):
        sensitive.release_doc_key(doc, app)
    assert [e.allowed for e in sensitive.audit_tail(2)] == [False, False]
    bobs = stored(sensitive.encrypt_doc(note("n2", author="bob"), generation=1), 1)
    assert sensitive.decrypt_doc(bobs, app)["text"] == SECRET


def test_plaintext_injected_into_a_sensitive_doctype_is_refused(sensitive: Token) -> None:
    with pytest.raises(IntegrityError, match="stored in clear"):
        sensitive.decrypt_doc(stored(note(), 1), OWNER)
    tombstone = {"_id": "n1", "_rev": "2-aa", "_deleted": True, "doctype": NOTES}
    assert sensitive.decrypt_doc(tombstone, OWNER) == tombstone
    plain = {"_id": "p", "_rev": "1-aa", "doctype": "io.plugshare.public", "x": 1}
    assert sensitive.decrypt_doc(plain, OWNER) == plain


def test_bad_requests_to_encrypt(sensitive: Token) -> None:
    with pytest.raises(InvalidArgument, match="not marked sensitive"):
        sensitive.encrypt_doc({**note(), "doctype": "io.plugshare.public"}, generation=1)
    with pytest.raises(InvalidArgument, match="generation"):
        sensitive.encrypt_doc(note(), generation=0)
    with pytest.raises(InvalidArgument, match="_id"):
        sensitive.encrypt_doc({"doctype": NOTES}, generation=1)
    with pytest.raises(InvalidArgument, match="already sealed"):
        sensitive.encrypt_doc(sensitive.encrypt_doc(note(), generation=1), generation=1)
    with pytest.raises(InvalidArgument, match="JSON-like"):
        sensitive.encrypt_doc({**note(), "x": object()}, generation=1)
    with pytest.raises(NotFound, match="no key for share"):
        sensitive.encrypt_doc(note(), generation=1, share_id="nope")


def test_keys_survive_reopen(sensitive: Token, make_keystore) -> None:
    doc = stored(sensitive.encrypt_doc(note(), generation=1), 1)
    state_dir = sensitive._dir
    sensitive.close()
    token = Token.open(state_dir, make_keystore())
    try:
        assert token.decrypt_doc(doc, OWNER)["text"] == SECRET
    finally:
        token.close()


def test_master_rotation_rewraps_lazily_then_retires_the_old_key(
    sensitive: Token, make_keystore
) -> None:
    doc = stored(sensitive.encrypt_doc(note(), generation=1), 1)
    share_kid = sensitive.create_share_key("s1")
    assert sensitive.rotate_master_key() == 2
    assert sensitive.info().master_keys == (1, 2)  # data keys still wrapped by master 1
    assert sensitive.decrypt_doc(doc, OWNER)["text"] == SECRET  # re-wraps the doctype key
    sensitive.flush()
    assert sensitive.info().master_keys == (1, 2)  # the share key still needs master 1
    shared = stored(sensitive.encrypt_doc(note("s"), generation=1, share_id="s1"), 1)
    sensitive.flush()
    assert sensitive.info().master_keys == (2,)
    assert shared[ENVELOPE_FIELD]["kid"] == share_kid
    state_dir = sensitive._dir
    sensitive.close()
    token = Token.open(state_dir, make_keystore())
    try:
        assert token.decrypt_doc(doc, OWNER)["text"] == SECRET
        assert token.decrypt_doc(shared, OWNER)["text"] == SECRET
        assert token._keystore.master_key_ids() == [2]
    finally:
        token.close()


# --- share keys ---------------------------------------------------------------------------


def test_share_key_reaches_another_token(token: Token, second_token: Token) -> None:
    first_kid = token.create_share_key("trip")
    newer_kid = token.create_share_key("trip")  # e.g. after a member left
    # a document sealed under the older key, to check that every key of the share travels
    old_doc = stored(seal_doc(note("old"), token._doc_key(first_kid)[1], 1), 1)
    new_doc = stored(token.encrypt_doc(note("new"), generation=1, share_id="trip"), 1)
    assert new_doc[ENVELOPE_FIELD]["kid"] == newer_kid
    wrapped = token.wrap_share_key_for("trip", second_token.x25519_public_bytes,
                                       second_token.fingerprint)
    assert second_token.accept_share_key("trip", wrapped, token.node_id) == newer_kid
    assert second_token.decrypt_doc(new_doc, OWNER)["text"] == SECRET
    assert second_token.decrypt_doc(old_doc, OWNER)["text"] == SECRET
    # the receiving token can seal for the share too, and the sender reads it
    reply = stored(second_token.encrypt_doc(note("reply"), generation=2, share_id="trip"), 2)
    assert token.decrypt_doc(reply, OWNER)["text"] == SECRET
    accepted = [e for e in second_token.audit_tail(10) if e.action == "accept_share_key"]
    assert [(e.principal, e.allowed) for e in accepted] == [(f"peer:{token.node_id}", True)]


def test_wrapped_share_key_is_bound_to_sender_recipient_and_share(
    token: Token, second_token: Token
) -> None:
    token.create_share_key("trip")
    wrapped = token.wrap_share_key_for("trip", second_token.x25519_public_bytes,
                                       second_token.node_id)
    with pytest.raises(AuthenticationError, match="expected sender"):
        second_token.accept_share_key("trip", wrapped, second_token.fingerprint)
    with pytest.raises(AuthenticationError, match="does not verify"):
        second_token.accept_share_key("other-share", wrapped, token.fingerprint)
    with pytest.raises(AuthenticationError, match="does not verify"):
        token.accept_share_key("trip", wrapped, token.fingerprint)  # not the recipient
    flipped = bytearray(wrapped)
    flipped[80] ^= 1
    with pytest.raises(AuthenticationError):
        second_token.accept_share_key("trip", bytes(flipped), token.fingerprint)
    with pytest.raises(IntegrityError, match="malformed"):
        second_token.accept_share_key("trip", wrapped[:50], token.fingerprint)
    assert not second_token.has_share_key("trip")
    refusals = [e for e in second_token.audit_tail(10) if e.action == "accept_share_key"]
    assert len(refusals) == 4 and not any(e.allowed for e in refusals)
    second_token.accept_share_key("trip", wrapped, token.fingerprint)  # the intact one works
    assert second_token.has_share_key("trip")


def test_discarded_share_key_no_longer_opens(token: Token) -> None:
    token.create_share_key("trip")
    doc = stored(token.encrypt_doc(note(), generation=1, share_id="trip"), 1)
    token.discard_share_key("trip")
    with pytest.raises(NotFound, match="holds no key"):
        token.decrypt_doc(doc, OWNER)
    with pytest.raises(NotFound):
        token.discard_share_key("trip")
    with pytest.raises(NotFound):
        token.wrap_share_key_for("trip", token.x25519_public_bytes, token.fingerprint)


def test_attachment_stubs_stay_in_clear_beside_the_envelope_and_are_authenticated():
    """The store resolves a sealed document's attachment stubs, so they stay in clear; the
    envelope binds their names, digests, lengths and content types (issue 13)."""
    from plugshare.token.envelope import DocKey

    key = DocKey("k1", b"\x01" * 32)
    stubs = {"scan.pdf": {"content_type": "application/pdf", "length": 10,
                          "digest": "md5-" + base64.b64encode(b"\x02" * 16).decode(),
                          "revpos": 1, "stub": True}}
    sealed = stored(seal_doc(note(_attachments=stubs), key, 2), 2)
    assert sealed["_attachments"] == stubs and SECRET not in json.dumps(sealed)
    assert open_doc(sealed, key)["_attachments"] == stubs
    swapped = json.loads(json.dumps(sealed))
    swapped["_attachments"]["scan.pdf"]["digest"] = "md5-" + base64.b64encode(
        b"\x03" * 16).decode()
    renamed = {**sealed, "_attachments": {"other.pdf": stubs["scan.pdf"]}}
    stripped = {k: v for k, v in sealed.items() if k != "_attachments"}
    added = stored(seal_doc(note(), key, 2), 2)
    added["_attachments"] = stubs
    for altered in (swapped, renamed, stripped, added):
        with pytest.raises(IntegrityError):
            open_doc(altered, key)
    # a document without attachments binds what it always did
    plain = stored(seal_doc(note(), key, 2), 2)
    assert open_doc(plain, key)["text"] == SECRET
