"""A real relay on 127.0.0.1 with real TLS and real keys, in process: nodes join it and are
reached through it by node id; the peer link inside stays the pinned TLS link, end to end, so
a relay that tampers, replays or mis-pairs is detected and the link refused; someone without a
node's key cannot join under its id; quotas refuse one greedy client and keep serving others."""

from __future__ import annotations

import hashlib
import struct

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding

from plugshare.relay import RelayAddress, RelayLimits, RelayRefused, join_relay, open_session, request_session
from plugshare.relay.client import RelayError
from plugshare.relay.protocol import RELAY_VERSION, Connect, Conversation, encode
from plugshare.relay.quota import TokenBucket
from plugshare.relay.server import RelayServer
from plugshare.replication.transport import (
    FingerprintMismatch,
    Incoming,
    PeerConnectError,
    PeerConnectionClosed,
    Route,
    connect_peer_via,
    serve_peers,
)
from plugshare.token.tls import client_ssl_context, delegated_certificate
from tests.replication.test_transport import CONFIG, Node, echo

TIMEOUT = 20  # generous: a loaded machine must not fail these


def certificate_of(node: Node) -> bytes:
    return delegated_certificate(node.tls_key, node.delegation).public_bytes(Encoding.DER)


async def start_relay(nursery, relay: RelayServer) -> RelayAddress:
    listeners = await nursery.start(relay.serve, "127.0.0.1", 0)
    return RelayAddress(relay.relay_id, "127.0.0.1", listeners[0].socket.getsockname()[1])


async def start_joined_node(nursery, node: Node, address: RelayAddress, *, handler=echo, accepted=None):
    """`node` accepting peer links only through the relay (no listener anyone is told of),
    as a node's relay side does: each invitation's session goes to serve_peers."""
    send, receive = trio.open_memory_channel(16)
    joined = trio.Event()

    async def invited(session_key: bytes) -> None:
        async def take() -> None:
            try:
                stream = await open_session(address, session_key)
            except RelayError:
                return
            await send.send(Incoming(stream, f"relay {address}", f"relay {address}"))
        nursery.start_soon(take)

    async def counting(connection):
        if accepted is not None:
            accepted.append(connection.peer_fingerprint)
        await handler(connection)

    await nursery.start(lambda task_status: serve_peers(
        counting, host="127.0.0.1", port=0, ssl_context=node.server_context(), local=node.local,
        accept_peer=lambda fp: True, config=CONFIG, incoming=receive, task_status=task_status))

    async def keep_joined() -> None:
        with pytest.raises(RelayError):  # until the test ends, or the relay goes away
            await join_relay(address, node_id=node.id, credentials=lambda: (node.tls_key, certificate_of(node)),
                             on_invitation=invited, joined=joined.set)

    nursery.start_soon(keep_joined)
    with trio.fail_after(TIMEOUT):
        await joined.wait()


def relayed(address: RelayAddress, server: Node, client: Node):
    route = Route(f"relay {address}", lambda: request_session(address, server.id))
    return connect_peer_via(route, expected_fingerprint=server.id, ssl_context=client_ssl_context(),
                            local=client.local, prove=client.prove, config=CONFIG)


async def test_a_node_is_reached_through_the_relay_by_its_id():
    server, client = Node("behind-nat"), Node("dialer")
    async with trio.open_nursery() as nursery:
        relay = RelayServer(Ed25519PrivateKey.generate())
        address = await start_relay(nursery, relay)
        await start_joined_node(nursery, server, address)
        with trio.fail_after(TIMEOUT):
            async with relayed(address, server, client) as connection:
                assert connection.via == "relay" and connection.peer_fingerprint == server.id
                for n in range(3):
                    await connection.send({"type": "probe", "n": n})
                    assert await connection.receive() == {"type": "echo", "of": {"type": "probe", "n": n}}
                big = {"type": "probe", "blob": b"x" * 300_000}
                await connection.send(big)
                assert await connection.receive() == {"type": "echo", "of": big}
        nursery.cancel_scope.cancel()


async def test_the_relay_is_pinned_by_its_fingerprint():
    server = Node("behind-nat")
    async with trio.open_nursery() as nursery:
        address = await start_relay(nursery, RelayServer(Ed25519PrivateKey.generate()))
        impostor = RelayAddress(hashlib.sha256(b"another relay").digest(), address.host, address.port)
        with pytest.raises(RelayError, match="is not relay"):
            await request_session(impostor, server.id)
        nursery.cancel_scope.cancel()


async def test_an_unknown_node_id_is_a_clear_refusal():
    async with trio.open_nursery() as nursery:
        address = await start_relay(nursery, RelayServer(Ed25519PrivateKey.generate()))
        with pytest.raises(RelayRefused, match="not joined") as refused:
            await request_session(address, hashlib.sha256(b"nobody").digest())
        assert refused.value.code == "unknown_node"
        nursery.cancel_scope.cancel()


async def test_nobody_can_join_under_a_node_id_without_its_key():
    victim, attacker = Node("victim"), Node("attacker")
    async with trio.open_nursery() as nursery:
        relay = RelayServer(Ed25519PrivateKey.generate())
        address = await start_relay(nursery, relay)
        # The victim's certificate is public (any peer sees it); the attacker signs with its own key.
        with trio.fail_after(TIMEOUT), pytest.raises(RelayRefused, match="join") as refused:
            await join_relay(address, node_id=victim.id,
                             credentials=lambda: (attacker.tls_key, certificate_of(victim)), on_invitation=print)
        assert refused.value.code == "bad_join"
        # Claiming the victim's id with the attacker's own certificate: the signature covers
        # the id the certificate proves, so it does not verify either.
        with trio.fail_after(TIMEOUT), pytest.raises(RelayRefused, match="join"):
            await join_relay(address, node_id=victim.id,
                             credentials=lambda: (attacker.tls_key, certificate_of(attacker)), on_invitation=print)
        assert not relay.joined(victim.id)
        nursery.cancel_scope.cancel()


class MispairingRelay(RelayServer):
    """Invites whoever joined last, whatever node id the dialer asked for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last = None

    def _pick_member(self, node_id):
        return self._members[self.last][-1]


async def test_a_relay_that_pairs_a_dialer_with_the_wrong_node_is_refused():
    wanted, other, client = Node("wanted"), Node("other"), Node("dialer")
    async with trio.open_nursery() as nursery:
        relay = MispairingRelay(Ed25519PrivateKey.generate())
        address = await start_relay(nursery, relay)
        await start_joined_node(nursery, wanted, address)
        accepted: list[bytes] = []
        await start_joined_node(nursery, other, address, accepted=accepted)
        relay.last = other.id
        with trio.fail_after(TIMEOUT), pytest.raises(FingerprintMismatch, match="not the expected"):
            async with relayed(address, wanted, client):
                pytest.fail("a link to the wrong node was established")
        assert accepted == []
        nursery.cancel_scope.cancel()


class TamperingRelay(RelayServer):
    """Flips one bit in the `at`-th byte the joined node sends back, and records the bytes
    the dialer sends."""

    def __init__(self, *args, at: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.at = at
        self.seen = [0, 0]
        self.recorded: list[bytes] = []

    def _transform(self, pending, direction, data):
        start, self.seen[direction] = self.seen[direction], self.seen[direction] + len(data)
        if self.at is not None and direction == 1 and start <= self.at < start + len(data):
            data = bytearray(data)
            data[self.at - start] ^= 0x01
            return bytes(data)
        if direction == 0:
            self.recorded.append(data)
        return data


@pytest.mark.parametrize("at", [5, 200, 600])
async def test_a_relay_that_tampers_with_a_forwarded_byte_breaks_the_link(at):
    server, client = Node("behind-nat"), Node("dialer")
    async with trio.open_nursery() as nursery:
        relay = TamperingRelay(Ed25519PrivateKey.generate(), at=at)
        address = await start_relay(nursery, relay)
        accepted: list[bytes] = []
        await start_joined_node(nursery, server, address, accepted=accepted)
        with trio.fail_after(TIMEOUT), pytest.raises(PeerConnectError):
            async with relayed(address, server, client):
                pytest.fail("a link through a tampering relay was established")
        assert relay.seen[1] > at  # the flipped byte was forwarded
        nursery.cancel_scope.cancel()


async def test_a_relay_that_replays_a_recorded_session_is_refused():
    server, client = Node("behind-nat"), Node("dialer")
    async with trio.open_nursery() as nursery:
        relay = TamperingRelay(Ed25519PrivateKey.generate())
        address = await start_relay(nursery, relay)
        accepted: list[bytes] = []
        await start_joined_node(nursery, server, address, accepted=accepted)
        with trio.fail_after(TIMEOUT):
            async with relayed(address, server, client) as connection:
                await connection.send({"type": "probe", "text": "a secret note"})
                await connection.receive()
        assert accepted == [client.id]
        recorded = b"".join(relay.recorded)
        assert b"a secret note" not in recorded and client.local.name.encode() not in recorded  # ciphertext only
        # The relay now opens a session of its own with the node and replays the dialer's bytes.
        stream = await request_session(address, server.id)
        with trio.fail_after(TIMEOUT):
            try:
                await stream.send_all(recorded)
                while await stream.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass
        await stream.aclose()
        assert accepted == [client.id]  # the replay was never accepted as a link
        nursery.cancel_scope.cancel()


async def test_one_greedy_source_is_refused_while_other_nodes_are_served():
    server, client = Node("behind-nat"), Node("dialer")
    limits = RelayLimits(connections_per_source=4, pending_per_source=2, handshake_timeout=30.0)
    async with trio.open_nursery() as nursery:
        relay = RelayServer(Ed25519PrivateKey.generate(), limits)
        address = await start_relay(nursery, relay)
        await start_joined_node(nursery, server, address)  # from 127.0.0.1
        # The greedy client, from another loopback address, holds connections idle...
        idle = [await trio.open_tcp_stream(address.host, address.port, local_address="127.0.0.2")
                for _ in range(limits.connections_per_source)]
        for stream in idle:
            await stream.send_all(b"\x01")  # a session frame's first byte, and nothing more
        # ...so its next one is refused with a clear answer,
        extra = await trio.open_tcp_stream(address.host, address.port, local_address="127.0.0.2")
        conversation = Conversation("session")
        from plugshare.relay.protocol import Session
        await extra.send_all(conversation.send(Session(session_key=b"k" * 32)))
        with trio.fail_after(TIMEOUT):
            data = b""
            while chunk := await extra.receive_some(4096):
                data += chunk
        conversation.receive_data(data)
        refusal = conversation.next_message()
        assert refusal.code == "over_quota" and "127.0.0.2" in refusal.reason
        # ...while the node it competes with is still joined and reached.
        with trio.fail_after(TIMEOUT):
            async with relayed(address, server, client) as connection:
                await connection.send({"type": "probe"})
                assert await connection.receive() == {"type": "echo", "of": {"type": "probe"}}
        for stream in idle + [extra]:
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_sessions_waiting_to_be_paired_are_bounded_per_source():
    server = Node("behind-nat")
    limits = RelayLimits(pending_per_source=2, pending_timeout=30.0)
    async with trio.open_nursery() as nursery:
        relay = RelayServer(Ed25519PrivateKey.generate(), limits)
        address = await start_relay(nursery, relay)
        # A joined node that never comes to pair (it takes no invitation).
        joined = trio.Event()
        nursery.start_soon(lambda: join_relay(address, node_id=server.id, joined=joined.set,
                                              credentials=lambda: (server.tls_key, certificate_of(server)),
                                              on_invitation=lambda key: None))
        with trio.fail_after(TIMEOUT):
            await joined.wait()
        from plugshare.relay.client import _open_control, _expect, relay_client_context
        from plugshare.relay.protocol import SessionGranted

        async def ask() -> None:
            stream, conversation, _ = await _open_control(address, relay_client_context(), "dialer")
            await stream.send_all(conversation.send(Connect(node_id=server.id)))
            try:
                await _expect(stream, conversation, SessionGranted)
            finally:
                await stream.aclose()

        with trio.fail_after(TIMEOUT):
            await ask()
            await ask()
            with pytest.raises(RelayRefused, match="waiting to be paired") as refused:
                await ask()
        assert refused.value.code == "over_quota"
        nursery.cancel_scope.cancel()


def test_the_token_bucket_paces_at_its_rate_after_a_burst():
    bucket = TokenBucket(rate=1000, burst=500, now=0.0)
    assert bucket.take(500, 0.0) == 0.0  # the burst
    assert bucket.take(1000, 0.0) == pytest.approx(1.0)  # then one second per 1000 bytes
    assert bucket.take(100, 1.0) == pytest.approx(0.1)
    assert bucket.take(100, 10.0) == 0.0  # refilled, up to the burst only
    assert bucket.take(500, 10.0) == pytest.approx(0.1)


async def test_an_unpaired_half_expires_with_a_clear_refusal_and_its_key_is_then_void():
    server = Node("behind-nat")
    limits = RelayLimits(pending_timeout=0.5)
    async with trio.open_nursery() as nursery:
        relay = RelayServer(Ed25519PrivateKey.generate(), limits)
        address = await start_relay(nursery, relay)
        keys: list[bytes] = []
        joined = trio.Event()
        nursery.start_soon(lambda: join_relay(address, node_id=server.id, joined=joined.set,
                                              credentials=lambda: (server.tls_key, certificate_of(server)),
                                              on_invitation=keys.append))  # never comes to pair
        with trio.fail_after(TIMEOUT):
            await joined.wait()
            with pytest.raises(RelayRefused, match="did not arrive") as refused:
                await request_session(address, server.id)
            assert refused.value.code == "no_peer"
            with pytest.raises(RelayRefused) as late:  # the invited node, too late
                await open_session(address, keys[0])
            assert late.value.code == "no_session"
        nursery.cancel_scope.cancel()


async def test_a_joined_node_that_vanishes_mid_connection_does_not_take_the_relay_down():
    gone, server, client = Node("gone"), Node("behind-nat"), Node("dialer")
    async with trio.open_nursery() as nursery:
        relay = RelayServer(Ed25519PrivateKey.generate())
        address = await start_relay(nursery, relay)
        from plugshare.relay.client import _expect, _open_control, relay_client_context
        from plugshare.relay.identity import join_message
        from plugshare.relay.protocol import Joined

        # Joins, then its TCP connection dies without a TLS close (a laptop lid closed).
        stream, conversation, challenge = await _open_control(address, relay_client_context(), "joiner")
        await stream.send_all(conversation.send(join_message(
            gone.tls_key, certificate_of(gone), relay_id=relay.relay_id, nonce=challenge.nonce, node_id=gone.id)))
        with trio.fail_after(TIMEOUT):
            await _expect(stream, conversation, Joined)
        await trio.aclose_forcefully(stream.transport_stream)
        with trio.fail_after(TIMEOUT):
            while relay.joined(gone.id):
                await trio.sleep(0.01)
        # The relay serves on.
        await start_joined_node(nursery, server, address)
        with trio.fail_after(TIMEOUT):
            async with relayed(address, server, client) as connection:
                await connection.send({"type": "probe"})
                assert await connection.receive() == {"type": "echo", "of": {"type": "probe"}}
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("garbage, code", [
    (struct.pack(">BH", RELAY_VERSION, 65535), "protocol"),  # oversize, refused from the header
    (struct.pack(">BH", RELAY_VERSION, 3) + b"\xc1\xc1\xc1", "protocol"),  # not msgpack
    (encode(Connect(node_id=b"n" * 32)), "protocol"),  # a control message on a session connection
    (b"\x07not a relay client", None),  # neither TLS nor a relay frame: closed without a word
])
async def test_hostile_bytes_get_a_clear_refusal_and_the_relay_serves_on(garbage, code):
    server, client = Node("behind-nat"), Node("dialer")
    async with trio.open_nursery() as nursery:
        relay = RelayServer(Ed25519PrivateKey.generate())
        address = await start_relay(nursery, relay)
        stream = await trio.open_tcp_stream(address.host, address.port)
        await stream.send_all(garbage)
        data = b""
        with trio.fail_after(TIMEOUT):
            try:
                while chunk := await stream.receive_some(4096):
                    data += chunk
            except trio.BrokenResourceError:  # closed with our bytes unread: a reset
                pass
        if code is None:
            assert data == b""
        else:
            conversation = Conversation("session")
            conversation.state = "waiting"
            conversation.receive_data(data)
            assert conversation.next_message().code == code
        await start_joined_node(nursery, server, address)
        with trio.fail_after(TIMEOUT):
            async with relayed(address, server, client) as connection:
                await connection.send({"type": "probe"})
                assert await connection.receive() == {"type": "echo", "of": {"type": "probe"}}
        nursery.cancel_scope.cancel()


async def test_a_relay_that_tampers_with_an_established_link_ends_it_and_delivers_nothing_altered():
    server, client = Node("behind-nat"), Node("dialer")
    async with trio.open_nursery() as nursery:
        relay = TamperingRelay(Ed25519PrivateKey.generate())
        address = await start_relay(nursery, relay)
        await start_joined_node(nursery, server, address)
        with trio.fail_after(TIMEOUT):
            async with relayed(address, server, client) as connection:
                await connection.send({"type": "probe", "n": 1})
                assert await connection.receive() == {"type": "echo", "of": {"type": "probe", "n": 1}}
                relay.at = relay.seen[1] + 30  # inside the next record the node sends back
                await connection.send({"type": "probe", "n": 2})
                with pytest.raises(PeerConnectionClosed):
                    await connection.receive()
                assert "bad record mac" in connection.close_reason.lower()  # TLS caught it
        nursery.cancel_scope.cancel()


async def test_a_few_source_addresses_cannot_take_all_of_one_nodes_session_slots():
    """Dialers are not identified to the relay: an attacker with several source addresses
    asks for sessions with one node and never comes to pair them. Each source holds only a
    couple of that node's pending slots, and a new dialer gets a slot at once (the attacker's
    oldest waiting session gives it up) instead of waiting out the pending timeout."""
    server, client = Node("behind-nat"), Node("dialer")
    limits = RelayLimits(pending_timeout=120.0, handshake_timeout=30.0)  # nothing expires during the test
    sources = [f"127.0.0.{n}" for n in range(2, 8)]
    async with trio.open_nursery() as nursery:
        relay = RelayServer(Ed25519PrivateKey.generate(), limits)
        address = await start_relay(nursery, relay)
        await start_joined_node(nursery, server, address)
        from plugshare.relay.client import _expect, relay_client_context
        from plugshare.relay.protocol import Challenge, SessionGranted

        async def ask_and_vanish(source: str) -> bool:
            """A session asked for from `source`, its half never presented: granted?"""
            tcp = await trio.open_tcp_stream(address.host, address.port, local_address=source)
            stream = trio.SSLStream(tcp, relay_client_context(), server_side=False)
            conversation = Conversation("dialer")
            try:
                await _expect(stream, conversation, Challenge)
                await stream.send_all(conversation.send(Connect(node_id=server.id)))
                await _expect(stream, conversation, SessionGranted)
                return True
            except RelayRefused:
                return False
            finally:
                await trio.aclose_forcefully(stream)

        granted = {}
        with trio.fail_after(TIMEOUT):
            for source in sources:
                granted[source] = sum([await ask_and_vanish(source) for _ in range(limits.pending_per_source)])
        assert max(granted.values()) <= 2, granted  # a couple per source and node, not pending_per_source
        # An honest dialer is paired at once, with the attacker's sessions still waiting.
        with trio.fail_after(TIMEOUT):
            async with relayed(address, server, client) as connection:
                await connection.send({"type": "probe"})
                assert await connection.receive() == {"type": "echo", "of": {"type": "probe"}}
        # ...and so is the next one, however often the attacker comes back.
        with trio.fail_after(TIMEOUT):
            for source in sources:
                await ask_and_vanish(source)
            async with relayed(address, server, client) as connection:
                await connection.send({"type": "probe"})
                assert await connection.receive() == {"type": "echo", "of": {"type": "probe"}}
        nursery.cancel_scope.cancel()


async def test_stale_direct_addresses_do_not_hold_up_the_relay_route():
    """A peer's direct addresses went stale (something there takes the TCP connection and never
    answers, as a blackholed address never does): keep_connected dials the relay route after a
    short head start of the direct ones instead of waiting one handshake timeout per address
    (here a minute each, so three of them would blow the deadline below)."""
    from plugshare.replication.link import LinkConfig
    from plugshare.replication.transport import TransportConfig, keep_connected

    server, client = Node("behind-nat"), Node("dialer")
    patient = TransportConfig(link=LinkConfig(handshake_timeout=60.0, ping_interval=0.2, dead_after=5.0),
                              close_timeout=1.0)
    async with trio.open_nursery() as nursery:
        relay = RelayServer(Ed25519PrivateKey.generate())
        address = await start_relay(nursery, relay)
        await start_joined_node(nursery, server, address)
        silent = [await trio.open_tcp_listeners(0, host="127.0.0.1") for _ in range(3)]  # never accepted
        stale = [("127.0.0.1", listeners[0].socket.getsockname()[1]) for listeners in silent]
        route = Route(f"relay {address}", lambda: request_session(address, server.id))
        linked = trio.Event()
        vias = []

        async def handler(connection):
            vias.append(connection.via)
            await connection.send({"type": "probe"})
            assert await connection.receive() == {"type": "echo", "of": {"type": "probe"}}
            linked.set()
            await trio.sleep_forever()

        nursery.start_soon(lambda: keep_connected(
            handler, addresses=lambda: [*stale, route], expected_fingerprint=server.id,
            ssl_context=client_ssl_context(), local=client.local, prove=client.prove, config=patient))
        with trio.fail_after(TIMEOUT):
            await linked.wait()
        assert vias == ["relay"]
        nursery.cancel_scope.cancel()

