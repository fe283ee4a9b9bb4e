"""Attachments of an encrypted share: stored sealed (chunk by chunk, in the token), sent
sealed, and every chunk that arrives checked by the token where it stands before it is kept:
a reordered or swapped chunk is refused and audited. Real stores, a real pinned-TLS link, a
real token (both members hold the share key: one token plays both here)."""

import pytest
import trio

from plugshare.replication.attachment_sync import ChunkRefused, RevisionFetched
from plugshare.replication.protocol import DocRefused
from plugshare.store.base import NotFound
from plugshare.token import IntegrityError
from plugshare.token.chunkseal import PLAINTEXT_CHUNK
from plugshare.token.door import Door
from plugshare.token.soft_keystore import SoftKeystore
from plugshare.token.token import Token
from tests.replication.test_attachment_sync import RecordingSide, read_attachment
from tests.replication.test_replicator import everything, linked, stores, until  # noqa: F401
from tests.store.test_attachments import random_bytes

MIB = 1024 * 1024


@pytest.fixture
def door(tmp_path):
    token, _ = Token.create(tmp_path / "token", SoftKeystore(tmp_path / "keystore", None), name="t")
    try:
        share = token.create_share("secret", "io.files", encrypted=True).share_id
        yield Door(token), share, token
    finally:
        token.close()


def sealed_pieces(door, share, doc_id, data, revpos, *, order=None):
    d = door
    plain = [data[i : i + PLAINTEXT_CHUNK] for i in range(0, len(data), PLAINTEXT_CHUNK)]
    sealed = [d.handle("share.seal_chunks", {"share": share, "doc_id": doc_id, "name": "file.bin",
                                             "revpos": revpos, "first": i, "last": i == len(plain) - 1,
                                             "chunks": [piece]})["chunks"][0]
              for i, piece in enumerate(plain)]
    return [sealed[i] for i in (order or range(len(sealed)))]


async def put_sealed_file(store, door, share, doc_id, data, *, order=None):
    rev = await store.put({"_id": doc_id, "doctype": "io.files"})
    pieces = sealed_pieces(door, share, doc_id, data, revpos=2, order=order)

    async def stream():
        for piece in pieces:
            yield piece

    return await store.put_attachment(doc_id, rev, "file.bin", "application/octet-stream", stream())


def token_check(door, share):
    async def check(_share, doc, name, revpos, chunks, count):
        for index, data in chunks:
            try:
                door.handle("share.open_chunks", {"share": share, "doc_id": doc["_id"], "name": name,
                                                  "revpos": revpos, "first": index,
                                                  "last": index == count - 1, "chunks": [data]})
            except IntegrityError as error:
                raise ChunkRefused(str(error)) from None
    return check


class CheckingSide(RecordingSide):
    check_chunks = None

    async def replicate(self, connection, peer_id: bytes) -> None:
        from plugshare.replication.replicator import PeerReplication, store_instance_id

        self.connection = connection
        self.store_id = self.store_id or await store_instance_id(self.store)
        self.replication = PeerReplication(
            connection, self.store, peer=peer_id.hex(), store_id=self.store_id,
            accept_share=self.accept_share, on_event=self.events, config=self.config,
            check_chunks=self.check_chunks,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(self.replication.run)
            for share, in_scope in self.pushes.items():
                self.replication.start_push(share, in_scope=in_scope)


async def test_sealed_chunks_are_checked_by_the_token_and_kept_sealed(stores, door):
    d, share, _ = door
    store_a, store_b = stores
    data = random_bytes(3 * MIB + 11, seed=41)
    await put_sealed_file(store_a, d, share, "f", data)
    a = RecordingSide("a", store_a, pushes={"notes": everything})
    b = CheckingSide("b", store_b)
    b.check_chunks = token_check(d, share)
    async with linked(a, b):
        await until(lambda: b.events.of(RevisionFetched, doc_id="f"), b.events)
    stored = await read_attachment(store_b, "f")
    assert stored == await read_attachment(store_a, "f") and data[:1000] not in stored  # sealed


@pytest.mark.parametrize("order", ["reordered", "swapped"])
async def test_a_reordered_or_swapped_sealed_chunk_is_refused_and_audited(stores, door, order):
    d, share, token = door
    store_a, store_b = stores
    data = random_bytes(3 * MIB, seed=42)
    if order == "reordered":
        await put_sealed_file(store_a, d, share, "f", data, order=[0, 2, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
    else:  # chunk 1 of another document's file in its place
        other = sealed_pieces(d, share, "g", data, revpos=2)
        mine = sealed_pieces(d, share, "f", data, revpos=2)
        rev = await store_a.put({"_id": "f", "doctype": "io.files"})

        async def stream():
            for piece in [mine[0], other[1], *mine[2:]]:
                yield piece

        await store_a.put_attachment("f", rev, "file.bin", "application/octet-stream", stream())
    a = RecordingSide("a", store_a, pushes={"notes": everything})
    b = CheckingSide("b", store_b)
    b.check_chunks = token_check(d, share)
    async with linked(a, b):
        await until(lambda: b.events.of(DocRefused, doc_id="f"), b.events)
    [refused] = b.events.of(DocRefused, doc_id="f")
    assert "fails authentication" in refused.reason
    with pytest.raises(NotFound):
        await store_b.get("f")
    assert any(e.action == "attachment-open" and not e.allowed and e.doc_id == "f"
               for e in token.audit_tail(20))
