"""Staged chunks in the store contract: what a resumable incoming attachment transfer
holds on to (`claim_chunks`, `stage_chunks`, `read_staged_chunk`, `release_chunks`).

On every backend; on CouchDB only chunks staged by a transfer are found held (its own
attachments are not chunk-addressed)."""

import hashlib

import pytest
import trio

from plugshare.store.attachments import CHUNK_SIZE
from plugshare.store.base import BadRequest, NotFound
from plugshare.store.sqlite import SQLiteStore
from tests.store.test_attachments import md5_digest, put_doc_with_file, random_bytes


@pytest.fixture
async def sqlite_store(tmp_path):
    store = await SQLiteStore.open(tmp_path / "store.sqlite")
    try:
        yield store
    finally:
        await store.aclose()


def pieces(data: bytes) -> list[bytes]:
    return [data[i : i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)]


async def test_staged_chunks_survive_a_restart_and_feed_put_replicated(tmp_path):
    data = random_bytes(3 * CHUNK_SIZE + 17)
    path = tmp_path / "store.sqlite"
    store = await SQLiteStore.open(path)
    hashes = [hashlib.sha256(p).digest() for p in pieces(data)]
    assert await store.claim_chunks(hashes) == set()
    for piece in pieces(data)[:2]:
        assert await store.stage_chunks([piece]) == [hashlib.sha256(piece).digest()]
    await store.compact()  # staged chunks are no garbage
    await store.aclose()

    store = await SQLiteStore.open(path)  # a crash between chunks: they are still there
    try:
        assert await store.claim_chunks(hashes) == set(hashes[:2])
        assert await store.stage_chunks(pieces(data)[2:]) == hashes[2:]

        async def staged():
            for digest in hashes:
                yield await store.read_staged_chunk(digest)

        doc = {"_id": "d", "_rev": "1-" + "a" * 32, "_revisions": {"start": 1, "ids": ["a" * 32]},
               "_attachments": {"f": {"follows": True, "content_type": "x/y", "length": len(data),
                                      "digest": md5_digest(data), "revpos": 1}}}
        await store.put_replicated(doc, {"f": staged()})
        await store.release_chunks(hashes)
        _, body = await store.open_attachment("d", "f")
        assert b"".join([p async for p in body]) == data
        await store.compact()
        assert (await store.info())["attachment_chunks"] == len(hashes)  # held by the doc
    finally:
        await store.aclose()


async def test_staged_chunks_feed_put_replicated_then_go_when_released(store):
    data = random_bytes(2 * CHUNK_SIZE + 3, seed=5)
    hashes = [hashlib.sha256(p).digest() for p in pieces(data)]
    assert await store.stage_chunks(pieces(data)[:1]) == hashes[:1]
    assert await store.claim_chunks(hashes) == {hashes[0]}  # a cut transfer's, found again
    assert await store.stage_chunks(pieces(data)[1:]) == hashes[1:]

    async def staged():
        for digest in hashes:
            yield await store.read_staged_chunk(digest)

    doc = {"_id": "d", "_rev": "1-" + "b" * 32, "_revisions": {"start": 1, "ids": ["b" * 32]},
           "_attachments": {"f": {"follows": True, "content_type": "x/y", "length": len(data),
                                  "digest": md5_digest(data), "revpos": 1}}}
    await store.put_replicated(doc, {"f": staged()})
    await store.release_chunks(hashes)
    _, body = await store.open_attachment("d", "f")
    assert b"".join([p async for p in body]) == data
    with pytest.raises(NotFound):
        await store.read_staged_chunk(hashes[1])


async def test_a_released_chunk_no_attachment_holds_is_removed(store):
    [digest] = await store.stage_chunks([b"lonely"])
    await store.release_chunks([digest])
    with pytest.raises(NotFound):
        await store.read_staged_chunk(digest)
    assert await store.claim_chunks([digest]) == set()


async def test_a_chunk_two_transfers_hold_stays_staged_until_both_release_it(store):
    """Two revisions carrying the same file are fetched at once (or one revision from two
    peers): the transfer that gives up first must not take the chunk from under the other."""
    [digest] = await store.stage_chunks([b"a shared piece"])  # the first transfer stages it
    assert await store.claim_chunks([digest]) == {digest}  # the second finds it held
    await store.release_chunks([digest])  # the first gives up
    assert await store.read_staged_chunk(digest) == b"a shared piece"
    await store.release_chunks([digest])  # the second is done with it
    with pytest.raises(NotFound):
        await store.read_staged_chunk(digest)


async def test_a_chunk_staged_twice_by_one_transfer_is_held_until_released_twice(store):
    digests = await store.stage_chunks([b"zeros", b"zeros"])  # a file that repeats itself
    assert digests == [hashlib.sha256(b"zeros").digest()] * 2
    await store.release_chunks(digests[:1])
    assert await store.read_staged_chunk(digests[0]) == b"zeros"
    await store.release_chunks(digests[1:])
    with pytest.raises(NotFound):
        await store.read_staged_chunk(digests[0])


async def test_staged_chunks_of_a_cut_transfer_go_once_older_than_the_resume_window(tmp_path):
    """A transfer cut for good (its node killed, then the share left or the read never made
    again) released nothing: its chunks stay for it to resume, but not forever."""
    path = tmp_path / "store.sqlite"
    store = await SQLiteStore.open(path)
    held_data = random_bytes(CHUNK_SIZE, seed=21)
    await put_doc_with_file(store, "d", data=held_data)  # a chunk an attachment holds too
    cut = pieces(random_bytes(3 * CHUNK_SIZE, seed=22))
    staged = await store.stage_chunks(cut + [held_data])
    await store.aclose()  # killed: nothing is released
    store = await SQLiteStore.open(path)
    try:
        assert await store.expire_staged(older_than=3600) == 0  # within the window: kept
        assert await store.claim_chunks(staged) == set(staged)  # (a resume finds them)
        await store.release_chunks(staged)  # that resume gives up, in this process
        staged = await store.stage_chunks(cut + [held_data])
        await store.aclose()
        store = await SQLiteStore.open(path)
        packs = tmp_path / "store.sqlite-chunks"
        assert len(list(packs.iterdir())) == 2  # the upload's (and first staging's), the cut's
        await trio.sleep(0.01)
        assert await store.expire_staged(older_than=0.005) == len(cut)  # chunks removed
        for digest in staged:
            with pytest.raises(NotFound):
                await store.read_staged_chunk(digest)
        _, body = await store.open_attachment("d", "file.bin")  # the held one stays
        assert b"".join([p async for p in body]) == held_data
        assert (await store.info())["attachment_chunks"] == 1
        assert len(list(packs.iterdir())) == 1  # the cut transfer's pack is reclaimed
        assert await store.expire_staged(older_than=0) == 0
    finally:
        await store.aclose()


async def test_the_resume_window_counts_from_a_staged_chunks_last_claim(store):
    """The window is measured from a chunk's last use: a resume claims it anew."""
    [digest] = await store.stage_chunks([b"old"])
    await store.release_chunks([digest], keep_staged=True)  # to be tried again
    await trio.sleep(0.3)
    assert await store.claim_chunks([digest]) == {digest}  # a resume, just now
    await store.release_chunks([digest], keep_staged=True)
    assert await store.expire_staged(older_than=0.2) == 0
    assert await store.read_staged_chunk(digest) == b"old"


async def test_a_chunk_a_transfer_of_this_process_holds_never_expires(sqlite_store):
    """A transfer longer than the window keeps the chunks it staged first."""
    [digest] = await sqlite_store.stage_chunks([b"first of many"])
    await trio.sleep(0.01)
    assert await sqlite_store.expire_staged(older_than=0) == 0
    assert await sqlite_store.read_staged_chunk(digest) == b"first of many"
    await sqlite_store.release_chunks([digest], keep_staged=True)  # it stops, to resume
    assert await sqlite_store.expire_staged(older_than=0) == 1  # it did not, in time
    with pytest.raises(NotFound):
        await sqlite_store.read_staged_chunk(digest)


async def test_a_transfer_to_be_tried_again_keeps_its_chunks_staged(store):
    [digest] = await store.stage_chunks([b"resume me"])
    await store.release_chunks([digest], keep_staged=True)
    assert await store.claim_chunks([digest]) == {digest}  # the next attempt finds it
    await store.release_chunks([digest])  # and is done with it
    with pytest.raises(NotFound):
        await store.read_staged_chunk(digest)


async def test_claiming_a_chunk_an_attachment_holds_keeps_it_after_the_attachment_goes(sqlite_store):
    data = random_bytes(CHUNK_SIZE + 5, seed=3)
    _, rev = await put_doc_with_file(sqlite_store, "d", data=data)
    hashes = [hashlib.sha256(p).digest() for p in pieces(data)]
    assert await sqlite_store.claim_chunks(hashes) == set(hashes)
    await sqlite_store.delete("d", rev)  # the only content holding them goes
    await sqlite_store.compact()
    assert [await sqlite_store.read_staged_chunk(h) for h in hashes] == pieces(data)
    await sqlite_store.release_chunks(hashes)
    assert await sqlite_store.claim_chunks(hashes) == set()


async def test_chunk_addresses_are_the_sha256_of_each_chunk_when_the_backend_keeps_them(store):
    data = random_bytes(2 * CHUNK_SIZE + 9, seed=6)
    _, rev = await put_doc_with_file(store, "d", data=data)
    addresses = await store.chunk_addresses("d", "file.bin", rev)
    if store.backend == "sqlite":
        assert addresses == [hashlib.sha256(p).digest() for p in pieces(data)]
    else:
        assert addresses is None  # the caller hashes the data itself
    with pytest.raises(NotFound):
        await store.chunk_addresses("d", "nope", rev)


# -- where the embedded store keeps staged chunk data (issue 13's speed) -----------------------


def _sqlite_bytes(path) -> int:
    """The SQLite file and its WAL, in bytes."""
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists())


async def test_staged_chunk_data_is_written_once_to_an_append_only_pack_not_into_sqlite(tmp_path):
    """A transfer's chunks go to an append-only pack file (one write, one fsync per staged
    batch), not into SQLite rows (written to the WAL, then again to the file, each synced)."""
    path = tmp_path / "store.sqlite"
    store = await SQLiteStore.open(path)
    try:
        before = _sqlite_bytes(path)
        data = random_bytes(32 * CHUNK_SIZE, seed=11)
        hashes = await store.stage_chunks(pieces(data))
        assert _sqlite_bytes(path) - before < len(data) // 4
        packs = list((tmp_path / "store.sqlite-chunks").iterdir())
        assert sum(p.stat().st_size for p in packs) == len(data)
        assert [await store.read_staged_chunk(h) for h in hashes] == pieces(data)
        assert (await store.info())["attachment_bytes"] == len(data)
    finally:
        await store.aclose()
    store = await SQLiteStore.open(path)  # durable: found again after a restart
    try:
        assert await store.claim_chunks(hashes) == set(hashes)
        assert [await store.read_staged_chunk(h) for h in hashes] == pieces(data)
    finally:
        await store.aclose()


async def test_a_pack_whose_chunks_are_all_released_is_removed(tmp_path):
    path = tmp_path / "store.sqlite"
    store = await SQLiteStore.open(path)
    try:
        hashes = await store.stage_chunks(pieces(random_bytes(4 * CHUNK_SIZE, seed=12)))
    finally:
        await store.aclose()
    store = await SQLiteStore.open(path)  # a new pack for new chunks; the first is closed
    try:
        kept = await store.stage_chunks([b"kept"])
        assert len(list((tmp_path / "store.sqlite-chunks").iterdir())) == 2
        await store.release_chunks(hashes)
        assert len(list((tmp_path / "store.sqlite-chunks").iterdir())) == 1
        assert await store.read_staged_chunk(kept[0]) == b"kept"
    finally:
        await store.aclose()


def _follows(doc_id, gen_id, data):
    return {"_id": doc_id, "_rev": "1-" + gen_id * 32, "_revisions": {"start": 1, "ids": [gen_id * 32]},
            "_attachments": {"f": {"follows": True, "content_type": "x/y", "length": len(data),
                                   "digest": md5_digest(data), "revpos": 1}}}


async def test_a_revision_is_written_from_its_staged_chunks_in_a_few_commits(store):
    """Issue 13's speed: writing a fetched revision streamed every staged chunk back through
    `put_replicated` (hashed again, one commit per 4 MiB). `put_staged` links them where
    they are, checking the length and md5 digest; on every backend."""
    data = random_bytes(48 * CHUNK_SIZE + 5, seed=13)
    hashes = await store.stage_chunks(pieces(data))
    before = getattr(store, "commits", 0)
    await store.put_staged(_follows("d", "c", data), {"f": hashes})
    if store.backend == "sqlite":
        # the content, its links (per 256 chunks), its digest, the revision, the release:
        # put_replicated took 8 here (a commit per 16 chunks: 260 for a GiB, 20 now)
        assert store.commits - before <= 5
    await store.release_chunks(hashes)
    _, body = await store.open_attachment("d", "f")
    assert b"".join([p async for p in body]) == data
    assert (await store.get("d"))["_attachments"]["f"]["digest"] == md5_digest(data)


async def test_staged_chunks_that_do_not_make_the_declared_file_are_refused(store):
    data = random_bytes(3 * CHUNK_SIZE, seed=14)
    hashes = await store.stage_chunks(pieces(data))
    with pytest.raises(BadRequest, match="digest"):
        await store.put_staged(_follows("d", "e", data), {"f": [hashes[1], hashes[0], hashes[2]]})
    with pytest.raises(BadRequest):
        await store.put_staged(_follows("d", "e", data), {"f": hashes[:2]})
    with pytest.raises(NotFound):
        await store.get("d")
    await store.put_staged(_follows("d", "e", data), {"f": hashes})
    await store.release_chunks(hashes)


async def test_a_digest_computed_on_the_way_in_is_taken_and_still_checked(store, monkeypatch):
    """The fetcher hashes a file's chunks as they arrive in order: `put_staged` may take that
    md5 instead of reading the file back (the embedded store reads only the chunks' sizes),
    and still refuses one that is not the declared digest or chunks that are not a file."""
    from plugshare.store import chunks as chunk_rows

    data = random_bytes(9 * CHUNK_SIZE + 77, seed=15)
    hashes = await store.stage_chunks(pieces(data))
    reads = []
    read_staged = chunk_rows.read_staged
    monkeypatch.setattr(chunk_rows, "read_staged",
                        lambda *args: reads.append(args[-1]) or read_staged(*args))
    if store.backend == "sqlite":  # a store that hashes the file itself need not take it
        wrong = md5_digest(b"another file")
        with pytest.raises(BadRequest, match="digest"):
            await store.put_staged(_follows("d", "b", data), {"f": hashes},
                                   digests={"f": wrong})
    with pytest.raises(BadRequest):  # the sizes still count: one chunk short
        await store.put_staged(_follows("d", "b", data), {"f": hashes[:-1]},
                               digests={"f": md5_digest(data)})
    with pytest.raises(NotFound):
        await store.get("d")
    await store.put_staged(_follows("d", "b", data), {"f": hashes},
                           digests={"f": md5_digest(data)})
    if store.backend == "sqlite":
        assert reads == []  # the file was not read back to be hashed again
    await store.release_chunks(hashes)
    _, body = await store.open_attachment("d", "f")
    assert b"".join([p async for p in body]) == data
    assert (await store.get("d"))["_attachments"]["f"]["digest"] == md5_digest(data)


async def test_addresses_the_caller_checked_are_taken_not_hashed_again(store, monkeypatch):
    """The fetcher checks each chunk's SHA-256 against the manifest as it arrives: staging
    takes those addresses instead of hashing every chunk a second time."""
    import hashlib as real_hashlib

    from plugshare.store import chunks as chunk_rows
    from plugshare.store import couchdb as couch_rows

    data = pieces(random_bytes(3 * CHUNK_SIZE, seed=31))
    addresses = [real_hashlib.sha256(p).digest() for p in data]
    with pytest.raises(BadRequest, match="one SHA-256 per chunk"):
        await store.stage_chunks(data, checked=addresses[:2])
    with pytest.raises(BadRequest, match="one SHA-256 per chunk"):
        await store.stage_chunks(data, checked=[a.hex() for a in addresses])
    hashed = []

    class CountingHashlib:
        @staticmethod
        def sha256(piece=b""):
            hashed.append(piece)
            return real_hashlib.sha256(piece)

    for module in (chunk_rows, couch_rows):
        monkeypatch.setattr(module, "hashlib", CountingHashlib)
    assert await store.stage_chunks(data, checked=addresses) == addresses
    assert hashed == []
    assert [await store.read_staged_chunk(a) for a in addresses[:2]] == data[:2]
    await store.release_chunks(addresses)
    hashed.clear()  # (a CouchDB-backed read checks what the database gave back)
    assert await store.stage_chunks(data[:1]) == addresses[:1]  # without: hashed here
    assert hashed == [data[0]]
    await store.release_chunks(addresses[:1])
