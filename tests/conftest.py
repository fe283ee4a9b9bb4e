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


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory):
    """Path of a softhsm2.conf whose token directory holds token 'plugshare-test' (user PIN
    in $PLUGSHARE_TEST_HSM_PIN); SOFTHSM2_CONF is set for this process and its children."""
    from tests.support.softhsm import make_softhsm

    return make_softhsm(tmp_path_factory.mktemp("softhsm"))
