"""The link state machine, driven by hand: bytes in, events and bytes out, time passed in."""

import hashlib

import msgpack
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from plugshare.replication.frames import FrameDecoder, FrameTooLarge, InvalidMsgpack, encode
from plugshare.replication.link import (
    ApplicationMessage,
    AuthenticationError,
    ConnectionLost,
    Established,
    HandshakeTimeout,
    IncompatibleVersion,
    Link,
    LinkConfig,
    LinkError,
    LinkState,
    LocalNode,
    LocalProtocolError,
    PeerAuthenticated,
    PeerClosed,
    PeerUnresponsive,
    ProofRequested,
    RemoteProtocolError,
    client_auth_payload,
    node_id,
)
from plugshare.token import tls

CONFIG = LinkConfig(handshake_timeout=10.0, ping_interval=5.0, dead_after=20.0)
KEYS: dict[bytes, Ed25519PrivateKey] = {}  # public key -> private key: the tests' stand-in for tokens


def make_node(name: str, addresses=("10.0.0.1:7000",)) -> tuple[Ed25519PrivateKey, LocalNode]:
    key = Ed25519PrivateKey.generate()
    public_key = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    KEYS[public_key] = key
    return key, LocalNode(public_key=public_key, name=name, addresses=addresses)


def prove(link: Link, request: ProofRequested) -> bytes:
    """What the connecting node's token does for a ProofRequested."""
    payload = client_auth_payload(request.server_id, request.nonce, link.local.node_id)
    return KEYS[link.local.public_key].sign(payload)


def frames_of(data: bytes) -> list[dict]:
    decoder = FrameDecoder()
    decoder.feed(data)
    return list(decoder)


def move(source: Link, target: Link, now: float = 0.0) -> list:
    """Deliver everything `source` queued to `target`; return the events it yields (up to a
    PeerAuthenticated, after which the target must decide before reading on). A
    ProofRequested is answered at once, as the token would."""
    target.receive_data(source.data_to_send(), now)
    events = []
    while (event := target.next_event()) is not None:
        events.append(event)
        if isinstance(event, ProofRequested):
            target.send_proof(prove(target, event))
        if isinstance(event, PeerAuthenticated):
            break
    return events


@pytest.fixture
def nodes():
    return make_node("server"), make_node("client", addresses=("192.168.1.2:7000", "[fe80::1]:7000"))


def start(nodes, *, now: float = 0.0, pinned: bytes | None = None) -> tuple[Link, Link]:
    (_, server_node), (_, client_node) = nodes
    server = Link.accepting(server_node, now=now, config=CONFIG)
    client = Link.connecting(
        client_node, pinned_peer_id=pinned or server_node.node_id, now=now, config=CONFIG
    )
    return server, client


def establish(nodes, now: float = 0.0) -> tuple[Link, Link]:
    server, client = start(nodes, now=now)
    [proof] = move(server, client, now)  # the server's hello; the client proves its identity
    assert isinstance(proof, ProofRequested)
    [authenticated] = move(client, server, now)
    assert isinstance(authenticated, PeerAuthenticated)
    server.accept()
    [established] = move(server, client, now)
    assert isinstance(established, Established)
    return server, client


# --- handshake ------------------------------------------------------------------------------


def test_handshake_authenticates_both_sides_and_exchanges_hellos(nodes):
    (_, server_node), (_, client_node) = nodes
    server, client = start(nodes)
    data = server.data_to_send()
    client.receive_data(data, 0)
    request = client.next_event()
    assert request == ProofRequested(server_node.node_id, frames_of(data)[0]["nonce"])
    assert client.state is LinkState.AWAIT_PROOF
    client.send_proof(prove(client, request))
    assert client.state is LinkState.AWAIT_READY
    [authenticated] = move(client, server)
    assert authenticated == PeerAuthenticated(server.peer)
    assert server.peer.node_id == client_node.node_id == hashlib.sha256(client_node.public_key).digest()
    assert server.peer.name == "client"
    assert server.peer.addresses == ("192.168.1.2:7000", "[fe80::1]:7000")
    server.accept()
    [established] = move(server, client)
    assert established == Established(client.peer)
    assert client.peer.node_id == server_node.node_id and client.peer.name == "server"
    assert server.state is client.state is LinkState.ESTABLISHED


def test_the_client_asks_for_a_proof_of_the_server_id_and_nonce_and_waits_for_it(nodes):
    (_, server_node), (client_key, client_node) = nodes
    nonce = bytes(range(32))
    server = Link.accepting(server_node, now=0, config=CONFIG, nonce=nonce)
    client = Link.connecting(client_node, pinned_peer_id=server_node.node_id, now=0, config=CONFIG)
    client.receive_data(server.data_to_send(), 0)
    assert client.next_event() == ProofRequested(server_id=server_node.node_id, nonce=nonce)
    assert client.state is LinkState.AWAIT_PROOF and client.pending_output == 0  # nothing sent yet
    with pytest.raises(LocalProtocolError, match="send_proof"):
        client.next_event()
    client.tick(9.0)  # time passes while the token signs; still within the handshake deadline
    payload = client_auth_payload(server_node.node_id, nonce, client_node.node_id)
    assert payload == tls.CLIENT_AUTH_DOMAIN + server_node.node_id + nonce + client_node.node_id
    client.send_proof(client_key.sign(payload))
    assert client.state is LinkState.AWAIT_READY
    [hello] = frames_of(client.data_to_send())
    assert hello["public_key"] == client_node.public_key and hello["node_id"] == client_node.node_id
    Ed25519PublicKey.from_public_bytes(hello["public_key"]).verify(hello["signature"], payload)
    server.receive_data(encode(hello), 0)
    assert isinstance(server.next_event(), PeerAuthenticated)


def test_client_auth_payload_is_the_token_modules(nodes):
    assert client_auth_payload is tls.client_auth_payload  # re-exported for compatibility
    with pytest.raises(ValueError, match="32 bytes each"):
        client_auth_payload(bytes(32), bytes(31), bytes(32))


def test_a_proof_out_of_turn_or_that_does_not_verify_is_a_local_error(nodes):
    (_, server_node), (client_key, client_node) = nodes
    server, client = start(nodes)
    with pytest.raises(LocalProtocolError, match="cannot send a proof: the link is awaiting hello"):
        client.send_proof(bytes(64))
    client.receive_data(server.data_to_send(), 0)
    request = client.next_event()
    with pytest.raises(LocalProtocolError, match="64-byte signature, got 63 bytes"):
        client.send_proof(bytes(63))
    with pytest.raises(LocalProtocolError, match="64-byte signature, got str"):
        client.send_proof("signature")
    other_key, _ = make_node("other")
    good_payload = client_auth_payload(request.server_id, request.nonce, client_node.node_id)
    for wrong in (other_key.sign(good_payload), client_key.sign(b"something else")):
        with pytest.raises(LocalProtocolError, match="does not verify with this node's public key"):
            client.send_proof(wrong)
    assert client.state is LinkState.AWAIT_PROOF and client.pending_output == 0  # unchanged
    client.send_proof(prove(client, request))
    with pytest.raises(LocalProtocolError, match="cannot send a proof: the link is awaiting ready"):
        client.send_proof(prove(client, request))
    assert isinstance(move(client, server)[0], PeerAuthenticated)


def test_a_proof_that_never_comes_hits_the_handshake_timeout(nodes):
    server, client = start(nodes, now=100.0)
    client.receive_data(server.data_to_send(), 100.0)
    assert isinstance(client.next_event(), ProofRequested)
    assert client.next_deadline() == 110.0
    client.tick(109.9)
    with pytest.raises(HandshakeTimeout, match=r"10.0s \(awaiting local proof\)"):
        client.tick(110.0)
    assert client.state is LinkState.CLOSED
    [close] = frames_of(client.data_to_send())  # no hello, only the close
    assert close["type"] == "close" and "handshake not complete" in close["reason"]
    # The server, which never got the client's hello, times out on its own.
    with pytest.raises(HandshakeTimeout, match="awaiting hello"):
        server.tick(110.0)


def test_a_close_that_arrives_while_awaiting_the_proof_is_read_after_it(nodes):
    server, client = start(nodes)
    client.receive_data(server.data_to_send(), 0)
    request = client.next_event()
    server.close("going away")
    client.receive_data(server.data_to_send(), 0)  # buffered: the link waits for the proof first
    client.send_proof(prove(client, request))
    assert client.next_event() == PeerClosed("going away")
    assert client.state is LinkState.CLOSED


def test_the_connecting_side_may_give_up_instead_of_proving(nodes):
    server, client = start(nodes)
    client.receive_data(server.data_to_send(), 0)
    client.next_event()
    client.close("the token is locked")
    assert client.state is LinkState.CLOSED
    assert move(client, server) == [PeerClosed("the token is locked")]


def test_each_accepting_link_uses_a_fresh_nonce(nodes):
    (_, server_node), _ = nodes
    nonces = {frames_of(Link.accepting(server_node, now=0).data_to_send())[0]["nonce"] for _ in range(5)}
    assert len(nonces) == 5 and all(len(nonce) == 32 for nonce in nonces)


def test_refusing_tells_the_client_why(nodes):
    server, client = start(nodes)
    move(server, client)
    move(client, server)
    server.refuse("not a member of any share")
    assert move(server, client) == [PeerClosed("not a member of any share")]
    assert server.state is client.state is LinkState.CLOSED
    assert client.close_reason == "not a member of any share"


def test_the_client_refuses_a_server_hello_that_is_not_the_pinned_node(nodes):
    _, other = make_node("impostor")
    server, client = start(nodes, pinned=other.node_id)
    client.receive_data(server.data_to_send(), 0)
    with pytest.raises(AuthenticationError, match="TLS certificate"):
        client.next_event()
    # Nothing was signed or sent but a close naming the reason.
    [close] = frames_of(client.data_to_send())
    assert close["type"] == "close" and "TLS certificate" in close["reason"]
    assert client.state is LinkState.CLOSED


def tampered_client_hello(client: Link, **changes) -> bytes:
    [hello] = frames_of(client.data_to_send())
    hello.update(changes)
    return encode(hello)


def test_a_bad_signature_is_refused(nodes):
    server, client = start(nodes)
    move(server, client)
    [hello] = frames_of(client.data_to_send())
    server.receive_data(encode({**hello, "signature": bytes(64)}), 0)
    with pytest.raises(AuthenticationError, match="bad signature"):
        server.next_event()
    assert frames_of(server.data_to_send())[-1]["type"] == "close"


def test_a_signature_cannot_be_replayed_to_another_connection(nodes):
    (_, server_node), _ = nodes
    first_server, client = start(nodes)
    move(first_server, client)
    captured_hello = client.data_to_send()
    second_server = Link.accepting(server_node, now=0, config=CONFIG)  # a new nonce
    second_server.receive_data(captured_hello, 0)
    with pytest.raises(AuthenticationError, match="bad signature"):
        second_server.next_event()


def test_a_signature_cannot_be_relayed_to_another_server(nodes):
    _, (_, client_node) = nodes
    server, client = start(nodes)
    server_frames = frames_of(server.data_to_send())
    # A relay forwards the real server's nonce from a third node's connection to the client...
    _, relay_node = make_node("relay")
    relay = Link.accepting(relay_node, now=0, config=CONFIG, nonce=server_frames[0]["nonce"])
    relay.data_to_send()
    client.receive_data(encode(server_frames[0]), 0)
    client.send_proof(prove(client, client.next_event()))
    # ...but the client signed the server's id, so the relay's side cannot accept it.
    relay.receive_data(client.data_to_send(), 0)
    with pytest.raises(AuthenticationError, match="bad signature"):
        relay.next_event()


def test_a_node_id_that_is_not_the_keys_fingerprint_is_refused(nodes):
    server, client = start(nodes)
    move(server, client)
    server.receive_data(tampered_client_hello(client, node_id=bytes(32)), 0)
    with pytest.raises(AuthenticationError, match="fingerprint of its public key"):
        server.next_event()


def test_a_different_protocol_version_is_refused(nodes):
    server, client = start(nodes)
    [hello] = frames_of(server.data_to_send())
    client.receive_data(encode({**hello, "version": 2}), 0)
    with pytest.raises(IncompatibleVersion, match="version 2"):
        client.next_event()


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"name": None}, "'name' must be str"),
        ({"name": "n" * 300}, "name"),
        ({"addresses": "10.0.0.1:1"}, "'addresses' must be list"),
        ({"addresses": [1]}, "address"),
        ({"addresses": ["a:1"] * 40}, "at most 32 addresses"),
        ({"version": True}, "'version' must be int"),
        ({"public_key": b"short"}, "32-byte public key"),
        ({"signature": "text"}, "'signature' must be bytes"),
    ],
)
def test_malformed_hellos_are_refused(nodes, changes, problem):
    server, client = start(nodes)
    move(server, client)
    server.receive_data(tampered_client_hello(client, **changes), 0)
    with pytest.raises(RemoteProtocolError, match=problem):
        server.next_event()
    assert server.state is LinkState.CLOSED


def test_application_messages_before_the_handshake_are_protocol_errors(nodes):
    server, client = start(nodes)
    server.data_to_send()
    server.receive_data(encode({"type": "changes", "seq": 1}), 0)
    with pytest.raises(RemoteProtocolError, match="expected a hello"):
        server.next_event()
    [close] = frames_of(server.data_to_send())
    assert close == {"type": "close", "reason": "expected a hello, got a 'changes' message"}


def test_the_server_must_decide_before_reading_on(nodes):
    server, client = start(nodes)
    move(server, client)
    move(client, server)
    with pytest.raises(LocalProtocolError, match="accept"):
        server.next_event()
    server.accept()
    with pytest.raises(LocalProtocolError, match="cannot accept"):
        server.accept()


def test_sending_before_established_or_with_a_link_type_is_a_local_error(nodes):
    server, client = start(nodes)
    with pytest.raises(LocalProtocolError, match="awaiting hello"):
        client.send_message({"type": "changes"})
    server, client = establish(nodes)
    with pytest.raises(LocalProtocolError, match="belongs to the link layer"):
        client.send_message({"type": "ping", "id": 1})
    assert client.state is LinkState.ESTABLISHED


def test_the_handshake_times_out(nodes):
    server, client = start(nodes, now=100.0)
    assert server.next_deadline() == client.next_deadline() == 110.0
    server.tick(109.9)
    with pytest.raises(HandshakeTimeout, match="10.0s"):
        server.tick(110.0)
    assert frames_of(server.data_to_send())[-1]["type"] == "close"
    assert server.next_deadline() is None


# --- established ----------------------------------------------------------------------------


def test_application_messages_flow_both_ways_in_order(nodes):
    server, client = establish(nodes)
    for n in range(3):
        client.send_message({"type": "changes", "seq": n, "blob": bytes([n])})
    server.send_message({"type": "revs_diff", "ids": ["a", "b"]})
    expected = [ApplicationMessage({"type": "changes", "seq": n, "blob": bytes([n])}) for n in range(3)]
    assert move(client, server) == expected
    assert move(server, client) == [ApplicationMessage({"type": "revs_diff", "ids": ["a", "b"]})]


def test_an_unsendable_message_queues_nothing(nodes):
    _, client = establish(nodes)
    client.data_to_send()
    with pytest.raises(FrameTooLarge):
        client.send_message({"type": "big", "blob": b"x" * (CONFIG.max_frame_size + 1)})
    assert client.pending_output == 0 and client.state is LinkState.ESTABLISHED


def test_link_messages_out_of_place_are_protocol_errors(nodes):
    server, client = establish(nodes)
    server.receive_data(encode({"type": "hello", "version": 1}), 0)
    with pytest.raises(RemoteProtocolError, match="unexpected 'hello'"):
        server.next_event()


def test_orderly_close_delivers_earlier_messages_then_the_reason(nodes):
    server, client = establish(nodes)
    client.send_message({"type": "last"})
    client.close("shutting down")
    with pytest.raises(LocalProtocolError, match="closed"):
        client.send_message({"type": "more"})
    assert move(client, server) == [ApplicationMessage({"type": "last"}), PeerClosed("shutting down")]
    assert server.state is LinkState.CLOSED
    server.receive_data(encode({"type": "late"}), 0)  # ignored once closed
    assert server.next_event() is None


def test_a_bad_frame_closes_the_link_with_the_frame_error_as_cause(nodes):
    server, client = establish(nodes)
    server.receive_data(b"\x01\xff\xff\xff\xff", 0)  # a 4 GiB frame header
    with pytest.raises(RemoteProtocolError, match="over the cap") as raised:
        server.next_event()
    assert isinstance(raised.value.__cause__, FrameTooLarge)
    [close] = frames_of(server.data_to_send())
    assert close["type"] == "close" and "over the cap" in close["reason"]
    server, client = establish(nodes)
    server.receive_data(b"\x01\x00\x00\x00\x01\xc1", 0)
    with pytest.raises(RemoteProtocolError) as raised:
        server.next_event()
    assert isinstance(raised.value.__cause__, InvalidMsgpack)


def test_end_of_stream_without_close_is_connection_lost(nodes):
    server, client = establish(nodes)
    server.receive_data(b"", 0)
    with pytest.raises(ConnectionLost, match="without closing"):
        server.next_event()
    server, client = establish(nodes)
    server.receive_data(encode({"type": "t"})[:4], 0)
    server.receive_data(b"", 0)
    with pytest.raises(ConnectionLost, match="middle of a frame"):
        server.next_event()


# --- keepalive ------------------------------------------------------------------------------


def test_pings_measure_round_trip_time(nodes):
    server, client = establish(nodes, now=0.0)
    assert client.next_deadline() == 0.0  # a first ping is due at once
    client.tick(0.0)
    [ping] = frames_of(client.data_to_send())
    assert ping["type"] == "ping"
    server.receive_data(encode(ping), 0.01)
    assert server.next_event() is None
    [pong] = frames_of(server.data_to_send())
    assert pong == {"type": "pong", "id": ping["id"]}
    client.receive_data(encode(pong), 0.25)
    assert client.next_event() is None
    assert client.rtt == pytest.approx(0.25)
    # The next ping comes one interval after the last; a second sample is smoothed in.
    assert client.next_deadline() == pytest.approx(5.0)
    client.tick(5.0)
    [ping] = frames_of(client.data_to_send())
    client.receive_data(encode({"type": "pong", "id": ping["id"]}), 5.05)
    client.next_event()
    assert client.rtt == pytest.approx(0.875 * 0.25 + 0.125 * 0.05)


def test_only_one_ping_is_outstanding_and_stray_pongs_are_ignored(nodes):
    _, client = establish(nodes)
    client.tick(0.0)
    client.data_to_send()
    client.tick(6.0)  # past the interval, but the first ping is unanswered
    assert client.pending_output == 0
    client.receive_data(encode({"type": "pong", "id": 999}), 6.5)
    assert client.next_event() is None and client.rtt is None


def test_a_silent_peer_is_declared_dead(nodes):
    _, client = establish(nodes)
    client.tick(0.0)
    client.tick(19.9)
    assert client.next_deadline() == 20.0
    with pytest.raises(PeerUnresponsive, match="nothing received"):
        client.tick(20.0)
    assert frames_of(client.data_to_send())[-1]["type"] == "close"


def test_any_bytes_received_keep_the_peer_alive(nodes):
    server, client = establish(nodes)
    client.tick(0.0)
    client.data_to_send()
    server.send_message({"type": "big", "blob": b"z" * 100})
    partial = server.data_to_send()[:50]  # even part of a frame shows the peer is there
    client.receive_data(partial, 15.0)
    assert client.next_event() is None
    client.tick(30.0)
    assert client.next_deadline() == 35.0
    with pytest.raises(PeerUnresponsive):
        client.tick(35.0)


def test_a_ping_with_a_bad_id_is_a_protocol_error(nodes):
    server, _ = establish(nodes)
    server.receive_data(encode({"type": "ping", "id": "one"}), 0)
    with pytest.raises(RemoteProtocolError, match="id must be an int"):
        server.next_event()


# --- fuzzing and construction ---------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_garbage_at_any_stage_raises_link_errors_only(garbage, after_handshake):
    nodes = make_node("server"), make_node("client")
    server, client = establish(nodes) if after_handshake else start(nodes)
    for link in (server, client):
        link.data_to_send()
        link.receive_data(garbage, 1.0)
        try:
            while (event := link.next_event()) is not None and not isinstance(event, ProofRequested):
                pass
        except LinkError:
            assert link.state is LinkState.CLOSED


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["version", "node_id", "name", "addresses", "public_key", "signature", "nonce"]),
                       st.none() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5) | st.binary(max_size=40)
                       | st.lists(st.integers(0, 9), max_size=3)))
def test_arbitrary_hellos_raise_link_errors_only(fields):
    nodes = make_node("server"), make_node("client")
    for link in start(nodes):
        link.data_to_send()
        link.receive_data(encode({**fields, "type": "hello"}), 0)
        with pytest.raises(LinkError):
            link.next_event()


def test_node_id_is_the_sha256_of_the_raw_public_key_as_the_token_defines_it():
    from plugshare.token import fingerprint_of

    _, node = make_node("n")
    assert node.node_id == node_id(node.public_key) == hashlib.sha256(node.public_key).digest()
    assert node_id(node.public_key) == fingerprint_of(node.public_key)
    with pytest.raises(ValueError, match="32 bytes"):
        node_id(b"short")


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        ({"public_key": b"x" * 31}, "32 bytes"),
        ({"addresses": "10.0.0.1:7000"}, "sequence of str"),
        ({"name": "n" * 300}, "node name"),
    ],
)
def test_local_node_refuses_bad_values(kwargs, problem):
    values = {"public_key": b"k" * 32, "name": "n", **kwargs}
    with pytest.raises(ValueError, match=problem):
        LocalNode(**values)


def test_the_connecting_side_needs_a_pinned_id_and_no_signer():
    _, node = make_node("n")
    with pytest.raises(TypeError):
        LocalNode(node.public_key, "n", sign=lambda data: b"")  # the key stays in the token
    assert Link.connecting(node, pinned_peer_id=bytes(32), now=0).state is LinkState.AWAIT_HELLO
    with pytest.raises(ValueError, match="32 bytes"):
        Link.connecting(node, pinned_peer_id=b"short", now=0)


def test_link_config_refuses_a_dead_time_shorter_than_the_ping_interval():
    with pytest.raises(ValueError, match="dead_after"):
        LinkConfig(ping_interval=10, dead_after=5)


def test_a_close_reason_that_is_not_text_is_a_protocol_error(nodes):
    server, _ = establish(nodes)
    server.receive_data(encode({"type": "close", "reason": 5}), 0)
    with pytest.raises(RemoteProtocolError, match="close reason"):
        server.next_event()


def test_hello_extra_fields_are_ignored_for_forward_compatibility(nodes):
    server, client = start(nodes)
    [hello] = frames_of(server.data_to_send())
    client.receive_data(encode({**hello, "features": ["future"]}), 0)
    request = client.next_event()
    assert isinstance(request, ProofRequested) and client.state is LinkState.AWAIT_PROOF
    client.send_proof(prove(client, request))
    assert msgpack.unpackb(client.data_to_send()[5:])["type"] == "hello"
