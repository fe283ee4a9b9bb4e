"""Follow-ups on the CouchDB-compatible API (`/couch`, issue 12) against a real node: Mango
errors met mid-scan, `_find` off the event loop, CouchDB's answers to the calls clients make
around replication, and what a per-document refusal looks like."""

from __future__ import annotations

import json
import random
import threading
import time

import httpx
import pytest

from tests.node.cluster import Cluster, share_between, wait_until
from tests.node.test_couch_api import add_app, couch

COSTLY_REGEX = "(a|b)*a(a|b){60}c"  # a new DFA state per character of a random a/b string


@pytest.fixture(scope="module", params=["sqlite", "couchdb"])
def node(request, tmp_path_factory):
    """One node per store backend for the module; each test uses its own doctypes."""
    cluster = Cluster(tmp_path_factory.mktemp("couchfix"))
    store = () if request.param == "sqlite" else (
        "--store", "couchdb", "--couchdb-url", request.getfixturevalue("couchdb_url"))
    try:
        yield cluster.add("alice", *store)
    finally:
        cluster.close()
        print(cluster.logs())


def _write(client: httpx.Client, db: str, docs: list[dict]) -> None:
    answer = client.post(f"/{db}/_bulk_docs", json={"docs": docs})
    assert answer.status_code == 201, answer.text
    assert all(r.get("ok") for r in answer.json()), answer.text


# -- Mango errors met mid-scan are 400s in CouchDB's shape ---------------------------------


def test_a_regex_too_costly_on_some_document_is_a_400_in_find_and_changes(node):
    text = "".join(random.Random(7).choices("ab", k=25_000))
    selector = {"text": {"$regex": COSTLY_REGEX}}
    with couch(node) as client:
        _write(client, "costly", [{"_id": "plain", "text": "abc"}, {"_id": "long", "text": text}])
        found = client.post("/costly/_find", json={"selector": selector})
        assert found.status_code == 400, found.text
        assert found.json()["error"] == "bad_request"
        assert "too costly to match" in found.json()["reason"]
        changes = client.post("/costly/_changes?filter=_selector", json={"selector": selector})
        assert changes.status_code == 400, changes.text
        assert "too costly to match" in changes.json()["reason"]
        # A live feed has sent its status line already: it ends with the error, as JSON.
        live = client.post("/costly/_changes?filter=_selector&feed=longpoll",
                           json={"selector": selector})
        assert live.json()["error"] == "bad_request", live.text
        # The node keeps serving.
        assert client.get("/costly/plain").json()["text"] == "abc"


# -- _find runs in a worker thread: the node answers meanwhile -------------------------------


def test_the_node_answers_other_requests_while_a_heavy_find_runs(node):
    # Seconds of CPU in the matcher over little data: 20 patterns that never match, each
    # scanning 20 documents of 50,000 characters.
    docs = [{"_id": f"heavy-{i:02}", "text": "ab" * 25_000} for i in range(20)]
    selector = {"$or": [{"text": {"$regex": f"[a-z]+\\d{{{n}}}"}} for n in range(1, 21)]}
    since = time.time()
    with couch(node) as client:
        _write(client, "heavyfind", docs)
        outcome: dict = {}

        def run_find() -> None:
            with couch(node) as own:
                outcome["answer"] = own.post("/heavyfind/_find", json={"selector": selector})

        finder = threading.Thread(target=run_find)
        finder.start()
        try:
            # The token has listed the documents for the find: its evaluation comes next.
            wait_until(lambda: any(
                '"heavy-19"' in json.dumps(e) and "list" in json.dumps(e)
                for e in node.api("GET", "/token/audit",
                                  params={"tail": "500", "since": str(since)})["entries"]),
                timeout=120, what="the token listing the find's documents")
            for _ in range(3):
                assert node.api("GET", "/status")
            assert finder.is_alive(), "the find was over before /status was answered"
        finally:
            finder.join(timeout=600)
        assert outcome["answer"].status_code == 200, outcome["answer"].text
        assert outcome["answer"].json()["docs"] == []


# -- a doc that leaves a credential's view shows as deleted to it, and to no one else ------


def _feed(client: httpx.Client, db: str) -> dict[str, dict]:
    answer = client.get(f"/{db}/_changes", params={"style": "all_docs"})
    assert answer.status_code == 200, answer.text
    return {row["id"]: row for row in answer.json()["results"]}


def test_a_doc_edited_out_of_an_apps_selector_is_deleted_for_it_alone(node):
    db = "left.notes"
    work = add_app(node, "left-work", db, "read", {"tag": "work"})
    home = add_app(node, "left-home", db, "read", {"tag": "home"})
    first = node.put(db, {"tag": "work"}, "w1")
    node.put(db, {"tag": "other"}, "w1", rev=first)  # out of work's view, never in home's
    with couch(node, work) as worker, couch(node, home) as homer, couch(node) as owner:
        row = _feed(worker, db)["w1"]
        assert row["deleted"] is True and len(row["changes"]) == 1, row
        removal = row["changes"][0]["rev"]
        served = worker.get(f"/{db}/w1", params={"rev": removal, "revs": "true"}).json()
        assert served["_deleted"] is True and set(served) <= {
            "_id", "_rev", "_deleted", "_revisions", "doctype"}, served
        assert served["_revisions"]["ids"][1] == first.split("-")[1]  # a child of what it read
        # Still missing as a live doc, and nothing of it in its listing or count.
        assert worker.get(f"/{db}/w1").status_code == 404
        assert worker.get(f"/{db}/_all_docs").json()["rows"] == []
        # The other app could never read it: not even its id shows.
        assert "w1" not in _feed(homer, db)
        # (Asked by id and rev, which it cannot guess, a removal is a bare tombstone to any
        # reader of the doctype, like a deletion: a client listing every leaf of a doc it
        # reads fetches its siblings, and a missing one would fail its replication.)
        assert set(homer.get(f"/{db}/w1", params={"rev": removal}).json()) <= {
            "_id", "_rev", "_deleted", "doctype"}
        # The owner's winner is the live revision.
        assert owner.get(f"/{db}/w1").json()["tag"] == "other"
        # Edited into the home app's view: it sees it live; the work app still deleted.
        node.put(db, {"tag": "home"}, "w1", rev=node.revs(db)["w1"])
        assert _feed(homer, db)["w1"].get("deleted") is None
        assert _feed(worker, db)["w1"]["deleted"] is True


# -- small things clients meet ----------------------------------------------------------------


def test_the_openapi_document_names_basic_auth_for_couch(node):
    spec = httpx.get(node.running.api_url + "/openapi.json").json()
    assert spec["components"]["securitySchemes"]["basic"] == {"type": "http", "scheme": "basic"}
    couch_ops = spec["paths"]["/couch/{db}/_changes"]
    assert all({"basic": []} in op["security"] and {"bearer": []} in op["security"]
               for op in couch_ops.values())
    assert spec["paths"]["/status"]["get"]["security"] == [{"bearer": []}]


def test_a_json_write_without_content_type_is_taken_and_a_wrong_one_is_415(node):
    with couch(node) as client:
        bare = client.put("/ctype.notes/untyped", content=b'{"v": 1}')
        assert bare.status_code == 201, bare.text
        wrong = client.put("/ctype.notes/wrong", content=b'{"v": 1}',
                           headers={"content-type": "text/plain"})
        assert wrong.status_code == 415 and wrong.json()["error"] == "bad_content_type"
        assert client.get("/ctype.notes/wrong").status_code == 404


def test_uuids_and_session_answer_as_couchdb_does(node):
    credential = add_app(node, "sessioner", "session.notes", "read")
    with couch(node, credential, basic="sessioner") as client:
        one = client.get("/_uuids")
        assert one.status_code == 200, one.text
        [uuid] = one.json()["uuids"]
        assert len(uuid) == 32 and int(uuid, 16) >= 0
        many = client.get("/_uuids", params={"count": "5"}).json()["uuids"]
        assert len(set(many)) == 5
        for bad in ("0", "-1", "x", "1001"):
            answer = client.get("/_uuids", params={"count": bad})
            assert answer.status_code == 400 and answer.json()["error"] == "bad_request", bad
        session = client.get("/_session")
        assert session.status_code == 200, session.text
        assert session.json()["ok"] is True
        assert session.json()["userCtx"]["name"] == "sessioner"
        assert isinstance(session.json()["userCtx"]["roles"], list)


def test_descending_changes_says_why_not(node):
    with couch(node) as client:
        answer = client.get("/desc.notes/_changes", params={"descending": "true"})
        assert answer.status_code == 400 and answer.json()["error"] == "bad_request"
        assert "oldest first" in answer.json()["reason"]


@pytest.fixture(scope="module")
def nosy(node):
    """The node with a share `owner-probe`, and the credential of an app that is no owner."""
    node.cli_json("share", "create", "owner-probe", "--doctype", "owned.notes")
    return node, add_app(node, "nosy", "owned.notes", "write")


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/shares/{}/invite", {}), ("POST", "/shares/{}/revoke", {"member": "bob"}),
    ("DELETE", "/shares/{}", None), ("GET", "/shares/{}/invitations", None),
    ("DELETE", "/shares/{}/invitations/abc", None), ("POST", "/shares/{}/leave", None),
    ("GET", "/shares/{}", None), ("GET", "/shares/{}/links", None),
    ("DELETE", "/shares/{}/links/abc", None),
])
def test_a_non_owner_learns_nothing_of_shares_from_owner_routes(nosy, method, path, body):
    """403 whether or not the share exists: the owner check comes before the lookup."""
    node, app = nosy
    with httpx.Client(base_url=node.running.api_url,
                      headers={"Authorization": f"Bearer {app}"}) as client:
        answers = [client.request(method, path.format(name), json=body)
                   for name in ("owner-probe", "no-such-share")]
    assert [a.status_code for a in answers] == [403, 403], [a.text for a in answers]
    assert answers[0].json()["error"] == answers[1].json()["error"] == "forbidden"


def test_an_apps_removal_stays_on_its_node(tmp_path):
    """The removal made for an app is a leaf beside the edit on the owner's node only: a share
    of the doctype carries the edit to its members, never the app's removal."""
    cluster = Cluster(tmp_path)
    try:
        owner, member = cluster.add("carol"), cluster.add("dave")
        share_between(owner, [member], name="notes", doctype="peer.notes")
        add_app(owner, "worker", "peer.notes", "read", {"tag": "work"})
        first = owner.put("peer.notes", {"tag": "work"}, "w1")
        owner.put("peer.notes", {"tag": "home"}, "w1", rev=first)
        with couch(owner) as mine:
            leaves = mine.get("/peer.notes/w1", params={"open_revs": "all"},
                              headers={"accept": "application/json"}).json()
            assert len(leaves) == 2, leaves  # the edit, and the worker app's removal
        wait_until(lambda: (member.get("w1") or {}).get("tag") == "home", 120,
                   what="the edit at the member")
        with couch(member) as theirs:
            leaves = theirs.get("/peer.notes/w1", params={"open_revs": "all"},
                                headers={"accept": "application/json"}).json()
        assert [leaf["ok"]["tag"] for leaf in leaves] == ["home"], leaves
    finally:
        cluster.close()
        print(cluster.logs())
