"""Shares as the owner manages them through the node: create, invite, accept, revoke, leave,
and the propagation of every new manifest to the members connected now.

The token holds the manifests, invitations and keys and decides every step (one command
each); this module moves the results between the API, the token and the peer links.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from plugshare.errors import PlugshareError
from plugshare.node.access import Forbidden, Identity, ShareView
from plugshare.node.documents import Documents
from plugshare.node.events import EventBus
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


class OwnerUnreachable(PlugshareError):
    """No address of the invitation answers as the share's owner."""

    status = 502
    error = "unreachable"


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

    # -- the owner's commands -----------------------------------------------------------

    async def create(self, credential: str, name: str, doctype: str, selector: dict | None,
                     encrypted: bool, expires: float | None = None) -> dict:
        answer = await self._call("share.create", credential=credential, name=name,
                                  doctype=doctype, selector=selector, encrypted=encrypted,
                                  expires=expires)
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
            membership_expires=membership_expires)
        return {"share": manifest.name, **answer}

    async def accept(self, credential: str, code: str, *, as_name: str | None = None) -> dict:
        """Join a share with an invitation code: reach its owner, prove the secret, take the
        manifest (and the share key); the initial sync starts at once on the same link."""
        await self._call("owner.check", credential=credential, action="share_accept")
        invitation = Invitation.decode(code)
        invitation.check_not_expired(time.time())
        owner = invitation.owner_fingerprint
        if owner == self.identity.fingerprint:
            raise Forbidden("this invitation was made by this very node")
        session = self.peers.sessions.get(owner)
        if session is None:
            try:
                session = await self.peers.open_session(owner, list(invitation.owner_addresses))
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
        peers = []
        for member in manifest.members:
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
            "version": manifest.version,
            "owner": format_node_id(manifest.owner),
            "role": "owner" if manifest.owner == me else "member",
            "permission": mine.permission if mine else None,
            # active | revoked | left | removed ("role" says who owns it)
            "status": "active" if standing == "owner" else standing,
            "members": [
                {"name": m.name, "id": m.node_id, "permission": m.permission,
                 "status": m.status, "connected": m.fingerprint in sessions}
                for m in manifest.members
            ],
            "docs": await self._doc_count_or_last(manifest) if here else 0,
            "peers": peers,
        }

    async def list(self) -> list[dict]:
        return [await self.describe(m) for m in self.shares.all()]

    async def show(self, name: str) -> dict:
        return await self.describe(self.shares.find(name))


def _split(address: str) -> tuple[str, int] | None:
    from plugshare.node.peers import parse_host_port

    return parse_host_port(address)
