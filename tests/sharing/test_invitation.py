"""Invitation codes: round trips, refusal of every typo and truncation, field validation, the
stored secret digest, and validity durations."""

from __future__ import annotations

import base64
import random
import re

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from plugshare.sharing.invitation import (
    PREFIX,
    Invitation,
    InvitationError,
    InvitationExpired,
    InvalidTtl,
    _checksum,
    decode,
    matches,
    parse_ttl,
    secret_digest,
)
from plugshare.sharing.manifest import new_share_id
from plugshare.token.identity import Identity

OWNER = Identity.generate()
CODE_CHARS = re.compile(r"plugshare1:[A-Za-z0-9_-]+")


def invitation(addresses=(("192.168.1.20", 7415),), **kw) -> Invitation:
    return Invitation.new(
        kw.pop("owner", OWNER.fingerprint),
        addresses,
        kw.pop("share_id", new_share_id()),
        kw.pop("permission", "write"),
        kw.pop("ttl", 3600),
        **kw,
    )


def code_around(fields: list) -> str:
    """A code with a valid checksum around arbitrary content (what a buggy or hostile encoder
    could produce)."""
    payload = msgpack.packb(fields, use_bin_type=True)
    return PREFIX + base64.urlsafe_b64encode(payload + _checksum(payload)).decode().rstrip("=")


# --- round trips ---------------------------------------------------------------------------


def test_a_typical_code_is_one_short_url_safe_line_that_decodes_to_the_same_invitation() -> None:
    inv = invitation()
    code = inv.encode()
    assert CODE_CHARS.fullmatch(code)
    assert len(code) < 160
    assert decode(code) == inv and Invitation.decode(code).secret == inv.secret


def test_ipv6_and_host_name_addresses_and_a_long_secret_round_trip() -> None:
    addresses = [
        ("10.0.0.7", 1), ("2001:db8::1", 65535), ("fe80::1", 7415), ("nas.home.arpa", 7415)
    ]
    inv = invitation(addresses, secret_size=32, permission="read")
    back = decode(inv.encode())
    assert back.owner_addresses == tuple(addresses)
    assert back == inv and len(back.secret) == 32 and back.permission == "read"


def test_an_invitation_with_no_address_relies_on_discovery_and_still_round_trips() -> None:
    inv = invitation(())
    assert decode(inv.encode()).owner_addresses == ()


@settings(max_examples=50, deadline=None)
@given(
    share_id=st.text(min_size=1, max_size=40).filter(str.isprintable),
    secret=st.binary(min_size=16, max_size=32),
    expires_at=st.integers(0, 2**63 - 1),
    ports=st.lists(st.integers(1, 65535), max_size=3),
)
def test_any_valid_invitation_round_trips(share_id, secret, expires_at, ports) -> None:
    inv = Invitation(OWNER.fingerprint, [("127.0.0.1", p) for p in ports], share_id, secret,
                     "read", expires_at)
    assert decode(inv.encode()) == inv


def test_line_breaks_and_spaces_added_by_a_chat_client_are_ignored() -> None:
    inv = invitation()
    code = inv.encode()
    wrapped = "  " + "\n".join(code[i : i + 40] for i in range(0, len(code), 40)) + " \n"
    assert decode(wrapped) == inv


def test_fresh_invitations_have_fresh_secrets_and_expire_after_their_ttl() -> None:
    a, b = invitation(now=1_000_000, ttl=90), invitation(now=1_000_000, ttl=90)
    assert a.secret != b.secret and len(a.secret) == 16
    assert a.expires_at == 1_000_090
    assert not a.is_expired(1_000_089)
    a.check_not_expired(1_000_089)
    assert a.is_expired(1_000_090)
    with pytest.raises(InvitationExpired, match="expired at .* ask the share's owner"):
        a.check_not_expired(1_000_090)


# --- damaged codes -------------------------------------------------------------------------


def test_every_single_character_substitution_is_refused() -> None:
    code = invitation().encode()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    rng = random.Random(1)
    for pos in range(len(PREFIX), len(code)):
        wrong = rng.choice(alphabet.replace(code[pos], ""))
        with pytest.raises(InvitationError, match="damaged or incomplete"):
            decode(code[:pos] + wrong + code[pos + 1 :])


def test_every_truncation_is_refused() -> None:
    code = invitation().encode()
    for end in range(len(PREFIX), len(code)):
        with pytest.raises(InvitationError):
            decode(code[:end])


def test_swapping_two_neighbouring_characters_is_refused() -> None:
    code = invitation().encode()
    for pos in range(len(PREFIX), len(code) - 1):
        if code[pos] != code[pos + 1]:
            swapped = code[:pos] + code[pos + 1] + code[pos] + code[pos + 2 :]
            with pytest.raises(InvitationError):
                decode(swapped)


@pytest.mark.parametrize(
    "code, message",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("hello world", "not a plugshare invitation code"),
        ("https://example.org/x", "not a plugshare invitation code"),
        ("plugshare9:AAAA", "version 'plugshare9' is not supported"),
        ("plugshare1:AAAA=", "'=' at position 16"),
        ("plugshare1:AB+C", "'\\+' at position 14"),
        ("plugshare1:", "damaged or incomplete"),
        ("plugshare1:AAAAA", "damaged or incomplete"),
    ],
)
def test_garbage_is_refused_with_a_message_saying_what_is_wrong(code, message) -> None:
    with pytest.raises(InvitationError, match=message):
        decode(code)


def test_a_code_is_text() -> None:
    with pytest.raises(InvitationError, match="is text"):
        decode(b"plugshare1:AAAA")  # type: ignore[arg-type]


def test_the_prefix_may_come_in_any_case() -> None:
    inv = invitation()
    code = inv.encode()
    assert decode(PREFIX.upper() + code[len(PREFIX) :]) == inv


@pytest.mark.parametrize(
    "fields, message",
    [
        ([1, 2, 3], "wrong number of fields"),
        ({"a": 1}, "wrong number of fields"),
        ([bytes(32), "x", "s", bytes(16), 0, 1], "not well formed \\(addresses\\)"),
        ([bytes(32), [b"\x01\x02\x03"], "s", bytes(16), 0, 1], "malformed address"),
        ([bytes(32), [["no_underscores.example", 1]], "s", bytes(16), 0, 1], "neither an IP"),
        ([bytes(32), [], "s", bytes(16), 7, 1], "unknown permission 7"),
        ([bytes(32), [], "s", bytes(16), True, 1], "unknown permission True"),
        ([bytes(31), [], "s", bytes(16), 0, 1], "fingerprint must be 32 bytes"),
        ([bytes(32), [], "s", bytes(8), 0, 1], "secret must be 16-32 bytes"),
        ([bytes(32), [], "", bytes(16), 0, 1], "share id must be"),
        ([bytes(32), [], "s", bytes(16), 0, -5], "expires_at must be"),
    ],
)
def test_well_checksummed_but_malformed_content_is_refused(fields, message) -> None:
    with pytest.raises(InvitationError, match=message):
        decode(code_around(fields))


def test_a_checksummed_code_that_is_not_msgpack_is_refused() -> None:
    payload = b"\xc1\xc1\xc1"  # 0xc1 is never used in msgpack
    code = PREFIX + base64.urlsafe_b64encode(payload + _checksum(payload)).decode().rstrip("=")
    with pytest.raises(InvitationError, match="not well formed"):
        decode(code)


# --- field validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "addresses, message",
    [
        ([("0.0.0.0", 7415)], "not an address a peer can connect to"),
        ([("::", 7415)], "not an address a peer can connect to"),
        ([("fe80::1%eth0", 7415)], "scoped IPv6"),
        ([("10.0.0.1", 0)], "must be 1-65535"),
        ([("10.0.0.1", 70000)], "must be 1-65535"),
        ([("10.0.0.1", "7415")], "must be 1-65535"),
        ([("", 7415)], "non-empty string"),
        ([("bad host", 7415)], "neither an IP address nor a host name"),
        ([("10.0.0.1",)], "\\(host, port\\) pair"),
        ("10.0.0.1:7415", "list of \\(host, port\\) pairs"),
        ([("10.0.0.1", p) for p in range(1, 18)], "at most 16"),
    ],
)
def test_unusable_owner_addresses_are_refused(addresses, message) -> None:
    with pytest.raises(InvitationError, match=message):
        invitation(addresses)


def test_addresses_are_normalised() -> None:
    inv = invitation([("2001:DB8:0:0::1", 7415)])
    assert inv.owner_addresses == (("2001:db8::1", 7415),)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"permission": "admin"}, InvitationError, "'read' or 'write'"),
        ({"ttl": 0}, InvalidTtl, "positive number of seconds"),
        ({"ttl": -5}, InvalidTtl, "positive number of seconds"),
        ({"secret_size": 8}, InvitationError, "secret_size must be 16-32"),
        ({"share_id": "a\x00b"}, InvitationError, "printable"),
        ({"owner": "not bytes"}, InvitationError, "fingerprint must be 32 bytes"),
    ],
)
def test_bad_fields_are_refused(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        invitation(**kwargs)


# --- the secret ----------------------------------------------------------------------------


def test_the_stored_digest_matches_only_the_right_secret_for_the_right_share() -> None:
    inv = invitation()
    stored = inv.digest()
    assert stored == secret_digest(inv.secret, inv.share_id) and len(stored) == 32
    assert stored != inv.secret
    assert matches(stored, inv.secret, inv.share_id)
    assert not matches(stored, invitation(share_id=inv.share_id).secret, inv.share_id)
    assert not matches(stored, inv.secret, inv.share_id + "x")
    assert not matches(stored, inv.secret[:-1], inv.share_id)


def test_the_digest_takes_bytes_and_text() -> None:
    with pytest.raises(InvitationError, match="as bytes"):
        secret_digest("secret", "share")  # type: ignore[arg-type]


# --- durations -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [("90s", 90), ("30m", 30 * 60), ("1h", 3600), ("2d", 2 * 86400), ("1w", 7 * 86400),
     (" 12H ", 12 * 3600), ("365d", 365 * 86400)],
)
def test_durations_parse(text, seconds) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("90", "no unit; write e.g. 90s"),
        ("1x", "number followed by one unit"),
        ("-1h", "number followed by one unit"),
        ("1.5h", "number followed by one unit"),
        ("1h30m", "number followed by one unit"),
        ("h", "number followed by one unit"),
        ("0s", "longer than zero"),
        ("53w", "limit of 365 days"),
        (3600, "text like 1h"),
    ],
)
def test_bad_durations_are_refused_with_a_clear_message(text, message) -> None:
    with pytest.raises(InvalidTtl, match=message):
        parse_ttl(text)
