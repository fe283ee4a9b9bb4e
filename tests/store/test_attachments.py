"""Attachments in the store contract (`Store.put_attachment` and friends), on every backend:
real files streamed in and out, stubs, ranges, removal, replication from one store to
another, and bad input that must leave the previous revision untouched."""

import base64
import hashlib
import random

import pytest
import trio

from plugshare.store.attachments import CHUNK_SIZE
from plugshare.store.base import BadRequest, Conflict, NotFound, RangeNotSatisfiable
from tests.store.conftest import open_backend, proxy_of

KIB = 1024
MIB = 1024 * KIB


def md5_digest(data: bytes) -> str:
    return "md5-" + base64.b64encode(hashlib.md5(data).digest()).decode()


def random_bytes(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


async def stream(data: bytes, piece: int = 100 * KIB):
    """`data` as an upload arrives: in pieces of a size unrelated to the store's chunks."""
    for start in range(0, len(data), piece):
        await trio.lowlevel.checkpoint()
        yield data[start : start + piece]


async def read_all(chunks) -> bytes:
    out = bytearray()
    async for piece in chunks:
        out += piece
    return bytes(out)


async def put_doc_with_file(store, doc_id="doc", name="file.bin", data=b"hello", **fields):
    rev1 = await store.put({"_id": doc_id, **fields})
    rev2 = await store.put_attachment(doc_id, rev1, name, "application/x-test", stream(data))
    return rev1, rev2


async def feed_and_doc(store, doc_id):
    """What must not change when a write is refused: the doc as read, and its feed rows."""
    changes = await store.changes(0)
    rows = [(c.id, c.revs, c.deleted) for c in changes.results]
    return await store.get(doc_id, conflicts=True), rows


# -- round trip, stubs, removal ---------------------------------------------------------------


async def test_put_attachment_makes_a_revision_with_a_stub_and_streams_back(store):
    data = random_bytes(CHUNK_SIZE * 2 + 123)
    rev1, rev2 = await put_doc_with_file(store, title="scan", data=data)
    assert rev2.startswith("2-")
    doc = await store.get("doc")
    assert doc == {
        "_id": "doc", "_rev": rev2, "title": "scan",
        "_attachments": {"file.bin": {
            "content_type": "application/x-test", "length": len(data),
            "digest": md5_digest(data), "revpos": 2, "stub": True,
        }},
    }
    meta, chunks = await store.open_attachment("doc", "file.bin")
    assert (meta.name, meta.content_type, meta.length, meta.digest, meta.revpos) == (
        "file.bin", "application/x-test", len(data), md5_digest(data), 2
    )
    assert await read_all(chunks) == data
    # The same through the revision, and the doc's other reads show the stub too.
    meta, chunks = await store.open_attachment("doc", "file.bin", rev=rev2)
    assert await read_all(chunks) == data
    assert (await store.all_docs())[0]["_attachments"] == doc["_attachments"]
    assert (await store.winners(["doc"]))["doc"]["_attachments"] == doc["_attachments"]


async def test_an_empty_file_and_a_new_document_made_by_its_attachment(store):
    rev1 = await store.put_attachment("new", None, "empty.txt", "text/plain", stream(b""))
    assert rev1.startswith("1-")
    doc = await store.get("new")
    assert doc["_attachments"]["empty.txt"]["length"] == 0
    assert doc["_attachments"]["empty.txt"]["digest"] == md5_digest(b"")
    meta, chunks = await store.open_attachment("new", "empty.txt")
    assert meta.length == 0 and await read_all(chunks) == b""


async def test_stubs_keep_attachments_across_edits_and_leaving_one_out_removes_it(store):
    _, rev2 = await put_doc_with_file(store, data=b"one", name="a.txt")
    rev3 = await store.put_attachment("doc", rev2, "b.txt", "text/plain", stream(b"two"))
    doc = await store.get("doc")
    assert set(doc["_attachments"]) == {"a.txt", "b.txt"}
    assert doc["_attachments"]["a.txt"]["revpos"] == 2
    assert doc["_attachments"]["b.txt"]["revpos"] == 3
    # An edit that sends the stubs back as read keeps both, unchanged.
    doc["title"] = "edited"
    rev4 = await store.put(doc)
    edited = await store.get("doc")
    assert edited["_attachments"] == doc["_attachments"]
    # A bare {"stub": true} is enough to keep one; the name left out is removed.
    rev5 = await store.put({"_id": "doc", "_rev": rev4, "title": "edited",
                            "_attachments": {"b.txt": {"stub": True}}})
    after = await store.get("doc")
    assert set(after["_attachments"]) == {"b.txt"}
    assert after["_attachments"]["b.txt"] == doc["_attachments"]["b.txt"]
    with pytest.raises(NotFound):
        await store.open_attachment("doc", "a.txt")
    _, chunks = await store.open_attachment("doc", "b.txt")
    assert await read_all(chunks) == b"two"
    # An edit without _attachments removes them all.
    await store.put({"_id": "doc", "_rev": rev5, "title": "bare"})
    assert "_attachments" not in await store.get("doc")
    assert len({rev2, rev3, rev4, rev5}) == 4


async def test_replacing_an_attachment_and_deleting_one(store):
    _, rev2 = await put_doc_with_file(store, data=b"old", name="a.txt")
    rev3 = await store.put_attachment("doc", rev2, "a.txt", "text/plain", stream(b"new data"))
    meta, chunks = await store.open_attachment("doc", "a.txt")
    assert (meta.length, meta.revpos, meta.content_type) == (8, 3, "text/plain")
    assert await read_all(chunks) == b"new data"
    rev4 = await store.delete_attachment("doc", rev3, "a.txt")
    assert rev4.startswith("4-")
    doc = await store.get("doc")
    assert doc["_rev"] == rev4 and "_attachments" not in doc
    with pytest.raises(NotFound):
        await store.open_attachment("doc", "a.txt")
    with pytest.raises(NotFound):
        await store.delete_attachment("doc", rev4, "a.txt")


async def test_deleting_the_document_drops_its_attachments(store):
    _, rev2 = await put_doc_with_file(store)
    await store.delete("doc", rev2)
    with pytest.raises(NotFound):
        await store.open_attachment("doc", "file.bin")


# -- a large file, streamed: the test process's memory stays low -------------------------------

PROXIED_FILE = 8 * MIB  # through the in-process cluster proxy
BIG_FILE = 100 * MIB
RSS_GROWTH_ALLOWED = 48 * MIB  # the file whole in memory would be 100 MB (twice, as bytes)


def rss() -> int:
    """This process's resident set size, in bytes (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class RssWatch:
    def __init__(self):
        self.baseline = rss()
        self.peak = self.baseline

    def sample(self):
        self.peak = max(self.peak, rss())

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


async def big_file(watch: RssWatch, size: int, md5):
    """`size` pseudo-random bytes in 1 MiB pieces, made as they are sent (never whole)."""
    rng = random.Random(42)
    for _ in range(size // MIB):
        piece = rng.randbytes(MIB)
        md5.update(piece)
        watch.sample()
        yield piece


async def test_a_100_mb_file_streams_in_and_out_with_low_memory(store):
    # The cluster proxy runs in this process and buffers whole bodies: through it the file
    # is smaller and only its round trip is checked (this process's memory says nothing of
    # the store's there).
    proxied = _behind_proxy(store)
    size = PROXIED_FILE if proxied else BIG_FILE
    rev1 = await store.put({"_id": "big"})
    watch = RssWatch()
    sent = hashlib.md5()
    rev2 = await store.put_attachment("big", rev1, "big.bin", "application/octet-stream",
                                      big_file(watch, size, sent), length=size)
    upload_growth = watch.growth
    expected = "md5-" + base64.b64encode(sent.digest()).decode()
    meta, chunks = await store.open_attachment("big", "big.bin", rev=rev2)
    assert (meta.length, meta.digest) == (size, expected)
    got, length = hashlib.md5(), 0
    async for piece in chunks:
        got.update(piece)
        length += len(piece)
        watch.sample()
    assert length == size and got.digest() == sent.digest()
    if proxied:
        return
    print(f"\n{store.backend}: RSS growth while uploading 100 MB {upload_growth / MIB:.1f} MiB, "
          f"up to the end of the download {watch.growth / MIB:.1f} MiB")
    assert watch.growth < RSS_GROWTH_ALLOWED


def _behind_proxy(store) -> bool:
    return proxy_of(store) is not None


# -- ranges ---------------------------------------------------------------------------------


async def test_range_reads(store):
    data = random_bytes(CHUNK_SIZE * 2 + 1000, seed=7)
    await put_doc_with_file(store, data=data)
    for start, stop in [(0, 1), (0, len(data)), (10, 20), (CHUNK_SIZE - 5, CHUNK_SIZE + 5),
                        (CHUNK_SIZE, 2 * CHUNK_SIZE), (len(data) - 1, len(data)),
                        (100, 2 * CHUNK_SIZE + 10)]:
        meta, chunks = await store.open_attachment("doc", "file.bin", range=(start, stop))
        assert meta.length == len(data)  # the whole file's metadata, for a range too
        assert await read_all(chunks) == data[start:stop], (start, stop)


@pytest.mark.parametrize("bad", [(0, 0), (5, 4), (-1, 3), (0, 10**9), (10**9, 10**9 + 1)])
async def test_a_range_outside_the_file_is_refused(store, bad):
    await put_doc_with_file(store, data=b"0123456789")
    with pytest.raises(RangeNotSatisfiable):
        await store.open_attachment("doc", "file.bin", range=bad)


async def test_stopping_a_read_early_then_closing_it(store):
    data = random_bytes(CHUNK_SIZE * 3)
    await put_doc_with_file(store, data=data)
    _, chunks = await store.open_attachment("doc", "file.bin")
    first = await chunks.__anext__()
    assert data.startswith(first)
    await chunks.aclose()
    _, chunks = await store.open_attachment("doc", "file.bin")
    assert await read_all(chunks) == data


# -- bad input: a clear error, and the previous revision untouched -----------------------------


async def cut_stream(data: bytes):
    yield data[: len(data) // 2]
    raise ConnectionResetError("the client went away")


BAD_UPLOADS = {
    "digest mismatch": dict(digest=md5_digest(b"something else")),
    "length too short": dict(length=10),
    "length too long": dict(length=CHUNK_SIZE * 2),
    "bad digest format": dict(digest="sha1-xyz"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
async def test_a_lying_upload_is_a_bad_request_and_writes_nothing(store, case):
    _, rev2 = await put_doc_with_file(store, data=b"the original")
    before = await feed_and_doc(store, "doc")
    usage = (await store.info()).get("attachment_chunks")
    data = random_bytes(CHUNK_SIZE + 17)
    with pytest.raises(BadRequest):
        await store.put_attachment("doc", rev2, "file.bin", "text/plain", stream(data),
                                   **BAD_UPLOADS[case])
    assert await feed_and_doc(store, "doc") == before
    _, chunks = await store.open_attachment("doc", "file.bin")
    assert await read_all(chunks) == b"the original"
    assert (await store.info()).get("attachment_chunks") == usage  # (sqlite: nothing left)


async def test_the_declared_digest_and_length_when_true_are_accepted(store):
    data = random_bytes(1000)
    rev1 = await store.put({"_id": "doc"})
    await store.put_attachment("doc", rev1, "f", "text/plain", stream(data),
                               digest=md5_digest(data), length=len(data))
    _, chunks = await store.open_attachment("doc", "f")
    assert await read_all(chunks) == data


async def test_a_cut_upload_leaves_the_previous_revision(store):
    _, rev2 = await put_doc_with_file(store, data=b"the original")
    before = await feed_and_doc(store, "doc")
    usage = (await store.info()).get("attachment_chunks")
    with pytest.raises(ConnectionResetError):
        await store.put_attachment("doc", rev2, "file.bin", "text/plain",
                                   cut_stream(random_bytes(3 * CHUNK_SIZE)))
    assert await feed_and_doc(store, "doc") == before
    _, chunks = await store.open_attachment("doc", "file.bin")
    assert await read_all(chunks) == b"the original"
    assert (await store.info()).get("attachment_chunks") == usage


async def test_a_cancelled_upload_leaves_the_previous_revision(store):
    _, rev2 = await put_doc_with_file(store, data=b"the original")
    before = await feed_and_doc(store, "doc")
    usage = (await store.info()).get("attachment_chunks")
    started = trio.Event()

    async def endless():
        while True:
            yield b"x" * CHUNK_SIZE
            started.set()
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.put_attachment, "doc", rev2, "file.bin", "text/plain",
                           endless())
        await started.wait()
        nursery.cancel_scope.cancel()
    assert await feed_and_doc(store, "doc") == before
    assert (await store.info()).get("attachment_chunks") == usage


@pytest.mark.parametrize("name", ["", ".", "a/b", "..", "../x", "a..b", "_hidden", "x\n", "a\\b",
                                  "n" * 256, 7, None])
async def test_a_bad_name_is_refused_before_any_data_is_read(store, name):
    rev1 = await store.put({"_id": "doc"})
    read = []

    async def data():
        read.append(True)
        yield b"x"

    with pytest.raises(BadRequest):
        await store.put_attachment("doc", rev1, name, "text/plain", data())
    assert read == []
    with pytest.raises(BadRequest):
        await store.open_attachment("doc", name)
    with pytest.raises(BadRequest):
        await store.delete_attachment("doc", rev1, name)
    assert await store.get("doc") == {"_id": "doc", "_rev": rev1}


async def test_missing_docs_revisions_and_names(store):
    _, rev2 = await put_doc_with_file(store)
    before = await feed_and_doc(store, "doc")
    stale = rev2.replace("2-", "1-", 1)
    with pytest.raises(Conflict):  # no such revision to write on
        await store.put_attachment("missing", "1-" + "0" * 32, "f", "text/plain", stream(b"x"))
    with pytest.raises(Conflict):  # not the current leaf
        await store.put_attachment("doc", stale, "f", "text/plain", stream(b"x"))
    with pytest.raises(Conflict):  # a live doc needs its rev
        await store.put_attachment("doc", None, "f", "text/plain", stream(b"x"))
    with pytest.raises((Conflict, NotFound)):
        await store.delete_attachment("doc", stale, "file.bin")
    with pytest.raises(NotFound):
        await store.open_attachment("missing", "file.bin")
    with pytest.raises(NotFound):
        await store.open_attachment("doc", "other")
    with pytest.raises(NotFound):
        await store.open_attachment("doc", "file.bin", rev="9-" + "a" * 32)
    with pytest.raises(BadRequest):
        await store.put_attachment("doc", rev2, "f", "", stream(b"x"))  # no content type
    assert await feed_and_doc(store, "doc") == before
    with pytest.raises(NotFound):
        await store.get("missing")


async def test_a_stub_for_an_attachment_the_parent_lacks_is_refused(store):
    _, rev2 = await put_doc_with_file(store)
    before = await feed_and_doc(store, "doc")
    with pytest.raises(BadRequest):
        await store.put({"_id": "doc", "_rev": rev2,
                         "_attachments": {"other.bin": {"stub": True}}})
    with pytest.raises(BadRequest):  # inline data: only streamed
        await store.put({"_id": "doc", "_rev": rev2, "_attachments": {
            "x": {"content_type": "text/plain", "data": "aGk="}}})
    assert await feed_and_doc(store, "doc") == before


# -- replication ------------------------------------------------------------------------------


async def replicate(source, target, doc_id, rev):
    """What a replicator does for one revision, as CouchDB's does (`atts_since`): the doc
    with stubs from `bulk_get`; an attachment written after the newest ancestor the target
    holds (revpos above its generation; all of them when it holds none) streams from the
    source, the others go as stubs the target resolves."""
    diff = await target.revs_diff({doc_id: [rev]})
    ancestors = diff.get(doc_id, {}).get("possible_ancestors", [])
    since = max((int(a.partition("-")[0]) for a in ancestors), default=0)
    [doc] = await source.bulk_get([(doc_id, rev)])
    streams, readers = {}, []
    for name, stub in doc.get("_attachments", {}).items():
        assert stub["stub"] is True and "data" not in stub
        if diff and stub["revpos"] > since:
            doc["_attachments"][name] = {
                "follows": True, "content_type": stub["content_type"],
                "length": stub["length"], "digest": stub["digest"], "revpos": stub["revpos"],
            }
            _, chunks = await source.open_attachment(doc_id, name, rev=rev)
            streams[name] = chunks
            readers.append(chunks)
    try:
        await target.put_replicated(doc, streams)
    finally:
        for chunks in readers:
            await chunks.aclose()


def assert_same_doc(replica, original):
    """`replica` is `original`, but for the revpos of an attachment that came as data in a
    revision other than the one that wrote it: pouchdb-server 4.2.0 gives it the revision's
    generation (CouchDB keeps the revpos sent). Only what is sent again later depends on it."""
    generation = int(original["_rev"].partition("-")[0])
    replica, original = dict(replica), dict(original)
    got, sent = replica.pop("_attachments", {}), original.pop("_attachments", {})
    assert replica == original and set(got) == set(sent)
    for name, stub in sent.items():
        assert got[name]["revpos"] in (stub["revpos"], generation)
        assert dict(got[name], revpos=stub["revpos"]) == stub


@pytest.mark.parametrize("direction", ["sqlite->couchdb", "couchdb->sqlite", "sqlite->sqlite"])
async def test_a_doc_with_attachments_replicates_from_one_store_to_another(
    direction, request, tmp_path
):
    source_kind, target_kind = direction.split("->")
    source = await open_backend(source_kind, request, tmp_path)
    target = await open_backend(target_kind, request, tmp_path)
    try:
        data = random_bytes(CHUNK_SIZE + 99, seed=3)
        _, rev2 = await put_doc_with_file(source, data=data, title="photo")
        await replicate(source, target, "doc", rev2)
        assert await target.get("doc", revs=True) == await source.get("doc", revs=True)
        _, chunks = await target.open_attachment("doc", "file.bin")
        assert await read_all(chunks) == data
        # Delivering it again is a no-op, its data not even read.
        await replicate(source, target, "doc", rev2)
        # An edit that keeps the attachment travels as a plain replicated doc with its stub.
        doc = await source.get("doc")
        doc["title"] = "photo, edited"
        rev3 = await source.put(doc)
        [edited] = await source.bulk_get([("doc", rev3)])
        [result] = await target.bulk_docs([edited], new_edits=False)
        assert result.get("ok"), result
        assert await target.get("doc") == await source.get("doc")
        _, chunks = await target.open_attachment("doc", "file.bin", rev=rev3)
        assert await read_all(chunks) == data
        # A new attachment in a later revision streams; the old one is still a stub.
        rev4 = await source.put_attachment("doc", rev3, "note.txt", "text/plain",
                                           stream(b"a note"))
        await replicate(source, target, "doc", rev4)
        assert await target.get("doc") == await source.get("doc")
        # A target that missed the revisions in between gets every attachment written
        # since the ancestor it holds, the ones of skipped revisions too.
        rev5 = await source.put_attachment("doc", rev4, "late.txt", "text/plain",
                                           stream(b"late"))
        doc = await source.get("doc")
        doc["title"] = "edited again"
        rev6 = await source.put(doc)
        await replicate(source, target, "doc", rev6)
        assert_same_doc(await target.get("doc", revs=True), await source.get("doc", revs=True))
        _, chunks = await target.open_attachment("doc", "late.txt")
        assert await read_all(chunks) == b"late"
        assert rev5
    finally:
        await source.aclose()
        await target.aclose()


async def test_replicated_bad_data_is_refused_and_writes_nothing(store):
    data = b"the real data"
    doc = {"_id": "doc", "_rev": "1-" + "a" * 32, "_revisions": {"start": 1, "ids": ["a" * 32]},
           "_attachments": {"f": {"follows": True, "content_type": "text/plain",
                                  "length": len(data), "digest": md5_digest(data),
                                  "revpos": 1}}}
    with pytest.raises(BadRequest):
        await store.put_replicated(doc, {"f": stream(b"tampered data")})
    with pytest.raises(BadRequest):
        await store.put_replicated(doc, {"f": stream(data + b"more")})
    with pytest.raises(BadRequest):  # a stream for each that follows, no other
        await store.put_replicated(doc, {})
    with pytest.raises(NotFound):
        await store.get("doc")
    # A stub the store cannot resolve ("missing stub") in a replicated write.
    stub_only = dict(doc, _attachments={"f": {"stub": True, "digest": md5_digest(data),
                                              "revpos": 1}})
    [result] = await store.bulk_docs([stub_only], new_edits=False)
    assert result.get("error"), result
    with pytest.raises(BadRequest):
        await store.put_replicated(stub_only, {})
    with pytest.raises(NotFound):
        await store.get("doc")
    await store.put_replicated(doc, {"f": stream(data)})
    _, chunks = await store.open_attachment("doc", "f")
    assert await read_all(chunks) == data


async def test_a_replicated_stub_without_its_digest_is_matched_by_name_and_revpos(store):
    """As CouchDB matches stubs: Apache CouchDB's stub of a file it keeps gzip-encoded
    carries the digest of the gzip bytes, which no other server holds (the `/couch` API
    drops it). Such a stub names the file by its name and revpos among the document's
    revisions held here; one naming no such file is a missing stub, as before."""
    data = b"a text file"
    first = {"_id": "doc", "_rev": "1-" + "a" * 32,
             "_revisions": {"start": 1, "ids": ["a" * 32]},
             "_attachments": {"f.txt": {"follows": True, "content_type": "text/plain",
                                        "length": len(data), "digest": md5_digest(data),
                                        "revpos": 1}}}
    await store.put_replicated(first, {"f.txt": stream(data)})

    def child(n: int, parent: str, revpos: int | None) -> dict:
        entry = {"stub": True, "content_type": "text/plain", "length": len(data)}
        if revpos is not None:
            entry["revpos"] = revpos
        return {"_id": "doc", "_rev": f"{n}-{str(n) * 32}", "title": f"v{n}",
                "_revisions": {"start": n, "ids": [str(n) * 32, parent]},
                "_attachments": {"f.txt": entry}}

    for refused in (child(2, "a" * 32, 2),  # no f.txt written at generation 2 here
                    child(2, "a" * 32, None)):  # neither digest nor revpos: nothing to match
        [result] = await store.bulk_docs([refused], new_edits=False)
        assert result.get("error"), result
    assert (await store.get("doc"))["_rev"] == first["_rev"]
    [result] = await store.bulk_docs([child(2, "a" * 32, 1)], new_edits=False)
    assert "error" not in result, result
    doc = await store.get("doc")
    assert doc["_rev"] == "2-" + "2" * 32
    assert doc["_attachments"]["f.txt"]["digest"] == md5_digest(data)
    assert doc["_attachments"]["f.txt"]["revpos"] == 1
    _, chunks = await store.open_attachment("doc", "f.txt")
    assert await read_all(chunks) == data


def _edit_with_data(doc_id: str, parent: str | None, data: bytes, gen_id: str) -> dict:
    """An edit carrying new attachment data, made a replicated revision by its caller (the
    `/couch` API's inline data): the child of `parent`."""
    generation = int(parent.partition("-")[0]) + 1 if parent else 1
    ids = [gen_id * 32] + ([parent.partition("-")[2]] if parent else [])
    return {"_id": doc_id, "_rev": f"{generation}-{gen_id * 32}",
            "_revisions": {"start": generation, "ids": ids}, "title": gen_id,
            "_attachments": {"f": {"follows": True, "content_type": "text/plain",
                                   "length": len(data), "digest": md5_digest(data),
                                   "revpos": generation}}}


async def test_an_edit_with_data_whose_parent_is_no_longer_current_is_a_conflict(store):
    """Another write landed between the edit's read of the current revision and its write:
    a 409, as for any edit, never a second branch."""
    rev1 = await store.put({"_id": "doc", "title": "first"})
    rev2 = await store.put({"_id": "doc", "_rev": rev1, "title": "the other writer"})
    before = await feed_and_doc(store, "doc")
    with pytest.raises(Conflict):
        await store.put_replicated(_edit_with_data("doc", rev1, b"late", "b"),
                                   {"f": stream(b"late")}, edit=True)
    with pytest.raises(Conflict):  # a new doc over one that exists
        await store.put_replicated(_edit_with_data("doc", None, b"new", "c"),
                                   {"f": stream(b"new")}, edit=True)
    assert await feed_and_doc(store, "doc") == before
    await store.put_replicated(_edit_with_data("doc", rev2, b"on time", "d"),
                               {"f": stream(b"on time")}, edit=True)
    assert (await store.get("doc", conflicts=True))["_rev"].startswith("3-")
    assert "_conflicts" not in await store.get("doc", conflicts=True)
    await store.put_replicated(_edit_with_data("fresh", None, b"x", "e"), {"f": stream(b"x")},
                               edit=True)
    _, chunks = await store.open_attachment("fresh", "f")
    assert await read_all(chunks) == b"x"
    gone = await store.delete("fresh", (await store.get("fresh"))["_rev"])
    with pytest.raises(Conflict):  # a deleted winner is continued, not started over
        await store.put_replicated(_edit_with_data("fresh", None, b"y", "f"),
                                   {"f": stream(b"y")}, edit=True)
    await store.put_replicated(_edit_with_data("fresh", gone, b"y", "f"), {"f": stream(b"y")},
                               edit=True)
    assert (await store.get("fresh"))["_rev"].startswith("3-")


async def test_an_edit_with_data_and_an_ordinary_edit_at_once_make_one_revision_and_a_409(store):
    """Two writers of this node continue the same revision at once, one of them with new
    data: whatever the timing, one lands and the other is a 409, never a second branch.
    The ordinary edit is started at a spread of moments across the edit with data."""
    if (proxy := proxy_of(store)) is not None:
        # Its every-other-write 202 is shared by all requests: one of 48 writes at once may
        # meet it on each of its attempts. Quorum is not what this test is about.
        proxy.writes_below_quorum = 0
    count = 24
    parents = {f"d{i}": await store.put({"_id": f"d{i}", "title": "first"})
               for i in range(count)}
    landed: dict[str, list[str]] = {doc_id: [] for doc_id in parents}

    async def slow(data: bytes):
        await trio.sleep(0.004)  # an upload that takes a moment to arrive
        yield data

    async def with_data(doc_id: str) -> None:
        try:
            await store.put_replicated(_edit_with_data(doc_id, parents[doc_id], b"new", "a"),
                                       {"f": slow(b"new")}, edit=True)
            landed[doc_id].append("with data")
        except Conflict:
            pass

    async def ordinary(doc_id: str, delay: float) -> None:
        await trio.sleep(delay)
        try:
            await store.put({"_id": doc_id, "_rev": parents[doc_id], "title": "ordinary"})
            landed[doc_id].append("ordinary")
        except Conflict:
            pass

    async with trio.open_nursery() as nursery:
        for i, doc_id in enumerate(parents):
            nursery.start_soon(with_data, doc_id)
            nursery.start_soon(ordinary, doc_id, i * 0.002)
    for doc_id in parents:
        doc = await store.get(doc_id, conflicts=True)
        assert "_conflicts" not in doc, (doc_id, landed[doc_id])
        assert len(landed[doc_id]) == 1, (doc_id, landed[doc_id])
        assert doc["title"] == ("a" if landed[doc_id] == ["with data"] else "ordinary")


# -- the embedded store: chunks outside the JSON rows, deduplicated, collected ---------------


@pytest.fixture
async def sqlite_store(tmp_path):
    from plugshare.store.sqlite import SQLiteStore

    s = await SQLiteStore.open(tmp_path / "store.sqlite")
    try:
        yield s
    finally:
        await s.aclose()


async def usage(store):
    info = await store.info()
    return info["attachment_chunks"], info["attachment_bytes"], info["attachment_contents"]


async def test_sqlite_writes_an_uploads_bytes_once_to_a_pack_not_through_the_database(tmp_path):
    """Chunk bytes written into SQLite rows went twice to disk (the WAL, then the database
    at checkpoint); an upload now appends them to a pack, and a deleted file's pack goes."""
    from plugshare.store.sqlite import SQLiteStore

    path = tmp_path / "store.sqlite"
    store = await SQLiteStore.open(path)
    try:
        def database_bytes() -> int:
            return sum(p.stat().st_size for p in (path, path.with_name("store.sqlite-wal"))
                       if p.exists())

        before = database_bytes()
        data = random_bytes(24 * CHUNK_SIZE + 1, seed=41)
        _, rev = await put_doc_with_file(store, "big", data=data)
        assert database_bytes() - before < len(data) // 4
        packs = list((tmp_path / "store.sqlite-chunks").iterdir())
        assert sum(p.stat().st_size for p in packs) == len(data)
        _, chunks = await store.open_attachment("big", "file.bin")
        assert await read_all(chunks) == data
        await store.delete("big", rev)
        assert (await usage(store))[:2] == (0, 0)
        await store.aclose()
        store = await SQLiteStore.open(path)  # (the pack being appended to is kept till then)
        assert not list((tmp_path / "store.sqlite-chunks").iterdir())
    finally:
        await store.aclose()


async def test_sqlite_stores_a_file_shared_by_two_docs_once_and_collects_it_with_its_last_leaf(
    sqlite_store,
):
    store = sqlite_store
    data = random_bytes(3 * CHUNK_SIZE + 5, seed=11)
    assert await usage(store) == (0, 0, 0)
    _, a2 = await put_doc_with_file(store, "a", data=data)
    one_copy = await usage(store)
    assert one_copy[:2] == (4, len(data))
    _, b2 = await put_doc_with_file(store, "b", data=data)
    b3 = await store.put_attachment("b", b2, "copy.bin", "text/plain", stream(data))
    chunks_, size, _ = await usage(store)
    assert (chunks_, size) == one_copy[:2]  # three attachments, one copy of each chunk
    # An edit that keeps it, then a revision that drops it: still held by doc "a".
    doc = await store.get("b")
    b4 = await store.put(doc)
    await store.put({"_id": "b", "_rev": b4})
    assert (await usage(store))[:2] == one_copy[:2]
    # The write that drops the last leaf reference collects the chunks at once.
    await store.delete("a", a2)
    assert await usage(store) == (0, 0, 0)
    assert b3  # (b's older revisions are not leaves: they hold nothing)


async def test_sqlite_keeps_data_a_conflicting_leaf_still_references(sqlite_store):
    store = sqlite_store
    data = random_bytes(CHUNK_SIZE + 1, seed=12)
    _, rev2 = await put_doc_with_file(store, data=data)
    doc = await store.get("doc")
    # A sibling replicated onto rev 1 makes rev2 one of two leaves.
    [winner] = await store.bulk_get([("doc", rev2)])
    sibling = {"_id": "doc", "_rev": "2-" + "f" * 32,
               "_revisions": {"start": 2, "ids": ["f" * 32, winner["_revisions"]["ids"][1]]},
               "_attachments": {"file.bin": {"stub": True, "digest": md5_digest(data),
                                             "revpos": 2}}}
    [result] = await store.bulk_docs([sibling], new_edits=False)
    assert result.get("ok"), result
    # Dropping the attachment on one leaf keeps the data: the other leaf still has it.
    await store.delete_attachment("doc", rev2, "file.bin")
    assert (await usage(store))[0] == 2
    _, chunks = await store.open_attachment("doc", "file.bin", rev="2-" + "f" * 32)
    assert await read_all(chunks) == data
    await store.delete("doc", "2-" + "f" * 32)
    assert await usage(store) == (0, 0, 0)
    assert doc


async def test_sqlite_data_being_read_survives_its_removal_until_compact(sqlite_store):
    store = sqlite_store
    data = random_bytes(3 * CHUNK_SIZE, seed=13)
    _, rev2 = await put_doc_with_file(store, data=data)
    _, chunks = await store.open_attachment("doc", "file.bin")
    first = await chunks.__anext__()
    await store.delete_attachment("doc", rev2, "file.bin")
    rest = await read_all(chunks)
    assert first + rest == data  # the reader finished what it started
    assert (await usage(store))[0] == 3  # left for compaction
    await store.compact()
    assert await usage(store) == (0, 0, 0)


async def test_sqlite_compact_collects_an_upload_the_process_died_in(tmp_path):
    import sqlite3
    from contextlib import closing

    from plugshare.store.sqlite import SQLiteStore

    path = tmp_path / "store.sqlite"
    store = await SQLiteStore.open(path)
    await put_doc_with_file(store, data=b"kept")
    await store.aclose()
    with closing(sqlite3.connect(path)) as conn, conn:  # what a SIGKILL mid-upload leaves
        conn.execute("INSERT INTO contents (id, chunk_size) VALUES (99, ?)", (CHUNK_SIZE,))
        conn.execute("INSERT INTO chunks (id, hash, data) VALUES (99, x'00', x'01')")
        conn.execute("INSERT INTO content_chunks VALUES (99, 0, 99)")
    store = await SQLiteStore.open(path)
    try:
        assert (await usage(store))[0] == 2
        await store.compact()
        assert (await usage(store))[0] == 1
        _, chunks = await store.open_attachment("doc", "file.bin")
        assert await read_all(chunks) == b"kept"
    finally:
        await store.aclose()


async def test_sqlite_attachments_are_durable_across_a_reopen(tmp_path):
    from plugshare.store.sqlite import SQLiteStore

    path = tmp_path / "store.sqlite"
    data = random_bytes(2 * CHUNK_SIZE + 3, seed=14)
    store = await SQLiteStore.open(path)
    await put_doc_with_file(store, data=data)
    await store.aclose()
    store = await SQLiteStore.open(path)
    try:
        _, chunks = await store.open_attachment("doc", "file.bin")
        assert await read_all(chunks) == data
    finally:
        await store.aclose()


async def test_sqlite_a_version_1_store_gets_the_attachment_tables(tmp_path):
    import sqlite3
    from contextlib import closing

    from plugshare.store.sqlite import SQLiteStore

    path = tmp_path / "store.sqlite"
    store = await SQLiteStore.open(path)
    rev1 = await store.put({"_id": "doc", "v": 1})
    await store.aclose()
    with closing(sqlite3.connect(path)) as conn, conn:  # as version 1 made it
        for table in ("chunks", "contents", "content_chunks", "doc_contents"):
            conn.execute(f"DROP TABLE {table}")
        conn.execute("PRAGMA user_version = 1")
    store = await SQLiteStore.open(path)
    try:
        assert await store.get("doc") == {"_id": "doc", "_rev": rev1, "v": 1}
        await store.put_attachment("doc", rev1, "f", "text/plain", stream(b"x"))
    finally:
        await store.aclose()
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3  # chunks may be kept in packs since 3


async def test_concurrent_uploads_on_one_revision_let_exactly_one_win(store):
    rev1 = await store.put({"_id": "doc"})
    before = (await store.info()).get("attachment_chunks")
    outcomes = {}

    async def upload(tag):
        data = random_bytes(2 * CHUNK_SIZE, seed=hash(tag) % 1000)
        try:
            outcomes[tag] = (await store.put_attachment("doc", rev1, "f", "text/plain",
                                                        stream(data)), data)
        except Conflict:
            outcomes[tag] = "conflict"

    async with trio.open_nursery() as nursery:
        for tag in ("a", "b"):
            nursery.start_soon(upload, tag)
    won = [value for value in outcomes.values() if value != "conflict"]
    assert len(won) == 1, outcomes
    [(rev2, data)] = won
    assert (await store.get("doc"))["_rev"] == rev2
    _, chunks = await store.open_attachment("doc", "f")
    assert await read_all(chunks) == data
    if before is not None:  # sqlite: the loser's data is gone, the winner's kept
        assert (await store.info())["attachment_chunks"] == before + 2


REPLICATED_FILE = 32 * MIB


@pytest.mark.parametrize("direction", ["sqlite->couchdb", "couchdb->sqlite"])
async def test_a_large_attachment_replicates_between_stores_with_low_memory(
    direction, request, tmp_path
):
    source_kind, target_kind = direction.split("->")
    source = await open_backend(source_kind, request, tmp_path)
    target = await open_backend(target_kind, request, tmp_path)
    try:
        rev1 = await source.put({"_id": "big"})
        watch = RssWatch()
        sent = hashlib.md5()
        rev2 = await source.put_attachment("big", rev1, "big.bin", "application/octet-stream",
                                           big_file(watch, REPLICATED_FILE, sent))
        await replicate(source, target, "big", rev2)
        watch.sample()
        meta, chunks = await target.open_attachment("big", "big.bin")
        got = hashlib.md5()
        async for piece in chunks:
            got.update(piece)
            watch.sample()
        assert meta.length == REPLICATED_FILE and got.digest() == sent.digest()
        print(f"\n{direction}: RSS growth while uploading, replicating and reading back "
              f"32 MB: {watch.growth / MIB:.1f} MiB")
        assert watch.growth < RSS_GROWTH_ALLOWED
    finally:
        await source.aclose()
        await target.aclose()


async def test_an_attachment_put_without_rev_recreates_a_deleted_document(store):
    _, rev2 = await put_doc_with_file(store, title="old")
    await store.delete("doc", rev2)
    rev4 = await store.put_attachment("doc", None, "new.txt", "text/plain", stream(b"new"))
    assert rev4.startswith("4-")
    doc = await store.get("doc")
    assert set(doc) == {"_id", "_rev", "_attachments"}  # the old body and file are not back
    assert list(doc["_attachments"]) == ["new.txt"]
