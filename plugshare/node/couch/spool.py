"""A `/couch` write body with attachment data inline, read as it streams in: the JSON around
the data parsed (capped as any body), each attachment's base64 decoded into one temporary
file per request (capped in all), its md5 and length counted on the way.

The token must decide a document before anything is stored, and the data can come before
the fields it decides on, so the data waits in the spool, not in memory: a small request's
in memory (`IN_MEMORY`), a larger one's in an unnamed file (in the node's home: the temp dir
may be a tmpfs, memory) the system deletes when it is closed, whatever ends the request (a
client cut off halfway included: nothing is left).
Requests spooling at once are bounded (`SPOOLING`), so are their bytes, by the node's cap.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import attrs
import trio
from starlette.requests import ClientDisconnect, Request

from plugshare.node.couch.body import check_json_type
from plugshare.node.couch.errors import CouchError, bad_request
from plugshare.node.couch.inline_scan import (Base64Stream, DataEvent, InlineBodyError,
                                              InlineScanner, placeholder)
from plugshare.node.couch.multipart import (GzipStream, MultipartScanner, Part, PartData,
                                            boundary_of, disposition_filename, part_encoding)
from plugshare.store.attachments import CHUNK_SIZE, digest_of

IN_MEMORY = 1024 * 1024  # spooled bytes a request keeps in memory before using a file
WRITE_BATCH = 1024 * 1024  # decoded bytes gathered before one write to the spool
SPOOLING = 4  # requests spooling attachment data at once (more wait their turn)
BODY_IDLE = 60.0  # seconds a body may stall halfway before the request is ended (408), so a
# silent client cannot hold a spooling slot for good


@attrs.define
class Spooled:
    """One attachment's decoded data in the spool."""
    offset: int
    length: int = 0
    digest: str = ""  # md5-<base64>, as CouchDB computes it
    encoding: str = "identity"  # how it came: gzip-encoded data is spooled decoded,
    encoded_length: int | None = None  # ...and these are of the bytes that came
    encoded_digest: str | None = None


class Spool:
    def __init__(self, max_bytes: int, slots: trio.CapacityLimiter, directory=None):
        self._max = max_bytes
        self._directory = directory
        self._slots = slots
        self._holding_slot = False
        self._file: tempfile.SpooledTemporaryFile | None = None
        self._size = 0  # bytes in the file, or on their way to it
        self._pending = bytearray()
        self._open: tuple[int, Base64Stream | GzipStream | None, object, Spooled] | None = None
        self._lock = trio.Lock()
        self.entries: dict[int, Spooled] = {}

    async def take(self, event: DataEvent) -> None:
        """Base64 text of data string `event.index` (`inline_scan`)."""
        await self._add(event.index, event.piece, event.end, base64_text=True)

    async def take_raw(self, index: int, data: bytes, end: bool,
                       encoding: str = "identity") -> None:
        """Data of attachment `index` (a multipart part) as it came: raw, or gzip-encoded
        (`encoding`), spooled decoded."""
        await self._add(index, data, end, base64_text=False, encoding=encoding)

    async def _add(self, index: int, piece: bytes, end: bool, *, base64_text: bool,
                   encoding: str = "identity") -> None:
        if self._open is None or self._open[0] != index:
            decoder = Base64Stream() if base64_text else \
                GzipStream() if encoding == "gzip" else None
            await self._begin(index, decoder, encoding)
        _, decoder, md5, entry = self._open
        for data in _decoded(decoder, piece):
            if self._size + len(data) > self._max:
                raise InlineBodyError(413, f"the attachments' data is over {self._max} bytes "
                                           "(this node's cap)")
            self._size += len(data)
            entry.length += len(data)
            md5.update(data)
            self._pending += data
            if len(self._pending) >= WRITE_BATCH:
                await self._flush()
        if end:
            if decoder is not None:
                decoder.finish()
            if isinstance(decoder, GzipStream):
                entry.encoded_length = decoder.encoded_length
                entry.encoded_digest = decoder.encoded_digest
            entry.digest = digest_of(md5)
            self.entries[index] = entry
            self._open = None

    async def _begin(self, index: int, decoder: Base64Stream | GzipStream | None,
                     encoding: str) -> None:
        if not self._holding_slot:
            await self._slots.acquire()
            self._holding_slot = True
        if self._file is None:
            self._file = tempfile.SpooledTemporaryFile(max_size=IN_MEMORY, dir=self._directory)
        self._open = (index, decoder, hashlib.md5(usedforsecurity=False),
                      Spooled(offset=self._size, encoding=encoding))

    async def _flush(self) -> None:
        if not self._pending:
            return
        data, self._pending = bytes(self._pending), bytearray()
        file = self._file
        async with self._lock:
            await trio.to_thread.run_sync(_append, file, data)

    async def done(self) -> None:
        await self._flush()

    async def read(self, index: int) -> AsyncIterator[bytes]:
        """Attachment `index`'s data, a chunk at a time."""
        entry = self.entries[index]
        at, end = entry.offset, entry.offset + entry.length
        while at < end:
            async with self._lock:
                piece = await trio.to_thread.run_sync(_read, self._file, at,
                                                      min(CHUNK_SIZE, end - at))
            if not piece:
                raise OSError("the spool ended early")
            at += len(piece)
            yield piece

    async def aclose(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            file.close()  # an unnamed file: gone with its last descriptor
        if self._holding_slot:
            self._holding_slot = False
            self._slots.release()


def _decoded(decoder: Base64Stream | GzipStream | None, piece: bytes) -> Iterable[bytes]:
    if decoder is None:
        return (piece,) if piece else ()
    if isinstance(decoder, GzipStream):
        return decoder.feed(piece)  # lazily: one bounded slice at a time
    data = decoder.feed(piece)
    return (data,) if data else ()


def _append(file, data: bytes) -> None:
    file.seek(0, 2)
    file.write(data)


def _read(file, at: int, size: int) -> bytes:
    file.seek(at)
    return file.read(size)


@asynccontextmanager
async def inline_body(request: Request, data_path: tuple, *, max_json: int, max_data: int,
                      slots: trio.CapacityLimiter, directory=None
                      ) -> AsyncIterator[tuple[dict, Spool]]:
    """(the body, each attachment's data string replaced by its placeholder; the spool of
    that data) for the request's block. 413 past `max_json` bytes of JSON or `max_data`
    bytes of data, 400 for malformed JSON or base64, 415 for a body not declared JSON."""
    check_json_type(request)
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and \
            int(length) > max_json + 4 * (max_data // 3 + 1):  # the data's base64 and the JSON
        raise CouchError(413, "request_entity_too_large",
                         f"the body is over {max_json} bytes of JSON and {max_data} bytes of "
                         "attachment data")
    scanner = InlineScanner(data_path, max_skeleton=max_json)
    spool = Spool(max_data, slots, directory)
    try:
        try:
            async for piece in _pieces(request):
                for event in scanner.feed(piece):
                    await spool.take(event)
            skeleton = scanner.finish()
            await spool.done()
        except InlineBodyError as exc:
            raise _as_couch(exc) from None
        yield _json_object(skeleton), spool
    finally:
        with trio.CancelScope(shield=True):
            await spool.aclose()


@asynccontextmanager
async def multipart_body(request: Request, *, max_json: int, max_data: int,
                         slots: trio.CapacityLimiter, directory=None
                         ) -> AsyncIterator[tuple[dict, Spool]]:
    """A `multipart/related` doc PUT (CouchDB's replicator): its JSON part, whose `follows`
    entries become inline entries whose data is the spooled part each names (by its
    Content-Disposition filename, else in order), as `inline_body` gives them."""
    spool = Spool(max_data, slots, directory)
    try:
        try:
            scanner = MultipartScanner(boundary_of(request.headers.get("content-type", "")))
            head = bytearray()  # the first part: the document
            parts = 0
            filenames: list[str | None] = []  # of each attachment part (those after it)
            encodings: list[str] = []  # ...and how each one's data is encoded
            async for piece in _pieces(request):
                for event in scanner.feed(piece):
                    if isinstance(event, Part):
                        parts += 1
                        if parts > 1:
                            filenames.append(disposition_filename(event.headers))
                            encodings.append(part_encoding(event.headers))
                    elif isinstance(event, PartData):
                        if parts == 1:
                            head += event.piece
                            if len(head) > max_json:
                                raise InlineBodyError(413, f"the document part is over "
                                                           f"{max_json} bytes")
                        else:
                            await spool.take_raw(len(filenames) - 1, event.piece, False,
                                                 encodings[-1])
                    elif parts > 1:  # the end of an attachment part
                        await spool.take_raw(len(filenames) - 1, b"", True, encodings[-1])
            scanner.finish()
            await spool.done()
        except InlineBodyError as exc:
            raise _as_couch(exc) from None
        yield _with_parts(_json_object(bytes(head)), filenames, spool), spool
    finally:
        with trio.CancelScope(shield=True):
            await spool.aclose()


def _with_parts(doc: dict, filenames: list[str | None], spool: Spool) -> dict:
    attachments = doc.get("_attachments")
    if not isinstance(attachments, dict):
        attachments = {}
    follows = [n for n, e in attachments.items() if isinstance(e, dict) and e.get("follows")]
    if len(follows) != len(filenames):
        raise bad_request(f"{len(follows)} attachments follow the document, but "
                          f"{len(filenames)} parts do")
    if all(f is not None for f in filenames):
        if sorted(filenames) != sorted(follows):
            raise bad_request("the parts' filenames are not the attachments that follow")
        index = {name: i for i, name in enumerate(filenames)}
    else:
        index = {name: i for i, name in enumerate(follows)}
    entries = dict(attachments)
    for name in follows:
        entry = attachments[name]
        spooled = spool.entries[index[name]]
        encoding = entry.get("encoding") or "identity"
        if encoding not in ("identity", "gzip"):
            raise CouchError(415, "bad_content_type", f"attachment {name!r}: encoded data "
                             f"({encoding}) is not taken: send it as it is, or gzip")
        if encoding != spooled.encoding:
            raise bad_request(f"attachment {name!r}: its entry says {encoding}, its part "
                              f"{spooled.encoding}")
        kept = {k: v for k, v in entry.items() if k != "follows"}
        if encoding == "gzip":
            # The declared digest and encoded_length are the gzip bytes': checked against
            # them here; the data is stored decoded, and described as such.
            if entry.get("digest", spooled.encoded_digest) != spooled.encoded_digest:
                raise bad_request(f"attachment {name!r}: digest mismatch: the gzip data is "
                                  f"{spooled.encoded_digest}, not the declared "
                                  f"{entry['digest']}")
            if entry.get("encoded_length", spooled.encoded_length) != spooled.encoded_length:
                raise bad_request(f"attachment {name!r}: the gzip data is "
                                  f"{spooled.encoded_length} bytes, not the declared "
                                  f"{entry['encoded_length']!r}")
            kept = {k: v for k, v in kept.items()
                    if k not in ("encoding", "encoded_length", "digest")}
        entries[name] = {**kept, "data": placeholder(index[name])}
    return {**doc, "_attachments": entries} if follows else doc


async def _pieces(request: Request) -> AsyncIterator[bytes]:
    """The body's pieces; a body stalled for BODY_IDLE ends the request (408), one whose
    client went away before its end is a plain refusal (no answer reaches anyone; the
    spool goes with the request), not a server error."""
    pieces = request.stream().__aiter__()
    while True:
        with trio.move_on_after(BODY_IDLE) as idle:
            try:
                piece = await pieces.__anext__()
            except StopAsyncIteration:
                return
            except ClientDisconnect:
                raise bad_request("the client went away before the end of its body") from None
        if idle.cancelled_caught:
            raise CouchError(408, "request_timeout", f"the body stalled for {BODY_IDLE:.0f} s")
        yield piece


def _as_couch(exc: InlineBodyError) -> CouchError:
    error = {413: "request_entity_too_large", 415: "bad_content_type"}.get(exc.status,
                                                                          "bad_request")
    return CouchError(exc.status, error, exc.reason)


def _json_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise bad_request("invalid UTF-8 JSON") from None
    if not isinstance(body, dict):
        raise bad_request("Request body must be a JSON object")
    return body
