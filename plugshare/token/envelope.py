"""Document envelopes: a document's body sealed under a data key (pure; keys come in).

A sealed document keeps in clear only what the store and the rules need: `_id`, `_rev`,
`_deleted`, the revision bookkeeping `_revisions`/`_conflicts`, and the rule fields
`doctype`, `author`, `subject`. Everything else is msgpack-encoded and sealed with
AES-256-GCM into one field:

    "plugshare:sealed": {"v": 1, "kid": <key id>, "nonce": <base64>, "ct": <base64>}

The associated data binds the ciphertext to the key id, doctype, document id, revision
generation (the number before the dash in `_rev`) and the clear `author`/`subject`, so a
flipped bit, a ciphertext copied into another document, another revision generation or
another doctype, or edited clear metadata all fail with `IntegrityError`.

A document's `_attachments` stubs stay in clear beside the envelope (the store resolves
them); when there are any, their names, digests, lengths and content types are bound into
the associated data too, so a stub swapped, added or removed fails alike. (A document
without attachments binds exactly what it did before: older envelopes still open.)

Key ids are derived from the key and its scope (`doctype:<name>` or `share:<id>`), so every
member of a share names the share key alike without coordination.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import IntegrityError, InvalidArgument

ENVELOPE_FIELD = "plugshare:sealed"
ENVELOPE_VERSION = 1
CLEAR_FIELDS = frozenset(
    {"_id", "_rev", "_deleted", "_revisions", "_conflicts", "_attachments", "doctype", "author",
     "subject"}
)
_KID_DOMAIN = b"plugshare/kid/v1\x00"
_AD_DOMAIN = b"plugshare/doc/v1\x00"
_NONCE = 12


class DocKey:
    """An unwrapped data key, as released to the node in release mode."""

    __slots__ = ("kid", "aead")

    def __init__(self, kid: str, key: bytes):
        self.kid = kid
        self.aead = AESGCM(key)

    def __repr__(self) -> str:
        return f"DocKey(kid={self.kid!r})"


def key_id(scope: str, key: bytes) -> str:
    """The public name of a data key: a hash of its scope and value (128 bits, hex)."""
    return hashlib.sha256(_KID_DOMAIN + scope.encode("utf-8") + b"\x00" + key).hexdigest()[:32]


def generation_of(rev: object) -> int:
    """The generation N of a revision id `N-<hash>`."""
    if isinstance(rev, str):
        head, sep, _ = rev.partition("-")
        if sep and head.isdigit():
            return int(head)
    raise IntegrityError(f"revision {rev!r} is not of the form N-<hash>")


def _meta(value: Any) -> Any:
    """A clear rule field as bound into the associated data: strings and null as they are,
    anything else as canonical JSON (tagged, so it cannot collide with a string)."""
    if value is None or type(value) is str:
        return value
    return ["json", json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)]


def _attachments_bound(doc_id: Any, attachments: Any) -> list[list[Any]]:
    """What the associated data binds of a document's attachment stubs: per name (sorted),
    its digest, length and content type (the data itself is checked against the digest)."""
    if not isinstance(attachments, Mapping):
        raise IntegrityError(f"document {doc_id!r}: _attachments is not an object")
    bound = []
    for name in sorted(attachments):
        stub = attachments[name]
        if not isinstance(name, str) or not isinstance(stub, Mapping):
            raise IntegrityError(f"document {doc_id!r}: malformed attachment stub {name!r}")
        bound.append([name, stub.get("digest"), stub.get("length"), stub.get("content_type")])
    return bound


def _aad(kid: str, doctype: str, doc_id: str, generation: int, clear: Mapping[str, Any]) -> bytes:
    fields = [ENVELOPE_VERSION, kid, doctype, doc_id, generation,
              _meta(clear.get("author")), _meta(clear.get("subject"))]
    if clear.get("_attachments"):  # absent or empty: the binding of documents without files
        fields.append(_attachments_bound(doc_id, clear["_attachments"]))
    return _AD_DOMAIN + msgpack.packb(fields, use_bin_type=True)


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def is_sealed(doc: Mapping[str, Any]) -> bool:
    return ENVELOPE_FIELD in doc


def sealed_kid(stored: Mapping[str, Any]) -> str:
    """The key id a sealed document names; `IntegrityError` if the envelope is malformed."""
    env = stored.get(ENVELOPE_FIELD)
    if not isinstance(env, Mapping) or not isinstance(env.get("kid"), str):
        raise IntegrityError(
            f"document {stored.get('_id')!r}: field {ENVELOPE_FIELD!r} is not a valid envelope"
        )
    return env["kid"]


def seal_doc(doc: Mapping[str, Any], key: DocKey, generation: int) -> dict[str, Any]:
    """`doc` with its body sealed under `key` for revision generation `generation`."""
    if not isinstance(doc, Mapping):
        raise InvalidArgument(f"a document is a JSON object, got {type(doc).__name__}")
    doc_id, doctype = doc.get("_id"), doc.get("doctype")
    if not isinstance(doc_id, str) or not doc_id:
        raise InvalidArgument("a document to encrypt needs its '_id'")
    if not isinstance(doctype, str) or not doctype:
        raise InvalidArgument(f"document {doc_id!r} needs a 'doctype' field to be encrypted")
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < 1:
        raise InvalidArgument(f"generation must be an integer >= 1, got {generation!r}")
    if ENVELOPE_FIELD in doc:
        raise InvalidArgument(f"document {doc_id!r} is already sealed")
    clear: dict[str, Any] = {}
    body: dict[str, Any] = {}
    for k, v in doc.items():
        (clear if k in CLEAR_FIELDS else body)[k] = v
    try:
        plaintext = msgpack.packb(body, use_bin_type=True)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"document {doc_id!r} is not JSON-like: {exc}") from None
    nonce = os.urandom(_NONCE)
    ct = key.aead.encrypt(nonce, plaintext, _aad(key.kid, doctype, doc_id, generation, clear))
    clear[ENVELOPE_FIELD] = {"v": ENVELOPE_VERSION, "kid": key.kid, "nonce": _b64(nonce), "ct": _b64(ct)}
    return clear


def open_doc(stored: Mapping[str, Any], key: DocKey) -> dict[str, Any]:
    """The plaintext document of a sealed one (the release-mode helper).
    `IntegrityError` if it was altered, moved, or sealed under another key."""
    doc_id = stored.get("_id")
    env = stored.get(ENVELOPE_FIELD)
    if not isinstance(env, Mapping) or env.get("v") != ENVELOPE_VERSION:
        raise IntegrityError(f"document {doc_id!r}: {ENVELOPE_FIELD!r} is not a v1 envelope")
    if env.get("kid") != key.kid:
        raise IntegrityError(
            f"document {doc_id!r} is sealed under key {env.get('kid')!r}, not {key.kid!r}"
        )
    doctype = stored.get("doctype")
    if not isinstance(doc_id, str) or not isinstance(doctype, str):
        raise IntegrityError(f"sealed document {doc_id!r} lacks its '_id' or 'doctype'")
    generation = generation_of(stored.get("_rev"))
    try:
        nonce = binascii.a2b_base64(env["nonce"], strict_mode=True)
        ct = binascii.a2b_base64(env["ct"], strict_mode=True)
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise IntegrityError(f"document {doc_id!r}: envelope nonce/ct are not base64") from None
    try:
        plaintext = key.aead.decrypt(nonce, ct, _aad(key.kid, doctype, doc_id, generation, stored))
    except (InvalidTag, ValueError):
        raise IntegrityError(
            f"document {doc_id!r} (generation {generation}, doctype {doctype!r}) fails "
            "authentication: altered, or copied from another document, revision or doctype"
        ) from None
    doc = {k: v for k, v in stored.items() if k != ENVELOPE_FIELD}
    doc.update(msgpack.unpackb(plaintext, raw=False))
    return doc
