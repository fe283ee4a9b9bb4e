"""Share links on a real token and its command set, on both keystores: a credential for an
outside client (PouchDB, another CouchDB) bound to one share, decided by the share's rule
alone, refused once unlinked, expired or once this node's part in the share ended, audited as
`link:<id>`, and kept across a token restart.

`token` is the share's owner (node-a, through its `Door` with the owner credential); a member
(node-m) is made on a soft keystore, with its own door and owner credential."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest

from plugshare.token.inside import (
    AccessDenied,
    AuthenticationError,
    Door,
    InvalidArgument,
    NotFound,
    SoftKeystore,
    Token,
)

from .conftest import KeystoreFactory
from .test_shares import join, travelled

NOTES = "io.plugshare.notes"
TASKS = "io.plugshare.tasks"
SHARED = {"tag": "shared"}


def _wire(value):
    return msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False)


def doc(doc_id: str, doctype: str = NOTES, **fields) -> dict:
    return {"_id": doc_id, "_rev": "1-" + "ab" * 16, "doctype": doctype, **fields}


IN_SCOPE = doc("in", tag="shared", text="for the link")
OUT_OF_SELECTOR = doc("out", tag="private", text="not for the link")
OTHER_DOCTYPE = doc("task", TASKS, tag="shared")


@pytest.fixture
def owner(token_and_owner) -> tuple[Door, str]:
    token, credential = token_and_owner
    token.create_share("notes", NOTES, SHARED)
    return Door(token), credential


@pytest.fixture
def member(tmp_path: Path) -> Iterator[tuple[Token, str]]:
    token, credential = Token.create(
        tmp_path / "state-m", SoftKeystore(tmp_path / "keystore-m", None), name="node-m")
    try:
        yield token, credential
    finally:
        token.close()


def link(door: Door, credential: str, permission: str = "read", **extra) -> dict:
    return _wire(door.handle("share.link", {"credential": credential, "share": "notes",
                                            "permission": permission, **extra}))


def read(door: Door, credential: str, stored: dict, doctype: str | None = None) -> dict:
    args = {"credential": credential, "doc": stored}
    if doctype is not None:
        args["doctype"] = doctype
    return _wire(door.handle("doc.read", args))["doc"]


def write(door: Door, credential: str, new: dict, current: dict | None = None) -> dict:
    return _wire(door.handle("doc.write", {"credential": credential, "doc": new,
                                           "current": current, "generation": 1}))


def entries(token: Token, principal: str) -> list:
    return token.audit_search(1000, principal=principal)


def test_a_link_reads_exactly_its_share_and_each_decision_is_audited_as_the_link(
    owner, token: Token
) -> None:
    door, owner_credential = owner
    made = link(door, owner_credential)
    assert set(made) == {"id", "credential", "share", "permission", "created", "expires"}
    assert made["share"] == token.share("notes").share_id and made["permission"] == "read"
    assert made["expires"] is None and made["credential"].split(".")[1] == made["id"]
    who = door.handle("auth", {"credential": made["credential"]})
    assert who == {"kind": "link", "id": made["id"], "label": f"link:{made['id']}"}
    assert token.link_share(made["id"]) == made["share"]

    assert read(door, made["credential"], IN_SCOPE)["text"] == "for the link"
    assert read(door, made["credential"], IN_SCOPE, NOTES)["_id"] == "in"
    with pytest.raises(NotFound):  # of the share's doctype, outside its selector
        read(door, made["credential"], OUT_OF_SELECTOR)
    with pytest.raises(NotFound):  # another doctype
        read(door, made["credential"], OTHER_DOCTYPE)
    with pytest.raises(AccessDenied):  # a listing of another doctype
        door.handle("doc.list", {"credential": made["credential"], "doctype": TASKS,
                                 "docs": [OTHER_DOCTYPE]})
    listed = door.handle("doc.list", {"credential": made["credential"],
                                      "docs": [IN_SCOPE, OUT_OF_SELECTOR, OTHER_DOCTYPE]})
    assert [d["_id"] for d in listed["docs"]] == ["in"]

    token.flush()
    log = [(e.action, e.doc_id, e.allowed) for e in entries(token, f"link:{made['id']}")]
    assert ("read", "in", True) in log and ("read", "out", False) in log
    assert ("read", "task", False) in log and ("list", "in", True) in log
    assert [e.action for e in entries(token, "owner:owner")].count("share_link") == 1


def test_the_rule_set_is_never_consulted_for_a_link(owner, token: Token) -> None:
    door, owner_credential = owner
    # rules granting every notes and tasks document to everyone with a role change nothing
    token.add_app("notes-app", NOTES, "write")
    token.add_rule(TASKS, "role", "everyone", "write")
    made = link(door, owner_credential, "write")
    with pytest.raises(NotFound):
        read(door, made["credential"], OUT_OF_SELECTOR)
    with pytest.raises(AccessDenied):
        write(door, made["credential"], doc("t2", TASKS, tag="shared"))


def test_a_read_only_link_cannot_write_and_a_write_link_writes_only_in_scope(
    owner, token: Token
) -> None:
    door, owner_credential = owner
    reader = link(door, owner_credential, "read")
    with pytest.raises(AccessDenied, match="may only read"):
        write(door, reader["credential"], {"_id": "new", "doctype": NOTES, "tag": "shared"})
    with pytest.raises(AccessDenied):
        door.handle("doc.delete", {"credential": reader["credential"], "current": IN_SCOPE,
                                   "rev": "2-" + "cd" * 16})

    writer = link(door, owner_credential, "write")
    stored = write(door, writer["credential"], {"_id": "new", "doctype": NOTES, "tag": "shared"})
    assert stored["doc"]["_id"] == "new"
    with pytest.raises(AccessDenied):  # out of the selector
        write(door, writer["credential"], {"_id": "p", "doctype": NOTES, "tag": "private"})
    with pytest.raises(AccessDenied):  # nor may it take a document out of the share's scope
        write(door, writer["credential"], {"_id": "in", "_rev": IN_SCOPE["_rev"],
                                           "doctype": NOTES, "tag": "private"}, IN_SCOPE)
    with pytest.raises(AccessDenied):  # nor overwrite one outside it
        write(door, writer["credential"], {"_id": "out", "_rev": OUT_OF_SELECTOR["_rev"],
                                           "doctype": NOTES, "tag": "shared"}, OUT_OF_SELECTOR)
    tombstone = door.handle("doc.delete", {"credential": writer["credential"],
                                           "current": IN_SCOPE, "rev": "2-" + "cd" * 16})
    assert tombstone["doc"]["_deleted"] is True


def test_a_link_cannot_administer_anything(owner, token: Token) -> None:
    door, owner_credential = owner
    made = link(door, owner_credential, "write")
    credential = made["credential"]
    for command, args in [
        ("owner.check", {"action": "status"}),
        ("app.list", {}),
        ("rule.list", {}),
        ("audit.tail", {"n": 5}),
        ("share.create", {"name": "mine", "doctype": NOTES}),
        ("share.link", {"share": "notes", "permission": "write"}),
        ("share.links", {}),
        ("share.unlink", {"share": "notes", "link": made["id"]}),
        ("share.invitations", {}),
        ("share.revoke", {"share": "notes", "member": "x"}),
        ("doc.reseal", {"docs": []}),
    ]:
        with pytest.raises(AccessDenied, match="only the owner"):
            door.handle(command, {"credential": credential, **args})
    token.flush()
    refused = [e for e in entries(token, f"link:{made['id']}") if not e.allowed]
    assert len(refused) == 11
    assert door.handle("auth", {"credential": credential})["kind"] == "link"  # still works


def test_unlinked_and_expired_links_are_refused_like_unknown_credentials_and_audited(
    owner, token: Token
) -> None:
    door, owner_credential = owner
    gone = link(door, owner_credential)
    row = door.handle("share.unlink", {"credential": owner_credential, "share": "notes",
                                       "link": gone["id"]})
    assert row["status"] == "unlinked" and "credential" not in row
    with pytest.raises(AuthenticationError, match="unknown or revoked credential"):
        door.handle("auth", {"credential": gone["credential"]})
    assert token.link_share(gone["id"]) is None
    with pytest.raises(NotFound):  # unlinked once; a second time there is nothing to unlink
        door.handle("share.unlink", {"credential": owner_credential, "share": "notes",
                                     "link": gone["id"]})

    now = time.time()
    # a link whose expiry passed (made "two minutes ago", valid for one)
    credential, short = token.create_link("notes", permission="read", now=now - 120,
                                          expires=now - 60)
    with pytest.raises(AuthenticationError, match="unknown or revoked credential"):
        door.handle("auth", {"credential": credential})
    assert token.link_share(short.id) is None
    with pytest.raises(AuthenticationError, match="unknown or revoked credential"):
        door.handle("auth", {"credential": "ps1.0123456789abcdef." + "A" * 43})

    token.flush()
    [unlinked] = entries(token, f"link:{gone['id']}")[-1:]
    assert unlinked.action == "authenticate" and not unlinked.allowed
    assert "unlinked" in unlinked.reason
    [late] = entries(token, f"link:{short.id}")
    assert late.action == "authenticate" and not late.allowed and "expired" in late.reason
    rows = {r["id"]: r for r in door.handle("share.links", {"credential": owner_credential})
            ["links"]}
    assert rows[gone["id"]]["status"] == "unlinked" and rows[short.id]["status"] == "expired"


def test_a_flood_of_an_expired_link_costs_a_bounded_number_of_entries(
    owner, token: Token
) -> None:
    now = time.time()
    credential, record = token.create_link("notes", permission="read", now=now - 120,
                                           expires=now - 60)
    door, _ = owner
    before = token.info().audit_entries
    for _ in range(500):
        with pytest.raises(AuthenticationError):
            door.handle("auth", {"credential": credential})
    assert token.info().audit_entries - before <= 2


def test_links_list_without_secrets_and_refuse_bad_fields(owner, token: Token) -> None:
    door, owner_credential = owner
    made = link(door, owner_credential, expires=time.time() + 3600)
    listed = door.handle("share.links", {"credential": owner_credential, "share": "notes"})
    assert [r["id"] for r in listed["links"]] == [made["id"]]
    assert made["credential"].split(".")[2] not in json.dumps(listed)
    row = listed["links"][0]
    assert row["status"] == "active" and row["permission"] == "read"
    assert row["expires"] == pytest.approx(made["expires"])
    for bad in [{"permission": "admin"}, {"permission": "read", "expires": time.time() - 1},
                {"permission": "read", "expires": "tomorrow"}]:
        with pytest.raises(InvalidArgument):
            door.handle("share.link", {"credential": owner_credential, "share": "notes", **bad})
    with pytest.raises(NotFound):
        door.handle("share.link", {"credential": owner_credential, "share": "nope",
                                   "permission": "read"})
    with pytest.raises(NotFound):  # a link is unlinked through its own share
        token.create_share("other", TASKS)
        door.handle("share.unlink", {"credential": owner_credential, "share": "other",
                                     "link": made["id"]})


def test_links_survive_a_token_restart(
    token_and_owner, make_keystore: KeystoreFactory, state_dir: Path
) -> None:
    token, owner_credential = token_and_owner
    token.create_share("notes", NOTES, SHARED)
    door = Door(token)
    made = link(door, owner_credential, "write")
    gone = link(door, owner_credential)
    door.handle("share.unlink", {"credential": owner_credential, "share": "notes",
                                 "link": gone["id"]})
    token.close()
    reopened = Token.open(state_dir, make_keystore())
    try:
        door = Door(reopened)
        assert door.handle("auth", {"credential": made["credential"]})["id"] == made["id"]
        assert reopened.link_share(made["id"]) == made["share"]
        assert write(door, made["credential"],
                     {"_id": "w", "doctype": NOTES, "tag": "shared"})["doc"]["_id"] == "w"
        with pytest.raises(AuthenticationError):
            door.handle("auth", {"credential": gone["credential"]})
    finally:
        reopened.close()


def test_a_member_links_up_to_its_permission_and_its_links_end_with_its_membership(
    token: Token, member: tuple[Token, str]
) -> None:
    node_m, m_credential = member
    token.create_share("notes", NOTES, SHARED)
    join(token, node_m, "notes", "write")
    m_door = Door(node_m)
    made = link(m_door, m_credential, "write")
    assert m_door.handle("auth", {"credential": made["credential"]})["kind"] == "link"
    assert read(m_door, made["credential"], IN_SCOPE)["_id"] == "in"

    revoked = token.revoke_member("notes", "node-m")
    node_m.accept_manifest(travelled(revoked), sender=token.fingerprint)
    with pytest.raises(AuthenticationError, match="unknown or revoked credential"):
        m_door.handle("auth", {"credential": made["credential"]})
    assert node_m.link_share(made["id"]) is None
    node_m.flush()
    [refusal] = [e for e in entries(node_m, f"link:{made['id']}") if e.action == "authenticate"]
    assert "revoked" in refusal.reason
    with pytest.raises(AccessDenied, match="revoked"):  # no new links either
        link(m_door, m_credential)

    # admitted again: the links of the earlier membership stay ended
    join(token, node_m, "notes", "write")
    assert node_m.share_status("notes") == "active"
    with pytest.raises(AuthenticationError):
        m_door.handle("auth", {"credential": made["credential"]})
    [row] = m_door.handle("share.links", {"credential": m_credential})["links"]
    assert row["status"] == "ended" and "revoked" in row["reason"]


def test_a_read_only_member_makes_read_links_only_and_leaving_ends_them(
    token: Token, member: tuple[Token, str]
) -> None:
    node_m, m_credential = member
    token.create_share("notes", NOTES, SHARED)
    join(token, node_m, "notes", "read")
    m_door = Door(node_m)
    with pytest.raises(AccessDenied, match="read permission"):
        link(m_door, m_credential, "write")
    made = link(m_door, m_credential, "read")
    assert read(m_door, made["credential"], IN_SCOPE)["_id"] == "in"
    with pytest.raises(AccessDenied):
        write(m_door, made["credential"], {"_id": "x", "doctype": NOTES, "tag": "shared"})

    node_m.leave_share("notes")
    with pytest.raises(AuthenticationError):
        m_door.handle("auth", {"credential": made["credential"]})
    node_m.forget_share("notes")
    with pytest.raises(AuthenticationError):
        m_door.handle("auth", {"credential": made["credential"]})
    assert node_m.link_share(made["id"]) is None


def test_an_expired_share_ends_its_links_at_the_owner(token: Token, owner) -> None:
    door, owner_credential = owner
    now = time.time()
    token.create_share("brief", NOTES, expires=now + 3600, now=now)
    credential, record = token.create_link("brief", permission="read")
    assert token.link_share(record.id) is not None
    assert token.link_share(record.id, now=now + 7200) is None  # the share has expired then
    assert "expired" in token.list_links("brief")[0]["reason"]
    with pytest.raises(AuthenticationError):
        door.handle("auth", {"credential": credential})


def test_a_link_to_an_encrypted_share_reads_its_sealed_documents_in_clear(token_and_owner):
    token, owner_credential = token_and_owner
    token.create_share("vault", NOTES, encrypted=True)
    door = Door(token)
    sealed = write(door, owner_credential, {"_id": "v1", "doctype": NOTES, "text": "secret"})
    stored = {**sealed["doc"], "_rev": "1-" + "ef" * 16}
    assert "secret" not in json.dumps(stored)
    made = _wire(door.handle("share.link", {"credential": owner_credential, "share": "vault",
                                            "permission": "read"}))
    assert read(door, made["credential"], stored)["text"] == "secret"
    principal = token.authenticate(made["credential"])
    assert token.may_access_doctype(principal, "list", NOTES).allowed
    assert not token.may_access_doctype(principal, "list", TASKS).allowed
    assert not token.may_access_doctype(principal, "write", NOTES).allowed
