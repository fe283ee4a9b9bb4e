"""A JSON body with attachment data inline, split as it streams in (pure, sans-I/O).

PouchDB's push (and a CouchDB client's doc PUT) sends each attachment's data inline, base64
in `_attachments.{name}.data`, so one body can be gigabytes of base64 around a few KB of
JSON. `InlineScanner` is fed the body a piece at a time and splits it into:

- the *skeleton*: the body with every string at an attachment's `data` place replaced by a
  placeholder (`"#N"`, N counting such strings from 0), small and capped, parsed afterwards
  by `json.loads` (which therefore judges the JSON, and decides nothing about structure the
  scanner has not seen alike: the skeleton is the body, minus the contents of some strings);
- the *data*: the characters of those strings, as `DataEvent`s, base64-decoded by
  `Base64Stream` piece by piece.

Why not ijson (yajl2_c): it yields each string value whole, so a 1 GB attachment would be
a 1.3 GB Python string; here a data string never is more than the piece that carried it.
The scanner only tracks nesting and object keys, jumping between the bytes that matter
with a regex, so the base64 itself is passed through at `bytes.find` speed.
"""

from __future__ import annotations

import base64
import binascii
import json
import re

import attrs

from plugshare.errors import PlugshareError

MAX_DEPTH = 64  # nesting of the JSON around the data (json.loads recurses: bound it here)
_STRUCTURE = re.compile(rb'["{}\[\],:]')
_STRING_END = re.compile(rb'["\\]')
# Where an attachment's data sits: _bulk_docs' {"docs": [doc...]} or a single document.
BULK_DOCS = ("docs", int, "_attachments", str, "data")
ONE_DOC = ("_attachments", str, "data")


class InlineBodyError(PlugshareError):
    """A body this API refuses: too large (`status` 413) or malformed (400)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


@attrs.define
class DataEvent:
    """Characters of data string `index` (`piece`, escapes removed); `end` on its last."""
    index: int
    piece: bytes
    end: bool = False


def placeholder(index: int) -> str:
    return f"#{index}"


def placeholder_index(value: object) -> int | None:
    """N when `value` is the placeholder the scanner put in data string N's place."""
    if isinstance(value, str) and value.startswith("#") and value[1:].isdigit():
        return int(value[1:])
    return None


class InlineScanner:
    """Feed the body (`feed`), then `finish`; `skeleton` is what `json.loads` then reads."""

    def __init__(self, data_path: tuple, *, max_skeleton: int):
        self._path = data_path
        self._max = max_skeleton
        self.skeleton = bytearray()
        self.data_strings = 0
        # one frame per open container: [is_object, key or index, expecting a key]
        self._frames: list[list] = []
        self._in_string = False
        self._string_is_key = False
        self._data_index: int | None = None  # the data string being read, if any
        self._escaped = False  # a backslash ended the last piece
        self._key = bytearray()

    def feed(self, piece: bytes) -> list[DataEvent]:
        events: list[DataEvent] = []
        at, end = 0, len(piece)
        while at < end:
            if self._data_index is not None:
                at = self._data(piece, at, events)
            elif self._in_string:
                at = self._string(piece, at)
            else:
                at = self._structure(piece, at)
        if len(self.skeleton) > self._max:
            raise InlineBodyError(413, f"the JSON around the attachments' data is over "
                                       f"{self._max} bytes")
        return events

    def finish(self) -> bytes:
        if self._in_string or self._frames:
            raise InlineBodyError(400, "invalid UTF-8 JSON")  # cut short
        return bytes(self.skeleton)

    # -- outside strings -----------------------------------------------------------------

    def _structure(self, piece: bytes, at: int) -> int:
        found = _STRUCTURE.search(piece, at)
        stop = found.start() if found else len(piece)
        self.skeleton += piece[at:stop]
        if not found:
            return stop
        char = piece[stop]
        frames = self._frames
        if char == 0x22:  # '"'
            self._open_string()
            return stop + 1
        self.skeleton.append(char)
        if char in (0x7B, 0x5B):  # '{' '['
            if len(frames) >= MAX_DEPTH:
                raise InlineBodyError(400, f"the JSON nests deeper than {MAX_DEPTH}")
            frames.append([char == 0x7B, None if char == 0x7B else 0, char == 0x7B])
        elif char in (0x7D, 0x5D):  # '}' ']'
            if frames:
                frames.pop()
        elif char == 0x2C and frames:  # ','
            if frames[-1][0]:
                frames[-1][2] = True
            else:
                frames[-1][1] += 1
        elif char == 0x3A and frames:  # ':'
            frames[-1][2] = False
        return stop + 1

    def _open_string(self) -> None:
        frames = self._frames
        self.skeleton.append(0x22)
        if frames and frames[-1][0] and frames[-1][2]:
            self._in_string, self._string_is_key = True, True
            self._key = bytearray(b'"')
        elif self._at_data_place():
            self._data_index = self.data_strings
            self.data_strings += 1
        else:
            self._in_string, self._string_is_key = True, False

    def _at_data_place(self) -> bool:
        frames = self._frames
        if len(frames) != len(self._path):
            return False
        for (is_object, step, _), wanted in zip(frames, self._path):
            if wanted is int:
                if is_object:
                    return False
            elif wanted is str:
                if not is_object or not isinstance(step, str):
                    return False
            elif not is_object or step != wanted:
                return False
        return True

    # -- inside a key or an ordinary string: copied to the skeleton ------------------------

    def _string(self, piece: bytes, at: int) -> int:
        if self._escaped:  # the character after a backslash that ended the last piece
            self._escaped = False
            self._copy(piece[at:at + 1])
            return at + 1
        found = _STRING_END.search(piece, at)
        if not found:
            self._copy(piece[at:])
            return len(piece)
        stop = found.start()
        if piece[stop] == 0x5C:  # '\\': copy it and the character it escapes
            self._copy(piece[at:stop + 2])
            if stop + 1 >= len(piece):
                self._escaped = True
            return stop + 2
        self._copy(piece[at:stop + 1])
        self._in_string = False
        if self._string_is_key:
            try:
                key = json.loads(bytes(self._key))
            except ValueError:
                key = None  # json.loads refuses the skeleton later
            if self._frames and self._frames[-1][0]:
                self._frames[-1][1] = key
        return stop + 1

    def _copy(self, chars: bytes) -> None:
        self.skeleton += chars
        if self._string_is_key:
            self._key += chars
            if len(self._key) > self._max:
                raise InlineBodyError(413, "an object key is over the body cap")

    # -- inside a data string: streamed out ------------------------------------------------

    def _data(self, piece: bytes, at: int, events: list[DataEvent]) -> int:
        index = self._data_index
        if self._escaped:
            self._escaped = False
            if piece[at] != 0x2F:  # only '\/' can stand for a base64 character
                raise InlineBodyError(400, "attachment data is not valid base64")
            events.append(DataEvent(index, b"/"))
            return at + 1
        found = _STRING_END.search(piece, at)
        if not found:
            events.append(DataEvent(index, piece[at:]))
            return len(piece)
        stop = found.start()
        if stop > at:
            events.append(DataEvent(index, piece[at:stop]))
        if piece[stop] == 0x5C:
            self._escaped = True
            return stop + 1
        events.append(DataEvent(index, b"", end=True))
        self.skeleton += placeholder(index).encode() + b'"'
        self._data_index = None
        return stop + 1


class Base64Stream:
    """Base64 text decoded as it comes, any piece sizes; refuses what
    `base64.b64decode(validate=True)` of the whole would refuse."""

    def __init__(self):
        self._rest = b""
        self._ended = False  # padding seen: nothing may follow

    def feed(self, chars: bytes) -> bytes:
        if not chars:
            return b""
        if self._ended:
            raise InlineBodyError(400, "attachment data is not valid base64")
        chars = self._rest + chars
        whole = len(chars) - len(chars) % 4
        self._rest = chars[whole:]
        block = chars[:whole]
        if not block:
            return b""
        if block.endswith(b"="):
            self._ended = True
        try:
            return base64.b64decode(block, validate=True)
        except (binascii.Error, ValueError):
            raise InlineBodyError(400, "attachment data is not valid base64") from None

    def finish(self) -> None:
        if self._rest:
            raise InlineBodyError(400, "attachment data is not valid base64 (cut short)")
