"""Share manifests: who is in a share, what it holds, signed by its owner (pure: no I/O, no keys).

A manifest names the share (id, name), its owner (key fingerprint and raw Ed25519 public key:
a fingerprint alone cannot check a signature), the rule selecting its documents, whether they
are encrypted, its members and a version. The owner is always the first member, active, with
write permission. Only the owner signs; every member's token checks a manifest with
`accept_update` before acting on it, which refuses anything unsigned, forged, for another
share or owner, or not newer than what it already holds (replay, rollback).

Optional fields, each signed with the rest and left out of the encoding when absent (so a
manifest made before they existed keeps its exact signed bytes): the share's `expires` (unix
time after which members lose access), its `key_id` (the newest share key, for an encrypted
share: a member holding the manifest but not that key knows it lacks the current key), and
per member its `x25519` public key (so the owner can wrap new share keys to it) and its
membership `expires`.

Versions only go up: each change (`with_member`, `revoke`, `leave`) makes version + 1, unsigned
until the owner `sign`s it. A revoked member stays listed (so its later writes are refused with
a reason, and `share show` lists it); a member who leaves is removed and may be invited again.

The signed bytes are a domain-separation prefix followed by the msgpack encoding of `to_dict()`
without the signature, every map with its keys sorted: one byte string per manifest content.
"""

from __future__ import annotations

import base64
import math
import secrets
from collections.abc import Callable, Mapping
from typing import Any, Literal

import attrs
import msgpack

from plugshare.errors import PlugshareError
from plugshare.token.identity import fingerprint_of, format_node_id

SIGNING_DOMAIN = b"plugshare manifest v1\x00"
FINGERPRINT_SIZE = 32
PUBLIC_KEY_SIZE = 32
MAX_TEXT = 200  # share names, member names, doctypes, share ids
MAX_SELECTOR_DEPTH = 16
_MAX_VERSION = 2**63 - 1

Permission = Literal["read", "write"]
Status = Literal["active", "revoked"]
PERMISSIONS = ("read", "write")
STATUSES = ("active", "revoked")

SignFn = Callable[[bytes], bytes]
VerifyFn = Callable[[bytes, bytes, bytes], bool]  # (owner public key, data, signature)


class ManifestError(PlugshareError, ValueError):
    """A manifest is malformed, or cannot be taken as the next state of a share."""


class MalformedManifest(ManifestError):
    """A field is missing, unknown or of the wrong type or value."""


class MembershipError(ManifestError):
    """A membership change makes no sense (already a member, not a member, the owner...)."""


class UnsignedManifest(ManifestError):
    """The manifest carries no signature."""


class BadSignature(ManifestError):
    """The signature does not verify, or the key carried is not the owner's."""


class OwnerChanged(ManifestError):
    """The manifest names another owner than the one of the share held."""


class ShareIdChanged(ManifestError):
    """The manifest is for another share than the one held."""


class StaleManifest(ManifestError):
    """The manifest is older than the one held: a replay or a rollback."""


class ConflictingManifest(ManifestError):
    """Same version as the one held but different content: a forgery (or an owner bug)."""


# --- validation ---------------------------------------------------------------------------


def _check_text(what: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise MalformedManifest(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > MAX_TEXT:
        raise MalformedManifest(f"{what} is {len(value)} characters long; the limit is {MAX_TEXT}")
    if not value.isprintable() or value != value.strip():
        raise MalformedManifest(
            f"{what} {value!r} must not contain control characters or surrounding spaces"
        )


def _text(what: str) -> Callable[[Any, Any, Any], None]:
    return lambda _inst, _attr, value: _check_text(what, value)


def _bytes_of(what: str, size: int) -> Callable[[Any, Any, Any], None]:
    def check(_inst: Any, _attr: Any, value: object) -> None:
        if not isinstance(value, bytes) or len(value) != size:
            got = f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
            raise MalformedManifest(f"{what} must be {size} bytes, got {got}")

    return check


def _one_of(what: str, choices: tuple[str, ...]) -> Callable[[Any, Any, Any], None]:
    def check(_inst: Any, _attr: Any, value: object) -> None:
        if value not in choices:
            raise MalformedManifest(f"{what} must be one of {', '.join(choices)}; got {value!r}")

    return check


def _instance(what: str, kind: type) -> Callable[[Any, Any, Any], None]:
    def check(_inst: Any, _attr: Any, value: object) -> None:
        if not isinstance(value, kind):
            raise MalformedManifest(f"{what} must be a {kind.__name__}, got {value!r}")

    return check


def _check_expires(what: str) -> Callable[[Any, Any, Any], None]:
    def check(_inst: Any, _attr: Any, value: object) -> None:
        if value is None:
            return
        if not isinstance(value, float) or not math.isfinite(value) or not 0 <= value < 2**63:
            raise MalformedManifest(f"{what} must be unix seconds (a finite number) or None, "
                                    f"got {value!r}")

    return check


def _time_or_none(value: object) -> object:
    """Expiry times are kept as floats (so one value has one encoding); others are left for
    the validator to refuse."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _optional_bytes_of(what: str, size: int) -> Callable[[Any, Any, Any], None]:
    check = _bytes_of(what, size)

    def optional(inst: Any, attr: Any, value: object) -> None:
        if value is not None:
            check(inst, attr, value)

    return optional


def _check_key_id(_inst: Any, _attr: Any, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not 1 <= len(value) <= 64 or not all(
        c in "0123456789abcdef" for c in value
    ):
        raise MalformedManifest(f"key id must be lowercase hex text or None, got {value!r:.80}")


def _json_copy(value: Any, where: str, depth: int = 0) -> Any:
    """A deep copy of a JSON value, refusing anything JSON or msgpack cannot carry exactly."""
    if depth > MAX_SELECTOR_DEPTH:
        raise MalformedManifest(f"selector is nested deeper than {MAX_SELECTOR_DEPTH} levels")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise MalformedManifest(f"selector value at {where} is out of the 64-bit range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MalformedManifest(f"selector value at {where} is {value}, not a JSON number")
        return value
    if isinstance(value, (list, tuple)):
        return [_json_copy(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise MalformedManifest(f"selector key {k!r} at {where} is not a string")
            out[k] = _json_copy(v, f"{where}.{k}", depth + 1)
        return out
    raise MalformedManifest(f"selector value at {where} is a {type(value).__name__}, not JSON")


def _selector_copy(value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise MalformedManifest(f"a selector is a JSON object or null, got {type(value).__name__}")
    return _json_copy(value, "selector")


def _canonical(value: Any) -> Any:
    """`value` with every map's keys in sorted order (msgpack keeps insertion order)."""
    if isinstance(value, Mapping):
        return {k: _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


# --- models -------------------------------------------------------------------------------


MAX_MEMBER_RELAYS = 4


def _check_relays(_inst: object, _attr: attrs.Attribute, value: tuple[str, ...]) -> None:
    from plugshare.relay.identity import RelayAddress

    if not isinstance(value, tuple) or len(value) > MAX_MEMBER_RELAYS:
        raise MalformedManifest(f"a member names at most {MAX_MEMBER_RELAYS} relays")
    for relay in value:
        try:
            RelayAddress.parse(relay)
        except ValueError as exc:
            raise MalformedManifest(f"member relay: {exc}") from None


def _relay_tuple(value: object) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise MalformedManifest("member relays are a list of ID@HOST:PORT texts")
    return tuple(value)


@attrs.frozen
class Member:
    """One member of a share, known by its key fingerprint."""

    fingerprint: bytes = attrs.field(validator=_bytes_of("member fingerprint", FINGERPRINT_SIZE))
    name: str = attrs.field(validator=_text("member name"))
    permission: Permission = attrs.field(validator=_one_of("member permission", PERMISSIONS))
    status: Status = attrs.field(default="active", validator=_one_of("member status", STATUSES))
    # Its X25519 public key (as it gave it when joining), for wrapping share keys to it.
    x25519: bytes | None = attrs.field(
        default=None, validator=_optional_bytes_of("member X25519 key", PUBLIC_KEY_SIZE)
    )
    # When its membership ends (unix seconds), or None.
    expires: float | None = attrs.field(
        default=None, converter=_time_or_none, validator=_check_expires("member expiry")
    )
    # The relays it said it is reached through when it joined (ID@HOST:PORT), so the other
    # members find it behind NAT while the owner is away; signed like the rest. Left out of
    # the dict when empty, so manifests without relays encode and verify as before.
    relays: tuple[str, ...] = attrs.field(default=(), converter=_relay_tuple, validator=_check_relays)

    @property
    def node_id(self) -> str:
        return format_node_id(self.fingerprint)

    def is_expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "fingerprint": self.fingerprint.hex(),
            "name": self.name,
            "permission": self.permission,
            "status": self.status,
        }
        if self.x25519 is not None:
            d["x25519"] = self.x25519.hex()
        if self.expires is not None:
            d["expires"] = self.expires
        if self.relays:
            d["relays"] = list(self.relays)
        return d

    @classmethod
    def from_dict(cls, data: object) -> Member:
        d = _fields(data, "member", ("fingerprint", "name", "permission", "status"),
                    ("x25519", "expires", "relays"))
        x25519 = d.get("x25519")
        return cls(_hex(d["fingerprint"], "member fingerprint"), d["name"], d["permission"],
                   d["status"], None if x25519 is None else _hex(x25519, "member X25519 key"),
                   d.get("expires"), d.get("relays", ()))


MAX_ATTACHMENT_TYPES = 64


def _check_size_cap(_inst: Any, _attr: Any, value: object) -> None:
    if value is not None and (type(value) is not int or value < 0):
        raise MalformedManifest(f"max_attachment_size must be an integer >= 0, not {value!r}")


def _types_copy(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) > MAX_ATTACHMENT_TYPES:
        raise MalformedManifest(
            f"attachment_types must be a list of at most {MAX_ATTACHMENT_TYPES} content types")
    types = []
    for item in value:
        if not isinstance(item, str) or not 0 < len(item) <= 255 or "/" not in item \
                or not item.isascii():
            raise MalformedManifest(f"attachment type {item!r} is not like 'image/png' "
                                    "or 'image/*'")
        types.append(item.strip().lower())
    return tuple(types)


@attrs.frozen
class ShareRule:
    """Which documents a share holds: all of one doctype, optionally only those matching a
    Mango-style selector (evaluated by the token's rule engine)."""

    doctype: str = attrs.field(validator=_text("doctype"))
    selector: dict[str, Any] | None = attrs.field(default=None, converter=_selector_copy)
    # Caps on the documents' attachments (None: no cap). Written to the manifest only when
    # set, so a rule without them signs the same bytes as before they existed.
    max_attachment_size: int | None = attrs.field(default=None, validator=_check_size_cap)
    attachment_types: tuple[str, ...] | None = attrs.field(
        default=None, converter=_types_copy)

    def to_dict(self) -> dict[str, Any]:
        d = {"doctype": self.doctype, "selector": _json_copy(self.selector, "selector")}
        if self.max_attachment_size is not None:
            d["max_attachment_size"] = self.max_attachment_size
        if self.attachment_types is not None:
            d["attachment_types"] = list(self.attachment_types)
        return d

    @classmethod
    def from_dict(cls, data: object) -> ShareRule:
        d = _fields(data, "rule", ("doctype", "selector"),
                    ("max_attachment_size", "attachment_types"))
        return cls(d["doctype"], d["selector"], d.get("max_attachment_size"),
                   d.get("attachment_types"))

    def attachment_refusal(self, content_type: str) -> str | None:
        """Why an attachment of `content_type` is refused by this rule, or None. A type
        pattern is a full type (`image/png`) or a family (`image/*`); parameters are
        ignored."""
        if self.attachment_types is None:
            return None
        bare = content_type.split(";", 1)[0].strip().lower()
        family = bare.split("/", 1)[0] + "/*"
        if bare in self.attachment_types or family in self.attachment_types:
            return None
        return (f"content type {bare!r} is not one the share allows "
                f"({', '.join(self.attachment_types)})")




def _check_members(manifest: Manifest, _attr: Any, members: tuple[Member, ...]) -> None:
    if not isinstance(members, tuple) or not all(isinstance(m, Member) for m in members):
        raise MalformedManifest("members must be a tuple of Member")
    seen: set[bytes] = set()
    for m in members:
        if m.fingerprint in seen:
            raise MalformedManifest(f"member {m.node_id} is listed twice")
        seen.add(m.fingerprint)
    first = members[0] if members else None
    if (
        first is None
        or first.fingerprint != manifest.owner
        or first.permission != "write"
        or first.status != "active"
    ):
        raise MalformedManifest("the owner must be the first member, active, with write permission")


def _check_owner_key(manifest: Manifest, _attr: Any, key: bytes) -> None:
    _bytes_of("owner public key", PUBLIC_KEY_SIZE)(manifest, _attr, key)
    if fingerprint_of(key) != manifest.owner:
        raise MalformedManifest("the owner public key does not match the owner fingerprint")


def _check_version(_inst: Any, _attr: Any, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_VERSION:
        raise MalformedManifest(f"version must be a positive integer, got {value!r}")


def _check_signature(_inst: Any, _attr: Any, value: object) -> None:
    if value is not None and (not isinstance(value, bytes) or not value):
        raise MalformedManifest("signature must be non-empty bytes or None")


@attrs.frozen
class Manifest:
    """The signed description of a share. Build the first one with `Manifest.create`."""

    share_id: str = attrs.field(validator=_text("share id"))
    name: str = attrs.field(validator=_text("share name"))
    owner: bytes = attrs.field(validator=_bytes_of("owner fingerprint", FINGERPRINT_SIZE))
    owner_key: bytes = attrs.field(validator=_check_owner_key)
    rule: ShareRule = attrs.field(validator=_instance("rule", ShareRule))
    encrypted: bool = attrs.field(validator=_instance("encrypted", bool))
    members: tuple[Member, ...] = attrs.field(converter=tuple, validator=_check_members)
    version: int = attrs.field(validator=_check_version)
    signature: bytes | None = attrs.field(default=None, validator=_check_signature)
    # When the share ends for its members (unix seconds), or None.
    expires: float | None = attrs.field(
        default=None, converter=_time_or_none, validator=_check_expires("share expiry"),
        kw_only=True,
    )
    # The newest share key's id (encrypted shares only), or None.
    key_id: str | None = attrs.field(default=None, validator=_check_key_id, kw_only=True)

    def __attrs_post_init__(self) -> None:
        if self.key_id is not None and not self.encrypted:
            raise MalformedManifest("only an encrypted share's manifest names a key id")

    @classmethod
    def create(
        cls,
        *,
        name: str,
        owner_key: bytes,
        owner_name: str,
        rule: ShareRule,
        encrypted: bool = False,
        share_id: str | None = None,
        expires: float | None = None,
        key_id: str | None = None,
    ) -> Manifest:
        """Version 1 of a new share (unsigned), with the owner as its only member."""
        if not isinstance(owner_key, bytes) or len(owner_key) != PUBLIC_KEY_SIZE:
            raise MalformedManifest(f"owner public key must be {PUBLIC_KEY_SIZE} bytes")
        owner = fingerprint_of(owner_key)
        return cls(
            share_id=share_id if share_id is not None else new_share_id(),
            name=name,
            owner=owner,
            owner_key=owner_key,
            rule=rule,
            encrypted=encrypted,
            members=(Member(owner, owner_name, "write", "active"),),
            version=1,
            expires=expires,
            key_id=key_id,
        )

    # --- membership queries ---

    def member(self, fingerprint: bytes) -> Member | None:
        """The member with this fingerprint, active or revoked; None if not listed."""
        for m in self.members:
            if m.fingerprint == fingerprint:
                return m
        return None

    def is_active_member(self, fingerprint: bytes) -> bool:
        m = self.member(fingerprint)
        return m is not None and m.status == "active"

    def may_write(self, fingerprint: bytes) -> bool:
        m = self.member(fingerprint)
        return m is not None and m.status == "active" and m.permission == "write"

    def active_members(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.status == "active")

    def is_expired(self, now: float) -> bool:
        """The share itself has expired at `now` (for its members; the owner keeps its data)."""
        return self.expires is not None and now >= self.expires

    # --- encoding ---

    def to_dict(self) -> dict[str, Any]:
        """A JSON- and msgpack-friendly dict (bytes as lowercase hex). `expires` and `key_id`
        appear only when set."""
        d = {
            "share_id": self.share_id,
            "name": self.name,
            "owner": self.owner.hex(),
            "owner_key": self.owner_key.hex(),
            "rule": self.rule.to_dict(),
            "encrypted": self.encrypted,
            "members": [m.to_dict() for m in self.members],
            "version": self.version,
            "signature": None if self.signature is None else self.signature.hex(),
        }
        if self.expires is not None:
            d["expires"] = self.expires
        if self.key_id is not None:
            d["key_id"] = self.key_id
        return d

    @classmethod
    def from_dict(cls, data: object) -> Manifest:
        """The manifest `to_dict` wrote; `MalformedManifest` naming the first bad field."""
        d = _fields(data, "manifest", _MANIFEST_KEYS, _MANIFEST_OPTIONAL)
        members = d["members"]
        if not isinstance(members, list):
            raise MalformedManifest(f"members must be a list, got {type(members).__name__}")
        signature = d["signature"]
        return cls(
            share_id=d["share_id"],
            name=d["name"],
            owner=_hex(d["owner"], "owner fingerprint"),
            owner_key=_hex(d["owner_key"], "owner public key"),
            rule=ShareRule.from_dict(d["rule"]),
            encrypted=d["encrypted"],
            members=tuple(Member.from_dict(m) for m in members),
            version=d["version"],
            signature=None if signature is None else _hex(signature, "signature"),
            expires=d.get("expires"),
            key_id=d.get("key_id"),
        )

    def signed_bytes(self) -> bytes:
        """What the owner signs: the content, canonically encoded, without the signature."""
        content = self.to_dict()
        del content["signature"]
        return SIGNING_DOMAIN + msgpack.packb(_canonical(content), use_bin_type=True)


_MANIFEST_KEYS = (
    "share_id", "name", "owner", "owner_key", "rule", "encrypted", "members", "version",
    "signature",
)
_MANIFEST_OPTIONAL = ("expires", "key_id")


def _fields(
    data: object, what: str, keys: tuple[str, ...], optional: tuple[str, ...] = ()
) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise MalformedManifest(f"a {what} is a map, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in keys and k not in optional)
    if unknown:
        raise MalformedManifest(f"{what} has unknown field(s): {', '.join(unknown)}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise MalformedManifest(f"{what} lacks field(s): {', '.join(missing)}")
    return data


def _hex(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise MalformedManifest(f"{what} must be a hex string, got {type(value).__name__}")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise MalformedManifest(f"{what} {value!r} is not hex") from None


def new_share_id() -> str:
    """A fresh random share id: 128 bits, 26 lowercase base32 characters."""
    return base64.b32encode(secrets.token_bytes(16)).decode("ascii").rstrip("=").lower()


# --- signing and verifying ----------------------------------------------------------------


def sign(manifest: Manifest, sign_fn: SignFn) -> Manifest:
    """The manifest with its owner's signature (`sign_fn` is the owner's token `sign`)."""
    return attrs.evolve(manifest, signature=sign_fn(manifest.signed_bytes()))


def verify(manifest: Manifest, verify_fn: VerifyFn) -> None:
    """Raise `UnsignedManifest` or `BadSignature` unless the owner signed this very content.

    The key checked is the one the manifest carries, which construction already tied to the
    owner fingerprint (SHA-256 of the key), so a forger cannot substitute its own key.
    """
    if manifest.signature is None:
        raise UnsignedManifest(
            f"manifest v{manifest.version} of share {manifest.name!r} is not signed"
        )
    if fingerprint_of(manifest.owner_key) != manifest.owner:  # re-checked: cheap, and vital
        raise BadSignature("the manifest's owner key does not match its owner fingerprint")
    if not verify_fn(manifest.owner_key, manifest.signed_bytes(), manifest.signature):
        raise BadSignature(
            f"manifest v{manifest.version} of share {manifest.name!r} has a signature that does "
            f"not verify with owner {format_node_id(manifest.owner)}'s key"
        )


def accept_update(
    current: Manifest | None,
    incoming: Manifest,
    verify_fn: VerifyFn,
    *,
    expected_share_id: str | None = None,
    expected_owner: bytes | None = None,
) -> Manifest:
    """The manifest to hold after receiving `incoming` while holding `current`.

    `incoming` must be signed by the owner, for the same share and owner as `current` (or as
    `expected_share_id` / `expected_owner`, e.g. from an invitation, for a first manifest)
    and newer. The same version with the same content is a no-op (returns `current`); the
    same version with other content is a `ConflictingManifest`.
    """
    verify(incoming, verify_fn)
    share_id = current.share_id if current is not None else expected_share_id
    owner = current.owner if current is not None else expected_owner
    if share_id is not None and incoming.share_id != share_id:
        raise ShareIdChanged(
            f"manifest is for share id {incoming.share_id!r}, expected {share_id!r}"
        )
    if owner is not None and incoming.owner != owner:
        raise OwnerChanged(
            f"manifest of share {incoming.share_id!r} is owned by "
            f"{format_node_id(incoming.owner)}, expected {format_node_id(owner)}"
        )
    if current is None:
        return incoming
    if incoming.version < current.version:
        raise StaleManifest(
            f"manifest v{incoming.version} of share {incoming.name!r} is older than the v"
            f"{current.version} held (replay or rollback); ignored"
        )
    if incoming.version == current.version:
        if incoming.signed_bytes() == current.signed_bytes():
            return current
        raise ConflictingManifest(
            f"manifest v{incoming.version} of share {incoming.name!r} differs from the v"
            f"{current.version} held: refused as a forgery"
        )
    return incoming


# --- next versions ------------------------------------------------------------------------


def _next(manifest: Manifest, members: tuple[Member, ...]) -> Manifest:
    if manifest.version >= _MAX_VERSION:
        raise MembershipError("the manifest version cannot go higher")
    return attrs.evolve(manifest, members=members, version=manifest.version + 1, signature=None)


def with_member(
    manifest: Manifest, fingerprint: bytes, name: str, permission: Permission, *,
    x25519: bytes | None = None, expires: float | None = None, relays: tuple[str, ...] = (),
) -> Manifest:
    """The next version with `fingerprint` as an active member (a revoked one is re-admitted
    with the new name, permission, X25519 key, expiry and relays)."""
    new = Member(fingerprint, name, permission, "active", x25519, expires, relays)
    existing = manifest.member(fingerprint)
    if existing is None:
        return _next(manifest, (*manifest.members, new))
    if existing.status == "active":
        raise MembershipError(
            f"{new.node_id} is already an active member of share {manifest.name!r}"
        )
    return _next(manifest, tuple(new if m is existing else m for m in manifest.members))


def revoke(manifest: Manifest, fingerprint: bytes) -> Manifest:
    """The next version with that member revoked (kept in the list, status `revoked`)."""
    m = _changeable(manifest, fingerprint, "revoke")
    if m.status == "revoked":
        raise MembershipError(f"member {m.name!r} of share {manifest.name!r} is already revoked")
    revoked = attrs.evolve(m, status="revoked")
    return _next(manifest, tuple(revoked if x is m else x for x in manifest.members))


def leave(manifest: Manifest, fingerprint: bytes) -> Manifest:
    """The next version without that member (it asked to leave; the owner signs)."""
    m = _changeable(manifest, fingerprint, "leave")
    return _next(manifest, tuple(x for x in manifest.members if x is not m))


def with_key_id(manifest: Manifest, key_id: str) -> Manifest:
    """`manifest` (still unsigned: a next version) naming `key_id` as the newest share key."""
    if manifest.signature is not None:
        raise MembershipError("set the key id on the next version, before signing it")
    return attrs.evolve(manifest, key_id=key_id)


def _changeable(manifest: Manifest, fingerprint: bytes, action: str) -> Member:
    if fingerprint == manifest.owner:
        raise MembershipError(
            f"the owner cannot {action} share {manifest.name!r}; it lives as long as its owner"
        )
    m = manifest.member(fingerprint)
    if m is None:
        who = format_node_id(fingerprint) if len(fingerprint) == FINGERPRINT_SIZE else fingerprint
        raise MembershipError(f"{who} is not a member of share {manifest.name!r}")
    return m
