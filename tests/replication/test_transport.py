"""Peer links over real TLS sockets on 127.0.0.1: handshakes, refusals, bad peers, keepalive,
back-pressure and reconnecting."""

import datetime
import logging
import time
import os
import random
import ssl
import struct
import tempfile
from functools import partial

import pytest
import trio

from plugshare.token import format_node_id
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from plugshare.replication.backoff import Backoff
from plugshare.replication.frames import FRAME_VERSION, FrameDecoder, encode
from plugshare.replication.link import (
    Established,
    HandshakeTimeout,
    Link,
    LinkConfig,
    LocalNode,
    LocalProtocolError,
    PeerAuthenticated,
    ProofRequested,
    node_id,
)
from plugshare.replication.transport import (
    FingerprintMismatch,
    PeerConnectError,
    PeerConnectionClosed,
    PeerRefused,
    ProofFailed,
    TransportConfig,
    connect_peer,
    keep_connected,
    serve_peers,
)
from plugshare.token.tls import (
    ALPN_PROTOCOL,
    DELEGATION_DOMAIN,
    DELEGATION_LIFETIME,
    DELEGATION_OID,
    Delegation,
    InvalidPeerCertificate,
    certificate_identity,
    certificate_public_key,
    client_auth_payload,
    client_ssl_context,
    delegated_certificate,
    delegation_statement,
    encode_delegation,
    make_tls_credentials,
    new_delegation_request,
    parse_delegation,
    server_ssl_context,
)

LOGGER = "plugshare.replication.transport"
# Generous liveness limits: a loaded CI machine must not make healthy links look dead.
CONFIG = TransportConfig(link=LinkConfig(handshake_timeout=5.0, ping_interval=0.2, dead_after=5.0), close_timeout=1.0)
# Tight limits, for the tests about timeouts.
FAST = TransportConfig(link=LinkConfig(handshake_timeout=0.5, ping_interval=0.1, dead_after=0.5), close_timeout=0.5)


def raw(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class Node:
    """A test node. `key` is its identity key, which in a real node stays in the token: here
    `prove` and the delegation stand in for the token's round trips."""

    def __init__(self, name: str) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.public_key = raw(self.key.public_key())
        self.local = LocalNode(public_key=self.public_key, name=name, addresses=("127.0.0.1:0",))
        self.id = self.local.node_id
        self.tls_key, self.delegation = make_tls_credentials(self.public_key, self.key.sign)
        self.proofs: list[tuple[bytes, bytes]] = []

    def server_context(self) -> ssl.SSLContext:
        return server_ssl_context(self.tls_key, self.delegation)

    async def prove(self, server_id: bytes, nonce: bytes) -> bytes:
        await trio.sleep(0.01)  # a round trip to the token process
        self.proofs.append((server_id, nonce))
        return self.key.sign(client_auth_payload(server_id, nonce, self.id))


@pytest.fixture(scope="module")
def server_node():
    return Node("server")


@pytest.fixture(scope="module")
def client_node():
    return Node("client")


async def echo(connection):
    async for message in connection:
        await connection.send({"type": "echo", "of": message})


async def start_server(nursery, node, handler=echo, *, accept_peer=lambda fingerprint: True, config=CONFIG, port=0):
    """Start serve_peers in `nursery`; return (port, cancel scope that stops it)."""
    scope = trio.CancelScope()

    async def run(task_status):
        with scope:
            await serve_peers(
                handler,
                host="127.0.0.1",
                port=port,
                ssl_context=node.server_context(),
                local=node.local,
                accept_peer=accept_peer,
                config=config,
                task_status=task_status,
            )

    listeners = await nursery.start(run)
    return listeners[0].socket.getsockname()[1], scope


def connect(port, server, client, config=CONFIG, prove=None):
    return connect_peer(
        "127.0.0.1",
        port,
        expected_fingerprint=server.id,
        ssl_context=client_ssl_context(),
        local=client.local,
        prove=prove or client.prove,
        config=config,
    )


async def connect_fails(port, server, client, error, match, config=CONFIG, prove=None):
    with pytest.raises(error, match=match) as raised:
        async with connect(port, server, client, config, prove):
            pytest.fail("the link should not have been established")
    return raised.value


async def assert_echo_works(port, server, client):
    async with connect(port, server, client) as connection:
        await connection.send({"type": "probe", "n": 1})
        with trio.fail_after(10):
            assert await connection.receive() == {"type": "echo", "of": {"type": "probe", "n": 1}}


async def raw_tls(port) -> trio.SSLStream:
    stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), client_ssl_context())
    await stream.do_handshake()
    return stream


async def raw_established(port, server, client) -> tuple[trio.SSLStream, Link]:
    """A hand-driven client (the pure Link over a TLS stream) that completes the handshake."""
    stream = await raw_tls(port)
    link = Link.connecting(client.local, pinned_peer_id=server.id, now=trio.current_time())
    with trio.fail_after(10):
        while True:
            event = link.next_event()
            if isinstance(event, ProofRequested):
                link.send_proof(await client.prove(event.server_id, event.nonce))
                continue
            await stream.send_all(link.data_to_send())
            if isinstance(event, Established):
                return stream, link
            link.receive_data(await stream.receive_some(), trio.current_time())


async def read_until_closed(stream) -> list[dict]:
    """Everything the other end sends until it closes, as messages."""
    data = bytearray()
    with trio.fail_after(10):
        try:
            while chunk := await stream.receive_some():
                data += chunk
        except trio.BrokenResourceError:
            pass
    decoder = FrameDecoder()
    decoder.feed(bytes(data))
    return list(decoder)


# --- happy paths ----------------------------------------------------------------------------


async def test_two_nodes_exchange_messages_both_ways(server_node, client_node):
    seen = {}

    async def greet_then_echo(connection):
        seen["peer"] = connection.peer_fingerprint
        seen["hello"] = connection.peer_hello
        await connection.send({"type": "greeting", "blob": b"\x00\x01"})
        await echo(connection)

    async with trio.open_nursery() as nursery:
        port, server = await start_server(nursery, server_node, greet_then_echo)
        async with connect(port, server_node, client_node) as connection:
            assert connection.peer_fingerprint == server_node.id
            assert connection.peer_hello.name == "server"
            with trio.fail_after(10):
                assert await connection.receive() == {"type": "greeting", "blob": b"\x00\x01"}
                for n in range(50):
                    await connection.send({"type": "doc", "n": n, "body": b"b" * n})
                for n in range(50):
                    echoed = await connection.receive()
                    assert echoed == {"type": "echo", "of": {"type": "doc", "n": n, "body": b"b" * n}}
        assert seen["peer"] == client_node.id
        assert seen["hello"].name == "client" and seen["hello"].addresses == ("127.0.0.1:0",)
        server.cancel()


async def test_keepalive_measures_rtt_and_keeps_an_idle_link_up(server_node, client_node):
    config = TransportConfig(link=LinkConfig(ping_interval=0.05, dead_after=1.5), close_timeout=1.0)
    async with trio.open_nursery() as nursery:
        port, server = await start_server(nursery, server_node, config=config)
        async with connect(port, server_node, client_node, config) as connection:
            await trio.sleep(3.5)  # idle for more than twice dead_after: pings keep it alive
            assert connection.close_reason is None
            assert connection.rtt is not None and connection.rtt > 0
            await connection.send({"type": "still-there"})
            with trio.fail_after(10):
                assert (await connection.receive())["of"] == {"type": "still-there"}
        server.cancel()


async def test_an_orderly_close_delivers_earlier_messages_and_the_reason(server_node, client_node):
    async def say_goodbye(connection):
        await connection.send({"type": "last-words"})
        await connection.aclose("maintenance")

    async with trio.open_nursery() as nursery:
        port, server = await start_server(nursery, server_node, say_goodbye)
        async with connect(port, server_node, client_node) as connection:
            with trio.fail_after(10):
                assert await connection.receive() == {"type": "last-words"}
                with pytest.raises(PeerConnectionClosed, match="closed by the peer: maintenance"):
                    await connection.receive()
                await connection.wait_closed()
            with pytest.raises(PeerConnectionClosed):
                await connection.send({"type": "too-late"})
        server.cancel()


async def test_send_is_back_pressured_and_loses_nothing(server_node, client_node):
    release = trio.Event()
    received = []

    async def slow_reader(connection):
        await release.wait()
        async for message in connection:
            received.append(message["n"])

    config = TransportConfig(link=CONFIG.link, send_buffer_size=64 * 1024, receive_queue_size=2, close_timeout=1.0)
    blob = b"x" * (256 * 1024)
    total = 400  # 100 MiB: far more than the buffers can hold
    async with trio.open_nursery() as nursery:
        port, server = await start_server(nursery, server_node, slow_reader, config=config)
        async with connect(port, server_node, client_node, config) as connection:
            sent = 0  # a cancelled send queues nothing
            with trio.move_on_after(1.0):
                while sent < total:
                    await connection.send({"type": "bulk", "n": sent, "blob": blob})
                    sent += 1
            assert sent < total  # send blocked: the reader is not reading
            release.set()
            for n in range(sent, total):
                await connection.send({"type": "bulk", "n": n, "blob": blob})
            await connection.send({"type": "bulk", "n": -1, "blob": b""})
            with trio.fail_after(30):
                while not received or received[-1] != -1:
                    await trio.sleep(0.01)
        assert received == [*range(total), -1]
        server.cancel()


# --- authentication -------------------------------------------------------------------------


async def test_a_wrong_pinned_fingerprint_is_refused_before_sending_anything(server_node, client_node, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    handled = []

    async def handler(connection):
        handled.append(connection)

    async with trio.open_nursery() as nursery:
        port, server = await start_server(nursery, server_node, handler)
        await connect_fails(
            port, Node("someone-else"), client_node, FingerprintMismatch, f"is node {format_node_id(server_node.id)}, not the expected"
        )
        with trio.fail_after(10):
            while "dropped peer connection" not in caplog.text:
                await trio.sleep(0.01)
        server.cancel()
    assert handled == []
    # The server saw the stream end with not one byte of the link protocol from the client.
    assert "the peer ended the connection without closing\n" in caplog.text


async def test_an_unknown_peer_is_refused_with_a_logged_reason(server_node, client_node, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    asked = []

    def accept_peer(fingerprint):
        asked.append(fingerprint)
        return False

    async with trio.open_nursery() as nursery:
        port, server = await start_server(nursery, server_node, accept_peer=accept_peer)
        await connect_fails(port, server_node, client_node, PeerRefused, "does not accept your node id")
        server.cancel()
    assert asked == [client_node.id]
    assert f"refused peer {format_node_id(client_node.id)}" in caplog.text


def rsa_server_context() -> ssl.SSLContext:
    """A TLS 1.3 server speaking our ALPN but with an RSA certificate: not a plugshare node."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_alpn_protocols([ALPN_PROTOCOL])
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "rsa.pem")
        with open(path, "wb") as file:
            file.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
            file.write(certificate.public_bytes(serialization.Encoding.PEM))
        context.load_cert_chain(path)
    return context


async def test_a_server_whose_certificate_is_not_ed25519_is_refused(server_node, client_node):
    context = rsa_server_context()

    async def tls_only(tcp_stream):
        stream = trio.SSLStream(tcp_stream, context, server_side=True)
        try:
            await stream.do_handshake()
            await stream.receive_some()
        except trio.BrokenResourceError:
            pass

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        await nursery.start(trio.serve_listeners, tls_only, listeners)
        port = listeners[0].socket.getsockname()[1]
        error = await connect_fails(
            port, server_node, client_node, PeerConnectError, "RSAPublicKey, not an Ed25519 key"
        )
        assert isinstance(error.__cause__, InvalidPeerCertificate)
        nursery.cancel_scope.cancel()


def test_certificate_checks_refuse_a_missing_or_unparsable_certificate():
    for check in (certificate_public_key, certificate_identity):
        with pytest.raises(InvalidPeerCertificate, match="no certificate"):
            check(None)
        with pytest.raises(InvalidPeerCertificate, match="cannot be parsed"):
            check(b"not DER")


def test_the_certificate_carries_the_ephemeral_key_and_the_identity_vouching_for_it(server_node):
    der = delegated_certificate(server_node.tls_key, server_node.delegation).public_bytes(serialization.Encoding.DER)
    assert certificate_public_key(der) == raw(server_node.tls_key.public_key()) != server_node.public_key
    assert node_id(certificate_identity(der)) == server_node.id
    extension = x509.load_der_x509_certificate(der).extensions.get_extension_for_oid(DELEGATION_OID)
    assert extension.critical is False and extension.value.value == server_node.delegation


# --- delegated certificates -------------------------------------------------------------------


def build_certificate(key, extension_value=None, common_name="plugshare node") -> bytes:
    """A DER certificate for `key`, self-signed by it, with `extension_value` (if any) as its
    delegation extension."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if extension_value is not None:
        builder = builder.add_extension(x509.UnrecognizedExtension(DELEGATION_OID, extension_value), critical=False)
    return builder.sign(key, None).public_bytes(serialization.Encoding.DER)


def signed_delegation(identity_key, tls_key, *, not_after=None, signer=None) -> bytes:
    """A delegation of `tls_key` naming `identity_key`, signed by `signer` (default: the identity)."""
    not_after = int(time.time()) + 3600 if not_after is None else not_after
    identity = raw(identity_key.public_key())
    statement = delegation_statement(identity, raw(tls_key.public_key()), not_after)
    return encode_delegation(identity, not_after, (signer or identity_key).sign(statement))


def flip_byte(der: bytes, inside: bytes, offset: int = -1) -> bytes:
    """`der` with one byte of the first occurrence of `inside` changed."""
    at = der.index(inside) + (offset % len(inside))
    return der[:at] + bytes([der[at] ^ 0x01]) + der[at + 1:]


def bad_certificates(node) -> dict[str, tuple[Ed25519PrivateKey, bytes, str]]:
    """name -> (TLS key, DER certificate presented with it, why certificate_identity refuses it)."""
    tls_key, other_tls_key, mallory = (Ed25519PrivateKey.generate() for _ in range(3))
    good = signed_delegation(node.key, tls_key)
    good_der = build_certificate(tls_key, good)
    body = parse_delegation(good)
    later = encode_delegation(body.identity_public, body.not_after + 60, body.signature)  # not what was signed
    return {
        # The old style: the identity key itself in a plain self-signed certificate.
        "old style": (node.key, build_certificate(node.key), "carries no plugshare delegation"),
        "no delegation": (tls_key, build_certificate(tls_key), "carries no plugshare delegation"),
        "signed by another identity": (
            tls_key, build_certificate(tls_key, signed_delegation(node.key, tls_key, signer=mallory)),
            "not signed by the identity it names",
        ),
        "for another TLS key": (
            tls_key, build_certificate(tls_key, signed_delegation(node.key, other_tls_key)),
            "not signed by the identity it names",
        ),
        "expired": (
            tls_key, build_certificate(tls_key, signed_delegation(node.key, tls_key, not_after=int(time.time()) - 5)),
            "delegation expired at",
        ),
        "valid for too long": (
            tls_key,
            build_certificate(tls_key, signed_delegation(
                node.key, tls_key, not_after=int(time.time()) + 30 * 24 * 3600)),
            "over the 8-day maximum",
        ),
        "tbs altered": (tls_key, flip_byte(good_der, b"plugshare node"), "not self-signed by its key"),
        "extension bits altered": (tls_key, flip_byte(good_der, good), "not self-signed by its key"),
        "extension altered and re-signed": (
            tls_key, build_certificate(tls_key, later), "not signed by the identity it names",
        ),
        "malformed delegation": (tls_key, build_certificate(tls_key, good[:-1]), "delegation is malformed"),
        "unknown delegation version": (
            tls_key, build_certificate(tls_key, good[:2] + b"\x02" + good[3:]), "format version 2",
        ),
    }


BAD_CERTIFICATES = sorted(bad_certificates(Node("n")))


@pytest.mark.parametrize("case", BAD_CERTIFICATES)
def test_certificate_identity_refuses_bad_delegations(server_node, case):
    _, der, problem = bad_certificates(server_node)[case]
    with pytest.raises(InvalidPeerCertificate, match=problem):
        certificate_identity(der)


def test_certificate_identity_checks_expiry_against_the_given_time(server_node):
    der = delegated_certificate(server_node.tls_key, server_node.delegation).public_bytes(serialization.Encoding.DER)
    not_after = parse_delegation(server_node.delegation).not_after
    assert certificate_identity(der, now=not_after - 1) == server_node.public_key
    with pytest.raises(InvalidPeerCertificate, match="expired"):
        certificate_identity(der, now=not_after)


def test_delegation_statement_and_encoding_layouts():
    identity, tls_public = bytes(range(32)), bytes(range(32, 64))
    statement = delegation_statement(identity, tls_public, 0x0102030405060708)
    assert statement == DELEGATION_DOMAIN + identity + tls_public + bytes.fromhex("0102030405060708")
    assert DELEGATION_DOMAIN == b"plugshare/tls-delegation/v1\x00"
    encoded = encode_delegation(identity, 7, b"s" * 64)
    assert encoded == b"\x04\x69\x01" + identity + (7).to_bytes(8, "big") + b"s" * 64
    assert parse_delegation(encoded) == Delegation(identity, 7, b"s" * 64)
    for bad in ({"identity_public": b"short"}, {"tls_public": bytes(33)}, {"not_after": -1},
                {"not_after": 2**64}, {"not_after": True}, {"not_after": 1.5}):
        with pytest.raises(ValueError):
            delegation_statement(**{"identity_public": identity, "tls_public": tls_public, "not_after": 1, **bad})
    with pytest.raises(ValueError, match="64 bytes"):
        encode_delegation(identity, 7, b"s" * 63)
    with pytest.raises(ValueError, match="107-byte DER OCTET STRING"):
        parse_delegation(b"\x04\x68" + encoded[2:-1])


def test_credentials_in_two_steps_as_the_node_will_make_them(server_node):
    before = int(time.time())
    request = new_delegation_request(server_node.public_key)
    assert before + DELEGATION_LIFETIME <= request.not_after <= int(time.time()) + DELEGATION_LIFETIME
    assert request.statement == delegation_statement(server_node.public_key, request.tls_public, request.not_after)
    assert "tls_private_key" not in repr(request)
    with pytest.raises(ValueError, match="not the identity key's"):
        request.complete(Ed25519PrivateKey.generate().sign(request.statement))  # another token
    with pytest.raises(ValueError, match="not the identity key's"):
        request.complete(server_node.key.sign(request.statement + b"x"))
    delegation = request.complete(server_node.key.sign(request.statement))  # the token's answer
    der = delegated_certificate(request.tls_private_key, delegation).public_bytes(serialization.Encoding.DER)
    assert certificate_identity(der) == server_node.public_key
    assert new_delegation_request(server_node.public_key, not_after=1234).not_after == 1234
    assert new_delegation_request(server_node.public_key, now=1000).not_after == 1000 + DELEGATION_LIFETIME


def test_make_tls_credentials_signs_only_the_statement(server_node):
    signed = []

    def sign(statement):
        signed.append(statement)
        return server_node.key.sign(statement)

    tls_key, delegation = make_tls_credentials(server_node.public_key, sign, not_after=2_000_000_000)
    assert signed == [delegation_statement(server_node.public_key, raw(tls_key.public_key()), 2_000_000_000)]
    assert parse_delegation(delegation).not_after == 2_000_000_000


def test_server_ssl_context_refuses_a_delegation_for_another_key(server_node):
    with pytest.raises(ValueError, match="not the identity key's signature for this TLS key"):
        server_ssl_context(Ed25519PrivateKey.generate(), server_node.delegation)
    with pytest.raises(ValueError, match="107-byte"):
        server_ssl_context(server_node.tls_key, b"junk")
    with pytest.raises(TypeError, match="Ed25519PrivateKey"):
        server_ssl_context(rsa.generate_private_key(public_exponent=65537, key_size=1024), server_node.delegation)


def context_presenting(key: Ed25519PrivateKey, der: bytes) -> ssl.SSLContext:
    """A TLS 1.3 server context presenting exactly `der` (which may be broken) with `key`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols([ALPN_PROTOCOL])
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "credential.pem")
        with open(path, "wb") as file:
            file.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
            file.write(ssl.DER_cert_to_PEM_cert(der).encode())
        context.load_cert_chain(path)
    return context


async def start_recording_tls_server(nursery, context) -> tuple[int, list[bytes]]:
    """A TLS server that records everything each client sends until it closes."""
    received: list[bytes] = []

    async def record(tcp_stream):
        stream = trio.SSLStream(tcp_stream, context, server_side=True)
        data = bytearray()
        try:
            await stream.do_handshake()
            while chunk := await stream.receive_some():
                data += chunk
        except trio.BrokenResourceError:
            pass
        received.append(bytes(data))

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(trio.serve_listeners, record, listeners)
    return listeners[0].socket.getsockname()[1], received


@pytest.mark.parametrize("case", BAD_CERTIFICATES)
async def test_a_server_with_a_bad_delegation_is_refused_before_any_application_byte(server_node, client_node, case):
    key, der, problem = bad_certificates(server_node)[case]
    proofs = len(client_node.proofs)
    async with trio.open_nursery() as nursery:
        port, received = await start_recording_tls_server(nursery, context_presenting(key, der))
        error = await connect_fails(port, server_node, client_node, PeerConnectError, problem)
        assert isinstance(error.__cause__, InvalidPeerCertificate)
        with trio.fail_after(10):
            while not received:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert received == [b""]  # TLS came up, then the client closed without a byte of the link
    assert len(client_node.proofs) == proofs  # and the token was never asked to sign anything


async def test_a_valid_delegation_from_another_identity_is_a_fingerprint_mismatch(server_node, client_node):
    mallory = Node("mallory")  # a real node, but not the one we want
    async with trio.open_nursery() as nursery:
        port, received = await start_recording_tls_server(nursery, mallory.server_context())
        await connect_fails(port, server_node, client_node, FingerprintMismatch, f"is node {format_node_id(mallory.id)}")
        with trio.fail_after(10):
            while not received:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert received == [b""]


async def test_the_listener_takes_a_fresh_context_per_connection(server_node, client_node):
    """serve_peers accepts a function returning the current context, so the node can certify a
    new TLS key before the delegation expires without closing its listener."""
    current = [server_node.server_context()]
    scope = trio.CancelScope()

    async def run(task_status):
        with scope:
            await serve_peers(echo, host="127.0.0.1", port=0, ssl_context=lambda: current[0], local=server_node.local,
                              accept_peer=lambda fingerprint: True, config=CONFIG, task_status=task_status)

    async def presented(port) -> bytes:
        stream = await raw_tls(port)
        der = stream.getpeercert(binary_form=True)
        await stream.aclose()
        assert node_id(certificate_identity(der)) == server_node.id
        return certificate_public_key(der)

    async with trio.open_nursery() as nursery:
        port = (await nursery.start(run))[0].socket.getsockname()[1]
        first = await presented(port)
        await assert_echo_works(port, server_node, client_node)
        tls_key, delegation = make_tls_credentials(server_node.public_key, server_node.key.sign)
        current[0] = server_ssl_context(tls_key, delegation)
        assert await presented(port) == raw(tls_key.public_key()) != first
        await assert_echo_works(port, server_node, client_node)
        scope.cancel()


# --- the connecting side's proof --------------------------------------------------------------


async def test_the_proof_is_awaited_for_the_pinned_server_and_its_fresh_nonce(server_node):
    client = Node("prover")
    async with trio.open_nursery() as nursery:
        port, server = await start_server(nursery, server_node)
        for _ in range(2):
            await assert_echo_works(port, server_node, client)
        server.cancel()
    assert [server_id for server_id, _ in client.proofs] == [server_node.id, server_node.id]
    first_nonce, second_nonce = (nonce for _, nonce in client.proofs)
    assert len(first_nonce) == 32 and first_nonce != second_nonce


async def test_a_slow_token_within_the_handshake_timeout_is_fine(server_node, client_node):
    async def slow_prove(server_id, nonce):
        await trio.sleep(0.3)  # FAST's handshake timeout is 0.5 s
        return await client_node.prove(server_id, nonce)

    async with trio.open_nursery() as nursery:
        port, server = await start_server(nursery, server_node, config=FAST)
        async with connect(port, server_node, client_node, FAST, slow_prove) as connection:
            assert connection.peer_fingerprint == server_node.id
        server.cancel()


async def test_a_proof_that_never_comes_hits_the_handshake_timeout_on_both_sides(server_node, client_node, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def stuck_prove(server_id, nonce):
        await trio.sleep_forever()  # a token that never answers

    async with trio.open_nursery() as nursery:
        port, server = await start_server(nursery, server_node, config=FAST)
        with trio.fail_after(10):
            error = await connect_fails(
                port, server_node, client_node, PeerConnectError, "handshake not complete", FAST, stuck_prove
            )
        assert isinstance(error.__cause__, HandshakeTimeout)
        assert "awaiting local proof" in str(error)
        with trio.fail_after(10):
            while "dropped peer connection" not in caplog.text:
                await trio.sleep(0.01)
        await assert_echo_works(port, server_node, client_node)
        server.cancel()


async def test_a_client_that_never_sends_its_proof_is_dropped_by_the_server(server_node, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with trio.open_nursery() as nursery:
        port, server = await start_server(nursery, server_node, config=FAST)
        stream = await raw_tls(port)  # reads the server's hello, then never answers it
        messages = await read_until_closed(stream)
        assert [message["type"] for message in messages] == ["hello", "close"]
        assert "handshake not complete" in messages[-1]["reason"]
        server.cancel()
    assert "handshake not complete after 0.5s (awaiting hello)" in caplog.text


@pytest.mark.parametrize(
    "answer, problem, cause",
    [
        ("raise", "cannot prove our identity: the token is locked", RuntimeError),
        ("wrong key", "does not verify with this node's public key", LocalProtocolError),
        ("short", "64-byte signature", LocalProtocolError),
    ],
)
async def test_a_failed_proof_fails_the_connection_and_tells_the_server(server_node, client_node, caplog,
                                                                        answer, problem, cause):
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def bad_prove(server_id, nonce):
        await trio.sleep(0)
        if answer == "raise":
            raise RuntimeError("the token is locked")
        if answer == "short":
            return b"s" * 10
        return Ed25519PrivateKey.generate().sign(client_auth_payload(server_id, nonce, client_node.id))

    async with trio.open_nursery() as nursery:
        port, server = await start_server(nursery, server_node)
        error = await connect_fails(port, server_node, client_node, ProofFailed, problem, prove=bad_prove)
        assert isinstance(error.__cause__, cause)
        with trio.fail_after(10):
            while "dropped peer connection" not in caplog.text:
                await trio.sleep(0.01)
        await assert_echo_works(port, server_node, client_node)
        server.cancel()
    assert "could not prove its identity" in caplog.text


def insecure_client_context(**settings) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    for name, value in settings.items():
        setattr(context, name, value)
    return context


async def test_tls_below_1_3_is_refused(server_node, client_node, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with trio.open_nursery() as nursery:
        port, server = await start_server(nursery, server_node)
        context = insecure_client_context(maximum_version=ssl.TLSVersion.TLSv1_2)
        stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), context)
        with pytest.raises(trio.BrokenResourceError):
            await stream.do_handshake()
        await assert_echo_works(port, server_node, client_node)
        server.cancel()
    assert "UNSUPPORTED_PROTOCOL" in caplog.text


async def test_a_tls_client_of_another_protocol_is_dropped(server_node, client_node, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with trio.open_nursery() as nursery:
        port, server = await start_server(nursery, server_node)
        context = insecure_client_context()
        context.set_alpn_protocols(["http/1.1"])
        stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), context)
        await stream.do_handshake()
        assert await read_until_closed(stream) == []  # not even our hello
        await assert_echo_works(port, server_node, client_node)
        server.cancel()
    assert "did not negotiate ALPN 'plugshare/1' (got None)" in caplog.text


# --- bad peers drop only their own connection -----------------------------------------------


@pytest.mark.parametrize(
    "garbage, reason",
    [
        (struct.pack(">BI", FRAME_VERSION, CONFIG.link.max_frame_size + 1), "over the cap"),
        (struct.pack(">BI", FRAME_VERSION, 3) + b"\xc1\xc1\xc1", "not valid msgpack"),
        (struct.pack(">BI", 9, 1) + b"\x00", "frame version 9"),
    ],
)
async def test_bad_frames_drop_that_connection_only(server_node, client_node, caplog, garbage, reason):
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with trio.open_nursery() as nursery:
        port, server = await start_server(nursery, server_node)
        async with connect(port, server_node, client_node) as good:
            bad_stream, _ = await raw_established(port, server_node, Node("bad"))
            await bad_stream.send_all(garbage)
            closing = await read_until_closed(bad_stream)
            assert closing[-1]["type"] == "close" and reason in closing[-1]["reason"]
            # The good client kept its link through all of this, and new clients are served.
            await good.send({"type": "after"})
            with trio.fail_after(10):
                assert await good.receive() == {"type": "echo", "of": {"type": "after"}}
            await assert_echo_works(port, server_node, client_node)
        server.cancel()
    assert reason in caplog.text


async def test_garbage_during_the_handshake_drops_that_connection(server_node, client_node, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with trio.open_nursery() as nursery:
        port, server = await start_server(nursery, server_node)
        stream = await raw_tls(port)
        await stream.send_all(b"GET / HTTP/1.1\r\n\r\n")
        messages = await read_until_closed(stream)
        assert [message["type"] for message in messages] == ["hello", "close"]
        await assert_echo_works(port, server_node, client_node)
        server.cancel()
    assert "dropped peer connection" in caplog.text


async def test_silent_and_half_sent_handshakes_time_out(server_node, client_node, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with trio.open_nursery() as nursery:
        port, server = await start_server(nursery, server_node, config=FAST)
        silent_tcp = await trio.open_tcp_stream("127.0.0.1", port)  # never starts TLS
        half_hello = await raw_tls(port)
        await half_hello.send_all(encode({"type": "hello", "pad": b"p" * 100})[:20])  # stops mid-frame
        # Meanwhile, the listener serves others.
        await assert_echo_works(port, server_node, client_node)
        with trio.fail_after(10):
            assert await silent_tcp.receive_some() == b""
        messages = await read_until_closed(half_hello)
        assert messages[-1]["type"] == "close" and "handshake not complete" in messages[-1]["reason"]
        await assert_echo_works(port, server_node, client_node)
        server.cancel()
    assert "TLS handshake not complete" in caplog.text


async def test_a_connection_beyond_the_pending_handshake_limit_evicts_the_oldest(server_node, client_node, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    config = TransportConfig(link=CONFIG.link, max_pending_handshakes=1, max_pending_per_source=1, close_timeout=1.0)
    async with trio.open_nursery() as nursery:
        port, server = await start_server(nursery, server_node, config=config)
        pending = await raw_tls(port)  # TLS is up, so the server is handling it; no hello follows
        # A real peer comes: it takes the only slot, and the idle one is closed.
        await assert_echo_works(port, server_node, client_node)
        messages = await read_until_closed(pending)
        assert messages[-1]["type"] == "close" and "evicted" in messages[-1]["reason"]
        server.cancel()
    assert "handshake evicted by newer connections" in caplog.text


async def test_an_established_peer_that_stops_mid_frame_is_dropped(server_node, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    ended = []

    async def handler(connection):
        try:
            await connection.receive()
        except PeerConnectionClosed as closed:
            ended.append(closed.reason)

    async with trio.open_nursery() as nursery:
        port, server = await start_server(nursery, server_node, handler, config=FAST)
        stream, link = await raw_established(port, server_node, Node("stuck"))
        link.send_message({"type": "doc", "body": b"d" * 1000})
        await stream.send_all(link.data_to_send()[:500])  # and then nothing, not even pongs
        messages = await read_until_closed(stream)
        assert messages[-1]["type"] == "close" and "nothing received" in messages[-1]["reason"]
        server.cancel()
    assert len(ended) == 1 and "nothing received from the peer" in ended[0]


async def test_keepalive_detects_a_dead_server(server_node, client_node):
    """A server that completes the handshake and then stops answering."""
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        context = server_node.server_context()

        async def zombie(tcp_stream):
            stream = trio.SSLStream(tcp_stream, context, server_side=True)
            link = Link.accepting(server_node.local, now=trio.current_time())
            await stream.do_handshake()
            while True:
                event = link.next_event()
                await stream.send_all(link.data_to_send())
                if isinstance(event, PeerAuthenticated):
                    link.accept()
                    await stream.send_all(link.data_to_send())
                    await trio.sleep_forever()  # holds the socket open, reads nothing
                if event is None:
                    link.receive_data(await stream.receive_some(), trio.current_time())

        nursery.start_soon(partial(trio.serve_listeners, zombie, listeners))
        async with connect(port, server_node, client_node, FAST) as connection:
            with trio.fail_after(10):
                with pytest.raises(PeerConnectionClosed, match="nothing received from the peer"):
                    await connection.receive()
                await connection.wait_closed()
        nursery.cancel_scope.cancel()


async def unused_port() -> int:
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens there once the socket is closed


async def test_connecting_to_a_closed_port_fails_clearly(server_node, client_node):
    port = await unused_port()
    await connect_fails(port, server_node, client_node, PeerConnectError, f"cannot connect to 127.0.0.1:{port}")


# --- reconnecting ---------------------------------------------------------------------------


async def test_keep_connected_comes_back_after_the_listener_restarts(server_node, client_node):
    links = []
    link_up = trio.Event()

    async def on_link(connection):
        links.append(connection.peer_fingerprint)
        link_up.set()
        async for _ in connection:
            pass

    async with trio.open_nursery() as nursery:
        port, server = await start_server(nursery, server_node)
        dead_port = await unused_port()
        nursery.start_soon(
            partial(
                keep_connected,
                on_link,
                addresses=lambda: [("127.0.0.1", dead_port), ("127.0.0.1", port)],  # the first is stale
                expected_fingerprint=server_node.id,
                ssl_context=client_ssl_context(),
                local=client_node.local,
                prove=client_node.prove,
                config=CONFIG,
                backoff=Backoff(initial=0.05, maximum=0.2),
            )
        )
        with trio.fail_after(10):
            await link_up.wait()
        server.cancel()  # the listener and its links go away...
        link_up = trio.Event()
        await trio.sleep(0.5)  # ...long enough for a few failed attempts
        assert len(links) == 1
        port, server = await start_server(nursery, server_node, port=port)
        with trio.fail_after(10):
            await link_up.wait()
        assert links == [server_node.id, server_node.id]
        nursery.cancel_scope.cancel()


async def test_keep_connected_retries_after_the_token_failed_to_prove(server_node, client_node):
    attempts = []
    link_up = trio.Event()

    async def flaky_prove(server_id, nonce):
        attempts.append(server_id)
        if len(attempts) == 1:
            raise ConnectionResetError("the token process restarted")
        return await client_node.prove(server_id, nonce)

    async def on_link(connection):
        link_up.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        port, server = await start_server(nursery, server_node)
        nursery.start_soon(
            partial(
                keep_connected, on_link, addresses=lambda: [("127.0.0.1", port)], expected_fingerprint=server_node.id,
                ssl_context=client_ssl_context(), local=client_node.local, prove=flaky_prove, config=CONFIG,
                backoff=Backoff(initial=0.05, maximum=0.2),
            )
        )
        with trio.fail_after(10):
            await link_up.wait()
        nursery.cancel_scope.cancel()
    assert attempts == [server_node.id, server_node.id]


async def test_connecting_to_a_server_that_never_speaks_tls_times_out(server_node, client_node):
    async def mute(tcp_stream):
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        await nursery.start(trio.serve_listeners, mute, listeners)
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(10):
            await connect_fails(port, server_node, client_node, PeerConnectError, "TLS handshake not complete", FAST)
        nursery.cancel_scope.cancel()


def test_backoff_grows_exponentially_up_to_its_maximum():
    backoff = Backoff(initial=0.5, maximum=10.0, multiplier=2.0, jitter=0.0)
    assert [backoff.ceiling(n) for n in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff.ceiling(10**9) == 10.0  # no overflow for a peer that has been away for long
    assert backoff.delay(3, random.Random(0)) == 4.0


def test_backoff_jitter_stays_within_its_band():
    backoff = Backoff(initial=1.0, maximum=60.0, jitter=0.5)
    rng = random.Random(42)
    delays = [backoff.delay(4, rng) for _ in range(1000)]
    assert all(8.0 <= delay <= 16.0 for delay in delays)
    assert len(set(delays)) > 900  # spread out, not in lock-step


@pytest.mark.parametrize(
    "kwargs, problem",
    [({"initial": 0}, "initial"), ({"initial": 5, "maximum": 1}, "maximum"), ({"multiplier": 0.5}, "multiplier"),
     ({"jitter": 1.5}, "jitter")],
)
def test_backoff_refuses_nonsensical_settings(kwargs, problem):
    with pytest.raises(ValueError, match=problem):
        Backoff(**kwargs)


async def test_idle_sockets_from_one_address_do_not_lock_out_a_real_peer(server_node, client_node, caplog):
    """64 idle sockets, and more, from 127.0.0.1: a real peer from that same address still
    links (the oldest pending handshakes make room), while the idle ones keep coming."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    idle = []
    async with trio.open_nursery() as nursery:
        port, server = await start_server(nursery, server_node, config=CONFIG)
        for _ in range(80):
            idle.append(await trio.open_tcp_stream("127.0.0.1", port))
        await trio.sleep(0.5)  # not an assertion: lets the listener accept them all first
        await assert_echo_works(port, server_node, client_node)
        # The listener held a bounded number of them: the others were closed under the flood.
        closed = 0
        for stream in idle:
            with trio.move_on_after(0.2):
                if await stream.receive_some() == b"":
                    closed += 1
        assert closed >= 80 - TransportConfig().max_pending_per_source
        for stream in idle:
            await stream.aclose()
        server.cancel()
