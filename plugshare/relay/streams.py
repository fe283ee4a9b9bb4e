"""A stream that first returns bytes already read from it (trio)."""

from __future__ import annotations

import trio


class PrefixedStream(trio.abc.HalfCloseableStream):
    """`stream`, with `prefix` handed out by `receive_some` before anything new is read: the
    bytes a relay peeked at to tell TLS from its own frames, or the peer link's first bytes
    that arrived with the relay's `Ready`."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes = b"") -> None:
        self.stream = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            size = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self.stream, trio.abc.HalfCloseableStream):
            await self.stream.send_eof()
        else:
            await self.stream.aclose()

    async def aclose(self) -> None:
        await self.stream.aclose()
