"""The token protocol codec: round trips, every class of malformed input, and property tests
that no input makes the decoder raise anything but WireError (or hang)."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugshare.errors import PlugshareError
from plugshare.token import errors as token_errors
from plugshare.token.shares import InvitationRefused, LeaveRequestRefused
from plugshare.token.wire import (
    MAX_FRAME,
    MAX_ID,
    PROTOCOL_VERSION,
    CommandError,
    Decoder,
    Request,
    Response,
    TokenUnavailable,
    WireError,
    encode_error,
    encode_request,
    encode_result,
    error_from,
    error_kind,
)


def frame(value: object) -> bytes:
    body = msgpack.packb(value, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def decode_all(expect: str, data: bytes, **kw) -> list:
    decoder = Decoder(expect, **kw)
    decoder.feed(data)
    out = []
    while (message := decoder.next_message()) is not None:
        out.append(message)
    return out


def refused(expect: str, data: bytes, match: str, **kw) -> Decoder:
    decoder = Decoder(expect, **kw)
    decoder.feed(data)
    with pytest.raises(WireError, match=match):
        decoder.next_message()
    return decoder


# --- round trips -------------------------------------------------------------------------

ARGS = {"s": "é", "b": b"\x00\xff", "n": -3, "f": 1.5, "l": [1, None, True], "m": {"k": {"x": 1}}}


def test_request_round_trip() -> None:
    assert decode_all("request", encode_request(7, "decide", ARGS)) == [Request(7, "decide", ARGS)]


def test_result_and_error_round_trip() -> None:
    data = encode_result(1, ARGS) + encode_result(2, None) + encode_error(3, "not_found", "no app x")
    assert decode_all("response", data) == [
        Response(1, True, ARGS),
        Response(2, True, None),
        Response(3, False, None, "not_found", "no app x"),
    ]


def test_request_carries_protocol_version() -> None:
    body = msgpack.unpackb(encode_request(1, "x", {})[4:])
    assert body == {"v": PROTOCOL_VERSION, "id": 1, "cmd": "x", "args": {}}


def test_bytes_stay_bytes_and_str_stays_str() -> None:
    [message] = decode_all("response", encode_result(1, [b"ab", "ab"]))
    assert message.result == [b"ab", "ab"]
    assert type(message.result[0]) is bytes and type(message.result[1]) is str


def test_frames_fed_byte_by_byte() -> None:
    data = encode_request(1, "a", {"x": 1}) + encode_request(2, "b", {}) + encode_request(3, "c", ARGS)
    decoder = Decoder("request")
    out = []
    for i in range(len(data)):
        decoder.feed(data[i : i + 1])
        while (message := decoder.next_message()) is not None:
            out.append(message)
    assert [m.id for m in out] == [1, 2, 3]
    assert decoder.buffered == 0


def test_merged_frames_in_one_feed_and_split_across_feeds() -> None:
    data = b"".join(encode_result(i, i * "x") for i in range(1, 50))
    decoder = Decoder("response")
    out = []
    for chunk in (data[:5], data[5:333], data[333:]):
        decoder.feed(chunk)
        while (message := decoder.next_message()) is not None:
            out.append(message.result)
    assert out == [i * "x" for i in range(1, 50)]


def test_incomplete_frame_returns_none() -> None:
    data = encode_request(1, "a", {})
    decoder = Decoder("request")
    decoder.feed(data[:-1])
    assert decoder.next_message() is None
    assert decoder.next_message() is None
    decoder.feed(data[-1:])
    assert decoder.next_message() == Request(1, "a", {})


def test_default_cap_is_64_mib() -> None:
    assert MAX_FRAME == 64 * 1024 * 1024
    assert Decoder("request").max_frame == MAX_FRAME


def test_id_bounds_are_accepted() -> None:
    assert decode_all("request", encode_request(MAX_ID, "a", {}))[0].id == MAX_ID
    assert decode_all("response", encode_error(0, "bad_request", "x"))[0].id == 0


# --- encoding refusals -------------------------------------------------------------------


@pytest.mark.parametrize(
    "id, cmd, args",
    [
        (0, "a", {}),  # 0 is the server's connection-level id
        (-1, "a", {}),
        (MAX_ID + 1, "a", {}),
        (True, "a", {}),
        ("1", "a", {}),
        (1, "", {}),
        (1, b"a", {}),
        (1, "x" * 257, {}),
        (1, "a", []),
        (1, "a", {1: 2}),
        (1, "a", {"x": object()}),
    ],
)
def test_encode_request_refuses(id, cmd, args) -> None:
    with pytest.raises(WireError):
        encode_request(id, cmd, args)


def test_encode_refuses_over_the_cap() -> None:
    with pytest.raises(WireError, match="over the frame cap"):
        encode_result(1, b"x" * 100, max_frame=50)
    with pytest.raises(WireError, match="over the frame cap"):
        encode_request(1, "a", {"x": b"x" * 100}, max_frame=50)


def test_encode_result_refuses_unpackable() -> None:
    with pytest.raises(WireError, match="cannot be packed"):
        encode_result(1, {1, 2})


def test_wire_error_is_a_plugshare_error() -> None:
    assert issubclass(WireError, PlugshareError)


# --- malformed input ---------------------------------------------------------------------

GOOD_REQUEST = {"v": 1, "id": 1, "cmd": "a", "args": {}}


@pytest.mark.parametrize(
    "value, match",
    [
        ([1, 2], "must be a map"),
        ("x", "must be a map"),
        ({b"v": 1, "id": 1, "cmd": "a", "args": {}}, "keys must be str"),
        ({"id": 1, "cmd": "a", "args": {}}, "missing \\['v'\\]"),
        ({"v": 1, "cmd": "a", "args": {}}, "missing \\['id'\\]"),
        ({"v": 1, "id": 1, "args": {}}, "missing \\['cmd'\\]"),
        ({"v": 1, "id": 1, "cmd": "a"}, "missing \\['args'\\]"),
        ({**GOOD_REQUEST, "extra": 1}, "unexpected \\['extra'\\]"),
        ({**GOOD_REQUEST, "v": 2}, "version 2 is not supported"),
        ({**GOOD_REQUEST, "v": "1"}, "version '1' is not supported"),
        ({**GOOD_REQUEST, "v": True}, "version True is not supported"),
        ({**GOOD_REQUEST, "id": -1}, "out of range"),
        ({**GOOD_REQUEST, "id": 0}, "out of range"),
        ({**GOOD_REQUEST, "id": 2**64 - 1}, "out of range"),
        ({**GOOD_REQUEST, "id": 1.0}, "must be an int"),
        ({**GOOD_REQUEST, "id": None}, "must be an int"),
        ({**GOOD_REQUEST, "cmd": 3}, "cmd must be a str"),
        ({**GOOD_REQUEST, "cmd": b"a"}, "cmd must be a str"),
        ({**GOOD_REQUEST, "cmd": ""}, "cmd must be 1..256"),
        ({**GOOD_REQUEST, "args": [1]}, "args must be a map"),
        ({**GOOD_REQUEST, "args": None}, "args must be a map"),
        ({**GOOD_REQUEST, "args": {1: "x"}}, "map key"),  # refused by msgpack itself
        ({**GOOD_REQUEST, "args": {b"k": "x"}}, "args keys must be str"),
    ],
)
def test_malformed_requests(value, match) -> None:
    refused("request", frame(value), match)


@pytest.mark.parametrize(
    "value, match",
    [
        ({"id": 1}, "one of ok/err"),
        ({"id": 1, "ok": 1, "err": {"kind": "x", "reason": "y"}}, "one of ok/err"),
        ({"ok": 1, "x": 2}, "one of ok/err"),
        ({"id": -5, "ok": 1}, "out of range"),
        ({"id": "1", "ok": 1}, "must be an int"),
        ({"id": 1, "err": "boom"}, "err must be a map"),
        ({"id": 1, "err": {"kind": "x"}}, "err must be a map"),
        ({"id": 1, "err": {"kind": 1, "reason": "y"}}, "must be str"),
        ({"id": 1, "err": {"kind": "x", "reason": None}}, "must be str"),
        (GOOD_REQUEST, "one of ok/err"),  # a request is not an answer
    ],
)
def test_malformed_responses(value, match) -> None:
    refused("response", frame(value), match)


def test_a_response_is_not_a_request() -> None:
    refused("request", encode_result(1, None), "a request has fields")


def test_zero_length_frame() -> None:
    refused("request", b"\x00\x00\x00\x00", "length 0")


def test_oversized_frame_is_refused_from_the_header_alone() -> None:
    decoder = Decoder("request", max_frame=1000)
    decoder.feed(struct.pack(">I", 1001))  # only the header: nothing else is buffered
    with pytest.raises(WireError, match="1001 bytes is over the cap of 1000"):
        decoder.next_message()
    refused("request", b"\xff\xff\xff\xff", "over the cap")  # default cap


def test_bad_msgpack() -> None:
    refused("request", struct.pack(">I", 1) + b"\xc1", "not valid msgpack")  # 0xc1: never used
    refused("request", struct.pack(">I", 2) + b"\x92\x01", "not valid msgpack")  # truncated array


def test_trailing_bytes_inside_a_frame() -> None:
    body = msgpack.packb(GOOD_REQUEST) + b"\x00"
    refused("request", struct.pack(">I", len(body)) + body, "not valid msgpack")


def test_invalid_utf8_string() -> None:
    body = b"\x84\xa1v\x01\xa2id\x01\xa3cmd\xa2\xff\xfe\xa4args\x80"
    refused("request", struct.pack(">I", len(body)) + body, "not valid msgpack")


def test_extension_types_are_refused() -> None:
    body = msgpack.packb({**GOOD_REQUEST, "args": {"x": msgpack.ExtType(5, b"abc")}})
    refused("request", struct.pack(">I", len(body)) + body, "extension type 5")


def test_deep_nesting_is_refused_not_a_crash() -> None:
    body = b"\x91" * 5000 + b"\x01"
    data = struct.pack(">I", len(body) + 20) + b"\x84\xa1v\x01\xa2id\x01\xa3cmd\xa1a\xa4args\x81\xa1x" + body
    with pytest.raises(WireError):
        decode_all("request", data[: 4 + len(body) + 20])


def test_errors_are_sticky() -> None:
    decoder = refused("request", frame([1]) + encode_request(1, "a", {}), "must be a map")
    with pytest.raises(WireError, match="must be a map"):
        decoder.next_message()
    with pytest.raises(WireError, match="must be a map"):
        decoder.feed(encode_request(2, "b", {}))
    assert decoder.buffered == 0


def test_decoder_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        Decoder("answer")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Decoder("request", max_frame=0)


# --- error kinds -------------------------------------------------------------------------

TOKEN_ERRORS = [
    token_errors.TokenError,
    token_errors.TokenStateError,
    token_errors.RollbackError,
    token_errors.TokenBusyError,
    token_errors.KeystoreError,
    token_errors.WrongSecretError,
    token_errors.AuthenticationError,
    token_errors.InvalidArgument,
    token_errors.RuleError,
    token_errors.InvalidNodeIdError,
    token_errors.NotFound,
    token_errors.AlreadyExists,
    token_errors.IntegrityError,
    InvitationRefused,
    LeaveRequestRefused,
    TokenUnavailable,
    CommandError,
]


@pytest.mark.parametrize("cls", TOKEN_ERRORS, ids=lambda c: c.__name__)
def test_error_kinds_round_trip(cls) -> None:
    kind = error_kind(cls("why it failed"))
    again = error_from(kind, "why it failed")
    assert type(again) is cls
    assert str(again) == "why it failed"
    assert len({error_kind(c("x")) for c in TOKEN_ERRORS}) == len(TOKEN_ERRORS)


def test_access_denied_round_trip() -> None:
    exc = token_errors.AccessDenied(object(), "app x may not write doctype y")
    again = error_from(error_kind(exc), str(exc))
    assert type(again) is token_errors.AccessDenied
    assert again.decision is None and str(again) == "app x may not write doctype y"


def test_subclass_maps_to_nearest_known_kind() -> None:
    class NewRefusal(token_errors.NotFound):
        pass

    assert error_kind(NewRefusal("x")) == "not_found"


def test_unexpected_exceptions_are_internal_and_wire_errors_bad_request() -> None:
    assert error_kind(RuntimeError("boom")) == "internal"
    assert error_kind(KeyError("k")) == "internal"
    assert error_kind(WireError("x")) == "bad_request"
    assert type(error_from("internal", "r")) is CommandError
    assert type(error_from("bad_request", "r")) is WireError


def test_unknown_kind_is_a_plain_token_error() -> None:
    exc = error_from("from_the_future", "something new")
    assert type(exc) is token_errors.TokenError and str(exc) == "something new"


def test_token_unavailable_http_mapping() -> None:
    assert TokenUnavailable.status == 503 and TokenUnavailable.error == "token_unavailable"
    assert issubclass(TokenUnavailable, token_errors.TokenError)


# --- property tests ----------------------------------------------------------------------


def drain(decoder: Decoder, data: bytes, step: int) -> None:
    """Feed `data` in `step`-byte pieces, taking every message; only WireError may escape."""
    for i in range(0, len(data), step):
        decoder.feed(data[i : i + step])
        for _ in range(len(data) + 1):  # bounded: a bug cannot hang the test
            message = decoder.next_message()
            if message is None:
                break
            assert isinstance(message, (Request, Response))


def decodes_or_refuses(expect: str, data: bytes, step: int) -> None:
    decoder = Decoder(expect, max_frame=4096)
    try:
        drain(decoder, data, step)
    except WireError:
        with pytest.raises(WireError):  # and stays broken
            decoder.next_message()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(["request", "response"]), st.integers(1, 40))
def test_random_bytes(data: bytes, expect: str, step: int) -> None:
    decodes_or_refuses(expect, data, step)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def valid_frames(draw) -> tuple[str, bytes]:
    if draw(st.booleans()):
        args = draw(st.dictionaries(st.text(max_size=6), msgpack_values, max_size=4))
        return "request", encode_request(draw(st.integers(1, MAX_ID)), draw(st.text(min_size=1, max_size=10)), args)
    id = draw(st.integers(0, MAX_ID))
    if draw(st.booleans()):
        return "response", encode_result(id, draw(msgpack_values))
    return "response", encode_error(id, draw(st.text(max_size=10)), draw(st.text(max_size=20)))


@settings(max_examples=300, deadline=None)
@given(valid_frames(), st.integers(1, 16))
def test_valid_frames_decode_in_any_split(frame_: tuple[str, bytes], step: int) -> None:
    expect, data = frame_
    decoder = Decoder(expect)
    out = []
    for i in range(0, len(data), step):
        decoder.feed(data[i : i + step])
        if (message := decoder.next_message()) is not None:
            out.append(message)
    assert len(out) == 1 and decoder.buffered == 0


@settings(max_examples=300, deadline=None)
@given(valid_frames(), st.data())
def test_truncated_frames(frame_: tuple[str, bytes], data: st.DataObject) -> None:
    expect, raw = frame_
    cut = data.draw(st.integers(0, len(raw) - 1))
    decoder = Decoder(expect)
    decoder.feed(raw[:cut])
    try:
        assert decoder.next_message() is None  # incomplete: never a message
    except WireError:
        pass


@settings(max_examples=500, deadline=None)
@given(valid_frames(), st.data(), st.integers(1, 32))
def test_mutated_frames(frame_: tuple[str, bytes], data: st.DataObject, step: int) -> None:
    expect, raw = frame_
    mutated = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(mutated) - 1))
        mutated[at] = data.draw(st.integers(0, 255))
    tail = data.draw(st.binary(max_size=20))
    decodes_or_refuses(expect, bytes(mutated) + tail, step)
