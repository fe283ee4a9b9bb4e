"""Every request of the local API is decided by the token: apps, rules, encryption, audit,
against real nodes (subprocesses) on both keystores."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.node.conftest import init_node, start_node
from tests.support.softhsm import HSM_TOKEN_LABEL, PIN_ENV


@pytest.fixture(params=["soft", "pkcs11"])
def keystore_node(request, tmp_path):
    """A running node whose token keeps its master key in a soft keystore (unlocked with a
    passphrase) or in a real SoftHSM2 device."""
    home = tmp_path / f"node-{request.param}"
    if request.param == "soft":
        args = ("--passphrase-from", "env:PLUGSHARE_TEST_PASSPHRASE")
        request.getfixturevalue("monkeypatch").setenv(
            "PLUGSHARE_TEST_PASSPHRASE", "correct horse battery staple")
    else:
        request.getfixturevalue("softhsm")
        args = ("--keystore", "pkcs11", "--pkcs11-token", HSM_TOKEN_LABEL,
                "--pkcs11-pin", f"env:{PIN_ENV}")
    init_node(home, "--name", f"n-{request.param}", *args)
    running = start_node(home)
    yield running
    running.stop()


def _api(node, credential: str | None = None) -> httpx.Client:
    return httpx.Client(base_url=node.api_url,
                        headers={"Authorization": f"Bearer {credential or node.credential}"})


def test_apps_see_only_what_their_grant_allows(keystore_node):
    node = keystore_node
    with _api(node) as owner:
        for i, tag in enumerate(["work", "home", "work"]):
            owner.put(f"/data/io.notes/n{i}", json={"tag": tag}).raise_for_status()
        owner.put("/data/io.bank/b1", json={"iban": "FR76"}).raise_for_status()

    added = node.cli("--json", "app", "add", "notes-reader", "--doctype", "io.notes",
                     "--perm", "read", "--selector", '{"tag": "work"}')
    assert added.returncode == 0, added.stderr
    credential = json.loads(added.stdout)["credential"]

    with _api(node, credential) as app:
        listing = app.get("/data/io.notes/")
        assert listing.status_code == 200
        assert sorted(d["_id"] for d in listing.json()["docs"]) == ["n0", "n2"]
        assert app.get("/data/io.notes/n0").json()["tag"] == "work"
        # outside its selector: not found, as a missing doc is (no probing which ids exist)
        assert app.get("/data/io.notes/n1").status_code == 404
        other = app.get("/data/io.bank/")
        assert other.status_code == 403 and other.json()["error"] == "forbidden"
        assert app.get("/data/io.bank/b1").status_code == 403
        write = app.put("/data/io.notes/n9", json={"tag": "work"})
        assert write.status_code == 403  # read-only
        assert app.get("/token/rules").status_code == 403  # only the owner manages the token

    with _api(node) as owner:
        assert owner.get("/data/io.notes/n9").status_code == 404  # nothing was written

    # the refusals are in the audit log, and its chain verifies
    audit = json.loads(node.cli("--json", "audit", "--tail", "50", "--verify").stdout)
    denied = [e for e in audit["entries"] if e["principal"] == "app:notes-reader"
              and not e["allowed"]]
    assert {e["doc_id"] for e in denied} >= {"n1", "b1", "n9"}
    assert audit["verify"]["ok"] is True

    # removing the app revokes its credential at once
    assert node.cli("app", "rm", "notes-reader").returncode == 0
    with _api(node, credential) as app:
        assert app.get("/data/io.notes/n0").status_code == 401


def test_rules_grant_writes_and_selectors_bound_them(keystore_node):
    node = keystore_node
    added = json.loads(node.cli("--json", "app", "add", "tasks", "--doctype", "io.tasks",
                                "--perm", "read").stdout)
    rule = node.cli("--json", "rule", "add", "--doctype", "io.tasks", "--selector",
                    '{"owner": {"$in": ["me", "us"]}}', "--app", "tasks", "--perm", "write")
    assert rule.returncode == 0, rule.stderr
    rule_id = json.loads(rule.stdout)["id"]
    assert rule_id in node.cli("rule", "list").stdout

    with _api(node, added["credential"]) as app:
        assert app.put("/data/io.tasks/t1", json={"owner": "me"}).status_code == 201
        refused = app.put("/data/io.tasks/t2", json={"owner": "them"})
        assert refused.status_code == 403
        # no rewriting a doc into scope: t3 belongs to "them", written by the owner
        with _api(node) as owner:
            rev = owner.put("/data/io.tasks/t3", json={"owner": "them"}).json()["rev"]
        hijack = app.put("/data/io.tasks/t3", json={"owner": "me", "_rev": rev})
        assert hijack.status_code == 403

    assert node.cli("rule", "rm", rule_id).returncode == 0
    with _api(node, added["credential"]) as app:
        assert app.put("/data/io.tasks/t4", json={"owner": "me"}).status_code == 403

    bad = node.cli("rule", "add", "--doctype", "io.tasks", "--selector", '{"$where": 1}',
                   "--app", "tasks", "--perm", "write")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
    missing = node.cli("rule", "rm", "r999")
    assert missing.returncode == 1 and "r999" in missing.stderr


def test_wrong_credential_is_refused_and_logged(keystore_node):
    node = keystore_node
    with _api(node, "ps1.0000000000000000.forged") as stranger:
        assert stranger.get("/docs/").status_code == 401
    entries = json.loads(node.cli("--json", "audit", "--tail", "10").stdout)["entries"]
    assert any(e["principal"] == "anonymous" and e["action"] == "authenticate"
               and not e["allowed"] for e in entries)


def _database(node) -> str:
    """The node's own CouchDB database (named after the node and its id)."""
    status = json.loads(node.cli("--json", "status").stdout)
    return status["store"]["database"]


def test_encrypted_doctype_is_ciphertext_on_the_server(tmp_path, couchdb_url):
    home = tmp_path / "carol"
    init_node(home, "--name", "carol", "--store", "couchdb", "--couchdb-url", couchdb_url)
    node = start_node(home)
    try:
        with _api(node) as owner:
            first = owner.put("/data/io.health/before", json={"diagnosis": "plain-before-7431"})
        done = node.cli("--json", "encrypt", "io.health")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["rewritten"] == 1
        with _api(node) as owner:
            owner.put("/data/io.health/after", json={"diagnosis": "plain-after-9952",
                                                     "subject": "checkup"})
            # through the API: clear text
            assert owner.get("/data/io.health/before").json()["diagnosis"] == "plain-before-7431"
            after = owner.get("/data/io.health/after").json()
            assert after["diagnosis"] == "plain-after-9952"
        # on the CouchDB server itself (what curl shows): no clear value of a body field
        db = f"{couchdb_url}/{_database(node)}"
        for doc_id, secret in (("before", "plain-before-7431"), ("after", "plain-after-9952")):
            raw = httpx.get(f"{db}/{doc_id}").text
            assert secret not in raw and "diagnosis" not in raw
            assert "io.health" in raw  # the rule fields stay in clear
        assert "checkup" in httpx.get(f"{db}/after").text
        # the clear first revision does not linger in the server's history
        old = f"{db}/before?rev={first.json()['rev']}"
        for _ in range(100):
            if httpx.get(old).status_code == 404:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the clear revision is still on the server")
    finally:
        node.stop()


def test_tampered_ciphertext_is_refused_and_the_node_keeps_serving(tmp_path, couchdb_url):
    home = tmp_path / "dave"
    init_node(home, "--name", "dave", "--store", "couchdb", "--couchdb-url", couchdb_url)
    node = start_node(home)
    try:
        node.cli("encrypt", "io.health")
        with _api(node) as owner:
            owner.put("/data/io.health/a", json={"v": "secret-a"}).raise_for_status()
            owner.put("/data/io.health/b", json={"v": "secret-b"}).raise_for_status()
        # the untrusted database swaps a's ciphertext into b
        db = f"{couchdb_url}/{_database(node)}"
        a, b = httpx.get(f"{db}/a").json(), httpx.get(f"{db}/b").json()
        moved = {**a, "_id": "b", "_rev": b["_rev"]}
        assert httpx.put(f"{db}/b", json=moved).status_code == 201
        with _api(node) as owner:
            refused = owner.get("/data/io.health/b")
            assert refused.status_code == 502 and refused.json()["error"] == "integrity"
            assert owner.get("/data/io.health/a").json()["v"] == "secret-a"
        entries = json.loads(node.cli("--json", "audit", "--tail", "20").stdout)["entries"]
        assert any(e["doc_id"] == "b" and not e["allowed"] for e in entries)
    finally:
        node.stop()
