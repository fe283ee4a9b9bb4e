"""Length-prefixed msgpack frames for the peer link (pure, sans-I/O).

Wire format of one frame::

    +---------+----------------------+---------------------------+
    | version |  body length (N)     |  body: N bytes of msgpack |
    | 1 byte  |  4 bytes, big endian |  a map with a str "type"  |
    +---------+----------------------+---------------------------+

The version byte names this frame format; an unknown version is refused from the header alone,
as is a length over the receiver's cap, so an oversized frame is never buffered. Bodies are
decoded safely: strings must be UTF-8 (``raw=False``), map keys must be str or bytes
(``strict_map_key``), container and string sizes are limited by the body length, and extension
types other than msgpack's standard timestamp are refused. Binary values stay ``bytes``.

Errors are sticky: once a decoder has raised, the byte stream has lost its frame boundaries and
every later call raises the same error again.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any, NoReturn

import msgpack

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "FRAME_VERSION",
    "HEADER_SIZE",
    "FrameDecoder",
    "FrameError",
    "FrameTooLarge",
    "InvalidMessage",
    "InvalidMsgpack",
    "UnknownFrameVersion",
    "encode",
]

FRAME_VERSION = 1
DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024

_HEADER = struct.Struct(">BI")
HEADER_SIZE = _HEADER.size
_LENGTH_LIMIT = 2**32 - 1


class FrameError(Exception):
    """A frame or message that cannot be encoded or decoded."""


class FrameTooLarge(FrameError):
    """A frame whose body is longer than the size cap."""


class UnknownFrameVersion(FrameError):
    """A frame header carrying a frame-format version this side does not speak."""


class InvalidMsgpack(FrameError):
    """A frame body that is not one well-formed, safely decodable msgpack value."""


class InvalidMessage(FrameError):
    """A well-formed value that is not a message: not a map, or without a str ``type``."""


def _check_message(message: object) -> dict[str | bytes, Any]:
    if not isinstance(message, dict):
        raise InvalidMessage(f"a message must be a map, got {type(message).__name__}")
    message_type = message.get("type")
    if not isinstance(message_type, str) or not message_type:
        raise InvalidMessage(f"a message needs a non-empty str 'type', got {message_type!r}")
    return message


def _check_max_frame_size(max_frame_size: int) -> None:
    if not 1 <= max_frame_size <= _LENGTH_LIMIT:
        raise ValueError(f"max_frame_size must be in 1..{_LENGTH_LIMIT}, got {max_frame_size}")


def encode(message: dict[str, Any], *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """Return the frame carrying `message`.

    Raises InvalidMessage when `message` is not a map with a str ``type`` or holds a value
    msgpack cannot carry, and FrameTooLarge when its body would exceed `max_frame_size`.
    """
    _check_max_frame_size(max_frame_size)
    _check_message(message)
    try:
        body = msgpack.packb(message, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as error:
        raise InvalidMessage(f"message of type {message['type']!r} cannot be packed: {error}") from error
    if len(body) > max_frame_size:
        raise FrameTooLarge(
            f"message of type {message['type']!r} is {len(body)} bytes, over the cap of {max_frame_size}"
        )
    return _HEADER.pack(FRAME_VERSION, len(body)) + body


def _refuse_extension(code: int, data: bytes) -> NoReturn:
    raise InvalidMsgpack(f"msgpack extension type {code} is not allowed")


def _decode_body(body: bytes) -> dict[str | bytes, Any]:
    try:
        # unpackb limits every declared string/container size by len(body), so a tiny body
        # cannot make it allocate a huge list; nesting depth is bounded by msgpack's stack.
        value = msgpack.unpackb(
            body, raw=False, strict_map_key=True, use_list=True, ext_hook=_refuse_extension
        )
    except InvalidMsgpack:
        raise
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as error:
        raise InvalidMsgpack(f"frame body of {len(body)} bytes is not valid msgpack: {error!r}") from error
    return _check_message(value)


class FrameDecoder:
    """Incremental decoder: `feed` it bytes as they arrive, take messages with `next_message`.

    Iterating over the decoder yields every complete message buffered so far.
    """

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        _check_max_frame_size(max_frame_size)
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._body_length: int | None = None  # set once the current frame's header is parsed
        self._error: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages (a partial frame, or whole ones)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        if self._error is not None:
            raise self._error
        self._buffer += data

    def next_message(self) -> dict[str | bytes, Any] | None:
        """Return the next complete message, or None if more bytes are needed.

        Raises a FrameError subclass for a bad frame; the decoder stays failed afterwards.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next_message()
        except FrameError as error:
            self._error = error
            self._buffer.clear()
            raise

    def _next_message(self) -> dict[str | bytes, Any] | None:
        if self._body_length is None:
            if len(self._buffer) < HEADER_SIZE:
                return None
            version, length = _HEADER.unpack_from(self._buffer)
            if version != FRAME_VERSION:
                raise UnknownFrameVersion(
                    f"frame version {version} is not supported (this side speaks {FRAME_VERSION})"
                )
            if length > self.max_frame_size:
                raise FrameTooLarge(f"frame of {length} bytes is over the cap of {self.max_frame_size}")
            del self._buffer[:HEADER_SIZE]
            self._body_length = length
        if len(self._buffer) < self._body_length:
            return None
        length, self._body_length = self._body_length, None
        # Decoded in place (a chunk's frame is 256 KiB: no copy of it before msgpack's own);
        # the view must be released before the buffer can shrink.
        with memoryview(self._buffer) as view, view[:length] as body:
            message = _decode_body(body)
        del self._buffer[:length]  # bytearray drops a prefix without copying the rest
        return message

    def __iter__(self) -> Iterator[dict[str | bytes, Any]]:
        while (message := self.next_message()) is not None:
            yield message
