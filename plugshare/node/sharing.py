"""Shares as the owner manages them through the node: create, invite, accept, revoke, leave,
and the propagation of every new manifest to the members connected now.

The token holds the manifests, invitations and keys and decides every step; this module
moves the results between the API, the token and the peer links.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from plugshare.errors import PlugshareError
from plugshare.node.access import Forbidden, Principal
from plugshare.node.session import JoinRefused
from plugshare.replication.transport import PeerConnectError, PeerConnectionClosed, PeerRefused
from plugshare.sharing.invitation import Invitation, parse_ttl
from plugshare.sharing.manifest import Manifest
from plugshare.token import format_node_id
from plugshare.token.envelope import is_sealed, sealed_kid

if TYPE_CHECKING:
    from plugshare.node.node import Node
    from plugshare.node.session import PeerSession

log = logging.getLogger("plugshare.sharing")

DEFAULT_TTL = "1h"
COUNT_EVERY = 5.0  # seconds between two counts of a share's docs while its feed moves...
COUNT_EXACTLY_UP_TO = 10_000  # ...on a store with more docs than this


class OwnerUnreachable(PlugshareError):
    """No address of the invitation answers as the share's owner."""

    status = 502
    error = "unreachable"


class Sharing:
    def __init__(self, node: Node):
        self.node = node
        self.token = node.access.token
        # share id -> (update_seq, docs, when counted)
        self._doc_counts: dict[str, tuple[Any, int, float]] = {}

    # -- the owner's commands -----------------------------------------------------------

    async def create(self, principal: Principal, name: str, doctype: str,
                     selector: dict | None, encrypted: bool) -> dict:
        self.node.access.require_owner(principal, "share_create")
        manifest = self.token.create_share(name, doctype, selector, encrypted=encrypted)
        resealed = await self._seal_existing(manifest) if encrypted else 0
        self.node.events.publish("share.created", share=name, doctype=doctype,
                                 encrypted=encrypted, resealed=resealed)
        return await self.describe(manifest)

    async def _seal_existing(self, manifest: Manifest) -> int:
        """Docs already in the scope of a new encrypted share are re-written sealed under its
        key, so members can open them and receive them at all."""
        share_id, token, access = manifest.share_id, self.token, self.node.access

        def wanted(doc) -> bool:
            if is_sealed(doc) and sealed_kid(doc) in token.share_key_ids(share_id):
                return False  # already sealed for this share
            return token.share_in_scope(share_id, access.metadata(doc))

        return await self.node.documents.reseal(wanted, f"share:{share_id}")

    def invite(self, principal: Principal, name: str, *, read_only: bool, ttl: str) -> dict:
        self.node.access.require_owner(principal, "share_invite")
        seconds = parse_ttl(ttl)
        addresses = [a for a in (_split(x) for x in self.node.peers.advertised_addresses()) if a]
        invitation = self.token.issue_invitation(
            name, permission="read" if read_only else "write", ttl=seconds, addresses=addresses)
        return {"share": self.token.share(name).name, "code": invitation.encode(),
                "permission": invitation.permission, "expires_at": invitation.expires_at}

    async def accept(self, principal: Principal, code: str, *, as_name: str | None = None) -> dict:
        """Join a share with an invitation code: reach its owner, prove the secret, take the
        manifest (and the share key); the initial sync starts at once on the same link."""
        self.node.access.require_owner(principal, "share_accept")
        invitation = Invitation.decode(code)
        invitation.check_not_expired(time.time())
        owner = invitation.owner_fingerprint
        if owner == self.token.fingerprint:
            raise Forbidden("this invitation was made by this very node")
        session = self.node.peers.sessions.get(owner)
        if session is None:
            try:
                session = await self.node.peers.open_session(
                    owner, list(invitation.owner_addresses))
            except PeerRefused as exc:
                raise JoinRefused(
                    f"the share's owner refused the link ({exc}); the invitation was probably "
                    "used already or has expired: ask for a new one") from None
            except PeerConnectError as exc:
                raise OwnerUnreachable(
                    f"cannot reach the share's owner at the invitation's addresses: {exc}"
                ) from None
        session.joining = True
        manifest, key = await session.request_join(
            invitation, as_name or self.node.config.node.name)
        manifest = self.token.join_share(invitation, manifest, key)
        self.node.events.publish("share.joined", share=manifest.name, peer=session.name,
                                 member=self.node.config.node.name)
        await self.manifest_changed(manifest, source=session)
        return await self.describe(manifest)

    async def revoke(self, principal: Principal, name: str, member: str) -> dict:
        self.node.access.require_owner(principal, "share_revoke")
        manifest = self.token.revoke_member(name, member)
        revoked = [m for m in manifest.members if m.status == "revoked"]
        self.node.events.publish("share.revoked", share=manifest.name, member=member)
        await self.manifest_changed(manifest, source=None)
        log.info("share %s: revoked %s", manifest.name, [m.name for m in revoked])
        return await self.describe(manifest)

    async def leave(self, principal: Principal, name: str) -> dict:
        self.node.access.require_owner(principal, "share_leave")
        manifest = self.token.share(name)
        request = self.token.leave_request(name)
        notified = False
        session = self.node.peers.sessions.get(manifest.owner)
        if session is not None:
            try:
                await session.connection.send({"type": "share.leave",
                                               "share": manifest.share_id, "request": request})
                notified = True
            except PeerConnectionClosed:
                pass  # the owner went away meanwhile: leave locally all the same
        self.token.leave_share(name)
        self.node.events.publish("share.left", share=manifest.name)
        self.node.peers.refresh()
        result = await self.describe(self.token.share(name))
        result["owner_notified"] = notified
        return result

    # -- propagation --------------------------------------------------------------------

    async def manifest_changed(self, manifest: Manifest, *, source: PeerSession | None) -> None:
        """A new manifest (made here or accepted from a peer): tell every connected member
        (revoked ones too, so they learn it), then re-plan links and pushes."""
        for fp, session in list(self.node.peers.sessions.items()):
            if session is source or manifest.member(fp) is None:
                continue
            try:
                await session.send_manifest(manifest)
            except Exception as exc:  # the link may be going down; it resends on reconnect
                log.info("could not send manifest v%d to %s: %s", manifest.version,
                         session.name, exc)
        self.node.events.publish("share.manifest", share=manifest.name, version=manifest.version)
        me = manifest.member(self.token.fingerprint)
        if me is not None and me.status == "revoked":
            self.node.events.publish("share.revoked", share=manifest.name,
                                     member=self.node.config.node.name)
        self.node.peers.refresh()

    # -- reading ------------------------------------------------------------------------

    async def _doc_count(self, manifest: Manifest) -> int:
        """Docs in the share's scope. Counting reads every doc, so on a large store whose feed
        keeps moving (a sync) the count is refreshed at most every COUNT_EVERY seconds."""
        info = await self.node.store.info()
        seq = info["update_seq"]
        cached = self._doc_counts.get(manifest.share_id)
        if cached and (cached[0] == seq or (info["doc_count"] > COUNT_EXACTLY_UP_TO
                                            and time.monotonic() - cached[2] < COUNT_EVERY)):
            return cached[1]
        count = sum(
            1 for doc in await self.node.store.all_docs()
            if self.token.share_in_scope(manifest.share_id, self.node.access.metadata(doc))
        )
        self._doc_counts[manifest.share_id] = (seq, count, time.monotonic())
        return count

    async def describe(self, manifest: Manifest) -> dict:
        me = self.token.fingerprint
        mine = manifest.member(me)
        sessions = self.node.peers.sessions
        peers = []
        for member in manifest.members:
            if member.fingerprint == me or member.status != "active":
                continue
            session = sessions.get(member.fingerprint)
            state = session.sync.get(manifest.share_id) if session else None
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
            "status": _status(self.token.share_status(manifest.share_id)),
            "members": [
                {"name": m.name, "id": m.node_id, "permission": m.permission,
                 "status": m.status, "connected": m.fingerprint in sessions}
                for m in manifest.members
            ],
            "docs": await self._doc_count(manifest),
            "peers": peers,
        }

    async def list(self) -> list[dict]:
        return [await self.describe(m) for m in self.token.shares()]

    async def show(self, name: str) -> dict:
        return await self.describe(self.token.share(name))


def _status(token_status: str) -> str:
    return "active" if token_status == "owner" else token_status


def _split(address: str) -> tuple[str, int] | None:
    from plugshare.node.peers import parse_host_port

    return parse_host_port(address)
