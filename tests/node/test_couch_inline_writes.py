"""Inline attachment data written through `/couch` meets the same caps as a file PUT to
`/data` (issue 13): a share's size and type caps, decided by the token per document, and the
node's own cap, on all the data of one request."""

from __future__ import annotations

import base64
import os

import httpx

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
