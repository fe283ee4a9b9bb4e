"""The token state sealed on untrusted storage (pure format + the slots it is written to).

A sealed state (format 2):

    magic "PLUGSHARE-TOKEN\\0" | format u16 | counter u64 | master id u32 |
    wrapped state key length u16 | ciphertext length u32 | wrapped state key | nonce (12) |
    AES-256-GCM ciphertext | (padding, ignored)

The whole header (everything before the ciphertext) is the associated data, so the counter,
the length and the key references cannot be changed without the tag failing. The state key is
wrapped by a keystore master key; the counter increases at every write and is also kept by
the keystore (the rollback anchor): a state whose counter is below the anchor is an old copy
put back.

Where it is written: two slot files, `token.state.0` and `token.state.1`, each rewritten in
place (pwrite + fdatasync; no temporary file, no rename, no directory fsync). A flush writes
the slot that does not hold the current state, so a crash that tears it leaves the other one,
the last durable state, intact. At open the newest slot that authenticates and is not below
the anchor wins (see `Token.open` for the rest of the rule). Each slot file is grown with
written zeros to a power of two, so that rewriting it changes no file metadata and costs one
data write and a cache flush.

Format 1 (`token.state`, one state per file, replaced by rename, no length field) is still
read; the first flush after opening one writes a slot, and once the anchor has passed it the
old file is removed.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import RollbackError, TokenStateError
from .files import fsync_dir, open_in_place, read_file, write_in_place

LEGACY_STATE_FILE = "token.state"  # format 1
SLOT_FILES = ("token.state.0", "token.state.1")
MAGIC = b"PLUGSHARE-TOKEN\x00"
FORMAT = 2
LEGACY_FORMAT = 1
_PREFIX = struct.Struct(">16sHQIH")  # common to both formats
_CT_LEN = struct.Struct(">I")  # format 2 only, right after the prefix
_NONCE = 12
_TAG = 16
SLOT_MIN_BYTES = 1 << 16


@attrs.frozen
class SealedState:
    """A parsed state: header in clear, body still encrypted."""

    counter: int
    master_id: int
    wrapped_state_key: bytes
    aad: bytes
    nonce: bytes
    ciphertext: bytes


def seal(
    state_key: AESGCM, counter: int, master_id: int, wrapped_state_key: bytes, plaintext: bytes
) -> bytes:
    """The bytes of a sealed state holding `plaintext` (format 2)."""
    header = _PREFIX.pack(MAGIC, FORMAT, counter, master_id, len(wrapped_state_key))
    header += _CT_LEN.pack(len(plaintext) + _TAG)
    nonce = os.urandom(_NONCE)
    aad = header + wrapped_state_key + nonce
    return aad + state_key.encrypt(nonce, plaintext, aad)


def parse(blob: bytes, path: Path) -> SealedState:
    """Split a sealed state; `TokenStateError` if it is not one or is cut short."""
    if len(blob) < _PREFIX.size:
        raise TokenStateError(f"token state {path} is truncated ({len(blob)} bytes)")
    magic, fmt, counter, master_id, key_len = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise TokenStateError(f"{path} is not a plugshare token state file")
    if fmt == LEGACY_FORMAT:
        body = _PREFIX.size + key_len + _NONCE
        end = len(blob)
    elif fmt == FORMAT:
        if len(blob) < _PREFIX.size + _CT_LEN.size:
            raise TokenStateError(f"token state {path} is truncated ({len(blob)} bytes)")
        (ct_len,) = _CT_LEN.unpack_from(blob, _PREFIX.size)
        body = _PREFIX.size + _CT_LEN.size + key_len + _NONCE
        end = body + ct_len
        if end > len(blob):
            raise TokenStateError(f"token state {path} is truncated ({len(blob)} bytes)")
    else:
        raise TokenStateError(
            f"token state {path} has format {fmt}; this version reads formats "
            f"{LEGACY_FORMAT} and {FORMAT}"
        )
    if end < body + _TAG:
        raise TokenStateError(f"token state {path} is truncated ({len(blob)} bytes)")
    return SealedState(
        counter=counter,
        master_id=master_id,
        wrapped_state_key=blob[body - _NONCE - key_len : body - _NONCE],
        aad=blob[:body],
        nonce=blob[body - _NONCE : body],
        ciphertext=blob[body:end],
    )


def unseal(state_key: AESGCM, sealed: SealedState, path: Path) -> bytes:
    try:
        return state_key.decrypt(sealed.nonce, sealed.ciphertext, sealed.aad)
    except InvalidTag:
        raise TokenStateError(
            f"token state {path} fails authentication: it was modified, truncated, torn by "
            "a crash, or replaced by another token's state"
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


@attrs.frozen
class Candidate:
    """One file that may hold the current state: a slot (0 or 1) or the format-1 file
    (slot None); `sealed` parsed, or `error` saying why it could not be."""

    path: Path
    slot: int | None
    sealed: SealedState | None
    error: TokenStateError | None


def candidates(state_dir: Path) -> list[Candidate]:
    """Every state file present in `state_dir` (none: the token was never created)."""
    found = []
    named = [(name, slot) for slot, name in enumerate(SLOT_FILES)]
    for name, slot in [*named, (LEGACY_STATE_FILE, None)]:
        path = state_dir / name
        if not path.exists():
            continue
        try:
            found.append(Candidate(path, slot, parse(read_file(path, "token state",
                                                                TokenStateError), path), None))
        except TokenStateError as exc:
            found.append(Candidate(path, slot, None, exc))
    return found


class StateSlots:
    """The two slot files of one state directory, kept open for in-place writes."""

    def __init__(self, state_dir: Path, current: int | None):
        self._dir = state_dir
        self.current = current  # the slot holding the newest durable state (None: neither)
        self._fds: list[int | None] = [None, None]

    @property
    def next(self) -> int:
        """The slot the next state goes to: never the one holding the newest durable one."""
        return 0 if self.current is None else 1 - self.current

    def path(self, slot: int) -> Path:
        return self._dir / SLOT_FILES[slot]

    def write(self, slot: int, blob: bytes) -> None:
        """`blob` durably in `slot` (the caller then makes it `current`)."""
        fd = self._fds[slot]
        if fd is None:
            fd = self._fds[slot] = open_in_place(self.path(slot))
        size = os.fstat(fd).st_size
        if len(blob) > size:  # grow with written zeros: later rewrites change no metadata
            capacity = max(SLOT_MIN_BYTES, 1 << (len(blob) - 1).bit_length())
            blob = blob + bytes(capacity - len(blob))
        write_in_place(fd, blob, 0)

    def close(self) -> None:
        for i, fd in enumerate(self._fds):
            if fd is not None:
                os.close(fd)
                self._fds[i] = None


def remove_legacy(state_dir: Path) -> None:
    """Drop the format-1 file once a slot and the anchor have passed it."""
    (state_dir / LEGACY_STATE_FILE).unlink(missing_ok=True)
    fsync_dir(state_dir)


def remove_all(state_dir: Path) -> None:
    """Undo a failed create."""
    for name in (*SLOT_FILES, LEGACY_STATE_FILE):
        (state_dir / name).unlink(missing_ok=True)
