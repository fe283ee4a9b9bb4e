"""Shares as the owner manages them through the node: create, invite, accept, revoke, leave,
and the propagation of every new manifest to the members connected now.

The token holds the manifests, invitations and keys and decides every step (one command
each); this module moves the results between the API, the token and the peer links.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import trio

from plugshare.errors import PlugshareError
from plugshare.node.access import Forbidden, Identity, ShareView
from plugshare.node.documents import Documents
from plugshare.node.events import EventBus
from plugshare.node.pending_joins import PendingJoin, PendingJoins
from plugshare.node.session import JoinRefused
from plugshare.replication.transport import PeerConnectError, PeerConnectionClosed, PeerRefused
from plugshare.sharing.invitation import Invitation, parse_ttl
from plugshare.sharing.manifest import Manifest
from plugshare.store import Store
from plugshare.store.base import StoreError
from plugshare.token import format_node_id

if TYPE_CHECKING:
    from plugshare.node.peers import PeerManager
    from plugshare.node.session import PeerSession

log = logging.getLogger("plugshare.sharing")

DEFAULT_TTL = "1h"
COUNT_EVERY = 5.0  # seconds between two counts of a share's docs while its feed moves...
COUNT_EXACTLY_UP_TO = 10_000  # ...on a store with more docs than this
COUNT_PAGE = 2000
LOOK_FOR_OWNERS_EVERY = 1.0  # seconds: while joins pend, has an owner shown up another way?


class OwnerUnreachable(PlugshareError):
    """No address of the invitation answers as the share's owner."""

    status = 502
    error = "unreachable"


class AlreadyMember(PlugshareError):
    """The invitation is for a share this node takes part in already."""

    status = 409
    error = "conflict"


class Sharing:
    def __init__(self, *, call: Callable[..., Awaitable[Any]], identity: Identity,
                 shares: ShareView, store: Store, documents: Documents, events: EventBus,
                 peers: PeerManager, node_name: str):
        self._call = call
        self.identity = identity
        self.shares = shares
        self.store = store
        self.documents = documents
        self.events = events
        self.peers = peers
        self.node_name = node_name
        # share id -> (update_seq, docs, when counted)
        self._doc_counts: dict[str, tuple[Any, int, float]] = {}
        # joins waiting for an offline owner: in memory only (the code is a one-use secret)
        self.pending = PendingJoins()
        self._pending_changed = trio.Event()
        self._owner_seen_at: dict[bytes, frozenset] = {}  # owner -> where it was last seen
        # a share's fetch mode on this node (set by the node: node/on_read.py)
        self.fetch_mode: Callable[[str], str] = lambda share_id: "eager"

    # -- the owner's commands -----------------------------------------------------------

    async def create(self, credential: str, name: str, doctype: str, selector: dict | None,
                     encrypted: bool, expires: float | None = None,
                     **attachment_caps: Any) -> dict:
        """`attachment_caps`: the rule's optional `max_attachment_size`, `attachment_types`."""
        if encrypted:
            await self.documents.refuse_sealing_files(credential, doctype, "share_create")
        answer = await self._call("share.create", credential=credential, name=name,
                                  doctype=doctype, selector=selector, encrypted=encrypted,
                                  expires=expires, **attachment_caps)
        manifest = Manifest.from_dict(answer)
        await self.shares.refresh()
        # Docs already in the scope of a new encrypted share are re-written sealed under its
        # key, so members can open them and receive them at all.
        resealed = await self.documents.reseal(credential) if encrypted else 0
        self.events.publish("share.created", share=name, doctype=doctype,
                            encrypted=encrypted, resealed=resealed)
        return await self.describe(manifest)

    async def invite(self, credential: str, name: str, *, read_only: bool, ttl: str,
                     membership_expires: float | None = None) -> dict:
        seconds = parse_ttl(ttl)
        addresses = [list(a) for a in (_split(x) for x in self.peers.advertised_addresses())
                     if a]
        manifest = self.shares.find(name)
        answer = await self._call(
            "share.invite", credential=credential, share=manifest.share_id,
            permission="read" if read_only else "write", ttl=seconds, addresses=addresses,
            relays=[[r.relay_id, r.host, r.port] for r in self.peers.relays.relays],
            membership_expires=membership_expires)
        return {"share": manifest.name, **answer}

    async def invitations(self, credential: str, name: str | None = None) -> list[dict]:
        """The open invitations (of every share, or of share `name`), as the token lists them."""
        share = self.shares.find(name).share_id if name is not None else None
        answer = await self._call("share.invitations", credential=credential, share=share)
        return [self._invitation(row) for row in answer["invitations"]]

    async def cancel_invitation(self, credential: str, name: str, invitation: str) -> dict:
        """Cancel an open invitation of share `name`, named by its code or id."""
        share = self.shares.find(name).share_id
        row = await self._call("share.cancel_invitation", credential=credential, share=share,
                               invitation=invitation)
        return self._invitation(row)

    def _invitation(self, row: dict) -> dict:
        manifest = self.shares.get(row["share"])
        return {**row, "share": manifest.name if manifest else row["share"],
                "share_id": row["share"]}

    async def accept(self, credential: str, code: str, *, as_name: str | None = None) -> dict:
        """Join a share with an invitation code: reach its owner, prove the secret, take the
        manifest (and the share key); the initial sync starts at once on the same link.
        With the owner unreachable, the join is kept pending and retried by itself: the
        answer then has `"pending": true` (see `pending_joins`)."""
        await self._call("owner.check", credential=credential, action="share_accept")
        invitation = Invitation.decode(code)
        invitation.check_not_expired(time.time())
        owner = invitation.owner_fingerprint
        if owner == self.identity.fingerprint:
            raise Forbidden("this invitation was made by this very node")
        if self.shares.here(invitation.share_id):
            joined = self.shares.get(invitation.share_id)
            raise AlreadyMember(f"this node is already a member of share {joined.name!r}; "
                                "an invitation admits a new member")
        waiting = self.pending.get(invitation.share_id)
        if waiting is not None and waiting.code == code:
            return _pending_answer(waiting)  # accepted again: the same join, still waiting
        try:
            result = await self._join(credential, code, invitation, as_name,
                                      [*invitation.owner_addresses, *self._relay_routes(invitation)])
        except OwnerUnreachable as exc:
            join = self.pending.add(share_id=invitation.share_id, code=code,
                                    credential=credential, as_name=as_name, owner=owner,
                                    expires_at=invitation.expires_at, reason=str(exc),
                                    now=time.time())
            self._pending_changed.set()
            log.info("share %s: its owner %s is unreachable; the join is pending, retried "
                     "until %s", invitation.share_id, format_node_id(owner),
                     time.strftime("%H:%M:%S", time.localtime(invitation.expires_at)))
            self.events.publish("share.join_pending", share=invitation.share_id,
                                owner=format_node_id(owner), reason=str(exc),
                                expires_at=invitation.expires_at)
            return _pending_answer(join)
        self.pending.remove(invitation.share_id)
        return result

    def _relay_routes(self, invitation: Invitation) -> list:
        """Ways to the owner through the relays its invitation names (after its addresses);
        the book keeps them, so the link comes back the same way later."""
        from plugshare.node.relays import relay_entry
        from plugshare.relay import RelayAddress

        entries = [relay_entry(RelayAddress(r, h, p)) for r, h, p in invitation.owner_relays]
        if entries:
            self.peers.book.add_hints(invitation.owner_fingerprint, entries)
        return self.peers.relay_routes(invitation.owner_fingerprint, entries)

    async def _join(self, credential: str, code: str, invitation: Invitation,
                    as_name: str | None, addresses: list[tuple[str, int]]) -> dict:
        """Reach the owner (a link up already, else `addresses`) and join. OwnerUnreachable
        if nothing answers there; JoinRefused if the owner answers and refuses."""
        owner = invitation.owner_fingerprint
        session = self.peers.sessions.get(owner)
        if session is None:
            try:
                session = await self.peers.open_session(owner, addresses)
            except PeerRefused as exc:
                raise JoinRefused(
                    f"the share's owner refused the link ({exc}); the invitation was probably "
                    "used already or has expired: ask for a new one") from None
            except PeerConnectError as exc:
                raise OwnerUnreachable(
                    f"cannot reach the share's owner at the invitation's addresses: {exc}"
                ) from None
        session.joining = True

        async def take(manifest: Manifest, key: bytes | None) -> Manifest:
            answer = await self._call("share.join", credential=credential, code=code,
                                      manifest=manifest.to_dict(), key=key)
            await self.shares.refresh()
            return Manifest.from_dict(answer)

        manifest = await session.request_join(invitation, as_name or self.node_name, take)
        self.events.publish("share.joined", share=manifest.name, peer=session.name,
                            member=self.node_name)
        await self.manifest_changed(manifest, source=session)
        return await self.describe(manifest)

    # -- joins waiting for their owner ----------------------------------------------------

    def pending_joins(self) -> list[dict]:
        return [join.to_json() for join in self.pending.all()]

    async def cancel_pending_join(self, credential: str, share: str) -> dict:
        """Stop waiting for the owner of `share` (its id); the code is not used."""
        await self._call("owner.check", credential=credential, action="share_accept")
        join = self.pending.remove(share)
        if join is None:
            raise NotPending(f"no join of share {share!r} is pending; "
                             "`plugshare share joins` lists those that are")
        log.info("share %s: pending join cancelled", share)
        self.events.publish("share.join_cancelled", share=share)
        return {**join.to_json(), "state": "cancelled"}

    async def retry_pending_joins(self) -> None:
        """Run for the node's life: try each pending join when its back-off says, or at once
        when its owner shows up another way (LAN discovery, a link it opened); drop those
        whose invitation expired."""
        while True:
            now = time.time()
            for join in self.pending.drop_expired(now):
                log.warning("share %s: the invitation expired before its owner %s could be "
                            "reached; the join is dropped", join.share_id,
                            format_node_id(join.owner))
                self.events.publish("share.join_expired", share=join.share_id,
                                    owner=format_node_id(join.owner))
            self._hurry_owners_seen(now)
            for join in self.pending.due(now):
                await self._retry(join)
            wait = self.pending.next_wake(time.time())
            self._pending_changed = trio.Event()
            with trio.move_on_after(math.inf if wait is None
                                    else min(wait, LOOK_FOR_OWNERS_EVERY)):
                await self._pending_changed.wait()

    def _hurry_owners_seen(self, now: float) -> None:
        """An owner with a link up, or found at new addresses: its joins are due now."""
        for owner in self.pending.owners():
            seen_at = frozenset(self.peers.known_addresses(owner))
            linked = owner in self.peers.sessions
            if linked or seen_at - self._owner_seen_at.get(owner, frozenset()):
                if self.pending.hurry(owner, now):
                    log.info("%s shows up (%s): trying its pending joins now",
                             format_node_id(owner), "linked" if linked else
                             ", ".join(f"{h}:{p}" for h, p in sorted(seen_at)))
            self._owner_seen_at[owner] = seen_at
        for gone in set(self._owner_seen_at) - self.pending.owners():
            del self._owner_seen_at[gone]

    async def _retry(self, join: PendingJoin) -> None:
        if self.pending.get(join.share_id) is not join:
            return  # cancelled meanwhile
        if self.shares.here(join.share_id):
            self.pending.remove(join.share_id)
            return
        invitation = Invitation.decode(join.code)
        addresses = list(invitation.owner_addresses)
        addresses += [a for a in self.peers.known_addresses(join.owner) if a not in addresses]
        addresses += self._relay_routes(invitation)
        try:
            result = await self._join(join.credential, join.code, invitation, join.as_name,
                                      addresses)
        except OwnerUnreachable as exc:
            self.pending.failed(join, str(exc), time.time())
            log.info("share %s: owner still unreachable (try %d); next try in %.0fs",
                     join.share_id, join.tries, max(0.0, join.next_try - time.time()))
            return
        except Exception as exc:  # the owner answered and refused, or the token did
            if self.pending.get(join.share_id) is join:
                self.pending.remove(join.share_id)
            log.warning("share %s: the pending join failed: %s", join.share_id, exc)
            self.events.publish("share.join_failed", share=join.share_id,
                                reason=getattr(exc, "reason", None) or str(exc))
            return
        if self.pending.get(join.share_id) is join:
            self.pending.remove(join.share_id)
        log.info("share %s (%s): joined once its owner could be reached", result["name"],
                 join.share_id)

    async def revoke(self, credential: str, name: str, member: str) -> dict:
        share = self.shares.find(name)
        answer = await self._call("share.revoke", credential=credential, share=share.share_id,
                                  member=member)
        manifest = Manifest.from_dict(answer)
        await self.shares.refresh()
        self.events.publish("share.revoked", share=manifest.name, member=member)
        await self.manifest_changed(manifest, source=None)
        log.info("share %s: revoked %s", manifest.name,
                 [m.name for m in manifest.members if m.status == "revoked"])
        return await self.describe(manifest)

    async def leave(self, credential: str, name: str) -> dict:
        manifest = self.shares.find(name)
        answer = await self._call("share.leave", credential=credential, share=manifest.share_id)
        notified = False
        session = self.peers.sessions.get(manifest.owner)
        if session is not None:
            try:
                await session.connection.send({"type": "share.leave",
                                               "share": manifest.share_id,
                                               "request": answer["request"]})
                notified = True
            except PeerConnectionClosed:
                pass  # the owner went away meanwhile: it learns at the next link
        await self.shares.refresh()
        self.events.publish("share.left", share=manifest.name)
        await self.peers.refresh()
        result = await self.describe(self.shares.find(manifest.share_id))
        result["owner_notified"] = notified
        return result

    async def forget(self, credential: str, name: str) -> dict:
        """Forget a share this node left or was removed from: it is listed no more (its
        documents stay in the store)."""
        manifest = self.shares.find(name)
        await self._call("share.forget", credential=credential, share=manifest.share_id)
        await self.shares.refresh()
        self.events.publish("share.forgotten", share=manifest.name)
        await self.peers.refresh()
        return {"id": manifest.share_id, "name": manifest.name, "forgotten": True}

    # -- links for outside clients (the token's share links) ---------------------------

    async def link(self, credential: str, name: str, *, permission: str,
                   expires: float | None = None) -> dict:
        """A link to share `name` for a CouchDB-protocol client; its credential is in this
        answer only. The token resolves the name after checking the caller is the owner."""
        answer = await self._call("share.link", credential=credential, share=name,
                                  permission=permission, expires=expires)
        log.info("share %s: link %s made (%s)", name, answer["id"], permission)
        return self._link_row(answer)

    async def unlink(self, credential: str, name: str, link: str) -> dict:
        answer = await self._call("share.unlink", credential=credential, share=name, link=link)
        log.info("share %s: link %s unlinked", name, link)
        return self._link_row(answer)

    async def links(self, credential: str, name: str | None = None) -> list[dict]:
        answer = await self._call("share.links", credential=credential, share=name)
        return [self._link_row(row) for row in answer["links"]]

    def _link_row(self, row: dict) -> dict:
        """The token names the share by id; the API by name too."""
        manifest = self.shares.get(row["share"])
        return {**row, "share": manifest.name if manifest else row["share"],
                "share_id": row["share"]}

    # -- propagation --------------------------------------------------------------------

    async def manifest_changed(self, manifest: Manifest, *,
                               source: PeerSession | None) -> None:
        """A new manifest (made here or accepted from a peer): tell every connected member
        (revoked ones too, so they learn it), then re-plan links and pushes."""
        current = self.shares.get(manifest.share_id) or manifest
        for fp, session in list(self.peers.sessions.items()):
            if session is source or current.member(fp) is None:
                continue
            try:
                await session.send_manifest(current)
            except Exception as exc:  # the link may be going down; it resends on reconnect
                log.info("could not send manifest v%d to %s: %s", current.version,
                         session.name, exc)
        self.events.publish("share.manifest", share=current.name, version=current.version)
        me = current.member(self.identity.fingerprint)
        if me is not None and me.status == "revoked":
            self.events.publish("share.revoked", share=current.name, member=self.node_name)
        await self.peers.refresh()

    # -- reading ------------------------------------------------------------------------

    async def _doc_count_or_last(self, manifest: Manifest) -> int | None:
        """`_doc_count`, or while the store is down the last count (None if none): the
        share's state (a sync retrying) must still be shown."""
        try:
            return await self._doc_count(manifest)
        except StoreError:
            cached = self._doc_counts.get(manifest.share_id)
            return cached[1] if cached else None

    async def _doc_count(self, manifest: Manifest) -> int:
        """Docs in the share's scope, as the token counts them. Counting reads every doc, so
        on a large store whose feed keeps moving (a sync) the count is refreshed at most every
        COUNT_EVERY seconds."""
        info = await self.store.info()
        seq = info["update_seq"]
        cached = self._doc_counts.get(manifest.share_id)
        if cached and (cached[0] == seq or (info["doc_count"] > COUNT_EXACTLY_UP_TO
                                            and time.monotonic() - cached[2] < COUNT_EVERY)):
            return cached[1]
        docs = [d for d in await self.store.all_docs()
                if d.get("doctype") == manifest.rule.doctype]
        count = 0
        for start in range(0, len(docs), COUNT_PAGE):
            count += await self._call("share.count", share=manifest.share_id,
                                      docs=docs[start:start + COUNT_PAGE])
        self._doc_counts[manifest.share_id] = (seq, count, time.monotonic())
        return count

    async def describe(self, manifest: Manifest) -> dict:
        me = self.identity.fingerprint
        mine = manifest.member(me)
        sessions = self.peers.sessions
        standing = self.shares.status(manifest.share_id)
        here = standing in ("owner", "active")
        peers = []  # the links this share syncs over: none once it ended here
        for member in manifest.members if here else ():
            if member.fingerprint == me or member.status != "active":
                continue
            session = sessions.get(member.fingerprint)
            state = session.sync.get(manifest.share_id) if session and here else None
            peers.append({"peer": member.name, "id": member.node_id,
                          **(state.to_json() if state else {"state": "offline"})})
        return {
            "id": manifest.share_id,
            "name": manifest.name,
            "doctype": manifest.rule.doctype,
            "selector": manifest.rule.selector,
            "encrypted": manifest.encrypted,
            "fetch": self.fetch_mode(manifest.share_id),  # attachment data: eager | on-read
            "version": manifest.version,
            "owner": format_node_id(manifest.owner),
            "role": "owner" if manifest.owner == me else "member",
            "permission": mine.permission if mine else None,
            # active | revoked | left | removed ("role" says who owns it)
            "status": "active" if standing == "owner" else standing,
            "members": [
                {"name": m.name, "id": m.node_id, "permission": m.permission,
                 # our own standing is ours to say: the manifest may not know it yet
                 "status": standing if m.fingerprint == me and not here else m.status,
                 "connected": m.fingerprint in sessions}
                for m in manifest.members
            ],
            "docs": await self._doc_count_or_last(manifest) if here else 0,
            "peers": peers,
        }

    async def list(self) -> list[dict]:
        return [await self.describe(m) for m in self.shares.all()]

    async def show(self, name: str) -> dict:
        waiting = self.pending.get(name)  # a join waiting for its owner: known by id only
        if waiting is not None and self.shares.get(name) is None:
            return _pending_answer(waiting)
        return await self.describe(self.shares.find(name))


class NotPending(PlugshareError):
    """No join of that share waits for its owner."""

    status = 404
    error = "not_found"


def _pending_answer(join: PendingJoin) -> dict:
    return {"pending": True, **join.to_json()}


def _split(address: str) -> tuple[str, int] | None:
    from plugshare.node.peers import parse_host_port

    return parse_host_port(address)
