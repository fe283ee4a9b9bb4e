"""The token's state as data: what `vault` seals and `Token` works on."""

from __future__ import annotations

from typing import Any

import attrs
import cattrs
import msgpack

from .audit import AuditMeta
from .credentials import CredentialRecord
from .errors import TokenStateError
from .rules import Rule

STATE_FORMAT = 1


@attrs.define
class AppRecord:
    name: str
    credential: CredentialRecord
    roles: list[str]
    grant_rule: str | None  # id of the rule made by add_app


@attrs.define
class PeerRecord:
    node_id: str
    public_key: bytes  # raw Ed25519, pinned
    name: str
    roles: list[str]


@attrs.define
class DataKeyRecord:
    kid: str
    scope: str  # "doctype:<name>" | "share:<id>"
    master_id: int
    wrapped: bytes


@attrs.define
class ShareRecord:
    """One share this token knows: its newest accepted manifest, and local bookkeeping."""

    manifest: dict[str, Any]  # Manifest.to_dict() of the newest manifest accepted
    left: bool = False  # this node left the share (it keeps the manifest for `status`)
    # At the owner only: member fingerprint (hex) -> the manifest version that (re)admitted
    # it. A leave request signed on an older version predates that admission: a replay.
    admitted: dict[str, int] = attrs.Factory(dict)
    # Encrypted shares: member fingerprint (hex) -> the share keys wrapped to it by the owner
    # (see Token.key_grants). The owner makes them; a member keeps the verified ones that came
    # with the newest manifest, to forward them.
    grants: dict[str, bytes] = attrs.Factory(dict)
    grants_key: str | None = None  # at the owner: the newest key id the grants carry
    # At a member whose access ended (revoked, removed, left, expired): why, and the ids of
    # the share keys destroyed then (so a later read is told why, not just "no key").
    ended: str | None = None
    ended_kids: list[str] = attrs.Factory(list)


@attrs.define
class InvitationRecord:
    """An invitation issued by this token (at the owner); the secret itself is not kept."""

    share_id: str
    permission: str  # "read" | "write"
    expires_at: int  # unix seconds
    used_by: bytes | None = None  # fingerprint of the node that redeemed it (single use)
    membership_expires: float | None = None  # unix seconds: the joined member's expiry


@attrs.define
class LinkRecord:
    """A share link (see links.py): a credential for an outside client, bound to one share.
    Its id is the credential's id; the secret itself is not kept."""

    id: str
    share_id: str
    permission: str  # "read" | "write"
    created: float  # unix seconds
    expires: float | None  # unix seconds, or None: until unlinked or the share ends here
    credential: CredentialRecord
    # Why it stopped working for good (unlinked, the share ended here), or None. Kept a
    # while (links.ENDED_GRACE) so a late use is audited under the link's name.
    ended: str | None = None
    ended_at: float | None = None


@attrs.define
class TokenState:
    name: str
    signing_key: bytes
    agreement_key: bytes
    audit_key: bytes
    owner: CredentialRecord
    current_master: int
    next_rule: int
    apps: dict[str, AppRecord] = attrs.Factory(dict)
    peers: dict[str, PeerRecord] = attrs.Factory(dict)
    rules: list[Rule] = attrs.Factory(list)
    sensitive: list[str] = attrs.Factory(list)
    data_keys: dict[str, DataKeyRecord] = attrs.Factory(dict)
    doctype_keys: dict[str, str] = attrs.Factory(dict)  # doctype -> kid
    share_keys: dict[str, list[str]] = attrs.Factory(dict)  # share id -> kids, newest last
    shares: dict[str, ShareRecord] = attrs.Factory(dict)  # share id -> record
    # secret digest (hex, see sharing.invitation.secret_digest) -> record
    invitations: dict[str, InvitationRecord] = attrs.Factory(dict)
    # share keys destroyed here, of shares this node forgot (`forget_share`) -> why they are
    # gone, so a copy sealed under one is refused with the reason rather than as tampered
    forgotten_kids: dict[str, str] = attrs.Factory(dict)
    links: dict[str, LinkRecord] = attrs.Factory(dict)  # link id (= credential id) -> record


_converter = cattrs.Converter()


def encode(state: TokenState, audit: AuditMeta) -> bytes:
    return msgpack.packb(
        {
            "format": STATE_FORMAT,
            "state": _converter.unstructure(state),
            "audit": _converter.unstructure(audit),
        },
        use_bin_type=True,
    )


def decode(plaintext: bytes, where: str) -> tuple[TokenState, AuditMeta]:
    try:
        doc = msgpack.unpackb(plaintext, raw=False)
        if doc.get("format") != STATE_FORMAT:
            raise TokenStateError(f"{where}: unknown state format {doc.get('format')!r}")
        return (
            _converter.structure(doc["state"], TokenState),
            _converter.structure(doc["audit"], AuditMeta),
        )
    except TokenStateError:
        raise
    except Exception as exc:  # an authentic blob of an unexpected shape: a version mismatch
        raise TokenStateError(f"{where}: state content has an unexpected shape ({exc})") from None
