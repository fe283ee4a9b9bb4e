"""Bearer credentials for the owner and local apps (pure).

A credential reads `ps1.<id>.<secret>`: `id` (16 hex) names the record, `secret` is 256
random bits (base64url). The token keeps only SHA-256 of the secret: with 256 bits of entropy
a slow hash adds nothing, and a stolen state cannot be turned back into a credential. The
record is found by id and the hash compared in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

import attrs

from .errors import AuthenticationError

_PREFIX = "ps1"
_DOMAIN = b"plugshare/credential/v1\x00"
SECRET_SIZE = 32


@attrs.frozen
class CredentialRecord:
    """What the token stores about a credential: never the secret itself."""

    id: str
    secret_hash: bytes


def _hash(secret: bytes) -> bytes:
    return hashlib.sha256(_DOMAIN + secret).digest()


def new_credential() -> tuple[str, CredentialRecord]:
    """A fresh credential string (to show once) and the record to store."""
    cid = secrets.token_hex(8)
    secret = secrets.token_bytes(SECRET_SIZE)
    text = f"{_PREFIX}.{cid}.{base64.urlsafe_b64encode(secret).decode('ascii').rstrip('=')}"
    return text, CredentialRecord(cid, _hash(secret))


def parse_credential(text: str) -> tuple[str, bytes]:
    """(record id, secret) of a credential string; `AuthenticationError` if malformed."""
    if not isinstance(text, str):
        raise AuthenticationError("malformed credential: expected a string")
    parts = text.strip().split(".")
    if len(parts) != 3 or parts[0] != _PREFIX:
        raise AuthenticationError("malformed credential: expected 'ps1.<id>.<secret>'")
    cid, encoded = parts[1], parts[2]
    try:
        secret = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except ValueError:
        raise AuthenticationError("malformed credential: secret is not base64url") from None
    if len(cid) != 16 or len(secret) != SECRET_SIZE:
        raise AuthenticationError("malformed credential: wrong length (truncated copy?)")
    return cid, secret


def matches(record: CredentialRecord, secret: bytes) -> bool:
    """Constant-time check of a secret against a stored record."""
    return hmac.compare_digest(record.secret_hash, _hash(secret))
