"""Where the master keys live: one interface, two implementations.

- `SoftKeystore` (soft_keystore.py): master keys in a file, wrapped by a key derived from a
  passphrase (scrypt), or, unattended, by a random key file next to it.
- `Pkcs11Keystore` (pkcs11_keystore.py): master keys generated inside a PKCS#11 device as
  non-extractable AES keys; every wrap and unwrap runs in the device.

A master key never leaves its keystore: the token hands it 32-byte keys (the state key, data
keys) to wrap and gets them back by unwrapping, each bound to a context string. Master keys
are numbered; rotation adds a new one and the token destroys old ones once nothing it holds
is wrapped by them. The keystore also keeps the rollback anchor: the highest state version
the token has written, stored apart from the state file.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import ClassVar

from .errors import KeystoreError

KEY_SIZE = 32


class Keystore(abc.ABC):
    """The master-key holder the token uses; see module docstring."""

    kind: ClassVar[str]

    @abc.abstractmethod
    def create(self) -> int:
        """Make a new keystore with master key 1 and anchor 0; return 1. Refuses (with
        `KeystoreError`) if this keystore already holds keys. Leaves it open."""

    @abc.abstractmethod
    def open(self) -> None:
        """Unlock an existing keystore. `WrongSecretError` for a wrong passphrase or PIN,
        `KeystoreError` if missing or misconfigured."""

    @abc.abstractmethod
    def close(self) -> None:
        """Forget the unlocked keys / end the device session. Idempotent."""

    @abc.abstractmethod
    def destroy(self) -> None:
        """Remove every key and the anchor (undoing a failed create). Irreversible."""

    @abc.abstractmethod
    def master_key_ids(self) -> list[int]:
        """Ids of the master keys present, ascending."""

    @abc.abstractmethod
    def new_master_key(self) -> int:
        """Generate a new master key; return its id (higher than every existing one)."""

    @abc.abstractmethod
    def destroy_master_key(self, master_id: int) -> None:
        """Delete a master key nothing is wrapped by any more."""

    @abc.abstractmethod
    def wrap(self, master_id: int, key: bytes, context: bytes) -> bytes:
        """Encrypt-and-authenticate `key` under master `master_id`, bound to `context`."""

    @abc.abstractmethod
    def unwrap(self, master_id: int, wrapped: bytes, context: bytes) -> bytes:
        """The key `wrap` was given; `IntegrityError` if `wrapped` or `context` differ,
        `KeystoreError` if the master key is gone."""

    @abc.abstractmethod
    def read_anchor(self) -> int:
        """The highest state version recorded; `TokenStateError` if the anchor is missing
        or fails authentication."""

    @abc.abstractmethod
    def advance_anchor(self, counter: int) -> None:
        """Record `counter` as the highest state version (never goes down), durably: the
        token calls it once the state it names is durable, and sends the answers that state
        settled only after it returns."""

    @abc.abstractmethod
    def describe(self) -> str:
        """A short human description for status output and error messages."""


def read_secret_source(source: str, what: str) -> str:
    """A secret named by `env:VAR` or `file:PATH` (trailing newline stripped)."""
    kind, sep, rest = source.partition(":")
    if not sep or not rest or kind not in ("env", "file"):
        raise KeystoreError(f"{what} source must be 'env:VARIABLE' or 'file:PATH', got {source!r}")
    if kind == "env":
        value = os.environ.get(rest)
        if value is None:
            raise KeystoreError(f"{what} expected in environment variable {rest}, which is not set")
        return value
    try:
        return Path(rest).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise KeystoreError(f"cannot read {what} from {rest}: {exc.strerror}") from None
