"""Inline attachment data written through `/couch` meets the same caps as a file PUT to
`/data` (issue 13): a share's size and type caps, decided by the token per document, and the
node's own cap, on all the data of one request."""

from __future__ import annotations

import base64
import os

import httpx
import pytest

from tests.node.cluster import cluster  # noqa: F401 (fixture)


def _http(node) -> httpx.Client:
    return httpx.Client(base_url=node.running.api_url, timeout=120, headers={
        "Authorization": f"Bearer {node.running.credential}"})


def _inline(data: bytes, content_type: str) -> dict:
    return {"content_type": content_type, "data": base64.b64encode(data).decode()}


def test_a_shares_caps_refuse_inline_data_per_document(cluster):
    alice = cluster.add("alice")
    alice.api("POST", "/shares", json={"name": "pics", "doctype": "io.photos",
                                       "max_attachment_size": 10_000,
                                       "attachment_types": ["image/*"]})
    with _http(alice) as http:
        first = http.put("/couch/io.photos/p1", json={"_attachments": {
            "small.png": _inline(b"p" * 9000, "image/png")}})
        assert first.status_code == 201, first.text
        rev = first.json()["rev"]
        generation, _, parent = rev.partition("-")
        replicated = {"_id": "p1", "_rev": f"{int(generation) + 1}-{'d' * 32}",
                      "_revisions": {"start": int(generation) + 1, "ids": ["d" * 32, parent]}}
        for new_edits, base in ((True, {"_id": "p1", "_rev": rev}), (False, replicated)):
            for name, data, content_type, why in (
                    ("big.png", b"q" * 10_001, "image/png", "10000"),
                    ("notes.txt", b"hi", "text/plain", "text/plain")):
                doc = {**base, "_attachments": {
                    "small.png": {"stub": True} if new_edits else {
                        **_inline(b"p" * 9000, "image/png"), "revpos": 1},
                    name: _inline(data, content_type)}}
                answer = http.post("/couch/io.photos/_bulk_docs", json={
                    "docs": [doc, {"_id": f"other-{name}-{new_edits}"}],
                    "new_edits": new_edits} if new_edits else {
                    "docs": [doc], "new_edits": False})
                assert answer.status_code == 201, answer.text
                refused = answer.json()[0]
                assert refused["error"] == "forbidden" and why in refused["reason"], answer.text
                if new_edits:  # the other doc of the batch is written
                    assert answer.json()[1]["ok"], answer.text
        assert http.get("/couch/io.photos/p1").json()["_rev"] == rev
        assert http.get("/couch/io.photos/p1/small.png").content == b"p" * 9000
        # outside the share's doctype, no share cap
        assert http.put("/couch/io.notes/n1", json={"_attachments": {
            "big.txt": _inline(b"n" * 20_000, "text/plain")}}).status_code == 201


def test_the_nodes_cap_bounds_all_the_inline_data_of_a_request(cluster):
    alice = cluster.add("alice", start=False)
    config = alice.home / "node.toml"
    text = config.read_text()
    config.write_text(text.replace("max_attachment_size = 4294967296",
                                   "max_attachment_size = 100000"))
    alice.start()
    with _http(alice) as http:
        docs = [{"_id": f"f{i}", "_rev": f"1-{i}{'a' * 31}",
                 "_attachments": {"a.bin": {**_inline(os.urandom(60_000), "x/y"),
                                            "revpos": 1}}} for i in range(2)]
        over = http.post("/couch/io.files/_bulk_docs", json={"docs": docs,
                                                              "new_edits": False})
        assert over.status_code == 413, over.text
        assert "100000" in over.json()["reason"]
        assert http.get("/couch/io.files/_all_docs").json()["rows"] == []
        # one of them alone is under the cap
        taken = http.post("/couch/io.files/_bulk_docs", json={"docs": docs[:1],
                                                               "new_edits": False})
        assert taken.status_code == 201 and taken.json() == [], taken.text


def _md5(data: bytes) -> str:
    import hashlib
    return "md5-" + base64.b64encode(hashlib.md5(data).digest()).decode()


def _related(doc: dict, parts: list[tuple], boundary: str = "b0und") -> bytes:
    """A doc PUT body as CouchDB's replicator sends it: the JSON, then a part per file, each
    (filename or None, data[, extra header lines])."""
    import json
    out = f"--{boundary}\r\nContent-Type: application/json\r\n\r\n".encode() + \
        json.dumps(doc).encode() + b"\r\n"
    for filename, data, *extra in parts:
        disposition = f'Content-Disposition: attachment; filename="{filename}"\r\n' \
            if filename is not None else ""
        headers = "".join(f"{line}\r\n" for line in (extra[0] if extra else ()))
        out += (f"--{boundary}\r\n{disposition}Content-Type: application/octet-stream\r\n"
                f"Content-Length: {len(data)}\r\n{headers}\r\n").encode() + data + b"\r\n"
    return out + f"--{boundary}--".encode()


def test_a_multipart_related_doc_put_as_couchdbs_replicator_sends_it(cluster):
    """CouchDB's replicator PUTs a revision with attachments as multipart/related
    (?new_edits=false): the JSON with `follows` entries, then the data raw, one part each;
    a part is matched by its filename, else by order; one that lies is refused, and the
    document keeps what it had."""
    alice = cluster.add("alice")
    big, small = os.urandom(9 * 1024 * 1024 + 7), b"small file"

    def revision(n: int, parent: str | None, files: dict[str, bytes], **lies) -> dict:
        own = f"{n}{'e' * 31}"
        return {"_id": "m1", "_rev": f"{n}-{own}", "title": f"v{n}",
                "_revisions": {"start": n, "ids": [own] + ([parent] if parent else [])},
                "_attachments": {name: {"follows": True, "content_type": "x/y",
                                        "length": len(data), "digest": _md5(data),
                                        "revpos": n, **lies}
                                 for name, data in files.items()}}

    with _http(alice) as http:
        def put(doc: dict, parts, boundary: str = "b0und") -> httpx.Response:
            return http.put("/couch/io.files/m1", params={"new_edits": "false"},
                            content=_related(doc, parts, boundary),
                            headers={"content-type":
                                     f'multipart/related; boundary="{boundary}"'})

        first = revision(1, None, {"big.bin": big, "s.txt": small})
        # parts named, in another order than the JSON's
        made = put(first, [("s.txt", small), ("big.bin", big)])
        assert made.status_code == 201, made.text
        assert http.get("/couch/io.files/m1/big.bin").content == big
        assert http.get("/couch/io.files/m1/s.txt").content == small
        # unnamed parts: in the JSON's order
        second = revision(2, first["_rev"][2:], {"s.txt": b"v2"})
        second["_attachments"]["big.bin"] = {"stub": True, "content_type": "x/y",
                                             "length": len(big), "digest": _md5(big),
                                             "revpos": 1}
        assert put(second, [(None, b"v2")], boundary="other-b").status_code == 201
        assert http.get("/couch/io.files/m1").json()["_rev"] == second["_rev"]
        assert http.get("/couch/io.files/m1/s.txt").content == b"v2"
        # lies: a digest, a length, a part too few
        third = revision(3, second["_rev"][2:], {"s.txt": b"v3"})
        for doc, parts in ((revision(3, second["_rev"][2:], {"s.txt": b"v3"},
                                     digest=_md5(b"v4")), [("s.txt", b"v3")]),
                           (revision(3, second["_rev"][2:], {"s.txt": b"v3"}, length=3),
                            [("s.txt", b"v3")]),
                           (third, [])):
            refused = put(doc, parts)
            assert refused.status_code == 400, refused.text
        assert http.get("/couch/io.files/m1").json()["_rev"] == second["_rev"]
        assert http.get("/couch/io.files/m1/big.bin").content == big


@pytest.mark.parametrize("backend", ["sqlite", "couchdb"])
def test_a_gzip_part_as_apache_couchdbs_replicator_sends_a_text_file(cluster, backend, request):
    """Apache CouchDB stores a compressible attachment (text/*, JSON...) gzip-encoded and its
    replicator pushes it as it is stored: the entry says `encoding: gzip`, `length` (the
    file's) and `encoded_length`, its digest is the md5 of the gzip bytes, and the part comes
    with `Content-Encoding: gzip`. The node takes the file decoded (its own digest is then
    the file's md5, as for any data it stores); gzip that is corrupt, cut short, bigger than
    the node's cap once decoded, or that the entry and the part disagree on, is refused and
    the document keeps what it had."""
    import gzip

    store = () if backend == "sqlite" else (
        "--store", "couchdb", "--couchdb-url", request.getfixturevalue("couchdb_url"))
    alice = cluster.add("alice", *store, start=False)
    config = alice.home / "node.toml"
    config.write_text(config.read_text().replace("max_attachment_size = 4294967296",
                                                 "max_attachment_size = 1000000"))
    alice.start()
    text = b"hello plugshare, a text file compresses well. " * 4000
    packed = gzip.compress(text)
    other = os.urandom(5000)

    def revision(n: int, parent: str | None, data: bytes, encoded: bytes, **lies) -> dict:
        own = f"{n}{'f' * 31}"
        return {"_id": "z1", "_rev": f"{n}-{own}", "title": f"v{n}",
                "_revisions": {"start": n, "ids": [own] + ([parent] if parent else [])},
                "_attachments": {
                    "notes.txt": {"follows": True, "content_type": "text/plain",
                                  "length": len(data), "digest": _md5(encoded),
                                  "revpos": n, "encoding": "gzip",
                                  "encoded_length": len(encoded), **lies},
                    "other.bin": {"follows": True, "content_type": "x/y",
                                  "length": len(other), "digest": _md5(other),
                                  "revpos": n}}}

    gzipped = ["Content-Encoding: gzip"]
    with _http(alice) as http:
        def put(doc: dict, parts) -> httpx.Response:
            return http.put(f"/couch/io.files/{doc['_id']}", params={"new_edits": "false"},
                            content=_related(doc, parts),
                            headers={"content-type": 'multipart/related; boundary="b0und"'})

        first = revision(1, None, text, packed)
        made = put(first, [("notes.txt", packed, gzipped), ("other.bin", other)])
        assert made.status_code == 201, made.text
        assert http.get("/couch/io.files/z1/notes.txt").content == text
        assert http.get("/couch/io.files/z1/other.bin").content == other
        stub = http.get("/couch/io.files/z1").json()["_attachments"]["notes.txt"]
        assert stub["length"] == len(text) and stub["digest"] == _md5(text), stub
        assert "encoding" not in stub and "encoded_length" not in stub, stub

        parent = first["_rev"].partition("-")[2]
        v2 = b"second version " * 3000
        v2_packed = gzip.compress(v2)
        bomb = gzip.compress(b"\0" * 3_000_000)  # 3 MB once decoded, over the 1 MB cap
        broken = bytearray(v2_packed)
        broken[len(broken) // 2] ^= 0xFF
        for doc, parts, status in (
                (revision(2, parent, v2, v2_packed),  # corrupt
                 [("notes.txt", bytes(broken), gzipped), ("other.bin", other)], 400),
                (revision(2, parent, v2, v2_packed[:-20]),  # cut short
                 [("notes.txt", v2_packed[:-20], gzipped), ("other.bin", other)], 400),
                (revision(2, parent, v2, v2_packed, digest=_md5(v2)),  # the wrong digest
                 [("notes.txt", v2_packed, gzipped), ("other.bin", other)], 400),
                (revision(2, parent, v2, v2_packed, encoded_length=5),  # a lying length
                 [("notes.txt", v2_packed, gzipped), ("other.bin", other)], 400),
                (revision(2, parent, v2, v2_packed),  # the part says nothing of gzip
                 [("notes.txt", v2_packed), ("other.bin", other)], 400),
                (revision(2, parent, v2, v2_packed),  # an encoding the node does not take
                 [("notes.txt", v2_packed, ["Content-Encoding: br"]), ("other.bin", other)],
                 415),
                (revision(2, parent, b"\0" * 3_000_000, bomb),
                 [("notes.txt", bomb, gzipped), ("other.bin", other)], 413)):
            refused = put(doc, parts)
            assert refused.status_code == status, (parts[0][2:], refused.text)
            assert http.get("/couch/io.files/z1").json()["_rev"] == first["_rev"]
        assert http.get("/couch/io.files/z1/notes.txt").content == text
        # and the good one lands
        landed = put(revision(2, parent, v2, v2_packed),
                     [("notes.txt", v2_packed, gzipped), ("other.bin", other)])
        assert landed.status_code == 201, landed.text
        assert http.get("/couch/io.files/z1/notes.txt").content == v2

        # The next revision, files unchanged, comes through _bulk_docs with stubs; CouchDB's
        # stub of the text file carries the gzip bytes' digest, which the node never held.
        two = landed.json()["rev"]
        third = {"_id": "z1", "_rev": f"3-{'3' * 32}", "title": "v3",
                 "_revisions": {"start": 3, "ids": ["3" * 32, two.partition("-")[2]]},
                 "_attachments": {
                     "notes.txt": {"stub": True, "content_type": "text/plain",
                                   "length": len(v2), "digest": _md5(v2_packed), "revpos": 2,
                                   "encoding": "gzip", "encoded_length": len(v2_packed)},
                     "other.bin": {"stub": True, "content_type": "x/y", "length": len(other),
                                   "digest": _md5(other), "revpos": 2}}}
        pushed = http.post("/couch/io.files/_bulk_docs", json={"docs": [third],
                                                                "new_edits": False})
        assert pushed.status_code == 201 and pushed.json() == [], pushed.text
        held = http.get("/couch/io.files/z1").json()
        assert held["_rev"] == third["_rev"], held
        assert held["_attachments"]["notes.txt"]["digest"] == _md5(v2)
        assert http.get("/couch/io.files/z1/notes.txt").content == v2
        # a stub naming a revpos at which the node holds no such file is still refused
        fourth = {**third, "_rev": f"4-{'4' * 32}",
                  "_revisions": {"start": 4, "ids": ["4" * 32, "3" * 32]},
                  "_attachments": {"notes.txt": {**third["_attachments"]["notes.txt"],
                                                 "revpos": 1}}}
        missing = http.post("/couch/io.files/_bulk_docs", json={"docs": [fourth],
                                                                 "new_edits": False})
        assert missing.status_code == 201 and missing.json()[0]["error"], missing.text
        assert http.get("/couch/io.files/z1").json()["_rev"] == third["_rev"]


def test_an_inline_edit_racing_another_write_is_a_409_never_a_second_branch(cluster):
    """An app's edit carrying 24 MiB inline and a plain edit of the same revision, sent at
    once: whichever lands first wins and the other is a 409 conflict, as for any two edits,
    whatever the moment the plain one comes in (here at several points of the inline
    request's life: read, decided, its data being stored). Never both, as two branches."""
    import json
    import threading
    import time

    alice = cluster.add("alice")
    data = os.urandom(24 * 1024 * 1024)
    for attempt, delay in enumerate((0.0, 0.3, 0.6, 0.9, 1.2, 1.5, 1.8)):
        doc_id = f"race-{attempt}"
        with _http(alice) as http:
            rev = http.put(f"/couch/io.notes/{doc_id}", json={"n": 0}).json()["rev"]
            body = json.dumps({"_rev": rev, "n": "inline", "_attachments": {
                "big.bin": _inline(data, "application/octet-stream")}}).encode()
            answers = {}

            def inline():
                with _http(alice) as own:
                    answers["inline"] = own.put(f"/couch/io.notes/{doc_id}", content=body,
                                                headers={"content-type": "application/json"})

            writer = threading.Thread(target=inline)
            writer.start()
            time.sleep(delay)
            answers["plain"] = http.put(f"/couch/io.notes/{doc_id}", json={"_rev": rev, "n": 1})
            writer.join(120)
            codes = sorted(a.status_code for a in answers.values())
            assert codes == [201, 409], {k: (a.status_code, a.text[:200])
                                         for k, a in answers.items()}
            stored = http.get(f"/couch/io.notes/{doc_id}", params={"conflicts": "true"}).json()
            assert "_conflicts" not in stored, stored
            winner = "inline" if answers["inline"].status_code == 201 else "plain"
            assert stored["_rev"] == answers[winner].json()["rev"]
