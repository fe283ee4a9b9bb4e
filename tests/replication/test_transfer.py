"""The attachment transfer's target side (`transfer.ChunkFetch`, pure): it asks only for the
chunks the store lacks, never more than `WINDOW` at once, and refuses what does not check."""

import hashlib

import pytest

from plugshare.replication import transfer
from plugshare.store.attachments import CHUNK_SIZE
from tests.store.test_attachments import md5_digest, random_bytes


def pieces(data):
    return [data[i : i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)]


def fetch_of(data):
    fetch = transfer.ChunkFetch(1, "s", "d", "1-" + "a" * 32, "f", length=len(data),
                                digest=md5_digest(data))
    hashes = [hashlib.sha256(p).digest() for p in pieces(data)]
    fetch.manifest(transfer.manifest_message(1, len(data), md5_digest(data), hashes))
    return fetch, hashes


def test_only_missing_chunks_are_asked_each_once_and_at_most_a_window_at_a_time():
    chunk = random_bytes(CHUNK_SIZE, seed=1)
    data = b"".join([chunk, random_bytes(CHUNK_SIZE * 20, seed=2), chunk])  # chunk 0 == 21
    fetch, hashes = fetch_of(data)
    fetch.held({hashes[1], hashes[2]})
    asked = []
    while not fetch.complete:
        for ask in fetch.asks():
            assert len(ask["indexes"]) <= transfer.MAX_GET_INDEXES
            asked += ask["indexes"]
        assert len(asked) - fetch.fetched <= transfer.WINDOW
        index = asked[fetch.fetched]
        fetch.chunk(transfer.chunk_message(1, index, pieces(data)[index]))
    assert sorted(asked) == [0, *range(3, 21)]  # not the held ones, not chunk 21 again


def test_a_fetch_keeps_16_mib_in_flight_in_gets_a_peer_of_before_accepts():
    """Issue 13's speed: 4 MiB in flight left the link idle while the target staged a batch
    durably; 16 MiB keep it busy. Each `att.get` still lists at most the 16 indexes a source
    that predates this accepts."""
    fetch, _ = fetch_of(random_bytes(CHUNK_SIZE * 100, seed=9))
    fetch.held(set())
    asks = fetch.asks()
    asked = [index for ask in asks for index in ask["indexes"]]
    assert asked == list(range(64)) and transfer.WINDOW * CHUNK_SIZE == 16 * 1024 * 1024
    assert all(len(ask["indexes"]) <= 16 for ask in asks) and transfer.MAX_GET_INDEXES == 16
    assert fetch.asks() == []  # the window is full


def test_a_tampered_or_swapped_chunk_or_one_not_asked_for_is_refused():
    data = random_bytes(3 * CHUNK_SIZE, seed=3)
    fetch, hashes = fetch_of(data)
    fetch.held(set())
    [ask] = fetch.asks()
    assert ask["indexes"] == [0, 1, 2]
    tampered = bytearray(pieces(data)[0])
    tampered[7] ^= 1
    with pytest.raises(transfer.TransferError, match="does not match"):
        fetch.chunk(transfer.chunk_message(1, 0, bytes(tampered)))
    with pytest.raises(transfer.TransferError, match="does not match"):
        fetch.chunk(transfer.chunk_message(1, 0, pieces(data)[1]))  # chunk 1 sent as chunk 0
    fetch.chunk(transfer.chunk_message(1, 0, pieces(data)[0]))
    with pytest.raises(transfer.TransferError, match="not asked"):
        fetch.chunk(transfer.chunk_message(1, 0, pieces(data)[0]))  # sent twice


def test_a_manifest_that_disagrees_with_the_stub_is_refused():
    data = random_bytes(CHUNK_SIZE + 1, seed=4)
    fetch = transfer.ChunkFetch(1, "s", "d", "1-" + "a" * 32, "f", length=len(data),
                                digest=md5_digest(data))
    hashes = [hashlib.sha256(p).digest() for p in pieces(data)]
    with pytest.raises(transfer.TransferError, match="stub"):
        fetch.manifest(transfer.manifest_message(1, len(data) + 1, md5_digest(data), hashes))
    with pytest.raises(transfer.TransferError, match="2 SHA-256"):
        fetch.manifest(transfer.manifest_message(1, len(data), md5_digest(data), hashes[:1]))
    with pytest.raises(transfer.TransferError, match="2 SHA-256"):
        fetch.manifest(transfer.manifest_message(1, len(data), md5_digest(data), [b"x", b"y"]))


def _fed(fetch, data, order):
    for index in order:
        fetch.check([fetch.take(transfer.chunk_message(1, index, pieces(data)[index]))])


def test_the_file_md5_is_computed_on_the_way_when_every_chunk_comes_once_in_order():
    data = random_bytes(5 * CHUNK_SIZE + 9, seed=5)
    fetch, _ = fetch_of(data)
    fetch.held(set())
    fetch.asks()
    _fed(fetch, data, range(6))
    assert fetch.complete and fetch.data_digest() == md5_digest(data)


@pytest.mark.parametrize("case", ["out of order", "one held", "a chunk twice in the file",
                                  "incomplete"])
def test_no_md5_on_the_way_when_the_chunks_do_not_all_come_in_order(case):
    data = random_bytes(4 * CHUNK_SIZE, seed=6)
    if case == "a chunk twice in the file":
        data = data[:CHUNK_SIZE] * 2 + data[2 * CHUNK_SIZE:]
    fetch, hashes = fetch_of(data)
    fetch.held({hashes[2]} if case == "one held" else set())
    fetch.asks()
    order = {"out of order": [1, 0, 2, 3], "one held": [0, 1, 3],
             "a chunk twice in the file": [0, 2, 3], "incomplete": [0, 1, 2]}[case]
    _fed(fetch, data, order)
    assert fetch.complete == (case != "incomplete")
    assert fetch.data_digest() is None
