"""The relay server (trio): pairs a dialer's connection with the connection of the node it
names, then forwards bytes it cannot read. Stateless: nothing is written anywhere, and nodes
rejoin by themselves after a restart.

Every resource an outsider can make it spend is bounded by `RelayLimits`: open connections
(in all and per source address), joined connections per node id, pending and paired sessions
(in all, per node id, per source and per source and node id: a dialer cannot keep a node's
slots by never pairing them, a newer one takes them over), unpaired halves (they expire), and
bytes per second (each session
direction and each source address, token buckets). A client over a limit gets a `Refused`
saying which, and the relay goes on serving the others.
"""

from __future__ import annotations

import datetime
import logging
import os
import secrets
import ssl
import tempfile
from typing import NoReturn

import attrs
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from plugshare.accepting import accept_forever
from plugshare.relay.identity import InvalidJoin, public_bytes, relay_id_of, verify_join
from plugshare.relay.protocol import (
    ALPN_PROTOCOL,
    RELAY_VERSION,
    Challenge,
    Connect,
    Conversation,
    Invitation,
    Join,
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
from plugshare.relay.quota import Counts, RelayLimits, TokenBucket
from plugshare.relay.streams import PrefixedStream
from plugshare.token.identity import format_node_id

__all__ = ["RelayServer", "relay_ssl_context"]

log = logging.getLogger("plugshare.relay")

_TLS_RECORD_HANDSHAKE = 0x16  # the first byte of a TLS ClientHello
_CHUNK = 64 * 1024
# What ends one connection (the client went away, or broke the protocol); anything else is a bug.
_CONNECTION_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, RelayProtocolError)
_OUTBOX = 16  # messages queued for one joined node; a dial finding it full is refused (busy)


def relay_ssl_context(key: Ed25519PrivateKey) -> ssl.SSLContext:
    """TLS 1.3 with a certificate self-signed by the relay's key (nodes pin the key's hash)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plugshare relay")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, algorithm=None)
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols([ALPN_PROTOCOL])
    context.verify_mode = ssl.CERT_NONE
    context.num_tickets = 0
    password = secrets.token_urlsafe(32)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.BestAvailableEncryption(password.encode()))
    with tempfile.TemporaryDirectory(prefix="plugshare-relay-") as directory:  # mode 0700
        path = os.path.join(directory, "credential.pem")
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(pem + certificate.public_bytes(serialization.Encoding.PEM))
        context.load_cert_chain(path, password=password)
    return context


class _Refusal(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


@attrs.define(eq=False)
class _Member:
    """A joined node's control connection."""

    node_id: bytes
    outbox: trio.MemorySendChannel
    scope: trio.CancelScope


@attrs.define(eq=False)
class _Pending:
    """A granted session, waiting for its two halves."""

    key: bytes
    dialer_source: str
    target: bytes
    halves: list[tuple[trio.SocketStream, bytes, str]] = attrs.Factory(list)  # stream, early bytes, source
    paired: trio.Event = attrs.Factory(trio.Event)
    settled: trio.Event = attrs.Factory(trio.Event)  # paired, or given up for a newer dialer
    done: trio.Event = attrs.Factory(trio.Event)
    evicted: bool = False


class RelayServer:
    def __init__(self, key: Ed25519PrivateKey, limits: RelayLimits = RelayLimits()) -> None:
        self.limits = limits
        self.relay_id = relay_id_of(public_bytes(key))
        self._ssl = relay_ssl_context(key)
        self._open = 0
        self._per_source = Counts(limits.connections_per_source)
        self._members: dict[bytes, list[_Member]] = {}  # node id -> joined connections, oldest first
        self._pending: dict[bytes, _Pending] = {}
        self._node_sessions = Counts(limits.sessions_per_node)
        self._pending_by_source = Counts(limits.pending_per_source)
        self._pending_by_node: dict[bytes, list[_Pending]] = {}  # node id -> unpaired, oldest first
        self._paired = 0
        self._source_buckets: dict[str, TokenBucket] = {}
        self._nursery: trio.Nursery | None = None

    # -- what tests and the CLI look at ---------------------------------------------------

    def joined(self, node_id: bytes) -> bool:
        return bool(self._members.get(node_id))

    @property
    def paired_sessions(self) -> int:
        return self._paired

    # -- serving --------------------------------------------------------------------------

    async def serve(self, host: str | None, port: int, *,
                    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        listeners = await trio.open_tcp_listeners(port, host=host)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for listener in listeners:
                # out of descriptors: said once, retried until it passes; the others are served
                nursery.start_soon(accept_forever, listener, nursery, self._handle,
                                   "relay connections", log)
            task_status.started(listeners)
        raise AssertionError("the accept loops never return")

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            source = str(stream.socket.getpeername()[0])
        except OSError:
            source = "?"
        if self._open >= self.limits.max_connections:
            await trio.aclose_forcefully(stream)
            return
        self._open += 1
        within_quota = self._per_source.try_add(source)
        try:
            with trio.move_on_after(self.limits.handshake_timeout) as first_byte:
                first = await stream.receive_some(1)
            if first_byte.cancelled_caught or not first:
                return
            if first[0] == _TLS_RECORD_HANDSHAKE:
                await self._control(PrefixedStream(stream, first), source, within_quota)
            elif first[0] == RELAY_VERSION:
                await self._session(stream, first, source, within_quota)
        except* _CONNECTION_ERRORS as group:  # bare, or from a connection's own tasks
            log.debug("connection from %s ended: %s", source, group.exceptions[0])
        finally:
            if within_quota:
                self._per_source.remove(source)
                if not self._per_source[source]:
                    self._source_buckets.pop(source, None)
            self._open -= 1
            await trio.aclose_forcefully(stream)

    # -- control connections --------------------------------------------------------------

    async def _control(self, raw: PrefixedStream, source: str, within_quota: bool) -> None:
        stream = trio.SSLStream(raw, self._ssl, server_side=True)
        conversation = Conversation("relay-control")
        nonce = secrets.token_bytes(32)
        with trio.move_on_after(self.limits.handshake_timeout) as handshake:
            await stream.do_handshake()
            if not within_quota:
                await self._refuse(stream, conversation, "over_quota",
                                   f"too many connections from {source} (at most {self.limits.connections_per_source})")
                return
            await stream.send_all(conversation.send(Challenge(nonce=nonce)))
            try:
                first = await _receive(stream, conversation)
            except RelayProtocolError as error:
                await self._refuse(stream, conversation, "protocol", str(error))
                return
        if handshake.cancelled_caught or first is None:
            return
        try:
            if isinstance(first, Join):
                await self._member(stream, conversation, first, nonce, source)
            else:
                assert isinstance(first, Connect)
                await self._grant(stream, conversation, first, source)
        except _Refusal as refusal:
            log.info("refused %s: %s", source, refusal.reason)
            await self._refuse(stream, conversation, refusal.code, refusal.reason)

    async def _refuse(self, stream: trio.abc.Stream, conversation: Conversation, code: str, reason: str) -> None:
        with trio.move_on_after(2):
            try:
                await stream.send_all(conversation.send(Refused(code=code, reason=reason)))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _member(self, stream: trio.SSLStream, conversation: Conversation, join: Join, nonce: bytes,
                      source: str) -> None:
        try:
            node_id = verify_join(join, relay_id=self.relay_id, nonce=nonce)
        except InvalidJoin as error:
            raise _Refusal("bad_join", f"the join does not prove a node id: {error}") from None
        outbox_send, outbox = trio.open_memory_channel[Message](_OUTBOX)
        member = _Member(node_id, outbox_send, trio.CancelScope())
        members = self._members.setdefault(node_id, [])
        members.append(member)
        while len(members) > self.limits.joins_per_node:  # a node that came back: drop its stale joins
            members.pop(0).scope.cancel()
        log.info("node %s joined from %s", format_node_id(node_id), source)
        try:
            with member.scope:
                outbox_send.send_nowait(Joined())
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_outbox, stream, conversation, outbox)
                    nursery.start_soon(self._ping, outbox_send)
                    await self._read_member(stream, conversation, outbox_send)
                    nursery.cancel_scope.cancel()
        except* RelayProtocolError as group:
            log.info("dropped node %s: %s", format_node_id(node_id), group.exceptions[0])
        finally:
            if member in members:
                members.remove(member)
            if not members and self._members.get(node_id) is members:
                del self._members[node_id]
            log.info("node %s left", format_node_id(node_id))

    async def _read_member(self, stream: trio.SSLStream, conversation: Conversation,
                           outbox: trio.MemorySendChannel) -> None:
        while True:
            with trio.move_on_after(3 * self.limits.keepalive) as silence:
                message = await _receive(stream, conversation)
            if silence.cancelled_caught or message is None:
                return
            if isinstance(message, Ping):
                try:
                    outbox.send_nowait(Pong())
                except trio.WouldBlock:
                    pass

    async def _write_outbox(self, stream: trio.SSLStream, conversation: Conversation,
                            outbox: trio.MemoryReceiveChannel) -> None:
        async for message in outbox:
            await stream.send_all(conversation.send(message))

    async def _ping(self, outbox: trio.MemorySendChannel) -> None:
        while True:
            await trio.sleep(self.limits.keepalive)
            try:
                outbox.send_nowait(Ping())
            except trio.WouldBlock:
                pass

    def _pick_member(self, node_id: bytes) -> _Member | None:
        """The joined connection to invite `node_id` on (the newest)."""
        members = self._members.get(node_id)
        return members[-1] if members else None

    async def _grant(self, stream: trio.SSLStream, conversation: Conversation, connect: Connect, source: str) -> None:
        member = self._pick_member(connect.node_id)
        if member is None:
            raise _Refusal("unknown_node", f"node {format_node_id(connect.node_id)} is not joined to this relay")
        if len(self._pending) >= self.limits.max_pending_sessions:
            raise _Refusal("busy", "too many sessions are waiting to be paired; try again later")
        waiting = self._pending_by_node.setdefault(connect.node_id, [])
        if sum(p.dialer_source == source for p in waiting) >= self.limits.pending_per_source_per_node:
            raise _Refusal("over_quota", f"too many sessions with node {format_node_id(connect.node_id)} "
                                         f"waiting to be paired for {source}")
        if len(waiting) >= self.limits.pending_per_node:
            self._evict_for(waiting, source)
        if not self._pending_by_source.try_add(source):
            raise _Refusal("over_quota", f"too many sessions waiting to be paired for {source}")
        if not self._node_sessions.try_add(connect.node_id):
            self._pending_by_source.remove(source)
            raise _Refusal("over_quota", f"too many sessions with node {format_node_id(connect.node_id)}")
        key = secrets.token_bytes(32)
        pending = _Pending(key, source, connect.node_id)
        try:
            member.outbox.send_nowait(Invitation(session_key=key))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            self._node_sessions.remove(connect.node_id)
            self._pending_by_source.remove(source)
            raise _Refusal("busy", "the node is not taking invitations right now") from None
        self._pending[key] = pending
        waiting.append(pending)
        assert self._nursery is not None
        self._nursery.start_soon(self._expire, pending)
        await stream.send_all(conversation.send(SessionGranted(session_key=key)))

    def _evict_for(self, waiting: list[_Pending], source: str) -> None:
        """Make room among a node's unpaired sessions for a dialer from `source`: the oldest
        of the source holding the most gives its slot up (refused if `source` is that one)."""
        held: dict[str, int] = {}
        for pending in waiting:
            held[pending.dialer_source] = held.get(pending.dialer_source, 0) + 1
        greediest = max(held, key=lambda s: held[s])
        if held[greediest] <= held.get(source, 0):
            raise _Refusal("busy", "too many sessions with this node are waiting to be paired; try again later")
        victim = next(p for p in waiting if p.dialer_source == greediest)
        waiting.remove(victim)
        victim.evicted = True
        victim.settled.set()
        log.info("gave up a session with node %s asked for by %s: a newer dialer needs the slot",
                 format_node_id(victim.target), greediest)

    async def _expire(self, pending: _Pending) -> None:
        """Forget a session whose halves did not both arrive in time (or that was given up
        for a newer dialer); release its quota once it ends."""
        with trio.move_on_after(self.limits.pending_timeout):
            await pending.settled.wait()
        self._pending.pop(pending.key, None)
        waiting = self._pending_by_node.get(pending.target, [])
        if pending in waiting:
            waiting.remove(pending)
        if not waiting:
            self._pending_by_node.pop(pending.target, None)
        self._pending_by_source.remove(pending.dialer_source)
        if not pending.paired.is_set():
            pending.done.set()
        await pending.done.wait()
        self._node_sessions.remove(pending.target)

    # -- session connections --------------------------------------------------------------

    async def _session(self, stream: trio.SocketStream, first: bytes, source: str, within_quota: bool) -> None:
        conversation = Conversation("relay-session")
        conversation.receive_data(first)
        with trio.move_on_after(self.limits.handshake_timeout):
            try:
                message = await _receive(stream, conversation)
            except RelayProtocolError as error:
                await self._refuse(stream, conversation, "protocol", str(error))
                return
        if not isinstance(message, Session):
            return
        if not within_quota:
            await self._refuse(stream, conversation, "over_quota", f"too many connections from {source}")
            return
        pending = self._pending.get(message.session_key)
        if pending is None or len(pending.halves) >= 2 or pending.done.is_set() or pending.evicted:
            await self._refuse(stream, conversation, "no_session", "no such session waits here (expired or used)")
            return
        pending.halves.append((stream, conversation.rest(), source))
        if len(pending.halves) == 1:  # the first half waits for the other, then for the end
            await pending.done.wait()
            if pending.evicted:
                await self._refuse(stream, conversation, "no_peer",
                                   "the other side did not arrive, and a newer dialer took the slot")
            elif not pending.paired.is_set():
                await self._refuse(stream, conversation, "no_peer",
                                   f"the other side did not arrive within {self.limits.pending_timeout:.0f}s")
            return
        self._pending.pop(pending.key, None)
        if self._paired >= self.limits.max_sessions:
            pending.settled.set()
            pending.done.set()
            await self._refuse(stream, conversation, "busy", "this relay forwards all the sessions it can")
            return
        pending.paired.set()
        pending.settled.set()
        self._paired += 1
        log.info("paired a session with node %s for %s", format_node_id(pending.target), pending.dialer_source)
        try:
            (other, other_early, other_source), (_, early, _) = pending.halves
            ready = conversation.send(Ready())
            await other.send_all(ready)
            await stream.send_all(ready)
            await self._forward(pending, (stream, early, source), (other, other_early, other_source))
        finally:
            self._paired -= 1
            pending.done.set()

    async def _forward(self, pending: _Pending, one: tuple, two: tuple) -> None:
        now = trio.current_time()

        async def pump(src: tuple, dst: tuple, direction: int, nursery: trio.Nursery) -> None:
            stream, early, source = src
            session_bucket = TokenBucket(self.limits.session_rate, self.limits.burst, now)
            source_bucket = self._source_buckets.setdefault(
                source, TokenBucket(self.limits.source_rate, self.limits.burst, now))
            try:
                data = early
                while True:
                    if data:
                        at = trio.current_time()
                        delay = max(session_bucket.take(len(data), at), source_bucket.take(len(data), at))
                        if delay:
                            await trio.sleep(delay)
                        await dst[0].send_all(self._transform(pending, direction, data))
                    data = await stream.receive_some(_CHUNK)
                    if not data:
                        return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            finally:
                nursery.cancel_scope.cancel()  # one side gone: the session is over

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, one, two, 0, nursery)
            nursery.start_soon(pump, two, one, 1, nursery)

    def _transform(self, pending: _Pending, direction: int, data: bytes) -> bytes:
        """What is forwarded for `data` (itself: an honest relay; tests override it)."""
        return data


async def _receive(stream: trio.abc.Stream, conversation: Conversation) -> Message | None:
    """The next message, or None when the other side closed first."""
    while (message := conversation.next_message()) is None:
        data = await stream.receive_some(_CHUNK)
        if not data:
            return None
        conversation.receive_data(data)
    return message


