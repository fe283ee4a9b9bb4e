"""Fixtures shared by the whole suite: real servers, started by the tests themselves."""

import pytest


@pytest.fixture(scope="session")
def couchdb_url():
    """URL of a real CouchDB-compatible server (pouchdb-server from npm, in memory, on a free
    loopback port), installed on first use into the repo's ignored `.cache/` and stopped at the
    end of the session."""
    from tests.support.pouchdb import running_pouchdb_server

    with running_pouchdb_server() as url:
        yield url
