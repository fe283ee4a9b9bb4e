"""Attachments, the parts both backends share (pure, no I/O).

An attachment is a named file on one revision of a document, with CouchDB's metadata:
`content_type`, `length`, `digest` (`md5-<base64>` of the data, as CouchDB computes it) and
`revpos` (the generation that last wrote it). Documents carry them in `_attachments`: stubs
(`"stub": true`) on reads; on writes a stub keeps the attachment of the revision written on
(or, replicated, one this store already holds with that digest) and an omitted name removes
it. Data moves only through the streaming methods (`Store.put_attachment`,
`Store.open_attachment`, `Store.put_replicated`), never whole in memory.

Here: checking names, content types, digests and ranges; parsing the `_attachments` a caller
sends; re-chunking a stream into fixed pieces; and checking a stream against the digest and
length a caller declared.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import attrs

from plugshare.store.base import BadRequest, RangeNotSatisfiable

CHUNK_SIZE = 256 * 1024  # bytes per stored / streamed chunk: memory per stream is O(this)
MAX_NAME_LENGTH = 255
MAX_CONTENT_TYPE_LENGTH = 255
MAX_ATTACHMENTS = 1000  # per revision: every write reads them all
DEFAULT_CONTENT_TYPE = "application/octet-stream"
_DIGEST_PREFIX = "md5-"


@attrs.frozen
class AttachmentMeta:
    """What `open_attachment` says about the attachment it streams (the whole file's, also
    for a range read)."""

    name: str
    content_type: str
    length: int
    digest: str  # "md5-<base64>"
    revpos: int

    def stub(self) -> dict[str, Any]:
        return stub_of(self.content_type, self.length, self.digest, self.revpos)


def stub_of(content_type: str, length: int, digest: str, revpos: int) -> dict[str, Any]:
    """An attachment as documents show it."""
    return {"content_type": content_type, "length": length, "digest": digest,
            "revpos": revpos, "stub": True}


# -- what a caller sends in `_attachments` --------------------------------------------------


@attrs.frozen
class Stub:
    """Keep the attachment of this name (from the parent revision, or, replicated, one the
    store holds for this document with `digest`, else with `revpos`: see `matches`)."""

    digest: str | None
    revpos: int | None

    def matches(self, entry: dict) -> bool:
        """Whether a held attachment entry of this name is the one a replicated stub names:
        the same digest, or with no digest the same revpos (as CouchDB matches stubs; the
        digest of a file Apache CouchDB keeps gzip-encoded is the gzip bytes', held nowhere
        else)."""
        if self.digest is not None:
            return entry.get("digest") == self.digest
        return self.revpos is not None and entry.get("revpos") == self.revpos


@attrs.frozen
class Follows:
    """Replication: the data comes as a stream given alongside (`Store.put_replicated`)."""

    content_type: str
    length: int
    digest: str
    revpos: int


def check_attachment_name(name: object) -> str:
    """A name is 1-255 characters, no control characters, never `.`, `/`, `..` or a leading `_`
    (CouchDB's rule for names: `_` is reserved) -- a name ends up in URLs and file names."""
    if not isinstance(name, str) or not name:
        raise BadRequest(f"an attachment name must be a non-empty string, not {name!r}")
    if len(name) > MAX_NAME_LENGTH:
        raise BadRequest(f"attachment name longer than {MAX_NAME_LENGTH} characters")
    if "/" in name or "\\" in name or ".." in name or name == ".":
        raise BadRequest(f"attachment name {name!r} must not be '.' or hold '/', '\\' or '..'")
    if name.startswith("_"):
        raise BadRequest(f"attachment name {name!r} must not start with '_'")
    if any(ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF for c in name):
        raise BadRequest(f"attachment name {name!r} holds a control character")
    return name


def check_content_type(content_type: object) -> str:
    if (not isinstance(content_type, str) or not content_type
            or len(content_type) > MAX_CONTENT_TYPE_LENGTH
            or not content_type.isascii() or not content_type.isprintable()):
        raise BadRequest(
            f"content type must be 1-{MAX_CONTENT_TYPE_LENGTH} printable ASCII characters, "
            f"not {content_type!r}"
        )
    return content_type


def check_digest(digest: object) -> str:
    """`md5-<base64 of 16 bytes>`, as CouchDB writes it."""
    if isinstance(digest, str) and digest.startswith(_DIGEST_PREFIX):
        try:
            if len(base64.b64decode(digest[len(_DIGEST_PREFIX):], validate=True)) == 16:
                return digest
        except (binascii.Error, ValueError):
            pass
    raise BadRequest(f"invalid attachment digest {digest!r}: expected 'md5-<base64>'")


def digest_of(md5: Any) -> str:
    """The CouchDB digest of a finished `hashlib.md5` object."""
    return _DIGEST_PREFIX + base64.b64encode(md5.digest()).decode()


def check_length(length: object, what: str = "length") -> int:
    if type(length) is not int or length < 0:
        raise BadRequest(f"attachment {what} must be an integer >= 0, not {length!r}")
    return length


def parse_attachments(
    doc_id: str, value: object, *, new_edits: bool
) -> dict[str, Stub | Follows]:
    """Check a document's `_attachments`. Writes made here take stubs only (data goes
    through `put_attachment`); replicated writes take stubs with their digest, and `follows`
    entries whose data `put_replicated` streams. Inline `data` is refused (never whole in
    memory): use the streaming methods."""
    if not isinstance(value, dict):
        raise BadRequest(f"document {doc_id!r}: _attachments must be an object")
    if len(value) > MAX_ATTACHMENTS:
        raise BadRequest(f"document {doc_id!r}: more than {MAX_ATTACHMENTS} attachments")
    parsed: dict[str, Stub | Follows] = {}
    for name, entry in value.items():
        where = f"document {doc_id!r}, attachment {name!r}"
        try:
            check_attachment_name(name)
            if not isinstance(entry, dict):
                raise BadRequest("an attachment entry must be an object")
            if "data" in entry:
                raise BadRequest(
                    "inline attachment data is not taken: stream it with put_attachment"
                )
            revpos = entry.get("revpos")
            if revpos is not None and (type(revpos) is not int or revpos < 1):
                raise BadRequest(f"revpos must be an integer >= 1, not {revpos!r}")
            digest = entry.get("digest")
            if digest is not None:
                check_digest(digest)
            if entry.get("stub") is True:
                if not new_edits and digest is None and revpos is None:
                    raise BadRequest("a replicated stub needs its digest or its revpos")
                parsed[name] = Stub(digest, revpos)
            elif entry.get("follows") is True and not new_edits:
                if digest is None or revpos is None:
                    raise BadRequest("a 'follows' attachment needs its digest and revpos")
                parsed[name] = Follows(
                    check_content_type(entry.get("content_type", DEFAULT_CONTENT_TYPE)),
                    check_length(entry.get("length")), digest, revpos,
                )
            else:
                raise BadRequest("expected a stub ({\"stub\": true}); data goes through "
                                 "put_attachment")
        except BadRequest as exc:
            raise BadRequest(f"{where}: {exc.reason}") from None
    return parsed


def check_range(range_: object, length: int) -> tuple[int, int]:
    """`range_` is `(start, stop)`, half-open byte offsets (`None`: the whole file). A range
    outside the file is `RangeNotSatisfiable`."""
    if range_ is None:
        return 0, length
    if (not isinstance(range_, tuple) or len(range_) != 2
            or not all(type(x) is int for x in range_)):
        raise BadRequest(f"range must be (start, stop) byte offsets, not {range_!r}")
    start, stop = range_
    if not 0 <= start < stop <= length:
        raise RangeNotSatisfiable(
            f"range {start}-{stop} is outside the attachment ({length} bytes)"
        )
    return start, stop


# -- streams --------------------------------------------------------------------------------


async def rechunk(chunks: AsyncIterable[bytes], size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
    """The bytes of `chunks` in pieces of exactly `size` (the last one shorter, never empty).
    Holds at most about two pieces, whatever the caller's chunk sizes."""
    buffer = bytearray()
    async for piece in chunks:
        if not isinstance(piece, (bytes, bytearray, memoryview)):
            raise BadRequest(f"attachment data must be bytes, not {type(piece).__name__}")
        buffer += piece
        while len(buffer) >= size:
            yield bytes(buffer[:size])
            del buffer[:size]
    if buffer:
        yield bytes(buffer)


class StreamCheck:
    """Counts and hashes a stream as it passes; refuses it as soon as it is longer than the
    length declared, and at its end when its length or digest differs from the declared
    ones (`BadRequest`)."""

    def __init__(self, *, digest: str | None = None, length: int | None = None):
        self.declared_digest = None if digest is None else check_digest(digest)
        self.declared_length = None if length is None else check_length(length)
        self.length = 0
        self._md5 = hashlib.md5(usedforsecurity=False)

    def update(self, piece: bytes) -> None:
        self.length += len(piece)
        if self.declared_length is not None and self.length > self.declared_length:
            raise BadRequest(
                f"attachment data is longer than its declared length {self.declared_length}"
            )
        self._md5.update(piece)

    def count(self, size: int) -> None:
        """A piece of `size` bytes hashed elsewhere: counted and checked for length only (its
        digest comes to `finish`)."""
        self.length += size
        if self.declared_length is not None and self.length > self.declared_length:
            raise BadRequest(
                f"attachment data is longer than its declared length {self.declared_length}"
            )

    def finish(self, hashed_as: str | None = None) -> str:
        """The digest of the whole stream, once checked: the md5 of the pieces given to
        `update`, or `hashed_as` when they were counted only and hashed elsewhere."""
        if self.declared_length is not None and self.length != self.declared_length:
            raise BadRequest(
                f"attachment data is {self.length} bytes, not the declared {self.declared_length}"
            )
        digest = digest_of(self._md5) if hashed_as is None else check_digest(hashed_as)
        if self.declared_digest is not None and digest != self.declared_digest:
            raise BadRequest(
                f"attachment digest mismatch: the data is {digest}, "
                f"the declared digest {self.declared_digest}"
            )
        return digest
