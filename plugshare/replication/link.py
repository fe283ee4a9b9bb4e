"""The connection-level peer protocol: one link between two nodes (pure, sans-I/O).

A `Link` is a state machine in the style of h11: the I/O layer feeds it received bytes
(`receive_data`), pulls events out (`next_event`), tells it the time (`tick`), and writes whatever
`data_to_send` returns. It owns no socket, no clock and no key.

Handshake, after TLS is up (the accepting side is the TLS server)::

    accepting                                      connecting
        hello {version, node_id, name, addresses, nonce}  ->
                                                   checks node_id == the identity fingerprint it
                                                   pinned from the server's TLS certificate;
                                                   emits ProofRequested(server_id, nonce); the
                                                   I/O layer has the token sign
                                                   client_auth_payload and calls
                                                   send_proof(signature)
        <- hello {version, node_id, name, addresses, public_key, signature}
    checks node_id == sha256(public_key) and the
    signature over (context, server id, nonce, client id);
    emits PeerAuthenticated; the I/O layer decides:
        accept()  -> ready                         emits Established
        refuse()  -> close {reason}                emits PeerClosed

The signature proves the connecting node's identity and is fresh (the nonce is the server's,
random per connection). A relay cannot reuse it elsewhere: it names the server fingerprint the
client itself verified against the TLS certificate. The identity key lives in the token, a round
trip away, so the link asks for the proof (`ProofRequested`) and waits in ``AWAIT_PROOF`` for
`Link.send_proof`; the handshake deadline keeps running meanwhile. See `plugshare.token.tls` for
the server's delegated TLS key and for why the client is authenticated in-band rather than with
a TLS client certificate.

Once established, either side sends application messages (any ``type`` not in
`LINK_MESSAGE_TYPES`), ``ping``/``pong`` keepalives (round-trip time is measured from them, and a
peer from which nothing arrives for ``dead_after`` seconds is declared dead), and ``close`` with
a reason. Errors raised from `next_event` or `tick` leave the link closed, with a ``close``
frame naming the reason queued for the peer when that is still useful.
"""

from __future__ import annotations

import enum
import hashlib
import math
import secrets
from collections.abc import Iterable
from typing import Any, NoReturn

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from plugshare.replication.frames import DEFAULT_MAX_FRAME_SIZE, FrameDecoder, FrameError, encode
from plugshare.token.tls import client_auth_payload

__all__ = [
    "LINK_MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "ApplicationMessage",
    "AuthenticationError",
    "ConnectionLost",
    "Established",
    "Event",
    "HandshakeTimeout",
    "IncompatibleVersion",
    "Link",
    "LinkConfig",
    "LinkError",
    "LinkState",
    "LocalNode",
    "LocalProtocolError",
    "PeerAuthenticated",
    "PeerClosed",
    "PeerHello",
    "PeerUnresponsive",
    "ProofRequested",
    "RemoteProtocolError",
    "Role",
    "client_auth_payload",
    "node_id",
]

PROTOCOL_VERSION = 1
LINK_MESSAGE_TYPES = frozenset({"hello", "ready", "ping", "pong", "close"})

PUBLIC_KEY_SIZE = 32
NODE_ID_SIZE = 32
NONCE_SIZE = 32
SIGNATURE_SIZE = 64
MAX_NAME_LENGTH = 256
MAX_ADDRESSES = 32
MAX_ADDRESS_LENGTH = 256
MAX_REASON_LENGTH = 512

def node_id(public_key: bytes) -> bytes:
    """A node's id: the SHA-256 of its raw 32-byte Ed25519 public key."""
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_SIZE} bytes, got {len(public_key)}")
    return hashlib.sha256(public_key).digest()


# --- errors ---------------------------------------------------------------------------------


class LinkError(Exception):
    """Base class: the link cannot go on."""


class LocalProtocolError(LinkError):
    """This side used the link wrongly (a bug in the caller); the link state is unchanged."""


class RemoteProtocolError(LinkError):
    """The peer broke the protocol: a bad frame, a malformed or unexpected message."""


class AuthenticationError(RemoteProtocolError):
    """The peer did not prove the identity it claims."""


class IncompatibleVersion(RemoteProtocolError):
    """The peer speaks another link protocol version."""


class ConnectionLost(LinkError):
    """The byte stream ended without a close message."""


class HandshakeTimeout(LinkError):
    """The handshake did not complete in time."""


class PeerUnresponsive(LinkError):
    """Nothing arrived from the peer for longer than the keepalive allows."""


# --- values ---------------------------------------------------------------------------------


def _check_text(value: str, what: str, limit: int) -> None:
    if not isinstance(value, str) or len(value) > limit:
        raise ValueError(f"{what} must be a str of at most {limit} characters, got {value!r:.80}")


def _to_addresses(addresses: Iterable[str]) -> tuple[str, ...]:
    if isinstance(addresses, (str, bytes)):
        raise ValueError(f"addresses must be a sequence of str, got a single {type(addresses).__name__}")
    return tuple(addresses)


def _check_addresses(addresses: tuple[str, ...]) -> None:
    if len(addresses) > MAX_ADDRESSES:
        raise ValueError(f"at most {MAX_ADDRESSES} addresses, got {len(addresses)}")
    for address in addresses:
        _check_text(address, "an address", MAX_ADDRESS_LENGTH)


@attrs.frozen
class LocalNode:
    """What this node says about itself on a link: its identity public key, name and addresses.

    It holds no key and no signer: the connecting side's proof comes through
    `ProofRequested` / `Link.send_proof`.
    """

    public_key: bytes
    name: str
    addresses: tuple[str, ...] = attrs.field(default=(), converter=_to_addresses)

    def __attrs_post_init__(self) -> None:
        node_id(self.public_key)  # checks the size
        _check_text(self.name, "the node name", MAX_NAME_LENGTH)
        _check_addresses(self.addresses)

    @property
    def node_id(self) -> bytes:
        return node_id(self.public_key)


@attrs.frozen
class PeerHello:
    """What the peer said about itself; `node_id` is authenticated, the rest is its claim."""

    node_id: bytes
    name: str
    addresses: tuple[str, ...]
    version: int


@attrs.frozen
class LinkConfig:
    """Limits and timers of a link, in bytes and seconds."""

    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    handshake_timeout: float = 10.0
    ping_interval: float = 30.0
    dead_after: float = 90.0

    def __attrs_post_init__(self) -> None:
        if not (self.handshake_timeout > 0 and self.ping_interval > 0):
            raise ValueError("handshake_timeout and ping_interval must be positive")
        if not self.dead_after > self.ping_interval:
            raise ValueError(
                f"dead_after ({self.dead_after}) must exceed ping_interval ({self.ping_interval})"
            )


# --- events ---------------------------------------------------------------------------------


@attrs.frozen
class ProofRequested:
    """Connecting side: the server's hello checked out; prove our identity to it.

    Have the token sign ``client_auth_payload(server_id, nonce, <our node id>)`` and call
    `Link.send_proof` with the signature (or `Link.close` to give up). The handshake deadline
    keeps running while the token works.
    """

    server_id: bytes
    nonce: bytes


@attrs.frozen
class PeerAuthenticated:
    """Accepting side: the peer proved its key. Call `Link.accept` or `Link.refuse` next."""

    peer: PeerHello


@attrs.frozen
class Established:
    """Connecting side: the accepting node let us in; application messages may flow."""

    peer: PeerHello


@attrs.frozen
class ApplicationMessage:
    """A message for the layer above (replication)."""

    message: dict[str | bytes, Any]


@attrs.frozen
class PeerClosed:
    """The peer closed the link in order, giving a reason."""

    reason: str


Event = ProofRequested | PeerAuthenticated | Established | ApplicationMessage | PeerClosed


class Role(enum.Enum):
    ACCEPTING = "accepting"  # the TLS server
    CONNECTING = "connecting"  # the TLS client


class LinkState(enum.Enum):
    AWAIT_HELLO = "awaiting hello"
    AWAIT_PROOF = "awaiting local proof"
    AWAIT_DECISION = "awaiting local accept/refuse"
    AWAIT_READY = "awaiting ready"
    ESTABLISHED = "established"
    CLOSED = "closed"


# --- the state machine ----------------------------------------------------------------------


class Link:
    """One end of one peer link. Build it with `Link.accepting` or `Link.connecting`."""

    def __init__(
        self,
        role: Role,
        local: LocalNode,
        *,
        now: float,
        config: LinkConfig,
        pinned_peer_id: bytes | None = None,
        nonce: bytes | None = None,
    ) -> None:
        self.role = role
        self.local = local
        self.config = config
        self.state = LinkState.AWAIT_HELLO
        self.peer: PeerHello | None = None
        self.close_reason: str | None = None
        self.rtt: float | None = None
        """Smoothed round-trip time in seconds (TCP-style, 1/8 weight per sample)."""

        self._decoder = FrameDecoder(max_frame_size=config.max_frame_size)
        self._outgoing = bytearray()
        self._eof = False
        self._now = now
        self._handshake_deadline = now + config.handshake_timeout
        self._last_received_at = now
        self._next_ping_at = math.inf
        self._ping_sent: tuple[int, float] | None = None  # (id, sent at) of the unanswered ping
        self._ping_counter = 0
        self._pinned_peer_id = pinned_peer_id
        self._nonce = nonce  # ours when accepting; the server's once its hello came when connecting

    @classmethod
    def accepting(
        cls, local: LocalNode, *, now: float, config: LinkConfig = LinkConfig(), nonce: bytes | None = None
    ) -> Link:
        """The accepting (TLS server) end; its hello, with a fresh nonce, is queued at once."""
        nonce = secrets.token_bytes(NONCE_SIZE) if nonce is None else nonce
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"the nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
        link = cls(Role.ACCEPTING, local, now=now, config=config, nonce=nonce)
        link._queue({**link._hello_fields(), "nonce": nonce})
        return link

    @classmethod
    def connecting(
        cls, local: LocalNode, *, pinned_peer_id: bytes, now: float, config: LinkConfig = LinkConfig()
    ) -> Link:
        """The connecting (TLS client) end, given the peer id taken from the server's certificate
        (the fingerprint of the identity that `plugshare.token.tls.certificate_identity` returned)."""
        if len(pinned_peer_id) != NODE_ID_SIZE:
            raise ValueError(f"a node id is {NODE_ID_SIZE} bytes, got {len(pinned_peer_id)}")
        return cls(Role.CONNECTING, local, now=now, config=config, pinned_peer_id=pinned_peer_id)

    # -- input ------------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        """Take bytes read from the peer at time `now`; ``b""`` means the stream ended."""
        self._now = max(self._now, now)
        if self.state is LinkState.CLOSED:
            return  # whatever was in flight when we closed is of no interest
        if not data:
            self._eof = True
            return
        self._last_received_at = self._now
        self._decoder.feed(data)

    def next_event(self) -> Event | None:
        """Process buffered frames until one yields an event; None when more bytes are needed.

        Link-level messages (pings, the connecting side's hello) are handled here, queueing
        their answers. Raises RemoteProtocolError (and subclasses) or ConnectionLost; and
        LocalProtocolError while a `ProofRequested` or `PeerAuthenticated` awaits its answer.
        """
        if self.state is LinkState.AWAIT_DECISION:
            raise LocalProtocolError("the peer is authenticated: call accept() or refuse() first")
        if self.state is LinkState.AWAIT_PROOF:
            raise LocalProtocolError("a proof was requested: call send_proof() first")
        while self.state is not LinkState.CLOSED:
            try:
                message = self._decoder.next_message()
            except FrameError as error:
                self._fail(RemoteProtocolError(f"bad frame: {error}"), cause=error)
            if message is None:
                if self._eof:
                    partial = self._decoder.buffered
                    detail = f" in the middle of a frame ({partial} bytes buffered)" if partial else ""
                    self._fail(ConnectionLost(f"the peer ended the connection without closing{detail}"))
                return None
            event = self._handle(message)
            if event is not None:
                return event
        return None

    def tick(self, now: float) -> None:
        """Advance time: queue a ping when one is due; raise when a deadline has passed."""
        self._now = max(self._now, now)
        if self.state is LinkState.CLOSED:
            return
        if self.state is not LinkState.ESTABLISHED:
            if self._now >= self._handshake_deadline:
                self._fail(
                    HandshakeTimeout(
                        f"handshake not complete after {self.config.handshake_timeout}s ({self.state.value})"
                    )
                )
            return
        silent_for = self._now - self._last_received_at
        if silent_for >= self.config.dead_after:
            self._fail(PeerUnresponsive(f"nothing received from the peer for {silent_for:.1f}s"))
        if self._now >= self._next_ping_at:
            # At most one ping is outstanding; an unanswered one is left to the dead timer.
            if self._ping_sent is None:
                self._ping_counter += 1
                self._ping_sent = (self._ping_counter, self._now)
                self._queue({"type": "ping", "id": self._ping_counter})
            self._next_ping_at = self._now + self.config.ping_interval

    def next_deadline(self) -> float | None:
        """When `tick` must next be called (same clock as `now`); None once closed.

        Receiving never moves it earlier, so the I/O layer may simply sleep until it, tick,
        and ask again (establishing the link does move it earlier: a first ping is due).
        """
        if self.state is LinkState.CLOSED:
            return None
        if self.state is not LinkState.ESTABLISHED:
            return self._handshake_deadline
        return min(self._last_received_at + self.config.dead_after, self._next_ping_at)

    # -- local decisions and output ---------------------------------------------------------

    def send_proof(self, signature: bytes) -> None:
        """Connecting side, after `ProofRequested`: queue our hello with `signature`, the token's
        Ed25519 signature of ``client_auth_payload(server_id, nonce, local.node_id)``.

        Raises LocalProtocolError (the link is unchanged) out of turn, or when the signature is
        not 64 bytes or does not verify with `local.public_key`: a token holding another key, or
        a signature of other bytes, fails here rather than as the peer's "bad signature".
        """
        self._require(LinkState.AWAIT_PROOF, "send a proof")
        if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
            size = f"{len(signature)} bytes" if isinstance(signature, bytes) else type(signature).__name__
            raise LocalProtocolError(f"the proof must be a {SIGNATURE_SIZE}-byte signature, got {size}")
        assert self.peer is not None and self._nonce is not None
        payload = client_auth_payload(self.peer.node_id, self._nonce, self.local.node_id)
        try:
            Ed25519PublicKey.from_public_bytes(self.local.public_key).verify(signature, payload)
        except (InvalidSignature, ValueError):
            raise LocalProtocolError(
                "the proof does not verify with this node's public key: the token signed with "
                "another key or signed other bytes"
            ) from None
        self._queue({**self._hello_fields(), "public_key": self.local.public_key, "signature": signature})
        self.state = LinkState.AWAIT_READY

    def accept(self) -> None:
        """Accepting side: let the authenticated peer in."""
        self._require(LinkState.AWAIT_DECISION, "accept")
        self._queue({"type": "ready"})
        self._establish()

    def refuse(self, reason: str) -> None:
        """Accepting side: turn the authenticated peer away, telling it why."""
        self._require(LinkState.AWAIT_DECISION, "refuse")
        self.close(reason)

    def send_message(self, message: dict[str, Any]) -> None:
        """Queue an application message. Raises LocalProtocolError before the link is
        established, after it closed, or for a link-level ``type``; FrameError subclasses for a
        message that cannot be framed (nothing is queued then)."""
        self._require(LinkState.ESTABLISHED, "send an application message")
        message_type = message.get("type") if isinstance(message, dict) else None
        if message_type in LINK_MESSAGE_TYPES:
            raise LocalProtocolError(f"message type {message_type!r} belongs to the link layer")
        self._outgoing += encode(message, max_frame_size=self.config.max_frame_size)

    def close(self, reason: str = "closed") -> None:
        """Queue a close message with `reason` and stop; does nothing if already closed."""
        if self.state is LinkState.CLOSED:
            return
        reason = str(reason)[:MAX_REASON_LENGTH]
        self._queue({"type": "close", "reason": reason})
        self.state = LinkState.CLOSED
        self.close_reason = reason

    def data_to_send(self) -> bytes:
        """Take every byte queued for the peer."""
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    @property
    def pending_output(self) -> int:
        """Bytes queued for the peer and not yet taken by `data_to_send`."""
        return len(self._outgoing)

    # -- internals --------------------------------------------------------------------------

    def _hello_fields(self) -> dict[str, Any]:
        return {
            "type": "hello",
            "version": PROTOCOL_VERSION,
            "node_id": self.local.node_id,
            "name": self.local.name,
            "addresses": list(self.local.addresses),
        }

    def _queue(self, message: dict[str, Any]) -> None:
        self._outgoing += encode(message, max_frame_size=self.config.max_frame_size)

    def _require(self, state: LinkState, action: str) -> None:
        if self.state is not state:
            raise LocalProtocolError(f"cannot {action}: the link is {self.state.value}")

    def _establish(self) -> None:
        self.state = LinkState.ESTABLISHED
        self._next_ping_at = self._now  # a first ping at once gives an early RTT sample

    def _fail(self, error: LinkError, cause: BaseException | None = None) -> NoReturn:
        """Close the link because of `error` and raise it."""
        if not isinstance(error, ConnectionLost):
            self.close(str(error))
        self.state = LinkState.CLOSED
        self.close_reason = str(error)
        raise error from cause

    def _handle(self, message: dict[str | bytes, Any]) -> Event | None:
        message_type = message["type"]
        if message_type == "close":
            reason = message.get("reason")
            if not isinstance(reason, str):
                self._fail(RemoteProtocolError(f"close reason must be a str, got {type(reason).__name__}"))
            self.state = LinkState.CLOSED
            self.close_reason = reason[:MAX_REASON_LENGTH]
            return PeerClosed(self.close_reason)
        if self.state is LinkState.AWAIT_HELLO:
            if message_type != "hello":
                self._fail(RemoteProtocolError(f"expected a hello, got a {message_type!r} message"))
            return self._handle_hello(message)
        if self.state is LinkState.AWAIT_READY:
            if message_type != "ready":
                self._fail(RemoteProtocolError(f"expected ready, got a {message_type!r} message"))
            self._establish()
            assert self.peer is not None
            return Established(self.peer)
        # ESTABLISHED
        if message_type == "ping":
            self._queue({"type": "pong", "id": self._ping_id(message)})
            return None
        if message_type == "pong":
            self._handle_pong(self._ping_id(message))
            return None
        if message_type in LINK_MESSAGE_TYPES:
            self._fail(RemoteProtocolError(f"unexpected {message_type!r} message on an established link"))
        return ApplicationMessage(message)

    def _ping_id(self, message: dict[str | bytes, Any]) -> int:
        ping_id = message.get("id")
        if not isinstance(ping_id, int) or isinstance(ping_id, bool):
            self._fail(RemoteProtocolError(f"{message['type']} id must be an int, got {ping_id!r:.40}"))
        return ping_id

    def _handle_pong(self, ping_id: int) -> None:
        if self._ping_sent is None or self._ping_sent[0] != ping_id:
            return  # not the ping we wait for: nothing to measure
        sample = max(self._now - self._ping_sent[1], 0.0)
        self.rtt = sample if self.rtt is None else 0.875 * self.rtt + 0.125 * sample
        self._ping_sent = None

    def _handle_hello(self, message: dict[str | bytes, Any]) -> Event | None:
        hello = self._parse_hello(message)
        if self.role is Role.CONNECTING:
            if hello.node_id != self._pinned_peer_id:
                self._fail(
                    AuthenticationError(
                        f"the peer's hello names node {hello.node_id.hex()} but its TLS certificate "
                        f"is node {self._pinned_peer_id.hex()}"  # type: ignore[union-attr]
                    )
                )
            nonce = self._field(message, "nonce", bytes)
            if len(nonce) != NONCE_SIZE:
                self._fail(RemoteProtocolError(f"hello nonce must be {NONCE_SIZE} bytes, got {len(nonce)}"))
            self.peer = hello
            self._nonce = nonce
            self.state = LinkState.AWAIT_PROOF
            return ProofRequested(server_id=hello.node_id, nonce=nonce)
        # ACCEPTING: the connecting node must prove its key.
        public_key = self._field(message, "public_key", bytes)
        signature = self._field(message, "signature", bytes)
        if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
            self._fail(
                AuthenticationError(
                    f"hello needs a {PUBLIC_KEY_SIZE}-byte public key and a {SIGNATURE_SIZE}-byte "
                    f"signature, got {len(public_key)} and {len(signature)}"
                )
            )
        if node_id(public_key) != hello.node_id:
            self._fail(AuthenticationError("the peer's node id is not the fingerprint of its public key"))
        assert self._nonce is not None
        payload = client_auth_payload(self.local.node_id, self._nonce, hello.node_id)
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(signature, payload)
        except (InvalidSignature, ValueError):
            self._fail(AuthenticationError(f"bad signature from node {hello.node_id.hex()}"))
        self.peer = hello
        self.state = LinkState.AWAIT_DECISION
        return PeerAuthenticated(hello)

    def _field(self, message: dict[str | bytes, Any], key: str, kind: type) -> Any:
        value = message.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self._fail(
                RemoteProtocolError(
                    f"{message['type']} field {key!r} must be {kind.__name__}, got {type(value).__name__}"
                )
            )
        return value

    def _parse_hello(self, message: dict[str | bytes, Any]) -> PeerHello:
        version = self._field(message, "version", int)
        if version != PROTOCOL_VERSION:
            self._fail(
                IncompatibleVersion(f"the peer speaks link version {version}, this side {PROTOCOL_VERSION}")
            )
        peer_id = self._field(message, "node_id", bytes)
        name = self._field(message, "name", str)
        addresses = tuple(self._field(message, "addresses", list))
        if len(peer_id) != NODE_ID_SIZE:
            self._fail(RemoteProtocolError(f"hello node_id must be {NODE_ID_SIZE} bytes, got {len(peer_id)}"))
        try:
            _check_text(name, "hello name", MAX_NAME_LENGTH)
            _check_addresses(addresses)
        except ValueError as error:
            self._fail(RemoteProtocolError(f"bad hello: {error}"))
        return PeerHello(node_id=peer_id, name=name, addresses=addresses, version=version)
