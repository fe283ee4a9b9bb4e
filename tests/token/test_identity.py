"""Node identity: keys, fingerprints, readable node ids, signatures."""

from __future__ import annotations

import hashlib
import random
from functools import partial

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, strategies as st

from plugshare.token.inside import (
    InvalidNodeIdError,
    Token,
    fingerprint_of,
    format_node_id,
    parse_node_id,
)

from plugshare.token.vault import SLOT_FILES

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


@given(st.binary(min_size=32, max_size=32))
def test_node_id_round_trips_in_any_case_and_spacing(fp: bytes) -> None:
    text = format_node_id(fp)
    groups = text.split("-")
    assert len(groups) == 8 and all(len(g) == 7 for g in groups)
    assert parse_node_id(text) == fp
    assert parse_node_id(text.lower().replace("-", " ")) == fp


def test_every_single_character_typo_is_refused() -> None:
    rng = random.Random(7)
    for _ in range(20):
        compact = format_node_id(rng.randbytes(32)).replace("-", "")
        for pos in range(len(compact)):
            for ch in ALPHABET:
                if ch == compact[pos]:
                    continue
                typo = compact[:pos] + ch + compact[pos + 1 :]
                with pytest.raises(InvalidNodeIdError):
                    parse_node_id(typo)
        # and most neighbour swaps (Luhn mod N catches all but a few pairs)
        caught = 0
        swaps = [p for p in range(len(compact) - 1) if compact[p] != compact[p + 1]]
        for pos in swaps:
            swapped = compact[:pos] + compact[pos + 1] + compact[pos] + compact[pos + 2 :]
            try:
                parse_node_id(swapped)
            except InvalidNodeIdError:
                caught += 1
        assert caught >= 0.9 * len(swaps)


@pytest.mark.parametrize(
    "text, message",
    [
        ("ABC", "expected 56"),
        ("0" * 56, "only letters A-Z and digits 2-7"),
        ("", "expected 56"),
    ],
)
def test_malformed_node_ids_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(InvalidNodeIdError, match=message):
        parse_node_id(text)


def test_fingerprint_is_sha256_of_raw_public_key(token: Token) -> None:
    assert token.fingerprint == hashlib.sha256(token.public_key_bytes).digest()
    assert token.fingerprint == fingerprint_of(token.public_key_bytes)
    assert parse_node_id(token.node_id) == token.fingerprint
    assert len(token.x25519_public_bytes) == 32


def test_signatures_verify_and_bind_data_and_key(token: Token) -> None:
    sig = token.sign(b"manifest v1")
    assert Token.verify(token.public_key_bytes, b"manifest v1", sig)
    assert not Token.verify(token.public_key_bytes, b"manifest v2", sig)
    other = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert not Token.verify(other, b"manifest v1", sig)
    assert not Token.verify(token.public_key_bytes, b"manifest v1", sig[:-1] + bytes([sig[-1] ^ 1]))
    assert token.verify_from(token.node_id, b"manifest v1", sig)


def test_private_keys_never_leave_in_clear(token: Token) -> None:
    signing, agreement = token._identity._private_bytes()
    public_values = []
    for name in dir(token):
        if name.startswith("_"):
            continue
        value = getattr(token, name)
        if isinstance(value, bytes):
            public_values.append(value)
    assert public_values, "the token exposes its public keys"
    for value in public_values:
        assert signing not in value and agreement not in value
    token.flush()
    on_disk = b"".join(p.read_bytes() for p in token._dir.rglob("*") if p.is_file())
    assert any((token._dir / name).exists() for name in SLOT_FILES)
    for secret in (signing, agreement, token._state.audit_key):
        assert secret not in on_disk


async def test_ssl_context_presents_the_node_key_over_real_tls(token: Token, second_token: Token) -> None:
    """The seam to tls.py: a loopback TLS 1.3 handshake with an ephemeral key the token
    certified (`link.certify`): the client finds the server token's identity in the
    certificate, as a pinning client must, and no identity key left the token."""
    from plugshare.token import tls
    from plugshare.token.door import Door

    request = tls.new_delegation_request(token.public_key_bytes)
    delegation = Door(token).handle("link.certify", {"tls_public_key": request.tls_public})
    server_ctx = tls.server_ssl_context(request.tls_private_key, delegation["delegation"])
    client_ctx = tls.client_ssl_context()
    seen: list[bytes] = []

    async def serve(stream: trio.SocketStream) -> None:
        tls_stream = trio.SSLStream(stream, server_ctx, server_side=True)
        await tls_stream.do_handshake()
        await tls_stream.send_all(b"hello")
        await tls_stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        client = trio.SSLStream(tcp, client_ctx, server_hostname=None)
        await client.do_handshake()
        seen.append(tls.certificate_identity(client.getpeercert(binary_form=True)))
        assert await client.receive_some(5) == b"hello"
        await client.aclose()
        nursery.cancel_scope.cancel()
    assert seen == [token.public_key_bytes]
    assert fingerprint_of(seen[0]) == token.fingerprint
