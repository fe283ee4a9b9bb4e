"""The token end to end, on both keystores: lifecycle, sealed state, principals, decisions."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from plugshare.token.inside import (
    OWNER,
    AlreadyExists,
    AuthenticationError,
    InvalidArgument,
    NotFound,
    Principal,
    RollbackError,
    RuleError,
    SoftKeystore,
    Token,
    TokenBusyError,
    TokenStateError,
    WrongSecretError,
)
from plugshare.token import vault

from .conftest import KeystoreFactory

NOTES = "io.plugshare.notes"
PHOTOS = "io.plugshare.photos"


def reopen(token: Token, make_keystore: KeystoreFactory) -> Token:
    state_dir = token._dir
    token.close()
    return Token.open(state_dir, make_keystore())


# --- lifecycle ----------------------------------------------------------------------------


def test_state_survives_close_and_open(token_and_owner, make_keystore, second_token) -> None:
    token, owner_credential = token_and_owner
    app_credential = token.add_app("notes", NOTES, "write", {"author": "alice"}, roles=["family"])
    rule_id = token.add_rule(PHOTOS, "role", "family", "read")
    peer_id = token.add_peer(second_token.public_key_bytes, name="bob", roles=["family"])
    token.mark_sensitive(NOTES)
    node_id, version = token.node_id, token.info().state_version
    token = reopen(token, make_keystore)
    try:
        assert token.node_id == node_id and token.name == "node-a"
        assert token.info().state_version > version
        assert token.authenticate(owner_credential) == OWNER
        app = token.authenticate(app_credential)
        assert token.decide(app, "write", {"doctype": NOTES, "author": "alice"}).allowed
        assert token.decide(app, "read", {"doctype": PHOTOS}).allowed  # through its role
        assert [r.id for r in token.list_rules()] == ["r1", rule_id]
        assert [p.node_id for p in token.list_peers()] == [peer_id]
        assert token.is_sensitive(NOTES) and not token.is_sensitive(PHOTOS)
        assert token.audit_verify()[0]
    finally:
        token.close()


def test_create_refuses_a_non_empty_directory(tmp_path: Path, make_keystore) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "something").write_text("x")
    with pytest.raises(TokenStateError, match="not empty"):
        Token.create(tmp_path / "state", make_keystore(), name="n")
    assert (tmp_path / "state" / "something").read_text() == "x"


def test_create_refuses_an_existing_token(token, make_keystore) -> None:
    with pytest.raises(TokenStateError, match="not empty"):
        Token.create(token._dir, make_keystore(), name="again")


def test_open_of_a_missing_state_says_so(tmp_path: Path, make_keystore) -> None:
    with pytest.raises(TokenStateError, match="no token state"):
        Token.open(tmp_path / "nowhere", make_keystore())


def test_a_second_open_is_refused_while_the_token_is_open(token, make_keystore) -> None:
    with pytest.raises(TokenBusyError, match="in use"):
        Token.open(token._dir, make_keystore())


def _slot_bytes(state_dir: Path) -> list[bytes | None]:
    return [p.read_bytes() if p.exists() else None
            for p in (state_dir / name for name in vault.SLOT_FILES)]


def test_flush_is_free_when_nothing_changed(token) -> None:
    token.flush()
    before = _slot_bytes(token._dir)
    version = token.info().state_version
    token.flush()
    token.flush()
    assert _slot_bytes(token._dir) == before
    assert token.info().state_version == version
    token.decide(OWNER, "read", {"doctype": NOTES})  # a decision is news: it is logged
    token.flush()
    assert _slot_bytes(token._dir) != before
    assert token.info().state_version == version + 1


def test_unflushed_audit_is_bounded(token, monkeypatch) -> None:
    monkeypatch.setattr("plugshare.token.token.MAX_UNFLUSHED", 50)
    version = token.info().state_version
    for _ in range(120):
        token.decide(OWNER, "read", {"doctype": NOTES})
    assert token._audit.unflushed < 50
    assert token.info().state_version == version + 2  # flushed by itself, twice


# --- sealed state: tampering, truncation, rollback ----------------------------------------


def _newest_slot(state_dir: Path) -> tuple[Path, int]:
    """The slot file holding the newest state, and where its sealed bytes end (the rest of
    the file is padding)."""
    found = [c for c in vault.candidates(state_dir) if c.sealed is not None]
    newest = max(found, key=lambda c: c.sealed.counter)
    return newest.path, len(newest.sealed.aad) + len(newest.sealed.ciphertext)


@pytest.mark.parametrize("where", ["magic", "counter", "wrapped key", "nonce", "body", "tag"])
def test_tampered_state_is_refused(token, make_keystore, where: str) -> None:
    """The newest slot altered: it fails authentication, and the other slot is older than
    the anchor, so nothing opens."""
    state_dir = token._dir
    token.add_rule(NOTES, "role", "x", "read")
    token.close()
    path, end = _newest_slot(state_dir)
    blob = bytearray(path.read_bytes())
    offset = {"magic": 3, "counter": 20, "wrapped key": 40, "nonce": end - 40,
              "body": end - 20, "tag": end - 1}[where]
    blob[offset] ^= 0x10
    path.write_bytes(bytes(blob))
    with pytest.raises(TokenStateError):
        Token.open(state_dir, make_keystore())


@pytest.mark.parametrize("keep", [0, 10, 40, -1])
def test_truncated_state_is_refused(token, make_keystore, keep: int) -> None:
    state_dir = token._dir
    token.close()
    path, end = _newest_slot(state_dir)
    blob = path.read_bytes()
    path.write_bytes(blob[: keep if keep >= 0 else end + keep])
    with pytest.raises(TokenStateError, match="truncated|fails authentication"):
        Token.open(state_dir, make_keystore())
    path.write_bytes(blob)  # nothing was lost: the intact file opens again
    Token.open(state_dir, make_keystore()).close()


def test_rolled_back_state_is_refused(token, make_keystore, tmp_path: Path) -> None:
    state_dir = token._dir
    token.flush()
    snapshot = tmp_path / "snapshot"
    shutil.copytree(state_dir, snapshot)
    token.add_app("later", NOTES, "read")  # the attacker wants this undone
    token.close()
    shutil.rmtree(state_dir)
    shutil.copytree(snapshot, state_dir)
    with pytest.raises(RollbackError, match="older copy"):
        Token.open(state_dir, make_keystore())


def test_soft_rollback_of_state_and_anchor_together_is_the_documented_limit(
    tmp_path: Path,
) -> None:
    """With the soft keystore an attacker who can write both the state directory and the
    keystore's anchor file can roll both back together; the PKCS#11 keystore keeps the
    anchor in the device (next test)."""
    make = lambda: SoftKeystore(tmp_path / "ks", None)  # noqa: E731
    token, _ = Token.create(tmp_path / "state", make(), name="n")
    token.close()
    shutil.copytree(tmp_path / "state", tmp_path / "old-state")
    shutil.copy(tmp_path / "ks" / "keystore.anchor", tmp_path / "old-anchor")
    token = Token.open(tmp_path / "state", make())
    token.add_app("later", NOTES, "read")
    token.close()
    shutil.rmtree(tmp_path / "state")
    shutil.copytree(tmp_path / "old-state", tmp_path / "state")
    with pytest.raises(RollbackError):
        Token.open(tmp_path / "state", make())  # the state alone: detected
    shutil.copy(tmp_path / "old-anchor", tmp_path / "ks" / "keystore.anchor")
    token = Token.open(tmp_path / "state", make())  # state + anchor together: not detected
    assert token.list_apps() == []
    token.close()


def test_pkcs11_anchor_stops_a_rollback_of_every_file(
    tmp_path: Path, keystore_kind: str, make_keystore
) -> None:
    if keystore_kind != "pkcs11":
        return  # the soft counterpart is the test above
    token, _ = Token.create(tmp_path / "state", make_keystore(), name="n")
    token.close()
    shutil.copytree(tmp_path / "state", tmp_path / "old-state")
    token = Token.open(tmp_path / "state", make_keystore())
    token.add_app("later", NOTES, "read")
    token.close()
    shutil.rmtree(tmp_path / "state")
    shutil.copytree(tmp_path / "old-state", tmp_path / "state")
    with pytest.raises(RollbackError):
        Token.open(tmp_path / "state", make_keystore())


def test_crash_between_state_write_and_anchor_is_recovered(tmp_path: Path) -> None:
    make = lambda: SoftKeystore(tmp_path / "ks", None)  # noqa: E731
    token, _ = Token.create(tmp_path / "state", make(), name="n")
    anchor_before = (tmp_path / "ks" / "keystore.anchor").read_bytes()
    token.add_app("app", NOTES, "read")
    token.close()
    # put the anchor back as if the crash came right after the state was renamed in place
    (tmp_path / "ks" / "keystore.anchor").write_bytes(anchor_before)
    token = Token.open(tmp_path / "state", make())
    assert [a.name for a in token.list_apps()] == ["app"]
    ks = token._keystore
    assert ks.read_anchor() == token.info().state_version
    token.close()


def test_wrong_passphrase_opens_nothing_and_loses_nothing(tmp_path: Path) -> None:
    token, owner = Token.create(
        tmp_path / "state", SoftKeystore(tmp_path / "ks", "right", scrypt_n=1 << 14), name="n"
    )
    token.close()
    with pytest.raises(WrongSecretError):
        Token.open(tmp_path / "state", SoftKeystore(tmp_path / "ks", "wrong"))
    token = Token.open(tmp_path / "state", SoftKeystore(tmp_path / "ks", "right"))
    assert token.authenticate(owner) == OWNER
    token.close()


# --- principals ---------------------------------------------------------------------------


def test_owner_credential_and_refusals_are_logged(token_and_owner) -> None:
    token, owner_credential = token_and_owner
    assert token.authenticate(owner_credential) == OWNER
    assert token.authenticate(f"  {owner_credential}\n") == OWNER
    prefix, cid, secret = owner_credential.split(".")
    wrong = f"{prefix}.{cid}.{'A' * len(secret)}"
    for bad in (wrong, "ps1.0000000000000000." + secret, "garbage", owner_credential[:-5], ""):
        with pytest.raises(AuthenticationError):
            token.authenticate(bad)
    refusals = [e for e in token.audit_tail(5) if e.action == "authenticate"]
    assert len(refusals) == 5 and not any(e.allowed for e in refusals)
    assert {e.principal for e in refusals} == {"anonymous"}


def test_apps_register_list_and_remove(token) -> None:
    credential = token.add_app("notes", NOTES, "read", {"author": "alice"})
    assert credential.startswith("ps1.")
    with pytest.raises(AlreadyExists):
        token.add_app("notes", PHOTOS, "write")
    [info] = token.list_apps()
    assert (info.name, info.doctype, info.perm, info.selector) == (
        "notes", NOTES, "read", {"author": "alice"})
    app = token.authenticate(credential)
    assert app == Principal("app", "notes")
    token.remove_app("notes")
    with pytest.raises(AuthenticationError):
        token.authenticate(credential)
    decision = token.decide(app, "read", {"doctype": NOTES, "author": "alice"})
    assert not decision.allowed and "unknown principal" in decision.reason
    assert token.list_rules() == []
    with pytest.raises(NotFound):
        token.remove_app("notes")


def test_bad_names_are_refused(token) -> None:
    for bad in ("", "x" * 300, "tab\there"):
        with pytest.raises(InvalidArgument):
            token.add_app(bad, NOTES, "read")
    with pytest.raises(InvalidArgument, match="list of role names"):
        token.add_app("a", NOTES, "read", roles="family")
    assert token.list_apps() == []


def test_peer_challenge_response(token, second_token) -> None:
    peer_id = token.add_peer(second_token.public_key_bytes, name="bob")
    assert peer_id == second_token.node_id
    context = token.fingerprint + b"tls-exporter-bytes"
    challenge = token.new_challenge()
    answer = second_token.sign_challenge(challenge, context)
    principal = token.verify_peer(second_token.fingerprint, challenge, answer, context)
    assert principal == Principal("peer", peer_id)
    # single use
    with pytest.raises(AuthenticationError, match="already used"):
        token.verify_peer(peer_id, challenge, answer, context)
    # another context (another verifier / connection)
    challenge = token.new_challenge()
    with pytest.raises(AuthenticationError, match="does not verify"):
        token.verify_peer(peer_id, challenge, second_token.sign_challenge(challenge, b"x"), context)
    # a challenge this token never issued
    forged = b"\x01" * 32
    with pytest.raises(AuthenticationError, match="not issued"):
        token.verify_peer(peer_id, forged, second_token.sign_challenge(forged, context), context)
    # signed by someone else (this node) in the peer's name
    challenge = token.new_challenge()
    with pytest.raises(AuthenticationError, match="does not verify"):
        token.verify_peer(peer_id, challenge, token.sign_challenge(challenge, context), context)
    # an unknown peer
    challenge = second_token.new_challenge()
    with pytest.raises(AuthenticationError, match="not pinned"):
        second_token.verify_peer(token.node_id, challenge, token.sign_challenge(challenge), b"")
    with pytest.raises(AuthenticationError, match="expected 56"):
        token.verify_peer("BOGUS", challenge, b"", b"")
    entries = [e for e in token.audit_tail(20) if e.action == "peer-auth"]
    assert [e.allowed for e in entries] == [True, False, False, False, False, False]
    token.remove_peer(peer_id)
    challenge = token.new_challenge()
    with pytest.raises(AuthenticationError, match="not pinned"):
        token.verify_peer(peer_id, challenge, second_token.sign_challenge(challenge))


def test_verify_from_uses_the_pinned_key(token, second_token) -> None:
    sig = second_token.sign(b"manifest")
    with pytest.raises(NotFound, match="not pinned"):
        token.verify_from(second_token.node_id, b"manifest", sig)
    token.add_peer(second_token.public_key_bytes, name="bob")
    assert token.verify_from(second_token.fingerprint, b"manifest", sig)
    assert not token.verify_from(second_token.node_id, b"manifest!", sig)


# --- rules and decisions ------------------------------------------------------------------


def test_deny_by_default_owner_allowed(token) -> None:
    app = token.authenticate(token.add_app("notes", NOTES, "read"))
    assert token.decide(OWNER, "write", {"doctype": PHOTOS}).allowed
    decision = token.decide(app, "read", {"doctype": PHOTOS, "_id": "p1"})
    assert not decision.allowed and "no rule" in decision.reason
    assert not token.decide(app, "write", {"doctype": NOTES}).allowed  # read-only grant
    assert token.decide(app, "read", {"doctype": NOTES}).allowed
    assert token.decide(app, "list", {"doctype": NOTES}).allowed
    forged_owner = Principal("owner", "mallory")
    assert not token.decide(forged_owner, "read", {"doctype": NOTES}).allowed
    assert not token.decide(Principal("app", "ghost"), "read", {"doctype": NOTES}).allowed


def test_rules_for_roles_peers_and_selectors(token, second_token) -> None:
    app = token.authenticate(token.add_app("viewer", NOTES, "read", roles=["family"]))
    peer_id = token.add_peer(second_token.public_key_bytes, name="bob")
    peer = Principal("peer", peer_id)
    rule_family = token.add_rule(PHOTOS, "role", "family", "write", {"album": {"$ne": "private"}})
    rule_peer = token.add_rule(NOTES, "peer", second_token.fingerprint, "read",
                               {"subject": {"$in": ["trip", "food"]}})
    assert token.decide(app, "write", {"doctype": PHOTOS, "album": "holidays"}).allowed
    assert token.decide(app, "read", {"doctype": PHOTOS, "album": "holidays"}).allowed
    assert not token.decide(app, "write", {"doctype": PHOTOS, "album": "private"}).allowed
    assert not token.decide(peer, "read", {"doctype": PHOTOS, "album": "holidays"}).allowed
    token.set_roles(peer, ["family"])
    assert token.decide(peer, "write", {"doctype": PHOTOS, "album": "holidays"}).allowed
    assert token.decide(peer, "read", {"doctype": NOTES, "subject": "trip"}).allowed
    assert not token.decide(peer, "write", {"doctype": NOTES, "subject": "trip"}).allowed
    assert not token.decide(peer, "read", {"doctype": NOTES, "subject": "work"}).allowed
    listing = token.may_access_doctype(peer, "list", NOTES)
    assert listing.allowed and "only documents matching" in listing.reason
    assert not token.may_access_doctype(peer, "write", NOTES).allowed
    assert not token.may_access_doctype(Principal("app", "ghost"), "read", NOTES).allowed
    assert token.may_access_doctype(OWNER, "write", "anything").allowed
    token.remove_rule(rule_family)
    assert not token.decide(peer, "write", {"doctype": PHOTOS, "album": "holidays"}).allowed
    with pytest.raises(NotFound):
        token.remove_rule(rule_family)
    assert [r.id for r in token.list_rules()] == ["r1", rule_peer]


def test_malformed_rules_and_requests_change_nothing(token) -> None:
    token.add_rule(NOTES, "role", "family", "read")
    before = token.list_rules()
    with pytest.raises(RuleError, match="unknown operator"):
        token.add_rule(NOTES, "role", "family", "read", {"a": {"$where": "1"}})
    with pytest.raises(RuleError, match="subject kind"):
        token.add_rule(NOTES, "group", "family", "read")
    with pytest.raises(RuleError, match="perm"):
        token.add_rule(NOTES, "role", "family", "delete")
    with pytest.raises(RuleError):
        token.add_app("bad", NOTES, "read", {"$or": []})
    assert token.list_rules() == before and token.list_apps() == []
    with pytest.raises(InvalidArgument, match="action"):
        token.decide(OWNER, "delete", {"doctype": NOTES})
    with pytest.raises(InvalidArgument, match="doctype"):
        token.decide(OWNER, "read", {"_id": "x"})


def test_every_decision_is_logged(token) -> None:
    app = token.authenticate(token.add_app("notes", NOTES, "read"))
    token.decide(app, "read", {"doctype": NOTES, "_id": "n1"})
    token.decide(app, "write", {"doctype": NOTES, "_id": "n1"})
    token.may_access_doctype(app, "list", PHOTOS)
    last = token.audit_tail(3)
    assert [(e.principal, e.action, e.doctype, e.doc_id, e.allowed) for e in last] == [
        ("app:notes", "read", NOTES, "n1", True),
        ("app:notes", "write", NOTES, "n1", False),
        ("app:notes", "list", PHOTOS, None, False),
    ]
    assert all(e.reason for e in last)
    assert [e.seq for e in last] == list(range(last[0].seq, last[0].seq + 3))


def test_sign_refuses_the_token_s_own_domains(token) -> None:
    from plugshare.token.identity import CHALLENGE_DOMAIN
    from plugshare.token.sharekey import SIGNING_DOMAIN

    for prefix in (CHALLENGE_DOMAIN, SIGNING_DOMAIN):
        with pytest.raises(InvalidArgument, match="reserved"):
            token.sign(prefix + b"anything")
    assert Token.verify(token.public_key_bytes, b"app/v1 data", token.sign(b"app/v1 data"))


def test_soft_keystore_may_share_the_state_directory(tmp_path: Path) -> None:
    token, owner = Token.create(tmp_path / "home", SoftKeystore(tmp_path / "home", None), name="n")
    token.add_app("notes", NOTES, "read")
    token.close()
    token = Token.open(tmp_path / "home", SoftKeystore(tmp_path / "home", None))
    try:
        assert token.authenticate(owner) == OWNER
        assert [a.name for a in token.list_apps()] == ["notes"]
    finally:
        token.close()

