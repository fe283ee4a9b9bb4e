"""The CouchDB-compatible API (`/couch`, issue 12) against real nodes, with plain httpx:
CouchDB 3's shapes and status codes, scoped by the token."""

from __future__ import annotations

import base64
import json
import threading
from urllib.parse import quote

import httpx
import pytest

from tests.node.cluster import Cluster, ClusterNode, share_between, wait_until



@pytest.fixture(scope="module")
def alice(tmp_path_factory):
    """One node for the whole module (starting one costs seconds); each test uses its own
    doctype or ids, so the tests do not see each other's documents."""
    cluster = Cluster(tmp_path_factory.mktemp("couch"))
    try:
        yield cluster.add("alice")
    finally:
        cluster.close()
        print(cluster.logs())


def couch(node: ClusterNode, credential: str | None = None, *, basic: str | None = None,
          **kwargs) -> httpx.Client:
    """A client of the node's /couch API with `credential` (the owner's by default), as
    Bearer, or as the password of Basic with user name `basic`."""
    credential = credential or node.running.credential
    if basic is not None:
        token = base64.b64encode(f"{basic}:{credential}".encode()).decode()
        headers = {"Authorization": f"Basic {token}"}
    else:
        headers = {"Authorization": f"Bearer {credential}"}
    return httpx.Client(base_url=node.running.api_url + "/couch", headers=headers,
                        timeout=60.0, **kwargs)


def add_app(node: ClusterNode, name: str, doctype: str, perm: str,
            selector: dict | None = None) -> str:
    body = {"name": name, "doctype": doctype, "perm": perm}
    if selector is not None:
        body["selector"] = selector
    return node.api("POST", "/token/apps", json=body)["credential"]


# -- 1. authentication -------------------------------------------------------------------


def test_welcome_and_both_ways_to_authenticate(alice):
    with couch(alice) as bearer, couch(alice, basic="any-name") as basic:
        for client in (bearer, basic):
            answer = client.get("/")
            assert answer.status_code == 200, answer.text
            welcome = answer.json()
            assert welcome["couchdb"] == "Welcome"
            assert welcome["vendor"]["name"] == "plugshare"
            assert isinstance(welcome["version"], str)


def test_a_wrong_credential_is_401_asking_for_basic(alice):
    wrong = "ps1.0123456789abcdef.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    for client in (couch(alice, wrong), couch(alice, wrong, basic="owner"),
                   httpx.Client(base_url=alice.running.api_url + "/couch")):
        with client:
            answer = client.get("/_all_dbs")
            assert answer.status_code == 401
            assert answer.json()["error"] == "unauthorized"
            assert answer.headers["www-authenticate"] == 'Basic realm="plugshare"'


# -- 2. virtual databases ------------------------------------------------------------------


def test_databases_as_the_owner_and_as_an_app_see_them(alice):
    alice.put("db.notes", {"title": "one", "tag": "work"}, "dbn-1")
    alice.put("db.notes", {"title": "two", "tag": "home"}, "dbn-2")
    alice.put("db.other", {"title": "elsewhere"}, "dbo-1")
    app = add_app(alice, "db-reader", "db.notes", "read", {"tag": "work"})
    with couch(alice) as owner, couch(alice, app, basic="db-reader") as reader:
        assert "db.notes" in owner.get("/_all_dbs").json()
        assert reader.get("/_all_dbs").json() == ["db.notes"]

        info = owner.get("/db.notes").json()
        assert info["db_name"] == "db.notes" and info["doc_count"] == 2
        assert "update_seq" in info
        assert reader.get("/db.notes").json()["doc_count"] == 1  # its selector's docs only
        assert owner.head("/db.notes").status_code == 200

        existing = reader.put("/db.notes")
        assert existing.status_code == 412
        assert existing.json()["error"] == "file_exists"

        for path in ("/db.other", "/share:nothing-here", "/share%3Anothing-here"):
            missing = reader.get(path)
            assert missing.status_code == 404, (path, missing.text)
            assert missing.json() == {"error": "not_found", "reason": "Database does not exist."}
        assert owner.get("/share:nothing-here").status_code == 404
