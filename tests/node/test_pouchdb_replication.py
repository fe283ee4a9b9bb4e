"""Real CouchDB-protocol clients against a real node's `/couch` API (issue #12): PouchDB (the
npm package, driven through tests/support/pouchdb_client.py), pouchdb-server's `_replicate`,
and a plain HTTP app. Each test checks what the client ends up holding against what the
owner sees and what the app's grant allows."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import uuid
from typing import Any

import httpx
import pytest
import trio

from tests.node.cluster import (  # noqa: F401
    Cluster,
    ClusterNode,
    cluster,
    free_port,
    share_between,
    wait_until,
)
from tests.support.pouchdb import running_pouchdb_server
from tests.support.pouchdb_client import couch_url, eventually, pouchdb_puppet

NOTES = "io.notes"
DEADLINE = 60.0  # seconds for anything to arrive: generous, the machine may be busy


def add_app(node: ClusterNode, name: str, doctype: str, perm: str,
            selector: dict | None = None) -> str:
    """`plugshare app add`; the app's credential."""
    args = ["app", "add", name, "--doctype", doctype, "--perm", perm]
    if selector is not None:
        args += ["--selector", json.dumps(selector)]
    return node.cli_json(*args)["credential"]


def db_url(node: ClusterNode, db: str, credential: str, user: str = "app") -> str:
    assert node.running is not None
    return couch_url(node.running.api_url, db, credential, user=user)


def tagged_notes(node: ClusterNode, tags: dict[str, str]) -> dict[str, str]:
    """Owner writes: one io.notes doc per id with its tag; id -> rev."""
    return node.put_many(NOTES, [(doc_id, {"tag": tag, "n": i})
                                 for i, (doc_id, tag) in enumerate(sorted(tags.items()))])


def shown(result: Any) -> str:
    """A replication result whole in a failure message (pytest shortens a dict's repr)."""
    return json.dumps(result, default=str)[:3000]


async def node_wait(predicate, what: str, timeout: float = DEADLINE) -> Any:
    """`wait_until` on the node's side, in a thread: the puppet's answers keep being read."""
    return await trio.to_thread.run_sync(
        functools.partial(wait_until, predicate, timeout, what=what))


async def test_one_shot_pull_holds_exactly_what_the_token_allows(cluster: Cluster, tmp_path):
    node = cluster.add("a")
    tags = {f"n{i}": ("work" if i % 2 == 0 else "home") for i in range(10)}
    revs = tagged_notes(node, tags)
    node.put(NOTES, {"tag": "work", "n": 100, "edited": True}, "n0", rev=revs["n0"])
    node.delete("n2", revs["n2"])  # a work doc deleted: gone from PouchDB's listing too
    node.put("io.bank", {"tag": "work", "iban": "FR76"}, "b1")  # another doctype, same tag
    credential = add_app(node, "reader", NOTES, "read", {"tag": "work"})
    allowed = {doc_id: rev for doc_id, rev in node.revs(NOTES).items()
               if tags[doc_id] == "work"}
    assert sorted(allowed) == ["n0", "n4", "n6", "n8"]

    async with pouchdb_puppet(tmp_path / "pouch") as pouch:
        result = await pouch.replicate_from(db_url(node, NOTES, credential, "reader"))
        assert result["ok"] and result["doc_write_failures"] == 0, shown(result)
        assert await pouch.revs() == allowed  # same ids, same revs, nothing else
        edited = await pouch.get("n0")
        assert edited["edited"] is True and edited["doctype"] == NOTES
        for hidden in ("n1", "n3", "b1"):
            assert await pouch.get_or_none(hidden) is None, hidden


async def test_one_shot_push_lands_allowed_docs_and_refuses_the_rest_per_document(
        cluster: Cluster, tmp_path):
    node = cluster.add("a")
    private_rev = node.put("io.bank", {"tag": "work", "iban": "FR76"}, "b1")
    credential = add_app(node, "writer", NOTES, "write", {"tag": "work"})
    allowed = [{"_id": f"w{i}", "tag": "work", "n": i} for i in range(12)]
    refused = [
        {"_id": "h1", "tag": "home"},  # outside the app's selector
        {"_id": "h2", "tag": "home"},
        {"_id": "b1", "tag": "work"},  # the id of the owner's private io.bank doc
        {"_id": "x1", "tag": "work", "doctype": "io.bank"},  # says another doctype
    ]
    async with pouchdb_puppet(tmp_path / "pouch") as pouch:
        # Refused docs first and in the middle: a refusal must not stop the ones after it.
        written = await pouch.bulk_docs(refused[:2] + allowed[:6] + refused[2:] + allowed[6:])
        assert all(row.get("ok") for row in written), written
        local = await pouch.revs()

        result = await pouch.replicate_to(db_url(node, NOTES, credential, "writer"))
        assert result["ok"], shown(result)
        assert result["docs_written"] == len(allowed), shown(result)
        assert result["doc_write_failures"] == len(refused), shown(result)
        assert sorted(e["id"] for e in result["errors"]) == sorted(d["_id"] for d in refused)
        assert {e["name"] for e in result["errors"]} == {"forbidden"}, result["errors"]

    landed = node.revs(NOTES)
    assert landed == {d["_id"]: local[d["_id"]] for d in allowed}  # same revs, nothing else
    private = node.get("b1")
    assert private["_rev"] == private_rev and private["doctype"] == "io.bank"
    assert "iban" in private and node.get("x1") is None


async def test_a_read_only_apps_pushes_are_refused_per_document(cluster: Cluster, tmp_path):
    node = cluster.add("a")
    owner_revs = tagged_notes(node, {"n1": "work"})
    credential = add_app(node, "reader", NOTES, "read")
    async with pouchdb_puppet(tmp_path / "pouch") as pouch:
        pulled = await pouch.replicate_from(db_url(node, NOTES, credential, "reader"))
        assert pulled["docs_written"] == 1, shown(pulled)
        n1 = await pouch.get("n1")
        await pouch.put({**n1, "tag": "edited"})
        await pouch.bulk_docs([{"_id": f"new{i}", "tag": "work"} for i in range(3)])

        result = await pouch.replicate_to(db_url(node, NOTES, credential, "reader"))
        assert result["ok"], shown(result)  # refusals, not an error that ends the replication
        assert result["docs_written"] == 0 and result["doc_write_failures"] == 4, shown(result)
        assert {e["name"] for e in result["errors"]} == {"forbidden"}, result["errors"]
    assert node.revs(NOTES) == owner_revs


async def test_live_sync_carries_writes_both_ways(cluster: Cluster, tmp_path):
    node = cluster.add("a")
    credential = add_app(node, "notes", NOTES, "write")
    async with pouchdb_puppet(tmp_path / "pouch") as pouch:
        handle = await pouch.start_live("sync", db_url(node, NOTES, credential, "notes"),
                                        retry=True)

        # node -> PouchDB
        rev = node.put(NOTES, {"text": "from the node"}, "from-node")
        async def in_pouch(doc_id, rev):
            doc = await pouch.get_or_none(doc_id)
            return doc if doc and doc["_rev"] == rev else None
        doc = await eventually(lambda: in_pouch("from-node", rev), DEADLINE,
                               what="from-node in PouchDB")
        assert doc["text"] == "from the node"

        # PouchDB -> node
        put = await pouch.put({"_id": "from-pouch", "text": "from PouchDB"})
        arrived = await node_wait(
            lambda: (d := node.get("from-pouch")) and d["_rev"] == put["rev"] and d,
            "from-pouch on the node")
        assert arrived["text"] == "from PouchDB" and arrived["doctype"] == NOTES

        # an edit on the node of the doc PouchDB wrote comes back to PouchDB
        rev2 = node.put(NOTES, {"text": "edited on the node"}, "from-pouch", rev=put["rev"])
        doc = await eventually(lambda: in_pouch("from-pouch", rev2), DEADLINE,
                               what="the node's edit of from-pouch in PouchDB")
        assert doc["text"] == "edited on the node"
        assert not pouch.events(handle, "denied") and not pouch.events(handle, "error"), \
            pouch.events(handle)
        await pouch.cancel(handle)


async def test_checkpoints_resume_after_the_node_restarts(cluster: Cluster, tmp_path):
    # A fixed API port, as a real node has: PouchDB knows the node by its URL.
    node = cluster.add("a", "--api-listen", f"127.0.0.1:{free_port()}")
    # more than PouchDB's batch of 100: several checkpoints, several pages of _changes
    tagged_notes(node, {f"old{i:03d}": "work" for i in range(250)})
    credential = add_app(node, "reader", NOTES, "read")
    url = db_url(node, NOTES, credential, "reader")
    async with pouchdb_puppet(tmp_path / "pouch") as pouch:
        first = await pouch.replicate_from(url)
        assert first["docs_read"] == 250, shown(first)

    node.stop()
    node.start()
    assert db_url(node, NOTES, credential, "reader") == url
    tagged_notes(node, {f"new{i}": "work" for i in range(5)})

    async with pouchdb_puppet(tmp_path / "pouch") as pouch:  # the same local database
        again = await pouch.replicate_from(url)
        assert again["docs_read"] == 5, shown(again)  # only the new ones: it resumed
        assert again["docs_written"] == 5 and again["doc_write_failures"] == 0, shown(again)
        assert await pouch.revs() == node.revs(NOTES)


async def test_pouchdb_servers_replicator_pulls_what_the_app_may_read(cluster: Cluster):
    node = cluster.add("a")
    tags = {f"n{i}": ("work" if i % 3 else "home") for i in range(12)}
    tagged_notes(node, tags)
    credential = add_app(node, "copier", NOTES, "read", {"tag": "work"})
    allowed = {doc_id: rev for doc_id, rev in node.revs(NOTES).items()
               if tags[doc_id] == "work"}
    with running_pouchdb_server() as server:
        answer = httpx.post(f"{server}/_replicate", timeout=DEADLINE, json={
            "source": db_url(node, NOTES, credential, "copier"),
            "target": "copy", "create_target": True,
        })
        assert answer.status_code == 200 and answer.json()["ok"], answer.text
        rows = httpx.get(f"{server}/copy/_all_docs").json()["rows"]
    assert {row["id"]: row["value"]["rev"] for row in rows} == allowed


async def test_a_plain_http_app_follows_changes_by_longpoll(cluster: Cluster):
    node = cluster.add("a")
    node.put(NOTES, {"tag": "work"}, "before")  # written before the follower starts
    credential = add_app(node, "follower", NOTES, "read", {"tag": "work"})
    base = node.running.api_url + f"/couch/{NOTES}"
    auth = {"Authorization": f"Bearer {credential}"}
    info = httpx.get(base, headers=auth)
    assert info.status_code == 200, info.text
    start_seq = info.json()["update_seq"]
    seen: list[dict] = []

    def follow(last_id: str) -> None:
        """A longpoll follower as an app writes one: from a seq, then from each last_seq."""
        with httpx.Client(headers=auth, timeout=DEADLINE + 10) as http:
            since = start_seq
            while not any(change["id"] == last_id for change in seen):
                answer = http.get(f"{base}/_changes", params={
                    "feed": "longpoll", "since": since, "timeout": 10000,
                    "include_docs": "true"})
                assert answer.status_code == 200, answer.text
                body = answer.json()
                seen.extend(body["results"])
                since = body["last_seq"]

    with trio.fail_after(DEADLINE * 2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(
                trio.to_thread.run_sync, follow, "w-last", abandon_on_cancel=True))
            for doc_id, tag in [("w1", "work"), ("h1", "home"), ("w2", "work"),
                                ("w-last", "work")]:
                await trio.to_thread.run_sync(
                    functools.partial(node.put, NOTES, {"tag": tag}, doc_id))
    ids = [change["id"] for change in seen]
    assert ids == ["w1", "w2", "w-last"], seen  # in order; not h1 (outside its selector)
    assert all(change["doc"]["tag"] == "work" for change in seen)


async def test_a_plain_http_app_queries_with_find(cluster: Cluster):
    node = cluster.add("a")
    node.put_many(NOTES, [(f"n{i}", {"tag": "work" if i % 2 else "home", "n": i})
                          for i in range(10)])
    credential = add_app(node, "finder", NOTES, "read", {"tag": "work"})
    answer = httpx.post(node.running.api_url + f"/couch/{NOTES}/_find",
                        auth=("finder", credential), json={
                            "selector": {"n": {"$gte": 4}},
                            "fields": ["_id", "n"], "sort": [{"n": "desc"}], "limit": 3})
    assert answer.status_code == 200, answer.text
    # only docs the app may read (odd n, tag work), n >= 4, by n descending, 3 of them
    assert answer.json()["docs"] == [{"_id": "n9", "n": 9}, {"_id": "n7", "n": 7},
                                     {"_id": "n5", "n": 5}]
    bad = httpx.post(node.running.api_url + f"/couch/{NOTES}/_find",
                     auth=("finder", credential), json={"selector": {"n": {"$where": 1}}})
    assert bad.status_code == 400 and bad.json()["error"] == "bad_request", bad.text

async def test_a_share_link_lets_pouchdb_replicate_the_share_both_ways(cluster: Cluster,
                                                                       tmp_path):
    owner, member = cluster.add("owner"), cluster.add("member")
    share_between(owner, [member], name="notes", doctype=NOTES, selector={"shared": True})
    in_share = owner.put_many(NOTES, [(f"s{i}", {"shared": True, "n": i}) for i in range(4)])
    owner.put(NOTES, {"shared": False}, "private")  # same doctype, outside the share
    link = owner.cli_json("share", "link", "notes")
    read_only = owner.cli_json("share", "link", "notes", "--read-only")
    assert link["url"].endswith("/couch/share:notes"), link

    async with pouchdb_puppet(tmp_path / "pouch") as pouch:
        pulled = await pouch.replicate_from(link["url"])
        assert pulled["ok"] and pulled["doc_write_failures"] == 0, shown(pulled)
        assert await pouch.revs() == in_share  # the share's docs, not "private"

        put = await pouch.put({"_id": "from-pouch", "shared": True, "doctype": NOTES})
        await pouch.put({"_id": "out-of-scope", "shared": False, "doctype": NOTES})
        pushed = await pouch.replicate_to(link["url"])
        assert pushed["ok"] and pushed["docs_written"] == 1, shown(pushed)
        assert [e["id"] for e in pushed["errors"]] == ["out-of-scope"], shown(pushed)
        assert owner.get("from-pouch")["_rev"] == put["rev"]
        # ...and on to the member, by the nodes' own peer sync
        await node_wait(lambda: (d := member.get("from-pouch")) and d["_rev"] == put["rev"],
                        "from-pouch on the member")
        assert owner.get("out-of-scope") is None

    async with pouchdb_puppet(tmp_path / "reader") as reader:
        assert (await reader.replicate_from(read_only["url"]))["docs_written"] == 5
        await reader.put({"_id": "refused", "shared": True, "doctype": NOTES})
        refused = await reader.replicate_to(read_only["url"])
        assert refused["ok"] and refused["docs_written"] == 0, shown(refused)
        assert [(e["id"], e["name"]) for e in refused["errors"]] == [("refused", "forbidden")]
    assert owner.get("refused") is None and member.get("refused") is None


async def test_conflicts_and_deletions_converge_between_pouchdb_and_the_node(
        cluster: Cluster, tmp_path):
    node = cluster.add("a")
    revs = node.put_many(NOTES, [(doc_id, {"v": 0}) for doc_id in ("c1", "d1", "d2")])
    credential = add_app(node, "notes", NOTES, "write")
    url = db_url(node, NOTES, credential, "notes")
    async with pouchdb_puppet(tmp_path / "pouch") as pouch:
        assert (await pouch.replicate_from(url))["docs_written"] == 3
        # c1 edited apart on both sides: a conflict, the same winner on both
        node_edit = node.put(NOTES, {"v": "node"}, "c1", rev=revs["c1"])
        pouch_edit = (await pouch.put({"_id": "c1", "_rev": revs["c1"], "v": "pouch"}))["rev"]
        # d1 deleted in PouchDB, d2 on the node
        await pouch.remove("d1", revs["d1"])
        node.delete("d2", revs["d2"])

        pushed = await pouch.replicate_to(url)
        assert pushed["ok"] and pushed["doc_write_failures"] == 0, shown(pushed)
        pulled = await pouch.replicate_from(url)
        assert pulled["ok"] and pulled["doc_write_failures"] == 0, shown(pulled)

        on_node = node.get("c1", conflicts=True)
        in_pouch = await pouch.get("c1", conflicts=True)
        assert on_node["_rev"] == in_pouch["_rev"]
        assert {on_node["_rev"], *on_node["_conflicts"]} == {node_edit, pouch_edit}
        assert sorted(in_pouch["_conflicts"]) == sorted(on_node["_conflicts"])
        assert node.get("d1") is None and await pouch.get_or_none("d2") is None
        assert await pouch.revs() == node.revs(NOTES) == {"c1": on_node["_rev"]}


async def test_a_doc_edited_out_of_an_apps_selector_leaves_its_pouchdb(cluster: Cluster,
                                                                       tmp_path):
    """What PouchDB holds is what the token allows *now*: a doc the owner edits out of the
    app's selector must leave the app's copy at its next pull (as a share member's does)."""
    node = cluster.add("a")
    revs = tagged_notes(node, {"w1": "work", "w2": "work"})
    credential = add_app(node, "reader", NOTES, "read", {"tag": "work"})
    url = db_url(node, NOTES, credential, "reader")
    async with pouchdb_puppet(tmp_path / "pouch") as pouch:
        assert (await pouch.replicate_from(url))["docs_written"] == 2
        node.put(NOTES, {"tag": "home"}, "w1", rev=revs["w1"])
        pulled = await pouch.replicate_from(url)
        assert pulled["ok"], shown(pulled)
        held = await pouch.revs()
        assert held == {"w2": revs["w2"]}, (held, revs)  # w1 is no longer the app's to hold
    # An app that still reads w1 pulls it whole: the reader's removal beside it (a leaf its
    # _changes lists with style=all_docs) does not fail its _bulk_get.
    everything = add_app(node, "everything", NOTES, "read")
    async with pouchdb_puppet(tmp_path / "pouch2") as pouch:
        pulled = await pouch.replicate_from(db_url(node, NOTES, everything, "everything"))
        assert pulled["ok"], shown(pulled)
        assert await pouch.revs() == node.revs(NOTES)


async def test_a_doc_edited_out_of_a_shares_scope_leaves_its_links_pouchdb(cluster: Cluster,
                                                                          tmp_path):
    node = cluster.add("a")
    revs = tagged_notes(node, {"w1": "work", "w2": "work"})
    node.cli_json("share", "create", "work", "--doctype", NOTES,
                  "--selector", json.dumps({"tag": "work"}))
    link = node.cli_json("share", "link", "work")
    async with pouchdb_puppet(tmp_path / "pouch") as pouch:
        assert (await pouch.replicate_from(link["url"]))["docs_written"] == 2
        node.put(NOTES, {"tag": "home"}, "w1", rev=revs["w1"])
        pulled = await pouch.replicate_from(link["url"])
        assert pulled["ok"], shown(pulled)
        assert await pouch.revs() == {"w2": revs["w2"]}


async def test_an_unlinked_share_link_stops_a_live_pouchdb_sync(cluster: Cluster, tmp_path):
    owner = cluster.add("owner")
    owner.cli_json("share", "create", "notes", "--doctype", NOTES)
    link = owner.cli_json("share", "link", "notes")
    async with pouchdb_puppet(tmp_path / "pouch") as pouch:
        handle = await pouch.start_live("sync", link["url"])  # no retry: an error ends it
        rev = owner.put(NOTES, {"v": 1}, "before")
        await eventually(lambda: pouch.get_or_none("before"), DEADLINE,
                         what="the live sync carrying a doc before the unlink")
        assert (await pouch.get("before"))["_rev"] == rev

        owner.cli_json("share", "unlink", "notes", link["id"])
        owner.put(NOTES, {"v": 2}, "after-unlink")  # on the feed PouchDB may hold open
        await pouch.put({"_id": "pushed-after-unlink", "doctype": NOTES})
        # PouchDB sees an error: a 401 on its next request, or its open feed ending (how
        # that feed ends is test_a_feed_open_when_its_link_is_unlinked_ends_cleanly's)
        await pouch.wait_event(handle, "error", timeout=DEADLINE)
        assert await pouch.get_or_none("after-unlink") is None
        assert owner.get("pushed-after-unlink") is None


async def test_a_feed_open_when_its_link_is_unlinked_ends_cleanly(cluster: Cluster):
    """A longpoll whose credential is revoked while it is open was cut mid-response (the
    token's refusal came after the status line); it ends as one JSON object now: CouchDB's
    error, as a feed that fails once started says it, and the next request is a 401."""
    owner = cluster.add("owner")
    owner.cli_json("share", "create", "notes", "--doctype", NOTES)
    link = owner.cli_json("share", "link", "notes")
    feed = owner.running.api_url + "/couch/share:notes/_changes"
    with httpx.stream("GET", feed, auth=(link["id"], link["credential"]), timeout=DEADLINE,
                      params={"feed": "longpoll", "since": "now", "heartbeat": 1000,
                              "timeout": 5000}) as response:
        assert response.status_code == 200  # its headers are here: the feed is open
        owner.cli_json("share", "unlink", "notes", link["id"])
        owner.put(NOTES, {"v": 1}, "after-unlink")
        body = response.read()  # the whole answer, not a connection cut half way
    assert json.loads(body)["error"] == "unauthorized", body
    again = httpx.get(feed, auth=(link["id"], link["credential"]))
    assert again.status_code == 401 and again.json()["error"] == "unauthorized"


async def test_a_live_sync_with_retry_carries_on_after_the_node_restarts(cluster: Cluster,
                                                                       tmp_path):
    node = cluster.add("a", "--api-listen", f"127.0.0.1:{free_port()}")
    credential = add_app(node, "notes", NOTES, "write")
    async with pouchdb_puppet(tmp_path / "pouch") as pouch:
        # retrying every half second: PouchDB's own pause doubles while the node is down
        handle = await pouch.start_live("sync", db_url(node, NOTES, credential, "notes"),
                                        retry=True, back_off_ms=500)
        first = node.put(NOTES, {"v": 1}, "before-restart")
        await eventually(lambda: _has(pouch, "before-restart", first), DEADLINE,
                         what="before-restart in PouchDB")

        node.stop()
        written_offline = (await pouch.put({"_id": "while-down", "v": 2}))["rev"]
        node.start()
        after = node.put(NOTES, {"v": 3}, "after-restart")
        await eventually(lambda: _has(pouch, "after-restart", after), DEADLINE,
                         what="after-restart in PouchDB (the sync reconnected)")
        await node_wait(lambda: (d := node.get("while-down")) and d["_rev"] == written_offline,
                        "while-down, written while the node was down, on the node")
        await pouch.cancel(handle)


async def _has(pouch, doc_id: str, rev: str) -> bool:
    doc = await pouch.get_or_none(doc_id)
    return doc is not None and doc["_rev"] == rev


async def test_pouchdb_round_trips_an_encrypted_doctype_kept_as_ciphertext(
        cluster: Cluster, couchdb_url: str, tmp_path):
    """PouchDB writes clear docs of a sealed doctype through the node; the node's CouchDB
    server holds only ciphertext; another PouchDB reads them back in clear, same revs."""
    node = cluster.add("a", "--store", "couchdb", "--couchdb-url", couchdb_url)
    node.cli_json("encrypt", "io.health")
    credential = add_app(node, "health", "io.health", "write")
    url = db_url(node, "io.health", credential, "health")
    secrets = {f"h{i}": f"plain-secret-{i}-{uuid.uuid4().hex[:8]}" for i in range(5)}
    async with pouchdb_puppet(tmp_path / "writer") as writer:
        await writer.bulk_docs([{"_id": doc_id, "diagnosis": secret}
                                for doc_id, secret in secrets.items()])
        pushed = await writer.replicate_to(url)
        assert pushed["docs_written"] == 5 and pushed["doc_write_failures"] == 0, shown(pushed)
        written = await writer.revs()

    database = node.status()["store"]["database"]
    raw = httpx.get(f"{couchdb_url}/{database}/_all_docs",
                    params={"include_docs": "true"}).text
    assert all(f'"{doc_id}"' in raw for doc_id in secrets)  # the docs are there...
    assert not [secret for secret in secrets.values() if secret in raw]  # ...sealed
    assert "diagnosis" not in raw

    async with pouchdb_puppet(tmp_path / "reader") as reader:
        pulled = await reader.replicate_from(url)
        assert pulled["docs_written"] == 5, shown(pulled)
        assert await reader.revs() == written == node.revs("io.health")
        for doc_id, secret in secrets.items():
            assert (await reader.get(doc_id))["diagnosis"] == secret


async def test_a_local_design_doc_does_not_stop_pouchdbs_push(cluster: Cluster, tmp_path):
    """Apps' PouchDBs hold design docs (pouchdb-find keeps its indexes in them), and PouchDB
    pushes them like any doc: the node refuses them per document (forbidden), so the rest
    still land and the replication ends well."""
    node = cluster.add("a")
    credential = add_app(node, "notes", NOTES, "write")
    async with pouchdb_puppet(tmp_path / "pouch") as pouch:
        await pouch.put({"_id": "_design/idx-title", "language": "query",
                         "views": {"title": {"map": {"fields": {"title": "asc"}}}}})
        await pouch.bulk_docs([{"_id": f"n{i}", "title": f"t{i}"} for i in range(3)])
        result = await pouch.replicate_to(db_url(node, NOTES, credential, "notes"))
        assert result["ok"] and result["docs_written"] == 3, shown(result)
        assert [(e["id"], e["name"]) for e in result["errors"]] == [
            ("_design/idx-title", "forbidden")], shown(result)
    assert sorted(node.revs(NOTES)) == ["n0", "n1", "n2"]


@pytest.mark.parametrize("backend", ["sqlite", "couchdb"])
async def test_pouchdb_replicates_a_doc_with_an_attachment_to_and_from_a_node(
        cluster: Cluster, tmp_path, backend, request):
    """Issue 13: PouchDB's push sends attachments inline (base64, `_bulk_docs` with
    new_edits=false), its pull asks `_bulk_get?attachments=true`; the file arrives equal,
    digest and all, both ways, and the docs after it in the same push land too (on both
    store backends)."""
    store = () if backend == "sqlite" else (
        "--store", "couchdb", "--couchdb-url", request.getfixturevalue("couchdb_url"))
    node = cluster.add("a", *store)
    credential = add_app(node, "notes", NOTES, "write")
    data = bytes(range(256)) * 40 + b"end"
    digest = "md5-" + base64.b64encode(hashlib.md5(data).digest()).decode()
    async with pouchdb_puppet(tmp_path / "pouch") as pouch:
        await pouch.put({"_id": "with-attachment", "title": "t", "_attachments": {"a.bin": {
            "content_type": "application/x-test", "data": base64.b64encode(data).decode()}}})
        # written after it: more than one of PouchDB's batches of 100
        await pouch.bulk_docs([{"_id": f"n{i:03d}"} for i in range(150)])
        result = await pouch.replicate_to(db_url(node, NOTES, credential, "notes"))
        assert result["ok"] and result["docs_written"] == 151, shown(result)
        assert result["errors"] == [], shown(result)
        sent_rev = (await pouch.get("with-attachment"))["_rev"]
    assert len(node.revs(NOTES)) == 151
    stub = node.get("with-attachment")["_attachments"]["a.bin"]
    assert stub["digest"] == digest and stub["length"] == len(data)
    assert stub["content_type"] == "application/x-test"
    with httpx.Client(base_url=node.running.api_url, headers={
            "Authorization": f"Bearer {node.running.credential}"}) as http:
        got = http.get(f"/data/{NOTES}/with-attachment/a.bin")
        assert got.status_code == 200 and got.content == data

    # and back, into an empty PouchDB; the owner adds a second file on the node first
    with httpx.Client(base_url=node.running.api_url, headers={
            "Authorization": f"Bearer {node.running.credential}"}) as http:
        added = http.put(f"/data/{NOTES}/with-attachment/b.txt", params={"rev": sent_rev},
                         content=b"second file", headers={"content-type": "text/plain"})
        assert added.status_code == 201, added.text
    async with pouchdb_puppet(tmp_path / "pouch2") as pouch:
        result = await pouch.replicate_from(db_url(node, NOTES, credential, "notes"))
        assert result["ok"] and result["doc_write_failures"] == 0, shown(result)
        doc = await pouch.get("with-attachment", attachments=True)
        assert doc["_rev"] == added.json()["rev"]
        atts = doc["_attachments"]
        assert base64.b64decode(atts["a.bin"]["data"]) == data
        assert atts["a.bin"]["digest"] == digest
        assert base64.b64decode(atts["b.txt"]["data"]) == b"second file"
        assert atts["b.txt"]["content_type"] == "text/plain"
        assert len(await pouch.revs()) == 151


async def test_a_malformed_doc_is_refused_alone_and_pouchdbs_push_goes_on(cluster: Cluster,
                                                                         tmp_path):
    """A doc the token finds malformed (here: its id is the tombstone of a doc of another
    doctype) is a per-document `forbidden`, the one refusal PouchDB's replicator moves past
    (CouchDB answers validation failures so too); a `bad_request` would end the push."""
    node = cluster.add("a")
    gone = node.put("io.other", {"v": 1}, "moved")
    node.delete("moved", gone)
    owner = db_url(node, NOTES, node.running.credential, "owner")
    async with pouchdb_puppet(tmp_path / "pouch") as pouch:
        await pouch.put({"_id": "moved", "v": 2})
        await pouch.bulk_docs([{"_id": f"n{i:03d}"} for i in range(150)])  # 2 batches more
        result = await pouch.replicate_to(owner)
        assert result["ok"] and result["docs_written"] == 150, shown(result)
        assert [(e["id"], e["name"]) for e in result["errors"]] == [("moved", "forbidden")], \
            shown(result)
    assert len(node.revs(NOTES)) == 150


async def test_a_wrong_or_removed_credential_ends_pouchdbs_replication_with_401(
        cluster: Cluster, tmp_path):
    node = cluster.add("a")
    node.put(NOTES, {"v": 1}, "n1")
    credential = add_app(node, "notes", NOTES, "write")
    forged = credential[:-4] + ("AAAA" if not credential.endswith("AAAA") else "BBBB")
    async with pouchdb_puppet(tmp_path / "pouch") as pouch:
        refused = await pouch.replicate_from(db_url(node, NOTES, forged, "notes"))
        assert not refused["ok"] and refused["error"]["status"] == 401, shown(refused)
        assert await pouch.get_or_none("n1") is None

        handle = await pouch.start_live("sync", db_url(node, NOTES, credential, "notes"))
        await eventually(lambda: pouch.get_or_none("n1"), DEADLINE, what="n1 in PouchDB")
        node.cli_ok("app", "rm", "notes")
        await pouch.put({"_id": "after-removal"})
        error = await pouch.wait_event(handle, "error", timeout=DEADLINE)
        assert error["data"].get("status") == 401, pouch.events(handle)
    assert node.get("after-removal") is None
