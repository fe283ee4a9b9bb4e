"""A node's side of a relay (trio): join it and take invitations, or ask it for a session
with another node; either way the result is a plain byte stream to run the peer link on.

The relay is pinned: its TLS certificate's key must hash to the id in its address, or the
connection is dropped before anything is sent (`RelayRefused` otherwise says what the relay
refused and why). The session connections themselves are plain TCP: the peer link inside is
TLS between the two nodes, which is what authenticates them.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import NoReturn

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from plugshare.relay.identity import RelayAddress, join_message
from plugshare.relay.protocol import (
    ALPN_PROTOCOL,
    Challenge,
    Connect,
    Conversation,
    Invitation,
    Joined,
    Message,
    Ping,
    Pong,
    Ready,
    Refused,
    RelayProtocolError,
    Session,
    SessionGranted,
)
from plugshare.relay.streams import PrefixedStream
from plugshare.token.identity import format_node_id
from plugshare.token.tls import InvalidPeerCertificate, certificate_public_key

__all__ = ["RelayError", "RelayRefused", "join_relay", "open_session", "relay_client_context", "request_session"]

log = logging.getLogger("plugshare.relay")

TIMEOUT = 10.0  # seconds for a connection, its TLS and the relay's answer
KEEPALIVE = 20.0  # ping a joined relay this often; give it up after three silent periods


class RelayError(Exception):
    """A relay could not be reached, is not the pinned one, or broke the protocol."""


class RelayRefused(RelayError):
    """The relay said no; `code` says which rule (unknown_node, over_quota, bad_join...)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"the relay refused: {reason} ({code})")
        self.code, self.reason = code, reason


def relay_client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols([ALPN_PROTOCOL])
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # pinned below, by the key's hash
    return context


async def _connect(address: RelayAddress) -> trio.SocketStream:
    with trio.move_on_after(TIMEOUT):
        try:
            return await trio.open_tcp_stream(address.host, address.port)
        except OSError as error:
            raise RelayError(f"cannot connect to relay {address.host}:{address.port}: {error}") from None
    raise RelayError(f"relay {address.host}:{address.port} did not answer in {TIMEOUT:.0f}s")


async def _open_control(address: RelayAddress, context: ssl.SSLContext, role: str) -> tuple[trio.SSLStream, Conversation, Challenge]:
    tcp = await _connect(address)
    stream = trio.SSLStream(tcp, context, server_side=False)
    try:
        with trio.fail_after(TIMEOUT):
            await stream.do_handshake()
            try:
                key = certificate_public_key(stream.getpeercert(binary_form=True))
            except InvalidPeerCertificate as error:
                raise RelayError(f"relay {address.host}:{address.port}: {error}") from None
            if hashlib.sha256(key).digest() != address.relay_id:
                raise RelayError(f"{address.host}:{address.port} is not relay {format_node_id(address.relay_id)}")
            conversation = Conversation(role)
            challenge = await _expect(stream, conversation, Challenge)
    except BaseException as error:
        await trio.aclose_forcefully(stream)
        if isinstance(error, trio.TooSlowError):
            raise RelayError(f"relay {address.host}:{address.port} did not answer in {TIMEOUT:.0f}s") from None
        if isinstance(error, (trio.BrokenResourceError, trio.ClosedResourceError)):
            raise RelayError(f"relay {address.host}:{address.port}: TLS failed: {error.__cause__ or error}") from None
        raise
    assert isinstance(challenge, Challenge)
    return stream, conversation, challenge


async def _next(stream: trio.abc.Stream, conversation: Conversation) -> Message:
    try:
        while (message := conversation.next_message()) is None:
            data = await stream.receive_some(64 * 1024)
            if not data:
                raise RelayError("the relay closed the connection")
            conversation.receive_data(data)
    except RelayProtocolError as error:
        raise RelayError(f"the relay broke the protocol: {error}") from error
    if isinstance(message, Refused):
        raise RelayRefused(message.code, message.reason)
    return message


async def _expect(stream: trio.abc.Stream, conversation: Conversation, kind: type[Message]) -> Message:
    message = await _next(stream, conversation)
    assert isinstance(message, kind)  # the conversation lets nothing else through here
    return message


async def request_session(address: RelayAddress, node_id: bytes, *, context: ssl.SSLContext | None = None) -> trio.abc.Stream:
    """A byte stream to `node_id` through the relay at `address` (RelayError if there is none).
    The caller runs the pinned peer link on it, as on a direct connection."""
    stream, conversation, _ = await _open_control(address, context or relay_client_context(), "dialer")
    try:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(conversation.send(Connect(node_id=node_id)))
            granted = await _expect(stream, conversation, SessionGranted)
    except trio.TooSlowError:
        raise RelayError(f"relay {address.host}:{address.port} did not grant a session in {TIMEOUT:.0f}s") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
        raise RelayError(f"relay {address.host}:{address.port}: {error}") from None
    finally:
        await trio.aclose_forcefully(stream)
    assert isinstance(granted, SessionGranted)
    return await open_session(address, granted.session_key)


async def open_session(address: RelayAddress, session_key: bytes) -> trio.abc.Stream:
    """Present `session_key` on a new connection and wait until the relay pairs it."""
    tcp = await _connect(address)
    conversation = Conversation("session")
    try:
        with trio.fail_after(TIMEOUT):
            await tcp.send_all(conversation.send(Session(session_key=session_key)))
            await _expect(tcp, conversation, Ready)
    except BaseException as error:
        await trio.aclose_forcefully(tcp)
        if isinstance(error, trio.TooSlowError):
            raise RelayError(f"relay {address.host}:{address.port} did not pair the session in {TIMEOUT:.0f}s") from None
        if isinstance(error, (trio.BrokenResourceError, trio.ClosedResourceError, OSError)):
            raise RelayError(f"relay {address.host}:{address.port}: {error}") from None
        raise
    return PrefixedStream(tcp, conversation.rest())


async def join_relay(
    address: RelayAddress,
    *,
    node_id: bytes,
    credentials: Callable[[], tuple[Ed25519PrivateKey, bytes]],
    on_invitation: Callable[[bytes], Awaitable[None] | None],
    context: ssl.SSLContext | None = None,
    joined: Callable[[], None] = lambda: None,
) -> NoReturn:
    """Join the relay and hand each invitation's session key to `on_invitation` until the
    connection fails (RelayError). `credentials()` is this node's certified TLS key and its
    certificate (DER); `joined()` is called once the relay has accepted the join."""
    stream, conversation, challenge = await _open_control(address, context or relay_client_context(), "joiner")
    try:
        key, certificate = credentials()
        join = join_message(key, certificate, relay_id=address.relay_id, nonce=challenge.nonce, node_id=node_id)
        with trio.fail_after(TIMEOUT):
            await stream.send_all(conversation.send(join))
            await _expect(stream, conversation, Joined)
        joined()
        try:
            await _stay_joined(stream, conversation, address, on_invitation)
        except BaseExceptionGroup as group:  # the one error that ended the tasks
            raise _first_leaf(group) from None
    except trio.TooSlowError:
        raise RelayError(f"relay {address.host}:{address.port} did not accept the join in {TIMEOUT:.0f}s") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
        raise RelayError(f"relay {address.host}:{address.port}: connection lost ({error.__cause__ or error})") from None
    finally:
        await trio.aclose_forcefully(stream)


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


async def _stay_joined(stream: trio.SSLStream, conversation: Conversation, address: RelayAddress,
                       on_invitation: Callable[[bytes], Awaitable[None] | None]) -> NoReturn:
    outbox_send, outbox = trio.open_memory_channel[Message](16)

    async def write() -> None:
        async for message in outbox:
            await stream.send_all(conversation.send(message))

    async def ping() -> None:
        while True:
            await trio.sleep(KEEPALIVE)
            outbox_send.send_nowait(Ping())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        nursery.start_soon(ping)
        while True:
            with trio.move_on_after(3 * KEEPALIVE) as silence:
                message = await _next(stream, conversation)
            if silence.cancelled_caught:
                raise RelayError(f"relay {address.host}:{address.port} went silent")
            if isinstance(message, Ping):
                outbox_send.send_nowait(Pong())
            elif isinstance(message, Invitation):
                result = on_invitation(message.session_key)
                if result is not None:
                    await result
