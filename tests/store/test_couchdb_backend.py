"""What only the CouchDB backend has to show: the documents really live on the server, the
server's own settings are made, several clients share one database, and a server that is
away is reported as `Unavailable` quickly.

Runs against a real pouchdb-server (the session's `couchdb_url`, or a private one where a
test stops it or changes its settings); server-side state is checked with plain HTTP.
"""

import hashlib
import os
import socket
from urllib.parse import quote, urlsplit

import httpx
import pytest
import trio
import trio.testing

from plugshare.store import couchdb
from plugshare.store.base import BadRequest, NotFound, StoreError, Unavailable
from plugshare.store.couchdb import CouchDBStore
from plugshare.store.revtree import history_of
from tests.store.conftest import unique_db_name
from tests.support.couch_proxy import running_couch_proxy
from tests.support.pouchdb import running_pouchdb_server

HANG_GUARD = 30  # seconds; a hang guard, not a timing assertion


async def assert_not_staged(store, digests) -> None:
    for digest in digests:
        with pytest.raises(NotFound):
            await store.read_staged_chunk(digest)


def fresh_name() -> str:
    return unique_db_name("backend")


async def server_get(url: str, path: str, **params) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url) as client:
        return await client.get(path, params=params)


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def established_sockets(port: int) -> set[int]:
    """Inodes of this process's TCP sockets connected to 127.0.0.1:`port` (Linux /proc)."""
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # closed since listed
            continue
        if target.startswith("socket:["):
            ours.add(int(target[8:-1]))
    found = set()
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            remote, state, inode = fields[2], fields[3], int(fields[9])
            if state == "01" and int(remote.split(":")[1], 16) == port and inode in ours:
                found.add(inode)
    return found


async def test_documents_live_on_the_server(couchdb_url):
    name = fresh_name()
    store = await CouchDBStore.open(couchdb_url, name)
    try:
        odd_id = "notes/2024 50% done?#ünï"
        rev1 = await store.put({"_id": odd_id, "text": "hello"})
        raw = await server_get(couchdb_url, f"/{name}/{quote(odd_id, safe='')}")
        assert raw.status_code == 200
        assert raw.json() == {"_id": odd_id, "_rev": rev1, "text": "hello"}

        history = ("3-" + "c" * 32, "2-" + "b" * 32, "1-" + "a" * 32)
        await store.bulk_docs(
            [{"_id": "copied", "_rev": history[0], "_revisions": history_of(history), "v": 3}],
            new_edits=False,
        )
        raw = await server_get(couchdb_url, f"/{name}/copied", revs="true")
        assert raw.json()["_revisions"] == history_of(history)

        await store.put_local("checkpoint", {"seq": 7})
        raw = await server_get(couchdb_url, f"/{name}/_local/checkpoint")
        assert raw.json()["seq"] == 7

        await store.delete(odd_id, rev1)
        raw = await server_get(couchdb_url, f"/{name}/{quote(odd_id, safe='')}")
        assert raw.status_code == 404
    finally:
        await store.aclose()


async def test_open_sets_revs_limit_on_the_server(couchdb_url):
    name = fresh_name()
    store = await CouchDBStore.open(couchdb_url, name, revs_limit=7)
    await store.aclose()
    assert (await server_get(couchdb_url, f"/{name}/_revs_limit")).json() == 7
    store = await CouchDBStore.open(couchdb_url, name)  # reopening sets it again
    await store.aclose()
    assert store.revs_limit == 1000
    assert (await server_get(couchdb_url, f"/{name}/_revs_limit")).json() == 1000


async def test_open_keeps_an_existing_database(couchdb_url):
    name = fresh_name()
    first = await CouchDBStore.open(couchdb_url, name)
    rev1 = await first.put({"_id": "kept"})
    await first.aclose()
    again = await CouchDBStore.open(couchdb_url, name)
    try:
        assert (await again.get("kept"))["_rev"] == rev1
    finally:
        await again.aclose()


async def test_two_clients_share_a_database(couchdb_url):
    name = fresh_name()
    one = await CouchDBStore.open(couchdb_url, name)
    two = await CouchDBStore.open(couchdb_url, name)
    try:
        rev1 = await one.put({"_id": "shared", "by": "one"})
        assert (await two.get("shared"))["by"] == "one"
        rev2 = await two.put({"_id": "shared", "_rev": rev1, "by": "two"})
        assert (await one.get("shared"))["_rev"] == rev2

        since = (await one.changes(0)).last_seq
        woke = trio.Event()

        async def wait_on_one():
            await one.wait_for_change(since)
            woke.set()

        with trio.fail_after(HANG_GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait_on_one)
                await trio.testing.wait_all_tasks_blocked()
                assert not woke.is_set()
                await two.put({"_id": "from-two"})
                await woke.wait()
        assert [c.id for c in (await one.changes(since)).results] == ["from-two"]
    finally:
        await one.aclose()
        await two.aclose()


async def test_local_docs_are_replaced_whoever_wrote_them_last(couchdb_url):
    """CouchDB wants a local doc's current `_rev` to replace it; the store hides that, even
    when another client changed it since (so its remembered rev is stale)."""
    name = fresh_name()
    one = await CouchDBStore.open(couchdb_url, name)
    two = await CouchDBStore.open(couchdb_url, name)
    try:
        await one.put_local("checkpoint", {"seq": 1})
        await two.put_local("checkpoint", {"seq": 2})  # never saw it: no rev to send
        await one.put_local("checkpoint", {"seq": 3})  # its remembered rev is stale now
        assert (await two.get_local("checkpoint"))["seq"] == 3
        await two.delete_local("checkpoint")
        await one.put_local("checkpoint", {"seq": 4})  # deleted meanwhile: made anew
        assert (await two.get_local("checkpoint"))["seq"] == 4
        await one.delete_local("checkpoint")
        with pytest.raises(NotFound):
            await two.delete_local("checkpoint")
    finally:
        await one.aclose()
        await two.aclose()


async def test_design_documents_on_the_server_are_left_out(couchdb_url):
    name = fresh_name()
    store = await CouchDBStore.open(couchdb_url, name)
    try:
        await store.put({"_id": "doc"})
        async with httpx.AsyncClient(base_url=couchdb_url) as client:
            made = await client.put(f"/{name}/_design/views", json={"views": {}})
            assert made.status_code == 201
        assert [d["_id"] for d in await store.all_docs()] == ["doc"]
        assert [c.id for c in (await store.changes(0)).results] == ["doc"]
        assert (await store.info())["doc_count"] == 1
        with pytest.raises(BadRequest):
            await store.get("_design/views")
    finally:
        await store.aclose()


async def test_wait_for_change_outlives_quiet_periods(couchdb_url, monkeypatch):
    """The longpoll request stays open on heartbeats: a quiet feed is not a dead server."""
    monkeypatch.setattr(couchdb, "HEARTBEAT_MS", 100)  # read timeout 0.3 s, heartbeats 0.1 s
    name = fresh_name()
    store = await CouchDBStore.open(couchdb_url, name)
    try:
        since = (await store.changes(0)).last_seq
        woke = trio.Event()

        async def waiter():
            await store.wait_for_change(since)
            woke.set()

        with trio.fail_after(HANG_GUARD):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiter)
                await trio.sleep(1)  # several heartbeats, longer than the read timeout
                assert not woke.is_set()
                await store.put({"_id": "late"})
                await woke.wait()
    finally:
        await store.aclose()


async def test_unreachable_server_is_unavailable_and_named():
    url = f"http://127.0.0.1:{closed_port()}"
    with trio.fail_after(HANG_GUARD):
        with pytest.raises(Unavailable) as caught:
            await CouchDBStore.open(url, "anything")
    assert url in caught.value.reason


async def test_a_server_that_goes_away_is_unavailable():
    with running_pouchdb_server() as url:
        store = await CouchDBStore.open(url, "going")
        await store.put({"_id": "doc"})
    try:
        with trio.fail_after(HANG_GUARD):
            with pytest.raises(Unavailable) as caught:
                await store.get("doc")
        assert url in caught.value.reason
    finally:
        await store.aclose()


async def test_credentials_are_sent_and_never_shown(couchdb_url):
    """pouchdb-server lets anonymous clients in but checks credentials that are sent."""
    host = urlsplit(couchdb_url).netloc.rpartition("@")[2]  # without a user of its own
    with pytest.raises(Unavailable) as caught:
        await CouchDBStore.open(f"http://nobody:s3cret-pw@{host}", fresh_name())
    assert "user and password" in caught.value.reason
    assert "s3cret-pw" not in caught.value.reason and host in caught.value.reason


async def test_aclose_closes_every_connection(couchdb_url):
    port = int(couchdb_url.rsplit(":", 1)[1])
    before = established_sockets(port)
    store = await CouchDBStore.open(couchdb_url, fresh_name())
    async with trio.open_nursery() as nursery:  # several requests at once: several sockets
        for i in range(4):
            nursery.start_soon(store.put, {"_id": f"d{i}"})
    assert established_sockets(port) - before
    await store.aclose()
    assert not established_sockets(port) - before
    with pytest.raises(StoreError):
        await store.get("d0")
    await store.aclose()  # idempotent


@pytest.mark.parametrize(
    "url, db_name, revs_limit",
    [
        pytest.param("ftp://me:pw-secret@127.0.0.1:5984", "db", 1000, id="scheme"),
        pytest.param("http://me:pw-secret@", "db", 1000, id="no-host"),
        pytest.param("http://me:pw-secret@127.0.0.1:99999", "db", 1000, id="port"),
        pytest.param("http://127.0.0.1:5984", "Upper", 1000, id="db-upper"),
        pytest.param("http://127.0.0.1:5984", "_users", 1000, id="db-underscore"),
        pytest.param("http://127.0.0.1:5984", "db", 0, id="revs-limit-0"),
        pytest.param("http://127.0.0.1:5984", "db", True, id="revs-limit-bool"),
    ],
)
async def test_bad_open_arguments_are_bad_requests(url, db_name, revs_limit):
    with pytest.raises(BadRequest) as caught:
        await CouchDBStore.open(url, db_name, revs_limit=revs_limit)
    assert "pw-secret" not in caught.value.reason


@pytest.mark.parametrize("section, compresses", [
    ({}, "compression_level 8, the default types"),  # unset: CouchDB's default level, 8
    ({"compression_level": ""}, "compression_level 8, the default types"),  # empty: unset
    ({"compression_level": "fast"}, "compression_level 8, the default types"),  # unreadable
    ({"compression_level": "\u0660"}, "compression_level 8, the default types"),  # not ASCII
    ({"compression_level": "1", "compressible_types": "text/*"}, "compression_level 1, text/*"),
    ({"compression_level": "0"}, None),
    ({"compression_level": " 0 ", "compressible_types": "text/*"}, None),
])
def test_what_an_attachments_section_compresses(section, compresses):
    """Apache CouchDB reads `compression_level` as an integer, and one unset, empty or
    unreadable as its default, 8: only a level that reads as 0 turns compression off."""
    assert couchdb._compression(section) == compresses


async def test_a_server_that_compresses_attachments_is_refused_with_the_fix(couchdb_url):
    """Apache CouchDB stores the attachments of its `[attachments] compressible_types`
    (text/*, JSON... by default, also when that setting is unset or empty) gzip-encoded
    unless `compression_level` is 0, and gives them the digest of the compressed bytes: no
    other node could check such a file, and its sync to peers failed ("digest mismatch").
    Opening a store on such a server is refused, naming the setting and how to turn it off;
    a server that does not compress (pouchdb-server, a CouchDB set so) opens."""
    async with httpx.AsyncClient(base_url=couchdb_url) as http:
        section = "/_node/_local/_config/attachments"
        before = await http.get(section)
        if before.status_code != 200:  # a server that never compresses: nothing to refuse
            store = await CouchDBStore.open(couchdb_url, fresh_name())
            await store.aclose()
            return
        level = f"{section}/compression_level"
        try:
            for value in ("8", "1"):
                assert (await http.put(level, json=value)).status_code == 200
                with pytest.raises(StoreError, match="compression_level") as refused:
                    await CouchDBStore.open(couchdb_url, fresh_name())
                assert f"compression_level {value}" in str(refused.value)
            assert (await http.put(level, json="0")).status_code == 200
            store = await CouchDBStore.open(couchdb_url, fresh_name())
            await store.aclose()
        finally:
            old = before.json().get("compression_level")
            if old is None:
                await http.delete(level)
            else:
                await http.put(level, json=old)


# -- staged chunks of a transfer cut for good ---------------------------------------------


async def test_staged_chunks_a_cut_transfer_left_go_once_older_than_the_resume_window(couchdb_url):
    """A transfer cut for good (its node killed mid-way, nothing released) leaves staged
    chunks; the store finds them again after a restart and removes them once unused for the
    resume window, but not a chunk a transfer of this process holds."""
    name = fresh_name()
    store = await CouchDBStore.open(couchdb_url, name)
    cut = await store.stage_chunks([b"first piece", b"second piece"])
    await store.aclose()  # killed: nothing is released
    store = await CouchDBStore.open(couchdb_url, name)
    try:
        assert await store.expire_staged(older_than=3600) == 0  # within the window: kept
        assert await store.claim_chunks(cut) == set(cut)  # (a resume finds them)
        await store.release_chunks(cut, keep_staged=True)  # and is cut again
        [held] = await store.stage_chunks([b"a transfer still running"])
        await trio.sleep(0.05)
        assert await store.expire_staged(older_than=0.01) == len(cut)
        await assert_not_staged(store, cut)
        assert await store.read_staged_chunk(held) == b"a transfer still running"
        await store.release_chunks([held], keep_staged=True)  # it stops, to resume
        assert await store.expire_staged(older_than=0) == 1  # it did not, in time
        with pytest.raises(NotFound):
            await store.read_staged_chunk(held)
        assert await store.expire_staged(older_than=0) == 0
        listed = (await server_get(couchdb_url, f"/{name}/_local_docs")).json()["rows"]
        assert not [row["id"] for row in listed if row["id"].startswith(
            ("_local/plugshare-chunk-", "_local/plugshare-staging-"))]  # the records go too
    finally:
        await store.aclose()


async def test_a_transfer_that_finishes_leaves_no_staging_record(couchdb_url):
    """Records are for what a crash leaves: a transfer released in this process removes its
    own, so the next expiry has no stale record to look through for each chunk it staged."""
    name = fresh_name()
    store = await CouchDBStore.open(couchdb_url, name)
    try:
        first = await store.stage_chunks([b"one", b"two"])
        second = await store.stage_chunks([b"three"])
        assert await store.claim_chunks(first[:1]) == set(first[:1])  # a second transfer
        await store.release_chunks(first + second)
        assert await store.read_staged_chunk(first[0]) == b"one"  # the second holds it
        await store.release_chunks(first[:1])
        listed = (await server_get(couchdb_url, f"/{name}/_local_docs")).json()["rows"]
        assert not [row["id"] for row in listed if row["id"].startswith(
            ("_local/plugshare-chunk-", "_local/plugshare-staging-"))], listed
    finally:
        await store.aclose()


@pytest.mark.parametrize("bound", ["MAX_STAGING_RECORDS", "MAX_NAMED_CHUNKS"])
async def test_an_expiry_looks_at_a_bounded_number_of_staging_records(couchdb_url, monkeypatch,
                                                                       caplog, bound):
    """Whoever can write the database can add staging records without end, or records that
    name many chunks: one expiry reads a bounded number, says so, and the next goes on."""
    monkeypatch.setattr(couchdb, "RECORDS_PAGE", 2)
    monkeypatch.setattr(couchdb, bound, 4)
    name = fresh_name()
    store = await CouchDBStore.open(couchdb_url, name)
    staged = [(await store.stage_chunks([f"piece {i}".encode()]))[0] for i in range(7)]
    await store.aclose()  # killed: seven records, nothing released
    store = await CouchDBStore.open(couchdb_url, name)
    try:
        await trio.sleep(0.01)
        assert await store.expire_staged(older_than=0) == 4
        assert "staging records or" in caplog.text and "expiring among the first" in caplog.text
        assert await store.expire_staged(older_than=0) == 3
        await assert_not_staged(store, staged)
    finally:
        await store.aclose()


async def test_chunks_staged_again_after_a_restart_replace_what_was_left(couchdb_url):
    """Staged in one `_bulk_docs`: a chunk a crashed process left (its rev unknown here) or
    one altered in the database is written again by itself, and the transfer goes on."""
    name = fresh_name()
    store = await CouchDBStore.open(couchdb_url, name)
    left = await store.stage_chunks([b"left behind", b"altered"])
    await store.aclose()  # killed
    async with httpx.AsyncClient(base_url=couchdb_url) as http:
        path = f"/{name}/_local/plugshare-chunk-{left[1].hex()}"
        doc = (await http.get(path)).json()
        doc["data"] = "dGFtcGVyZWQ="  # "tampered"
        assert (await http.put(path, json=doc)).status_code in (200, 201)
    store = await CouchDBStore.open(couchdb_url, name)
    try:
        again = await store.stage_chunks([b"left behind", b"altered", b"new"])
        assert again[:2] == left
        assert [await store.read_staged_chunk(d) for d in again] == [
            b"left behind", b"altered", b"new"]
        await store.release_chunks(again)
        await assert_not_staged(store, again)
    finally:
        await store.aclose()


async def test_staging_records_not_as_the_store_writes_them_are_ignored(couchdb_url, caplog):
    """Whoever can write the database may add records: one dated in the future (which would
    keep a chunk, or itself, for ever) or malformed counts for nothing, said in one line."""
    name = fresh_name()
    store = await CouchDBStore.open(couchdb_url, name)
    try:
        [digest] = await store.stage_chunks([b"cut"])
        await store.release_chunks([digest], keep_staged=True)
        async with httpx.AsyncClient(base_url=couchdb_url) as http:
            for i, body in enumerate([{"at": 1e12, "chunks": [digest.hex()]},
                                      {"at": "yesterday", "chunks": []},
                                      {"at": 1.0, "chunks": ["not hex"]}]):
                answer = await http.put(f"/{name}/_local/plugshare-staging-forged{i}", json=body)
                assert answer.status_code in (200, 201), answer.text
        await trio.sleep(0.01)
        assert await store.expire_staged(older_than=0) == 1
        with pytest.raises(NotFound):
            await store.read_staged_chunk(digest)
        said = [r.getMessage() for r in caplog.records if "malformed staging" in r.getMessage()]
        assert len(said) == 1 and "ignoring 3 " in said[0], said
    finally:
        await store.aclose()


async def _staging_record_ids(http: httpx.AsyncClient, name: str) -> list[str]:
    start = "_local/plugshare-staging-"
    answer = await http.get(f"/{name}/_local_docs", params={
        "startkey": f'"{start}"', "endkey": f'"{start}\uffff"'})
    assert answer.status_code == 200, answer.text
    return [row["id"] for row in answer.json()["rows"]]


async def test_chunks_staged_with_no_record_expire_one_window_after_expiry_finds_them(
        couchdb_url):
    """A chunk no staging record names (staged before the store wrote records, or by
    someone else with access to the database) is not kept for ever: expiry dates it from
    when it first finds it, and removes it one resume window later."""
    name = fresh_name()
    store = await CouchDBStore.open(couchdb_url, name)
    try:
        old = await store.stage_chunks([b"left before records existed", b"another"])
        await store.release_chunks(old, keep_staged=True)
        async with httpx.AsyncClient(base_url=couchdb_url) as http:
            for local_id in await _staging_record_ids(http, name):
                rev = (await http.get(f"/{name}/{local_id}")).json()["_rev"]
                gone = await http.delete(f"/{name}/{local_id}", params={"rev": rev})
                assert gone.status_code == 200, gone.text
            assert await store.expire_staged(older_than=3600) == 0
            assert await store.read_staged_chunk(old[0]) == b"left before records existed"
            assert len(await _staging_record_ids(http, name)) == 1  # found, and dated
            assert await store.expire_staged(older_than=3600) == 0  # dated once, not again
            assert len(await _staging_record_ids(http, name)) == 1
        await trio.sleep(0.01)
        assert await store.expire_staged(older_than=0) == 2
        await assert_not_staged(store, old)
    finally:
        await store.aclose()


async def test_a_record_naming_more_chunks_than_the_store_writes_is_ignored(couchdb_url,
                                                                            caplog):
    """The store writes at most RECORD_CHUNKS chunks per record (a claim of more takes
    several): a record naming more was not written by it, and is not held in memory."""
    name = fresh_name()
    store = await CouchDBStore.open(couchdb_url, name)
    try:
        many = [hashlib.sha256(b"%d" % i).hexdigest()
                for i in range(couchdb.RECORD_CHUNKS + 1)]
        async with httpx.AsyncClient(base_url=couchdb_url) as http:
            answer = await http.put(f"/{name}/_local/plugshare-staging-forged",
                                    json={"at": 1.0, "chunks": many})
            assert answer.status_code in (200, 201), answer.text
        assert await store.expire_staged(older_than=0) == 0
        said = [r.getMessage() for r in caplog.records if "malformed staging" in r.getMessage()]
        assert len(said) == 1 and "ignoring 1 " in said[0], said
        pieces = [b"piece %d" % i for i in range(couchdb.RECORD_CHUNKS + 3)]
        staged = await store.stage_chunks(pieces)  # split over several records of its own
        await store.release_chunks(staged, keep_staged=True)
        await trio.sleep(0.01)
        assert await store.expire_staged(older_than=0) == len(pieces)
    finally:
        await store.aclose()


async def test_a_resume_finds_the_chunks_left_staged_in_one_listing(couchdb_url):
    """A transfer resumed after a crash asks which of its chunks are staged already: one
    `_local_docs` request per page of them, not a read per chunk (4,096 for a 1 GiB file)."""
    name = fresh_name()
    store = await CouchDBStore.open(couchdb_url, name)
    left = await store.stage_chunks([f"piece {i}".encode() for i in range(40)])
    await store.aclose()  # killed
    with running_couch_proxy(couchdb_url) as proxy:
        store = await CouchDBStore.open(proxy.url, name)
        try:
            asked = left + [hashlib.sha256(b"never staged").digest()]
            before = len(proxy.requests)
            assert await store.claim_chunks(asked) == set(left)
            made = proxy.requests[before:]
            reads = [path for method, path in made if method == "GET" and "plugshare-chunk-" in path]
            assert not reads, reads[:3]
            await store.release_chunks(left)  # known revs: released in one request
            await assert_not_staged(store, left)
        finally:
            await store.aclose()


async def test_expiry_removes_the_chunks_a_crash_left_in_a_few_requests(couchdb_url):
    """The chunks and records a killed transfer left are looked up and deleted a page at a
    time, not with a read and a delete each (8,192 requests for a 1 GiB file)."""

    name = fresh_name()
    store = await CouchDBStore.open(couchdb_url, name)
    left = await store.stage_chunks([f"piece {i}".encode() for i in range(40)])
    await store.aclose()  # killed
    await trio.sleep(0.01)
    with running_couch_proxy(couchdb_url) as proxy:
        store = await CouchDBStore.open(proxy.url, name)
        try:
            before = len(proxy.requests)
            assert await store.expire_staged(older_than=0) == len(left)
            made = proxy.requests[before:]
            assert len(made) <= 6, made[:12]
            await assert_not_staged(store, left)
            assert await store.expire_staged(older_than=0) == 0  # the records went too
        finally:
            await store.aclose()


async def test_an_answer_that_never_ends_is_cut_at_the_cap_and_the_store_goes_on(couchdb_url):
    # Whatever answers for the server (a proxy, a compromised node) may send a body without
    # end: the store stops reading it at MAX_RESPONSE_BYTES instead of holding it all.
    with running_couch_proxy(couchdb_url) as proxy:
        store = await CouchDBStore.open(proxy.url, fresh_name())
        try:
            rev = await store.put({"_id": "kept", "n": 1})
            proxy.endless_answers = 1
            with trio.fail_after(HANG_GUARD):
                with pytest.raises(StoreError, match=f"more than {couchdb.MAX_RESPONSE_BYTES} bytes"):
                    await store.get("kept")
                assert await store.get("kept") == {"_id": "kept", "_rev": rev, "n": 1}
        finally:
            await store.aclose()


async def test_a_document_over_the_answer_cap_is_a_clear_error_and_the_others_are_served(
        couchdb_url, monkeypatch):
    # Whoever can write the database can make a document as large as the server takes; a
    # read of it over the cap (lowered here) fails, naming the request, and nothing else does.
    monkeypatch.setattr(couchdb, "MAX_RESPONSE_BYTES", 64 * 1024)
    name = fresh_name()
    store = await CouchDBStore.open(couchdb_url, name)
    try:
        async with httpx.AsyncClient(base_url=couchdb_url) as client:
            put = await client.put(f"/{name}/huge", json={"pad": "x" * 200_000})
            assert put.status_code == 201
        with pytest.raises(StoreError, match="more than 65536 bytes") as refused:
            await store.get("huge")
        assert "GET /huge" in str(refused.value)
        rev = await store.put({"_id": "small", "n": 1})
        assert await store.get("small") == {"_id": "small", "_rev": rev, "n": 1}
    finally:
        await store.aclose()


async def test_pages_of_documents_over_the_answer_cap_are_read_in_parts(couchdb_url, monkeypatch):
    # Twelve docs of 20 KB: any page of four or more is over the (lowered) cap; every read
    # of them still answers, asking for fewer at a time.
    monkeypatch.setattr(couchdb, "MAX_RESPONSE_BYTES", 64 * 1024)
    store = await CouchDBStore.open(couchdb_url, fresh_name())
    try:
        revs = {}
        for i in range(12):
            revs[f"d{i:02d}"] = await store.put({"_id": f"d{i:02d}", "pad": "x" * 20_000})
        got = await store.bulk_get(list(revs.items()))
        assert {doc["_id"]: doc["_rev"] for doc in got} == revs
        winners = await store.winners(list(revs))
        assert {doc_id: doc["_rev"] for doc_id, doc in winners.items()} == revs
        assert [doc["_id"] for doc in await store.all_docs()] == sorted(revs)
    finally:
        await store.aclose()


async def test_a_staging_record_deleted_between_two_pages_does_not_hide_the_next(couchdb_url,
                                                                                 monkeypatch):
    """Listing local docs a page at a time, the next page starts at the last id seen: with
    `skip=1` past it, a record deleted meanwhile (a transfer released elsewhere) made the
    listing skip the record after it, which then outlived that expiry."""
    monkeypatch.setattr(couchdb, "RECORDS_PAGE", 2)
    name = fresh_name()
    store = await CouchDBStore.open(couchdb_url, name)
    for i in range(5):
        await store.stage_chunks([f"piece {i}".encode()])
    await store.aclose()  # killed: five records, nothing released
    store = await CouchDBStore.open(couchdb_url, name)
    listed = store._local_docs

    async def then_delete_the_last(action, **kwargs):
        rows = await listed(action, **kwargs)
        if kwargs.get("params", {}).get("include_docs") and not deleted and rows:
            deleted.append(rows[-1]["id"])  # the first page's last record goes now
            async with httpx.AsyncClient(base_url=couchdb_url) as client:
                path = f"/{name}/{quote(rows[-1]['id'], safe='/')}"
                gone = await client.delete(path, params={"rev": rows[-1]["value"]["rev"]})
                assert gone.status_code in (200, 201), gone.text
        return rows

    deleted: list[str] = []
    store._local_docs = then_delete_the_last
    try:
        await trio.sleep(0.01)
        # every record was listed, the one deleted after it was read included: all five
        # chunks go in this pass (skipping past the deleted id hid the one after it: four)
        assert await store.expire_staged(older_than=0) == 5
        assert len(deleted) == 1
    finally:
        await store.aclose()
