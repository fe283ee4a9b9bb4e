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


def rev(generation: int, digit: str) -> str:
    """A revision id of the form the store takes (N-<32 hex>)."""
    return f"{generation}-{digit * 32}"


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


# -- 3. replication endpoints -----------------------------------------------------------------


def _changed_ids(answer: dict) -> list[str]:
    return [row["id"] for row in answer["results"]]


def test_an_app_with_a_selector_sees_exactly_its_docs_and_its_refused_writes_are_per_doc(alice):
    app = add_app(alice, "sel-app", "sel.notes", "write", {"tag": "work"})
    with couch(alice) as owner, couch(alice, app, basic="sel-app") as mine:
        written = owner.post("/sel.notes/_bulk_docs", json={"docs": [
            {"_id": "s-work", "tag": "work"}, {"_id": "s-home", "tag": "home"}]})
        assert written.status_code == 201, written.text
        assert [r["ok"] for r in written.json()] == [True, True]

        changes = mine.get("/sel.notes/_changes", params={"include_docs": "true"}).json()
        assert _changed_ids(changes) == ["s-work"]
        assert changes["results"][0]["doc"]["tag"] == "work"
        assert "last_seq" in changes
        assert _changed_ids(owner.get("/sel.notes/_changes").json()) == ["s-work", "s-home"]

        answer = mine.post("/sel.notes/_bulk_docs", json={"docs": [
            {"_id": "s-new", "tag": "work"},  # allowed
            {"_id": "s-other", "tag": "home"},  # outside its selector
            {"_id": "s-home", "tag": "work"},  # over a doc it may not write
            {"_id": "s-typed", "doctype": "io.else", "tag": "work"},  # another doctype
        ]})
        assert answer.status_code == 201
        results = answer.json()
        assert results[0]["ok"] is True and results[0]["id"] == "s-new"
        assert [(r["id"], r["error"]) for r in results[1:]] == [
            ("s-other", "forbidden"), ("s-home", "forbidden"), ("s-typed", "forbidden")]
        assert all(r["reason"] for r in results[1:])
        assert alice.get("s-other") is None and alice.get("s-home")["tag"] == "home"

        # a doc it may not read is wholly missing to it, and not fetched
        diff = mine.post("/sel.notes/_revs_diff", json={"s-home": [rev(1, "a")], "s-work": [
            changes["results"][0]["changes"][0]["rev"]]}).json()
        assert diff == {"s-home": {"missing": [rev(1, "a")]}}
        got = mine.post("/sel.notes/_bulk_get", json={"docs": [{"id": "s-home"}]}).json()
        assert got["results"][0]["docs"][0]["error"]["error"] == "not_found"


def test_replicated_revisions_round_trip_like_couchdb(alice):
    """What a replicator does: push revisions with new_edits=false, then read them back with
    _revs_diff, _bulk_get?revs=true and _changes?style=all_docs (two conflicting leaves)."""
    with couch(alice) as owner:
        pushed = owner.post("/rep.notes/_bulk_docs", json={"new_edits": False, "docs": [
            {"_id": "r1", "_rev": rev(2, "b"), "title": "b",
             "_revisions": {"start": 2, "ids": ["b" * 32, "a" * 32]}},
            {"_id": "r1", "_rev": rev(2, "c"), "title": "c",
             "_revisions": {"start": 2, "ids": ["c" * 32, "a" * 32]}},
            {"_id": "r2", "_rev": rev(1, "d"), "_deleted": True,
             "_revisions": {"start": 1, "ids": ["d" * 32]}},
        ]})
        assert pushed.status_code == 201 and pushed.json() == [], pushed.text
        diff = owner.post("/rep.notes/_revs_diff", json={
            "r1": [rev(2, "b"), rev(3, "e")], "r2": [rev(1, "d")]}).json()
        assert diff["r1"]["missing"] == [rev(3, "e")] and "r2" not in diff

        got = owner.post("/rep.notes/_bulk_get", params={"revs": "true"}, json={"docs": [
            {"id": "r1", "rev": rev(2, "b")}, {"id": "r1", "rev": rev(9, "f")},
            {"id": "r2", "rev": rev(1, "d")}]}).json()["results"]
        ok = got[0]["docs"][0]["ok"]
        assert ok["title"] == "b" and ok["doctype"] == "rep.notes"
        assert ok["_revisions"] == {"start": 2, "ids": ["b" * 32, "a" * 32]}
        assert got[1]["docs"][0]["error"] == {"id": "r1", "rev": rev(9, "f"),
                                              "error": "not_found", "reason": "missing"}
        assert got[2]["docs"][0]["ok"]["_deleted"] is True

        rows = {r["id"]: r for r in owner.get("/rep.notes/_changes",
                                               params={"style": "all_docs"}).json()["results"]}
        assert sorted(c["rev"] for c in rows["r1"]["changes"]) == [rev(2, "b"), rev(2, "c")]
        assert rows["r2"]["deleted"] is True
        only = owner.get("/rep.notes/_changes", params={
            "filter": "_doc_ids", "doc_ids": json.dumps(["r2"])}).json()
        assert _changed_ids(only) == ["r2"]
        posted = owner.post("/rep.notes/_changes", params={"filter": "_doc_ids"},
                            json={"doc_ids": ["r1"]}).json()
        assert _changed_ids(posted) == ["r1"]
        assert owner.post("/rep.notes/_ensure_full_commit").json() == {
            "ok": True, "instance_start_time": "0"}


def test_changes_pages_with_limit_and_since(alice):
    with couch(alice) as owner:
        owner.post("/page.notes/_bulk_docs", json={"docs": [
            {"_id": f"p{i}", "n": i} for i in range(5)]})
        first = owner.get("/page.notes/_changes", params={"limit": "2"}).json()
        assert _changed_ids(first) == ["p0", "p1"]
        rest = owner.get("/page.notes/_changes", params={"since": first["last_seq"]}).json()
        assert _changed_ids(rest) == ["p2", "p3", "p4"]
        now = owner.get("/page.notes/_changes", params={"since": "now"}).json()
        assert now["results"] == []


def test_local_docs_belong_to_one_credential(alice):
    app = add_app(alice, "local-app", "loc.notes", "read")
    with couch(alice) as owner, couch(alice, app) as other:
        made = owner.put("/loc.notes/_local/checkpoint", json={"last_seq": 1})
        assert made.status_code == 201 and made.json()["rev"] == "0-1"
        assert owner.get("/loc.notes/_local/checkpoint").json() == {
            "_id": "_local/checkpoint", "_rev": "0-1", "last_seq": 1}
        assert other.get("/loc.notes/_local/checkpoint").status_code == 404
        stale = owner.put("/loc.notes/_local/checkpoint", json={"last_seq": 2})
        assert stale.status_code == 409 and stale.json()["error"] == "conflict"
        again = owner.put("/loc.notes/_local/checkpoint", json={"_rev": "0-1", "last_seq": 2})
        assert again.json()["rev"] == "0-2"
        other.put("/loc.notes/_local/checkpoint", json={"mine": True})
        assert owner.get("/loc.notes/_local/checkpoint").json()["last_seq"] == 2
        assert owner.delete("/loc.notes/_local/checkpoint").status_code == 200
        assert owner.get("/loc.notes/_local/checkpoint").status_code == 404


def test_a_longpoll_follower_sees_a_write(alice):
    with couch(alice) as owner:
        since = owner.get("/lp.notes/_changes", params={"since": "now"}).json()["last_seq"]
        answers: list = []

        def follow() -> None:
            answers.append(owner.get("/lp.notes/_changes", params={
                "feed": "longpoll", "since": since, "timeout": "60000"}))

        follower = threading.Thread(target=follow)
        follower.start()
        alice.put("other.doctype", {"n": 0}, "lp-unrelated")  # not in this db: it waits on
        alice.put("lp.notes", {"n": 1}, "lp-1")
        follower.join(90)
        assert answers and answers[0].status_code == 200
        assert _changed_ids(answers[0].json()) == ["lp-1"]


def test_a_continuous_feed_follows_live_writes(alice):
    app = add_app(alice, "cont-app", "cont.notes", "read", {"tag": "work"})
    with couch(alice, app) as reader:
        with reader.stream("GET", "/cont.notes/_changes", params={
                "feed": "continuous", "heartbeat": "500", "since": "now"}) as feed:
            lines = feed.iter_lines()
            assert feed.status_code == 200
            alice.put("cont.notes", {"tag": "home"}, "c-hidden")
            alice.put("cont.notes", {"tag": "work"}, "c-1")
            alice.put("cont.notes", {"tag": "work"}, "c-2")
            seen = []
            for line in lines:
                if line.strip():  # blank lines are heartbeats
                    seen.append(json.loads(line)["id"])
                if len(seen) == 2:
                    break
            assert seen == ["c-1", "c-2"]


def test_a_write_through_couch_reaches_a_peer_through_its_share(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        owner, member = cluster.add("carol"), cluster.add("dave")
        share_between(owner, [member], name="notes", doctype="io.notes")
        with couch(owner) as api:
            assert "share:notes" in api.get("/_all_dbs").json()
            written = api.post(f"/{quote('share:notes')}/_bulk_docs",
                               json={"docs": [{"_id": "live-1", "title": "hi"}]}).json()
            assert written[0]["ok"] is True
            assert api.get("/share%3Anotes").json()["doc_count"] == 1
        wait_until(lambda: member.get("live-1"), 60, what="the write at the member")
        with couch(member) as theirs:
            rows = theirs.get("/share:notes/_changes", params={"include_docs": "true"}).json()
            assert [r["doc"]["title"] for r in rows["results"]] == ["hi"]
    finally:
        cluster.close()
        print(cluster.logs())
