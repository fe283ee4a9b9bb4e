"""Fixtures shared by the whole suite: real servers, started by the tests themselves."""

import os

import pytest

# The suite runs on several pytest-xdist workers (`-n`, `--dist loadgroup`: pyproject.toml).
# A fixture that a module or class shares between its tests (a running node, a server) would
# be set up once on every worker that gets one of those tests: such tests go to one worker.
_SHARED_SCOPES = {"module", "class", "package"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups off the items
def pytest_collection_modifyitems(items):
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        if any(defs[-1].scope in _SHARED_SCOPES for defs in info.name2fixturedefs.values()):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))

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
