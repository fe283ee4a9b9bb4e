"""The token protocol: requests and answers between the node and the token process (pure,
sans-I/O: no sockets, no clock).

Wire format of one frame::

    +----------------------+------------------------------+
    |  body length (N)     |  body: N bytes of msgpack,   |
    |  4 bytes, big endian |  one map with str keys       |
    +----------------------+------------------------------+

A request is ``{"v": 1, "id": int, "cmd": str, "args": map}``; an answer is
``{"id": int, "ok": result}`` or ``{"id": int, "err": {"kind": str, "reason": str}}``. Ids are
chosen by the client (1 and up) so answers can be matched to concurrent requests; id 0 is kept
for the server's "bad_request" answer to a stream it cannot parse, just before it hangs up.

A `Decoder` is built for one side and validates every message fully: the token process trusts
nothing it reads, and the node must not act on a malformed answer. A length over the cap is
refused from the header alone, so an oversized frame is never buffered. Errors are sticky:
after a `WireError` the stream has lost its frame boundaries, so every later call raises again.

`error_kind` / `error_from` carry token refusals across the wire as a stable kind string and
the exception's message, so the node catches the same exception classes as in-process.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal, NoReturn

import attrs
import msgpack

from plugshare.errors import PlugshareError

from .errors import (
    InvitationRefused,
    LeaveRequestRefused,
    AccessDenied,
    AlreadyExists,
    AuthenticationError,
    IntegrityError,
    InvalidArgument,
    InvalidNodeIdError,
    KeystoreError,
    NotFound,
    RollbackError,
    RuleError,
    TokenBusyError,
    TokenError,
    TokenStateError,
    WrongSecretError,
)

__all__ = [
    "HEADER_SIZE",
    "MAX_FRAME",
    "MAX_ID",
    "PROTOCOL_VERSION",
    "ERROR_KINDS",
    "CommandError",
    "Decoder",
    "Request",
    "Response",
    "TokenUnavailable",
    "WireError",
    "encode_error",
    "encode_request",
    "encode_result",
    "error_from",
    "error_kind",
]

PROTOCOL_VERSION = 1
MAX_FRAME = 64 * 1024 * 1024
MAX_ID = 2**63 - 1  # fits msgpack's signed 64-bit int on every implementation
MAX_CMD_LENGTH = 256

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size
_REQUEST_KEYS = frozenset({"v", "id", "cmd", "args"})


class WireError(PlugshareError):
    """Bytes that are not a valid token-protocol message (or a message that cannot be sent)."""


class TokenUnavailable(TokenError):
    """The token process is not running, or the connection to it broke; the request may or may
    not have been carried out. Start (or wait for) the token process and try again."""

    status = 503
    error = "token_unavailable"


class CommandError(TokenError):
    """The token failed on this command for a reason of its own (a bug, not a refusal); the
    details are in the token process's log, never on the wire."""

    status = 500
    error = "token_internal"


INTERNAL_REASON = "the token failed on this command (details are in the token's log)"


@attrs.frozen(slots=True)
class Request:
    """A validated request: `args` is a map with str keys."""

    id: int
    cmd: str
    args: dict[str, Any]


@attrs.frozen(slots=True)
class Response:
    """A validated answer: `result` when `ok`, else the error's `kind` and `reason`."""

    id: int
    ok: bool
    result: Any = None
    kind: str | None = None
    reason: str | None = None


# --- error kinds -------------------------------------------------------------------------

_KINDS: dict[str, type[Exception]] = {  # the wire's names: stable, never renamed
    "token": TokenError,
    "token_state": TokenStateError,
    "rollback": RollbackError,
    "token_busy": TokenBusyError,
    "keystore": KeystoreError,
    "wrong_secret": WrongSecretError,
    "authentication": AuthenticationError,
    "invalid_argument": InvalidArgument,
    "rule": RuleError,
    "invalid_node_id": InvalidNodeIdError,
    "access_denied": AccessDenied,
    "not_found": NotFound,
    "already_exists": AlreadyExists,
    "integrity": IntegrityError,
    "invitation_refused": InvitationRefused,
    "leave_refused": LeaveRequestRefused,
    "token_unavailable": TokenUnavailable,
    "internal": CommandError,
    "bad_request": WireError,
}
_KIND_OF: dict[type[Exception], str] = {cls: kind for kind, cls in _KINDS.items()}
ERROR_KINDS: Mapping[str, type[Exception]] = MappingProxyType(_KINDS)


def error_kind(exc: BaseException) -> str:
    """The wire kind of `exc`: its nearest known class; "internal" for anything unexpected."""
    for cls in type(exc).__mro__:
        kind = _KIND_OF.get(cls)
        if kind is not None:
            return kind
    return "internal"


def error_from(kind: str, reason: str) -> Exception:
    """The exception to raise for an error answer; an unknown kind gives a plain TokenError."""
    cls = _KINDS.get(kind, TokenError)
    if cls is AccessDenied:
        return AccessDenied(None, reason)  # the Decision stays inside the token
    return cls(reason)


# --- encoding ----------------------------------------------------------------------------


def _frame(message: dict[str, Any], max_frame: int, what: str, *what_args: object) -> bytes:
    """The framed message; `what % what_args` names it in errors (formatted only then: this is
    the hot path)."""
    try:
        body = msgpack.packb(message, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as error:
        raise WireError(f"{what % what_args} cannot be packed as msgpack: {error}") from error
    if len(body) > max_frame:
        raise WireError(f"{what % what_args} is {len(body)} bytes, over the frame cap of {max_frame}")
    return _HEADER.pack(len(body)) + body


def _check_id(id: object, lowest: int) -> int:
    if type(id) is not int:  # bool is an int subclass, and is not an id
        raise WireError(f"message id must be an int, got {type(id).__name__}")
    if not lowest <= id <= MAX_ID:
        raise WireError(f"message id {id} is out of range {lowest}..{MAX_ID}")
    return id


def _check_cmd(cmd: object) -> str:
    if type(cmd) is not str:
        raise WireError(f"cmd must be a str, got {type(cmd).__name__}")
    if not 0 < len(cmd) <= MAX_CMD_LENGTH:
        raise WireError(f"cmd must be 1..{MAX_CMD_LENGTH} characters, got {len(cmd)}")
    return cmd


def _check_args(args: object) -> dict[str, Any]:
    if type(args) is not dict:
        raise WireError(f"args must be a map, got {type(args).__name__}")
    for key in args:
        if type(key) is not str:
            raise WireError(f"args keys must be str, got {type(key).__name__}")
    return args


def encode_request(id: int, cmd: str, args: dict[str, Any], *, max_frame: int = MAX_FRAME) -> bytes:
    """The frame asking the token to run `cmd` with `args`; raises WireError if it cannot."""
    _check_id(id, 1)
    _check_cmd(cmd)
    _check_args(args)
    message = {"v": PROTOCOL_VERSION, "id": id, "cmd": cmd, "args": args}
    return _frame(message, max_frame, "request %r", cmd)


def encode_result(id: int, result: Any, *, max_frame: int = MAX_FRAME) -> bytes:
    """The frame answering request `id` with `result`; raises WireError if it cannot."""
    _check_id(id, 0)
    return _frame({"id": id, "ok": result}, max_frame, "result of request %d", id)


def encode_error(id: int, kind: str, reason: str, *, max_frame: int = MAX_FRAME) -> bytes:
    """The frame refusing request `id` (id 0: the whole stream) with `kind` and `reason`."""
    _check_id(id, 0)
    if type(kind) is not str or type(reason) is not str:
        raise WireError("error kind and reason must be str")
    return _frame({"id": id, "err": {"kind": kind, "reason": reason}}, max_frame, "error for request %d", id)


# --- decoding ----------------------------------------------------------------------------


def _refuse_extension(code: int, data: bytes) -> NoReturn:
    raise WireError(f"msgpack extension type {code} is not allowed")


def _unpack(body: bytes) -> dict[str, Any]:
    try:
        # unpackb bounds every declared size by len(body) and nesting by its own stack, so a
        # small body cannot make it allocate much; trailing bytes are an error (ExtraData).
        value = msgpack.unpackb(
            body, raw=False, strict_map_key=True, use_list=True, ext_hook=_refuse_extension
        )
    except WireError:
        raise
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as error:
        raise WireError(f"frame body of {len(body)} bytes is not valid msgpack: {error!r}") from error
    if type(value) is not dict:
        raise WireError(f"a message must be a map, got {type(value).__name__}")
    for key in value:
        if type(key) is not str:
            raise WireError(f"message keys must be str, got {type(key).__name__}")
    return value


def _parse_request(message: dict[str, Any]) -> Request:
    if message.keys() != _REQUEST_KEYS:
        missing = sorted(_REQUEST_KEYS - message.keys())
        extra = sorted(message.keys() - _REQUEST_KEYS)
        raise WireError(f"a request has fields v, id, cmd, args (missing {missing}, unexpected {extra})")
    version = message["v"]
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise WireError(f"protocol version {version!r} is not supported (this side speaks {PROTOCOL_VERSION})")
    return Request(_check_id(message["id"], 1), _check_cmd(message["cmd"]), _check_args(message["args"]))


def _parse_response(message: dict[str, Any]) -> Response:
    if len(message) != 2 or "id" not in message or not ("ok" in message) ^ ("err" in message):
        raise WireError(f"an answer has fields id and one of ok/err, got {sorted(message)}")
    id = _check_id(message["id"], 0)
    if "ok" in message:
        return Response(id, True, message["ok"])
    err = message["err"]
    if type(err) is not dict or err.keys() != {"kind", "reason"}:
        raise WireError("an error answer's err must be a map of kind and reason")
    kind, reason = err["kind"], err["reason"]
    if type(kind) is not str or type(reason) is not str:
        raise WireError("an error answer's kind and reason must be str")
    return Response(id, False, None, kind, reason)


class Decoder:
    """Incremental decoder for one side: `feed` it bytes as they arrive, then take messages
    with `next_message` until it returns None.

    `Decoder(expect="request")` is the token process's; `Decoder(expect="response")` the node's.
    """

    def __init__(self, expect: Literal["request", "response"], *, max_frame: int = MAX_FRAME) -> None:
        if expect not in ("request", "response"):
            raise ValueError(f"expect must be 'request' or 'response', got {expect!r}")
        if not 1 <= max_frame <= 2**32 - 1:
            raise ValueError(f"max_frame must be in 1..{2**32 - 1}, got {max_frame}")
        self.max_frame = max_frame
        self._parse = _parse_request if expect == "request" else _parse_response
        self._buffer = bytearray()
        self._body_length: int | None = None  # set once the current frame's header is parsed
        self._error: WireError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages."""
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        """Append received bytes (raises the stored WireError once the stream is broken)."""
        if self._error is not None:
            raise self._error
        self._buffer += data

    def next_message(self) -> Request | Response | None:
        """The next complete message, or None if more bytes are needed.

        Raises WireError for malformed input; the decoder stays broken afterwards.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next_message()
        except WireError as error:
            self._fail(error)
            raise
        except Exception as error:  # a bug in validation must not escape as something else
            wire_error = WireError(f"cannot decode message: {error!r}")
            self._fail(wire_error)
            raise wire_error from error

    def _fail(self, error: WireError) -> None:
        self._error = error
        self._buffer = bytearray()

    def _next_message(self) -> Request | Response | None:
        buffer = self._buffer
        if self._body_length is None:
            if len(buffer) < HEADER_SIZE:
                return None
            (length,) = _HEADER.unpack_from(buffer)
            if length == 0:
                raise WireError("frame of length 0 carries no message")
            if length > self.max_frame:
                raise WireError(f"frame of {length} bytes is over the cap of {self.max_frame}")
            self._body_length = length
            start = HEADER_SIZE
        else:
            start = 0
        end = start + self._body_length
        if len(buffer) < end:
            if start:
                del buffer[:start]
            return None
        # unpacked in place: copying a frame of sealed chunks out first cost two more copies
        with memoryview(buffer) as view, view[start:end] as body:
            message = _unpack(body)
        del buffer[:end]
        self._body_length = None
        return self._parse(message)
