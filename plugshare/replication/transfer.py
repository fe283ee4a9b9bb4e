"""Attachment data between two nodes, on demand (pure, sans-I/O).

Documents replicate with their attachment stubs (`protocol`). A target that cannot write a
revision because it lacks the data of a stub ("missing stub") keeps the revision aside
(durably) and fetches the data from the source, on the same connection but apart from the
document streams, so a large file never holds up small documents::

    target (fetching)                                      source (serving)
      att.want {req, share, id, rev, name}            ->  (is it ours to send? the push's scope
                                                           and the gate decide, as for the doc)
                                                      <-  att.manifest {req, length, digest,
                                                                        chunks: [sha256, ...]}
      (the store's claim_chunks: which it holds already)
      att.get {req, indexes: [i, ...]}  (<= WINDOW in flight, <= MAX_GET_INDEXES each)  ->
                                                      <-  att.chunk {req, index, data}   (each)
      (checked against the manifest, staged durably)
      att.done {req}                                  ->  (the request is closed)
                                                      <-  att.fail {req, reason, retry?}  (any time)

* Chunks are `CHUNK_SIZE` bytes (the last one shorter), addressed by their SHA-256: the
  embedded store's own chunking, so a chunk held by any attachment (or staged by a transfer
  that was cut) never travels again.
* Each `att.chunk` is at most `CHUNK_SIZE` bytes of data, far under the frame cap, and the
  target has at most `WINDOW` chunks asked and not received per request: the source never
  queues more than that, and document messages interleave with chunks on the link.
* Everything that arrives is checked: a chunk not asked for, or whose SHA-256 is not the
  manifest's, breaks the transfer (`TransferError`); the revision's md5 digest and length are
  checked again by the store when it is written (`put_replicated`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import attrs

from plugshare.errors import PlugshareError
from plugshare.store.attachments import CHUNK_SIZE, digest_of

WANT = "att.want"
MANIFEST = "att.manifest"
GET = "att.get"
CHUNK = "att.chunk"
DONE = "att.done"
FAIL = "att.fail"

TO_SERVER = frozenset({WANT, GET, DONE})
TO_FETCHER = frozenset({MANIFEST, CHUNK, FAIL})

# Chunks asked and not yet received, per request (16 MiB): enough to keep the link busy while
# the target stages what arrived (a durable write), which 4 MiB were not (issue 13).
WINDOW = 64
MAX_GET_INDEXES = 16  # per att.get (what a source that predates the larger window accepts)
MAX_OPEN_REQUESTS = 4  # requests a peer may have open at a source at once
# Chunks one manifest may list: 32 bytes each, 8 MiB of hashes at most in one frame (a
# 64 GiB file). A bigger attachment is refused (it would need a paged manifest).
MAX_MANIFEST_CHUNKS = 262_144
MAX_REQ = 2**63 - 1
MAX_FIELD_LENGTH = 1024
MAX_REASON_LENGTH = 500


class TransferError(PlugshareError):
    """A peer broke the transfer protocol, or sent data that does not check."""


def chunk_count(length: int) -> int:
    return -(-length // CHUNK_SIZE)


def chunk_range(index: int, length: int) -> tuple[int, int]:
    """The half-open byte range of chunk `index` of an attachment of `length` bytes."""
    start = index * CHUNK_SIZE
    return start, min(start + CHUNK_SIZE, length)


def _req(message: Mapping[Any, Any]) -> int:
    req = message.get("req")
    if type(req) is not int or not 0 <= req <= MAX_REQ:
        raise TransferError(f"{message.get('type')}: req must be an integer in 0..2**63-1, not {req!r}")
    return req


def _text(message: Mapping[Any, Any], field: str) -> str:
    value = message.get(field)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_FIELD_LENGTH:
        raise TransferError(f"{message.get('type')}: {field} must be a string of 1..{MAX_FIELD_LENGTH} characters")
    return value


def reason_of(value: object) -> str:
    return value[:MAX_REASON_LENGTH] if isinstance(value, str) else repr(value)[:MAX_REASON_LENGTH]


# --- the source's side -----------------------------------------------------------------------


@attrs.frozen
class Want:
    req: int
    share: str
    doc_id: str
    rev: str
    name: str


def parse_want(message: Mapping[Any, Any]) -> Want:
    return Want(_req(message), _text(message, "share"), _text(message, "id"),
                _text(message, "rev"), _text(message, "name"))


def parse_get(message: Mapping[Any, Any], chunks: int) -> tuple[int, list[int]]:
    """`(req, indexes)` of an `att.get` for a manifest of `chunks` chunks."""
    req = _req(message)
    indexes = message.get("indexes")
    if (not isinstance(indexes, list) or not 0 < len(indexes) <= MAX_GET_INDEXES
            or any(type(i) is not int or not 0 <= i < chunks for i in indexes)):
        raise TransferError(f"{GET}: indexes must be 1..{MAX_GET_INDEXES} chunk indexes in 0..{chunks - 1}")
    return req, indexes


def manifest_message(req: int, length: int, digest: str, hashes: list[bytes]) -> dict[str, Any]:
    return {"type": MANIFEST, "req": req, "length": length, "digest": digest, "chunks": hashes}


def chunk_message(req: int, index: int, data: bytes) -> dict[str, Any]:
    return {"type": CHUNK, "req": req, "index": index, "data": data}


def fail_message(req: int, reason: str, *, retry: bool = False) -> dict[str, Any]:
    message = {"type": FAIL, "req": req, "reason": reason[:MAX_REASON_LENGTH]}
    if retry:
        message["retry"] = True
    return message


# --- the target's side -----------------------------------------------------------------------


class ChunkFetch:
    """The target end of one attachment request: what to ask, and whether what comes checks.

    Use: send `want_message()`; hand the `att.manifest` to `manifest(message)` and the
    chunks the store already holds to `held(...)`; send what `asks()` returns; hand each
    `att.chunk` to `chunk(message)` (it returns the checked data to stage) — or to `take`,
    then a batch of them to `check` (pure CPU: it may run in a worker thread) — then send
    `asks()` again, until `complete`. When every chunk came, each once and in order,
    `data_digest()` is the file's md5 digest, computed on the way (the store then need not
    read the file again to check it).
    """

    def __init__(self, req: int, share: str, doc_id: str, rev: str, name: str, *,
                 length: int, digest: str) -> None:
        self.req, self.share, self.doc_id, self.rev, self.name = req, share, doc_id, rev, name
        self.length, self.digest = length, digest
        self.hashes: list[bytes] = []
        self._to_ask: list[int] = []
        self._asked: set[int] = set()
        self._awaited: set[bytes] = set()  # the distinct chunks still to come
        self.fetched = 0  # chunks received
        self.fetched_bytes = 0
        self._md5: Any = None  # of the chunks checked so far, while they come in order
        self._next = 0  # the index the md5 has reached

    def want_message(self) -> dict[str, Any]:
        return {"type": WANT, "req": self.req, "share": self.share, "id": self.doc_id,
                "rev": self.rev, "name": self.name}

    def manifest(self, message: Mapping[Any, Any]) -> list[bytes]:
        """Check the manifest against the stub we hold; the chunk addresses it lists."""
        if message.get("length") != self.length or message.get("digest") != self.digest:
            raise TransferError(
                f"the manifest of {self.name!r} of {self.doc_id!r} says length "
                f"{message.get('length')!r} and digest {message.get('digest')!r}, the stub "
                f"{self.length} and {self.digest}")
        hashes = message.get("chunks")
        count = chunk_count(self.length)
        if (not isinstance(hashes, list) or len(hashes) != count or count > MAX_MANIFEST_CHUNKS
                or any(not isinstance(h, bytes) or len(h) != 32 for h in hashes)):
            raise TransferError(f"the manifest of {self.name!r} of {self.doc_id!r} must list "
                                f"{count} SHA-256 chunk addresses")
        self.hashes = hashes
        return hashes

    def held(self, held: set[bytes]) -> None:
        """The chunks the store holds already: only the others are asked, each once."""
        seen: set[bytes] = set()
        for index, digest in enumerate(self.hashes):
            if digest not in held and digest not in seen:
                seen.add(digest)
                self._to_ask.append(index)
        self._awaited = seen
        self._to_ask.reverse()  # popped from the end: in file order
        if len(seen) == len(self.hashes):  # every chunk will come, each once
            self._md5 = hashlib.md5(usedforsecurity=False)

    @property
    def missing(self) -> int:
        """Distinct chunks asked or to ask."""
        return len(self._awaited)

    @property
    def complete(self) -> bool:
        return not self._awaited

    def asks(self) -> list[dict[str, Any]]:
        """The `att.get`s to send now (none when the window is full or nothing is left)."""
        room = WINDOW - len(self._asked)
        indexes = []
        while room > 0 and self._to_ask:
            indexes.append(self._to_ask.pop())
            room -= 1
        self._asked.update(indexes)
        return [{"type": GET, "req": self.req, "indexes": indexes[start:start + MAX_GET_INDEXES]}
                for start in range(0, len(indexes), MAX_GET_INDEXES)]

    def chunk(self, message: Mapping[Any, Any]) -> bytes:
        """The checked data of an `att.chunk`; `TransferError` when it was not asked for or
        its SHA-256 is not the manifest's (tampered, or another chunk), and then the request
        is as it was."""
        index, data = self._asked_for(message)
        self.check([(index, data)])
        self._arrived(index, data)
        return data

    def take(self, message: Mapping[Any, Any]) -> tuple[int, bytes]:
        """The index and data of an `att.chunk` that was asked for (`TransferError` if not),
        counted as arrived; its data still to `check` (a chunk that fails it breaks the
        request)."""
        index, data = self._asked_for(message)
        self._arrived(index, data)
        return index, data

    def _asked_for(self, message: Mapping[Any, Any]) -> tuple[int, bytes]:
        index, data = message.get("index"), message.get("data")
        if type(index) is not int or index not in self._asked or not isinstance(data, bytes):
            raise TransferError(f"{CHUNK} {index!r} of {self.name!r} of {self.doc_id!r} was not asked for")
        return index, data

    def _arrived(self, index: int, data: bytes) -> None:
        self._asked.discard(index)
        self._awaited.discard(self.hashes[index])
        self.fetched += 1
        self.fetched_bytes += len(data)

    def check(self, chunks: list[tuple[int, bytes]]) -> None:
        """`check_addresses`, then `hash_in_order`."""
        self.check_addresses(chunks)
        self.hash_in_order(chunks)

    def check_addresses(self, chunks: list[tuple[int, bytes]]) -> None:
        """`TransferError` unless each chunk's SHA-256 is the manifest's at its index
        (tampered, or another chunk)."""
        for index, data in chunks:
            if hashlib.sha256(data).digest() != self.hashes[index]:
                raise TransferError(f"chunk {index} of {self.name!r} of {self.doc_id!r} does "
                                    "not match its address in the manifest")

    def hash_in_order(self, chunks: list[tuple[int, bytes]]) -> None:
        """The file's md5 goes on while chunks come in order. It may run beside
        `check_addresses` (another thread: each touches its own state); chunks that fail
        that check break the request, and its digest with it."""
        for index, data in chunks:
            if self._md5 is not None:
                if index == self._next:
                    self._md5.update(data)
                    self._next += 1
                else:
                    self._md5 = None  # out of order: the store hashes the file instead

    def data_digest(self) -> str | None:
        """The md5 digest of the whole file if every chunk came here in order, else None."""
        if self._md5 is None or self._next != len(self.hashes) or not self.complete:
            return None
        return digest_of(self._md5)

    def done_message(self) -> dict[str, Any]:
        return {"type": DONE, "req": self.req}
