"""Attachment data of sealed documents, streamed through the token (issue 13 item 4).

An attachment of a document in an encrypted share or of a sensitive doctype is stored as
sealed chunks: the clear stream is cut into pieces of `PLAIN_CHUNK` bytes, which the token
seals (`share.seal_chunks`, bound to doc, name, revpos, index and end of file) a few at a
time, so that each sealed chunk is exactly one store chunk (`SEALED_CHUNK`). Reading goes the
other way (`share.open_chunks`), chunk by chunk, so a Range read opens only the chunks it
covers. Nothing here holds more than one batch of chunks; no key is ever here.

The stored stub describes the sealed data (its digest and length: what the store checks and
what the envelope binds); the token gives readers the clear length (`clear_length`).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from plugshare.store.attachments import CHUNK_SIZE, rechunk

# The sealed chunk layout of `plugshare.token.chunkseal` (a test checks they agree): the node
# may not import the token's internals.
SEALED_CHUNK = CHUNK_SIZE
OVERHEAD = 4 + 16 + 12 + 16  # magic, key id, nonce, tag
PLAIN_CHUNK = SEALED_CHUNK - OVERHEAD
BATCH = 8  # chunks per token command (its MAX_CHUNKS)
CHECK_BATCH = 32  # chunks per check of received ones (the token's MAX_CHUNKS; nothing comes back)

Call = Callable[..., Awaitable[Any]]


def chunk_count(sealed_length: int) -> int:
    return -(-sealed_length // SEALED_CHUNK)


def clear_length(sealed_length: int) -> int:
    """The clear length of an attachment whose sealed data is `sealed_length` bytes."""
    return sealed_length - chunk_count(sealed_length) * OVERHEAD


async def _with_last(pieces: AsyncIterable[bytes]) -> AsyncIterator[tuple[bytes, bool]]:
    """Each piece with whether it is the final one (one piece of look-ahead)."""
    held: bytes | None = None
    async for piece in pieces:
        if held is not None:
            yield held, False
        held = piece
    if held is not None:
        yield held, True


async def seal_stream(call: Call, seal: Mapping[str, str], doc_id: str, name: str,
                      revpos: int, clear: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """The sealed chunks of `clear`, sealed by the token `BATCH` at a time."""
    batch: list[bytes] = []
    first = 0
    async for piece, last in _with_last(rechunk(clear, PLAIN_CHUNK)):
        batch.append(piece)
        if len(batch) == BATCH or last:
            answer = await call("share.seal_chunks", **seal, doc_id=doc_id, name=name,
                                revpos=revpos, first=first, last=last, chunks=batch)
            for sealed in answer["chunks"]:
                yield sealed
            first += len(batch)
            batch = []


def sealed_range(sealed_length: int, start: int, stop: int) -> tuple[int, int, int]:
    """(first chunk index, sealed byte start, sealed byte stop) covering clear bytes
    `start` to `stop` (stop > start)."""
    first, end = start // PLAIN_CHUNK, (stop - 1) // PLAIN_CHUNK + 1
    return first, first * SEALED_CHUNK, min(end * SEALED_CHUNK, sealed_length)


async def open_stream(call: Call, seal: Mapping[str, str], doc_id: str, name: str,
                      revpos: int, sealed_length: int, first: int, start: int, stop: int,
                      sealed: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """Clear bytes `start` to `stop` of an attachment, from its sealed chunks from index
    `first` on, opened by the token `BATCH` at a time, each where it stands (a tampered one
    is refused there, audited, and ends the stream with `IntegrityError`)."""
    count = chunk_count(sealed_length)
    index = first
    batch: list[bytes] = []

    async def opened_batch() -> list[bytes]:
        answer = await call("share.open_chunks", **seal, doc_id=doc_id, name=name,
                            revpos=revpos, first=index, last=index + len(batch) == count,
                            chunks=batch)
        return answer["chunks"]

    async for chunk, final in _with_last(rechunk(sealed, SEALED_CHUNK)):
        batch.append(chunk)
        if len(batch) < BATCH and not final:
            continue
        for opened in await opened_batch():
            offset = index * PLAIN_CHUNK
            piece = opened[max(start - offset, 0): stop - offset]
            if piece:
                yield piece
            index += 1
        batch = []
