"""The CouchDB backend against what Apache CouchDB (3.x, clustered) does and pouchdb-server
does not: databases of 2 shards unless asked for one, writes accepted below quorum (202),
`_revs_diff` behind a fresh write, longpolls cut by a restart, nodes that go away.

Each test puts fault-injecting proxies (tests/support/couch_proxy.py, real sockets) in front
of the session's pouchdb-server; two proxies in front of one server are two nodes of one
cluster. The contract suite runs through such a proxy too (the "couchdb-cluster" backend).
"""

import logging

import pytest
import trio
import trio.testing

from plugshare.store import couchdb
from plugshare.store.base import Unavailable
from plugshare.store.couchdb import CouchDBStore
from plugshare.store.revtree import history_of
from tests.store.conftest import unique_db_name
from tests.support.couch_proxy import running_couch_proxy

HANG_GUARD = 60  # seconds; a hang guard, not a timing assertion


@pytest.fixture
def proxy(couchdb_url):
    with running_couch_proxy(couchdb_url) as running:
        yield running


@pytest.fixture
def two_nodes(couchdb_url):
    with running_couch_proxy(couchdb_url) as one, running_couch_proxy(couchdb_url) as two:
        yield one, two


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(couchdb, "FEED_RETRY_DELAY", 0.05)
    monkeypatch.setattr(couchdb, "QUORUM_RETRY_DELAY", 0.05)


def sent(proxy, method: str, path_part: str) -> int:
    """How many `method` requests with `path_part` in their path reached the proxy."""
    return sum(1 for m, path in list(proxy.requests) if m == method and path_part in path)


def store_warnings(caplog):
    return [r for r in caplog.records
            if r.name == "plugshare.store" and r.levelno >= logging.WARNING]


def replicated(doc_id, path, **body):
    return {"_id": doc_id, "_rev": path[0], "_revisions": history_of(path), **body}


# -- one shard ----------------------------------------------------------------------------------


async def test_a_database_is_created_with_one_shard(proxy):
    name = unique_db_name("cluster")
    store = await CouchDBStore.open(proxy.url, name)
    await store.aclose()
    assert ("PUT", f"/{name}?q=1") in proxy.requests


async def test_a_server_that_refuses_q_gets_a_plain_database(proxy):
    proxy.refuse_shards = 1
    name = unique_db_name("cluster")
    store = await CouchDBStore.open(proxy.url, name)
    try:
        await store.put({"_id": "doc"})
        assert ("PUT", f"/{name}") in proxy.requests
    finally:
        await store.aclose()


# -- writes accepted below quorum (202) -----------------------------------------------------------


async def test_a_put_answered_202_is_sent_again_until_a_quorum_has_it(proxy):
    store = await CouchDBStore.open(proxy.url, unique_db_name("cluster"))
    try:
        copies_before = sent(proxy, "POST", "/_bulk_docs")
        proxy.writes_below_quorum = 1
        rev1 = await store.put({"_id": "doc", "v": 1})
        # read back with its history and sent again, idempotently, with new_edits=false
        assert sent(proxy, "POST", "/_bulk_docs") == copies_before + 1
        assert (await store.get("doc"))["_rev"] == rev1
        assert (await store.info())["writes_below_quorum"] == 0
    finally:
        await store.aclose()


async def test_a_put_that_stays_below_quorum_is_returned_counted_and_logged(
        proxy, quick_retries, caplog):
    store = await CouchDBStore.open(proxy.url, unique_db_name("cluster"))
    try:
        proxy.writes_below_quorum = 1 + couchdb.QUORUM_ATTEMPTS
        rev1 = await store.put({"_id": "doc", "v": 1})
        assert (await store.get("doc"))["_rev"] == rev1  # it exists: a retry would conflict
        assert (await store.info())["writes_below_quorum"] == 1
        assert any("write quorum" in r.getMessage() for r in store_warnings(caplog))
        tomb = await store.delete("doc", rev1)  # and a 201 counts nothing more
        assert (await store.get("doc", rev=tomb))["_deleted"] is True
        assert (await store.info())["writes_below_quorum"] == 1
    finally:
        await store.aclose()


async def test_bulk_writes_and_deletes_answered_202_are_sent_again(proxy):
    store = await CouchDBStore.open(proxy.url, unique_db_name("cluster"))
    try:
        proxy.writes_below_quorum = 1
        results = await store.bulk_docs([{"_id": "a"}, {"_id": "b"}])
        assert all(r["ok"] for r in results)
        copies = sent(proxy, "POST", "/_bulk_docs")
        assert copies == 2  # the batch, then its revisions again with new_edits=false
        proxy.writes_below_quorum = 1
        await store.delete("a", results[0]["rev"])
        assert sent(proxy, "POST", "/_bulk_docs") == copies + 1
        assert (await store.info())["writes_below_quorum"] == 0
    finally:
        await store.aclose()


async def test_a_batch_with_a_local_doc_answered_202_copies_only_its_revisions(proxy):
    store = await CouchDBStore.open(proxy.url, unique_db_name("cluster"))
    try:
        proxy.writes_below_quorum = 2  # the local doc's PUT, then the batch
        results = await store.bulk_docs([{"_id": "_local/mark", "n": 1}, {"_id": "a"}])
        assert all(r["ok"] for r in results)
        assert (await store.info())["writes_below_quorum"] == 0
        assert (await store.get_local("mark"))["n"] == 1  # a checkpoint: taken as written
    finally:
        await store.aclose()


async def test_replicated_revisions_below_quorum_are_not_taken_as_stored(proxy, quick_retries):
    store = await CouchDBStore.open(proxy.url, unique_db_name("cluster"))
    doc = replicated("doc", ("2-" + "b" * 32, "1-" + "a" * 32), v=2)
    try:
        proxy.writes_below_quorum = 1  # once: sent again at once, then on a quorum
        assert (await store.bulk_docs([doc], new_edits=False))[0]["ok"]
        assert sent(proxy, "POST", "/_bulk_docs") == 2

        other = replicated("other", ("1-" + "c" * 32,), v=1)
        proxy.writes_below_quorum = couchdb.QUORUM_ATTEMPTS  # every time: not known durable
        with pytest.raises(Unavailable) as caught:
            await store.bulk_docs([other], new_edits=False)
        assert "write quorum" in caught.value.reason
        # delivered again later (the replicator retries a batch it could not store): a no-op
        assert (await store.bulk_docs([other], new_edits=False))[0]["ok"]
        assert (await store.get("other"))["_rev"] == other["_rev"]
    finally:
        await store.aclose()


# -- _revs_diff behind a fresh write ------------------------------------------------------------


async def test_replication_converges_when_revs_diff_reports_a_fresh_write_missing(proxy):
    source = await CouchDBStore.open(proxy.url, unique_db_name("cluster"))
    target = await CouchDBStore.open(proxy.url, unique_db_name("cluster"))
    try:
        rev1 = await source.put({"_id": "doc", "v": 1})
        await source.put({"_id": "doc", "_rev": rev1, "v": 2})
        for _ in range(2):  # the second round asks again right after the write
            changes = (await source.changes(0)).results
            proxy.revs_diff_lies = 1
            diff = await target.revs_diff({c.id: list(c.revs) for c in changes})
            wanted = [(doc_id, r) for doc_id, d in diff.items() for r in d["missing"]]
            docs = await source.bulk_get(wanted)
            assert all(r["ok"] for r in await target.bulk_docs(docs, new_edits=False))
        assert await target.get("doc", revs=True) == await source.get("doc", revs=True)
        assert await target.revs_diff({"doc": [c.revs[0] for c in changes]}) == {}
    finally:
        await source.aclose()
        await target.aclose()


# -- a longpoll cut mid-way ---------------------------------------------------------------------


async def _wakes_on_a_write(store, writer):
    since = (await store.changes(0)).last_seq
    woke = trio.Event()

    async def waiter():
        await store.wait_for_change(since)
        woke.set()

    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert not woke.is_set()
            await writer.put({"_id": "late"})
            await woke.wait()


async def test_a_cut_longpoll_is_asked_again(proxy, couchdb_url, quick_retries):
    name = unique_db_name("cluster")
    store = await CouchDBStore.open(proxy.url, name)
    direct = await CouchDBStore.open(couchdb_url, name)
    try:
        proxy.cut_longpolls = 3
        await _wakes_on_a_write(store, direct)
        assert proxy.cut_longpolls == 0
    finally:
        await store.aclose()
        await direct.aclose()


async def test_a_server_that_stays_down_ends_the_wait_with_a_store_error(proxy, quick_retries):
    store = await CouchDBStore.open(proxy.url, unique_db_name("cluster"))
    try:
        since = (await store.changes(0)).last_seq
        with trio.fail_after(HANG_GUARD):
            async with trio.open_nursery() as nursery:
                async def go_down_while_waiting():
                    await trio.testing.wait_all_tasks_blocked()
                    await trio.to_thread.run_sync(proxy.go_down)

                nursery.start_soon(go_down_while_waiting)
                with pytest.raises(Unavailable) as caught:
                    await store.wait_for_change(since)
        assert "changes feed" in caught.value.reason and proxy.url in caught.value.reason
    finally:
        await store.aclose()


# -- several nodes ------------------------------------------------------------------------------


async def test_the_store_fails_over_to_the_next_node_and_stays_there(two_nodes):
    one, two = two_nodes
    store = await CouchDBStore.open([one.url, two.url], unique_db_name("cluster"))
    try:
        rev1 = await store.put({"_id": "doc", "v": 1})
        assert not two.requests  # the first node, while it answers
        one.go_down()
        rev2 = await store.put({"_id": "doc", "_rev": rev1, "v": 2})
        assert (await store.get("doc"))["_rev"] == rev2
        assert two.requests
        one.come_up()
        asked = len(one.requests)
        await store.get("doc")
        assert len(one.requests) == asked  # sticky: the node in use is healthy
    finally:
        await store.aclose()


async def test_a_node_answering_5xx_is_left_for_the_next(two_nodes):
    one, two = two_nodes
    store = await CouchDBStore.open([one.url, two.url], unique_db_name("cluster"))
    try:
        rev1 = await store.put({"_id": "doc", "v": 1})
        one.server_errors = 1
        assert (await store.get("doc"))["_rev"] == rev1
        asked = len(one.requests)
        await store.put({"_id": "doc", "_rev": rev1, "v": 2})
        assert len(one.requests) == asked
    finally:
        await store.aclose()


async def test_a_wait_for_change_fails_over_with_its_node(two_nodes, couchdb_url, quick_retries):
    one, two = two_nodes
    name = unique_db_name("cluster")
    store = await CouchDBStore.open([one.url, two.url], name)
    direct = await CouchDBStore.open(couchdb_url, name)
    try:
        since = (await store.changes(0)).last_seq
        woke = trio.Event()

        async def waiter():
            await store.wait_for_change(since)
            woke.set()

        with trio.fail_after(HANG_GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()
                await trio.to_thread.run_sync(one.go_down)
                while not sent(two, "GET", "feed=longpoll"):
                    await trio.sleep(0.05)  # polls for the failover, asserts no timing
                assert not woke.is_set()
                await direct.put({"_id": "late"})
                await woke.wait()
    finally:
        await store.aclose()
        await direct.aclose()


async def test_every_node_down_is_unavailable_and_named(two_nodes):
    one, two = two_nodes
    store = await CouchDBStore.open([one.url, two.url], unique_db_name("cluster"))
    try:
        one.go_down()
        two.go_down()
        with trio.fail_after(HANG_GUARD):
            with pytest.raises(Unavailable) as caught:
                await store.get("doc")
        assert one.url in caught.value.reason or two.url in caught.value.reason
    finally:
        await store.aclose()


async def test_open_takes_a_list_of_urls_and_refuses_an_empty_one(proxy):
    from plugshare.store.base import BadRequest

    with pytest.raises(BadRequest):
        await CouchDBStore.open([], unique_db_name("cluster"))
    with pytest.raises(BadRequest):
        await CouchDBStore.open([proxy.url, "ftp://x"], unique_db_name("cluster"))


async def test_node_toml_takes_the_urls_of_a_cluster(two_nodes, tmp_path):
    from plugshare.config import ConfigError, dump_config, load_config, parse_config
    from plugshare.store import open_store

    one, two = two_nodes
    file = tmp_path / "node.toml"
    config = parse_config({"store": {"backend": "couchdb", "url": [one.url, two.url]}}, file)
    file.write_text(dump_config(config))
    assert load_config(file) == config
    one.go_down()
    store = await open_store(config.store, tmp_path, "alice", node_id=f"N{unique_db_name('x')}")
    try:
        await store.put({"_id": "doc"})
        assert sent(two, "PUT", "/doc")
    finally:
        await store.aclose()
    for bad, expected in [([], "at least one URL"), ([one.url, "ftp://x"], "http:// or https://"),
                          ([one.url, 5], "5 is not a string"), (7, "not a URL or a list")]:
        with pytest.raises(ConfigError, match=expected):
            parse_config({"store": {"backend": "couchdb", "url": bad}}, file)


async def test_a_write_cut_after_it_was_sent_is_not_made_twice(two_nodes):
    """A write that makes a revision is not sent to the next node once it may have been done
    (it would make a second revision, or a conflict): it fails, and the store moves on."""
    one, two = two_nodes
    store = await CouchDBStore.open([one.url, two.url], unique_db_name("cluster"))
    try:
        rev1 = await store.put({"_id": "doc", "v": 1})
        one.cut_writes = 1
        with pytest.raises(Unavailable):
            await store.put({"_id": "doc", "_rev": rev1, "v": 2})
        assert not sent(two, "PUT", "/doc")
        done = await store.get("doc")  # on the next node now
        assert done["v"] == 2 and sent(two, "GET", "/doc")
        one.cut_writes = 0
    finally:
        await store.aclose()
