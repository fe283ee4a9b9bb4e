"""Carrying share keys from one token to another (pure; identities come in).

A wrapped share key is sealed to the recipient's X25519 key and signed by the sender:

    "PSK1" | sender Ed25519 public key (32) | ephemeral X25519 public key (32) |
    nonce (12) | AES-256-GCM ciphertext of the msgpack list of keys | Ed25519 signature (64)

The AEAD key is HKDF-SHA256(X25519(ephemeral, recipient), salt = ephemeral public key,
info = context), where the context names the sender fingerprint, the recipient fingerprint,
the recipient's X25519 key and the share id; the context is also the AEAD's associated data
and part of what is signed. So only the intended recipient can open it, for that share only,
and it verifiably comes from the sender the recipient expects (by fingerprint).

Everything the signature covers but the plaintext is public (fingerprints, the recipient's
X25519 key as listed in the share manifest, the share id), so anyone can check with
`verify_wrapped` that a wrapped key was made by a given sender for a given recipient and share
without opening it: that is what lets members forward key grants to each other.
"""

from __future__ import annotations

import hmac
import os
import struct

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import AuthenticationError, IntegrityError, InvalidArgument
from .identity import Identity, fingerprint_of, verify_signature

MAGIC = b"PSK1"
# Every context, hence every message a sender signs here, starts with this.
SIGNING_DOMAIN = b"plugshare/share-key/v1\x00"
_NONCE = 12
_HEAD = len(MAGIC) + 32 + 32 + _NONCE
_SIG = 64


def _context(sender_fp: bytes, recipient_fp: bytes, recipient_x25519: bytes, share_id: str) -> bytes:
    sid = share_id.encode("utf-8")
    return SIGNING_DOMAIN + sender_fp + recipient_fp + recipient_x25519 + struct.pack(">H", len(sid)) + sid


def _aead_key(shared: bytes, ephemeral_public: bytes, context: bytes) -> AESGCM:
    return AESGCM(HKDF(hashes.SHA256(), 32, salt=ephemeral_public, info=context).derive(shared))


def wrap_keys(
    sender: Identity,
    share_id: str,
    keys: list[bytes],
    recipient_x25519_public: bytes,
    recipient_fingerprint: bytes,
) -> bytes:
    """Seal `keys` (the share's keys, oldest first) for one recipient."""
    if len(recipient_x25519_public) != 32:
        raise InvalidArgument("a recipient X25519 public key is 32 raw bytes")
    if len(recipient_fingerprint) != 32:
        raise InvalidArgument("a recipient fingerprint is 32 bytes")
    ephemeral = X25519PrivateKey.generate()
    eph_public = ephemeral.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    try:
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient_x25519_public))
    except ValueError:
        raise InvalidArgument("the recipient X25519 public key is not a usable key") from None
    context = _context(sender.fingerprint, recipient_fingerprint, recipient_x25519_public, share_id)
    nonce = os.urandom(_NONCE)
    ct = _aead_key(shared, eph_public, context).encrypt(
        nonce, msgpack.packb(keys, use_bin_type=True), context
    )
    body = MAGIC + sender.public_key_bytes + eph_public + nonce + ct
    return body + sender.sign(context + body)


def _split(wrapped: bytes) -> tuple[bytes, bytes, bytes]:
    """(body, signature, sender public key) of a well-formed wrapped key."""
    if not isinstance(wrapped, bytes) or len(wrapped) < _HEAD + 16 + _SIG or (
        wrapped[: len(MAGIC)] != MAGIC
    ):
        raise IntegrityError("wrapped share key is malformed or truncated")
    body = wrapped[:-_SIG]
    return body, wrapped[-_SIG:], body[4:36]


def verify_wrapped(
    wrapped: bytes,
    share_id: str,
    sender_fingerprint: bytes,
    recipient_fingerprint: bytes,
    recipient_x25519_public: bytes,
) -> None:
    """Check, without opening it, that `wrapped` was made by `sender_fingerprint` for that
    recipient (and its X25519 key) and share: `AuthenticationError` if not, `IntegrityError`
    if malformed."""
    body, signature, sender_public = _split(wrapped)
    if not hmac.compare_digest(fingerprint_of(sender_public), sender_fingerprint):
        raise AuthenticationError("wrapped share key was not made by the expected sender")
    context = _context(sender_fingerprint, recipient_fingerprint, recipient_x25519_public, share_id)
    if not verify_signature(sender_public, context + body, signature):
        raise AuthenticationError(
            "wrapped share key signature does not verify: altered, or meant for another "
            "recipient or share"
        )


def unwrap_keys(
    recipient: Identity, share_id: str, wrapped: bytes, sender_fingerprint: bytes
) -> list[bytes]:
    """The keys sealed by `wrap_keys`; `AuthenticationError` if not from the expected sender
    or not for this recipient and share, `IntegrityError` if damaged."""
    body, signature, sender_public = _split(wrapped)
    eph_public = body[36:68]
    nonce, ct = body[68:_HEAD], body[_HEAD:]
    if not hmac.compare_digest(fingerprint_of(sender_public), sender_fingerprint):
        raise AuthenticationError("wrapped share key was not made by the expected sender")
    context = _context(
        sender_fingerprint, recipient.fingerprint, recipient.x25519_public_bytes, share_id
    )
    if not verify_signature(sender_public, context + body, signature):
        raise AuthenticationError(
            "wrapped share key signature does not verify: altered, or meant for another "
            "recipient or share"
        )
    try:
        shared = recipient.exchange(eph_public)
        plain = _aead_key(shared, eph_public, context).decrypt(nonce, ct, context)
        keys = msgpack.unpackb(plain, raw=False)
    except (InvalidTag, ValueError):
        raise IntegrityError("wrapped share key does not decrypt with this node's key") from None
    if not isinstance(keys, list) or not keys or not all(
        isinstance(k, bytes) and len(k) == 32 for k in keys
    ):
        raise IntegrityError("wrapped share key holds no valid keys")
    return keys
