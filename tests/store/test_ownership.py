"""One database per node: `open_store` names a node's CouchDB database after the node id as
well as its name, and every store records the node it belongs to (`_local/plugshare-owner`)
and refuses to be opened by another node.

Real nodes "Alice" and "alice" both ended up in `plugshare-alice`, each listing the other's
private documents."""

import itertools

import pytest

from plugshare.config import StoreSection
from plugshare.store import StoreError, couchdb_database_name, open_store
from plugshare.store.base import OWNER_LOCAL_ID, NotFound, OwnerMismatch
from plugshare.store.couchdb import CouchDBStore
from plugshare.store.sqlite import SQLiteStore
from tests.store.conftest import RUN

# Node ids as `plugshare.token.format_node_id` writes them (8 dash-separated groups of 7).
ALICE_ID = "MFRGGZD-FMZTGQ4-LONRXG5-3BORSXM-ZLQMFZG-C43UN5X-GEZTKNZ-YHEZDQM"
OTHER_ID = "NBSWY3D-PEB3W64-TMMQQQ4-DTMNXSA-Z3PNVSG-K4Q2LNB-QXEZLUM-V4ZTWMA"

_prefixes = itertools.count()


def couch_section(url: str) -> StoreSection:
    # A prefix of our own per test: the session's server is shared by every test.
    return StoreSection(backend="couchdb", url=url, database_prefix=f"own{RUN}{next(_prefixes)}")


def test_the_default_database_name_includes_a_short_node_id():
    assert couchdb_database_name("plugshare", "Alice") == "plugshare-alice"  # as before
    name = couchdb_database_name("plugshare", "Alice", ALICE_ID)
    assert name == "plugshare-alice-mfrggzdfmztg"
    assert couchdb_database_name("plugshare", "alice", OTHER_ID) != name
    assert couchdb_database_name("plugshare", "my.node", ALICE_ID).startswith("plugshare-my_node-")


async def test_nodes_whose_names_differ_in_case_get_their_own_databases(couchdb_url, tmp_path):
    section = couch_section(couchdb_url)
    upper = await open_store(section, tmp_path / "a", "Alice", node_id=ALICE_ID)
    lower = await open_store(section, tmp_path / "b", "alice", node_id=OTHER_ID)
    try:
        await upper.put({"_id": "diary", "text": "private"})
        assert await lower.all_docs() == []
        assert (await lower.info())["doc_count"] == 0
    finally:
        await upper.aclose()
        await lower.aclose()


async def test_a_node_reopens_its_own_couchdb_database(couchdb_url, tmp_path):
    section = couch_section(couchdb_url)
    store = await open_store(section, tmp_path, "Alice", node_id=ALICE_ID)
    try:
        await store.put({"_id": "kept"})
        assert (await store.get_local(OWNER_LOCAL_ID))["node_id"] == ALICE_ID
    finally:
        await store.aclose()
    again = await open_store(section, tmp_path, "Alice", node_id=ALICE_ID)
    try:
        assert [doc["_id"] for doc in await again.all_docs()] == ["kept"]
    finally:
        await again.aclose()


async def test_a_couchdb_database_of_another_node_is_refused(couchdb_url):
    name = f"owned-{RUN}-{next(_prefixes)}"
    first = await CouchDBStore.open(couchdb_url, name, owner=ALICE_ID)
    await first.aclose()
    with pytest.raises(OwnerMismatch) as caught:
        await CouchDBStore.open(couchdb_url, name, owner=OTHER_ID)
    assert isinstance(caught.value, StoreError)
    message = str(caught.value)
    assert f"database {name} belongs to node {ALICE_ID}" in message
    assert "configure another [store] database" in message
    assert caught.value.owner == ALICE_ID


async def test_a_database_made_before_owners_were_recorded_is_claimed(couchdb_url, tmp_path):
    section = couch_section(couchdb_url)
    name = couchdb_database_name(section.database_prefix, "Alice", ALICE_ID)
    legacy = await CouchDBStore.open(couchdb_url, name)  # no owner: as old nodes opened it
    await legacy.put({"_id": "old"})
    with pytest.raises(NotFound):
        await legacy.get_local(OWNER_LOCAL_ID)
    await legacy.aclose()
    store = await open_store(section, tmp_path, "Alice", node_id=ALICE_ID)
    try:
        assert (await store.get_local(OWNER_LOCAL_ID))["node_id"] == ALICE_ID
        assert [doc["_id"] for doc in await store.all_docs()] == ["old"]
    finally:
        await store.aclose()
    with pytest.raises(OwnerMismatch):
        await CouchDBStore.open(couchdb_url, name, owner=OTHER_ID)


async def test_the_old_call_without_a_node_id_still_works(couchdb_url, tmp_path):
    section = couch_section(couchdb_url)
    store = await open_store(section, tmp_path, "Bob")
    try:
        await store.put({"_id": "x"})
        with pytest.raises(NotFound):  # nothing claimed without a node id
            await store.get_local(OWNER_LOCAL_ID)
    finally:
        await store.aclose()
    sqlite = await open_store(StoreSection(), tmp_path, "Bob")
    await sqlite.aclose()


async def test_a_sqlite_store_of_another_node_is_refused(tmp_path):
    section = StoreSection()
    store = await open_store(section, tmp_path, "Alice", node_id=ALICE_ID)
    try:
        await store.put({"_id": "kept"})
        assert (await store.get_local(OWNER_LOCAL_ID))["node_id"] == ALICE_ID
    finally:
        await store.aclose()
    again = await open_store(section, tmp_path, "Alice", node_id=ALICE_ID)
    await again.aclose()
    with pytest.raises(OwnerMismatch) as caught:
        await open_store(section, tmp_path, "alice", node_id=OTHER_ID)
    path = tmp_path / "store.sqlite"
    assert f"{path} belongs to node {ALICE_ID}" in str(caught.value)
    with pytest.raises(OwnerMismatch):
        await SQLiteStore.open(path, owner=OTHER_ID)
    # The refused open changed nothing: the owner and the docs are still there.
    check = await SQLiteStore.open(path, owner=ALICE_ID)
    try:
        assert [doc["_id"] for doc in await check.all_docs()] == ["kept"]
    finally:
        await check.aclose()


async def test_an_explicitly_configured_database_name_is_kept(couchdb_url, tmp_path):
    # StoreSection has no `database` key yet; open_store honours one when the config grows it.
    from types import SimpleNamespace

    name = f"explicit-{RUN}-{next(_prefixes)}"
    section = SimpleNamespace(backend="couchdb", url=couchdb_url, database=name,
                              database_prefix="plugshare", revs_limit=1000)
    store = await open_store(section, tmp_path, "Alice", node_id=ALICE_ID)
    await store.aclose()
    raw = await CouchDBStore.open(couchdb_url, name)
    try:
        assert (await raw.get_local(OWNER_LOCAL_ID))["node_id"] == ALICE_ID
    finally:
        await raw.aclose()
    with pytest.raises(OwnerMismatch):
        await open_store(section, tmp_path, "Alice", node_id=OTHER_ID)
