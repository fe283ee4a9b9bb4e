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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from plugshare.node.couch.errors import bad_request
from plugshare.node.couch.inline_scan import placeholder_index
from plugshare.node.couch.spool import Spool
from plugshare.store.attachments import CHUNK_SIZE, DEFAULT_CONTENT_TYPE, rechunk

OpenAttachment = Callable[[str, str, str], Awaitable[tuple[Any, AsyncIterator[bytes]]]]


DataSource = Callable[[], AsyncIterator[bytes]]


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
    digest = "md5-" + base64.b64encode(hashlib.md5(raw, usedforsecurity=False).digest()
                                       ).decode()
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
