"""Frames: length-prefixed, versioned, size-capped msgpack messages (no sockets)."""

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugshare.replication.frames import (
    DEFAULT_MAX_FRAME_SIZE,
    FRAME_VERSION,
    HEADER_SIZE,
    FrameDecoder,
    FrameError,
    FrameTooLarge,
    InvalidMessage,
    InvalidMsgpack,
    UnknownFrameVersion,
    encode,
)


def frame(body: bytes, *, version: int = FRAME_VERSION, length: int | None = None) -> bytes:
    return struct.pack(">BI", version, len(body) if length is None else length) + body


def decode_all(data: bytes, **kwargs) -> list:
    decoder = FrameDecoder(**kwargs)
    decoder.feed(data)
    return list(decoder)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
messages = st.builds(
    lambda message_type, fields: {**fields, "type": message_type},
    st.text(min_size=1, max_size=20),
    st.dictionaries(st.text(max_size=10), msgpack_values, max_size=5),
)


def test_a_message_round_trips_with_binary_kept_as_bytes_and_text_as_str():
    message = {"type": "docs", "blob": b"\x00\xff", "name": "été", "nested": {"list": [1, -2, 3.5, None, True]}}
    data = encode(message)
    assert data[0] == FRAME_VERSION
    assert struct.unpack(">I", data[1:HEADER_SIZE])[0] == len(data) - HEADER_SIZE
    [decoded] = decode_all(data)
    assert decoded == message
    assert type(decoded["blob"]) is bytes and type(decoded["name"]) is str


def test_messages_fed_one_byte_at_a_time_come_out_whole_and_in_order():
    sent = [{"type": "a", "n": n, "pad": b"x" * n} for n in range(20)]
    decoder = FrameDecoder()
    received = []
    for byte in b"".join(encode(message) for message in sent):
        decoder.feed(bytes([byte]))
        received.extend(decoder)
    assert received == sent
    assert decoder.buffered == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(messages, max_size=6), st.data())
def test_any_messages_round_trip_through_any_chunking(sent, data):
    stream = b"".join(encode(message) for message in sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder = FrameDecoder()
    received = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)]):
        decoder.feed(stream[start:end])
        received.extend(decoder)
    assert received == sent


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=64))
def test_arbitrary_bytes_yield_messages_or_frame_errors_only(garbage, cap):
    decoder = FrameDecoder(max_frame_size=cap)
    decoder.feed(garbage)
    try:
        for message in decoder:
            assert isinstance(message, dict) and isinstance(message["type"], str)
    except FrameError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bodies_behind_a_valid_header_decode_or_raise_frame_errors(body):
    try:
        messages_out = decode_all(frame(body))
    except FrameError:
        return
    assert len(messages_out) == 1 and isinstance(messages_out[0]["type"], str)


def test_an_oversized_frame_is_refused_from_its_header_alone():
    decoder = FrameDecoder(max_frame_size=1000)
    decoder.feed(struct.pack(">BI", FRAME_VERSION, 1001))  # the header, and no body at all
    with pytest.raises(FrameTooLarge, match="1001 bytes is over the cap of 1000"):
        decoder.next_message()


def test_a_frame_exactly_at_the_cap_is_accepted():
    message = {"type": "t", "pad": b""}
    body_size = len(encode(message)) - HEADER_SIZE
    assert decode_all(encode(message), max_frame_size=body_size) == [message]
    with pytest.raises(FrameTooLarge):
        decode_all(encode(message), max_frame_size=body_size - 1)


def test_the_default_cap_is_16_mib():
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">BI", FRAME_VERSION, DEFAULT_MAX_FRAME_SIZE + 1))
    with pytest.raises(FrameTooLarge):
        decoder.next_message()


def test_encode_refuses_a_message_over_the_cap():
    with pytest.raises(FrameTooLarge, match="over the cap of 100"):
        encode({"type": "big", "blob": b"x" * 200}, max_frame_size=100)


def test_an_unknown_frame_version_is_refused():
    body = msgpack.packb({"type": "t"})
    with pytest.raises(UnknownFrameVersion, match="version 2 is not supported"):
        decode_all(frame(body, version=2))


@pytest.mark.parametrize(
    "body",
    [
        b"",  # nothing
        b"\xc1",  # a reserved, never-used msgpack byte
        msgpack.packb({"type": "t"}) + b"\x00",  # trailing bytes after the value
        b"\x81\xa4type\xa2\xff\xfe",  # a str that is not UTF-8
        b"\x81\x01\xa1t",  # an int map key (strict_map_key)
        msgpack.packb({"type": "t", "x": msgpack.ExtType(5, b"data")}),  # an extension type
        b"\xdd\xff\xff\xff\xff",  # an array claiming 4 billion items in 5 bytes
        b"\x91" * 5000 + b"\xc0",  # nesting deeper than the unpacker's stack
    ],
)
def test_bodies_that_are_not_safe_msgpack_are_refused(body):
    with pytest.raises(InvalidMsgpack):
        decode_all(frame(body))


@pytest.mark.parametrize(
    "value",
    [[1, 2], "type", 7, {"kind": "t"}, {"type": 3}, {"type": ""}, {"type": b"bytes"}],
)
def test_values_that_are_not_messages_are_refused(value):
    with pytest.raises(InvalidMessage):
        decode_all(frame(msgpack.packb(value, use_bin_type=True)))


@pytest.mark.parametrize(
    "value", [["t"], {"kind": "t"}, {"type": None}, {"type": "t", "x": object()}, {"type": "t", "x": 2**70}]
)
def test_encode_refuses_what_is_not_a_packable_message(value):
    with pytest.raises(InvalidMessage):
        encode(value)


def test_a_decoder_stays_failed_after_an_error():
    decoder = FrameDecoder()
    decoder.feed(frame(b"\xc1"))
    with pytest.raises(InvalidMsgpack) as first:
        decoder.next_message()
    with pytest.raises(InvalidMsgpack) as again:
        decoder.next_message()
    assert again.value is first.value
    with pytest.raises(InvalidMsgpack):
        decoder.feed(encode({"type": "t"}))


def test_partial_frames_wait_for_more_bytes():
    data = encode({"type": "t", "blob": b"y" * 100})
    decoder = FrameDecoder()
    decoder.feed(data[:3])
    assert decoder.next_message() is None
    decoder.feed(data[3:50])
    assert decoder.next_message() is None
    assert decoder.buffered == 50 - HEADER_SIZE
    decoder.feed(data[50:])
    assert decoder.next_message() == {"type": "t", "blob": b"y" * 100}


@pytest.mark.parametrize("cap", [0, -1, 2**32])
def test_a_nonsensical_cap_is_refused(cap):
    with pytest.raises(ValueError, match="max_frame_size"):
        FrameDecoder(max_frame_size=cap)
