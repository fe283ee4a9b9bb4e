"""The PouchDB puppet against pouchdb-server (the same protocol a node speaks at /couch): its
commands, one-shot and live replication, per-document refusals, and a local database and
checkpoints that outlive the puppet."""

from __future__ import annotations

import socket

import httpx
import pytest
import trio

from tests.support.pouchdb import running_pouchdb_server
from tests.support.pouchdb_client import PuppetError, eventually, pouchdb_puppet

DEADLINE = 60.0


@pytest.fixture
def server():
    with running_pouchdb_server() as url:
        yield url


def make_db(server: str, name: str) -> str:
    response = httpx.put(f"{server}/{name}")
    assert response.status_code in (201, 412), response.text
    return f"{server}/{name}"


def server_revs(db_url: str) -> dict[str, str]:
    rows = httpx.get(f"{db_url}/_all_docs").json()["rows"]
    return {row["id"]: row["value"]["rev"] for row in rows}


async def test_commands_and_one_shot_replication_both_ways(server, tmp_path):
    db_url = make_db(server, "notes")
    async with pouchdb_puppet(tmp_path / "p1") as pouch:
        first = await pouch.put({"_id": "a", "n": 1})
        assert (await pouch.get("a"))["_rev"] == first["rev"]
        written = await pouch.bulk_docs([{"_id": f"b{i}", "n": i} for i in range(5)])
        assert all(row["ok"] for row in written)
        with pytest.raises(PuppetError) as missing:
            await pouch.get("nope")
        assert missing.value.status == 404
        assert await pouch.get_or_none("nope") is None

        pushed = await pouch.replicate_to(db_url)
        assert pushed["ok"] and pushed["docs_written"] == 6, pushed
        assert server_revs(db_url) == await pouch.revs()

    async with pouchdb_puppet(tmp_path / "p2") as other:
        pulled = await other.replicate_from(db_url)
        assert pulled["docs_written"] == 6 and pulled["doc_write_failures"] == 0, pulled
        assert await other.revs() == server_revs(db_url)


async def test_local_database_and_checkpoints_outlive_the_puppet(server, tmp_path):
    db_url = make_db(server, "kept")
    httpx.post(f"{db_url}/_bulk_docs", json={"docs": [{"_id": f"d{i}"} for i in range(10)]})
    async with pouchdb_puppet(tmp_path / "p") as pouch:
        assert (await pouch.replicate_from(db_url))["docs_read"] == 10
    httpx.post(f"{db_url}/_bulk_docs", json={"docs": [{"_id": f"e{i}"} for i in range(3)]})
    async with pouchdb_puppet(tmp_path / "p") as pouch:
        assert len(await pouch.revs()) == 10  # the same LevelDB directory
        again = await pouch.replicate_from(db_url)
        assert again["docs_read"] == 3, again  # resumed from its checkpoint
        assert await pouch.revs() == server_revs(db_url)


async def test_refused_documents_are_per_document_failures(server, tmp_path):
    db_url = make_db(server, "guarded")
    validate = ("function (doc) { if (doc.secret) "
                "{ throw({forbidden: 'no secrets here'}); } }")
    assert httpx.put(f"{db_url}/_design/guard",
                     json={"validate_doc_update": validate}).status_code == 201
    async with pouchdb_puppet(tmp_path / "p") as pouch:
        await pouch.bulk_docs([{"_id": "ok1"}, {"_id": "bad", "secret": True}, {"_id": "ok2"}])
        result = await pouch.replicate_to(db_url)
        assert result["docs_written"] == 2 and result["doc_write_failures"] == 1, result
        assert [e.get("id") for e in result["errors"]] == ["bad"], result["errors"]
        assert set(server_revs(db_url)) == {"_design/guard", "ok1", "ok2"}


async def test_live_sync_streams_events_both_ways(server, tmp_path):
    db_url = make_db(server, "live")
    async with pouchdb_puppet(tmp_path / "p") as pouch:
        handle = await pouch.start_live("sync", db_url, retry=True)
        assert httpx.put(f"{db_url}/from-server", json={"x": 1}).status_code == 201
        await pouch.wait_event(
            handle, "change",
            lambda data: data["direction"] == "pull"
            and any(d["_id"] == "from-server" for d in data["change"]["docs"]),
            timeout=DEADLINE)
        assert (await pouch.get("from-server"))["x"] == 1

        await pouch.put({"_id": "from-pouch", "y": 2})
        async def on_server():
            return "from-pouch" in await trio.to_thread.run_sync(server_revs, db_url)
        await eventually(on_server, DEADLINE, what="from-pouch on the server")
        await pouch.cancel(handle)
        assert pouch.events(handle, "complete"), pouch.events(handle)


async def test_a_command_error_names_the_failure_and_the_puppet_goes_on(server, tmp_path):
    async with pouchdb_puppet(tmp_path / "p") as pouch:
        await pouch.put({"_id": "a"})
        with pytest.raises(PuppetError) as conflict:
            await pouch.put({"_id": "a"})
        assert conflict.value.status == 409 and "conflict" in str(conflict.value)
        with pytest.raises(PuppetError, match="unknown command"):
            await pouch.call("frobnicate")
        assert (await pouch.info())["doc_count"] == 1


async def test_a_command_without_an_answer_fails_after_its_timeout(tmp_path):
    """A server that accepts and never answers: the command fails naming itself, with the
    puppet's stderr, instead of hanging the test."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    held = []
    async with trio.open_nursery() as nursery:
        async def hold(stream):
            held.append(stream)
            await trio.sleep_forever()
        nursery.start_soon(trio.serve_listeners, hold, listeners)
        async with pouchdb_puppet(tmp_path / "p", timeout=3) as pouch:
            with pytest.raises(PuppetError, match="did not answer `replicate` within 3s") as err:
                await pouch.replicate_from(f"http://127.0.0.1:{port}/silent")
            assert "puppet stderr" in str(err.value)
            assert (await pouch.info())["doc_count"] == 0  # it still serves other commands
        nursery.cancel_scope.cancel()


async def test_a_live_replication_streams_denied_and_paused_events(server, tmp_path):
    db_url = make_db(server, "guarded-live")
    validate = "function (doc) { if (doc.secret) { throw({forbidden: 'no secrets'}); } }"
    httpx.put(f"{db_url}/_design/guard", json={"validate_doc_update": validate})
    async with pouchdb_puppet(tmp_path / "p") as pouch:
        handle = await pouch.start_live("to", db_url)
        await pouch.bulk_docs([{"_id": "fine"}, {"_id": "hidden", "secret": True}])
        denied = await pouch.wait_event(handle, "denied", timeout=DEADLINE)
        assert denied["data"]["id"] == "hidden" and denied["data"]["name"] == "forbidden"
        async def paused_after_denied():  # caught up after the refusal, and still live
            kinds = [e["event"] for e in pouch.events(handle)]
            return "paused" in kinds[kinds.index("denied"):]
        await eventually(paused_after_denied, DEADLINE, what="a pause after the refusal")
        assert "fine" in server_revs(db_url) and "hidden" not in server_revs(db_url)
        assert pouch.events(handle, "active")
        await pouch.cancel(handle)


async def test_cancelling_a_live_replication_that_ended_in_an_error_answers(tmp_path):
    """A live replication without retry ends at its first error; cancelling it then has
    nothing to wait for (it used to wait for an end that had already come, until the
    command's timeout, and closing the puppet did the same)."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{unused.getsockname()[1]}/gone"  # nothing listens
    async with pouchdb_puppet(tmp_path / "p", timeout=20) as pouch:
        handle = await pouch.start_live("sync", dead_url)
        await pouch.wait_event(handle, "error", timeout=DEADLINE)
        await pouch.cancel(handle)  # a PuppetError if it waits for nothing
