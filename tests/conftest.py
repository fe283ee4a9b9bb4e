"""Fixtures shared by the whole suite: real servers, started by the tests themselves."""

import os

import pytest

# Point the CouchDB tests at a server of your own (e.g. Apache CouchDB) instead of the
# pouchdb-server they start: PLUGSHARE_TEST_COUCHDB_URL=http://admin:pw@127.0.0.1:5984
COUCHDB_URL_VARIABLE = "PLUGSHARE_TEST_COUCHDB_URL"


@pytest.fixture(scope="session")
def couchdb_url():
    """URL of a real CouchDB-compatible server: the one in $PLUGSHARE_TEST_COUCHDB_URL when
    set (its databases are left there, named uniquely per run), else pouchdb-server from npm,
    in memory, on a free loopback port, installed on first use into the repo's ignored
    `.cache/` and stopped at the end of the session."""
    if given := os.environ.get(COUCHDB_URL_VARIABLE):
        yield given.rstrip("/")
        return
    from tests.support.pouchdb import running_pouchdb_server

    with running_pouchdb_server() as url:
        yield url


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory):
    """Path of a softhsm2.conf whose token directory holds token 'plugshare-test' (user PIN
    in $PLUGSHARE_TEST_HSM_PIN); SOFTHSM2_CONF is set for this process and its children."""
    from tests.support.softhsm import make_softhsm

    return make_softhsm(tmp_path_factory.mktemp("softhsm"))
