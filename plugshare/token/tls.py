"""TLS for peer links: a self-signed certificate carrying the node's Ed25519 key, and contexts.

A node's certificate only carries its public key; the identity is the key's fingerprint, never
a name or a CA. Both contexts are TLS 1.3 only and negotiate the ALPN protocol `ALPN_PROTOCOL`,
so a peer link cannot be confused with another TLS service on the same port.

How each side is authenticated
------------------------------
The server is authenticated by TLS: the client pins the fingerprint of the public key in the
server's certificate and refuses a mismatch before it sends any application byte. The client
context verifies no chain (there is none), but TLS 1.3 always checks the server's
CertificateVerify signature, so the server holds the key its certificate names.

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
connection of an invited node). So the client proves its key inside the link handshake: the
server sends a fresh nonce, the client signs (context, server fingerprint, nonce, client
fingerprint) and sends its public key; see `plugshare.replication.link`.

Private key material stays in this package: `server_ssl_context` takes the key object, and the
only copy that touches disk is encrypted with a one-time random password, in a private temporary
directory, and deleted as soon as OpenSSL has loaded it (``SSLContext`` loads keys only from
files).
"""

from __future__ import annotations

import datetime
import os
import secrets
import ssl
import tempfile

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

__all__ = [
    "ALPN_PROTOCOL",
    "InvalidPeerCertificate",
    "certificate_public_key",
    "client_ssl_context",
    "self_signed_certificate",
    "server_ssl_context",
]

ALPN_PROTOCOL = "plugshare/1"

# RFC 5280 4.1.2.5: this notAfter means "no well-defined expiration date". The key, not the
# certificate, is the identity, so the certificate never needs renewing.
_NO_EXPIRY = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)


class InvalidPeerCertificate(ValueError):
    """The peer's TLS certificate is missing, unparsable, or not for an Ed25519 key."""


def self_signed_certificate(private_key: Ed25519PrivateKey, *, common_name: str = "plugshare node") -> x509.Certificate:
    """A self-signed certificate for `private_key`'s public key, valid from yesterday on."""
    if not isinstance(private_key, Ed25519PrivateKey):
        raise TypeError(f"expected an Ed25519PrivateKey, got {type(private_key).__name__}")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    # A day of slack tolerates peers whose clocks run behind (nobody checks it today, but the
    # certificate should not be born in the future).
    not_before = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(_NO_EXPIRY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(private_key, algorithm=None)  # Ed25519 signs without a separate digest
    )


def _base_context(purpose: ssl.Purpose) -> ssl.SSLContext:
    protocol = ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols([ALPN_PROTOCOL])
    return context


def server_ssl_context(private_key: Ed25519PrivateKey, *, common_name: str = "plugshare node") -> ssl.SSLContext:
    """The accepting side's context: presents a self-signed certificate for `private_key`.

    It requests no client certificate; the client proves its key in the link handshake.
    """
    certificate = self_signed_certificate(private_key, common_name=common_name)
    context = _base_context(ssl.Purpose.CLIENT_AUTH)
    context.verify_mode = ssl.CERT_NONE
    context.num_tickets = 0  # no session resumption: every link does a full handshake
    password = secrets.token_urlsafe(32)
    key_pem = private_key.private_bytes(
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
    """The connecting side's context. It verifies no chain: the caller must pin the server's
    fingerprint from `certificate_public_key` before sending anything."""
    context = _base_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def certificate_public_key(certificate_der: bytes | None) -> bytes:
    """The raw 32-byte Ed25519 public key in a DER certificate (``getpeercert(binary_form=True)``).

    Raises InvalidPeerCertificate when there is no certificate or it is not for an Ed25519 key.
    """
    if not certificate_der:
        raise InvalidPeerCertificate("the peer presented no certificate")
    try:
        public_key = x509.load_der_x509_certificate(certificate_der).public_key()
    except (ValueError, UnsupportedAlgorithm) as error:
        raise InvalidPeerCertificate(f"the peer's certificate cannot be parsed: {error}") from error
    if not isinstance(public_key, Ed25519PublicKey):
        raise InvalidPeerCertificate(
            f"the peer's certificate carries a {type(public_key).__name__}, not an Ed25519 key"
        )
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
