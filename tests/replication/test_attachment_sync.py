"""Attachment data between two real stores over a real pinned-TLS link: a revision comes
with its stubs, only the chunks the target lacks travel (apart from the document stream, so
small docs do not wait behind a large file), and the revision is written once its data is
all there and checked."""

import pytest
import trio

from plugshare.replication.attachment_sync import RevisionFetched
from plugshare.replication.protocol import DocRefused
from plugshare.replication.replicator import PeerReplication, store_instance_id
from plugshare.store.base import NotFound
from tests.replication.test_replicator import (  # noqa: F401 (stores: a fixture)
    Side,
    everything,
    linked,
    stores,
    until,
    wait_caught_up,
    wait_for_doc,
)  # noqa: F401 (a fixture)
from tests.store.test_attachments import md5_digest, put_doc_with_file, random_bytes

MIB = 1024 * 1024


class RecordingSide(Side):
    """A side that keeps its `PeerReplication` for the test to look at."""

    replication = None

    async def replicate(self, connection, peer_id: bytes) -> None:
        self.connection = connection
        self.store_id = self.store_id or await store_instance_id(self.store)
        self.replication = PeerReplication(
            connection, self.store, peer=peer_id.hex(), store_id=self.store_id,
            accept_share=self.accept_share, on_event=self.events, config=self.config,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(self.replication.run)
            for share, in_scope in self.pushes.items():
                self.replication.start_push(share, in_scope=in_scope)


    @staticmethod
    async def pending_of(side) -> int:
        return await side.replication.attachment_fetcher.pending()


async def read_attachment(store, doc_id, name="file.bin") -> bytes:
    meta, data = await store.open_attachment(doc_id, name)
    return b"".join([piece async for piece in data])


async def poll_until(check, timeout=120):
    """Until `check()` holds, looking again every few ms (for state no event announces)."""
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.005)


def fetched(side, doc_id):
    return side.events.of(RevisionFetched, doc_id=doc_id)


async def test_a_doc_with_a_large_attachment_syncs_and_a_second_copy_sends_no_chunk_data(stores):
    store_a, store_b = stores
    data = random_bytes(50 * MIB + 123)
    await put_doc_with_file(store_a, "big", data=data, doctype="io.files")
    a = RecordingSide("a", store_a, pushes={"notes": everything})
    b = RecordingSide("b", store_b)
    async with linked(a, b):
        await until(lambda: fetched(b, "big"), b.events)
        assert await read_attachment(store_b, "big") == data
        sent = a.replication.attachment_server.sent_bytes
        assert sent == len(data)  # every chunk once
        [event] = fetched(b, "big")
        assert event.fetched_bytes == len(data) and event.held_chunks == 0

        await put_doc_with_file(store_a, "copy", data=data, doctype="io.files")
        await until(lambda: fetched(b, "copy"), b.events)
        assert await read_attachment(store_b, "copy") == data
        [event] = fetched(b, "copy")
        assert event.fetched_bytes == 0 and event.held_chunks > 0
        assert a.replication.attachment_server.sent_bytes == sent  # no chunk data travelled
    meta, _ = await store_b.open_attachment("copy", "file.bin")
    assert meta.digest == md5_digest(data)


async def test_a_small_doc_written_during_a_100_mb_transfer_arrives_before_it_ends(stores):
    store_a, store_b = stores
    data = random_bytes(100 * MIB)
    await put_doc_with_file(store_a, "big", data=data, doctype="io.files")
    a = RecordingSide("a", store_a, pushes={"notes": everything})
    b = RecordingSide("b", store_b)
    async with linked(a, b):
        await poll_until(lambda: b.replication is not None
                         and b.replication.attachment_fetcher.fetched_bytes > 0)
        await store_a.put({"_id": "small", "doctype": "io.notes", "text": "x" * 1000})
        await wait_for_doc(b, "small")
        # The small doc is readable on B while the big one is not complete there yet.
        with pytest.raises(NotFound):
            await store_b.get("big")
        assert b.replication.attachment_fetcher.fetched_bytes < len(data)
        await until(lambda: fetched(b, "big"), b.events)
    assert await read_attachment(store_b, "big") == data


async def test_the_source_reads_a_run_of_chunks_asked_together_as_one_range(stores):
    """Issue 13's speed: the source opened the attachment once per chunk (two hops to the
    store's thread and a parse of the document each); a run of chunks is one read now."""
    store_a, store_b = stores
    data = random_bytes(20 * MIB)  # 80 chunks: 64 asked at once, then refills
    await put_doc_with_file(store_a, "big", data=data, doctype="io.files")
    opened = []
    open_attachment = store_a.open_attachment

    async def counted(*args, **kwargs):
        opened.append(kwargs.get("range"))
        return await open_attachment(*args, **kwargs)

    store_a.open_attachment = counted
    a = RecordingSide("a", store_a, pushes={"notes": everything})
    b = RecordingSide("b", store_b)
    async with linked(a, b):
        await until(lambda: fetched(b, "big"), b.events)
    assert await read_attachment(store_b, "big") == data
    # The manifest's, four for the first 64 chunks (4 gets of 16), at most one per refill.
    assert len(opened) <= 1 + 4 + (80 - 64)


@pytest.mark.parametrize("stores", ["couchdb"], indirect=True)
@pytest.mark.parametrize("direction", ["to couchdb", "from couchdb"])
async def test_attachments_sync_to_and_from_the_couchdb_backend(stores, direction):
    sqlite, couch = stores
    source, target = (sqlite, couch) if direction == "to couchdb" else (couch, sqlite)
    data = random_bytes(20 * MIB + 5, seed=11)
    await put_doc_with_file(source, "f", data=data, doctype="io.files")
    a = RecordingSide("a", sqlite, pushes={"notes": everything} if source is sqlite else {})
    b = RecordingSide("b", couch, pushes={"notes": everything} if source is couch else {})
    receiver = b if target is couch else a
    async with linked(a, b):
        await until(lambda: fetched(receiver, "f"), receiver.events)
    assert await read_attachment(target, "f") == data


async def test_many_docs_with_small_files_all_arrive_and_nothing_stays_kept_aside(stores):
    store_a, store_b = stores
    files = {f"photo-{n:03}": random_bytes(10_000 + n, seed=100 + n) for n in range(300)}
    for doc_id, data in files.items():
        await put_doc_with_file(store_a, doc_id, data=data, doctype="io.files")
    a = RecordingSide("a", store_a, pushes={"notes": everything})
    b = RecordingSide("b", store_b)
    async with linked(a, b):
        await until(lambda: len(b.events.of(RevisionFetched)) == len(files), b.events)
        # A revision's kept copy goes just after it is written (and announced), the index
        # entries with others: both must come to nothing.
        fetcher = b.replication.attachment_fetcher
        with trio.fail_after(60):
            while fetcher._forgotten or await fetcher.pending():
                await trio.sleep(0.005)
    for doc_id, data in list(files.items())[::37]:
        assert await read_attachment(store_b, doc_id) == data


class TamperingSide(RecordingSide):
    """A source whose attachment server flips a bit in every chunk it sends."""

    async def replicate(self, connection, peer_id: bytes) -> None:
        from plugshare.replication import transfer

        original = connection.send

        async def send(message):
            if message.get("type") == transfer.CHUNK:
                data = bytearray(message["data"])
                data[0] ^= 1
                message = {**message, "data": bytes(data)}
            await original(message)

        connection.send = send
        await super().replicate(connection, peer_id)


async def test_a_tampered_chunk_is_refused_and_the_rest_goes_on(stores):
    store_a, store_b = stores
    data = random_bytes(3 * MIB, seed=21)
    await put_doc_with_file(store_a, "bad", data=data, doctype="io.files")
    a = TamperingSide("a", store_a, pushes={"notes": everything})
    b = RecordingSide("b", store_b)
    async with linked(a, b):
        await until(lambda: b.events.of(DocRefused, doc_id="bad"), b.events)
        [refused] = b.events.of(DocRefused, doc_id="bad")
        assert "does not match" in refused.reason
        await store_a.put({"_id": "after", "doctype": "io.notes"})
        await wait_for_doc(b, "after")  # the link and the share go on
    with pytest.raises(NotFound):
        await store_b.get("bad")
    assert (await store_b.info())["attachment_chunks"] == 0  # nothing of it stays staged
    assert await RecordingSide.pending_of(b) == 0


async def test_a_revision_the_source_will_not_serve_now_does_not_hold_up_the_others(stores):
    from plugshare.replication.attachment_sync import AttachmentFetcher

    store_a, store_b = stores
    await put_doc_with_file(store_a, "stuck", data=b"s" * 1000, doctype="io.files")
    data = random_bytes(MIB, seed=31)
    await put_doc_with_file(store_a, "f", data=data, doctype="io.files")
    a = RecordingSide("a", store_a, pushes={"notes": lambda doc: doc["_id"] != "stuck"})
    b = RecordingSide("b", store_b)
    # Kept aside on b before the link: a revision of a share a does not push (any more).
    [stuck] = await store_a.bulk_get([("stuck", (await store_a.get("stuck"))["_rev"])])
    assert await AttachmentFetcher(None, store_b, peer=a.node.id.hex()).defer("gone", [stuck]) == [True]
    async with linked(a, b):
        await until(lambda: fetched(b, "f"), b.events)
        assert await read_attachment(store_b, "f") == data
        assert await b.replication.attachment_fetcher.pending() == 1  # still kept, retried later


async def test_a_file_written_while_another_waits_for_a_retry_is_fetched_at_once(stores, monkeypatch):
    from plugshare.replication import attachment_sync
    from plugshare.replication.backoff import Backoff

    # A back-off far longer than the test waits: what arrives must not wait for it.
    monkeypatch.setattr(attachment_sync, "FETCH_BACKOFF", Backoff(initial=3600, maximum=3600))
    store_a, store_b = stores
    await put_doc_with_file(store_a, "stuck", data=b"s" * 1000, doctype="io.files")
    a = RecordingSide("a", store_a, pushes={"notes": lambda doc: doc["_id"] != "stuck"})
    b = RecordingSide("b", store_b)
    [stuck] = await store_a.bulk_get([("stuck", (await store_a.get("stuck"))["_rev"])])
    await attachment_sync.AttachmentFetcher(None, store_b, peer=a.node.id.hex()).defer("gone", [stuck])
    async with linked(a, b):
        await wait_caught_up(a)
        for n in range(3):
            await put_doc_with_file(store_a, f"f{n}", data=random_bytes(1000, seed=n), doctype="io.files")
            await until(lambda n=n: fetched(b, f"f{n}"), b.events)


class WantWatch:
    """At the source, the attachment requests open at once (from a `att.want` to its
    `att.done`): how many at most, and whether the big file ever shared the link."""

    def __init__(self, monkeypatch, big: str) -> None:
        from plugshare.replication import transfer
        from plugshare.replication.attachment_sync import AttachmentServer

        self.open: dict[int, str] = {}
        self.most = 0
        self.big_shared = False
        deliver = AttachmentServer.deliver

        def watched(server, message):
            deliver(server, message)
            if message.get("type") == transfer.WANT:
                self.open[message["req"]] = message["id"]
                self.most = max(self.most, len(self.open))
                self.big_shared |= big in self.open.values() and len(self.open) > 1
            elif message.get("type") == transfer.DONE:
                self.open.pop(message.get("req"), None)

        monkeypatch.setattr(AttachmentServer, "deliver", watched)


async def test_small_files_are_fetched_several_at_once_and_a_big_one_alone(stores, monkeypatch):
    """Issue 13's small files: one revision fetched at a time made a file cost two round
    trips and four durable writes in a row (~30 files/s whatever their size). Small ones now
    go several at once, within the requests a source takes (`MAX_OPEN_REQUESTS`); a big one
    alone, so the data in flight stays bounded."""
    from plugshare.replication import transfer

    store_a, store_b = stores
    files = {f"s{n:03}": random_bytes(20_000 + n, seed=300 + n) for n in range(40)}
    files["big"] = random_bytes(12 * MIB, seed=299)
    for doc_id, data in files.items():
        await put_doc_with_file(store_a, doc_id, data=data, doctype="io.files")
    watch = WantWatch(monkeypatch, big="big")
    a = RecordingSide("a", store_a, pushes={"notes": everything})
    b = RecordingSide("b", store_b)
    async with linked(a, b):
        await until(lambda: len(b.events.of(RevisionFetched)) == len(files), b.events)
    assert 1 < watch.most <= transfer.MAX_OPEN_REQUESTS
    assert not watch.big_shared
    for doc_id in ("s000", "s039", "big"):
        assert await read_attachment(store_b, doc_id) == files[doc_id]
        [event] = fetched(b, doc_id)  # counted per revision, not mixed with the others'
        assert event.fetched_bytes == len(files[doc_id])


async def test_a_file_fetched_in_order_is_not_read_back_to_be_hashed(stores, monkeypatch):
    """Issue 13's speed: once every chunk was in, the target read the whole file back from
    its packs for its md5 (a fifth of a 512 MiB sync, done after the transfer). The fetcher
    now hashes the chunks on the way, in order, and the store takes that md5."""
    from plugshare.store import chunks as chunk_rows

    store_a, store_b = stores
    data = random_bytes(6 * MIB + 1, seed=41)
    await put_doc_with_file(store_a, "f", data=data, doctype="io.files")
    reads = []
    read_staged = chunk_rows.read_staged
    monkeypatch.setattr(chunk_rows, "read_staged",
                        lambda *args: reads.append(args[-1]) or read_staged(*args))
    a = RecordingSide("a", store_a, pushes={"notes": everything})
    b = RecordingSide("b", store_b)
    async with linked(a, b):
        await until(lambda: fetched(b, "f"), b.events)
    assert reads == []
    assert await read_attachment(store_b, "f") == data
    assert (await store_b.get("f"))["_attachments"]["file.bin"]["digest"] == md5_digest(data)
