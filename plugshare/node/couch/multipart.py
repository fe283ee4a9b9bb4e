"""`multipart/related` bodies as they stream in (pure, sans-I/O): CouchDB's replicator PUTs
a document with attachments as a JSON part and then one part per attachment (its `follows`
entries), the data raw.

`MultipartScanner.feed` turns pieces of the body into `Part` starts (their headers) and data
pieces; a part's data is never gathered here, and what is held between two pieces is at
most a boundary's length, or one part's headers (capped).

Apache CouchDB keeps a compressible attachment (text, JSON...) gzip-encoded and its
replicator sends it so, the part marked `Content-Encoding: gzip`: `GzipStream` decodes such a
part as it comes, in bounded slices (a small part may decode to a great deal)."""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterator

import attrs

from plugshare.node.couch.inline_scan import InlineBodyError
from plugshare.store.attachments import digest_of

MAX_HEADERS = 16 * 1024  # bytes of one part's headers
MAX_BOUNDARY = 70  # RFC 2046
DECODED_SLICE = 1024 * 1024  # bytes of decoded data produced at a time


def boundary_of(content_type: str) -> bytes:
    """The boundary a `multipart/related; boundary=...` Content-Type names (400 if none)."""
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary":
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            if 0 < len(value) <= MAX_BOUNDARY and value.isascii():
                return value.encode()
    raise InlineBodyError(400, "multipart/related needs a boundary (1-70 ASCII characters)")


@attrs.define
class Part:
    """A part begins: its headers, names lower-cased."""
    headers: dict[str, str]


@attrs.define
class PartData:
    piece: bytes


class PartEnd:
    pass


class MultipartScanner:
    def __init__(self, boundary: bytes):
        # The body is read as if a CRLF came before it, so its first delimiter is found
        # like every other (RFC 2046 allows a preamble, ignored).
        self._delimiter = b"\r\n--" + boundary
        self._buffer = bytearray(b"\r\n")
        self._state = "preamble"  # -> after_delimiter -> headers -> data ... -> epilogue
        self._in_part = False

    def feed(self, piece: bytes) -> list:
        self._buffer += piece
        events: list = []
        while True:
            state = self._state
            if state in ("preamble", "data"):
                at = self._buffer.find(self._delimiter)
                if at < 0:
                    keep = len(self._delimiter) - 1  # the start of a delimiter, maybe
                    if len(self._buffer) > keep:
                        if state == "data":
                            events.append(PartData(bytes(self._buffer[:-keep])))
                        del self._buffer[:-keep]
                    return events
                if state == "data":
                    if at:
                        events.append(PartData(bytes(self._buffer[:at])))
                    events.append(PartEnd())
                del self._buffer[:at + len(self._delimiter)]
                self._state = "after_delimiter"
            elif state == "after_delimiter":
                if len(self._buffer) < 2:
                    return events
                if self._buffer[:2] == b"--":
                    self._state = "epilogue"
                    continue
                line_end = self._buffer.find(b"\r\n")
                if line_end < 0:
                    if len(self._buffer) > 256:
                        raise InlineBodyError(400, "malformed multipart body")
                    return events
                if self._buffer[:line_end].strip(b" \t"):  # only transport padding allowed
                    raise InlineBodyError(400, "malformed multipart body")
                del self._buffer[:line_end + 2]
                self._state = "headers"
            elif state == "headers":
                end = self._buffer.find(b"\r\n\r\n")
                if self._buffer.startswith(b"\r\n"):  # a part with no headers
                    end, skip = 0, 2
                else:
                    skip = 4
                if end < 0:
                    if len(self._buffer) > MAX_HEADERS:
                        raise InlineBodyError(413, "a part's headers are over "
                                                   f"{MAX_HEADERS} bytes")
                    return events
                events.append(Part(_headers(bytes(self._buffer[:end]))))
                del self._buffer[:end + skip]
                self._state = "data"
            else:  # epilogue: ignored
                self._buffer.clear()
                return events

    def finish(self) -> None:
        if self._state != "epilogue":
            raise InlineBodyError(400, "the multipart body ends before its closing boundary")


def _headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.split(b"\r\n") if block else []:
        name, colon, value = line.partition(b":")
        if not colon:
            raise InlineBodyError(400, "malformed multipart part header")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return headers


def disposition_filename(headers: dict[str, str]) -> str | None:
    """The `filename` of a part's Content-Disposition (CouchDB names attachment parts so)."""
    for param in headers.get("content-disposition", "").split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "filename":
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
            return value
    return None


def part_encoding(headers: dict[str, str]) -> str:
    """`identity` or `gzip`, the encoding of a part's data (415 for any other)."""
    encoding = headers.get("content-encoding", "identity").strip().lower() or "identity"
    if encoding not in ("identity", "gzip"):
        raise InlineBodyError(415, f"an attachment part is encoded as {encoding!r}: only "
                                   "gzip is taken, or the data as it is")
    return encoding


class GzipStream:
    """A gzip-encoded part decoded as it comes, any piece sizes, never more than
    `DECODED_SLICE` bytes of output at once; the md5 and length of the encoded bytes are
    counted on the way (CouchDB's digest of a gzip-encoded attachment is theirs)."""

    def __init__(self):
        self._inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        self._md5 = hashlib.md5(usedforsecurity=False)
        self.encoded_length = 0

    @property
    def encoded_digest(self) -> str:
        return digest_of(self._md5)

    def feed(self, piece: bytes) -> Iterator[bytes]:
        self._md5.update(piece)
        self.encoded_length += len(piece)
        data = piece
        while data or not self._inflate.eof:
            if self._inflate.eof:
                raise InlineBodyError(400, "an attachment part has data after its gzip end")
            try:
                out = self._inflate.decompress(data, DECODED_SLICE)
            except zlib.error:
                raise InlineBodyError(400, "an attachment part is not valid gzip") from None
            data = self._inflate.unconsumed_tail
            if out:
                yield out
            # A full slice may leave output behind with no input left: ask again.
            if not data and len(out) < DECODED_SLICE:
                break
        if self._inflate.unused_data:
            raise InlineBodyError(400, "an attachment part has data after its gzip end")

    def finish(self) -> None:
        if not self._inflate.eof:
            raise InlineBodyError(400, "an attachment part's gzip data is cut short")
