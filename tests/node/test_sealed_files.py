"""Attachments of sealed documents (issue 13 item 4, on the write path): on a sensitive doctype
or in an encrypted share, the data is sealed chunk by chunk by the token as it streams in
(never stored in clear) and opened by the token as it streams out to a reader it allows; a
tampered stored chunk is refused and audited. Real nodes, real sockets, the real token and
store."""

from __future__ import annotations

import hashlib
import sqlite3

import httpx
import pytest

from tests.node.cluster import cluster, share_between, wait_until  # noqa: F401 (fixture)

MB = 1024 * 1024
MARKER = b"PLAINTEXT-MARKER-7f3c"


def _http(node) -> httpx.Client:
    running = node.running
    return httpx.Client(base_url=running.api_url, timeout=300,
                        headers={"Authorization": f"Bearer {running.credential}"})


def _pieces(data: bytes, size: int = 64 * 1024):
    for start in range(0, len(data), size):
        yield data[start:start + size]


def _marked(size: int) -> bytes:
    """`size` bytes with the marker all through them (so any clear chunk would show it)."""
    unit = MARKER + bytes(range(256)) * 4
    return (unit * (size // len(unit) + 1))[:size]


def _stored_bytes(home) -> bytes:
    """Everything the embedded store wrote: its file, and the packs of chunks it received."""
    packs = sorted((home / "store.sqlite-chunks").glob("pack-*"))
    return b"".join(path.read_bytes() for path in [home / "store.sqlite", *packs])


def _tamper_one_chunk(home) -> None:
    """Flip one byte in the middle of one stored chunk of the embedded store."""
    db = sqlite3.connect(home / "store.sqlite")
    try:
        with db:
            chunk_id, data, pack, offset, size = db.execute(
                "SELECT id, data, pack, pack_offset, pack_size FROM chunks ORDER BY id LIMIT 1"
            ).fetchone()
            if pack is None:  # in its row
                flipped = bytearray(data)
                flipped[len(flipped) // 2] ^= 0x01
                db.execute("UPDATE chunks SET data = ? WHERE id = ?", (bytes(flipped), chunk_id))
                return
    finally:
        db.close()
    with (home / "store.sqlite-chunks" / f"pack-{pack:08d}").open("r+b") as packed:  # in a pack
        packed.seek(offset + size // 2)
        byte = packed.read(1)[0]
        packed.seek(offset + size // 2)
        packed.write(bytes([byte ^ 0x01]))


def _refused_opens(node) -> list[dict]:
    entries = node.cli_json("audit", "--tail", "1000")["entries"]
    return [e for e in entries if e["action"] == "attachment-open" and not e["allowed"]]


def test_an_attachment_on_a_sensitive_doctype_is_sealed_at_write_and_opened_at_read(cluster):
    alice = cluster.add("alice")
    alice.cli_ok("encrypt", "io.health")
    data = _marked(3 * MB + 777)  # several sealed chunks, the last one short
    with _http(alice) as http:
        made = http.put("/data/io.health/h1/scan.pdf", content=_pieces(data),
                        headers={"content-type": "application/pdf"})
        assert made.status_code == 201, made.text
        got = http.get("/data/io.health/h1/scan.pdf")
        assert got.status_code == 200, got.text
        assert got.content == data
        assert int(got.headers["content-length"]) == len(data)
        part = http.get("/data/io.health/h1/scan.pdf", headers={"range": "bytes=300000-900009"})
        assert part.status_code == 206 and part.content == data[300000:900010]
        tail = http.get("/data/io.health/h1/scan.pdf", headers={"range": "bytes=-10"})
        assert tail.status_code == 206 and tail.content == data[-10:]
    alice.stop()
    assert MARKER not in _stored_bytes(alice.home)

    _tamper_one_chunk(alice.home)
    alice.start()
    with _http(alice) as http:
        try:
            refused = http.get("/data/io.health/h1/scan.pdf")
            assert refused.status_code != 200 or refused.content != data
        except httpx.HTTPError:
            pass  # the stream is cut where the tampered chunk stands: as good as refused
        assert http.get("/data/io.health/h1").status_code == 200  # the node serves on
    assert _refused_opens(alice)


def test_an_encrypted_share_syncs_a_sealed_20mb_attachment_the_member_reads_equal(cluster):
    alice, bob = cluster.add("alice"), cluster.add("bob")
    share_between(alice, [bob], name="vault", doctype="io.files", encrypt=True)
    data = _marked(20 * MB + 12345)
    with _http(alice) as http:
        made = http.put("/data/io.files/f1/big.bin", content=_pieces(data, MB))
        assert made.status_code == 201, made.text
        rev = made.json()["rev"]
    wait_until(lambda: (bob.get("f1") or {}).get("_rev") == rev, 240,
               what="the sealed file's revision on bob")
    with _http(bob) as http:
        got = http.get("/data/io.files/f1/big.bin")
        assert got.status_code == 200, got.text
        assert hashlib.sha256(got.content).digest() == hashlib.sha256(data).digest()
    alice.stop()
    assert MARKER not in _stored_bytes(alice.home)
    bob.stop()
    assert MARKER not in _stored_bytes(bob.home)


def test_the_node_cuts_clear_data_as_the_token_seals_it():
    from plugshare.node import sealed_files
    from plugshare.token import chunkseal
    from plugshare.token.door import MAX_CHUNKS

    assert sealed_files.SEALED_CHUNK == chunkseal.CHUNK_SIZE
    assert sealed_files.OVERHEAD == chunkseal.OVERHEAD
    assert sealed_files.PLAIN_CHUNK == chunkseal.PLAINTEXT_CHUNK
    assert sealed_files.BATCH <= MAX_CHUNKS and sealed_files.CHECK_BATCH <= MAX_CHUNKS
    plain = sealed_files.PLAIN_CHUNK
    for clear in (1, plain, plain + 1, 10 * plain - 3):
        chunks = -(-clear // plain)
        assert sealed_files.clear_length(clear + chunks * chunkseal.OVERHEAD) == clear


def test_a_sealed_doc_with_a_file_reads_with_clear_stubs_and_edits_keep_the_file(cluster):
    alice = cluster.add("alice")
    alice.cli_ok("encrypt", "io.health")
    data = _marked(600_000)
    with _http(alice) as http:
        made = http.put("/data/io.health/h1/scan.pdf", content=_pieces(data),
                        headers={"content-type": "application/pdf"})
        assert made.status_code == 201, made.text
        doc = http.get("/data/io.health/h1").json()
        stub = doc["_attachments"]["scan.pdf"]
        assert stub["length"] == len(data)  # the clear form's, as the file's own GET says
        head = http.head("/data/io.health/h1/scan.pdf")
        assert int(head.headers["content-length"]) == len(data)
        assert head.headers["etag"] == f'"{stub["digest"]}"'
        # an edit carrying the stubs as read keeps the file, sealed
        edited = http.put("/data/io.health/h1", json={**doc, "note": "seen by Dr. B"})
        assert edited.status_code in (200, 201), edited.text
        again = http.get("/data/io.health/h1").json()
        assert again["note"] == "seen by Dr. B"
        assert again["_attachments"]["scan.pdf"]["length"] == len(data)
        assert http.get("/data/io.health/h1/scan.pdf").content == data
        # the CouchDB-compatible API serves it opened too, with the same stub
        couch = http.get("/couch/io.health/h1").json()
        assert couch["_attachments"]["scan.pdf"]["length"] == len(data)
        assert http.get("/couch/io.health/h1/scan.pdf").content == data
        part = http.get("/couch/io.health/h1/scan.pdf", headers={"range": "bytes=5-9"})
        assert part.status_code == 206 and part.content == data[5:10]


def test_a_sensitive_doc_with_a_file_is_withheld_from_a_plain_share_not_sent_unopenable(cluster):
    """Its data is sealed under the owner's doctype key, which the member does not hold:
    until the link carries such data opened (issue 13, item 2), the owner withholds the
    doc (audited) rather than send the member a file it could never open."""
    alice, bob = cluster.add("alice"), cluster.add("bob")
    alice.cli_ok("encrypt", "io.health")
    with _http(alice) as http:
        made = http.put("/data/io.health/h1/scan.pdf", content=_marked(300_000))
        assert made.status_code == 201, made.text
    share_between(alice, [bob], name="health", doctype="io.health")
    alice.put("io.health", {"note": "no file"}, "h2")
    wait_until(lambda: bob.get("h2"), 120, what="the doc without a file on bob")
    assert bob.get("h1") is None
    entries = alice.cli_json("audit", "--tail", "1000")["entries"]
    assert [e for e in entries if e["action"] == "share-send" and not e["allowed"]]


def test_bad_input_on_a_sealed_file_is_refused_and_leaves_the_previous_revision(cluster):
    import base64

    alice = cluster.add("alice")
    alice.cli_ok("encrypt", "io.health")
    data = _marked(700_000)
    with _http(alice) as http:
        made = http.put("/data/io.health/h1/scan.pdf", content=_pieces(data))
        assert made.status_code == 201, made.text
        rev = made.json()["rev"]
        wrong_md5 = base64.b64encode(hashlib.md5(b"other").digest()).decode()
        bad = http.put("/data/io.health/h1/scan.pdf", params={"rev": rev},
                       content=_pieces(_marked(500_000)), headers={"content-md5": wrong_md5})
        assert bad.status_code == 400 and "digest" in bad.json()["reason"], bad.text
        assert http.get("/data/io.health/h1").json()["_rev"] == rev
        assert http.get("/data/io.health/h1/scan.pdf").content == data
        # a second file on the same doc keeps the first one readable
        second = http.put("/data/io.health/h1/notes.txt", params={"rev": rev},
                          content=b"PLAINTEXT-MARKER-7f3c notes", headers={"content-type": "text/plain"})
        assert second.status_code == 201, second.text
        assert http.get("/data/io.health/h1/scan.pdf").content == data
        assert http.get("/data/io.health/h1/notes.txt").content == b"PLAINTEXT-MARKER-7f3c notes"
    alice.stop()
    assert MARKER not in _stored_bytes(alice.home)


def test_a_member_writes_a_sealed_file_in_an_encrypted_share_the_owner_reads_it(cluster):
    alice, bob = cluster.add("alice"), cluster.add("bob")
    share_between(alice, [bob], name="vault", doctype="io.files", encrypt=True)
    data = _marked(1_200_000)
    with _http(bob) as http:
        made = http.put("/data/io.files/b1/from-bob.bin", content=_pieces(data))
        assert made.status_code == 201, made.text
        rev = made.json()["rev"]
    wait_until(lambda: (alice.get("b1") or {}).get("_rev") == rev, 120,
               what="bob's sealed file on alice")
    with _http(alice) as http:
        assert http.get("/data/io.files/b1/from-bob.bin").content == data
    bob.stop()
    assert MARKER not in _stored_bytes(bob.home)


def test_an_empty_sealed_file_reads_empty(cluster):
    alice = cluster.add("alice")
    alice.cli_ok("encrypt", "io.health")
    with _http(alice) as http:
        made = http.put("/data/io.health/e1/empty.txt", content=b"")
        assert made.status_code == 201, made.text
        assert http.get("/data/io.health/e1").json()["_attachments"]["empty.txt"]["length"] == 0
        got = http.get("/data/io.health/e1/empty.txt")
        assert got.status_code == 200 and got.content == b""


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "clear"])
def test_an_upload_another_write_overtook_is_a_409_never_a_second_branch(cluster, sealed):
    """The upload is decided on the current revision, then its data streams in for as long as
    it takes: an edit that lands meanwhile wins, and the upload is refused as any stale edit
    is (409), leaving that edit's revision alone, without a conflict."""
    import threading

    alice = cluster.add("alice")
    if sealed:
        alice.cli_ok("encrypt", "io.health")
    rev = alice.put("io.health", {"title": "scan"}, "h9")
    data = _marked(12 * MB)
    streaming, overtaken = threading.Event(), threading.Event()

    def slow_body():
        yield data[:MB]
        yield data[MB:10 * MB]  # more than loopback buffers hold: the node is reading it
        streaming.set()
        assert overtaken.wait(60)
        yield data[10 * MB:]

    answers = {}

    def upload():
        with _http(alice) as http:
            answers["upload"] = http.put(f"/data/io.health/h9/scan.pdf?rev={rev}",
                                         content=slow_body(),
                                         headers={"content-type": "application/pdf"})

    uploading = threading.Thread(target=upload)
    uploading.start()
    assert streaming.wait(60)  # decided on `rev`, its data coming in
    edited = alice.put("io.health", {"title": "renamed"}, "h9", rev)
    overtaken.set()
    uploading.join(120)
    assert answers["upload"].status_code == 409, answers["upload"].text
    stored = alice.get("h9", conflicts=True)
    assert stored["_rev"] == edited and stored["title"] == "renamed"
    assert "_conflicts" not in stored and "_attachments" not in stored
