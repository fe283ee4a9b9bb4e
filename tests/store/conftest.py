import itertools

import pytest

_db_names = itertools.count()


async def open_backend(backend, request, tmp_path, **kwargs):
    """Open a fresh, empty store of the given backend."""
    if backend == "sqlite":
        from plugshare.store.sqlite import SQLiteStore

        return await SQLiteStore.open(tmp_path / f"store-{next(_db_names)}.sqlite", **kwargs)
    from plugshare.store.couchdb import CouchDBStore

    url = request.getfixturevalue("couchdb_url")
    return await CouchDBStore.open(url, f"contract-{next(_db_names)}", **kwargs)


@pytest.fixture(params=["sqlite", "couchdb"])
async def store(request, tmp_path):
    """The contract suite runs every test once per backend."""
    s = await open_backend(request.param, request, tmp_path)
    try:
        yield s
    finally:
        await s.aclose()


@pytest.fixture(params=["sqlite", "couchdb"])
def backend(request):
    """The backend name, for tests that open stores themselves via `open_backend`."""
    return request.param
