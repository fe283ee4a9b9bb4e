"""The scanner that splits a `/couch` write body into its JSON and its attachments' data
(pure): whatever pieces the body comes in, the JSON parses to the body with placeholders and
the data decodes to the attachments' bytes."""

from __future__ import annotations

import base64
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugshare.node.couch.inline_scan import (BULK_DOCS, ONE_DOC, Base64Stream,
                                              InlineBodyError, InlineScanner, placeholder,
                                              placeholder_index)


def split(body: bytes, data_path: tuple, cuts: list[int], max_skeleton: int = 1 << 20):
    scanner = InlineScanner(data_path, max_skeleton=max_skeleton)
    data: dict[int, bytearray] = {}
    decoders: dict[int, Base64Stream] = {}
    ended = set()
    at = 0
    for cut in sorted(set(cuts)) + [len(body)]:
        for event in scanner.feed(body[at:cut]):
            decoder = decoders.setdefault(event.index, Base64Stream())
            data.setdefault(event.index, bytearray()).extend(decoder.feed(event.piece))
            if event.end:
                decoder.finish()
                ended.add(event.index)
        at = cut
    skeleton = json.loads(scanner.finish())
    assert ended == set(data)
    return skeleton, {i: bytes(d) for i, d in data.items()}


FILES = [os.urandom(n) for n in (0, 1, 2, 3, 1000, 70_000)]


def bulk_body(escape_slashes: bool = False) -> bytes:
    docs = []
    for i, data in enumerate(FILES):
        text = base64.b64encode(data).decode()
        docs.append({"_id": f"d{i}", "_rev": "1-a", "note": 'a "data" key: {"x": [1, 2]}',
                     "data": "not an attachment", "nested": {"_attachments": {"x": {
                         "data": "c3R1Yg=="}}},
                     "_attachments": {f"f\"{i}\\/": {"content_type": "x/y", "data": text}}})
    body = json.dumps({"new_edits": False, "docs": docs})
    if escape_slashes:
        body = body.replace("/", "\\/")
    return body.encode()


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(bulk_body(True))), max_size=40),
       escape=st.booleans())
def test_any_pieces_give_the_same_json_and_data(cuts, escape):
    body = bulk_body(escape)
    skeleton, data = split(body, BULK_DOCS, [c for c in cuts if c <= len(body)])
    original = json.loads(body)
    assert len(data) == len(FILES)
    for i, doc in enumerate(skeleton["docs"]):
        [(name, entry)] = doc["_attachments"].items()
        assert name == [*original["docs"][i]["_attachments"]][0]
        assert data[placeholder_index(entry["data"])] == FILES[i]
        # everything else is the body itself
        assert doc["data"] == "not an attachment"
        assert doc["nested"] == original["docs"][i]["nested"]
        assert doc["note"] == original["docs"][i]["note"]
    assert skeleton["new_edits"] is False


def test_one_document_body_and_data_places_only():
    text = base64.b64encode(b"hello").decode()
    body = json.dumps({"_id": "x", "_attachments": {"a": {"data": text},
                                                    "b": {"data": 5}}}).encode()
    skeleton, data = split(body, ONE_DOC, [3, 40])
    assert skeleton["_attachments"]["a"]["data"] == placeholder(0)
    assert skeleton["_attachments"]["b"]["data"] == 5  # not text: left for the caller
    assert data == {0: b"hello"}
    # the bulk place is not the one-document place
    skeleton, data = split(body, BULK_DOCS, [])
    assert data == {} and skeleton["_attachments"]["a"]["data"] == text


@pytest.mark.parametrize("text", ["QQ=", "QQ==QQ==", "Q!==", "QQ\\n==", "QUJD\\u0041"])
def test_bad_base64_is_refused(text):
    body = ('{"_attachments": {"a": {"data": "' + text + '"}}}').encode()
    with pytest.raises(InlineBodyError) as refused:
        split(body, ONE_DOC, [])
    assert refused.value.status == 400


def test_the_json_around_the_data_is_capped_not_the_data():
    text = base64.b64encode(os.urandom(300_000)).decode()
    body = json.dumps({"_attachments": {"a": {"data": text}}}).encode()
    _, data = split(body, ONE_DOC, list(range(0, len(body), 4096)), max_skeleton=1000)
    assert len(data[0]) == 300_000
    with pytest.raises(InlineBodyError) as refused:
        split(json.dumps({"pad": "x" * 2000}).encode(), ONE_DOC, [], max_skeleton=1000)
    assert refused.value.status == 413
    with pytest.raises(InlineBodyError) as refused:
        split(b"[" * 10_000, ONE_DOC, [])
    assert refused.value.status == 400


def test_a_body_cut_short_is_refused():
    body = json.dumps({"_attachments": {"a": {"data": "QUJD"}}}).encode()
    for end in (len(body) - 1, len(body) - 4, 10):
        scanner = InlineScanner(ONE_DOC, max_skeleton=1000)
        scanner.feed(body[:end])
        with pytest.raises(InlineBodyError):
            scanner.finish()


# -- multipart/related (CouchDB's replicator's doc PUT) ---------------------------------------

from plugshare.node.couch.multipart import (MultipartScanner, Part, PartData, PartEnd,  # noqa: E402
                                            boundary_of, disposition_filename)


def multipart(boundary: bytes, parts: list[tuple[dict, bytes]]) -> bytes:
    out = b"preamble, ignored\r\n"
    for headers, data in parts:
        out += b"--" + boundary + b"\r\n"
        out += b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items()) + b"\r\n"
        out += data + b"\r\n"
    return out + b"--" + boundary + b"--\r\nepilogue"


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=80_000), max_size=30))
def test_multipart_parts_come_out_whole_whatever_the_pieces(cuts):
    boundary = b"abc123"
    # data holding near-boundaries: CRLF, "--abc12", a boundary without its CRLF
    tricky = b"x\r\n--abc12y--abc123z\r\n-" + os.urandom(70_000)
    parts = [({"Content-Type": "application/json"}, b'{"_id": "d"}'),
             ({"Content-Disposition": 'attachment; filename="a \\"b\\".bin"'}, tricky),
             ({}, b"")]
    body = multipart(boundary, parts)
    scanner = MultipartScanner(boundary)
    got: list[list] = []
    at = 0
    for cut in sorted(c for c in set(cuts) if c < len(body)) + [len(body)]:
        for event in scanner.feed(body[at:cut]):
            if isinstance(event, Part):
                got.append([event.headers, b"", False])
            elif isinstance(event, PartData):
                assert not got[-1][2]
                got[-1][1] += event.piece
            else:
                assert isinstance(event, PartEnd)
                got[-1][2] = True
        at = cut
    scanner.finish()
    assert [(h, d, e) for h, d, e in got] == [
        ({k.lower(): v for k, v in headers.items()}, data, True) for headers, data in parts]
    assert disposition_filename(got[1][0]) == 'a "b".bin'
    assert disposition_filename(got[0][0]) is None


def test_multipart_boundaries_and_bad_bodies():
    assert boundary_of('multipart/related; boundary="x y"') == b"x y"
    assert boundary_of("multipart/related;boundary=abc") == b"abc"
    for bad in ("multipart/related", "multipart/related; boundary=" + "b" * 71):
        with pytest.raises(InlineBodyError):
            boundary_of(bad)
    scanner = MultipartScanner(b"b")
    scanner.feed(b"--b\r\nContent-Type: application/json\r\n\r\n{}")
    with pytest.raises(InlineBodyError):
        scanner.finish()  # cut before the closing boundary
    with pytest.raises(InlineBodyError) as refused:
        MultipartScanner(b"b").feed(b"--b\r\n" + b"X-Pad: " + b"p" * 20_000)
    assert refused.value.status == 413
