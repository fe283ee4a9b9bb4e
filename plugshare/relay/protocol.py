"""The relay protocol (pure, sans-I/O): messages, their framing, and who may send what when.

A relay pairs two TCP connections for nodes that cannot reach each other directly, then only
forwards bytes. Inside a paired connection the two nodes run the ordinary pinned TLS 1.3 peer
link with its in-band client proof, end to end: the relay sees ciphertext only.

Three kinds of connection reach a relay, all on one port:

* a **control** connection (TLS 1.3, the relay's own key, pinned by the node to the relay's
  fingerprint; ALPN `ALPN_PROTOCOL`). The relay opens with a `Challenge`. A node then either

  - *joins*: `Join` carries the node's delegated TLS certificate (the one its peer listener
    presents, certified by its token) and a signature by that certificate's key over
    `join_payload(relay id, nonce, node id)`. The relay checks the certificate exactly as a
    peer would (`plugshare.token.tls.certificate_identity`), so it learns the node id from it
    and nobody without that node's certified key can register the id. It answers `Joined` and
    keeps the connection: later it sends `Invitation`s (a session key) and `Ping`s on it; or
  - *dials*: `Connect` names a node id; the relay answers `SessionGranted` (a session key)
    and sends the same key to that node in an `Invitation`, or `Refused`.

* a **session** connection (plain TCP: the bytes inside are TLS between the nodes). The first
  frame is `Session` with a key; once both halves of a key have arrived the relay answers
  `Ready` on both and from then on forwards bytes and nothing else. Either side may read bytes
  of the peer link right after `Ready`, in the same segment.

The first byte tells the kinds apart: a TLS record starts with 0x16, a relay frame with
`RELAY_VERSION`.

Frame: ``version (1 byte) | length (2 bytes, big endian) | msgpack map`` with a str ``type``,
at most `MAX_FRAME_SIZE` bytes. Every error is a `RelayProtocolError`; decoding errors are
sticky (the stream has lost its frame boundaries).
"""

from __future__ import annotations

import struct
from typing import ClassVar, NoReturn

import attrs
import msgpack

__all__ = [
    "ALPN_PROTOCOL",
    "JOIN_DOMAIN",
    "MAX_FRAME_SIZE",
    "RELAY_VERSION",
    "Challenge",
    "Connect",
    "Decoder",
    "FrameTooLarge",
    "Invitation",
    "Join",
    "Joined",
    "MalformedMessage",
    "Message",
    "Ping",
    "Pong",
    "Ready",
    "Refused",
    "RelayProtocolError",
    "Session",
    "SessionGranted",
    "UnexpectedMessage",
    "UnknownVersion",
    "Conversation",
    "encode",
    "join_payload",
]

RELAY_VERSION = 1
ALPN_PROTOCOL = "plugshare-relay/1"
MAX_FRAME_SIZE = 4096  # the largest message is a Join (a certificate of ~500 bytes)
JOIN_DOMAIN = b"plugshare relay join v1\x00"
KEY_SIZE = 32  # node ids, nonces and session keys

_HEADER = struct.Struct(">BH")
HEADER_SIZE = _HEADER.size


class RelayProtocolError(Exception):
    """Anything wrong on a relay connection; the message says what."""


class FrameTooLarge(RelayProtocolError):
    """A frame longer than `MAX_FRAME_SIZE`: refused from its header, never buffered."""


class UnknownVersion(RelayProtocolError):
    """A frame of a protocol version this side does not speak."""


class MalformedMessage(RelayProtocolError):
    """Not msgpack, not a map, an unknown type, or a field missing or of the wrong kind."""


class UnexpectedMessage(RelayProtocolError):
    """A well-formed message this side may not send at this point of the conversation."""


def join_payload(relay_id: bytes, nonce: bytes, node_id: bytes) -> bytes:
    """What a joining node signs with its certified TLS key: fixed-size fields after a domain
    of their own, so the signature means nothing on a peer link or in TLS."""
    for value, what in ((relay_id, "relay id"), (nonce, "nonce"), (node_id, "node id")):
        if not isinstance(value, bytes) or len(value) != KEY_SIZE:
            raise ValueError(f"the {what} must be {KEY_SIZE} bytes")
    return JOIN_DOMAIN + relay_id + nonce + node_id


# --- messages -------------------------------------------------------------------------------


def _key(_inst: object, attribute: attrs.Attribute, value: object) -> None:
    if not isinstance(value, bytes) or len(value) != KEY_SIZE:
        raise MalformedMessage(f"{attribute.name} must be {KEY_SIZE} bytes")


def _blob(limit: int):
    def check(_inst: object, attribute: attrs.Attribute, value: object) -> None:
        if not isinstance(value, bytes) or not 0 < len(value) <= limit:
            raise MalformedMessage(f"{attribute.name} must be 1-{limit} bytes")
    return check


def _text(limit: int):
    def check(_inst: object, attribute: attrs.Attribute, value: object) -> None:
        if not isinstance(value, str) or len(value) > limit:
            raise MalformedMessage(f"{attribute.name} must be a string of at most {limit} characters")
    return check


@attrs.frozen
class Message:
    type: ClassVar[str] = ""


@attrs.frozen
class Challenge(Message):
    """Relay -> client, first on a control connection."""
    type: ClassVar[str] = "challenge"
    nonce: bytes = attrs.field(validator=_key)


@attrs.frozen
class Join(Message):
    """Node -> relay: register this node id; see the module docstring."""
    type: ClassVar[str] = "join"
    certificate: bytes = attrs.field(validator=_blob(3000))
    signature: bytes = attrs.field(validator=_blob(64))


@attrs.frozen
class Joined(Message):
    type: ClassVar[str] = "joined"


@attrs.frozen
class Connect(Message):
    """Dialer -> relay: pair me with this node."""
    type: ClassVar[str] = "connect"
    node_id: bytes = attrs.field(validator=_key)


@attrs.frozen
class SessionGranted(Message):
    """Relay -> dialer: present this key on a new connection."""
    type: ClassVar[str] = "granted"
    session_key: bytes = attrs.field(validator=_key)


@attrs.frozen
class Invitation(Message):
    """Relay -> joined node: someone dials you; present this key on a new connection."""
    type: ClassVar[str] = "invitation"
    session_key: bytes = attrs.field(validator=_key)


@attrs.frozen
class Session(Message):
    """Either side -> relay, first on a session connection."""
    type: ClassVar[str] = "session"
    session_key: bytes = attrs.field(validator=_key)


@attrs.frozen
class Ready(Message):
    """Relay -> both halves: paired; what follows is the other side's bytes."""
    type: ClassVar[str] = "ready"


@attrs.frozen
class Refused(Message):
    """Relay -> client: a clear no (`code`: unknown_node, over_quota, bad_join, no_session,
    protocol, busy), after which the relay closes the connection."""
    type: ClassVar[str] = "refused"
    code: str = attrs.field(validator=_text(32))
    reason: str = attrs.field(validator=_text(300))


@attrs.frozen
class Ping(Message):
    type: ClassVar[str] = "ping"


@attrs.frozen
class Pong(Message):
    type: ClassVar[str] = "pong"


_TYPES: dict[str, type[Message]] = {
    cls.type: cls
    for cls in (Challenge, Join, Joined, Connect, SessionGranted, Invitation, Session, Ready, Refused, Ping, Pong)
}


def encode(message: Message) -> bytes:
    """The frame carrying `message`."""
    body = msgpack.packb({"type": message.type, **attrs.asdict(message)}, use_bin_type=True)
    if len(body) > MAX_FRAME_SIZE:  # pragma: no cover - every field is bounded
        raise FrameTooLarge(f"a {message.type} message of {len(body)} bytes is over {MAX_FRAME_SIZE}")
    return _HEADER.pack(RELAY_VERSION, len(body)) + body


def _refuse_extension(code: int, data: bytes) -> NoReturn:
    raise MalformedMessage(f"msgpack extension type {code} is not allowed")


def _decode_body(body: bytes) -> Message:
    try:
        value = msgpack.unpackb(body, raw=False, strict_map_key=True, ext_hook=_refuse_extension)
    except MalformedMessage:
        raise
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as error:
        raise MalformedMessage(f"a frame of {len(body)} bytes is not msgpack: {error}") from None
    if not isinstance(value, dict):
        raise MalformedMessage(f"a message is a map, got {type(value).__name__}")
    fields = dict(value)
    kind = _TYPES.get(fields.pop("type", None))  # type: ignore[arg-type]
    if kind is None:
        raise MalformedMessage(f"unknown message type {value.get('type')!r:.40}")
    names = {a.name for a in attrs.fields(kind)}
    if set(fields) != names:
        raise MalformedMessage(f"a {kind.type} message has fields {sorted(names)}, got {sorted(map(str, fields))}")
    try:
        return kind(**fields)
    except TypeError as error:  # pragma: no cover - the field names were checked
        raise MalformedMessage(str(error)) from None


class Decoder:
    """Bytes in, messages out. `rest` hands back what follows the last message taken (the
    peer link's first bytes, after `Ready`)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._error: RelayProtocolError | None = None

    def feed(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._buffer += data

    def next_message(self) -> Message | None:
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except RelayProtocolError as error:
            self._error = error
            self._buffer.clear()
            raise

    def _next(self) -> Message | None:
        if len(self._buffer) < HEADER_SIZE:
            return None
        version, length = _HEADER.unpack_from(self._buffer)
        if version != RELAY_VERSION:
            raise UnknownVersion(f"relay protocol version {version}; this side speaks {RELAY_VERSION}")
        if length > MAX_FRAME_SIZE:
            raise FrameTooLarge(f"a frame of {length} bytes is over the cap of {MAX_FRAME_SIZE}")
        if len(self._buffer) < HEADER_SIZE + length:
            return None
        body = bytes(self._buffer[HEADER_SIZE : HEADER_SIZE + length])
        del self._buffer[: HEADER_SIZE + length]
        return _decode_body(body)

    def rest(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


# --- who may send what, when ----------------------------------------------------------------

# For each role: state -> {message type received: next state}. A `Refused` is accepted by a
# client in any state and ends the conversation ("closed").
_RECEIVES: dict[str, dict[str, dict[type[Message], str]]] = {
    # the relay, on a TLS control connection after sending its Challenge
    "relay-control": {
        "challenged": {Join: "joined", Connect: "dialing"},
        "joined": {Ping: "joined", Pong: "joined"},
        "dialing": {},
    },
    # the relay, on a plain session connection
    "relay-session": {"start": {Session: "waiting"}, "waiting": {}},
    # a node joining a relay
    "joiner": {
        "start": {Challenge: "challenged"},
        "challenged": {},  # the node sends Join
        "joining": {Joined: "joined"},
        "joined": {Invitation: "joined", Ping: "joined", Pong: "joined"},
    },
    # a node asking a relay for a session with another node
    "dialer": {
        "start": {Challenge: "challenged"},
        "challenged": {},  # the node sends Connect
        "connecting": {SessionGranted: "granted"},
        "granted": {},
    },
    # either node on a session connection, after sending Session
    "session": {"waiting": {Ready: "forwarding"}, "forwarding": {}},
}

# What each role may send, state -> {message type: next state}.
_SENDS: dict[str, dict[str, dict[type[Message], str]]] = {
    "relay-control": {
        "start": {Challenge: "challenged"},
        "joined": {Joined: "joined", Invitation: "joined", Ping: "joined", Pong: "joined"},
        "dialing": {SessionGranted: "dialing"},
    },
    "relay-session": {"waiting": {Ready: "forwarding"}},
    "joiner": {"challenged": {Join: "joining"}, "joined": {Ping: "joined", Pong: "joined"}},
    "dialer": {"challenged": {Connect: "connecting"}},
    "session": {"start": {Session: "waiting"}},
}

_INITIAL = {"relay-control": "start", "relay-session": "start", "joiner": "start", "dialer": "start",
            "session": "start"}


class Conversation:
    """One side of one relay connection: frames out, messages in, each checked against the
    role's state. `receive_data` then `next_message`; `send` returns the bytes to write.
    A `Refused` received raises nothing: it is returned, and the conversation is closed."""

    def __init__(self, role: str) -> None:
        if role not in _RECEIVES:
            raise ValueError(f"unknown role {role!r}")
        self.role = role
        self.state = _INITIAL[role]
        self._decoder = Decoder()

    def send(self, message: Message) -> bytes:
        if isinstance(message, Refused) and self.role.startswith("relay"):
            self.state = "closed"
            return encode(message)
        allowed = _SENDS[self.role].get(self.state, {})
        if type(message) not in allowed:
            raise UnexpectedMessage(f"{self.role} may not send {message.type} while {self.state}")
        self.state = allowed[type(message)]
        return encode(message)

    def receive_data(self, data: bytes) -> None:
        self._decoder.feed(data)

    def next_message(self) -> Message | None:
        message = self._decoder.next_message()
        if message is None:
            return None
        if isinstance(message, Refused) and not self.role.startswith("relay"):
            self.state = "closed"
            return message
        allowed = _RECEIVES[self.role].get(self.state, {})
        if type(message) not in allowed:
            raise UnexpectedMessage(f"a {message.type} message is out of order here ({self.role}, {self.state})")
        self.state = allowed[type(message)]
        return message

    def rest(self) -> bytes:
        """Bytes received after the last message: the peer link's, once forwarding."""
        return self._decoder.rest()
