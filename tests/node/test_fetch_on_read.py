"""A member that fetches a share's attachment data on first read (`plugshare share fetch NAME
on-read`; issue 13 item 3): documents replicate with their stubs alone, the first read of an
attachment fetches its chunks from a connected member (checked, sealed ones opened by the
token) and streams them as they come, and the data is then local. Real nodes, real sockets,
the real token and store."""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import re

import httpx
import pytest

from tests.node.cluster import ApiError, cluster, share_between, wait_until  # noqa: F401

FILES = "io.files"
MB = 1024 * 1024
CHUNK = 256 * 1024


def _http(node) -> httpx.Client:
    running = node.running
    return httpx.Client(base_url=running.api_url, timeout=300,
                        headers={"Authorization": f"Bearer {running.credential}"})


def _data(size: int, seed: int) -> bytes:
    out, block = bytearray(), hashlib.sha256(seed.to_bytes(4, "big")).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:size])


def _put_file(node, doc_id: str, data: bytes) -> str:
    with _http(node) as http:
        made = http.put(f"/data/{FILES}/{doc_id}/file.bin", content=data,
                        headers={"content-type": "application/octet-stream"})
        assert made.status_code == 201, made.text
        return made.json()["rev"]


def _chunks_held(node) -> int:
    return node.status()["store"]["attachment_chunks"]


def _fetches_on_read(node, doc_id: str) -> int:
    return len(re.findall(rf"fetched the data of attachment 'file.bin' of {doc_id}, ", node.log()))


def _served_chunks(node) -> int:
    return sum(int(n) for n in re.findall(r"served (\d+) chunks", node.log()))


def _on_read_member(cluster, *, encrypt: bool = False):
    alice, bob = cluster.add("alice"), cluster.add("bob")
    share_between(alice, [bob], name="files", doctype=FILES, encrypt=encrypt)
    assert bob.share("files")["fetch"] == "eager"  # the default
    answer = bob.cli_json("share", "fetch", "files", "on-read")
    assert answer == {"share": "files", "fetch": "on-read"}
    assert bob.share("files")["fetch"] == "on-read"
    assert "fetch    on-read" in bob.cli_ok("share", "show", "files")
    return alice, bob


def test_an_on_read_member_fetches_a_file_when_first_read_then_reads_it_locally(cluster):
    alice, bob = _on_read_member(cluster)
    data = _data(3 * MB + 1234, seed=1)
    rev = _put_file(alice, "f1", data)
    wait_until(lambda: (bob.get("f1") or {}).get("_rev") == rev, 120, what="f1's doc on bob")
    stub = bob.get("f1")["_attachments"]["file.bin"]
    assert stub["length"] == len(data) and stub["stub"] is True
    assert stub["local"] is False  # the stub says the data is not here
    assert bob.cli_json("file", "ls", "f1")["attachments"][0]["local"] is False
    assert "not local" in bob.cli_ok("file", "ls", "f1")
    assert _chunks_held(bob) == 0  # the doc came, no chunk of its data

    with _http(bob) as http:
        # A range of data not here yet: fetched, and the exact bytes given.
        part = http.get(f"/data/{FILES}/f1/file.bin", headers={"range": "bytes=300000-900009"})
        assert part.status_code == 206, part.text
        assert part.content == data[300000:900010]
        whole = http.get(f"/data/{FILES}/f1/file.bin")
        assert whole.status_code == 200, whole.text
        assert whole.content == data
    wait_until(lambda: _fetches_on_read(bob, "f1") >= 1, 60, what="f1's data stored on bob")
    assert _fetches_on_read(bob, "f1") == 1  # the two reads fetched it once
    assert _chunks_held(bob) == -(-len(data) // CHUNK)
    assert "local" not in bob.get("f1")["_attachments"]["file.bin"]
    assert bob.cli_json("file", "ls", "f1")["attachments"][0]["local"] is True

    alice.stop()  # the next read is local
    with _http(bob) as http:
        again = http.get(f"/data/{FILES}/f1/file.bin")
        assert again.status_code == 200 and again.content == data
        couch = http.get(f"/couch/{FILES}/f1/file.bin")
        assert couch.status_code == 200 and couch.content == data
    assert bob.cli("file", "get", "f1", "file.bin", "-o", str(cluster.root / "out.bin")).returncode == 0
    assert (cluster.root / "out.bin").read_bytes() == data


def test_a_read_with_no_member_connected_is_a_clear_503_naming_the_share(cluster):
    alice, bob = _on_read_member(cluster)
    data = _data(CHUNK + 10, seed=2)
    rev = _put_file(alice, "f2", data)
    wait_until(lambda: (bob.get("f2") or {}).get("_rev") == rev, 120, what="f2's doc on bob")
    alice.stop()
    wait_until(lambda: not bob.peer_connected(alice), 60, what="bob to see alice gone")
    with _http(bob) as http:
        refused = http.get(f"/data/{FILES}/f2/file.bin")
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "unavailable"
        assert "'files'" in refused.json()["reason"]
        assert http.get("/status").status_code == 200  # the node serves on
    alice.start()
    wait_until(lambda: bob.peer_connected(alice), 120, what="alice back")
    with _http(bob) as http:  # inline data over /couch is fetched too (what PouchDB pulls)
        got = http.post(f"/couch/{FILES}/_bulk_get", params={"attachments": "true"},
                        json={"docs": [{"id": "f2"}]})
        assert got.status_code == 200, got.text
        [result] = got.json()["results"]
        inline = result["docs"][0]["ok"]["_attachments"]["file.bin"]["data"]
        assert base64.b64decode(inline) == data
        got = http.get(f"/data/{FILES}/f2/file.bin")
        assert got.status_code == 200 and got.content == data


def test_concurrent_first_reads_fetch_the_file_once(cluster):
    alice, bob = _on_read_member(cluster)
    data = _data(4 * MB + 7, seed=3)
    rev = _put_file(alice, "f3", data)
    wait_until(lambda: (bob.get("f3") or {}).get("_rev") == rev, 120, what="f3's doc on bob")

    def read(_):
        with _http(bob) as http:
            response = http.get(f"/data/{FILES}/f3/file.bin")
            return response.status_code, hashlib.sha256(response.content).digest()

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(read, range(6)))
    assert results == [(200, hashlib.sha256(data).digest())] * 6
    wait_until(lambda: _fetches_on_read(bob, "f3") >= 1, 60, what="f3's data stored on bob")
    assert _fetches_on_read(bob, "f3") == 1
    chunks = -(-len(data) // CHUNK)
    wait_until(lambda: _served_chunks(alice) >= chunks, 60, what="alice's serving logged")
    assert _served_chunks(alice) == chunks  # each chunk sent once


def test_an_on_read_member_of_an_encrypted_share_reads_the_sealed_file(cluster):
    alice, bob = _on_read_member(cluster, encrypt=True)
    data = _data(2 * MB + 999, seed=4)
    rev = _put_file(alice, "s1", data)
    wait_until(lambda: (bob.get("s1") or {}).get("_rev") == rev, 120, what="s1's doc on bob")
    assert bob.get("s1")["_attachments"]["file.bin"]["length"] == len(data)  # clear length
    assert _chunks_held(bob) == 0
    with _http(bob) as http:
        part = http.get(f"/data/{FILES}/s1/file.bin", headers={"range": "bytes=-1000"})
        assert part.status_code == 206 and part.content == data[-1000:]
        whole = http.get(f"/data/{FILES}/s1/file.bin")
        assert whole.status_code == 200 and whole.content == data
    wait_until(lambda: _fetches_on_read(bob, "s1") == 1, 60, what="s1 stored on bob")
    alice.stop()
    with _http(bob) as http:
        again = http.get(f"/data/{FILES}/s1/file.bin")
        assert again.status_code == 200 and again.content == data


def test_switching_back_to_eager_fetches_what_is_missing_and_bad_modes_are_refused(cluster):
    alice, bob = _on_read_member(cluster)
    with pytest.raises(ApiError) as bad:
        bob.api("PUT", "/shares/files/fetch", json={"fetch": "lazy"})
    assert bad.value.status == 400 and "'eager' or 'on-read'" in bad.value.body["reason"]
    assert bob.cli("share", "fetch", "files", "lazy").returncode == 2  # a usage error
    data = _data(CHUNK * 2 + 5, seed=5)
    rev = _put_file(alice, "f5", data)
    wait_until(lambda: (bob.get("f5") or {}).get("_rev") == rev, 120, what="f5's doc on bob")
    assert _chunks_held(bob) == 0
    bob.cli_json("share", "fetch", "files", "eager")
    wait_until(lambda: _fetches_on_read(bob, "f5") >= 1, 120, what="f5's data fetched by bob")
    assert _chunks_held(bob) == 3
    alice.stop()
    with _http(bob) as http:
        got = http.get(f"/data/{FILES}/f5/file.bin")
        assert got.status_code == 200 and got.content == data
    assert bob.share("files")["fetch"] == "eager"


def test_on_read_is_refused_clearly_on_the_couchdb_backend(cluster, couchdb_url):
    alice = cluster.add("alice")
    bob = cluster.add("bob", "--store", "couchdb", "--couchdb-url", couchdb_url)
    share_between(alice, [bob], name="files", doctype=FILES)
    refused = bob.cli("share", "fetch", "files", "on-read")
    assert refused.returncode == 1
    assert "needs the embedded store (sqlite)" in refused.stderr
    assert bob.share("files")["fetch"] == "eager"


def test_a_first_read_streams_the_data_as_it_arrives(cluster):
    alice, bob = _on_read_member(cluster)
    data = _data(32 * MB + 3, seed=6)
    rev = _put_file(alice, "f6", data)
    wait_until(lambda: (bob.get("f6") or {}).get("_rev") == rev, 120, what="f6's doc on bob")
    digest, size = hashlib.sha256(), 0
    with _http(bob) as http, http.stream("GET", f"/data/{FILES}/f6/file.bin") as response:
        assert response.status_code == 200
        for piece in response.iter_bytes():
            if size == 0:
                # Ordering, not timing: the first bytes came before the file was all here
                # (its last chunk is only sent once all are stored and checked).
                assert _fetches_on_read(bob, "f6") == 0
            digest.update(piece)
            size += len(piece)
    assert size == len(data) and digest.digest() == hashlib.sha256(data).digest()
    assert _fetches_on_read(bob, "f6") == 1


def _kill_mid_fetch(bob, doc_id: str) -> None:
    """Read `doc_id`'s file on `bob` and kill `bob` once part of it is fetched."""

    def read_until_cut():
        try:
            with _http(bob) as http, \
                    http.stream("GET", f"/data/{FILES}/{doc_id}/file.bin") as response:
                for _ in response.iter_bytes():
                    pass
        except httpx.HTTPError:
            pass  # cut by the kill

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reading = pool.submit(read_until_cut)
        wait_until(lambda: re.search(rf"attachment 'file.bin' of {doc_id}: \d+ chunks fetched",
                                     bob.log()), 120, what=f"bob to have fetched part of {doc_id}")
        bob.kill()
        reading.result(timeout=60)


def test_a_member_killed_mid_fetch_resumes_with_the_chunks_it_staged(cluster):
    alice, bob = _on_read_member(cluster)
    data = _data(48 * MB + 11, seed=7)
    chunks = -(-len(data) // CHUNK)
    rev = _put_file(alice, "f7", data)
    wait_until(lambda: (bob.get("f7") or {}).get("_rev") == rev, 120, what="f7's doc on bob")

    _kill_mid_fetch(bob, "f7")
    bob.start()
    wait_until(lambda: bob.peer_connected(alice), 120, what="bob linked to alice again")
    with _http(bob) as http:
        got = http.get(f"/data/{FILES}/f7/file.bin")
        assert got.status_code == 200
        assert hashlib.sha256(got.content).digest() == hashlib.sha256(data).digest()
    pattern = r"fetching attachment 'file.bin' of f7 from peer \S+: (\d+) chunks to fetch, (\d+) held"
    # (the log is the restarted node's)
    [(to_fetch, held)] = [(int(a), int(b)) for a, b in re.findall(pattern, bob.log())]
    assert held >= 64 and to_fetch + held == chunks  # what was staged did not travel again


def test_chunks_a_cut_fetch_staged_go_once_it_has_not_resumed_within_the_window(cluster):
    """Nothing releases what a fetch killed mid-way staged: it waits for the next read to
    resume. If none comes within `[store] resume_window_hours`, the node removes it."""
    alice, bob = _on_read_member(cluster)
    data = _data(48 * MB + 5, seed=8)
    rev = _put_file(alice, "f8", data)
    wait_until(lambda: (bob.get("f8") or {}).get("_rev") == rev, 120, what="f8's doc on bob")
    _kill_mid_fetch(bob, "f8")
    config = bob.home / "node.toml"
    text = config.read_text()
    assert "\nresume_window_hours = 72\n" in text  # the default, as init writes it
    config.write_text(text.replace("\nresume_window_hours = 72\n", "\nresume_window_hours = 0\n"))
    bob.start()
    wait_until(lambda: "staged chunks of file transfers cut" in bob.log(), 60,
               what="bob to expire the cut fetch's chunks")
    [removed] = re.findall(r"removed (\d+) staged chunks of file transfers cut", bob.log())
    assert int(removed) >= 64  # (the progress line comes once 16 MiB are staged)
    assert _chunks_held(bob) == 0
    assert not any((bob.home / "store.sqlite-chunks").iterdir())
    wait_until(lambda: bob.peer_connected(alice), 120, what="bob linked to alice again")
    with _http(bob) as http:  # the next read fetches it all anew
        got = http.get(f"/data/{FILES}/f8/file.bin")
        assert got.status_code == 200
        assert hashlib.sha256(got.content).digest() == hashlib.sha256(data).digest()


def test_a_pinned_document_of_an_on_read_share_has_its_data_fetched_eagerly(cluster):
    """Issue 13 item 3: a member may pin documents for eager download in a share it fetches
    on read (`plugshare file pin ID`). Pinning fetches what the doc's revision lacks at once;
    its next revisions come with their data; the other documents stay on read; unpinned, the
    next revision comes with its stubs alone again. Pins are the owner's, and bounded."""
    alice, bob = _on_read_member(cluster)
    first, other = _data(MB + 5, seed=11), _data(MB + 7, seed=12)
    rev = _put_file(alice, "pinned", first)
    other_rev = _put_file(alice, "loose", other)
    wait_until(lambda: (bob.get("pinned") or {}).get("_rev") == rev
               and (bob.get("loose") or {}).get("_rev") == other_rev, 120, what="docs on bob")
    assert bob.get("pinned")["_attachments"]["file.bin"]["local"] is False

    answer = bob.cli_json("file", "pin", "pinned")
    assert answer == {"id": "pinned", "pinned": True}
    assert "pinned" in bob.cli_json("file", "pins")["pins"]
    wait_until(lambda: "local" not in bob.get("pinned")["_attachments"]["file.bin"], 120,
               what="the pinned doc's data fetched without a read")
    assert bob.get("loose")["_attachments"]["file.bin"]["local"] is False  # still on read
    served = _served_chunks(alice)

    # its next revision comes with its data
    with _http(alice) as http:
        second = _data(MB + 9, seed=13)
        made = http.put(f"/data/{FILES}/pinned/more.bin", params={"rev": rev}, content=second,
                        headers={"content-type": "application/octet-stream"})
        assert made.status_code == 201, made.text
        rev2 = made.json()["rev"]
    wait_until(lambda: (bob.get("pinned") or {}).get("_rev") == rev2, 120, what="rev 2 on bob")
    stubs = bob.get("pinned")["_attachments"]
    assert "local" not in stubs["more.bin"] and "local" not in stubs["file.bin"], stubs
    assert _served_chunks(alice) > served
    with _http(bob) as http:
        assert http.get(f"/data/{FILES}/pinned/more.bin").content == second

    # unpinned: the next revision comes on read again
    assert bob.cli_json("file", "pin", "pinned", "--off") == {"id": "pinned", "pinned": False}
    assert "pinned" not in bob.cli_json("file", "pins")["pins"]
    with _http(alice) as http:
        third = _data(MB + 11, seed=14)
        made = http.put(f"/data/{FILES}/pinned/late.bin", params={"rev": rev2}, content=third,
                        headers={"content-type": "application/octet-stream"})
        rev3 = made.json()["rev"]
    wait_until(lambda: (bob.get("pinned") or {}).get("_rev") == rev3, 120, what="rev 3 on bob")
    assert bob.get("pinned")["_attachments"]["late.bin"]["local"] is False

    # the owner's alone; a bad id is refused
    reader = bob.cli_json("app", "add", "reader", "--doctype", FILES, "--perm", "read")
    with httpx.Client(base_url=bob.running.api_url, timeout=30, headers={
            "Authorization": f"Bearer {reader['credential']}"}) as http:
        assert http.put("/pins/loose").status_code == 403
    with _http(bob) as http:
        assert http.put("/pins/_design%2Fx").status_code == 400
    assert bob.get("loose")["_attachments"]["file.bin"]["local"] is False
