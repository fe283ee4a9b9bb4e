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



@pytest.fixture(scope="module", params=["sqlite", "couchdb"])
def alice(request, tmp_path_factory):
    """One node per store backend for the whole module (starting one costs seconds); each
    test uses its own doctype or ids, so the tests do not see each other's documents."""
    cluster = Cluster(tmp_path_factory.mktemp("couch"))
    store = () if request.param == "sqlite" else (
        "--store", "couchdb", "--couchdb-url", request.getfixturevalue("couchdb_url"))
    try:
        yield cluster.add("alice", *store)
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
        # (in either order: Apache CouchDB does not keep a batch's order in its feed)
        assert sorted(_changed_ids(owner.get("/sel.notes/_changes").json())) == [
            "s-home", "s-work"]

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


def test_a_checkpoint_update_as_apache_couchdbs_replicator_sends_it(alice):
    """Apache CouchDB's replicator writes its checkpoint again with `_rev` and the
    `_revisions` CouchDB gives a local doc: both taken (the history ignored, as CouchDB does),
    or its second run against the node fails on its checkpoint."""
    with couch(alice) as owner:
        made = owner.put("/cp.notes/_local/abc123", json={"session_id": "s1", "history": []})
        assert made.status_code == 201, made.text
        again = owner.put("/cp.notes/_local/abc123", json={
            "_id": "_local/abc123", "_rev": "0-1",
            "_revisions": {"start": 0, "ids": ["1"]},
            "session_id": "s2", "history": [{"session_id": "s2"}]})
        assert again.status_code == 201 and again.json()["rev"] == "0-2", again.text
        stored = owner.get("/cp.notes/_local/abc123").json()
        assert stored == {"_id": "_local/abc123", "_rev": "0-2", "session_id": "s2",
                          "history": [{"session_id": "s2"}]}
        # still a conflict from a stale _rev, history or not
        stale = owner.put("/cp.notes/_local/abc123", json={
            "_rev": "0-1", "_revisions": {"start": 0, "ids": ["1"]}, "session_id": "s3"})
        assert stale.status_code == 409, stale.text


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
                "feed": "continuous", "heartbeat": "500", "since": "now",
                "timeout": "90000"}) as feed:  # ends by itself: a failure is not a hang
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


# -- 4. documents ---------------------------------------------------------------------------


def test_document_crud_with_revs_etags_and_conflicts(alice):
    with couch(alice) as owner:
        made = owner.put("/crud.notes/d1", json={"title": "one"})
        assert made.status_code == 201, made.text
        rev1 = made.json()["rev"]
        assert made.json() == {"ok": True, "id": "d1", "rev": rev1}
        doc = owner.get("/crud.notes/d1")
        assert doc.json() == {"_id": "d1", "_rev": rev1, "title": "one",
                              "doctype": "crud.notes"}
        assert doc.headers["etag"] == f'"{rev1}"'
        head = owner.head("/crud.notes/d1")
        assert head.status_code == 200 and head.headers["etag"] == f'"{rev1}"'

        stale = owner.put("/crud.notes/d1", json={"title": "again"})
        assert stale.status_code == 409 and stale.json() == {
            "error": "conflict", "reason": "Document update conflict."}
        rev2 = owner.put("/crud.notes/d1", json={"title": "two"},
                         headers={"If-Match": f'"{rev1}"'}).json()["rev"]
        assert owner.put("/crud.notes/d1", json={"title": "x"},
                         headers={"If-Match": f'"{rev1}"'}).status_code == 409
        differ = owner.put("/crud.notes/d1", params={"rev": rev2},
                           json={"_rev": rev1, "title": "x"})
        assert differ.status_code == 400 and differ.json()["error"] == "bad_request"
        rev3 = owner.put("/crud.notes/d1", params={"rev": rev2},
                         json={"title": "three"}).json()["rev"]

        revs = owner.get("/crud.notes/d1", params={"revs": "true", "revs_info": "true"}).json()
        assert revs["_revisions"]["start"] == 3 and len(revs["_revisions"]["ids"]) == 3
        assert revs["_revs_info"][0] == {"rev": rev3, "status": "available"}
        assert owner.get("/crud.notes/d1", params={"rev": rev3}).json()["title"] == "three"

        # a conflict made by a replicator, then read as CouchDB shows it
        owner.put("/crud.notes/d1", params={"new_edits": "false"}, json={
            "_rev": rev(3, "f"), "title": "branch",
            "_revisions": {"start": 3, "ids": ["f" * 32, rev2.split("-")[1],
                                               rev1.split("-")[1]]}})
        loser = min(rev3, rev(3, "f"))
        conflicted = owner.get("/crud.notes/d1", params={"conflicts": "true"}).json()
        assert conflicted["_conflicts"] == [loser]
        both = owner.get("/crud.notes/d1", params={"open_revs": "all"},
                         headers={"Accept": "application/json"}).json()
        assert sorted(entry["ok"]["_rev"] for entry in both) == sorted([rev3, rev(3, "f")])
        asked = owner.get("/crud.notes/d1", headers={"Accept": "application/json"}, params={
            "open_revs": json.dumps([rev3, rev(7, "e")]), "latest": "true"}).json()
        assert asked[0]["ok"]["_revisions"]["start"] == 3
        assert asked[1] == {"missing": rev(7, "e")}
        multipart = owner.get("/crud.notes/d1", params={"open_revs": "all"})
        assert multipart.headers["content-type"].startswith("multipart/mixed")

        deleted = owner.delete("/crud.notes/d1", params={"rev": loser})
        assert deleted.status_code == 200 and deleted.json()["ok"] is True
        winner = owner.get("/crud.notes/d1").json()
        assert winner["_rev"] == max(rev3, rev(3, "f"))
        owner.delete("/crud.notes/d1", headers={"If-Match": f'"{winner["_rev"]}"'})
        gone = owner.get("/crud.notes/d1")
        assert gone.status_code == 404 and gone.json() == {"error": "not_found",
                                                           "reason": "missing"}

        posted = owner.post("/crud.notes", json={"title": "new id"})
        assert posted.status_code == 201 and posted.json()["id"]
        typed = owner.put("/crud.notes/d2", json={"doctype": "other.kind"})
        assert typed.status_code == 403 and typed.json()["error"] == "forbidden"


def test_all_docs_ranges_keys_and_an_apps_view(alice):
    app = add_app(alice, "all-app", "all.notes", "read", {"tag": "work"})
    with couch(alice) as owner, couch(alice, app) as reader:
        owner.post("/all.notes/_bulk_docs", json={"docs": [
            {"_id": i, "tag": "work" if i != "c" else "home"} for i in "abcde"]})
        ids = lambda answer: [row["id"] for row in answer["rows"]]  # noqa: E731
        everything = owner.get("/all.notes/_all_docs").json()
        assert ids(everything) == list("abcde") and everything["total_rows"] == 5
        assert everything["rows"][0]["value"]["rev"].startswith("1-")
        assert ids(reader.get("/all.notes/_all_docs").json()) == list("abde")
        ranged = owner.get("/all.notes/_all_docs", params={
            "startkey": '"b"', "endkey": '"d"', "inclusive_end": "false"}).json()
        assert ids(ranged) == ["b", "c"]
        assert ids(owner.get("/all.notes/_all_docs", params={
            "start_key": '"d"', "descending": "true", "limit": "2", "skip": "1"}).json()) \
            == ["c", "b"]
        assert ids(owner.get("/all.notes/_all_docs", params={"key": '"e"'}).json()) == ["e"]
        by_keys = reader.post("/all.notes/_all_docs", params={"include_docs": "true"},
                              json={"keys": ["b", "c", "zz"]}).json()
        assert by_keys["rows"][0]["doc"]["tag"] == "work"
        assert by_keys["rows"][1:] == [{"key": "c", "error": "not_found"},
                                       {"key": "zz", "error": "not_found"}]
        assert "update_seq" in owner.get("/all.notes/_all_docs",
                                         params={"update_seq": "true"}).json()


# -- 5. _find --------------------------------------------------------------------------------


def test_find_sees_only_what_the_app_may_read(alice):
    app = add_app(alice, "find-app", "find.notes", "read", {"tag": "work"})
    with couch(alice) as owner, couch(alice, app) as reader:
        owner.post("/find.notes/_bulk_docs", json={"docs": [
            {"_id": "f1", "tag": "work", "n": 3}, {"_id": "f2", "tag": "home", "n": 5},
            {"_id": "f3", "tag": "work", "n": 7}, {"_id": "f4", "tag": "work", "n": 1}]})
        query = {"selector": {"n": {"$gt": 2}}, "fields": ["_id", "n"], "sort": ["n"]}
        assert [d["_id"] for d in owner.post("/find.notes/_find", json=query).json()["docs"]] \
            == ["f1", "f2", "f3"]
        found = reader.post("/find.notes/_find", json=query).json()
        assert found["docs"] == [{"_id": "f1", "n": 3}, {"_id": "f3", "n": 7}]
        assert "bookmark" in found and "warning" in found
        page = reader.post("/find.notes/_find", json={"selector": {}, "limit": 1}).json()
        nxt = reader.post("/find.notes/_find", json={"selector": {}, "limit": 1,
                                                     "bookmark": page["bookmark"]}).json()
        assert [page["docs"][0]["_id"], nxt["docs"][0]["_id"]] == ["f1", "f3"]

        bad = reader.post("/find.notes/_find", json={"selector": {"n": {"$bogus": 1}}})
        assert bad.status_code == 400 and bad.json()["error"] == "bad_request"
        assert reader.get("/find.notes/_index").json()["indexes"][0]["name"] == "_all_docs"
        refused = reader.post("/find.notes/_index", json={"index": {"fields": ["n"]}})
        assert refused.status_code == 403 and refused.json()["error"] == "forbidden"
        assert owner.post("/find.notes/_explain", json=query).json()["index"]["type"] == \
            "special"

        selected = reader.post("/find.notes/_changes", params={"filter": "_selector"},
                               json={"selector": {"n": {"$in": [1, 5]}}}).json()
        assert _changed_ids(selected) == ["f4"]  # f2 matches too, but is not the app's


# -- 6. refusals and bad input ---------------------------------------------------------------


def _is(answer: httpx.Response, status: int, error: str) -> bool:
    assert answer.status_code == status, (answer.status_code, answer.text)
    body = answer.json()
    assert body["error"] == error and isinstance(body["reason"], str), body
    return True


def test_design_documents_and_views_are_refused_in_couchdbs_shape(alice):
    with couch(alice) as owner:
        for method, path in (("PUT", "/bad.notes/_design/app"), ("GET", "/bad.notes/_design/app"),
                             ("GET", "/bad.notes/_design/app/_view/by_tag"),
                             ("GET", "/bad.notes/_view/x")):
            answer = owner.request(method, path, json={"views": {}})
            _is(answer, 403, "forbidden")
            assert answer.json()["reason"] == "design documents are not supported"
        batch = owner.post("/bad.notes/_bulk_docs", json={"docs": [
            {"_id": "_design/app", "views": {}}, {"_id": "_private"}, {"_id": "fine"}]}).json()
        assert [(r["id"], r.get("error")) for r in batch] == [
            ("_design/app", "forbidden"), ("_private", "forbidden"), ("fine", None)]
        _is(owner.put("/bad.notes/_private", json={}), 400, "bad_request")
        assert owner.put("/bad.notes/_private", json={}).json()["reason"] == \
            "Only reserved document ids may start with underscore."
        assert [r["id"] for r in owner.get("/bad.notes/_all_docs").json()["rows"]] == ["fine"]


def test_bad_bodies_and_parameters_get_couchdbs_errors_and_write_nothing(alice):
    with couch(alice) as owner:
        _is(owner.put("/in.notes/j1", content=b'{"title": ',
                      headers={"content-type": "application/json"}), 400, "bad_request")
        _is(owner.put("/in.notes/j1", content=b'{"title": "x"}',
                      headers={"content-type": "text/plain"}), 415, "bad_content_type")
        _is(owner.post("/in.notes/_bulk_docs", json={"docs": "nope"}), 400, "bad_request")
        _is(owner.post("/in.notes/_bulk_docs", json=[1]), 400, "bad_request")
        for name, value in (("since", "not-a-seq"), ("limit", "-1"), ("limit", "ten"),
                            ("feed", "sometimes"), ("include_docs", "maybe"),
                            ("style", "everything"), ("descending", "true"),
                            ("filter", "nosuch")):
            _is(owner.get("/in.notes/_changes", params={name: value}), 400, "bad_request")
        ignored = owner.get("/in.notes/_changes", params={"conflicts": "true", "whatever": "1"})
        assert ignored.status_code == 200  # unknown parameters are ignored, as CouchDB does
        _is(owner.post("/in.notes/_find", json={"selector": "not mango"}), 400, "bad_request")
        _is(owner.post("/in.notes/_changes", params={"filter": "_selector"},
                       json={"selector": {"a": {"$nope": 1}}}), 400, "bad_request")
        assert alice.get("j1") is None


def test_a_body_over_the_cap_is_413_also_chunked_and_nothing_is_written(alice):
    big = json.dumps({"docs": [{"_id": "big-1", "blob": "x" * (9 * 1024 * 1024)}]}).encode()

    def chunks():
        for start in range(0, len(big), 65536):
            yield big[start:start + 65536]

    with couch(alice) as owner:
        _is(owner.post("/cap.notes/_bulk_docs", content=big,
                       headers={"content-type": "application/json"}),
            413, "request_entity_too_large")
        _is(owner.post("/cap.notes/_bulk_docs", content=chunks(),
                       headers={"content-type": "application/json"}),
            413, "request_entity_too_large")
        assert alice.get("big-1") is None
        assert owner.get("/").status_code == 200  # and the node serves on


# -- 7. bounds -------------------------------------------------------------------------------


def test_batches_are_bounded(alice):
    with couch(alice) as owner:
        _is(owner.post("/bound.notes/_bulk_docs", json={"docs": [{}] * 10_001}),
            413, "request_entity_too_large")
        _is(owner.post("/bound.notes/_bulk_get", json={"docs": [{"id": "a"}] * 10_001}),
            413, "request_entity_too_large")
        _is(owner.post("/bound.notes/_revs_diff",
                       json={f"d{i}": [rev(1, "a")] for i in range(10_001)}),
            413, "request_entity_too_large")
        _is(owner.post("/bound.notes/_all_docs", json={"keys": ["a"] * 10_001}),
            400, "bad_request")
        assert owner.get("/bound.notes/_changes").status_code == 200
        assert owner.get("/bound.notes/_changes",
                         params={"limit": "99999999999"}).status_code == 200  # capped


def test_open_feeds_per_credential_are_bounded_and_given_back(alice):
    app = add_app(alice, "feeds-app", "feed.notes", "read")
    params = {"feed": "continuous", "heartbeat": "1000", "since": "now"}
    with couch(alice, app) as reader, couch(alice) as owner:
        streams = [reader.stream("GET", "/feed.notes/_changes", params=params)
                   for _ in range(16)]
        opened = [s.__enter__() for s in streams]
        try:
            assert all(r.status_code == 200 for r in opened)
            _is(reader.get("/feed.notes/_changes", params=params), 429, "too_many_requests")
            # another credential is not held back
            with owner.stream("GET", "/feed.notes/_changes", params=params) as own:
                assert own.status_code == 200
        finally:
            for stream in streams:
                stream.__exit__(None, None, None)
        # closed feeds give their slots back (once the node sees the clients gone)
        wait_until(lambda: reader.get("/feed.notes/_changes", params={
            **params, "timeout": "1"}).status_code == 200, 60, what="a slot given back")


def test_database_info_counts_without_serving_a_document(alice):
    """PouchDB asks for a database's info at every checkpoint: counting must not open (nor
    log a decision for) every document each time."""
    app = add_app(alice, "count-app", "count.notes", "read", {"tag": "work"})
    with couch(alice) as owner, couch(alice, app) as reader:
        owner.post("/count.notes/_bulk_docs", json={"docs": [
            {"_id": f"k{i}", "tag": "work" if i % 2 else "home"} for i in range(20)]})

        def logged() -> int:
            return len(alice.api("GET", "/token/audit", params={
                "tail": "100000", "principal": "app:count-app"})["entries"])

        before = logged()
        assert [reader.get("/count.notes").json()["doc_count"] for _ in range(3)] == [10] * 3
        assert logged() == before
        owner.put("/count.notes/k100", json={"tag": "work"})  # the count follows writes
        assert reader.get("/count.notes").json()["doc_count"] == 11


def test_an_eventsource_feed_and_a_deletion_in_the_feed(alice):
    app = add_app(alice, "es-app", "es.notes", "read", {"tag": "work"})
    with couch(alice) as owner, couch(alice, app) as reader:
        made = owner.put("/es.notes/e1", json={"tag": "work"}).json()
        with reader.stream("GET", "/es.notes/_changes", params={
                "feed": "eventsource", "heartbeat": "500", "timeout": "90000"}) as feed:
            assert feed.headers["content-type"].startswith("text/event-stream")
            events = []
            for line in feed.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[len("data: "):]))
                    if len(events) == 1:  # the live doc seen: now delete it
                        owner.delete("/es.notes/e1", params={"rev": made["rev"]})
                if len(events) == 2:
                    break
        assert events[0]["id"] == "e1" and "deleted" not in events[0]
        assert events[1]["id"] == "e1" and events[1]["deleted"] is True  # its doctype's
        audit = alice.api("GET", "/token/audit", params={"tail": "1000",
                                                          "principal": "app:es-app"})
        assert any(e["doc_id"] == "e1" and e["allowed"] and "deletion" in e["reason"]
                   for e in audit["entries"])


def test_a_share_link_opens_its_share_database_only(alice):
    alice.cli_json("share", "create", "linked", "--doctype", "link.notes",
                   "--selector", json.dumps({"tag": "work"}))
    alice.put("link.notes", {"tag": "work"}, "l-in")
    alice.put("link.notes", {"tag": "home"}, "l-out")
    reader = alice.api("POST", "/shares/linked/links", json={"permission": "read"})
    with couch(alice, reader["credential"], basic=reader.get("id", "link")) as link:
        assert link.get("/_all_dbs").json() == ["share:linked"]
        _is(link.get("/link.notes"), 404, "not_found")
        rows = link.get("/share:linked/_changes").json()["results"]
        assert [r["id"] for r in rows] == ["l-in"]
        assert link.get("/share:linked/l-out").status_code == 404
        pushed = link.post("/share:linked/_bulk_docs", json={"docs": [{"_id": "l-new"}]})
        assert pushed.json()[0]["error"] == "forbidden"  # a read-only link
        assert link.put("/share:linked/_local/cp", json={"seq": 1}).status_code == 201
        alice.api("DELETE", f"/shares/linked/links/{reader['id']}")
        assert link.get("/share:linked").status_code == 401  # unlinked: its credential is dead


def test_a_small_all_docs_page_does_not_open_the_whole_database(alice):
    app = add_app(alice, "page-app", "big.notes", "read")
    with couch(alice) as owner, couch(alice, app) as reader:
        owner.post("/big.notes/_bulk_docs", json={"docs": [
            {"_id": f"big{i:04d}"} for i in range(600)]})

        def logged() -> int:
            return len(alice.api("GET", "/token/audit", params={
                "tail": "100000", "principal": "app:page-app"})["entries"])

        before = logged()
        page = reader.get("/big.notes/_all_docs", params={
            "limit": "2", "startkey": '"big0100"'}).json()
        assert [r["id"] for r in page["rows"]] == ["big0100", "big0101"]
        assert page["total_rows"] == 600 and page["offset"] == 100
        assert logged() - before < 600  # a page of the range was shown to the token, not all


def test_large_documents_never_make_a_token_command_over_its_frame_cap(alice):
    """Each doc under the body cap, together over the token's 64 MiB frame: a page of them
    is shown to the token in several commands, not refused as a whole."""
    with couch(alice) as owner:
        for i in range(10):
            made = owner.put(f"/huge.notes/h{i}", json={"blob": str(i) * (7 * 1024 * 1024)})
            assert made.status_code == 201, made.text
        rows = owner.get("/huge.notes/_changes", params={"include_docs": "true"})
        assert rows.status_code == 200, rows.text[:300]
        assert [len(r["doc"]["blob"]) for r in rows.json()["results"]] == [7 * 1024 * 1024] * 10
        updated = owner.post("/huge.notes/_bulk_docs", json={"docs": [
            {"_id": f"h{i}", "_rev": r["changes"][0]["rev"], "blob": "small"}
            for i, r in enumerate(rows.json()["results"])]})
        assert all(r.get("ok") for r in updated.json()), updated.text[:300]


def _mime_parts(answer: httpx.Response):
    """The parts of a multipart answer, read with the standard library's own MIME parser."""
    import email.parser
    import email.policy
    raw = f"Content-Type: {answer.headers['content-type']}\r\n\r\n".encode() + answer.content
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
    assert message.is_multipart(), answer.headers
    return message


def test_open_revs_with_the_data_as_apache_couchdbs_replicator_reads_it(alice):
    """Apache CouchDB's replicator reads a revision with attachments through
    `open_revs=[...]&attachments=true&atts_since=[...]` and `Accept: multipart/mixed`, and
    parses the answer as multipart whatever it is: answered in JSON, it took the files for
    stubs and failed ("missing_stub"). The answer is CouchDB's: a part per revision, one with
    files a multipart/related of its JSON (`follows` entries) and the data, raw; the files
    an `atts_since` ancestor already had are stubs; a missing revision says so."""
    with couch(alice) as owner:
        first = owner.put("/mp.notes/m1", json={"title": "v1", "_attachments": {
            "old.txt": {"content_type": "text/plain",
                        "data": base64.b64encode(b"from the first revision").decode()}}})
        assert first.status_code == 201, first.text
        rev1 = first.json()["rev"]
        data = bytes(range(256)) * 300
        added = owner.put("/mp.notes/m1/new.bin", params={"rev": rev1}, content=data,
                          headers={"content-type": "application/x-test"})
        assert added.status_code == 201, added.text
        rev2 = added.json()["rev"]
        absent = rev(9, "f")
        answer = owner.get("/mp.notes/m1", params={
            "revs": "true", "latest": "true", "attachments": "true",
            "open_revs": json.dumps([rev2, absent]), "atts_since": json.dumps([rev1])},
            headers={"Accept": "multipart/mixed"})
        assert answer.status_code == 200, answer.text
        message = _mime_parts(answer)
        assert message.get_content_type() == "multipart/mixed"
        found, missing = message.get_payload()
        assert found.get_content_type() == "multipart/related"
        head, *files = found.get_payload()
        doc = json.loads(head.get_payload(decode=True))
        assert doc["_rev"] == rev2 and doc["title"] == "v1"
        atts = doc["_attachments"]
        assert atts["old.txt"]["stub"] is True and "follows" not in atts["old.txt"]
        assert atts["new.bin"]["follows"] is True and atts["new.bin"]["length"] == len(data)
        assert [f.get_filename() for f in files] == ["new.bin"]
        assert files[0].get_payload(decode=True) == data
        assert json.loads(missing.get_payload(decode=True)) == {"missing": absent}
        # with no atts_since, every file comes, asked for or not (as the replicator asks)
        answer = owner.get("/mp.notes/m1", params={
            "revs": "true", "latest": "true", "open_revs": json.dumps([rev2])},
            headers={"Accept": "multipart/mixed"})
        [found] = _mime_parts(answer).get_payload()
        head, *files = found.get_payload()
        assert sorted(f.get_filename() for f in files) == ["new.bin", "old.txt"]
        by_name = {f.get_filename(): f.get_payload(decode=True) for f in files}
        assert by_name == {"new.bin": data, "old.txt": b"from the first revision"}
        # JSON still, when asked for, atts_since heeded too
        answer = owner.get("/mp.notes/m1", params={
            "attachments": "true", "open_revs": json.dumps([rev2]),
            "atts_since": json.dumps([rev1])}, headers={"Accept": "application/json"})
        [entry] = answer.json()
        atts = entry["ok"]["_attachments"]
        assert atts["old.txt"].get("stub") is True and "data" not in atts["old.txt"]
        assert base64.b64decode(atts["new.bin"]["data"]) == data
        # a malformed atts_since is refused before any read, as CouchDB parses the query
        # first: a 400 even for a document not there (not a 404 that says it is not)
        for bad in ("5", '{"a": 1}', json.dumps([1]), "["):
            answer = owner.get("/mp.notes/nowhere", params={"open_revs": "all", "atts_since": bad})
            assert answer.status_code == 400, (bad[:20], answer.status_code)
