import itertools
import uuid

import pytest

_db_names = itertools.count()
# Databases are named per run too: on a server of your own ($PLUGSHARE_TEST_COUCHDB_URL)
# they outlive the session, and a rerun must not open the last run's.
RUN = uuid.uuid4().hex[:8]

BACKENDS = ["sqlite", "couchdb"]


def unique_db_name(prefix: str) -> str:
    return f"{prefix}-{RUN}-{next(_db_names)}"


async def open_backend(backend, request, tmp_path, **kwargs):
    """Open a fresh, empty store of the given backend."""
    if backend == "sqlite":
        from plugshare.store.sqlite import SQLiteStore

        return await SQLiteStore.open(tmp_path / f"store-{next(_db_names)}.sqlite", **kwargs)
    from plugshare.store.couchdb import CouchDBStore

    url = request.getfixturevalue("couchdb_url")
    return await CouchDBStore.open(url, unique_db_name("contract"), **kwargs)


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
