import itertools
import uuid
import weakref

import pytest

_db_names = itertools.count()
# Databases are named per run too: on a server of your own ($PLUGSHARE_TEST_COUCHDB_URL)
# they outlive the session, and a rerun must not open the last run's.
RUN = uuid.uuid4().hex[:8]

# "couchdb-cluster": the CouchDB store through a fault-injecting proxy (tests/support/
# couch_proxy.py) that makes pouchdb-server answer as a CouchDB cluster may: seqs that differ
# between two reads of the same state, feeds that replay a change already delivered, writes
# accepted below quorum (202), longpolls cut mid-way. Every other time each, all along.
BACKENDS = ["sqlite", "couchdb", "couchdb-cluster"]

_proxies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def unique_db_name(prefix: str) -> str:
    return f"{prefix}-{RUN}-{next(_db_names)}"


def proxy_of(store):
    """The fault-injecting proxy a "couchdb-cluster" store talks through, else None."""
    return _proxies.get(store)


async def open_backend(backend, request, tmp_path, **kwargs):
    """Open a fresh, empty store of the given backend."""
    if backend == "sqlite":
        from plugshare.store.sqlite import SQLiteStore

        return await SQLiteStore.open(tmp_path / f"store-{next(_db_names)}.sqlite", **kwargs)
    from plugshare.store.couchdb import CouchDBStore

    url = request.getfixturevalue("couchdb_url")
    if backend == "couchdb":
        return await CouchDBStore.open(url, unique_db_name("contract"), **kwargs)
    assert backend == "couchdb-cluster", backend
    from tests.support.couch_proxy import CouchProxy

    proxy = CouchProxy(url)
    proxy.come_up()
    request.addfinalizer(proxy.go_down)
    proxy.opaque_seqs = True
    proxy.replay_changes = proxy.writes_below_quorum = proxy.cut_longpolls = -1
    store = await CouchDBStore.open(proxy.url, unique_db_name("contract"), **kwargs)
    _proxies[store] = proxy
    return store


@pytest.fixture(params=BACKENDS)
async def store(request, tmp_path):
    """The contract suite runs every test once per backend."""
    s = await open_backend(request.param, request, tmp_path)
    try:
        yield s
    finally:
        await s.aclose()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The backend name, for tests that open stores themselves via `open_backend`."""
    return request.param
