"""Attachments held without their data (a share fetched on read): the embedded store writes
the replicated revision with its stubs alone, says the data is absent when it is opened,
and takes the data in later (`fill_absent`), checked, the revision unchanged."""

import pytest

from plugshare.store.attachments import CHUNK_SIZE
from plugshare.store.base import BadRequest, DataAbsent
from plugshare.store.sqlite import SQLiteStore
from tests.store.test_attachments import md5_digest, random_bytes


async def stream(data: bytes):
    for i in range(0, len(data), 1000):
        yield data[i : i + 1000]


def replicated_doc(data: bytes, rev_hash: str = "a" * 32) -> dict:
    return {"_id": "d", "_rev": "1-" + rev_hash, "_revisions": {"start": 1, "ids": [rev_hash]},
            "title": "scan",
            "_attachments": {"f": {"stub": True, "content_type": "x/y", "length": len(data),
                                   "digest": md5_digest(data), "revpos": 1}}}


async def test_a_revision_without_its_data_is_written_then_filled(tmp_path):
    data = random_bytes(2 * CHUNK_SIZE + 5)
    path = tmp_path / "store.sqlite"
    store = await SQLiteStore.open(path)
    doc = replicated_doc(data)
    with pytest.raises(BadRequest, match="missing stub"):  # the eager path refuses it
        await store.put_replicated(doc, {})
    await store.put_replicated_absent(doc, "share-1")
    got = await store.get("d")
    assert got["_rev"] == doc["_rev"] and got["title"] == "scan"
    assert got["_attachments"]["f"] == {**doc["_attachments"]["f"]}  # a plain stub
    assert (await store.info())["attachment_chunks"] == 0
    assert await store.absent_attachments("d", doc["_rev"]) == {"f": "share-1"}
    assert await store.absent_documents() == [("d", doc["_rev"])]
    with pytest.raises(DataAbsent) as absent:
        await store.open_attachment("d", "f")
    assert absent.value.source == "share-1" and absent.value.meta.length == len(data)
    await store.aclose()

    store = await SQLiteStore.open(path)  # kept across a restart
    try:
        with pytest.raises(BadRequest):  # data that does not match the stub is refused
            await store.fill_absent("d", doc["_rev"], "f", stream(data[:-1] + b"x"))
        assert await store.absent_attachments("d", doc["_rev"]) == {"f": "share-1"}
        seq = (await store.info())["update_seq"]
        assert await store.fill_absent("d", doc["_rev"], "f", stream(data)) is True
        assert await store.fill_absent("d", doc["_rev"], "f", stream(data)) is False
        assert (await store.info())["update_seq"] == seq  # the revision did not change
        _, body = await store.open_attachment("d", "f", range=(CHUNK_SIZE - 3, CHUNK_SIZE + 4))
        assert b"".join([p async for p in body]) == data[CHUNK_SIZE - 3 : CHUNK_SIZE + 4]
        assert await store.absent_attachments("d", doc["_rev"]) == {}
        assert await store.absent_documents() == []
        await store.compact()
        assert (await store.info())["attachment_chunks"] == 3
    finally:
        await store.aclose()


async def test_an_edit_on_top_of_absent_data_keeps_it_absent_until_filled(tmp_path):
    data = random_bytes(CHUNK_SIZE + 1)
    store = await SQLiteStore.open(tmp_path / "store.sqlite")
    try:
        doc = replicated_doc(data)
        await store.put_replicated_absent(doc, "s")
        edited = {k: v for k, v in doc.items() if k != "_revisions"}
        rev2 = await store.put({**edited, "title": "renamed"})
        assert await store.absent_attachments("d", rev2) == {"f": "s"}
        assert await store.fill_absent("d", rev2, "f", stream(data))
        _, body = await store.open_attachment("d", "f")
        assert b"".join([p async for p in body]) == data
    finally:
        await store.aclose()


async def test_only_the_attachments_not_held_are_kept_absent(tmp_path):
    held, missing = random_bytes(1000), random_bytes(CHUNK_SIZE + 3)
    store = await SQLiteStore.open(tmp_path / "store.sqlite")
    try:
        first = {"_id": "d", "_rev": "1-" + "a" * 32, "_revisions": {"start": 1, "ids": ["a" * 32]},
                 "_attachments": {"a": {"follows": True, "content_type": "x/y",
                                        "length": len(held), "digest": md5_digest(held),
                                        "revpos": 1}}}
        await store.put_replicated(first, {"a": stream(held)})
        second = {"_id": "d", "_rev": "2-" + "b" * 32,
                  "_revisions": {"start": 2, "ids": ["b" * 32, "a" * 32]},
                  "_attachments": {
                      "a": {"stub": True, "content_type": "x/y", "length": len(held),
                            "digest": md5_digest(held), "revpos": 1},
                      "b": {"stub": True, "content_type": "x/z", "length": len(missing),
                            "digest": md5_digest(missing), "revpos": 2}}}
        await store.put_replicated_absent(second, "s")
        assert await store.absent_attachments("d", second["_rev"]) == {"b": "s"}
        _, body = await store.open_attachment("d", "a")
        assert b"".join([p async for p in body]) == held
        with pytest.raises(BadRequest, match="full stub"):
            await store.put_replicated_absent(
                {**second, "_rev": "3-" + "c" * 32,
                 "_revisions": {"start": 3, "ids": ["c" * 32, "b" * 32, "a" * 32]},
                 "_attachments": {"c": {"stub": True, "digest": md5_digest(b"x"),
                                        "revpos": 3}}}, "s")
    finally:
        await store.aclose()
