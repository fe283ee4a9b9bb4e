"""Attachments inline in CouchDB's JSON (base64 `data`), both ways, bounded.

In: PouchDB's push sends each new attachment's data inline in `_bulk_docs` (new_edits=false),
an app's edit may too. The request's data is spooled as it streams in (`spool.py`); each
inline entry becomes a `follows` entry whose data is then streamed from the spool to
`Store.put_replicated`, which checks it against the digest and length again.

Out: `_bulk_get?attachments=true` (PouchDB's pull) wants the data inline. The answer is
written as it goes, each attachment read from the store a chunk at a time and base64-encoded
piece by piece, so memory stays O(chunk) whatever the files' sizes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from plugshare.node.couch.errors import bad_request
from plugshare.node.couch.inline_scan import placeholder_index
from plugshare.node.couch.spool import Spool
from plugshare.store.attachments import CHUNK_SIZE, DEFAULT_CONTENT_TYPE, digest_of, rechunk

OpenAttachment = Callable[[str, str, str], Awaitable[tuple[Any, AsyncIterator[bytes]]]]


DataSource = Callable[[], AsyncIterator[bytes]]


def decoded_stubs(doc: dict) -> dict:
    """`doc` with the stubs of encoded files described as this node holds them. Apache
    CouchDB keeps a compressible file gzip-encoded; its stub then carries `encoding`,
    `encoded_length` and the digest of the gzip bytes. The node stores files decoded (see
    `spool.py`): such a stub names its file by name and revpos instead, as CouchDB matches
    stubs (`Stub.matches`)."""
    attachments = doc.get("_attachments")
    if not isinstance(attachments, dict) or not any(
            isinstance(e, dict) and e.get("stub") is True and
            e.get("encoding") not in (None, "identity") for e in attachments.values()):
        return doc
    entries = {}
    for name, entry in attachments.items():
        if isinstance(entry, dict) and entry.get("stub") is True and \
                entry.get("encoding") not in (None, "identity"):
            entry = {k: v for k, v in entry.items()
                     if k not in ("encoding", "encoded_length", "digest")}
        entries[name] = entry
    return {**doc, "_attachments": entries}


def take_inline(doc: dict, spool: Spool | None = None, *,
                new_edits: bool = False) -> tuple[dict, dict[str, DataSource]]:
    """(`doc` with its inline attachments as `follows` entries, where to read each one's
    data, by name). `data` is the placeholder of data the request spooled (`spool`), or
    base64 text. A declared digest or length the data does not have is refused here,
    before anything is decided or stored. The revpos of new data is the revision's
    generation: `_rev`'s for a replicated revision, the next one for an edit."""
    attachments = doc.get("_attachments")
    if not isinstance(attachments, dict) or not any(
            isinstance(e, dict) and "data" in e for e in attachments.values()):
        return doc, {}
    head = str(doc.get("_rev", "0")).partition("-")[0]
    generation = int(head) if head.isdigit() else 0
    if new_edits:
        generation += 1
    entries, sources = {}, {}
    for name, entry in attachments.items():
        if not isinstance(entry, dict) or "data" not in entry:
            entries[name] = entry
            continue
        length, digest, sources[name] = _data_of(name, entry["data"], spool)
        declared = entry.get("digest")
        if declared is not None and declared != digest:
            raise bad_request(f"attachment {name!r}: digest mismatch: the data is {digest}, "
                              f"not the declared {declared}")
        declared = entry.get("length")
        if declared is not None and declared != length:
            raise bad_request(f"attachment {name!r}: the data is {length} bytes, not the "
                              f"declared {declared!r}")
        revpos = entry.get("revpos") if not new_edits else None
        entries[name] = {"follows": True,
                         "content_type": entry.get("content_type") or DEFAULT_CONTENT_TYPE,
                         "length": length, "digest": digest,
                         "revpos": revpos or max(generation, 1)}
    return {**doc, "_attachments": entries}, sources


def _data_of(name: str, data: Any, spool: Spool | None) -> tuple[int, str, DataSource]:
    """(length, digest, source) of an inline `data` value."""
    index = placeholder_index(data)
    if spool is not None and index is not None and index in spool.entries:
        spooled = spool.entries[index]
        return spooled.length, spooled.digest, lambda: spool.read(index)
    if not isinstance(data, str):
        raise bad_request(f"attachment {name!r}: data must be base64 text")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"attachment {name!r}: data is not valid base64") from None
    digest = digest_of(hashlib.md5(raw, usedforsecurity=False))
    return len(raw), digest, lambda: one_piece(raw)


async def one_piece(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def results_with_data(results: list[dict],
                            open_attachment: OpenAttachment) -> AsyncIterator[bytes]:
    """`{"results": results}` as `_bulk_get` answers it, each `ok` document's attachments
    given inline (`data`, no `stub`), streamed."""
    yield b'{"results":['
    for i, result in enumerate(results):
        if i:
            yield b","
        yield b'{"id":' + json.dumps(result.get("id")).encode() + b',"docs":'
        async for piece in open_revs_with_data(result.get("docs") or [], open_attachment):
            yield piece
        yield b"}"
    yield b"]}"


async def open_revs_with_data(found: list[dict], open_attachment: OpenAttachment,
                              atts_since: list[str] | None = None) -> AsyncIterator[bytes]:
    """`open_revs` as JSON, each `ok` revision's attachments inline (those an `atts_since`
    revision already had as stubs: `held_up_to`), streamed."""
    yield b"["
    for i, entry in enumerate(found):
        if i:
            yield b","
        if "ok" not in entry:
            yield json.dumps(entry).encode()
            continue
        yield b'{"ok":'
        async for piece in _doc_with_data(entry["ok"], open_attachment,
                                          held_up_to(entry["ok"], atts_since)):
            yield piece
        yield b"}"
    yield b"]"


def held_up_to(doc: dict, atts_since: list[str] | None) -> int:
    """The generation up to which a reader holds `doc`'s files: that of the newest revision
    of `atts_since` in the doc's history (`_revisions`), 0 if none. Files of a revpos up to
    it go as stubs, as CouchDB answers `atts_since`."""
    history = doc.get("_revisions")
    if not atts_since or not isinstance(history, dict):
        return 0
    start, ids, wanted = history.get("start", 0), history.get("ids") or [], set(atts_since)
    return max((start - i for i, rev_id in enumerate(ids) if f"{start - i}-{rev_id}" in wanted),
               default=0)


def _sent(doc: dict, since: int) -> list[str]:
    """The names of `doc`'s files whose data goes with it (newer than `since`)."""
    if doc.get("_deleted"):
        return []
    return [name for name, stub in (doc.get("_attachments") or {}).items()
            if not isinstance(stub.get("revpos"), int) or stub["revpos"] > since]


async def _doc_with_data(doc: dict, open_attachment: OpenAttachment,
                         since: int = 0) -> AsyncIterator[bytes]:
    attachments = doc.get("_attachments") or {}
    sent = set(_sent(doc, since))
    if not sent:
        yield json.dumps(doc).encode()
        return
    rest = json.dumps({k: v for k, v in doc.items() if k != "_attachments"}).encode()
    yield rest[:-1] + (b"," if rest != b"{}" else b"") + b'"_attachments":{'
    for i, (name, stub) in enumerate(attachments.items()):
        if name not in sent:
            yield (b"," if i else b"") + json.dumps(name).encode() + b":" + \
                json.dumps(stub).encode()
            continue
        meta = {k: v for k, v in stub.items() if k not in ("stub", "length", "data")}
        head = json.dumps(meta).encode()
        yield (b"," if i else b"") + json.dumps(name).encode() + b":" + head[:-1] + \
            (b"," if head != b"{}" else b"") + b'"data":"'
        _meta, chunks = await open_attachment(doc["_id"], name, doc["_rev"])
        try:
            # base64 of pieces whose sizes are multiples of 3 concatenates into the whole's
            async for piece in rechunk(chunks, 3 * (CHUNK_SIZE // 3)):
                yield base64.b64encode(piece)
        finally:
            await chunks.aclose()
        yield b'"}'
    yield b"}}"


async def open_revs_multipart(found: list[dict], open_attachment: OpenAttachment,
                              boundary: str, atts_since: list[str] | None = None
                              ) -> AsyncIterator[bytes]:
    """`open_revs` as CouchDB answers `Accept: multipart/mixed` (its replicator reads no
    other form): a part per revision; one with files to send is a multipart/related of its
    JSON (those files as `follows` entries) and then each file's data raw, streamed; a
    missing revision is a JSON part marked `error="true"`."""
    outer = boundary.encode()
    yield b"--" + outer
    for entry in found:
        if "ok" not in entry:
            yield (b'\r\nContent-Type: application/json; error="true"\r\n\r\n' +
                   json.dumps(entry).encode() + b"\r\n--" + outer)
            continue
        doc = entry["ok"]
        sent = _sent(doc, held_up_to(doc, atts_since))
        if not sent:
            yield (b"\r\nContent-Type: application/json\r\n\r\n" + json.dumps(doc).encode() +
                   b"\r\n--" + outer)
            continue
        inner = secrets.token_hex(16).encode()
        attachments = dict(doc["_attachments"])
        for name in sent:
            attachments[name] = {**{k: v for k, v in attachments[name].items()
                                    if k not in ("stub", "data")}, "follows": True}
        yield (b'\r\nContent-Type: multipart/related; boundary="' + inner + b'"\r\n\r\n'
               b"--" + inner + b"\r\nContent-Type: application/json\r\n\r\n" +
               json.dumps({**doc, "_attachments": attachments}).encode())
        for name in sent:
            stub = attachments[name]
            quoted = name.replace("\\", "\\\\").replace('"', '\\"')
            yield (f'\r\n--{inner.decode()}\r\nContent-Disposition: attachment; '
                   f'filename="{quoted}"\r\nContent-Type: {stub.get("content_type")}\r\n'
                   f'Content-Length: {stub.get("length")}\r\n\r\n').encode("utf-8")
            _meta, chunks = await open_attachment(doc["_id"], name, doc["_rev"])
            try:
                async for piece in chunks:
                    yield piece
            finally:
                await chunks.aclose()
        yield b"\r\n--" + inner + b"--\r\n--" + outer
    yield b"--"
