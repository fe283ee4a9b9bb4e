"""TLS for peer links: delegated credentials, the certificates that carry them, and contexts.

A node's identity is its long-term Ed25519 key, held by the token, in its own process; the node
process never sees that private key. So the node does not present the identity key in TLS.
Instead, each run it generates an *ephemeral* Ed25519 TLS key and has the token sign a
*delegation* binding it to the identity (like RFC 9345 delegated credentials, simplified). The
server's certificate is self-signed by the ephemeral key and carries the delegation in a
non-critical extension; the identity is the identity key's fingerprint, never a name or a CA.
Both contexts are TLS 1.3 only and negotiate the ALPN protocol `ALPN_PROTOCOL`, so a peer link
cannot be confused with another TLS service on the same port.

The delegation
--------------
The token signs `delegation_statement` (and the token signs nothing else under its domain)::

    b"plugshare/tls-delegation/v1\\x00" || identity public key (32) || TLS public key (32)
        || not_after (8, unsigned big-endian, seconds since the Unix epoch, UTC)

The certificate carries `encode_delegation`, as the value of the extension `DELEGATION_OID`
(1.3.6.1.4.1.99999.1.1, non-critical)::

    04 69                  a DER OCTET STRING of 105 bytes, holding:
    01                     format version
    identity public key    32 bytes, raw Ed25519
    not_after              8 bytes, as above
    signature              64 bytes, Ed25519 by the identity key over the statement

The TLS public key is not repeated: it is the certificate's own key. 1.3.6.1.4.1.99999 is *not*
a registered IANA Private Enterprise Number; the OID is only ever interpreted in certificates
on plugshare links (our ALPN), so a clash cannot confuse anything, but a real PEN should replace
it before the format is frozen (changing it is a protocol change). A delegation lives
`DELEGATION_LIFETIME` (7 days); a verifier refuses one that expired or that claims to live
longer than `MAX_DELEGATION_LIFETIME` from now (the lifetime plus a day of clock skew). The node
certifies a new key at each start, and must do so again before the delegation expires.

How each side is authenticated
------------------------------
The server is authenticated by TLS and the delegation: the client checks the certificate with
`certificate_identity` (its self-signature, the delegation's signature by the identity key over
*this certificate's key*, the expiry) and pins the identity's fingerprint, refusing a mismatch
before it sends any application byte. The client context verifies no chain (there is none), but
TLS 1.3 always checks the server's CertificateVerify signature, so the server holds the
ephemeral key its certificate names, which the identity vouched for.

The client is authenticated in-band, not with a TLS client certificate, because CPython's ``ssl``
cannot accept a client certificate that is not known in advance. We tried, with OpenSSL 3.0 and
CPython 3.11, a server context holding its own certificate and a client presenting a fresh
self-signed Ed25519 certificate:

* ``verify_mode=CERT_OPTIONAL`` and ``CERT_REQUIRED``, with and without
  ``VERIFY_X509_PARTIAL_CHAIN``, with no CA or an unrelated CA loaded: the server's handshake
  fails with ``CERTIFICATE_VERIFY_FAILED: self-signed certificate`` and the client gets an
  ``unknown ca`` alert. ``CERT_OPTIONAL`` still verifies a certificate that *is* sent.
* ``verify_mode=CERT_NONE``: the handshake succeeds but the server never requests a certificate,
  so ``getpeercert(binary_form=True)`` returns None.

The stdlib exposes no verify callback, so the only way would be loading every client's
certificate as a CA beforehand, which a server cannot do for a node it has never met (the first
connection of an invited node). So the client proves its identity inside the link handshake: the
server sends a fresh nonce, and the client's token signs `client_auth_payload` (context, server
fingerprint, nonce, client fingerprint); see `plugshare.replication.link`.

Both signed formats start with a domain prefix (`DELEGATION_DOMAIN`, `CLIENT_AUTH_DOMAIN`) that
the token must keep for itself: it builds these bytes from their fields and signs them, and
refuses to sign caller-supplied data that starts with either prefix.

Nothing here does I/O or keeps state (the functions compute, and `new_delegation_request`
draws a fresh key) except `server_ssl_context`, which must hand the ephemeral private key to
OpenSSL through a file (``SSLContext`` loads keys only from files): the only copy that touches
disk is encrypted with a one-time random password, in a private temporary directory, and
deleted as soon as OpenSSL has loaded it. No identity private key ever comes here: the identity
is reached only through a signature made elsewhere (the token) or a signing callable.
"""

from __future__ import annotations

import datetime
import os
import secrets
import ssl
import struct
import tempfile
import time
from collections.abc import Callable

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

__all__ = [
    "ALPN_PROTOCOL",
    "CLIENT_AUTH_DOMAIN",
    "DELEGATION_DOMAIN",
    "DELEGATION_LIFETIME",
    "DELEGATION_OID",
    "MAX_DELEGATION_LIFETIME",
    "Delegation",
    "DelegationRequest",
    "InvalidPeerCertificate",
    "certificate_identity",
    "certificate_public_key",
    "client_auth_payload",
    "client_ssl_context",
    "delegated_certificate",
    "delegation_statement",
    "encode_delegation",
    "make_tls_credentials",
    "new_delegation_request",
    "parse_delegation",
    "server_ssl_context",
]

ALPN_PROTOCOL = "plugshare/1"

DELEGATION_DOMAIN = b"plugshare/tls-delegation/v1\x00"
CLIENT_AUTH_DOMAIN = b"plugshare link v1 client authentication\x00"

DELEGATION_OID = x509.ObjectIdentifier("1.3.6.1.4.1.99999.1.1")
DELEGATION_LIFETIME = 7 * 24 * 3600
"""Seconds a new delegation is valid for (the default of `new_delegation_request`)."""
MAX_DELEGATION_LIFETIME = DELEGATION_LIFETIME + 24 * 3600
"""The longest remaining validity a verifier accepts: the lifetime plus a day of clock skew."""

KEY_SIZE = 32
NODE_ID_SIZE = 32
NONCE_SIZE = 32
SIGNATURE_SIZE = 64

_DELEGATION_VERSION = 1
_DELEGATION_BODY = struct.Struct(f">B{KEY_SIZE}sQ{SIGNATURE_SIZE}s")  # version, identity, not_after, signature
# The extension value is a DER OCTET STRING (tag 0x04, short-form length) around the body.
_DELEGATION_HEADER = bytes([0x04, _DELEGATION_BODY.size])
_MAX_NOT_AFTER = 2**64 - 1


class InvalidPeerCertificate(ValueError):
    """The peer's TLS certificate is missing, unparsable, not for an Ed25519 key, or carries no
    valid, current delegation from an identity key."""


# --- signed statements ----------------------------------------------------------------------


def _check_key(value: bytes, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != KEY_SIZE:
        raise ValueError(f"{what} must be {KEY_SIZE} bytes, got {_describe_value(value)}")


def _check_not_after(not_after: int) -> None:
    if not isinstance(not_after, int) or isinstance(not_after, bool) or not 0 <= not_after <= _MAX_NOT_AFTER:
        raise ValueError(f"not_after must be an int of seconds since the epoch in [0, 2**64), got {not_after!r}")


def _describe_value(value: object) -> str:
    return f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__


def delegation_statement(identity_public: bytes, tls_public: bytes, not_after: int) -> bytes:
    """The bytes the identity key signs to delegate TLS to `tls_public` until `not_after`.

    Both keys are raw 32-byte Ed25519 public keys; `not_after` is in whole seconds since the
    Unix epoch. Every field has a fixed size after the domain prefix, so it is unambiguous.
    """
    _check_key(identity_public, "the identity public key")
    _check_key(tls_public, "the TLS public key")
    _check_not_after(not_after)
    return DELEGATION_DOMAIN + identity_public + tls_public + struct.pack(">Q", not_after)


def client_auth_payload(server_id: bytes, nonce: bytes, client_id: bytes) -> bytes:
    """The bytes the connecting node's token signs to prove its identity to the accepting node.

    `server_id` is the fingerprint the client pinned from the server's certificate, `nonce` the
    server's, `client_id` the client's own fingerprint. Every field has a fixed size, so the
    concatenation is unambiguous.
    """
    if not all(isinstance(value, bytes) for value in (server_id, nonce, client_id)) or (
        len(server_id),
        len(nonce),
        len(client_id),
    ) != (NODE_ID_SIZE, NONCE_SIZE, NODE_ID_SIZE):
        raise ValueError("server id, nonce and client id must be 32 bytes each")
    return CLIENT_AUTH_DOMAIN + server_id + nonce + client_id


# --- delegations ----------------------------------------------------------------------------


@attrs.frozen
class Delegation:
    """A parsed delegation: `identity_public` vouches for a TLS key until `not_after`."""

    identity_public: bytes
    not_after: int
    signature: bytes

    def statement(self, tls_public: bytes) -> bytes:
        return delegation_statement(self.identity_public, tls_public, self.not_after)

    def signs(self, tls_public: bytes) -> bool:
        """True when the signature is the identity's over the statement for `tls_public`."""
        try:
            Ed25519PublicKey.from_public_bytes(self.identity_public).verify(self.signature, self.statement(tls_public))
        except (InvalidSignature, ValueError):
            return False
        return True


def encode_delegation(identity_public: bytes, not_after: int, signature: bytes) -> bytes:
    """The delegation as carried in the certificate extension (see the module docstring)."""
    _check_key(identity_public, "the identity public key")
    _check_not_after(not_after)
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
        raise ValueError(f"an Ed25519 signature is {SIGNATURE_SIZE} bytes, got {_describe_value(signature)}")
    return _DELEGATION_HEADER + _DELEGATION_BODY.pack(_DELEGATION_VERSION, identity_public, not_after, signature)


def parse_delegation(data: bytes) -> Delegation:
    """The inverse of `encode_delegation`; ValueError (saying what is wrong) for anything else."""
    if not isinstance(data, bytes):
        raise ValueError(f"a delegation is bytes, got {type(data).__name__}")
    expected = len(_DELEGATION_HEADER) + _DELEGATION_BODY.size
    if len(data) != expected or not data.startswith(_DELEGATION_HEADER):
        raise ValueError(f"a delegation is a {expected}-byte DER OCTET STRING, got {len(data)} bytes")
    version, identity_public, not_after, signature = _DELEGATION_BODY.unpack_from(data, len(_DELEGATION_HEADER))
    if version != _DELEGATION_VERSION:
        raise ValueError(f"delegation format version {version}, this side knows {_DELEGATION_VERSION}")
    return Delegation(identity_public=identity_public, not_after=not_after, signature=signature)


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@attrs.frozen
class DelegationRequest:
    """Step one of certifying a TLS key: a fresh ephemeral key and what the token must sign.

    Send `tls_public` and `not_after` to the token (it rebuilds `statement` itself and signs
    it), then call `complete` with the signature.
    """

    tls_private_key: Ed25519PrivateKey = attrs.field(repr=False)
    identity_public: bytes
    not_after: int

    @property
    def tls_public(self) -> bytes:
        return _raw_public(self.tls_private_key)

    @property
    def statement(self) -> bytes:
        return delegation_statement(self.identity_public, self.tls_public, self.not_after)

    def complete(self, signature: bytes) -> bytes:
        """Step two: the encoded delegation, for `server_ssl_context` with `tls_private_key`.

        Raises ValueError if `signature` is not the identity's over `statement` (a token
        holding another identity, or a signature of something else).
        """
        delegation = encode_delegation(self.identity_public, self.not_after, signature)
        if not parse_delegation(delegation).signs(self.tls_public):
            raise ValueError("the signature is not the identity key's over this delegation statement")
        return delegation


def new_delegation_request(
    identity_public: bytes, *, not_after: int | None = None, now: float | None = None
) -> DelegationRequest:
    """A new ephemeral TLS key to be certified by `identity_public`, valid until `not_after`
    (default: `DELEGATION_LIFETIME` after `now`, which defaults to the wall clock)."""
    _check_key(identity_public, "the identity public key")
    if not_after is None:
        not_after = int(time.time() if now is None else now) + DELEGATION_LIFETIME
    _check_not_after(not_after)
    return DelegationRequest(Ed25519PrivateKey.generate(), identity_public, not_after)


def make_tls_credentials(
    identity_public: bytes, sign_statement: Callable[[bytes], bytes], *, not_after: int | None = None
) -> tuple[Ed25519PrivateKey, bytes]:
    """Both steps at once: (ephemeral TLS key, delegation), with `sign_statement` signing the
    statement by the identity key. For callers that can sign synchronously (tests, tools);
    the node, whose token is a round trip away, uses `new_delegation_request` and `complete`."""
    request = new_delegation_request(identity_public, not_after=not_after)
    return request.tls_private_key, request.complete(sign_statement(request.statement))


# --- certificates ---------------------------------------------------------------------------


def delegated_certificate(
    tls_private_key: Ed25519PrivateKey, delegation: bytes, *, common_name: str = "plugshare node"
) -> x509.Certificate:
    """A certificate for `tls_private_key`'s public key, self-signed by it, carrying `delegation`
    in the non-critical extension `DELEGATION_OID`. It is valid from a day ago (for peers whose
    clocks run behind) until the delegation's expiry; nobody checks its dates but the
    delegation's, which `certificate_identity` does."""
    if not isinstance(tls_private_key, Ed25519PrivateKey):
        raise TypeError(f"expected an Ed25519PrivateKey, got {type(tls_private_key).__name__}")
    parsed = parse_delegation(delegation)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
    # GeneralizedTime stops at year 9999; the delegation, not these dates, is what counts.
    not_after = min(parsed.not_after, 253402300799)
    not_after_time = datetime.datetime.fromtimestamp(not_after, tz=datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(tls_private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(min(not_before, not_after_time))
        .not_valid_after(not_after_time)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.UnrecognizedExtension(DELEGATION_OID, delegation), critical=False)
        .sign(tls_private_key, algorithm=None)  # Ed25519 signs without a separate digest
    )


def _base_context(purpose: ssl.Purpose) -> ssl.SSLContext:
    protocol = ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols([ALPN_PROTOCOL])
    return context


def server_ssl_context(
    tls_private_key: Ed25519PrivateKey, delegation: bytes, *, common_name: str = "plugshare node"
) -> ssl.SSLContext:
    """The accepting side's context: presents `delegated_certificate(tls_private_key, delegation)`.

    Raises ValueError unless `delegation` is well formed and signed, by the identity it names,
    for this very key (an expired one is accepted here; peers will refuse it). It requests no
    client certificate; the client proves its identity in the link handshake.
    """
    certificate = delegated_certificate(tls_private_key, delegation, common_name=common_name)
    if not parse_delegation(delegation).signs(_raw_public(tls_private_key)):
        raise ValueError("the delegation is not the identity key's signature for this TLS key")
    context = _base_context(ssl.Purpose.CLIENT_AUTH)
    context.verify_mode = ssl.CERT_NONE
    context.num_tickets = 0  # no session resumption: every link does a full handshake
    password = secrets.token_urlsafe(32)
    key_pem = tls_private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password.encode()),
    )
    with tempfile.TemporaryDirectory(prefix="plugshare-tls-") as directory:  # mode 0700
        path = os.path.join(directory, "credential.pem")
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(key_pem + certificate.public_bytes(serialization.Encoding.PEM))
        context.load_cert_chain(path, password=password)
    return context


def client_ssl_context() -> ssl.SSLContext:
    """The connecting side's context. It verifies no chain: the caller must check the server's
    certificate with `certificate_identity` and pin the identity before sending anything."""
    context = _base_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _load(certificate_der: bytes | None) -> tuple[x509.Certificate, Ed25519PublicKey]:
    if not certificate_der:
        raise InvalidPeerCertificate("the peer presented no certificate")
    try:
        certificate = x509.load_der_x509_certificate(certificate_der)
        public_key = certificate.public_key()
    except (ValueError, UnsupportedAlgorithm) as error:
        raise InvalidPeerCertificate(f"the peer's certificate cannot be parsed: {error}") from error
    if not isinstance(public_key, Ed25519PublicKey):
        raise InvalidPeerCertificate(
            f"the peer's certificate carries a {type(public_key).__name__}, not an Ed25519 key"
        )
    return certificate, public_key


def certificate_public_key(certificate_der: bytes | None) -> bytes:
    """The raw 32-byte Ed25519 public key in a DER certificate (``getpeercert(binary_form=True)``).

    This is the certificate's key only, which for a peer is its ephemeral TLS key: to learn and
    pin a peer's identity, use `certificate_identity`. Raises InvalidPeerCertificate when there
    is no certificate or it is not for an Ed25519 key.
    """
    _, public_key = _load(certificate_der)
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def certificate_identity(certificate_der: bytes | None, *, now: float | None = None) -> bytes:
    """The raw 32-byte identity public key that vouches for a peer's DER certificate.

    Checks that the certificate is for an Ed25519 key and self-signed by it, that it carries a
    well-formed delegation whose signature by the identity key covers this certificate's key,
    and that the delegation has not expired at `now` (seconds since the epoch; default the wall
    clock) and claims no more than `MAX_DELEGATION_LIFETIME`. Raises InvalidPeerCertificate
    saying which check failed. The pin is the fingerprint (SHA-256) of the returned key.
    """
    certificate, public_key = _load(certificate_der)
    tls_public = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    try:
        public_key.verify(certificate.signature, certificate.tbs_certificate_bytes)
    except InvalidSignature:
        raise InvalidPeerCertificate("the peer's certificate is not self-signed by its key") from None
    try:
        extension = certificate.extensions.get_extension_for_oid(DELEGATION_OID)
    except x509.ExtensionNotFound:
        raise InvalidPeerCertificate(
            "the peer's certificate carries no plugshare delegation (an old-style or foreign certificate)"
        ) from None
    except (ValueError, x509.DuplicateExtension) as error:
        raise InvalidPeerCertificate(f"the peer's certificate has bad extensions: {error}") from error
    if not isinstance(extension.value, x509.UnrecognizedExtension):  # pragma: no cover - our private OID
        raise InvalidPeerCertificate("the peer's delegation extension is not in the expected form")
    try:
        delegation = parse_delegation(extension.value.value)
    except ValueError as error:
        raise InvalidPeerCertificate(f"the peer's delegation is malformed: {error}") from error
    if not delegation.signs(tls_public):
        raise InvalidPeerCertificate(
            "the peer's delegation is not signed by the identity it names for the certificate's key"
        )
    now = time.time() if now is None else now
    if delegation.not_after <= now:
        expired = datetime.datetime.fromtimestamp(min(delegation.not_after, 253402300799), tz=datetime.timezone.utc)
        raise InvalidPeerCertificate(f"the peer's delegation expired at {expired:%Y-%m-%d %H:%M:%S} UTC")
    if delegation.not_after > now + MAX_DELEGATION_LIFETIME:
        raise InvalidPeerCertificate(
            f"the peer's delegation claims {(delegation.not_after - now) / 86400:.1f} more days, "
            f"over the {MAX_DELEGATION_LIFETIME / 86400:.0f}-day maximum"
        )
    return delegation.identity_public
