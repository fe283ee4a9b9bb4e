"""The token state sealed on untrusted storage (pure format + one durable write).

File `token.state`:

    magic "PLUGSHARE-TOKEN\\0" | format u16 | counter u64 | master id u32 |
    wrapped state key length u16 | wrapped state key | nonce (12) | AES-256-GCM ciphertext

The whole header (everything before the ciphertext) is the associated data, so the counter
and the key references cannot be changed without the tag failing. The state key is wrapped by
a keystore master key; the counter increases at every write and is also kept by the keystore
(the rollback anchor): a state whose counter is below the anchor is an old copy put back.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import RollbackError, TokenStateError
from .files import atomic_write, install, read_file, write_temp

STATE_FILE = "token.state"
MAGIC = b"PLUGSHARE-TOKEN\x00"
FORMAT = 1
_HEADER = struct.Struct(">16sHQIH")
_NONCE = 12
_TAG = 16


@attrs.frozen
class SealedState:
    """A parsed state file: header in clear, body still encrypted."""

    counter: int
    master_id: int
    wrapped_state_key: bytes
    aad: bytes
    nonce: bytes
    ciphertext: bytes


def seal(
    state_key: AESGCM, counter: int, master_id: int, wrapped_state_key: bytes, plaintext: bytes
) -> bytes:
    """The bytes of a state file holding `plaintext`."""
    header = _HEADER.pack(MAGIC, FORMAT, counter, master_id, len(wrapped_state_key))
    nonce = os.urandom(_NONCE)
    aad = header + wrapped_state_key + nonce
    return aad + state_key.encrypt(nonce, plaintext, aad)


def parse(blob: bytes, path: Path) -> SealedState:
    """Split a state file; `TokenStateError` if it is not one or is cut short."""
    if len(blob) < _HEADER.size:
        raise TokenStateError(f"token state {path} is truncated ({len(blob)} bytes)")
    magic, fmt, counter, master_id, key_len = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise TokenStateError(f"{path} is not a plugshare token state file")
    if fmt != FORMAT:
        raise TokenStateError(
            f"token state {path} has format {fmt}; this version reads format {FORMAT}"
        )
    body = _HEADER.size + key_len + _NONCE
    if len(blob) < body + _TAG:
        raise TokenStateError(f"token state {path} is truncated ({len(blob)} bytes)")
    return SealedState(
        counter=counter,
        master_id=master_id,
        wrapped_state_key=blob[_HEADER.size : _HEADER.size + key_len],
        aad=blob[:body],
        nonce=blob[body - _NONCE : body],
        ciphertext=blob[body:],
    )


def unseal(state_key: AESGCM, sealed: SealedState, path: Path) -> bytes:
    try:
        return state_key.decrypt(sealed.nonce, sealed.ciphertext, sealed.aad)
    except InvalidTag:
        raise TokenStateError(
            f"token state {path} fails authentication: it was modified, truncated or "
            "replaced by another token's state"
        ) from None


def check_anchor(counter: int, anchor: int, path: Path) -> None:
    """Refuse a state older than the keystore's anchor. A state newer than the anchor is the
    trace of a crash between writing the state and advancing the anchor (the state is
    authenticated, so nobody without the key can forge a higher counter)."""
    if counter < anchor:
        raise RollbackError(
            f"token state {path} is version {counter} but the keystore has seen version "
            f"{anchor}: an older copy of the state was put back (rollback); refusing it"
        )


def read(path: Path) -> SealedState:
    return parse(read_file(path, "token state", TokenStateError), path)


def write(path: Path, blob: bytes) -> None:
    atomic_write(path, blob)


def write_temp_state(path: Path, blob: bytes) -> str:
    """The first half of `write`: `blob` durable in a temporary file, `path` unchanged."""
    return write_temp(path, blob)


def install_state(tmp: str, path: Path) -> None:
    """The second half of `write`: the temporary file renamed over `path`, durably."""
    install(tmp, path)
