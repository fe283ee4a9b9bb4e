"""Attachment chunks sealed under a share's or a sensitive doctype's data key (pure; keys
come in, inside the token only).

An attachment of a document in an encrypted share, or of a sensitive doctype, is stored and
sent as sealed chunks. Each chunk is sealed on its own with AES-256-GCM under a key derived
from the data key (HKDF-SHA256, so the chunk key is never the document key), with the
associated data binding it to the key's scope (`share:<id>` or `doctype:<name>`), the
document id, the attachment name, its revpos, the chunk's index and whether it is the last
one. So a flipped bit, a chunk moved to another index (reordered), copied into another
attachment, document, revision or share (swapped), or a file cut short at a chunk boundary
all fail to open with `IntegrityError`.

A sealed chunk is `MAGIC || kid (16 bytes) || nonce (12) || ciphertext+tag`: it names its
key, so a share's key rotation leaves older chunks readable. Seal plaintext pieces of
`PLAINTEXT_CHUNK` bytes: a sealed chunk is then exactly one store chunk (`CHUNK_SIZE`), so
chunk i of the stored, sealed attachment is sealed chunk i, checkable on its own where it
arrives.

Content addresses: a sealed chunk's address is an HMAC-SHA256 of its plaintext under a
second key derived from the same data key, so members of one share can tell they hold a
chunk already, while the address reveals nothing of the plaintext to anyone without the key
(no "does this node hold that file" by hashing a known file), and differs between shares.
"""

from __future__ import annotations

import hashlib
import hmac
import os

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import IntegrityError, InvalidArgument

MAGIC = b"PSC1"
_KID_BYTES = 16
_NONCE = 12
_TAG = 16
OVERHEAD = len(MAGIC) + _KID_BYTES + _NONCE + _TAG
CHUNK_SIZE = 256 * 1024  # the store's chunk size (store.attachments.CHUNK_SIZE; a test checks)
PLAINTEXT_CHUNK = CHUNK_SIZE - OVERHEAD
_AD_DOMAIN = b"plugshare/chunk/v1\x00"


def _derive(key: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"plugshare/" + purpose + b"/v1").derive(key)


class ChunkKeys:
    """The two keys derived from one data key: sealing and addressing."""

    __slots__ = ("kid", "_aead", "_mac_key")

    def __init__(self, kid: str, data_key: bytes) -> None:
        if len(bytes.fromhex(kid)) != _KID_BYTES:
            raise InvalidArgument(f"a key id is {_KID_BYTES} bytes in hex, not {kid!r}")
        self.kid = kid
        self._aead = AESGCM(_derive(data_key, b"chunk-seal"))
        self._mac_key = _derive(data_key, b"chunk-address")

    def __repr__(self) -> str:
        return f"ChunkKeys(kid={self.kid!r})"

    def address(self, plaintext: bytes) -> bytes:
        """The keyed content address of a chunk's plaintext."""
        return hmac.new(self._mac_key, plaintext, hashlib.sha256).digest()

    def seal(self, scope: str, doc_id: str, name: str, revpos: int, index: int, last: bool,
             plaintext: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        ad = _aad(self.kid, scope, doc_id, name, revpos, index, last)
        return MAGIC + bytes.fromhex(self.kid) + nonce + self._aead.encrypt(nonce, plaintext, ad)

    def open(self, scope: str, doc_id: str, name: str, revpos: int, index: int, last: bool,
             sealed: bytes) -> bytes:
        if sealed_kid(sealed) != self.kid:
            raise IntegrityError(f"chunk {index} of {name!r} of {doc_id!r} is sealed under "
                                 f"another key than {self.kid}")
        start = len(MAGIC) + _KID_BYTES
        nonce, ciphertext = sealed[start : start + _NONCE], sealed[start + _NONCE :]
        try:
            return self._aead.decrypt(nonce, ciphertext,
                                      _aad(self.kid, scope, doc_id, name, revpos, index, last))
        except (InvalidTag, ValueError):
            raise IntegrityError(
                f"chunk {index} of attachment {name!r} of {doc_id!r} (revpos {revpos}) fails "
                "authentication: altered, reordered, cut short, or from another attachment, "
                "document, revision or share"
            ) from None


def clear_length(sealed_length: int) -> int:
    """The clear length of an attachment whose sealed data is `sealed_length` bytes."""
    return sealed_length - -(-sealed_length // CHUNK_SIZE) * OVERHEAD


def sealed_kid(sealed: bytes) -> str:
    """The key id a sealed chunk names; `IntegrityError` when it is no sealed chunk."""
    if not isinstance(sealed, bytes) or len(sealed) < OVERHEAD or not sealed.startswith(MAGIC):
        raise IntegrityError("not a sealed chunk")
    return sealed[len(MAGIC) : len(MAGIC) + _KID_BYTES].hex()


def _aad(kid: str, scope: str, doc_id: str, name: str, revpos: int, index: int,
         last: bool) -> bytes:
    return _AD_DOMAIN + msgpack.packb([1, kid, scope, doc_id, name, revpos, index, last],
                                      use_bin_type=True)
