"""Attachments inline in CouchDB's JSON (base64 `data`), both ways, bounded.

In: PouchDB's push sends each new attachment's data inline in `_bulk_docs` (new_edits=false).
The request body is already capped (`max_body`), so what is decoded is too; each inline
entry becomes a `follows` entry whose data is then streamed to `Store.put_replicated`, which
checks it against the digest and length.

Out: `_bulk_get?attachments=true` (PouchDB's pull) wants the data inline. The answer is
written as it goes, each attachment read from the store a chunk at a time and base64-encoded
piece by piece, so memory stays O(chunk) whatever the files' sizes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from plugshare.node.couch.errors import bad_request
from plugshare.store.attachments import CHUNK_SIZE, DEFAULT_CONTENT_TYPE, rechunk

OpenAttachment = Callable[[str, str, str], Awaitable[tuple[Any, AsyncIterator[bytes]]]]


def take_inline(doc: dict) -> tuple[dict, dict[str, bytes]]:
    """(`doc` with its inline attachments as `follows` entries, their data by name). A
    replicated revision only (its `_rev` gives the revpos of data sent without one)."""
    attachments = doc.get("_attachments")
    if not isinstance(attachments, dict) or not any(
            isinstance(e, dict) and "data" in e for e in attachments.values()):
        return doc, {}
    generation = int(str(doc.get("_rev", "0")).partition("-")[0] or 0)
    entries, data = {}, {}
    for name, entry in attachments.items():
        if not isinstance(entry, dict) or "data" not in entry:
            entries[name] = entry
            continue
        if not isinstance(entry["data"], str):
            raise bad_request(f"attachment {name!r}: data must be base64 text")
        try:
            raw = base64.b64decode(entry["data"], validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"attachment {name!r}: data is not valid base64") from None
        digest = entry.get("digest") or "md5-" + base64.b64encode(
            hashlib.md5(raw, usedforsecurity=False).digest()).decode()
        entries[name] = {"follows": True,
                         "content_type": entry.get("content_type") or DEFAULT_CONTENT_TYPE,
                         "length": len(raw), "digest": digest,
                         "revpos": entry.get("revpos") or max(generation, 1)}
        data[name] = raw
    return {**doc, "_attachments": entries}, data


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


async def open_revs_with_data(found: list[dict],
                              open_attachment: OpenAttachment) -> AsyncIterator[bytes]:
    """`open_revs` as JSON, each `ok` revision's attachments inline, streamed."""
    yield b"["
    for i, entry in enumerate(found):
        if i:
            yield b","
        if "ok" not in entry:
            yield json.dumps(entry).encode()
            continue
        yield b'{"ok":'
        async for piece in _doc_with_data(entry["ok"], open_attachment):
            yield piece
        yield b"}"
    yield b"]"


async def _doc_with_data(doc: dict, open_attachment: OpenAttachment) -> AsyncIterator[bytes]:
    attachments = doc.get("_attachments") or {}
    if not attachments or doc.get("_deleted"):
        yield json.dumps(doc).encode()
        return
    rest = json.dumps({k: v for k, v in doc.items() if k != "_attachments"}).encode()
    yield rest[:-1] + (b"," if rest != b"{}" else b"") + b'"_attachments":{'
    for i, (name, stub) in enumerate(attachments.items()):
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
