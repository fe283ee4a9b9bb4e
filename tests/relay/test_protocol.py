"""The relay protocol, sans-I/O: framing, validation, and who may send what when."""

import struct

import msgpack
import pytest

from plugshare.relay.protocol import (
    MAX_FRAME_SIZE,
    RELAY_VERSION,
    Challenge,
    Connect,
    Conversation,
    Decoder,
    FrameTooLarge,
    Invitation,
    Join,
    Joined,
    MalformedMessage,
    Ping,
    Ready,
    Refused,
    Session,
    SessionGranted,
    UnexpectedMessage,
    UnknownVersion,
    encode,
    join_payload,
)

KEY = bytes(range(32))


def frame(body: bytes, version: int = RELAY_VERSION) -> bytes:
    return struct.pack(">BH", version, len(body)) + body


def decode_all(data: bytes) -> list:
    decoder = Decoder()
    decoder.feed(data)
    out = []
    while (message := decoder.next_message()) is not None:
        out.append(message)
    return out


def test_every_message_round_trips_byte_by_byte():
    messages = [Challenge(nonce=KEY), Join(certificate=b"c" * 500, signature=b"s" * 64), Joined(),
                Connect(node_id=KEY), SessionGranted(session_key=KEY), Invitation(session_key=KEY),
                Session(session_key=KEY), Ready(), Refused(code="over_quota", reason="too many"), Ping()]
    data = b"".join(encode(m) for m in messages)
    decoder = Decoder()
    out = []
    for i in range(len(data)):
        decoder.feed(data[i:i + 1])
        while (message := decoder.next_message()) is not None:
            out.append(message)
    assert out == messages


def test_bytes_after_a_message_are_handed_back():
    decoder = Decoder()
    decoder.feed(encode(Ready()) + b"\x16\x03\x01tls")
    assert decoder.next_message() == Ready()
    assert decoder.rest() == b"\x16\x03\x01tls"


@pytest.mark.parametrize("data, error, match", [
    (frame(b"\xc1"), MalformedMessage, "not msgpack"),
    (frame(msgpack.packb([1, 2])), MalformedMessage, "is a map"),
    (frame(msgpack.packb({"type": "teleport"})), MalformedMessage, "unknown message type"),
    (frame(msgpack.packb({"type": "connect"})), MalformedMessage, "has fields"),
    (frame(msgpack.packb({"type": "connect", "node_id": b"short"})), MalformedMessage, "32 bytes"),
    (frame(msgpack.packb({"type": "connect", "node_id": "x" * 32})), MalformedMessage, "32 bytes"),
    (frame(msgpack.packb({"type": "ready", "extra": 1})), MalformedMessage, "has fields"),
    (frame(msgpack.packb({"type": "refused", "code": 7, "reason": "x"})), MalformedMessage, "code"),
    (frame(b"\xd4\x05\x00"), MalformedMessage, "extension"),
    (frame(msgpack.packb({"type": "ready"}), version=2), UnknownVersion, "version 2"),
    (struct.pack(">BH", RELAY_VERSION, MAX_FRAME_SIZE + 1), FrameTooLarge, "over the cap"),
])
def test_bad_frames_are_clear_errors_and_stay_failed(data, error, match):
    decoder = Decoder()
    decoder.feed(data)
    with pytest.raises(error, match=match):
        decoder.next_message()
    with pytest.raises(error):  # sticky: the frame boundaries are lost
        decoder.feed(encode(Ready()))


def test_an_oversize_frame_is_refused_from_its_header_alone():
    decoder = Decoder()
    decoder.feed(struct.pack(">BH", RELAY_VERSION, 65535))  # no body at all yet
    with pytest.raises(FrameTooLarge):
        decoder.next_message()


def test_a_join_flow_from_both_sides():
    relay, node = Conversation("relay-control"), Conversation("joiner")
    node.receive_data(relay.send(Challenge(nonce=KEY)))
    assert node.next_message() == Challenge(nonce=KEY)
    relay.receive_data(node.send(Join(certificate=b"c", signature=b"s")))
    assert isinstance(relay.next_message(), Join)
    node.receive_data(relay.send(Joined()) + relay.send(Invitation(session_key=KEY)) + relay.send(Ping()))
    assert [node.next_message() for _ in range(3)] == [Joined(), Invitation(session_key=KEY), Ping()]


def test_a_dial_and_a_session():
    relay, dialer = Conversation("relay-control"), Conversation("dialer")
    dialer.receive_data(relay.send(Challenge(nonce=KEY)))
    dialer.next_message()
    relay.receive_data(dialer.send(Connect(node_id=KEY)))
    assert relay.next_message() == Connect(node_id=KEY)
    dialer.receive_data(relay.send(SessionGranted(session_key=KEY)))
    assert dialer.next_message() == SessionGranted(session_key=KEY)
    relay_side, node_side = Conversation("relay-session"), Conversation("session")
    relay_side.receive_data(node_side.send(Session(session_key=KEY)))
    assert relay_side.next_message() == Session(session_key=KEY)
    node_side.receive_data(relay_side.send(Ready()))
    assert node_side.next_message() == Ready()


@pytest.mark.parametrize("role, messages", [
    ("relay-control", [Connect(node_id=KEY), Connect(node_id=KEY)]),  # one request per connection
    ("relay-control", [Ping()]),  # before joining
    ("relay-control", [Session(session_key=KEY)]),  # a session key on a control connection
    ("relay-session", [Join(certificate=b"c", signature=b"s")]),
    ("joiner", [Invitation(session_key=KEY)]),  # before the challenge
    ("dialer", [Challenge(nonce=KEY), Invitation(session_key=KEY)]),  # a dialer is not joined
    ("session", [Ready()]),  # before presenting a key
])
def test_out_of_order_messages_are_refused(role, messages):
    conversation = Conversation(role)
    if role == "session":
        pass  # nothing sent yet: Ready cannot come
    conversation.receive_data(b"".join(encode(m) for m in messages))
    with pytest.raises(UnexpectedMessage, match="out of order"):
        for _ in messages:
            conversation.next_message()


def test_a_side_cannot_send_out_of_turn():
    with pytest.raises(UnexpectedMessage):
        Conversation("dialer").send(Connect(node_id=KEY))  # before the challenge
    with pytest.raises(UnexpectedMessage):
        Conversation("relay-control").send(Invitation(session_key=KEY))  # nobody joined


def test_a_refusal_ends_a_clients_conversation_in_any_state():
    node = Conversation("joiner")
    node.receive_data(encode(Refused(code="over_quota", reason="too many connections")))
    assert node.next_message() == Refused(code="over_quota", reason="too many connections")
    assert node.state == "closed"


def test_the_join_payload_is_fixed_size_and_domain_separated():
    payload = join_payload(KEY, KEY, KEY)
    assert payload.startswith(b"plugshare relay join v1\x00") and len(payload) == 24 + 96
    with pytest.raises(ValueError):
        join_payload(KEY, b"short", KEY)
