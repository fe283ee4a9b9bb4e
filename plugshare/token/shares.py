"""The share book: the token's side of sharing, as pure logic over the token state.

The token keeps, for every share it knows (created, or joined with an invitation), the newest
manifest it accepted, whether this node left it, and (at the owner) the invitations it issued.
`ShareBook` works on those fields of `TokenState` in place and answers the questions the
network and replication layers ask, with the manifests parsed and their selectors compiled once
per version. It does no I/O, signs nothing and writes no audit entry: `Token` does that around
it (sign with its identity, audit each decision, seal the state).

The manifest and invitation models live in `plugshare.sharing`; those modules import the
token's identity helpers, so this module refers to them as modules and only uses their contents
when called, never at import time (either package may be imported first).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import msgpack

from plugshare.sharing import invitation as _invitation
from plugshare.sharing import manifest as _manifest

from .envelope import CLEAR_FIELDS, is_sealed, sealed_kid
from .errors import (
    InvitationRefused,
    LeaveRequestRefused,
    AccessDenied,
    IntegrityError,
    InvalidArgument,
    InvalidNodeIdError,
    NotFound,
    RuleError,
    TokenStateError,
)
from .identity import (
    FINGERPRINT_SIZE,
    PUBLIC_KEY_SIZE,
    fingerprint_of,
    format_node_id,
    parse_node_id,
)
from .principal import Decision
from .rules import Predicate, compile_selector
from .state import InvitationRecord, ShareRecord, TokenState

if TYPE_CHECKING:
    from plugshare.sharing.invitation import HostPort, Invitation
    from plugshare.sharing.manifest import Manifest, Member, ShareRule

LEAVE_PURPOSE = "plugshare/leave-request/v1"
# What a member signs to leave: this prefix, then msgpack [share id, fingerprint, version].
LEAVE_DOMAIN = LEAVE_PURPOSE.encode("ascii") + b"\x00"
# Expired invitation records are kept this long, so a late use is told "expired", not "unknown".
INVITATION_GRACE = 7 * 86400
# Fields a sealed document keeps in clear that a selector may test (see envelope.py).
CLEAR_RULE_FIELDS = frozenset(f for f in CLEAR_FIELDS if not f.startswith("_"))
# The field of a removal (see `removal`): the id of the share the document left. A removal is
# a tombstone that only that share carries.
REMOVAL_FIELD = "left_share"
_REMOVAL_DOMAIN = b"plugshare/removal/v1\x00"
_X25519_SIZE = 32

SignFn = Callable[[bytes], bytes]


def reserved_signing_prefixes() -> tuple[bytes, ...]:
    """Prefixes only the token signs under (manifests, leave requests): `Token.sign` refuses
    them, so nothing signed for a caller can pass for a membership decision."""
    return (_manifest.SIGNING_DOMAIN, LEAVE_DOMAIN)


# --- building and checking --------------------------------------------------------------------


def share_rule(doctype: str, selector: Mapping[str, Any] | None, *, encrypted: bool,
               max_attachment_size: int | None = None,
               attachment_types: list[str] | None = None) -> ShareRule:
    """The rule of a new share; `RuleError` for a malformed selector, or for an encrypted
    share's selector that tests fields sealed away (it could never match a stored document)."""
    if selector is not None and not isinstance(selector, Mapping):
        raise RuleError(f"a selector is a JSON object, got {type(selector).__name__}: {selector!r}")
    compile_selector(selector)
    if encrypted and selector:
        fields = set(_selector_fields(selector))
        hidden = sorted(f for f in fields if f.split(".")[0] not in CLEAR_RULE_FIELDS)
        if hidden:
            raise RuleError(
                f"an encrypted share's selector may only test the fields kept in clear "
                f"({', '.join(sorted(CLEAR_RULE_FIELDS))}); {', '.join(hidden)} would be sealed"
            )
    try:
        return _manifest.ShareRule(doctype, selector or None,  # {} selects every document
                                   max_attachment_size, attachment_types)
    except _manifest.MalformedManifest as exc:
        raise RuleError(str(exc)) from None


def _selector_fields(selector: Mapping[str, Any]) -> Iterator[str]:
    """The field paths a (compiled, hence well-formed) selector tests."""
    for key, value in selector.items():
        if key in ("$and", "$or"):
            for branch in value:
                yield from _selector_fields(branch)
        elif key == "$not":
            yield from _selector_fields(value)
        else:
            yield key


def draft_manifest(
    name: str, owner_key: bytes, owner_name: str, rule: ShareRule, encrypted: bool,
    *, expires: float | None = None,
) -> Manifest:
    """Version 1 of a new share, not yet signed (nor naming its key)."""
    try:
        return _manifest.Manifest.create(
            name=name, owner_key=owner_key, owner_name=owner_name, rule=rule, encrypted=encrypted,
            expires=expires,
        )
    except _manifest.MalformedManifest as exc:
        raise InvalidArgument(str(exc)) from None


def new_manifest(
    name: str, owner_key: bytes, owner_name: str, rule: ShareRule, encrypted: bool, sign_fn: SignFn
) -> Manifest:
    """Version 1 of a new share, signed by its owner."""
    return _manifest.sign(draft_manifest(name, owner_key, owner_name, rule, encrypted), sign_fn)


def check_expiry(what: str, value: object, now: float) -> float | None:
    """An expiry time (unix seconds) as a float, or None; `InvalidArgument` if it is not a
    finite number or is not after `now`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        0 <= value < 2**63
    ) or value != value:
        raise InvalidArgument(f"{what} is unix seconds (a number) or None, got {value!r}")
    if value <= now:
        raise InvalidArgument(f"{what} {value} is not in the future (now is {now:.0f})")
    return float(value)


def accept(
    current: Manifest | None,
    incoming: object,
    verify_fn: Callable[[bytes, bytes, bytes], bool],
    *,
    share_id: str | None = None,
    owner: bytes | None = None,
) -> Manifest:
    """`manifest.accept_update`, refusing anything that is not a `Manifest` first."""
    if not isinstance(incoming, _manifest.Manifest):
        raise _manifest.MalformedManifest(
            f"expected a Manifest, got {type(incoming).__name__} (decode one with "
            "Manifest.from_dict)"
        )
    return _manifest.accept_update(
        current, incoming, verify_fn, expected_share_id=share_id, expected_owner=owner
    )


def check_joiner(
    public_key: object, name: object, x25519: object, owner_fingerprint: bytes
) -> bytes:
    """The joiner's fingerprint, once its keys and member name are well formed."""
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_SIZE:
        raise InvalidArgument(f"a joiner's Ed25519 public key is {PUBLIC_KEY_SIZE} raw bytes")
    if not isinstance(x25519, bytes) or len(x25519) != _X25519_SIZE:
        raise InvalidArgument(f"a joiner's X25519 public key is {_X25519_SIZE} raw bytes")
    fingerprint = fingerprint_of(public_key)
    if fingerprint == owner_fingerprint:
        raise InvalidArgument("the owner of a share cannot join it: it is its first member")
    try:
        _manifest.Member(fingerprint, name, "read")  # the manifest's rules for a member name
    except _manifest.MalformedManifest as exc:
        raise InvalidArgument(str(exc)) from None
    return fingerprint


def new_invitation(
    owner: bytes, addresses: Iterable[HostPort], share_id: str, permission: str, ttl: int,
    now: float, relays: Iterable[tuple[bytes, str, int]] = (),
) -> Invitation:
    """A fresh invitation; the invitation module's errors for bad fields."""
    if isinstance(ttl, int) and not isinstance(ttl, bool) and ttl > _invitation.MAX_TTL:
        raise _invitation.InvalidTtl(
            f"an invitation is valid for at most {_invitation.MAX_TTL // 86400} days, "
            f"got {ttl} seconds"
        )
    return _invitation.Invitation.new(
        owner, addresses, share_id, permission, ttl, now=now, relays=relays  # type: ignore[arg-type]
    )


def is_invitation(value: object) -> bool:
    return isinstance(value, _invitation.Invitation)


def resolve_member(manifest: Manifest, who: str | bytes) -> Member:
    """The member named by `who`: its fingerprint (32 bytes or 64 hex digits), node id, or
    member name. `NotFound` if none; `InvalidArgument` if a name is ambiguous."""
    if isinstance(who, (bytes, bytearray)):
        if len(who) != FINGERPRINT_SIZE:
            raise InvalidArgument(f"a fingerprint is {FINGERPRINT_SIZE} bytes, got {len(who)}")
        fingerprint: bytes | None = bytes(who)
        label = format_node_id(bytes(who))
    elif isinstance(who, str):
        fingerprint, label = _fingerprint_in(who), repr(who)
    else:
        raise InvalidArgument(f"a member is named by node id, fingerprint or name, not {who!r}")
    if fingerprint is None:
        named = [m for m in manifest.members if m.name == who]
        if len(named) > 1:
            ids = ", ".join(m.node_id for m in named)
            raise InvalidArgument(
                f"{len(named)} members of share {manifest.name!r} are named {who!r}; "
                f"name one by node id ({ids})"
            )
        member = named[0] if named else None
    else:
        member = manifest.member(fingerprint)
    if member is None:
        raise NotFound(f"share {manifest.name!r} has no member {label}")
    return member


def _fingerprint_in(text: str) -> bytes | None:
    """The fingerprint a node id or 64 hex digits spell, or None (then it is a name)."""
    if len(text) == 2 * FINGERPRINT_SIZE:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    try:
        return parse_node_id(text)
    except InvalidNodeIdError:
        return None


# --- leave requests -----------------------------------------------------------------------------


def leave_statement(share_id: str, member: bytes, version: int) -> bytes:
    """The bytes a member signs to ask the owner to remove it from a share."""
    return LEAVE_DOMAIN + msgpack.packb([share_id, member, version], use_bin_type=True)


def leave_request(share_id: str, member: bytes, version: int, signature: bytes) -> dict[str, Any]:
    """A leave request as a JSON- and msgpack-friendly dict."""
    return {
        "purpose": LEAVE_PURPOSE,
        "share_id": share_id,
        "member": member.hex(),
        "version": version,
        "signature": signature.hex(),
    }


def parse_leave_request(request: object) -> tuple[str, bytes, int, bytes]:
    """(share id, member fingerprint, manifest version, signature) of a leave request dict;
    `InvalidArgument` naming what is malformed."""
    keys = ("purpose", "share_id", "member", "version", "signature")
    if not isinstance(request, Mapping) or set(request) != set(keys):
        raise InvalidArgument(f"a leave request is a map with exactly the fields {', '.join(keys)}")
    if request["purpose"] != LEAVE_PURPOSE:
        raise InvalidArgument(f"not a leave request: purpose is {request['purpose']!r}")
    share_id, version = request["share_id"], request["version"]
    if not isinstance(share_id, str) or not share_id:
        raise InvalidArgument("a leave request names its share id as text")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidArgument(f"a leave request's version is a positive integer, got {version!r}")
    try:
        member = bytes.fromhex(request["member"])
        signature = bytes.fromhex(request["signature"])
    except (TypeError, ValueError):
        raise InvalidArgument("a leave request's member and signature are hex strings") from None
    if len(member) != FINGERPRINT_SIZE:
        raise InvalidArgument(f"a leave request's member is a {FINGERPRINT_SIZE}-byte fingerprint")
    return share_id, member, version, signature


# --- the book -----------------------------------------------------------------------------------


@attrs.frozen
class _Entry:
    """One share as held, with what the hot paths need precomputed for its version."""

    manifest: Manifest
    record: ShareRecord
    predicate: Predicate | None
    here: bool  # this node is an active member and has not left (expiry aside)
    writers: dict[bytes, Decision]  # active members with write permission -> the allow answer
    # When this node stops taking part (the share's expiry, and at a member its own
    # membership's), or None: see `active_at`.
    until: float | None

    def active_at(self, now: float) -> bool:
        return self.here and (self.until is None or now < self.until)


def _earliest(*times: float | None) -> float | None:
    known = [t for t in times if t is not None]
    return min(known) if known else None


class ShareBook:
    """Every share this token knows, and its invitations, over `TokenState` (changed in place;
    the token marks the state dirty and seals it)."""

    def __init__(self, state: TokenState, self_fingerprint: bytes):
        self._state = state
        self._self = self_fingerprint
        self._entries: dict[str, _Entry] = {}
        # active members of the shares this node is in -> until when (None: no expiry)
        self._peers: dict[bytes, float | None] = {}
        for share_id, record in state.shares.items():
            try:
                manifest = _manifest.Manifest.from_dict(record.manifest)
                self._entries[share_id] = self._entry(manifest, record)
            except (_manifest.ManifestError, RuleError) as exc:
                raise TokenStateError(
                    f"share {share_id!r} in the token state is unusable: {exc}"
                ) from None
        self._index_peers()

    def _entry(self, manifest: Manifest, record: ShareRecord) -> _Entry:
        writers = {
            m.fingerprint: Decision(
                True,
                f"{m.name!r} may write to share {manifest.name!r} (manifest v{manifest.version})",
            )
            for m in manifest.members
            if m.status == "active" and m.permission == "write"
        }
        me = manifest.member(self._self)
        return _Entry(
            manifest,
            record,
            compile_selector(manifest.rule.selector),
            not record.left and manifest.is_active_member(self._self),
            writers,
            _earliest(manifest.expires, me.expires if me is not None else None),
        )

    def _index_peers(self) -> None:
        forever = float("inf")
        peers: dict[bytes, float] = {}
        for e in self._entries.values():
            if not e.here:
                continue
            for m in e.manifest.active_members():
                if m.fingerprint != self._self:
                    until = _earliest(e.until, m.expires)
                    until = forever if until is None else until
                    peers[m.fingerprint] = max(until, peers.get(m.fingerprint, until))
        self._peers = {fp: None if t == forever else t for fp, t in peers.items()}

    # --- queries ---

    def manifests(self) -> list[Manifest]:
        return [e.manifest for e in self._entries.values()]

    def get(self, share_id: str) -> Manifest | None:
        entry = self._entries.get(share_id)
        return entry.manifest if entry is not None else None

    def find(self, name_or_id: str) -> Manifest:
        """A share by id, else by name; `NotFound`, or `InvalidArgument` if a name is shared
        by several shares (joined shares may be named alike)."""
        entry = self._entries.get(name_or_id) if isinstance(name_or_id, str) else None
        if entry is not None:
            return entry.manifest
        named = [e.manifest for e in self._entries.values() if e.manifest.name == name_or_id]
        if not named:
            raise NotFound(f"no share named {name_or_id!r} (and no share with that id)")
        if len(named) > 1:
            ids = ", ".join(m.share_id for m in named)
            raise InvalidArgument(
                f"{len(named)} shares are named {name_or_id!r}; name one by its id ({ids})"
            )
        return named[0]

    def owned(self, name_or_id: str, action: str) -> Manifest:
        """The share, if this node owns it; `AccessDenied` saying so otherwise."""
        manifest = self.find(name_or_id)
        if manifest.owner != self._self:
            decision = Decision(
                False,
                f"only the owner of share {manifest.name!r} ({format_node_id(manifest.owner)}) "
                f"may {action} it",
            )
            raise AccessDenied(decision, decision.reason)
        return manifest

    def name_taken(self, name: str) -> bool:
        return any(e.manifest.name == name for e in self._entries.values())

    def status(self, share_id: str, now: float | None = None) -> str:
        """This node's standing in a share: owner, active, revoked, left, removed, or expired
        (a member whose membership or share has expired)."""
        entry = self._entries[share_id]
        manifest = entry.manifest
        if manifest.owner == self._self:
            return "owner"
        if entry.record.left:
            return "left"
        me = manifest.member(self._self)
        if me is None:
            return "removed"
        if me.status == "active" and not entry.active_at(time.time() if now is None else now):
            return "expired"
        return me.status

    def ended(self, share_id: str, now: float) -> str | None:
        """At a member (never the owner): why this node may no longer open the share's
        documents (revoked, removed, left, its membership or the share expired, or its keys
        were destroyed for one of these reasons), or None."""
        entry = self._entries.get(share_id)
        if entry is None:
            return None
        manifest = entry.manifest
        if manifest.owner == self._self:
            return None
        name = manifest.name
        if entry.record.left:
            return f"this node left share {name!r}"
        me = manifest.member(self._self)
        if me is None:
            return f"this node was removed from share {name!r}"
        if me.status != "active":
            return f"this node was revoked from share {name!r}"
        if manifest.is_expired(now):
            return f"share {name!r} has expired"
        if me.is_expired(now):
            return f"this node's membership of share {name!r} has expired"
        # Keys destroyed once (e.g. by `enforce_expiry` at a later `now`) stay destroyed, for
        # the reason given then, until the node is admitted again and gets them back.
        return entry.record.ended

    def record(self, share_id: str) -> ShareRecord:
        return self._entries[share_id].record

    def share_of_key(self, kid: str) -> str | None:
        """The share whose keys this node destroyed (or whose manifest names) `kid`."""
        for share_id, e in self._entries.items():
            if kid in e.record.ended_kids or e.manifest.key_id == kid:
                return share_id
        return None

    def is_connectable(self, fingerprint: bytes, now: float | None = None) -> bool:
        """An active member of a share in which this node is active too (neither the share
        nor either membership expired)."""
        if fingerprint not in self._peers:
            return False
        until = self._peers[fingerprint]
        return until is None or (time.time() if now is None else now) < until

    def common(self, fingerprint: bytes, now: float | None = None) -> list[Manifest]:
        if fingerprint == self._self:
            return []
        now = time.time() if now is None else now
        out = []
        for e in self._entries.values():
            if not e.active_at(now):
                continue
            m = e.manifest.member(fingerprint)
            if m is not None and m.status == "active" and not m.is_expired(now):
                out.append(e.manifest)
        return out

    def admitted_version(self, share_id: str, fingerprint: bytes) -> int:
        return self._entries[share_id].record.admitted.get(fingerprint.hex(), 1)

    # --- share links (see links.py) ---

    def link_refusal(self, share_id: str, now: float) -> str | None:
        """Why this node cannot serve a link of share `share_id` now (the share is no longer
        held, or this node no longer takes part in it: revoked, removed, left, expired), or
        None."""
        entry = self._entries.get(share_id)
        if entry is None:
            return f"share {share_id!r} is no longer held by this node"
        if not entry.active_at(now):
            return self._not_here(entry, now).reason
        return None

    def own_permission(self, share_id: str) -> str | None:
        """This node's permission in the share: write for its owner, a member's own, None
        when it is no active member."""
        entry = self._entries.get(share_id)
        if entry is None:
            return None
        manifest = entry.manifest
        if manifest.owner == self._self:
            return "write"
        me = manifest.member(self._self)
        return me.permission if me is not None and me.status == "active" else None

    def scope_refusal(self, share_id: str, meta: Mapping[str, Any]) -> str | None:
        """Why a document is outside the share's rule, or None (see `_scope_refusal`)."""
        entry = self._entries.get(share_id)
        if entry is None:
            return f"share {share_id!r} is not held by this node"
        return _scope_refusal(entry, meta)

    # --- scope and decisions ---

    def in_scope(self, share_id: str, meta: Mapping[str, Any]) -> bool:
        entry = self._entries.get(share_id)
        return entry is not None and _scope_refusal(entry, meta) is None

    def incoming(
        self, share_id: str, sender: bytes, meta: Mapping[str, Any],
        existing: Mapping[str, Any] | None = None, now: float | None = None,
    ) -> Decision:
        """May `sender` write this document into share `share_id` here? See
        `Token.decide_incoming`."""
        entry = self._entries.get(share_id)
        if entry is None:
            return Decision(False, f"share {share_id!r} is not held by this node")
        manifest = entry.manifest
        now = time.time() if now is None else now
        if not entry.active_at(now):
            return self._not_here(entry, now)
        allow = entry.writers.get(sender)
        if allow is None:
            return Decision(False, _not_writer(manifest, sender))
        expired = _member_expired(manifest, sender, now)
        if expired is not None:
            return Decision(False, expired)
        refusal = _scope_refusal(entry, meta)
        if refusal is None and manifest.encrypted:
            refusal = self._seal_refusal(entry, meta)
        if refusal is None and existing is not None:
            refusal = doctype_change_refusal(existing, meta)
        if refusal is None and existing is not None and existing.get("_deleted") is not True \
                and _scope_refusal(entry, existing) is not None:
            refusal = (
                f"a document with this id exists here outside share {manifest.name!r}; "
                "a share member may not overwrite or delete it"
            )
        return allow if refusal is None else Decision(False, refusal)

    def _not_here(self, entry: _Entry, now: float) -> Decision:
        manifest = entry.manifest
        if entry.here and manifest.is_expired(now):
            return Decision(False, f"share {manifest.name!r} has expired")
        return Decision(
            False,
            f"this node is no longer in share {manifest.name!r} "
            f"({self.status(manifest.share_id, now)})",
        )

    def _seal_refusal(self, entry: _Entry, meta: Mapping[str, Any]) -> str | None:
        if meta.get("_deleted") is True:
            return None  # a tombstone has no body to seal
        name = entry.manifest.name
        if not is_sealed(meta):
            return f"share {name!r} is encrypted but the document arrives in clear"
        try:
            kid = sealed_kid(meta)
        except IntegrityError as exc:
            return str(exc)
        if kid not in self._state.share_keys.get(entry.manifest.share_id, ()):
            return f"the document is sealed under key {kid}, which is not a key of share {name!r}"
        return None

    def outgoing(self, share_id: str, peer: bytes, now: float | None = None) -> Decision:
        """May this node send the share's documents to `peer`?"""
        entry = self._entries.get(share_id)
        if entry is None:
            return Decision(False, f"share {share_id!r} is not held by this node")
        manifest = entry.manifest
        now = time.time() if now is None else now
        if not entry.active_at(now):
            return self._not_here(entry, now)
        if peer == self._self:
            return Decision(False, "a node does not replicate with itself")
        member = manifest.member(peer)
        if member is None or member.status != "active":
            state = "not a member" if member is None else "revoked"
            return Decision(
                False, f"{format_node_id(peer)} is {state} in share {manifest.name!r} "
                f"(manifest v{manifest.version})",
            )
        expired = _member_expired(manifest, peer, now)
        if expired is not None:
            return Decision(False, expired)
        if self._self not in entry.writers:
            return Decision(
                False, f"this node only reads share {manifest.name!r}; its peers would refuse "
                "documents from it",
            )
        return Decision(
            True, f"{member.name!r} and this node are active members of share {manifest.name!r} "
            f"(manifest v{manifest.version})",
        )

    def removals(self, current: Mapping[str, Any], doc: Mapping[str, Any]) -> list[str]:
        """The shares this node may write to (it owns them, or is an active member with
        write permission) that a write of `doc` over the live stored `current` takes the
        document out of: `current` is in their scope, `doc` is not. Their other members are
        to lose their copies (see `removal`): for the share, editing a document out of its
        scope is deleting it, which a writer may do."""
        if current.get("_deleted") is True:
            return []
        return sorted(
            share_id for share_id, e in self._entries.items()
            if e.here and (e.manifest.owner == self._self or self._self in e.writers)
            and _scope_refusal(e, current) is None and _scope_refusal(e, doc) is not None
        )

    # --- changes ---

    def check(self, manifest: Manifest) -> None:
        """Refuse (`RuleError`) a manifest whose selector this token cannot evaluate."""
        compile_selector(manifest.rule.selector)

    def put(self, manifest: Manifest, *, left: bool | None = None) -> None:
        """Hold `manifest` as the share's newest (already verified by the caller)."""
        record = self._state.shares.get(manifest.share_id)
        if record is None:
            record = ShareRecord(manifest.to_dict())
        else:
            record.manifest = manifest.to_dict()
        if left is not None:
            record.left = left
        entry = self._entry(manifest, record)  # compiles first: nothing changes if it fails
        self._state.shares[manifest.share_id] = record
        self._entries[manifest.share_id] = entry
        self._index_peers()

    def set_ended(self, share_id: str, reason: str, kids: Iterable[str]) -> None:
        record = self._entries[share_id].record
        record.ended = reason
        record.ended_kids = sorted(set(record.ended_kids) | set(kids))
        record.grants = {}

    def clear_ended(self, share_id: str) -> None:
        record = self._entries[share_id].record
        record.ended = None
        record.ended_kids = []

    def forget(self, share_id: str) -> None:
        """Drop a share from the book (its manifest and record): see Token.forget_share."""
        del self._entries[share_id]
        del self._state.shares[share_id]
        self._index_peers()

    def set_left(self, share_id: str) -> None:
        entry = self._entries[share_id]
        entry.record.left = True
        self._entries[share_id] = self._entry(entry.manifest, entry.record)
        self._index_peers()

    def admit(self, share_id: str, fingerprint: bytes, version: int) -> None:
        self._state.shares[share_id].admitted[fingerprint.hex()] = version

    def forget_admission(self, share_id: str, fingerprint: bytes) -> None:
        self._state.shares[share_id].admitted.pop(fingerprint.hex(), None)

    # --- invitations ---

    def add_invitation(
        self, invitation: Invitation, membership_expires: float | None = None
    ) -> None:
        self._state.invitations[invitation.digest().hex()] = InvitationRecord(
            invitation.share_id, invitation.permission, invitation.expires_at,
            membership_expires=membership_expires,
        )

    def claim_invitation(
        self, share_id: str, secret: bytes, joiner: bytes, now: float
    ) -> tuple[str, InvitationRecord]:
        """(key, record) of the invitation `secret` opens for `share_id`, unless it is
        unknown, for another share, expired, or used by another node (`InvitationRefused`).
        A record already used by `joiner` itself is returned (its answer may have been lost)."""
        invitations = self._state.invitations
        key = _invitation.secret_digest(secret, share_id).hex()
        record = invitations.get(key)
        if record is None:
            for other in {r.share_id for r in invitations.values()} - {share_id}:
                if _invitation.secret_digest(secret, other).hex() in invitations:
                    raise InvitationRefused(
                        f"this invitation is for another share than {share_id!r}"
                    )
            raise InvitationRefused(
                "unknown invitation: this node issued no such code for that share (mistyped, "
                "or expired long ago); ask the share's owner for a new one"
            )
        if record.used_by is not None and record.used_by != joiner:
            raise InvitationRefused(
                "this invitation was already used by another node; each code admits one "
                "member: ask the share's owner for a new one"
            )
        if now >= record.expires_at:
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.expires_at))
            raise InvitationRefused(
                f"this invitation expired at {when}; ask the share's owner for a new one"
            )
        return key, record

    def has_open_invitation(self, now: float) -> bool:
        return any(
            r.used_by is None and now < r.expires_at for r in self._state.invitations.values()
        )

    def open_invitations(self, now: float) -> list[tuple[str, InvitationRecord]]:
        """(key, record) of every invitation not used yet and not expired, soonest to expire
        first; the key is the secret's digest (not the secret: it opens nothing)."""
        return sorted(
            ((k, r) for k, r in self._state.invitations.items()
             if r.used_by is None and now < r.expires_at),
            key=lambda item: item[1].expires_at,
        )

    def cancel_invitation(self, share_id: str, ref: str, now: float) -> tuple[str, InvitationRecord]:
        """Forget the open invitation of `share_id` that `ref` names: its code, or its id (the
        first characters, at least 8, of its key as `open_invitations` gives it). A later use
        of the code is refused as unknown. Raises
        share matches (`NotFound`), `InvalidArgument` for a malformed `ref` or an id prefix
        that matches several."""
        ref = ref.strip()
        open_here = {k: r for k, r in self.open_invitations(now) if r.share_id == share_id}
        if ref.lower().startswith(_invitation.PREFIX):
            invitation = _invitation.Invitation.decode(ref)
            matches = [_invitation.secret_digest(invitation.secret, share_id).hex()]
            matches = [k for k in matches if k in open_here]
        elif len(ref) >= 8 and all(c in "0123456789abcdef" for c in ref.lower()):
            matches = [k for k in open_here if k.startswith(ref.lower())]
        else:
            raise InvalidArgument(
                f"{ref!r} is neither an invitation code nor an invitation id (8 or more hex "
                "digits, as `share invitations` lists them)")
        if not matches:
            raise NotFound(f"no open invitation of this share matches {ref!r}")
        if len(matches) > 1:
            raise InvalidArgument(f"{ref!r} matches {len(matches)} invitations; give more digits")
        key = matches[0]
        return key, self._state.invitations.pop(key)

    def prune_invitations(self, now: float) -> int:
        """Forget invitations expired for longer than the grace period; how many went."""
        invitations = self._state.invitations
        stale = [k for k, r in invitations.items() if r.expires_at + INVITATION_GRACE <= now]
        for k in stale:
            del invitations[k]
        return len(stale)


def removal(share_id: str, current: Mapping[str, Any]) -> dict[str, Any]:
    """The tombstone that takes a document out of share `share_id` at its members: a child of
    `current` (the last revision in the share's scope), a sibling of the write that took the
    document out. Its rev is derived from the share, the id and `current`'s rev, so every
    member that gets it, from the owner or from another member, holds the same revision;
    CouchDB's winner rule does the rest: where the document's new revision also arrives (a
    member holding another share that still covers it) that live leaf wins over the removal,
    anywhere else the removal is the winner, a deletion. Only share `share_id` carries it."""
    doc_id, rev = current["_id"], current.get("_rev")
    generation, _, parent = rev.partition("-") if isinstance(rev, str) else ("", "", "")
    if not generation.isdigit() or not parent:
        raise InvalidArgument(f"the stored document's _rev {rev!r} is not of the form N-hash")
    digest = hashlib.sha256(_REMOVAL_DOMAIN + msgpack.packb([share_id, doc_id, rev])).hexdigest()
    child = digest[:32]
    start = int(generation) + 1
    return {
        "_id": doc_id, "_rev": f"{start}-{child}", "_deleted": True,
        "_revisions": {"start": start, "ids": [child, parent]},
        "doctype": current.get("doctype"), REMOVAL_FIELD: share_id,
    }


def doctype_change_refusal(existing: Mapping[str, Any], doc: Mapping[str, Any]) -> str | None:
    """Why writing `doc` over the stored `existing` (live or a tombstone) would change the
    document's doctype, or None. A doctype is fixed when a document is created: every share,
    rule and key is chosen by it, and copies that disagree on it would never converge."""
    old, new = existing.get("doctype"), doc.get("doctype")
    if not isinstance(old, str) or not old or old == new:
        return None  # an old tombstone without a doctype claims none
    return (f"document {existing.get('_id')!r} is of doctype {old!r}, not {new!r}: a "
            "document's doctype cannot change, even once it is deleted (use a new id for a "
            "document of another doctype)")


def _scope_refusal(entry: _Entry, meta: Mapping[str, Any]) -> str | None:
    """Why a document is outside the share's rule, or None if it is inside.

    A tombstone (`_deleted`) carries no fields but its doctype, so it is in scope when it
    carries the share's doctype (and, for a removal, names this share); the selector is not
    applied to it. (Pass `existing` to
    `incoming` so that a tombstone cannot delete a local document outside the share.)"""
    if not isinstance(meta, Mapping):
        return f"document metadata is a {type(meta).__name__}, not an object"
    name, rule = entry.manifest.name, entry.manifest.rule
    doctype = meta.get("doctype")
    if doctype != rule.doctype:
        if doctype is None:
            return f"the document has no doctype; share {name!r} holds {rule.doctype!r}"
        return f"doctype {doctype!r} is not {rule.doctype!r}, the doctype of share {name!r}"
    if meta.get("_deleted") is True:
        left = meta.get(REMOVAL_FIELD)
        if left is not None and left != entry.manifest.share_id:
            return f"a removal from another share than {name!r}"
        return None
    if entry.predicate is not None and not entry.predicate(meta):
        return f"the document does not match the selector of share {name!r}"
    return None


def _member_expired(manifest: Manifest, fingerprint: bytes, now: float) -> str | None:
    member = manifest.member(fingerprint)
    if member is not None and member.is_expired(now):
        return (
            f"the membership of {member.name!r} in share {manifest.name!r} has expired "
            f"(manifest v{manifest.version})"
        )
    return None


def _not_writer(manifest: Manifest, sender: bytes) -> str:
    member = manifest.member(sender)
    who = format_node_id(sender) if member is None else repr(member.name)
    if member is None:
        why = "is not a member of"
    elif member.status != "active":
        why = "was revoked from"
    else:
        why = "only has read permission in"
    return f"{who} {why} share {manifest.name!r} (manifest v{manifest.version})"


__all__ = [
    "CLEAR_RULE_FIELDS", "INVITATION_GRACE", "InvitationRefused", "LEAVE_DOMAIN", "LEAVE_PURPOSE",
    "LeaveRequestRefused", "REMOVAL_FIELD", "ShareBook",
]
