"""One live link with one peer: manifests, joins and replication of every share in common.

On a new link both ends send the manifests of the shares they have in common, start pushing
each share their token lets them send, and let the peer push to them; every incoming doc is
decided by this node's token. Share messages (`share.*`) ride the same link:

    share.manifest  {manifest}                         a newer manifest (signed by the owner)
    share.join      {share, secret, name, public_key, x25519}    joiner -> owner
    share.joined    {share, manifest, key}             owner -> joiner (key: wrapped share key)
    share.join_refused {share, reason}
    share.leave     {share, request}                   member -> owner (signed leave request)
    peer.addresses  {peers: [[fingerprint, [host:port, ...]], ...]}
                    where this node last saw the other active members of a share (hints only:
                    the pinned link decides who answers), sent with each manifest
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any, Awaitable, Callable

import attrs
import trio

from plugshare.errors import PlugshareError
from plugshare.node import sealed_files
from plugshare.node.access import Identity, ShareView
from plugshare.node.events import EventBus
from plugshare.replication import protocol as rp
from plugshare.replication.replicator import PeerReplication, store_instance_id
from plugshare.replication.retry import GateRefused, GateUnavailable, StreamRetry
from plugshare.replication.transport import PeerConnection, PeerConnectionClosed
from plugshare.sharing.invitation import Invitation
from plugshare.sharing.manifest import Manifest
from plugshare.store import Store
from plugshare.store.base import StoreError
from plugshare.replication.protocol import LocalProtocolError
from plugshare.replication.attachment_sync import ChunkRefused, TransferRefused
from plugshare.token import IntegrityError, TokenError, format_node_id
from plugshare.token.wire import TokenUnavailable

log = logging.getLogger("plugshare.session")

JOIN_TIMEOUT = 30.0
MAX_ADDRESS_HINTS = 1024  # peers one peer.addresses message may name


class JoinRefused(PlugshareError):
    """The share's owner refused the invitation."""

    status = 403
    error = "refused"


def _scope_tag(manifest: Manifest) -> str:
    """Names the share's rule: a checkpoint is resumed only under the same rule."""
    rule = json.dumps(manifest.rule.to_dict(), sort_keys=True).encode()
    return hashlib.sha256(manifest.share_id.encode() + rule).hexdigest()[:16]


@attrs.define
class SyncState:
    """How one share stands with this peer, for /status and `watch`.

    `state` derives from the streams actually running (`settle`): "live" only while every
    stream of the share on this link runs and has caught up; "retrying" while one waits to
    start again after a passing failure (`error` says why, `retry_at` when: None when it is
    the peer's stream, restarted by the peer); "error" once one ended for good."""

    state: str = "initial"  # initial | live | retrying | offline | error
    sent: int = 0  # docs the peer wrote from us
    received: int = 0  # docs we wrote from the peer
    refused: int = 0
    bytes: int = 0  # msgpack size of the docs sent and received
    pending_in: int | None = None  # the peer's estimate of the changes it has yet to send us
    pending_out: int = 0
    lag_ms: float | None = None
    last_sync: float | None = None
    error: str | None = None
    caught_up: set[str] = attrs.field(factory=set)  # directions ("push", "pull") caught up
    streams: dict[str, str] = attrs.field(factory=dict)  # direction -> running|retrying|ended
    retry_at: float | None = None  # epoch seconds our push starts again, while retrying

    def settle(self, in_step: bool) -> bool:
        """Derive `state` from the streams (`in_step`: every stream that should run has
        caught up); True when it changed."""
        streams = set(self.streams.values())
        state = ("retrying" if "retrying" in streams else "error" if "ended" in streams
                 else "live" if in_step else "initial")
        if state != "retrying":
            self.retry_at = None
        changed, self.state = state != self.state, state
        return changed

    @property
    def done(self) -> int:
        """Docs moved either way."""
        return self.sent + self.received

    @property
    def total(self) -> int | None:
        """`done` plus what the peer says is still coming; None until it has said."""
        return None if self.pending_in is None else self.done + self.pending_in

    def to_json(self) -> dict:
        fields = attrs.asdict(self, filter=lambda field, _: field.name != "caught_up")
        retry_in = (None if self.retry_at is None
                    else round(max(0.0, self.retry_at - time.time()), 1))
        return {**fields, "done": self.done, "total": self.total, "retry_in": retry_in}


@attrs.frozen
class SessionParts:
    """What every session uses, given once by the node."""

    store: Store
    call: Callable[..., Awaitable[Any]]  # the token's door
    identity: Identity
    shares: ShareView
    events: EventBus
    peers: Any  # the PeerManager: address book and hints
    manifest_changed: Callable[..., Awaitable[None]]  # (manifest, source=session)
    # (share, doc id): whether its attachment data is fetched on first read
    on_read: Callable[[str, str], bool] = lambda share_id, doc_id: False


class PeerSession:
    def __init__(self, parts: SessionParts, conn: PeerConnection, dialed: bool):
        self.parts = parts
        self.shares = parts.shares
        self._call = parts.call
        self.events = parts.events
        self.connection = conn
        self.dialed = dialed
        self.fingerprint = conn.peer_fingerprint
        self.peer_id = format_node_id(self.fingerprint)
        self.name = conn.peer_hello.name
        self.close_reason: str | None = None
        self.sync: dict[str, SyncState] = {}  # by share id
        self.joining = not self.shares.common(self.fingerprint)
        self._closed = trio.Event()
        self._joins: dict[str, tuple[trio.Event, dict]] = {}
        self._nursery: trio.Nursery | None = None
        self.replication: PeerReplication | None = None
        self._may_push: dict[str, bool] = {}
        self._refresh_retry = StreamRetry()  # asking the token again while it is away
        self._refresh_pending = False
        self._retry_at = 0.0  # when the pending refresh asks again

    # -- lifetime -----------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        store = self.parts.store
        started = False
        try:
            self.replication = PeerReplication(
                self.connection, store, peer=self.peer_id, store_id=await store_instance_id(store),
                accept_share=self._accept_share, gate=_TokenGate(self._call, self.fingerprint),
                on_event=self._on_event,
                other_message=self._on_message,
                check_chunks=self._check_chunks,
                on_read=self.parts.on_read,
            )
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.close_reason is not None:  # close() came while we were starting
                    nursery.start_soon(self.connection.aclose, self.close_reason)
                await nursery.start(self.replication.run)
                await self._send_manifests()
                await self.refresh()
                if self.shares.former_member(self.fingerprint):
                    self.close("no share in common: it was told its standing")
                task_status.started()
                started = True
        # The link closing (e.g. the peer dropped a duplicate link) ends this session only:
        # nursery errors come grouped, and a stray group would take the whole node down.
        except* PeerConnectionClosed as closed:
            self.close_reason = self.close_reason or closed.exceptions[0].reason
        except* (StoreError, TokenError) as failed:
            # The store or the token is away just as the link comes up (a CouchDB restarting):
            # this link ends, the dialer tries again with its back-off, the node goes on.
            error = failed.exceptions[0]
            log.warning("closing the link with %s: this node cannot serve it now: %s", self.name, error)
            self.close_reason = self.close_reason or f"this node cannot serve the link now: {error}"
        finally:
            self._nursery = None  # close() after the end is a no-op, not a closed nursery
            self.close_reason = self.close_reason or self.connection.close_reason or "closed"
            for share_id, state in self.sync.items():
                state.state = "offline"
                self._publish_state(share_id, state)
            for event, _ in self._joins.values():
                event.set()
            self._closed.set()
        if not started:
            task_status.started()  # closed while starting: the caller sees it closed at once

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def close(self, reason: str) -> None:
        self.close_reason = reason
        if self._nursery is not None:
            try:
                self._nursery.start_soon(self.connection.aclose, reason)
            except RuntimeError:  # its tasks have all ended: the session is ending already
                pass

    async def _check_chunks(self, share_id: str, doc: dict, name: str, revpos: int,
                            chunks: list[tuple[int, bytes]], count: int) -> None:
        """An encrypted share's attachment chunks, as they arrive: the token opens each
        where it stands (and audits a refusal); the plaintext is dropped. Clear shares' are
        checked by their content addresses alone."""
        manifest = self.shares.get(share_id)
        if manifest is None or not manifest.encrypted:
            return
        runs: list[tuple[int, list[bytes]]] = []  # consecutive chunks, per token command
        for index, data in chunks:
            if (runs and runs[-1][0] + len(runs[-1][1]) == index
                    and len(runs[-1][1]) < sealed_files.CHECK_BATCH):
                runs[-1][1].append(data)
            else:
                runs.append((index, [data]))
        for first, run in runs:
            try:
                await self._call("share.open_chunks", share=share_id, doc_id=doc["_id"],
                                 name=name, revpos=revpos, first=first,
                                 last=first + len(run) == count, chunks=run, check_only=True)
            except IntegrityError as exc:
                raise ChunkRefused(str(exc)) from exc
            except (TokenUnavailable, TokenError) as exc:  # e.g. the share key not here yet
                raise TransferRefused(f"the token cannot check it now: {exc}", retry=True) from exc

    # -- which shares flow on this link ---------------------------------------------------

    async def refresh(self) -> None:
        """Push every share the token lets us send to this peer; stop the others."""
        if self.replication is None or self._nursery is None:
            return
        common = {m.share_id: m for m in self.shares.common(self.fingerprint)}
        if common:
            self.joining = False
        for share_id in self.replication.pushing - set(common):
            self.replication.stop_push(share_id, "the share is no longer in common")
        asked_all = True
        for share_id, manifest in common.items():
            self.sync.setdefault(share_id, SyncState())
            if share_id in self.replication.pushing:
                continue
            try:
                if not await self._call("share.may_push", share=share_id,
                                        peer=self.fingerprint):
                    # e.g. we are a read-only member: nothing of ours may land there
                    if self.sync[share_id].streams.pop("push", None) is not None:
                        self._settle(share_id, self.sync[share_id])
                    continue
            except TokenError as exc:  # the token restarting: ask again in a while
                log.info("cannot ask the token about pushing to %s: %s", self.name, exc)
                self._refresh_later(share_id, f"cannot ask the token about pushing: {exc}")
                asked_all = False
                continue
            if self._nursery is None or self.replication is None \
                    or share_id in self.replication.pushing:
                continue  # the link closed, or another refresh started it meanwhile
            try:
                self.replication.start_push(share_id, scope_tag=_scope_tag(manifest))
            except LocalProtocolError:
                return  # the link is closing under us
        if asked_all:
            self._refresh_retry.succeeded()
        for share_id in set(self.sync) - set(common):
            state = self.sync.pop(share_id)
            state.state = "offline"
            self._publish_state(share_id, state)

    def _refresh_later(self, share_id: str, reason: str) -> None:
        """The push of `share_id` could not be started now: say so (retrying, not live)
        and refresh again after a back-off."""
        if self._nursery is None:
            return
        state = self.sync.setdefault(share_id, SyncState())
        if not self._refresh_pending:
            self._refresh_pending = True
            delay = self._refresh_retry.next_delay()
            self._retry_at = time.time() + delay

            async def again() -> None:
                await trio.sleep(delay)
                self._refresh_pending = False
                await self.refresh()

            self._nursery.start_soon(again)
        state.streams["push"], state.error, state.retry_at = "retrying", reason, self._retry_at
        self._settle(share_id, state)

    def _accept_share(self, share_id: str) -> bool:
        """The peer opens a push of `share_id` to us: a share in common (each of its docs
        is then decided by the token, a batch at a time)."""
        return share_id in {m.share_id for m in self.shares.common(self.fingerprint)}

    # -- manifests and joins ------------------------------------------------------------

    async def _send_manifests(self) -> None:
        for manifest in self.shares.all():
            if manifest.member(self.fingerprint) is not None:
                await self.send_manifest(manifest)

    async def send_manifest(self, manifest: Manifest) -> None:
        message: dict[str, Any] = {"type": "share.manifest", "manifest": manifest.to_dict()}
        if manifest.encrypted:
            grants = (await self._call("share.grants", share=manifest.share_id))["grants"]
            if grants:
                message["grants"] = grants  # wrapped to each member: safe to forward
        await self.connection.send(message)
        await self._send_address_hints(manifest)

    async def _send_address_hints(self, manifest: Manifest) -> None:
        """Tell the peer where the share's other members were last seen, so members find
        each other without discovery and keep syncing while this node is away."""
        known = self.parts.peers.book.peers
        hints = [[m.fingerprint, list(known[m.fingerprint].addresses)]
                 for m in manifest.active_members()
                 if m.fingerprint not in (self.fingerprint, self.parts.identity.fingerprint)
                 and m.fingerprint in known and known[m.fingerprint].addresses]
        if hints:
            await self.connection.send({"type": "peer.addresses", "peers": hints})

    async def request_join(self, invitation: Invitation, name: str,
                           take: Callable[[Manifest, bytes | None], Awaitable[Manifest]]
                           ) -> Manifest:
        """Joiner side: prove the invitation's secret to the owner and wait for its answer.
        `take(manifest, key)` hands the answer to the token; it runs before any later
        message of this link is read, so the owner's push that follows finds the share."""
        share = invitation.share_id
        done, answer = trio.Event(), {"take": take}
        self._joins[share] = (done, answer)
        try:
            await self.connection.send({
                "type": "share.join", "share": share, "secret": invitation.secret,
                "name": name,
                "public_key": self.parts.identity.public_key,
                "x25519": self.parts.identity.x25519,
                "relays": [str(r) for r in self.parts.peers.relays.relays],
            })
            with trio.move_on_after(JOIN_TIMEOUT):
                await done.wait()
        finally:
            self._joins.pop(share, None)
        if "error" in answer:
            raise answer["error"]
        if "manifest" in answer:
            return answer["manifest"]
        if "reason" in answer:
            raise JoinRefused(f"the owner refused the invitation: {answer['reason']}")
        raise JoinRefused(f"no answer from the owner: {self.close_reason or 'timed out'}")

    async def _on_message(self, message: Mapping[Any, Any]) -> None:
        kind = message.get("type")
        try:
            if kind == "share.manifest":
                await self._on_manifest(message)
            elif kind == "share.join":
                await self._on_join(message)
            elif kind in ("share.joined", "share.join_refused"):
                await self._on_join_answer(message)
            elif kind == "share.leave":
                await self._on_leave(message)
            elif kind == "peer.addresses":
                self._on_addresses(message)
            else:
                log.info("peer %s sent an unknown message type %r; ignored", self.name, kind)
        except (PlugshareError, ValueError, TypeError, KeyError) as exc:
            # A bad message costs the peer that message, never the link or the node.
            log.warning("refused %r from peer %s: %s", kind, self.name, exc)
            self.events.publish("share.refused", peer=self.name, message=str(kind),
                                     reason=str(exc))

    async def _on_manifest(self, message: Mapping[Any, Any]) -> None:
        grants = message.get("grants")
        if grants is not None and not isinstance(grants, dict):
            raise ValueError("share.manifest grants must be a map")
        answer = await self._call("share.accept_manifest", peer=self.fingerprint,
                                  manifest=dict(message["manifest"]), grants=grants)
        if answer["changed"]:
            await self.shares.refresh()
            await self.parts.manifest_changed(Manifest.from_dict(answer["manifest"]),
                                              source=self)

    async def _on_join(self, message: Mapping[Any, Any]) -> None:
        share = str(message["share"])
        public_key = bytes(message["public_key"])
        if hashlib.sha256(public_key).digest() != self.fingerprint:
            raise ValueError("the joiner's public key is not the one its link proved")
        try:
            answer = await self._call(
                "share.redeem", peer=self.fingerprint, share=share,
                secret=bytes(message["secret"]), name=str(message["name"]),
                public_key=public_key, x25519=bytes(message["x25519"]),
                relays=_relays_of(message))
        except PlugshareError as exc:
            await self.connection.send({"type": "share.join_refused", "share": share,
                                        "reason": str(exc)})
            self.events.publish("share.join_refused", peer=self.name, reason=str(exc))
            return
        manifest = Manifest.from_dict(answer["manifest"])
        await self.connection.send({"type": "share.joined", "share": share,
                                    "manifest": answer["manifest"], "key": answer["key"]})
        self.events.publish("share.joined", share=manifest.name, peer=self.name,
                            member=str(message["name"]))
        await self.shares.refresh()
        await self.parts.manifest_changed(manifest, source=None)

    async def _on_join_answer(self, message: Mapping[Any, Any]) -> None:
        waiting = self._joins.get(str(message.get("share")))
        if waiting is None or waiting[0].is_set():
            raise ValueError("an answer to a join this node did not ask for")
        done, answer = waiting
        try:
            if message["type"] == "share.joined":
                key = message.get("key")
                answer["manifest"] = await answer["take"](
                    Manifest.from_dict(message["manifest"]),
                    bytes(key) if key is not None else None)
            else:
                answer["reason"] = str(message.get("reason", "no reason given"))
        except PlugshareError as exc:
            answer["error"] = exc
        finally:
            done.set()

    def _on_addresses(self, message: Mapping[Any, Any]) -> None:
        peers = message["peers"]
        if not isinstance(peers, list) or len(peers) > MAX_ADDRESS_HINTS:
            raise ValueError(f"peer.addresses must list at most {MAX_ADDRESS_HINTS} peers")
        # The peer manager takes a hint only from the peer it describes or from the owner of
        # a share it is a member of: a member cannot make this node dial out for others.
        for fingerprint, addresses in peers:
            if not (isinstance(addresses, list) and all(isinstance(a, str) for a in addresses)):
                raise ValueError("peer.addresses: addresses must be a list of host:port texts")
            self.parts.peers.learn_hints(bytes(fingerprint), addresses[:8], source=self.fingerprint)

    async def _on_leave(self, message: Mapping[Any, Any]) -> None:
        answer = await self._call("share.apply_leave", peer=self.fingerprint,
                                  request=dict(message["request"]))
        manifest = Manifest.from_dict(answer)
        self.events.publish("share.left", share=manifest.name, peer=self.name)
        await self.shares.refresh()
        await self.parts.manifest_changed(manifest, source=None)

    # -- replication events -> status and the events stream -------------------------------

    def _share_name(self, share_id: str) -> str:
        manifest = self.shares.get(share_id)
        return share_id if manifest is None else manifest.name

    def _publish_state(self, share_id: str, state: SyncState) -> None:
        extra = {}
        if state.state in ("retrying", "error"):
            extra = {"error": state.error, "retry_at": state.retry_at}
        self.events.publish(
            "sync.state", share=self._share_name(share_id), peer=self.name, state=state.state,
            done=state.done, total=state.total, pending_in=state.pending_in,
            pending_out=state.pending_out, **extra,
        )

    def _settle(self, share_id: str, state: SyncState) -> None:
        if state.state != "offline" and state.settle(self._in_step(share_id, state)):
            self._publish_state(share_id, state)

    def _in_step(self, share_id: str, state: SyncState) -> bool:
        """Has every push of the share on this link caught up: ours if we push it, the
        peer's if it may write (a peer with nothing to send catches up at once, long before
        the other way has)."""
        pushing = self.replication is not None and share_id in self.replication.pushing
        manifest = self.shares.get(share_id)
        peer_pushes = manifest is not None and manifest.may_write(self.fingerprint)
        return ((not pushing or "push" in state.caught_up)
                and (not peer_pushes or "pull" in state.caught_up))

    def _on_event(self, event: rp.ReplicationEvent) -> None:
        share, publish = self._share_name(event.share), self.events.publish
        if isinstance(event, rp.StreamEnded):
            publish("sync.stream_ended", share=share, peer=self.name, direction=event.direction,
                    reason=event.reason, passing=event.passing, retry_in=event.retry_in)
            state = self.sync.get(event.share)
            if state is not None and self.connection.close_reason is None:  # else: offline
                state.caught_up.discard(event.direction)
                state.streams[event.direction] = "retrying" if event.passing else "ended"
                state.error = event.reason
                if event.retry_in is not None:  # our push: we know when
                    state.retry_at = time.time() + event.retry_in
                elif event.passing and state.streams.get("push") != "retrying":
                    state.retry_at = None  # the peer's push: the peer starts it again
                self._settle(event.share, state)
            return
        state = self.sync.setdefault(event.share, SyncState())
        if isinstance(event, rp.StreamStarted):
            state.caught_up.discard(event.direction)
            state.streams[event.direction] = "running"
            self._settle(event.share, state)
            return
        if isinstance(event, rp.BatchAcked):
            state.sent += event.written
            state.bytes += event.bytes
            publish("sync.batch_sent", share=share, peer=self.name, docs=event.written,
                    refused=event.refused, bytes=event.bytes)
            if state.state == "initial":
                self._publish_state(event.share, state)
        elif isinstance(event, rp.BatchReceived):
            state.received += event.written
            state.refused += event.refused
            state.bytes += event.bytes
            if event.pending is not None:  # else the last estimate stands (an older peer)
                state.pending_in = event.pending
            state.last_sync = time.time()
            publish("sync.batch_received", share=share, peer=self.name, docs=event.written,
                    written=event.written, refused=event.refused, bytes=event.bytes,
                    pending=event.pending, inline=event.inline)
            if state.state == "initial":
                self._publish_state(event.share, state)
        elif isinstance(event, rp.DocRefused):
            publish("sync.doc_refused", share=share, peer=self.name, id=event.doc_id,
                    rev=event.rev, reason=event.reason, direction=event.direction)
        elif isinstance(event, rp.Lag):
            state.pending_out = event.pending_docs
            state.lag_ms = round(event.seconds * 1000, 1)
        elif isinstance(event, rp.CaughtUp):
            state.last_sync = time.time()
            state.caught_up.add(event.direction)
            if event.direction == "pull" and state.pending_in is not None:
                state.pending_in = 0  # the peer says we have everything it has
            self._settle(event.share, state)


class _TokenGate:
    """The replicator's gate, answered by the token: one command per batch each way."""

    def __init__(self, call, peer: bytes):
        self._call = call
        self._peer = peer

    async def _decide(self, command: str, **args) -> dict:
        """One token command; its failures as the replicator knows them: the token away
        (restarted by its supervisor) passes, a refusal does not. Neither ends the node."""
        try:
            return await self._call(command, peer=self._peer, **args)
        except TokenUnavailable as exc:
            raise GateUnavailable(f"the token is unavailable: {exc}") from exc
        except TokenError as exc:
            raise GateRefused(f"the token refused {command}: {exc}") from exc

    async def outgoing(self, share: str, docs: list[dict]) -> list[dict]:
        if not docs:
            return []
        answer = await self._decide("share.outgoing", share=share, docs=docs)
        return [doc if verdict is None else verdict["doc"]
                for doc, verdict in zip(docs, answer["verdicts"])
                if verdict is None or "doc" in verdict]

    async def incoming(self, share: str, docs: list[dict],
                       existing: dict[str, dict]) -> list[dict | str]:
        if not docs:
            return []
        answer = await self._decide("share.incoming", share=share, docs=docs,
                                    existing=existing)
        return [doc if r is None else r["doc"] if "doc" in r else str(r["refused"])
                for doc, r in zip(docs, answer["results"])]


def _relays_of(message: Mapping[Any, Any]) -> list[str]:
    """The relays a joiner says it is reached through (the token checks each one)."""
    relays = message.get("relays")
    return [r for r in relays if isinstance(r, str)][:4] if isinstance(relays, list) else []
