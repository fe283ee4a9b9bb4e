"""The CouchDB backend on a stock pouchdb-server (as npm ships it, without the launcher's
patches): it has no `/{db}/_revs_limit`, which made `CouchDBStore.open` fail and the node not
start. The store now finds out at open time, says so in ONE warning, keeps the server's own
stemming and trims the histories it sends and hands out to its `revs_limit`.

One extra server for this module (started unpatched: `running_pouchdb_server(stock=True)`).
"""

import hashlib
import itertools
import logging

import pytest

from plugshare.store.couchdb import CouchDBStore
from plugshare.store.revtree import history_of
from tests.store.conftest import unique_db_name
from tests.support.pouchdb import running_pouchdb_server

_names = itertools.count()


@pytest.fixture(scope="module")
def stock_url():
    with running_pouchdb_server(stock=True) as url:
        yield url


def rev(pos: int, tag: str) -> str:
    return f"{pos}-{hashlib.md5(tag.encode()).hexdigest()}"


def store_warnings(caplog):
    return [r for r in caplog.records
            if r.name == "plugshare.store" and r.levelno >= logging.WARNING]


async def test_the_store_opens_with_one_warning(stock_url, caplog):
    caplog.set_level(logging.INFO, logger="plugshare.store")
    store = await CouchDBStore.open(stock_url, f"stock-{next(_names)}", revs_limit=3)
    try:
        [warning] = store_warnings(caplog)
        message = warning.getMessage()
        assert "_revs_limit" in message and stock_url in message
        assert store.revs_limit == 3
        first = await store.put({"_id": "doc", "v": 1})
        await store.put({"_id": "doc", "_rev": first, "v": 2})
        assert (await store.get("doc"))["v"] == 2
        assert len(store_warnings(caplog)) == 1  # said once, not per request
    finally:
        await store.aclose()


async def test_histories_are_stemmed_on_our_side(stock_url):
    store = await CouchDBStore.open(stock_url, f"stock-{next(_names)}", revs_limit=3)
    try:
        revs = [await store.put({"_id": "doc", "v": 0})]
        for i in range(1, 6):
            revs.append(await store.put({"_id": "doc", "_rev": revs[-1], "v": i}))
        doc = await store.get("doc", revs=True)
        assert doc["_revisions"] == {"start": 6, "ids": [r.partition("-")[2] for r in revs[:2:-1]]}
        [got] = await store.bulk_get([("doc", revs[-1])])
        assert got["_revisions"] == doc["_revisions"]

        long = tuple(rev(i, f"h{i}") for i in range(10, 0, -1))
        replicated = {"_id": "other", "_rev": long[0], "_revisions": history_of(long), "v": 10}
        [result] = await store.bulk_docs([replicated], new_edits=False)
        assert result == {"id": "other", "rev": long[0], "ok": True}
        [got] = await store.bulk_get([("other", long[0])])
        assert got["_revisions"] == history_of(long[:3])
        # What reached the server was trimmed too: it never held the 7 older revisions.
        assert (await store.revs_diff({"other": [long[-1]]}))["other"]["missing"] == [long[-1]]
    finally:
        await store.aclose()


async def test_a_patched_server_gives_no_warning(couchdb_url, caplog):
    caplog.set_level(logging.INFO, logger="plugshare.store")
    store = await CouchDBStore.open(couchdb_url, unique_db_name("stock"), revs_limit=3)
    await store.aclose()
    assert store_warnings(caplog) == []


async def test_staged_chunks_are_kept_where_the_server_cannot_list_them(stock_url, caplog):
    """Without `_local_docs` the store cannot find what a cut transfer staged: it keeps it
    (a resume still finds it, a read per chunk) and says so once, not each hour."""
    store = await CouchDBStore.open(stock_url, f"stock-{next(_names)}")
    try:
        [digest] = await store.stage_chunks([b"left by a cut transfer"])
        await store.release_chunks([digest], keep_staged=True)
        assert await store.expire_staged(older_than=0) == 0
        assert await store.expire_staged(older_than=0) == 0
        assert await store.read_staged_chunk(digest) == b"left by a cut transfer"
        assert await store.claim_chunks([digest]) == {digest}  # a read each, found
        await store.release_chunks([digest])
        said = [w.getMessage() for w in store_warnings(caplog)
                if "_local_docs" in w.getMessage()]
        assert len(said) == 1 and stock_url in said[0], said
    finally:
        await store.aclose()
