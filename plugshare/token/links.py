"""Share links: credentials for outside clients, each bound to one share (pure).

A link lets a client that is no node (PouchDB in a browser, another CouchDB) read, or read
and write, the documents of one share held here, as the token decides per document: a
document is the link's when it is in the share's scope (the share's rule) and the action is
within the link's permission. The rule set is never consulted for a link.

A link is made by this node's owner, for a share this node takes part in, with at most this
node's own permission in it (the share's owner: write; a member: its membership's). It stops
working when it is unlinked, when it expires, and for good when this node's part in the share
ends (revoked, removed, left, expired, forgotten) or when this node joins the share again (a
new membership does not revive the links of an earlier one).

The link's id is its credential's id (16 hex digits, the middle of `ps1.<id>.<secret>`): the
id names the link in the audit log (`link:<id>`) and opens nothing. This module keeps the
records in `TokenState.links`; `Token` decides, audits and seals around it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from .credentials import new_credential
from .errors import InvalidArgument, NotFound
from .rules import PERM_LEVEL
from .state import LinkRecord

# Ended and unlinked links are kept this long, so a late use is audited under their name.
ENDED_GRACE = 7 * 86400
MAX_LINKS = 1024  # records held at once (live ones and those ended within the grace)
UNLINKED = "unlinked by the owner"


def check_permission(permission: object) -> str:
    if permission not in PERM_LEVEL:
        raise InvalidArgument(f"a link's permission is 'read' or 'write', got {permission!r}")
    return permission  # type: ignore[return-value]


def new_link(share_id: str, permission: str, now: float,
             expires: float | None) -> tuple[str, LinkRecord]:
    """A fresh link: the credential (to show once) and the record to keep."""
    credential, record = new_credential()
    return credential, LinkRecord(record.id, share_id, permission, now, expires, record)


def refusal(link: LinkRecord, now: float) -> str | None:
    """Why the link itself no longer works (ended, unlinked, expired), or None. The share's
    side (is this node still in it?) is the token's to add."""
    if link.ended is not None:
        return f"link {link.id} ended: {link.ended}"
    if link.expires is not None and now >= link.expires:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(link.expires))
        return f"link {link.id} expired at {when}"
    return None


def end(link: LinkRecord, reason: str, now: float) -> None:
    if link.ended is None:
        link.ended, link.ended_at = reason, now


def prune(links: dict[str, LinkRecord], now: float) -> int:
    """Forget links ended or expired for longer than the grace period; how many went."""
    stale = [k for k, link in links.items() if _gone_since(link) + ENDED_GRACE <= now]
    for k in stale:
        del links[k]
    return len(stale)


def _gone_since(link: LinkRecord) -> float:
    if link.ended_at is not None:
        return link.ended_at
    return link.expires if link.expires is not None else float("inf")


def check_room(links: dict[str, LinkRecord]) -> None:
    if len(links) >= MAX_LINKS:
        raise InvalidArgument(
            f"this node holds {len(links)} share links, the most it keeps; unlink some first")


def find(links: dict[str, LinkRecord], share_id: str, link_id: object) -> LinkRecord:
    """The link `link_id` of share `share_id`; `NotFound` otherwise (also for another
    share's link: a link is unlinked through its own share)."""
    link = links.get(link_id) if isinstance(link_id, str) else None
    if link is None or link.share_id != share_id or link.ended == UNLINKED:
        raise NotFound(f"share {share_id!r} has no link {link_id!r}")
    return link


def of_share(links: Iterable[LinkRecord], share_id: str) -> list[LinkRecord]:
    return [link for link in links if link.share_id == share_id]


def status(link: LinkRecord, share_refusal: str | None, now: float) -> str:
    """One word for a listing: active, expired, unlinked, or ended."""
    if link.ended == UNLINKED:
        return "unlinked"
    if link.ended is not None or share_refusal is not None:
        return "ended"
    if link.expires is not None and now >= link.expires:
        return "expired"
    return "active"


def row(link: LinkRecord, status_word: str, why: str | None) -> dict[str, Any]:
    """A link as listed: everything but the secret (the token holds only its hash)."""
    return {"id": link.id, "share": link.share_id, "permission": link.permission,
            "created": link.created, "expires": link.expires, "status": status_word,
            "reason": why}
