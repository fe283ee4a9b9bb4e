"""Node identity: the Ed25519 signing key, the X25519 agreement key, and the node id.

The node id is the SHA-256 fingerprint of the raw Ed25519 public key, written for humans the
way Syncthing writes device ids: base32 (RFC 4648, no padding), cut into four chunks of 13
characters, each followed by a Luhn mod 32 check character, shown as eight dash-separated
groups of seven. The check characters catch any single mistyped character and most swaps of
neighbours, so `parse_node_id` refuses typos instead of silently naming another node.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from .errors import InvalidArgument, InvalidNodeIdError

FINGERPRINT_SIZE = 32
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_INDEX = {c: i for i, c in enumerate(_ALPHABET)}
_CHUNK = 13  # 52 base32 characters = 4 chunks of 13
_GROUP = 7  # 56 characters with checks = 8 groups of 7
NODE_ID_CHARS = 56

CHALLENGE_DOMAIN = b"plugshare/peer-challenge/v1\x00"


# --- fingerprints and node ids ------------------------------------------------------------


def fingerprint_of(public_key: bytes) -> bytes:
    """SHA-256 of a raw 32-byte Ed25519 public key: the node's identity."""
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise InvalidArgument(
            f"an Ed25519 public key is {PUBLIC_KEY_SIZE} raw bytes, got {len(public_key)}"
        )
    return hashlib.sha256(public_key).digest()


def _luhn32(chunk: str) -> str:
    """Luhn mod N check character (N = 32) for a chunk of base32 characters."""
    factor, total = 2, 0
    for ch in reversed(chunk):
        addend = factor * _INDEX[ch]
        total += addend // 32 + addend % 32
        factor = 3 - factor
    return _ALPHABET[-total % 32]


def format_node_id(fingerprint: bytes) -> str:
    """The readable, check-summed form of a 32-byte fingerprint."""
    if len(fingerprint) != FINGERPRINT_SIZE:
        raise InvalidArgument(f"a fingerprint is {FINGERPRINT_SIZE} bytes, got {len(fingerprint)}")
    b32 = base64.b32encode(fingerprint).decode("ascii").rstrip("=")
    chunks = [b32[i : i + _CHUNK] for i in range(0, len(b32), _CHUNK)]
    checked = "".join(chunk + _luhn32(chunk) for chunk in chunks)
    return "-".join(checked[i : i + _GROUP] for i in range(0, len(checked), _GROUP))


def parse_node_id(text: str) -> bytes:
    """The fingerprint named by a node id; dashes, spaces and case do not matter.

    Raises `InvalidNodeIdError` saying what is wrong: length, a character outside base32, or
    a chunk whose check character does not match (a typo).
    """
    if not isinstance(text, str):
        raise InvalidNodeIdError(f"a node id is a string, got {type(text).__name__}")
    compact = "".join(text.split()).replace("-", "").upper()
    if len(compact) != NODE_ID_CHARS:
        raise InvalidNodeIdError(
            f"node id {text!r} has {len(compact)} characters without dashes, expected "
            f"{NODE_ID_CHARS} (8 groups of 7)"
        )
    for pos, ch in enumerate(compact):
        if ch not in _INDEX:
            raise InvalidNodeIdError(
                f"node id {text!r} has {ch!r} at position {pos + 1}; "
                "only letters A-Z and digits 2-7 occur in node ids"
            )
    b32 = []
    for n in range(4):
        block = compact[n * (_CHUNK + 1) : (n + 1) * (_CHUNK + 1)]
        chunk, check = block[:_CHUNK], block[_CHUNK]
        if _luhn32(chunk) != check:
            raise InvalidNodeIdError(
                f"node id {text!r}: characters {n * (_CHUNK + 1) + 1}-{(n + 1) * (_CHUNK + 1)} "
                "fail their check character (a typo?)"
            )
        b32.append(chunk)
    raw = base64.b32decode("".join(b32) + "====")
    if format_node_id(raw).replace("-", "") != compact:
        # The last base32 character carries 2 padding bits that must be zero.
        raise InvalidNodeIdError(f"node id {text!r} is not the canonical encoding of a key")
    return raw


def coerce_fingerprint(value: bytes | str) -> bytes:
    """A fingerprint from either its 32 raw bytes or its node id string."""
    if isinstance(value, (bytes, bytearray)):
        if len(value) != FINGERPRINT_SIZE:
            raise InvalidArgument(f"a fingerprint is {FINGERPRINT_SIZE} bytes, got {len(value)}")
        return bytes(value)
    return parse_node_id(value)


# --- signatures ---------------------------------------------------------------------------


def verify_signature(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """True when `signature` is a valid Ed25519 signature of `data` by `public_key`."""
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def challenge_message(challenge: bytes, context: bytes) -> bytes:
    """What a peer signs to answer a challenge: domain-separated, bound to a context (the
    verifier's fingerprint and, where available, a TLS channel binding) so an answer cannot
    be replayed to another verifier or relayed over another connection."""
    return CHALLENGE_DOMAIN + hashlib.sha256(context).digest() + challenge


class Identity:
    """The node's two key pairs. The private halves stay inside: nothing here returns them,
    except `_private_bytes` for sealing into the token state and `_signing_key` for the TLS
    helpers of this package."""

    __slots__ = ("_signing", "_agreement", "public_key_bytes", "x25519_public_bytes", "fingerprint")

    def __init__(self, signing: Ed25519PrivateKey, agreement: X25519PrivateKey):
        self._signing = signing
        self._agreement = agreement
        raw = serialization.Encoding.Raw
        self.public_key_bytes: bytes = signing.public_key().public_bytes(
            raw, serialization.PublicFormat.Raw
        )
        self.x25519_public_bytes: bytes = agreement.public_key().public_bytes(
            raw, serialization.PublicFormat.Raw
        )
        self.fingerprint: bytes = fingerprint_of(self.public_key_bytes)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    @classmethod
    def _from_private_bytes(cls, signing: bytes, agreement: bytes) -> Identity:
        return cls(
            Ed25519PrivateKey.from_private_bytes(signing),
            X25519PrivateKey.from_private_bytes(agreement),
        )

    def _private_bytes(self) -> tuple[bytes, bytes]:
        raw = serialization.Encoding.Raw
        fmt, none = serialization.PrivateFormat.Raw, serialization.NoEncryption()
        return (
            self._signing.private_bytes(raw, fmt, none),
            self._agreement.private_bytes(raw, fmt, none),
        )

    @property
    def node_id(self) -> str:
        return format_node_id(self.fingerprint)

    def sign(self, data: bytes) -> bytes:
        return self._signing.sign(data)

    def exchange(self, peer_x25519_public: bytes) -> bytes:
        """X25519 shared secret with a peer's agreement public key."""
        if len(peer_x25519_public) != PUBLIC_KEY_SIZE:
            raise InvalidArgument(
                f"an X25519 public key is {PUBLIC_KEY_SIZE} raw bytes, got {len(peer_x25519_public)}"
            )
        return self._agreement.exchange(X25519PublicKey.from_public_bytes(peer_x25519_public))

    def _signing_key(self) -> Ed25519PrivateKey:
        return self._signing
