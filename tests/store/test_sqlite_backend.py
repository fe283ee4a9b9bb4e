"""What only the SQLite store does: its file (durability, WAL, one writer, bad files), its
integer sequences, and the CouchDB behaviours beyond the shared contract that it implements."""

import hashlib
import sqlite3
import sys
import textwrap
from contextlib import closing

import hypothesis.strategies as st
import pytest
import trio
import trio.testing
from hypothesis import given

from plugshare.store.base import BadRequest, NotFound, StoreError
from plugshare.store.revtree import history_of
from plugshare.store.sqlite import SQLiteStore
from tests.store.conftest import open_backend
from tests.store.test_contract import PROPERTY_SETTINGS, assert_store_matches_model, deliveries


def rev(pos: int, tag: str) -> str:
    return f"{pos}-{hashlib.md5(tag.encode()).hexdigest()}"


def replicated(doc_id, path, *, deleted=False, **body):
    doc = {"_id": doc_id, "_rev": path[0], "_revisions": history_of(path), **body}
    if deleted:
        doc["_deleted"] = True
    return doc


@pytest.fixture
async def path(tmp_path):
    return tmp_path / "store.sqlite"


@pytest.fixture
async def store(path):
    s = await SQLiteStore.open(path)
    try:
        yield s
    finally:
        await s.aclose()


async def snapshot(store):
    """Everything a reader can see of the store."""
    changes = (await store.changes(0)).results
    docs = {}
    for change in changes:
        for leaf in change.revs:
            docs[(change.id, leaf)] = await store.get(change.id, rev=leaf, revs=True)
    return changes, docs, await store.all_docs(), await store.info()


# -- the file ------------------------------------------------------------------------------------


async def test_everything_survives_close_and_reopen(path):
    store = await SQLiteStore.open(path)
    r1 = await store.put({"_id": "a", "v": 1})
    await store.put({"_id": "a", "_rev": r1, "v": 2})
    gone = await store.put({"_id": "gone"})
    await store.delete("gone", gone)
    await store.bulk_docs(
        [
            replicated("a", (rev(2, "remote"), r1), v="remote"),
            replicated("b", (rev(3, "c"), rev(2, "b"), rev(1, "a")), v="b"),
        ],
        new_edits=False,
    )
    await store.put_local("checkpoint", {"seq": 7})
    before = await snapshot(store)
    await store.aclose()

    store = await SQLiteStore.open(path)
    try:
        assert await snapshot(store) == before
        assert (await store.get_local("checkpoint"))["seq"] == 7
        last = before[0][-1].seq
        await store.put({"_id": "new"})
        [change] = (await store.changes(last)).results
        assert change.id == "new" and change.seq == last + 1  # seqs continue after reopen
    finally:
        await store.aclose()


CRASHING_WRITER = textwrap.dedent(
    """
    import os, sys, trio
    from plugshare.store.sqlite import SQLiteStore

    async def main():
        store = await SQLiteStore.open(sys.argv[1])
        rev = await store.put({"_id": "survivor", "v": 1})
        await store.put_local("checkpoint", {"seq": 1})
        print(rev, flush=True)
        os._exit(0)  # die without closing: only what reached the disk remains

    trio.run(main)
    """
)


async def test_a_write_is_on_disk_when_it_returns(path):
    done = await trio.run_process(
        [sys.executable, "-c", CRASHING_WRITER, str(path)], capture_stdout=True
    )
    written_rev = done.stdout.decode().strip()
    store = await SQLiteStore.open(path)
    try:
        assert await store.get("survivor") == {"_id": "survivor", "_rev": written_rev, "v": 1}
        assert (await store.get_local("checkpoint"))["seq"] == 1
    finally:
        await store.aclose()


async def test_the_file_is_in_wal_mode_with_full_sync(store, path):
    synchronous = await store._run(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0])
    assert synchronous == 2  # FULL: the WAL is synced at every commit
    await store.aclose()
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_only_one_store_may_open_the_file(path):
    first = await SQLiteStore.open(path)
    try:
        with pytest.raises(StoreError, match="another store has it open"):
            await SQLiteStore.open(path)
        probe = (
            "import sys, sqlite3; "
            "sqlite3.connect(sys.argv[1], timeout=0).execute('SELECT 1 FROM docs')"
        )
        other = await trio.run_process(
            [sys.executable, "-c", probe, str(path)], capture_stderr=True, check=False
        )
        assert other.returncode != 0 and b"locked" in other.stderr  # nor another process
    finally:
        await first.aclose()
    second = await SQLiteStore.open(path)  # free again once closed
    await second.aclose()


async def test_an_empty_file_becomes_a_new_store(path):
    path.write_bytes(b"")
    store = await SQLiteStore.open(path)
    try:
        await store.put({"_id": "a"})
        assert (await store.info())["doc_count"] == 1
    finally:
        await store.aclose()


def garbage_file(directory):
    path = directory / "store.sqlite"
    path.write_bytes(b"not a database " * 100)
    return path


def a_directory(directory):
    path = directory / "store.sqlite"
    path.mkdir()
    return path


def in_a_missing_directory(directory):
    return directory / "missing" / "store.sqlite"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (garbage_file, "file is not a database"),
        (a_directory, "it is a directory"),
        (in_a_missing_directory, "does not exist"),
    ],
)
async def test_unusable_paths_are_a_clear_store_error(tmp_path, make, message):
    with pytest.raises(StoreError, match=message):
        await SQLiteStore.open(make(tmp_path))


async def test_a_sqlite_file_of_another_program_is_refused(path):
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("CREATE TABLE songs (title TEXT)")
    with pytest.raises(StoreError, match="another program"):
        await SQLiteStore.open(path)
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:  # untouched
        assert conn.execute("SELECT count(*) FROM songs").fetchone() == (0,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)


async def test_a_store_of_another_schema_version_is_refused(path):
    store = await SQLiteStore.open(path)
    await store.aclose()
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="schema version 99"):
        await SQLiteStore.open(path)


async def make_store_with_docs(path, n=2000):
    store = await SQLiteStore.open(path)
    await store.bulk_docs([{"_id": f"d{i:05d}", "text": "x" * 500} for i in range(n)])
    await store.aclose()


async def test_a_truncated_file_is_a_clear_store_error(path):
    await make_store_with_docs(path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(StoreError, match="malformed"):
        await SQLiteStore.open(path)


async def test_corrupt_pages_are_a_clear_store_error(path):
    await make_store_with_docs(path)
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(b"\xa5" * 8192)
    store = await SQLiteStore.open(path)  # the first pages are intact
    try:
        with pytest.raises(StoreError, match="is corrupt"):
            await store.all_docs()
    finally:
        await store.aclose()


async def test_a_corrupt_record_is_a_clear_store_error(path):
    store = await SQLiteStore.open(path)
    await store.put({"_id": "tree"})
    await store.put({"_id": "bodies"})
    await store.put({"_id": "fine", "v": 1})
    await store.aclose()
    # 0xc1 is never valid msgpack
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("UPDATE docs SET tree = x'c1' WHERE id = 'tree'")
        conn.execute("UPDATE docs SET bodies = x'c1' WHERE id = 'bodies'")
    store = await SQLiteStore.open(path)
    try:
        with pytest.raises(StoreError, match="record of 'tree' .* is corrupt"):
            await store.get("tree", revs=True)
        with pytest.raises(StoreError, match="record of 'tree' .* is corrupt"):
            await store.put({"_id": "tree", "v": 2})
        with pytest.raises(StoreError, match="record of 'bodies' .* is corrupt"):
            await store.get("bodies")
        assert (await store.get("fine"))["v"] == 1
    finally:
        await store.aclose()


# -- lifecycle -----------------------------------------------------------------------------------


async def test_a_closed_store_refuses_work_and_close_is_idempotent(path):
    store = await SQLiteStore.open(path)
    await store.aclose()
    await store.aclose()
    with pytest.raises(StoreError, match="closed"):
        await store.get("a")
    with pytest.raises(StoreError, match="closed"):
        await store.put({"_id": "a"})


async def test_closing_wakes_a_waiter_with_an_error(path):
    store = await SQLiteStore.open(path)
    errors = []

    async def waiter():
        try:
            await store.wait_for_change(0)
        except StoreError as exc:
            errors.append(exc)

    with trio.fail_after(30):  # a hang guard, not a timing assertion
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            await store.aclose()
    assert len(errors) == 1 and "closed" in errors[0].reason


async def test_a_bad_revs_limit_is_a_bad_request(path):
    for bad in (0, -1, 2.5, "10", True):
        with pytest.raises(BadRequest, match="revs_limit"):
            await SQLiteStore.open(path, revs_limit=bad)


# -- sequences -------------------------------------------------------------------------------------


async def test_seqs_are_increasing_integers(store):
    for i in range(5):
        await store.put({"_id": f"d{i}"})
    d0 = await store.get("d0")
    await store.put({"_id": "d0", "_rev": d0["_rev"], "v": 2})
    page = await store.changes(0)
    seqs = [c.seq for c in page.results]
    assert all(type(s) is int for s in seqs) and seqs == sorted(set(seqs))
    assert page.last_seq == seqs[-1] == (await store.info())["update_seq"] == 6
    assert [c.id for c in (await store.changes("4")).results] == ["d4", "d0"]  # str seqs too


async def test_one_bulk_write_takes_consecutive_seqs(store):
    await store.put({"_id": "first"})
    await store.bulk_docs([{"_id": f"d{i}"} for i in range(10)])
    assert [c.seq for c in (await store.changes(1)).results] == list(range(2, 12))


async def test_bad_seqs_and_limits_are_bad_requests(store):
    for bad in (-1, "abc", 1.5, True, None, "-1"):
        with pytest.raises(BadRequest, match="invalid sequence"):
            await store.changes(bad)
        with pytest.raises(BadRequest, match="invalid sequence"):
            await store.wait_for_change(bad)
    for bad in (0, -5, 2.0, "3"):
        with pytest.raises(BadRequest, match="limit"):
            await store.changes(0, limit=bad)


# -- CouchDB behaviour beyond the shared contract --------------------------------------------------


async def test_deleting_a_losing_leaf_resolves_a_conflict(store):
    a, b, c = rev(1, "a"), rev(2, "b"), rev(2, "c")
    await store.bulk_docs(
        [replicated("doc", (b, a), v="b"), replicated("doc", (c, a), v="c")], new_edits=False
    )
    winner, loser = sorted([b, c], reverse=True)
    await store.delete("doc", loser)  # CouchDB's way to resolve: any leaf may be edited
    doc = await store.get("doc", conflicts=True)
    assert doc["_rev"] == winner and "_conflicts" not in doc


async def test_old_revision_bodies_are_not_kept(store):
    r1 = await store.put({"_id": "doc", "v": 1})
    r2 = await store.put({"_id": "doc", "_rev": r1, "v": 2})
    with pytest.raises(NotFound, match="not available"):
        await store.get("doc", rev=r1)
    assert await store.bulk_get([("doc", r1)]) == []
    assert (await store.get("doc", revs=True))["_revisions"]["ids"][1] == r1.partition("-")[2]
    assert await store.revs_diff({"doc": [r1, r2]}) == {}  # still known as history


async def test_a_history_contradicting_the_tree_is_refused(store):
    a, b, c = rev(1, "a"), rev(2, "b"), rev(3, "c")
    await store.bulk_docs([replicated("doc", (c, b, a), v="c")], new_edits=False)
    before = (await store.changes(0)).results
    forged = replicated("doc", (rev(4, "d"), c, rev(2, "x"), a), v="d")
    [result] = await store.bulk_docs([forged], new_edits=False)
    assert result["error"] == "bad_request" and "forged history" in result["reason"]
    assert (await store.changes(0)).results == before


async def test_a_replicated_history_longer_than_revs_limit_is_stemmed(path):
    store = await SQLiteStore.open(path, revs_limit=2)
    try:
        path4 = tuple(rev(i, f"r{i}") for i in range(4, 0, -1))
        await store.bulk_docs([replicated("doc", path4, v=4)], new_edits=False)
        assert (await store.get("doc", revs=True))["_revisions"] == history_of(path4[:2])
        assert await store.revs_diff({"doc": list(path4)}) == {
            "doc": {"missing": list(path4[2:]), "possible_ancestors": []}
        }
    finally:
        await store.aclose()


async def test_history_that_is_stemmed_away_again_is_no_change(path):
    store = await SQLiteStore.open(path, revs_limit=2)
    try:
        path4 = tuple(rev(i, f"r{i}") for i in range(4, 0, -1))
        await store.bulk_docs([replicated("doc", path4, v=4)], new_edits=False)
        last = (await store.changes(0)).last_seq
        # 3-r3 is known (its parent was stemmed): re-linking 2-r2 is stemmed away at once.
        [result] = await store.bulk_docs([replicated("doc", path4[1:3], v=3)], new_edits=False)
        assert result["ok"]
        assert (await store.changes(last)).results == []
    finally:
        await store.aclose()


async def test_a_path_bridging_two_pieces_of_a_tree_joins_them(store):
    # CouchDB joins them (key-tree merge, then stemming repairs the duplicate node);
    # pouchdb-server keeps 2-b as a leaf, which is why this is not in the shared contract.
    a, b, c, d = rev(1, "a"), rev(2, "b"), rev(3, "c"), rev(4, "d")
    for path in [(b, a), (d, c), (c, b)]:
        await store.bulk_docs([replicated("doc", path, v=path[0])], new_edits=False)
    [change] = (await store.changes(0)).results
    assert change.revs == (d,)
    assert (await store.get("doc", revs=True))["_revisions"] == history_of((d, c, b, a))


@PROPERTY_SETTINGS
@given(data=st.data())
async def test_random_truncated_histories_match_the_model(request, tmp_path, data):
    batches = data.draw(deliveries(partial=True))
    store = await open_backend("sqlite", request, tmp_path)  # a new file for each example
    try:
        await assert_store_matches_model(store, batches)
    finally:
        await store.aclose()


async def test_unicode_ids_and_bodies_round_trip(store):
    doc = {"_id": "café/☕/𝄞", "text": "zürich ✓ 𝄞", "nested": {"ключ": ["値", None, True]}}
    new_rev = await store.put(doc)
    assert await store.get(doc["_id"]) == {**doc, "_rev": new_rev}
    [change] = (await store.changes(0)).results
    assert change.id == doc["_id"]


async def test_a_bulk_call_stems_each_doc_once(store, monkeypatch):
    # Stemming walks the whole tree: once per doc per call, not once per revision in it.
    from plugshare.store.revtree import RevTree

    calls = []
    real_stem = RevTree.stem

    def counting_stem(tree, limit):
        calls.append(limit)
        return real_stem(tree, limit)

    monkeypatch.setattr(RevTree, "stem", counting_stem)
    root = rev(1, "root")
    batch = [replicated("doc", (rev(2, f"s{i}"), root)) for i in range(50)]
    batch += [replicated("other", (rev(1, "other"),))]
    results = await store.bulk_docs(batch, new_edits=False)
    assert all(r.get("ok") for r in results)
    assert len(calls) == 2
    calls.clear()
    first = await store.put({"_id": "edited"})
    edits = [{"_id": "edited", "_rev": first, "v": 1}]
    await store.bulk_docs(edits)
    assert len(calls) == 2  # put, then the one-doc bulk call


async def test_packs_mostly_dead_are_rewritten_and_their_space_given_back(path, monkeypatch):
    """Chunk data lives in append-only packs; a pack that keeps one live chunk kept all its
    dead ones' space for good (a user deleting most files got little disk back).
    `reclaim_space` moves the live chunks of packs less than half live into the current pack,
    in one transaction per pack, and the old packs go; every file still reads back."""
    from plugshare.store import packs as packs_module

    monkeypatch.setattr(packs_module, "PACK_SIZE", 1024 * 1024)  # 4 chunks a pack
    store = await SQLiteStore.open(path)
    try:
        files = {f"f{i:02}": bytes([i]) * (256 * 1024) for i in range(16)}  # a chunk each
        revs = {}
        for doc_id, data in files.items():
            async def one(data=data):
                yield data
            revs[doc_id] = await store.put_attachment(doc_id, None, "a.bin",
                                                      "application/octet-stream", one())
        directory = path.with_name(path.name + "-chunks")

        def pack_bytes() -> tuple[int, int]:
            found = [p for p in directory.iterdir() if p.name.startswith("pack-")]
            return len(found), sum(p.stat().st_size for p in found)

        count, size = pack_bytes()
        assert count >= 4 and size >= 16 * 256 * 1024, (count, size)
        kept = {doc_id for i, doc_id in enumerate(files) if i % 4 == 0}  # 1 in 4 stays
        for doc_id in files:
            if doc_id not in kept:
                await store.delete(doc_id, revs[doc_id])
        assert pack_bytes()[1] == size  # the dead chunks' bytes are still there
        freed = await store.reclaim_space()
        count_after, size_after = pack_bytes()
        assert freed > 0 and size_after <= size - freed, (freed, size, size_after)
        assert size_after <= 6 * 256 * 1024, (count_after, size_after)  # the 4 live ones, about
        for doc_id in kept:
            _, chunks = await store.open_attachment(doc_id, "a.bin")
            assert b"".join([piece async for piece in chunks]) == files[doc_id]
        assert await store.reclaim_space() == 0  # nothing left to do
    finally:
        await store.aclose()
    reopened = await SQLiteStore.open(path)  # and after a restart
    try:
        for doc_id in kept:
            _, chunks = await reopened.open_attachment(doc_id, "a.bin")
            assert b"".join([piece async for piece in chunks]) == files[doc_id]
    finally:
        await reopened.aclose()
