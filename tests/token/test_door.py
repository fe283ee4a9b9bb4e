"""The token's command interface (`Door`), on both keystores: what each command answers,
that the node is never handed a key or more than the caller may read, one audit entry per
decision, and malformed commands refused without a crash or a decision."""

from __future__ import annotations

import json

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plugshare.token import AccessDenied, IntegrityError, NotFound, TokenError
from plugshare.token.door import COMMANDS, Door
from plugshare.token.envelope import ENVELOPE_FIELD


@pytest.fixture
def door(token_and_owner):
    token, owner = token_and_owner
    return Door(token), owner


def _wire(value):
    """What crosses the socket: the answer must survive msgpack, as the real client sees it."""
    return msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False)


def _write(door, credential, doc, current=None, generation=1):
    return _wire(door.handle("doc.write", {"credential": credential, "doc": doc,
                                           "current": current, "generation": generation}))["doc"]


def _stored(form, rev="1-" + "a" * 32):
    return {**form, "_rev": rev}


def test_every_command_is_served(door):
    d, _ = door
    assert set(COMMANDS) == set(d._handlers)


def test_a_sensitive_doc_is_sealed_and_only_opened_through_a_command(door):
    d, owner = door
    d.handle("doctype.encrypt", {"credential": owner, "doctype": "io.health"})
    form = _write(d, owner, {"_id": "h1", "doctype": "io.health", "note": "O-"})
    assert ENVELOPE_FIELD in form and "O-" not in json.dumps(form)
    clear = _wire(d.handle("doc.read", {"credential": owner, "doc": _stored(form)}))["doc"]
    assert clear["note"] == "O-"


def test_a_stripped_envelope_is_an_integrity_error_with_an_audit_entry(door, token):
    d, owner = door
    d.handle("doctype.encrypt", {"credential": owner, "doctype": "io.health"})
    forged = {"_id": "h1", "_rev": "1-" + "b" * 32, "doctype": "io.health", "note": "forged"}
    with pytest.raises(IntegrityError, match="clear"):
        d.handle("doc.read", {"credential": owner, "doc": forged})
    listed = d.handle("doc.list", {"credential": owner, "docs": [forged]})
    assert listed == {"docs": [], "tampered": ["h1"]}
    assert any(e.doc_id == "h1" and not e.allowed for e in token.audit_tail(5))


def test_a_doc_outside_the_callers_rules_is_not_found_whether_or_not_it_exists(door, token):
    d, owner = door
    app = token.add_app("tasks", "io.tasks", "write")
    note = _stored({"_id": "n1", "doctype": "io.notes", "secret": "s"})
    tomb = {"_id": "n2", "_rev": "2-" + "c" * 32, "_deleted": True, "doctype": "io.notes",
            "secret": "kept in the tombstone"}
    for doc in (note, tomb, {"_id": "missing", "_deleted": True, "doctype": ""}):
        with pytest.raises(NotFound) as refused:
            d.handle("doc.read", {"credential": app, "doc": doc})
        assert str(refused.value) == f"no document {doc['_id']!r}"
    # a whole doctype it has no rule for is a plain refusal, the same for any id
    with pytest.raises(AccessDenied):
        d.handle("doc.read", {"credential": app, "doc": note, "doctype": "io.notes"})


def test_writing_over_a_doc_one_may_not_write_or_changing_its_doctype_is_refused(door, token):
    d, owner = door
    app = token.add_app("tasks", "io.tasks", "write")
    current = _stored({"_id": "n1", "doctype": "io.notes", "t": 1})
    with pytest.raises(AccessDenied) as refused:
        _write(d, app, {"_id": "n1", "doctype": "io.tasks"}, current, 2)
    assert current["_rev"] not in str(refused.value)
    with pytest.raises(TokenError, match="doctype cannot change"):
        _write(d, owner, {"_id": "n1", "doctype": "io.tasks"}, current, 2)
    with pytest.raises(TokenError, match="may not carry"):
        _write(d, owner, {"_id": "x", "doctype": "io.tasks", ENVELOPE_FIELD: {"kid": "k"}})


def test_one_audit_entry_per_decision(door, token):
    d, owner = door
    app = token.add_app("notes", "io.notes", "write")
    before = len(token.audit_tail(10_000))
    current = _stored({"_id": "n1", "doctype": "io.notes", "t": 1})
    _write(d, app, {"_id": "n1", "doctype": "io.notes", "t": 2}, current, 2)
    d.handle("doc.read", {"credential": app, "doc": current})
    after = token.audit_tail(10_000)
    assert len(after) - before == 2
    assert [e.action for e in after[-2:]] == ["write", "read"]


def test_the_node_is_never_handed_a_key(door):
    d, owner = door
    d.handle("doctype.encrypt", {"credential": owner, "doctype": "io.health"})
    info = _wire(d.handle("info", {}))
    assert set(info) >= {"node_id", "fingerprint", "public_key", "x25519"}
    assert not any(isinstance(v, (bytes, bytearray)) and len(v) == 32 and k not in
                   ("fingerprint", "public_key", "x25519") for k, v in info.items())
    assert "sign" not in COMMANDS and "encrypt_doc" not in COMMANDS


def test_link_commands_sign_only_their_own_statements(door, token):
    from plugshare.token import tls

    d, _ = door
    nonce, server = b"n" * 32, b"s" * 32
    proof = d.handle("link.prove", {"server_id": server, "nonce": nonce})["signature"]
    payload = tls.client_auth_payload(server, nonce, token.fingerprint)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    Ed25519PublicKey.from_public_bytes(token.public_key_bytes).verify(proof, payload)
    request = tls.new_delegation_request(token.public_key_bytes)
    delegation = d.handle("link.certify", {"tls_public_key": request.tls_public})["delegation"]
    context = tls.server_ssl_context(request.tls_private_key, delegation)
    assert context is not None
    with pytest.raises(TokenError):
        d.handle("link.prove", {"server_id": b"short", "nonce": nonce})


_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture],
          deadline=None)
@given(command=st.sampled_from(sorted(COMMANDS)) | st.text(max_size=12),
       args=st.dictionaries(st.sampled_from(
           ["credential", "doc", "docs", "doctype", "current", "generation", "share", "peer",
            "existing", "name", "n", "rev", "manifest", "request", "code", "secret"]),
           _values, max_size=6))
def test_malformed_commands_get_an_error_never_a_crash_or_a_decision(door, token, command, args):
    d, owner = door
    args.pop("credential", None)  # nobody without a credential is ever allowed anything
    try:
        answer = d.handle(command, args)
    except TokenError:
        return
    # What a command without a credential may answer: public facts only.
    assert command in ("info", "share.list", "share.grants", "link.may_connect",
                       "share.may_push", "share.outgoing", "share.incoming", "share.count",
                       "att.sealing"), \
        (command, args, answer)
    if command == "share.outgoing":
        assert all(v is not None and "withheld" in v for v in answer["verdicts"])
    if command == "share.incoming":
        assert all(r is not None and "refused" in r for r in answer["results"])


# -- attachments (issue 13): decided as the document's own writes ----------------------------

def _att_write(door, credential, current, *, content_type="image/png", doctype="io.photos",
               doc_id="p1", **extra):
    return _wire(door.handle("att.write", {
        "credential": credential, "doctype": doctype, "id": doc_id, "name": "a.png",
        "current": current, "content_type": content_type, **extra}))


def test_attachment_writes_follow_the_documents_rule_one_audit_entry_each(door, token):
    d, owner = door
    app = token.add_app("viewer", "io.photos", "write", {"album": "2024"})
    mine = _stored({"_id": "p1", "doctype": "io.photos", "album": "2024"})
    theirs = _stored({"_id": "p2", "doctype": "io.photos", "album": "2019"})
    before = len(token.audit_tail(10_000))
    assert _att_write(d, app, mine) == {"max_length": None, "base": None, "seal": None}
    with pytest.raises(NotFound):  # another selector's doc: not the app's to learn of
        _att_write(d, app, theirs, doc_id="p2")
    new = _att_write(d, owner, None, doc_id="p3")
    assert new["base"] == {"_id": "p3", "doctype": "io.photos"}
    with pytest.raises(NotFound):  # another doctype's document is missing here
        _att_write(d, owner, mine, doctype="io.notes")
    assert len(token.audit_tail(10_000)) - before == 4


def test_a_share_rule_caps_attachments_and_sealed_docs_take_them_sealed(door, token):
    d, owner = door
    d.handle("share.create", {"credential": owner, "name": "pics", "doctype": "io.photos",
                              "max_attachment_size": 5000, "attachment_types": ["image/*"]})
    doc = _stored({"_id": "p1", "doctype": "io.photos"})
    assert _att_write(d, owner, doc)["max_length"] == 5000
    with pytest.raises(TokenError, match="text/plain"):
        _att_write(d, owner, doc, content_type="text/plain")
    d.handle("doctype.encrypt", {"credential": owner, "doctype": "io.health"})
    health = _stored(_write(d, owner, {"_id": "h1", "doctype": "io.health", "n": 1}))
    # a sensitive doctype's attachments are sealed under its key as they stream in
    assert _att_write(d, owner, health, doctype="io.health", doc_id="h1")["seal"] == {
        "doctype": "io.health"}
    # a sealed doc may be written carrying stubs (data stored sealed), not inline data
    with pytest.raises(TokenError, match="inline"):
        _write(d, owner, {"_id": "h1", "_rev": health["_rev"], "doctype": "io.health",
                          "_attachments": {"a.png": {"data": "aGk=",
                                                     "content_type": "text/plain"}}}, health, 2)
