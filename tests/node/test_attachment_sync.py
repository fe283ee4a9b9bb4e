"""Attachments between two real nodes (`plugshare run` subprocesses, real pinned-TLS links,
real stores): the data travels on demand, and a transfer cut by SIGKILL resumes where it
stopped. Until the node's own attachment API lands, the owner's files are put through its
store while it is stopped."""

from __future__ import annotations

import hashlib
import re

import trio

from plugshare.store.sqlite import SQLiteStore
from tests.node.cluster import cluster, share_between, wait_until  # noqa: F401
from tests.store.test_attachments import md5_digest, random_bytes, stream

FILES = "io.files"
MIB = 1024 * 1024


def put_file_offline(node, doc_id: str, data: bytes) -> None:
    """Put a doc of `FILES` with `data` as attachment `file.bin` into a stopped node's store."""
    async def put():
        store = await SQLiteStore.open(node.home / "store.sqlite")
        try:
            rev = await store.put({"_id": doc_id, "doctype": FILES, "title": doc_id})
            await store.put_attachment(doc_id, rev, "file.bin", "application/octet-stream",
                                       stream(data, MIB))
        finally:
            await store.aclose()

    was_running = node.running is not None
    node.stop()
    trio.run(put)
    if was_running:
        node.start()


def read_file_offline(node, doc_id: str) -> bytes:
    async def read():
        store = await SQLiteStore.open(node.home / "store.sqlite")
        try:
            _, data = await store.open_attachment(doc_id, "file.bin")
            return b"".join([piece async for piece in data])
        finally:
            await store.aclose()

    node.stop()
    return trio.run(read)


def fetch_counts(log: str, doc_id: str) -> list[tuple[int, int]]:
    """(to fetch, held already) of each fetch of `doc_id`'s file the log shows."""
    pattern = rf"fetching attachment 'file.bin' of {doc_id} from peer \S+: (\d+) chunks to fetch, (\d+) held"
    return [(int(a), int(b)) for a, b in re.findall(pattern, log)]


def test_a_receiver_killed_mid_transfer_resumes_without_the_chunks_it_stored(cluster):
    alice, bob = cluster.add("alice"), cluster.add("bob")
    share_between(alice, [bob], name="files", doctype=FILES)
    data = random_bytes(100 * MIB, seed=7)
    chunks = -(-len(data) // (256 * 1024))
    put_file_offline(alice, "big", data)

    wait_until(lambda: re.search(r"attachment 'file.bin' of big: \d+ chunks fetched", bob.log()),
               120, what="bob to have fetched part of the file")
    bob.kill()
    assert not re.search(r"wrote revision \S+ of big", bob.log())
    bob.start()
    wait_until(lambda: bob.get("big"), 180, what="the file's doc on bob after the restart")
    [(to_fetch, held)] = fetch_counts(bob.log(), "big")
    assert held >= 64 and to_fetch + held == chunks  # what was stored was not sent again
    served = sum(int(n) for n in re.findall(r"served (\d+) chunks", alice.log()))
    assert served <= chunks - 64 + 8  # this run's serving, at most a window more than needed
    doc = bob.get("big")
    assert doc["_attachments"]["file.bin"]["digest"] == md5_digest(data)
    assert hashlib.sha256(read_file_offline(bob, "big")).digest() == hashlib.sha256(data).digest()


def test_a_sender_killed_mid_transfer_then_restarted_resumes_where_it_stopped(cluster):
    alice, bob = cluster.add("alice"), cluster.add("bob")
    share_between(alice, [bob], name="files", doctype=FILES)
    data = random_bytes(100 * MIB, seed=8)
    chunks = -(-len(data) // (256 * 1024))
    put_file_offline(alice, "big", data)

    wait_until(lambda: re.search(r"attachment 'file.bin' of big: \d+ chunks fetched", bob.log()),
               120, what="bob to have fetched part of the file")
    alice.kill()
    alice.start()
    wait_until(lambda: bob.get("big"), 180, what="the file's doc on bob after alice's restart")
    first, second = fetch_counts(bob.log(), "big")
    assert first == (chunks, 0)
    assert second[1] >= 64 and sum(second) == chunks  # the stored chunks were not sent again
    assert hashlib.sha256(read_file_offline(bob, "big")).digest() == hashlib.sha256(data).digest()


def test_a_small_doc_overtakes_a_100_mb_file_and_a_copy_of_the_file_sends_no_chunk(cluster):
    alice, bob = cluster.add("alice"), cluster.add("bob")
    share_between(alice, [bob], name="files", doctype=FILES)
    data = random_bytes(100 * MIB, seed=9)
    chunks = -(-len(data) // (256 * 1024))
    put_file_offline(alice, "big", data)

    wait_until(lambda: re.search(r"attachment 'file.bin' of big: \d+ chunks fetched", bob.log()),
               120, what="bob to have fetched part of the file")
    alice.put(FILES, {"title": "small", "text": "x" * 1000}, "small")
    wait_until(lambda: bob.get("small"), 120, what="the small doc on bob")
    # Ordering, not timing: the small doc is readable on bob while the big one is not yet.
    assert bob.get("big") is None
    assert not re.search(r"wrote revision \S+ of big", bob.log())
    wait_until(lambda: bob.get("big"), 180, what="the file's doc on bob")

    put_file_offline(alice, "copy", data)  # the same file in another document
    wait_until(lambda: bob.get("copy"), 120, what="the copy's doc on bob")
    assert fetch_counts(bob.log(), "copy") == [(0, chunks)]  # no chunk travelled for it
    assert re.search(r"fetched attachment 'file.bin' of copy from peer \S+: 0 chunks \(0 bytes\)",
                     bob.log())


def test_a_file_syncs_to_a_node_on_the_couchdb_backend_and_resumes_there(cluster, couchdb_url):
    alice = cluster.add("alice")
    bob = cluster.add("bob", "--store", "couchdb", "--couchdb-url", couchdb_url)
    share_between(alice, [bob], name="files", doctype=FILES)
    data = random_bytes(40 * MIB, seed=12)
    chunks = -(-len(data) // (256 * 1024))
    put_file_offline(alice, "f", data)

    wait_until(lambda: re.search(r"attachment 'file.bin' of f: \d+ chunks fetched", bob.log()),
               120, what="bob to have fetched part of the file")
    bob.kill()
    bob.start()
    wait_until(lambda: bob.get("f"), 180, what="the file's doc on bob after the restart")
    [(to_fetch, held)] = fetch_counts(bob.log(), "f")
    assert held >= 64 and to_fetch + held == chunks  # staged in CouchDB, not sent again
    assert bob.get("f")["_attachments"]["file.bin"]["digest"] == md5_digest(data)
