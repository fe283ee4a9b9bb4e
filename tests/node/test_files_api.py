"""Files through the node's local API (issue 13): attachments of documents at
/data/{doctype}/{id}/{name}, streamed in and out, decided by the token like the document's
own access, capped by a share's rule, sealed on sealed documents; and bad input (a digest
mismatch, a lying length, an upload cut halfway, a range outside the file, names with `/`
or `..`, a file over a cap) refused with the previous revision untouched. Real nodes, real
sockets, the real token and store."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
from urllib.parse import urlsplit

import httpx
import pytest

from tests.node.cluster import ApiError, cluster, wait_until  # noqa: F401 (fixture)

MB = 1024 * 1024


def _http(node, credential: str | None = None) -> httpx.Client:
    running = node.running
    return httpx.Client(base_url=running.api_url, timeout=120,
                        headers={"Authorization": f"Bearer {credential or running.credential}"})


def _md5(data: bytes) -> str:
    return "md5-" + base64.b64encode(hashlib.md5(data).digest()).decode()


def _pieces(data: bytes, size: int = 64 * 1024):
    """The body as a generator: httpx sends it chunked, with no Content-Length."""
    for start in range(0, len(data), size):
        yield data[start:start + size]


@pytest.fixture(params=["sqlite", "couchdb"])
def store(request) -> tuple[str, ...]:
    """`plugshare init` arguments of each store backend: every test runs on both."""
    if request.param == "sqlite":
        return ()
    return ("--store", "couchdb", "--couchdb-url", request.getfixturevalue("couchdb_url"))


def _app(node, name: str, *args: str) -> str:
    done = node.cli("--json", "app", "add", name, *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["credential"]


def test_an_attachment_streams_in_and_out_with_ranges_etag_and_its_content_type(cluster, store):
    alice = cluster.add("alice", *store)
    data = os.urandom(3 * MB + 123)
    with _http(alice) as http:
        # no rev: the document is made, of the route's doctype, with the file
        made = http.put("/data/io.photos/p1/beach.jpg", content=_pieces(data),
                        headers={"content-type": "image/jpeg"})
        assert made.status_code == 201, made.text
        rev = made.json()["rev"]
        doc = http.get("/data/io.photos/p1").json()
        assert doc["doctype"] == "io.photos" and doc["_rev"] == rev
        stub = doc["_attachments"]["beach.jpg"]
        assert stub["stub"] is True and stub["length"] == len(data)
        assert stub["digest"] == _md5(data) and stub["content_type"] == "image/jpeg"

        got = http.get("/data/io.photos/p1/beach.jpg")
        assert got.status_code == 200 and got.content == data
        assert got.headers["content-type"] == "image/jpeg"
        assert got.headers["etag"] == f'"{_md5(data)}"'
        assert got.headers["accept-ranges"] == "bytes"

        part = http.get("/data/io.photos/p1/beach.jpg", headers={"range": "bytes=1000-299999"})
        assert part.status_code == 206 and part.content == data[1000:300000]
        assert part.headers["content-range"] == f"bytes 1000-299999/{len(data)}"
        tail = http.get("/data/io.photos/p1/beach.jpg", headers={"range": "bytes=-10"})
        assert tail.status_code == 206 and tail.content == data[-10:]
        head = http.head("/data/io.photos/p1/beach.jpg")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(data))
        same = http.get("/data/io.photos/p1/beach.jpg",
                        headers={"if-none-match": f'"{_md5(data)}"'})
        assert same.status_code == 304

        # an edit of the document that sends its stub keeps the file; If-Match names the rev
        kept = http.put("/data/io.photos/p1", json={**{k: v for k, v in doc.items()},
                                                    "title": "beach"})
        assert kept.status_code == 201, kept.text
        second = http.put("/data/io.photos/p1/notes.txt", content=b"sunny",
                          headers={"content-type": "text/plain",
                                   "if-match": f'"{kept.json()["rev"]}"'})
        assert second.status_code == 201, second.text
        doc = http.get("/data/io.photos/p1").json()
        assert doc["title"] == "beach" and sorted(doc["_attachments"]) == ["beach.jpg",
                                                                           "notes.txt"]
        assert http.get("/data/io.photos/p1/beach.jpg").content == data

        gone = http.delete("/data/io.photos/p1/notes.txt", params={"rev": doc["_rev"]})
        assert gone.status_code == 200, gone.text
        assert http.get("/data/io.photos/p1/notes.txt").status_code == 404
        assert list(http.get("/data/io.photos/p1").json()["_attachments"]) == ["beach.jpg"]
        # another doctype's route does not reach it
        assert http.get("/data/io.notes/p1/beach.jpg").status_code == 404


def test_attachments_are_decided_like_their_document_one_audit_entry_per_request(cluster, store):
    alice = cluster.add("alice", *store)
    reader = _app(alice, "viewer", "--doctype", "io.photos", "--perm", "read")
    with _http(alice) as owner, _http(alice, reader) as app:
        assert owner.put("/data/io.photos/p1/a.bin", content=b"x" * 5000).status_code == 201
        before = len(alice.cli_json("audit", "--tail", "1000")["entries"])
        assert app.get("/data/io.photos/p1/a.bin").content == b"x" * 5000
        refused = app.put("/data/io.photos/p2/b.bin", content=b"y")
        assert refused.status_code == 403, refused.text
        entries = alice.cli_json("audit", "--tail", "1000")["entries"][before:]
        mine = [e for e in entries if e.get("principal") == "app:viewer"]
        assert [(e["action"], e["allowed"]) for e in mine] == [("read", True), ("write", False)]
        # nothing was made by the refused write
        assert owner.get("/data/io.photos/p2").status_code == 404


def test_attachments_on_a_sealed_doctype_are_stored_sealed_never_in_clear(cluster, store):
    """(Sealed at write: tests/node/test_sealed_files.py has the rest.)"""
    alice = cluster.add("alice", *store)
    alice.cli_ok("encrypt", "io.health")
    rev = alice.put("io.health", {"note": "scan follows"}, "h1")
    with _http(alice) as http:
        put = http.put("/data/io.health/h1/scan.pdf", params={"rev": rev},
                       content=b"%PDF secret scan")
        assert put.status_code == 201, put.text
        assert http.get("/data/io.health/h1/scan.pdf").content == b"%PDF secret scan"
        made = http.put("/data/io.health/h2/scan.pdf", content=b"%PDF secret scan")
        assert made.status_code == 201, made.text
        assert http.get("/data/io.health/h1").json()["note"] == "scan follows"
    if not store:  # the embedded store's file holds no trace of the data
        alice.stop()
        assert b"secret scan" not in (alice.home / "store.sqlite").read_bytes()


def test_a_share_caps_its_documents_attachments_by_size_and_type(cluster, store):
    alice = cluster.add("alice", *store)
    alice.api("POST", "/shares", json={"name": "pics", "doctype": "io.photos",
                                       "max_attachment_size": 10_000,
                                       "attachment_types": ["image/*"]})
    with _http(alice) as http:
        first = http.put("/data/io.photos/p1/small.png", content=b"p" * 9000,
                         headers={"content-type": "image/png"})
        assert first.status_code == 201, first.text
        rev = first.json()["rev"]
        for body in (b"q" * 10_001, _pieces(b"q" * 50_000, 4096)):  # declared, then streamed
            over = http.put("/data/io.photos/p1/small.png", params={"rev": rev}, content=body,
                            headers={"content-type": "image/png"})
            assert over.status_code == 413, over.text
            assert "10000" in over.json()["reason"]
        wrong = http.put("/data/io.photos/p1/notes.txt", params={"rev": rev}, content=b"hi",
                         headers={"content-type": "text/plain"})
        assert wrong.status_code == 400 and "text/plain" in wrong.json()["reason"]
        assert http.get("/data/io.photos/p1").json()["_rev"] == rev
        assert http.get("/data/io.photos/p1/small.png").content == b"p" * 9000
        # outside the share's doctype, no cap
        assert http.put("/data/io.notes/n1/big.txt", content=b"n" * 20_000).status_code == 201


def test_bad_input_is_refused_clearly_and_leaves_the_previous_revision(cluster, store):
    alice = cluster.add("alice", *store)
    data = os.urandom(700_000)
    with _http(alice) as http:
        rev = http.put("/data/io.files/f1/data.bin", content=data).json()["rev"]

        def untouched() -> None:
            doc = http.get("/data/io.files/f1").json()
            assert doc["_rev"] == rev and list(doc["_attachments"]) == ["data.bin"]
            assert http.get("/data/io.files/f1/data.bin").content == data

        # a digest that does not match the data
        bad = http.put("/data/io.files/f1/data.bin", params={"rev": rev}, content=b"other",
                       headers={"content-md5": base64.b64encode(hashlib.md5(b"x").digest())
                                .decode()})
        assert bad.status_code == 400 and "digest mismatch" in bad.json()["reason"]
        untouched()
        # ...also when it was to make a new document: none is left live
        bad = http.put("/data/io.files/f2/data.bin", content=b"other",
                       headers={"content-md5": base64.b64encode(hashlib.md5(b"x").digest())
                                .decode()})
        assert bad.status_code == 400 and "digest mismatch" in bad.json()["reason"]
        assert http.get("/data/io.files/f2").status_code == 404
        # names with '/' or '..' (sent encoded, or the '/' raw)
        for path in ("/data/io.files/f1/dir/evil.bin", "/data/io.files/f1/..%2Fetc",
                     "/data/io.files/f1/a..b", "/data/io.files/f1/%2E%2E"):
            named = http.put(path, params={"rev": rev}, content=b"z")
            assert named.status_code == 400, (path, named.text)
            assert "'/'" in named.json()["reason"] or "'..'" in named.json()["reason"]
        untouched()
        # a range outside the file
        outside = http.get("/data/io.files/f1/data.bin",
                           headers={"range": f"bytes={len(data)}-{len(data) + 10}"})
        assert outside.status_code == 416
        assert outside.headers["content-range"] == f"bytes */{len(data)}"
        # a stale rev
        assert http.put("/data/io.files/f1/data.bin", params={"rev": "1-" + "0" * 32},
                        content=b"late").status_code == 409
        untouched()

    # a length that lies: Content-Length says 2 MB, half of it comes, the client goes away
    url = urlsplit(alice.running.api_url)
    with socket.create_connection((url.hostname, url.port)) as raw:
        raw.sendall((f"PUT /data/io.files/f1/data.bin?rev={rev} HTTP/1.1\r\n"
                     f"Host: {url.netloc}\r\nAuthorization: Bearer {alice.running.credential}\r\n"
                     f"Content-Type: application/octet-stream\r\nContent-Length: {2 * MB}\r\n"
                     "\r\n").encode() + b"c" * MB)
    # and an upload cut halfway with no length at all (chunked)
    with socket.create_connection((url.hostname, url.port)) as raw:
        raw.sendall((f"PUT /data/io.files/f1/cut.bin?rev={rev} HTTP/1.1\r\n"
                     f"Host: {url.netloc}\r\nAuthorization: Bearer {alice.running.credential}\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n").encode()
                    + b"".join(b"%x\r\n" % 65536 + b"k" * 65536 + b"\r\n" for _ in range(8)))
    with _http(alice) as http:
        untouched()
        # the node goes on serving everyone, and a correct upload on that rev still lands
        fixed = http.put("/data/io.files/f1/data.bin", params={"rev": rev}, content=b"new",
                         headers={"content-md5": base64.b64encode(hashlib.md5(b"new").digest())
                                  .decode()})
        assert fixed.status_code == 201, fixed.text
        assert http.get("/data/io.files/f1/data.bin").content == b"new"


def test_sealing_a_doctype_or_share_whose_documents_carry_files_is_refused(cluster, store):
    """Stored attachment data is not re-sealed (files written on sealed docs are sealed as they
    stream in, those already stored are not): making a doctype sensitive, or an encrypted
    share over it, while its documents carry files would leave their data in clear under a
    sealed document. Refused clearly; the documents stay as they were."""
    alice = cluster.add("alice", *store)
    with _http(alice) as http:
        rev = http.put("/data/io.health/h1/scan.pdf", content=b"%PDF scan").json()["rev"]
    done = alice.cli("encrypt", "io.health")
    assert done.returncode != 0 and "attachment" in done.stderr, done.stderr
    with pytest.raises(ApiError) as refused:
        alice.api("POST", "/shares", json={"name": "care", "doctype": "io.health",
                                           "encrypt": True})
    assert refused.value.status == 400 and "attachment" in refused.value.body["reason"]
    assert alice.api("GET", "/shares")["shares"] == []
    with _http(alice) as http:
        assert http.get("/data/io.health/h1").json()["_rev"] == rev
        assert http.get("/data/io.health/h1/scan.pdf").content == b"%PDF scan"
        # still not sensitive: a new document is stored in clear, as before
        assert http.put("/data/io.health/h2", json={"n": 1}).status_code == 201


def test_the_couchdb_api_serves_and_takes_attachments(cluster, store):
    """/couch: docs carry stubs; an attachment is read streamed (Range too) and written by
    PUT ?rev=; `_bulk_get?attachments=true` and `open_revs` with attachments=true give the
    data inline; replicated inline data that lies about its digest is refused per doc and
    the document keeps its revision."""
    alice = cluster.add("alice", *store)
    data = os.urandom(400_000)
    with _http(alice) as http:
        made = http.put("/couch/io.files/f1/a.bin", content=data,
                        headers={"content-type": "application/x-a"})
        assert made.status_code == 201, made.text
        rev = made.json()["rev"]
        doc = http.get("/couch/io.files/f1").json()
        assert doc["_attachments"]["a.bin"] == {
            "content_type": "application/x-a", "length": len(data), "digest": _md5(data),
            "revpos": doc["_attachments"]["a.bin"]["revpos"], "stub": True}
        got = http.get("/couch/io.files/f1/a.bin", params={"rev": rev})
        assert got.content == data and got.headers["etag"] == f'"{_md5(data)}"'
        part = http.get("/couch/io.files/f1/a.bin", headers={"range": "bytes=5-9"})
        assert part.status_code == 206 and part.content == data[5:10]
        assert http.get("/couch/io.files/f1/nope").status_code == 404

        bulk = http.post("/couch/io.files/_bulk_get", params={"revs": "true",
                                                               "attachments": "true"},
                         json={"docs": [{"id": "f1", "rev": rev}, {"id": "missing"}]})
        assert bulk.status_code == 200, bulk.text
        results = bulk.json()["results"]
        inline = results[0]["docs"][0]["ok"]["_attachments"]["a.bin"]
        assert base64.b64decode(inline["data"]) == data and "stub" not in inline
        assert inline["digest"] == _md5(data)
        assert "error" in results[1]["docs"][0]
        revs = http.get("/couch/io.files/f1", params={
            "open_revs": json.dumps([rev]), "revs": "true", "attachments": "true"},
            headers={"accept": "application/json"})
        assert base64.b64decode(revs.json()[0]["ok"]["_attachments"]["a.bin"]["data"]) == data

        # a replicated revision whose inline data does not match its digest
        lying = {"_id": "f1", "_rev": "2-" + "b" * 32, "doctype": "io.files",
                 "_revisions": {"start": 2, "ids": ["b" * 32, rev.split("-")[1]]},
                 "_attachments": {"a.bin": {"content_type": "application/x-a",
                                            "digest": _md5(b"other"), "revpos": 2,
                                            "data": base64.b64encode(b"forged").decode()}}}
        refused = http.post("/couch/io.files/_bulk_docs",
                            json={"docs": [lying], "new_edits": False})
        assert refused.status_code == 201
        assert refused.json()[0]["error"] == "forbidden", refused.text  # per doc: PouchDB moves past it
        assert "digest" in refused.json()[0]["reason"]
        assert http.get("/couch/io.files/f1").json()["_rev"] == rev
        assert http.get("/couch/io.files/f1/a.bin").content == data
        # an edit (new_edits true) with inline data: one new revision, the stub kept
        edit = http.post("/couch/io.files/_bulk_docs", json={"docs": [{
            "_id": "f1", "_rev": rev, "title": "two files", "_attachments": {
                "a.bin": {"stub": True},
                "b.txt": {"content_type": "text/plain",
                          "data": base64.b64encode(b"b").decode()}}}]})
        assert edit.status_code == 201 and edit.json()[0]["ok"], edit.text
        new_rev = edit.json()[0]["rev"]
        assert new_rev.startswith(f"{int(rev.split('-')[0]) + 1}-")
        doc = http.get("/couch/io.files/f1").json()
        assert doc["_rev"] == new_rev and doc["title"] == "two files"
        assert doc["_attachments"]["b.txt"]["revpos"] == int(new_rev.split("-")[0])
        assert doc["_attachments"]["a.bin"]["digest"] == _md5(data)
        assert http.get("/couch/io.files/f1/b.txt").content == b"b"
        assert http.get("/couch/io.files/f1/a.bin").content == data
        # an edit of a revision that is no longer the current one is a conflict
        stale = http.put("/couch/io.files/f1", params={"rev": rev}, json={
            "_attachments": {"c.txt": {"data": base64.b64encode(b"c").decode()}}})
        assert stale.status_code == 409, stale.text
        assert http.get("/couch/io.files/f1").json()["_rev"] == new_rev
        # a doc PUT with inline data makes a new document; a lying length is refused
        made = http.put("/couch/io.files/f2", json={"_attachments": {"c.txt": {
            "content_type": "text/plain", "data": base64.b64encode(b"ccc").decode()}}})
        assert made.status_code == 201, made.text
        assert http.get("/couch/io.files/f2/c.txt").content == b"ccc"
        lie = http.put("/couch/io.files/f2", params={"rev": made.json()["rev"]}, json={
            "_attachments": {"c.txt": {"data": base64.b64encode(b"dd").decode(),
                                       "length": 3}}})
        assert lie.status_code == 400 and "bytes" in lie.json()["reason"], lie.text
        assert http.get("/couch/io.files/f2/c.txt").content == b"ccc"


def test_the_nodes_own_cap_from_its_config_refuses_a_larger_file(cluster, store):
    alice = cluster.add("alice", *store, start=False)
    config = alice.home / "node.toml"
    text = config.read_text()
    assert "max_attachment_size = 4294967296" in text  # the default, written by init
    config.write_text(text.replace("max_attachment_size = 4294967296",
                                   "max_attachment_size = 100000"))
    alice.start()
    with _http(alice) as http:
        rev = http.put("/data/io.files/f1/a.bin", content=b"a" * 100_000).json()["rev"]
        for body in (b"b" * 100_001, _pieces(b"b" * 300_000, 8192)):
            over = http.put("/data/io.files/f1/a.bin", params={"rev": rev}, content=body)
            assert over.status_code == 413 and "node's cap" in over.json()["reason"], over.text
        assert http.get("/data/io.files/f1").json()["_rev"] == rev
        assert http.get("/data/io.files/f1/a.bin").content == b"a" * 100_000


def test_a_restarted_node_gives_back_the_space_of_deleted_files_in_mostly_dead_packs(cluster):
    """The embedded store appends file data to 64 MiB packs; a pack that keeps one live chunk
    kept its deleted files' space. The node calls `reclaim_space` at start (then hourly): a
    pack less than half live is rewritten and its space given back; kept files read back."""
    alice = cluster.add("alice")
    big, kept = os.urandom(56 * MB), {"b": os.urandom(6 * MB), "c": os.urandom(4 * MB)}
    with _http(alice) as http:
        rev = http.put("/data/io.files/big/a.bin", content=big).json()["rev"]
        for doc_id, data in kept.items():
            assert http.put(f"/data/io.files/{doc_id}/a.bin", content=data).status_code == 201
        assert http.delete("/data/io.files/big", params={"rev": rev}).status_code == 200
    packs = alice.home / "store.sqlite-chunks"

    def pack_bytes() -> int:
        return sum(p.stat().st_size for p in packs.iterdir() if p.name.startswith("pack-"))

    before = pack_bytes()
    assert before >= 66 * MB, before  # the deleted file's chunks share the first pack
    alice.stop()
    alice.start()
    wait_until(lambda: "gave back" in alice.log(), 60, what="alice to reclaim pack space")
    after = pack_bytes()
    assert after <= 12 * MB, (before, after)  # the kept 10 MiB, about
    with _http(alice) as http:
        for doc_id, data in kept.items():
            got = http.get(f"/data/io.files/{doc_id}/a.bin")
            assert got.status_code == 200 and got.content == data
        assert http.get("/data/io.files/big").status_code == 404
