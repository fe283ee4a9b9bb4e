"""The token is the one door: the defects found when the node decided around it, each
reproduced with real nodes (subprocesses, the token in its own process, real SQLite files),
and the process boundary itself."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from contextlib import closing
from pathlib import Path

import httpx
import msgpack
import pytest

from tests.node.cluster import ApiError, cluster, share_between, wait_until  # noqa: F401 (fixture)

SEALED = "plugshare:sealed"


def _client(node, credential: str | None = None) -> httpx.Client:
    running = node.running
    return httpx.Client(base_url=running.api_url,
                        headers={"Authorization": f"Bearer {credential or running.credential}"})


def _rows(home: Path) -> dict[str, dict]:
    """Every doc's leaf bodies as the SQLite file holds them (what an attacker can edit);
    the node must be stopped (a running node holds the file exclusively)."""
    with closing(sqlite3.connect(home / "store.sqlite")) as db:
        rows = db.execute("SELECT id, bodies FROM docs").fetchall()
    return {doc_id: msgpack.unpackb(bodies, raw=False) for doc_id, bodies in rows}


def _rows_of(node) -> dict[str, dict]:
    """`_rows` of a running node: stopped for the read, started again after."""
    node.stop()
    try:
        return _rows(node.home)
    finally:
        node.start()


def _rewrite_body(home: Path, doc_id: str, new_body: dict) -> None:
    with closing(sqlite3.connect(home / "store.sqlite")) as db, db:
        (bodies,) = db.execute("SELECT bodies FROM docs WHERE id = ?", (doc_id,)).fetchone()
        leaves = msgpack.unpackb(bodies, raw=False)
        for rev in leaves:
            leaves[rev] = json.dumps({**new_body, "_id": doc_id, "_rev": rev})
        db.execute("UPDATE docs SET bodies = ? WHERE id = ?",
                   (msgpack.packb(leaves, use_bin_type=True), doc_id))


def _app(node, name: str, *args: str) -> str:
    done = node.cli("--json", "app", "add", name, *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["credential"]


# -- 1. a stripped envelope is detected -----------------------------------------------------

def test_a_sealed_doc_whose_envelope_is_stripped_is_refused_and_audited(cluster):
    alice = cluster.add("alice")
    alice.cli_ok("encrypt", "io.health")
    alice.put("io.health", {"note": "blood type O-"}, "h1")
    alice.stop()
    body = next(iter(_rows(alice.home)["h1"].values()))
    assert SEALED in json.loads(body) and "O-" not in body  # stored sealed
    _rewrite_body(alice.home, "h1", {"doctype": "io.health", "note": "forged"})
    alice.start()
    with pytest.raises(ApiError) as refused:
        alice.get("h1")
    assert refused.value.status == 502 and refused.value.body["error"] == "integrity"
    # the listing leaves it out (and says which id failed), the node keeps serving
    listing = alice.api("GET", "/data/io.health/")
    assert listing["docs"] == [] and listing.get("tampered") == ["h1"]
    alice.put("io.notes", {"t": "still serving"}, "n1")
    audit = alice.cli_json("audit", "--tail", "30")["entries"]
    assert any(e["doc_id"] == "h1" and not e["allowed"] and "clear" in e["reason"]
               for e in audit)


# -- 2. deletions replicate in selector and encrypted shares --------------------------------

@pytest.mark.parametrize("kind", ["selector", "encrypted"])
def test_deletions_replicate_in_selector_and_encrypted_shares(cluster, kind):
    alice, bob = cluster.add("alice"), cluster.add("bob")
    selector = {"tag": "work"} if kind == "selector" else None
    share_between(alice, [bob], name="notes", doctype="io.notes", selector=selector,
                  encrypt=kind == "encrypted")
    rev = alice.put("io.notes", {"tag": "work", "t": "x"}, "n1")
    wait_until(lambda: bob.get("n1"), what="n1 on bob")
    alice.delete("n1", rev)
    wait_until(lambda: bob.get("n1") is None, what="the deletion on bob")
    # and back: a deletion made by the member reaches the owner
    rev = bob.put("io.notes", {"tag": "work", "t": "y"}, "n2")
    wait_until(lambda: alice.get("n2"), what="n2 on alice")
    bob.delete("n2", rev)
    wait_until(lambda: alice.get("n2") is None, what="bob's deletion on alice")


# -- 3. tombstones and existence do not leak ------------------------------------------------

def test_an_app_learns_nothing_of_docs_it_may_not_read(cluster):
    alice = cluster.add("alice")
    rev = alice.put("io.notes", {"secret": "s3cr3t"}, "n1")
    alice.put("io.notes", {"secret": "other"}, "n2")
    tomb = alice.delete("n1", rev)
    tasks = _app(alice, "tasks", "--doctype", "io.tasks", "--perm", "write")
    with _client(alice, tasks) as app:
        conflict = app.put("/data/io.tasks/n2", json={"t": 1})
        assert conflict.status_code in (403, 409)
        assert alice.get("n2")["_rev"].split("-")[1] not in conflict.text  # no rev leaks
        tombstone = app.get(f"/docs/n1?rev={tomb}")
        assert tombstone.status_code == 404 and "s3cr3t" not in tombstone.text
        existing, missing = app.get("/docs/n2"), app.get("/docs/nope")
        assert existing.status_code == missing.status_code == 404
        assert existing.json()["error"] == missing.json()["error"]
        assert existing.json()["reason"].replace("n2", "X") == \
            missing.json()["reason"].replace("nope", "X")


# -- 4. sharing metadata is the owner's ----------------------------------------------------

def test_apps_cannot_read_the_nodes_status_shares_or_peers(cluster):
    alice, bob = cluster.add("alice"), cluster.add("bob")
    share_between(alice, [bob], name="notes", doctype="io.notes")
    reader = _app(alice, "reader", "--doctype", "io.notes", "--perm", "read")
    with _client(alice, reader) as app:
        for path in ("/status", "/shares", "/shares/notes", "/peers", "/token/audit"):
            answer = app.get(path)
            assert answer.status_code == 403, (path, answer.text)
            assert bob.node_id not in answer.text and "notes" not in answer.json()["reason"]
    assert alice.status()["name"] == "alice"  # the owner still sees it


# -- 5. a sensitive doctype received through a plain share is sealed here ------------------

def test_a_sensitive_doctype_received_in_a_plain_share_is_stored_sealed(cluster):
    alice, bob = cluster.add("alice"), cluster.add("bob")
    bob.cli_ok("encrypt", "io.health")
    share_between(alice, [bob], name="health", doctype="io.health")
    alice.put("io.health", {"note": "allergic to penicillin"}, "h1")
    doc = wait_until(lambda: bob.get("h1"), what="h1 on bob")
    assert doc["note"] == "allergic to penicillin"  # bob's owner reads it
    stored = next(iter(_rows_of(bob)["h1"].values()))
    assert "penicillin" not in stored and SEALED in json.loads(stored)


# -- 6. revocation rotates an encrypted share's key ---------------------------------------

def _kid(node, doc_id: str) -> str:
    body = json.loads(next(iter(_rows_of(node)[doc_id].values())))
    return body[SEALED]["kid"]


def test_revoking_a_member_rotates_the_key_of_an_encrypted_share(cluster):
    alice, bob, carol = cluster.add("alice"), cluster.add("bob"), cluster.add("carol")
    share_between(alice, [bob, carol], name="vault", doctype="io.vault", encrypt=True)
    alice.put("io.vault", {"pin": "1234"}, "v1")
    wait_until(lambda: carol.get("v1") and bob.get("v1"), what="v1 on both members")
    before = _kid(alice, "v1")  # (restarts alice)
    wait_until(lambda: alice.peer_connected(carol), what="carol linked to alice again")
    alice.cli_ok("share", "revoke", "vault", "carol")
    alice.put("io.vault", {"pin": "9999"}, "v2")
    after = _kid(alice, "v2")
    assert after != before  # written under a new key
    assert wait_until(lambda: bob.get("v2"), what="v2 on bob")["pin"] == "9999"
    # carol's token cannot open v2 even given its ciphertext: it never received the key
    wait_until(lambda: carol.share("vault")["status"] == "revoked", what="carol revoked")
    assert carol.get("v2") is None


# -- 7. an incoming doc is decided once -------------------------------------------------------

def test_each_received_doc_is_decided_once(cluster):
    alice, bob = cluster.add("alice"), cluster.add("bob")
    bob.put("io.tasks", {"t": "bob's own"}, "clash")  # outside the share, on bob only
    share_between(alice, [bob], name="notes", doctype="io.notes", selector={"tag": "x"})
    alice.put("io.notes", {"tag": "x"}, "clash")  # would land on bob's private doc
    alice.put("io.notes", {"tag": "x"}, "once")
    wait_until(lambda: bob.get("once"), what="the doc on bob")
    assert bob.get("clash")["doctype"] == "io.tasks"  # refused, bob's doc untouched
    entries = bob.cli_json("audit", "--tail", "200")["entries"]
    for doc_id, allowed in (("once", True), ("clash", False)):
        received = [e for e in entries
                    if e["doc_id"] == doc_id and e["action"] == "share-receive"]
        assert [e["allowed"] for e in received] == [allowed], received


# -- the process boundary --------------------------------------------------------------------

def _open_files(pid: int) -> list[str]:
    fd_dir = Path(f"/proc/{pid}/fd")
    targets = []
    for fd in fd_dir.iterdir():
        try:
            targets.append(os.readlink(fd))
        except OSError:
            pass
    return targets


def test_the_token_runs_in_its_own_process_and_the_node_holds_none_of_its_files(cluster):
    alice = cluster.add("alice")
    alice.cli_ok("encrypt", "io.health")
    alice.put("io.health", {"x": 1}, "h1")
    status = alice.status()
    node_pid, token_pid = status["pid"], status["token_pid"]
    assert token_pid and token_pid != node_pid
    secret_dirs = (str(alice.home / "token"), str(alice.home / "keystore"))
    assert not [f for f in _open_files(node_pid) if f.startswith(secret_dirs)]
    assert [f for f in _open_files(token_pid) if f.startswith(secret_dirs)]
    info = alice.cli_json("status")
    assert info["token_pid"] == token_pid

    # A token that dies is restarted; meanwhile nothing is decided without it.
    os.kill(token_pid, signal.SIGKILL)

    def restarted():
        try:
            return alice.status()["token_pid"] not in (None, token_pid)
        except ApiError as exc:
            assert exc.status == 503, exc  # meanwhile: unavailable, never decided without it
            return False

    wait_until(restarted, what="a new token process")
    assert alice.get("h1")["x"] == 1


def test_the_token_process_is_not_dumpable(cluster):
    alice = cluster.add("alice")
    token_pid = alice.status()["token_pid"]
    status = Path(f"/proc/{token_pid}/status").read_text()
    # A non-dumpable process's /proc files belong to root and core dumps are off; the
    # kernel reports the core-dump filter as unreadable... the portable check is the limit:
    limits = Path(f"/proc/{token_pid}/limits").read_text()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4] == "0", core
    assert "State" in status
    assert alice.api("GET", "/status")["token"]["dumpable"] is False


def test_a_stripped_envelope_on_a_couchdb_server_is_refused(cluster, couchdb_url):
    """The same forgery by whoever runs the CouchDB server: a new revision in plain JSON."""
    import uuid

    alice = cluster.add(f"strip-{uuid.uuid4().hex[:6]}", "--store", "couchdb",
                        "--couchdb-url", couchdb_url)
    alice.cli_ok("encrypt", "io.health")
    rev = alice.put("io.health", {"note": "blood type O-"}, "h1")
    database = alice.status()["store"]["database"]
    raw = httpx.get(f"{couchdb_url}/{database}/h1").json()
    assert raw["_rev"] == rev and SEALED in raw and "O-" not in json.dumps(raw)
    forged = httpx.put(f"{couchdb_url}/{database}/h1",
                       json={"_rev": rev, "doctype": "io.health", "note": "forged"})
    assert forged.status_code in (201, 202), forged.text
    with pytest.raises(ApiError) as refused:
        alice.get("h1")
    assert refused.value.status == 502 and refused.value.body["error"] == "integrity"
    audit = alice.cli_json("audit", "--tail", "20")["entries"]
    assert any(e["doc_id"] == "h1" and not e["allowed"] for e in audit)


def test_a_members_copies_become_unreadable_when_its_membership_expires(cluster):
    """Expiry holds offline too: the member's token destroys the share's keys once the time
    passes, and the sealed copies in its store can no longer be opened there."""
    alice, bob = cluster.add("alice"), cluster.add("bob")
    alice.cli_json("share", "create", "trip", "--doctype", "io.trip", "--encrypt")
    code = alice.cli_json("share", "invite", "trip", "--expires", "6s")["code"]
    bob.cli_json("share", "accept", "--no-progress", code)
    alice.put("io.trip", {"flight": "AF123"}, "t1")
    assert wait_until(lambda: bob.get("t1"), what="t1 on bob")["flight"] == "AF123"
    alice.stop()  # bob is alone from now on: nothing tells it anything
    wait_until(lambda: bob.get("t1") is None, timeout=20, what="t1 unreadable on bob")
    assert "t1" in _rows_of(bob)  # still there, sealed: only the key is gone
    audit = bob.cli_json("audit", "--tail", "50")["entries"]
    assert any(e["action"] == "destroy_share_key" for e in audit)
    alice.start()
    assert alice.get("t1")["flight"] == "AF123"  # the owner keeps its documents
