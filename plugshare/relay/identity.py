"""Who is who on a relay (pure): the relay's own key and id, the `ID@host:port` address nodes
pin it by, and the proof a joining node gives of its node id.

The relay's id is the SHA-256 of its raw Ed25519 public key, written like a node id. A node
checks it against the key of the relay's TLS certificate (TLS 1.3 proves the relay holds it).

A joining node proves its id with its *delegated TLS certificate* (the one its peer listener
presents, certified by its token) and a signature by that certificate's key over
`join_payload`: the relay verifies the certificate exactly as a peer does
(`certificate_identity`), so it learns the node id from the certificate, and only a holder of
a key that node's token certified can join under that id. The identity key stays in the token.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from plugshare.relay.protocol import Join, join_payload
from plugshare.token.identity import format_node_id, parse_node_id
from plugshare.token.tls import InvalidPeerCertificate, certificate_identity, certificate_public_key

__all__ = ["InvalidJoin", "RelayAddress", "join_message", "relay_id_of", "verify_join", "load_or_create_key"]


class InvalidJoin(ValueError):
    """A Join whose certificate or signature does not prove a node id."""


def relay_id_of(public_key: bytes) -> bytes:
    return hashlib.sha256(public_key).digest()


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@attrs.frozen
class RelayAddress:
    """`ID@HOST:PORT`: where a relay listens, and the id its TLS key must have."""

    relay_id: bytes
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> RelayAddress:
        """ValueError saying what is wrong, for anything but `ID@HOST:PORT`."""
        if not isinstance(text, str):
            raise ValueError(f"a relay address is a string, got {type(text).__name__}")
        ident, at, rest = text.partition("@")
        host, colon, port = rest.rpartition(":")
        host = host.strip("[]")
        if not at or not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"{text!r} is not a relay address ID@HOST:PORT (the relay prints it when it starts)")
        try:
            relay_id = parse_node_id(ident)
        except ValueError as error:
            raise ValueError(f"{text!r}: the relay id is not valid: {error}") from None
        return cls(relay_id, host, int(port))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{format_node_id(self.relay_id)}@{host}:{self.port}"


def join_message(tls_key: Ed25519PrivateKey, certificate_der: bytes, *, relay_id: bytes, nonce: bytes,
                 node_id: bytes) -> Join:
    """The Join a node sends: its certificate, and its TLS key's signature of the payload."""
    return Join(certificate=certificate_der, signature=tls_key.sign(join_payload(relay_id, nonce, node_id)))


def verify_join(join: Join, *, relay_id: bytes, nonce: bytes, now: float | None = None) -> bytes:
    """The node id `join` proves, or InvalidJoin saying why not."""
    try:
        node_id = hashlib.sha256(certificate_identity(join.certificate, now=now)).digest()
        tls_public = certificate_public_key(join.certificate)
    except InvalidPeerCertificate as error:
        raise InvalidJoin(str(error)) from None
    try:
        Ed25519PublicKey.from_public_bytes(tls_public).verify(join.signature, join_payload(relay_id, nonce, node_id))
    except (InvalidSignature, ValueError):
        raise InvalidJoin("the join signature is not the certificate key's over this relay's challenge") from None
    return node_id


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The relay's key from `path` (PEM, PKCS#8), created 0600 on first use."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        path.parent.mkdir(parents=True, exist_ok=True)
        import os

        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(pem)
        return key
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return _raw(key)
