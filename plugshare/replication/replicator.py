"""Replication with one peer over one connection, on trio: the I/O around `protocol`.

`PeerReplication` runs on a peer connection (anything with async `send(dict)` and `receive()`,
such as `transport.PeerConnection`) and a store. It routes every incoming replication message
to its stream: our pushes (one per share we send to this peer, started with `start_push`) and
the peer's pushes to us (accepted per share by `accept_share`). A `Gate`, when given, decides
the documents a batch at a time: which leave (and in what form) before they are offered, and
which land (and in what form) before they are written. Non-replication messages go to
`other_message`.

A push reads the changes feed from its checkpoint in batches, keeps up to `max_in_flight`
batches in flight, then follows `store.wait_for_change` (no polling) and sends each new change
as it lands (a small batch with its docs, in one round trip: see `protocol`). What the peer
sent us is not offered back to it (`Echoes`), and a page of such echoes alone moves the
checkpoint without writing it. The checkpoint (a `_local` doc per share and peer, see `checkpoint_id`) records
the source seq, the target's store id and the caller's scope tag; a push resumes from it only
when both still match, else from the start (so a target whose store was replaced, or a share
whose rule changed, is sent everything again; writes are idempotent).

Deadlock freedom with both nodes pushing at once over one connection: the receive loop never
waits on the network. Replies to our pushes (at most two per batch in flight) go into inboxes
without waiting, and an overflowing inbox is the peer breaking the protocol. Incoming pushes
only wait on our store: their replies go through a per-stream queue that holds every reply a
well-behaved source can have outstanding, drained by its own sender task.

Each batch tells the target about how many changes the feed still holds after it (`pending`,
see `changes_after`), so a joining node can show a total: read from the store's `update_seq`
once per catch-up, not per batch.

A connection failure ends `run` (it returns; the caller reconnects); a push or an incoming
stream that breaks down (protocol error, refused share, store failure) ends alone with a
`StreamEnded` event and leaves the others running. A stream that ended for a passing cause
(see `retry`: the store or the token briefly unavailable, here or at the peer) is told so
(`passing`), and our push starts again from its checkpoint after a back-off (`retry_in`);
the peer restarts its own. Every event goes to `on_event`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any, Protocol

import attrs
import trio

from plugshare.errors import PlugshareError
from plugshare.replication import transfer
from plugshare.replication.attachment_sync import AttachmentFetcher, AttachmentServer, ChunkCheck
from plugshare.replication.backoff import Backoff
from plugshare.replication.protocol import (
    DEFAULT_DOCS_MESSAGE_BYTES,
    DEFAULT_INLINE_BYTES,
    DEFAULT_INLINE_REVISIONS,
    DEFAULT_MAX_DOC_BYTES,
    MAX_INLINE_REVISIONS,
    MAX_PENDING,
    MAX_WINDOW,
    OPEN,
    TO_SOURCE,
    Accept,
    BatchAcked,
    CaughtUp,
    CheckpointSaved,
    DiffRevs,
    InScope,
    LocalProtocolError,
    Output,
    ProtocolError,
    ReplicationEvent,
    SaveCheckpoint,
    Send,
    SourceStream,
    StreamEnded,
    StreamStarted,
    TargetStream,
    WriteDocs,
    check_open,
    parse_stream_key,
    refusal,
)
from plugshare.replication.retry import STREAM_BACKOFF, Ending, StreamRetry, ending_of
from plugshare.replication.transport import PeerConnectionClosed
from plugshare.store.base import Doc, NotFound, Seq, Store, StoreError

__all__ = [
    "STORE_ID_DOC",
    "Checkpoint",
    "MessageConnection",
    "PeerReplication",
    "ReplicationConfig",
    "changes_after",
    "checkpoint_id",
    "load_checkpoint",
    "page_limit",
    "seq_number",
    "store_instance_id",
]

logger = logging.getLogger(__name__)

MAX_UNSAVED_ECHO_PAGES = 64
"""Pages of echoes alone (see `Echoes`) a push passes before it saves its checkpoint anyway."""

# While a push catches up, its checkpoint is written at most this often (as CouchDB's
# replicator does, every checkpoint_interval), and always once it is caught up: a durable
# write per batch cost the source's store a commit beside each read of the next batch.
CHECKPOINT_INTERVAL = 1.0  # seconds

STORE_ID_DOC = "plugshare-store-id"
"""The `_local` doc holding a store's random instance id, sent to sources as `store`."""


@attrs.frozen
class ReplicationConfig:
    """Batching and bounds of replication with one peer."""

    batch_size: int = attrs.field(default=200, validator=attrs.validators.ge(1))
    """Changes read from the feed per batch, at most."""
    batch_bytes: int = attrs.field(default=4 * 1024 * 1024, validator=attrs.validators.ge(1))
    """About how many bytes of docs a batch should hold: with big docs, batches get fewer
    changes (a batch's docs stay in memory until the target has answered)."""
    max_in_flight: int = attrs.field(default=4, validator=[attrs.validators.ge(1), attrs.validators.le(MAX_WINDOW)])
    """Batches a push keeps in flight (lowered to the peer's window)."""
    window: int = attrs.field(default=8, validator=[attrs.validators.ge(1), attrs.validators.le(MAX_WINDOW)])
    """Batches a peer's push may have open here at once."""
    docs_message_bytes: int = attrs.field(default=DEFAULT_DOCS_MESSAGE_BYTES, validator=attrs.validators.ge(1))
    """About how many bytes of docs one `rep.docs` message carries."""
    max_doc_bytes: int = attrs.field(default=DEFAULT_MAX_DOC_BYTES, validator=attrs.validators.ge(1))
    """Docs bigger than this (encoded) are not sent; keep it under the link's frame size."""
    inline_revisions: int = attrs.field(default=DEFAULT_INLINE_REVISIONS, validator=[
        attrs.validators.ge(0), attrs.validators.le(MAX_INLINE_REVISIONS)])
    """Revisions a peer's push may send with their docs in one `rep.batch` (one round trip
    instead of two); 0 has every batch diffed first."""
    inline_bytes: int = attrs.field(default=DEFAULT_INLINE_BYTES, validator=attrs.validators.ge(0))
    """Our push sends a batch's docs with its offer when they take about this many bytes at
    most (and the peer takes it); bigger batches are diffed first, so docs the peer holds
    are not sent again. 0: always diffed first."""
    inbox_size: int = attrs.field(default=16, validator=attrs.validators.ge(1))
    """Messages queued for one incoming stream before the receive loop waits for it."""
    end_timeout: float = 2.0
    """Seconds to try telling the peer why a stream ends."""
    retry_backoff: Backoff = STREAM_BACKOFF
    """How long a push that ended for a passing cause waits before it starts again."""


class MessageConnection(Protocol):
    """What replication needs of a peer connection (`transport.PeerConnection` is one): both
    methods raise `PeerConnectionClosed` once it is closed."""

    async def send(self, message: dict[str, Any]) -> None: ...

    async def receive(self) -> Mapping[Any, Any]: ...


EventSink = Callable[[ReplicationEvent], None]
GuardExisting = Callable[[str, Doc, Doc], "str | None"]
"""`guard(share, incoming, local_winner) -> refusal reason | None`: asked, just before a
batch is written, for each incoming doc whose id already names a live local doc; a reason
keeps the doc out (e.g. the local doc lies outside the share: a peer may not overwrite it)."""


# --- store ids and checkpoints ----------------------------------------------------------------


async def store_instance_id(store: Store) -> str:
    """This store's random instance id, made on first use and kept in `_local/plugshare-store-id`.
    Call it once per store and pass the result to every `PeerReplication`."""
    try:
        doc = await store.get_local(STORE_ID_DOC)
        if isinstance(doc.get("id"), str) and doc["id"]:
            return doc["id"]
    except NotFound:
        pass
    store_id = secrets.token_hex(16)
    await store.put_local(STORE_ID_DOC, {"id": store_id})
    return store_id


def checkpoint_id(share: str, peer: str) -> str:
    """The `_local` id of the checkpoint of our push of `share` to `peer`."""
    digest = hashlib.sha256(json.dumps([share, peer]).encode()).hexdigest()[:40]
    return f"plugshare-push-{digest}"


@attrs.frozen
class Checkpoint:
    """Where a push of `share` to `peer` may resume: every change up to `seq` is durable in
    the target store `target_store`, for the share's scope `scope`."""

    seq: Seq
    target_store: str
    scope: str


async def load_checkpoint(store: Store, share: str, peer: str) -> Checkpoint | None:
    """The saved checkpoint, or None (none yet, or unreadable: then the push starts over)."""
    try:
        doc = await store.get_local(checkpoint_id(share, peer))
    except NotFound:
        return None
    seq, target_store, scope = doc.get("seq"), doc.get("target_store"), doc.get("scope")
    if not (isinstance(seq, (int, str)) and isinstance(target_store, str) and isinstance(scope, str)):
        logger.warning("ignoring the malformed checkpoint of share %r to peer %s: %r", share, peer, doc)
        return None
    return Checkpoint(seq, target_store, scope)


def page_limit(config: ReplicationConfig, average_doc_bytes: float | None) -> int:
    """How many changes to read for the next batch: `batch_size`, fewer when docs are big
    (by the size of the last batch's docs) so a batch holds about `batch_bytes`."""
    if not average_doc_bytes:
        return config.batch_size
    return max(1, min(config.batch_size, int(config.batch_bytes // average_doc_bytes)))


_COUCHDB_SEQ = re.compile(r"([0-9]+)(?:-|\Z)")


def seq_number(seq: object) -> int | None:
    """How many updates a seq counts: an integer seq itself (SQLite, pouchdb-server), the
    leading N of a CouchDB `N-...` seq; None when it says no number."""
    if type(seq) is int:
        return seq if seq >= 0 else None
    if isinstance(seq, str) and seq.isascii() and (match := _COUCHDB_SEQ.match(seq)):
        return int(match.group(1))
    return None


def changes_after(update_seq: object, seq: object) -> int | None:
    """The `pending` estimate for a batch ending at `seq` in a feed whose newest seq is
    `update_seq`: the updates between the two, an upper bound on the changes left (a doc
    updated twice is one change; out-of-scope changes count too). None when either seq says
    no number."""
    newest, position = seq_number(update_seq), seq_number(seq)
    if newest is None or position is None:
        return None
    return min(MAX_PENDING, max(0, newest - position))


class Echoes:
    """Revisions the peer sent us that we wrote, the most recent `limit` of them: the peer's
    store holds each (it read it from its own feed), so our push need not offer it back.
    Without this, every change received live goes straight back out (our feed sees it): a
    read of the store, a token decision and a round trip, all for nothing. Bounded: a pair
    forgotten is only offered again, and the peer's revs_diff drops it."""

    def __init__(self, limit: int = 4096) -> None:
        self._limit = limit
        self._pairs: OrderedDict[tuple[str, str], None] = OrderedDict()

    def add(self, pairs: list[tuple[str, str]]) -> None:
        for pair in pairs:
            self._pairs[pair] = None
            self._pairs.move_to_end(pair)
        while len(self._pairs) > self._limit:
            self._pairs.popitem(last=False)

    def __contains__(self, pair: object) -> bool:
        return pair in self._pairs

    def __len__(self) -> int:
        return len(self._pairs)


# --- streams ------------------------------------------------------------------------------------


@attrs.define(eq=False)
class _Push:
    """Our push of one share: its state machine and its inbox of replies."""

    share: str
    scope_tag: str
    machine: SourceStream
    inbox: trio.MemorySendChannel[Mapping[Any, Any]]
    replies: trio.MemoryReceiveChannel[Mapping[Any, Any]]
    cancel_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    progress: trio.Event = attrs.Factory(trio.Event)  # set when a reply was handled
    checkpoint_lock: trio.Lock = attrs.Factory(trio.Lock)
    saved_seq: Seq | None = None
    saved_at: float = float("-inf")  # trio time of the last checkpoint write
    checkpoint_behind: bool = False  # a batch's checkpoint left for later (the interval)
    update_seq: Seq | None = None  # the store's newest seq, as last read for `pending`
    end_reason: str | None = None
    tell_peer: bool = False  # send rep.end with end_reason

    in_scope: InScope | None = None
    passing: bool = False  # the end's cause passes: start the push again
    stop_reason: str | None = None  # stop_push was called: never start it again
    made_progress: bool = False  # a batch was written or the feed caught up
    unsaved_echo_pages: int = 0  # pages of echoes alone the checkpoint passed, not yet saved

    def end(self, reason: str, *, tell_peer: bool, passing: bool = False) -> None:
        """Stop this push for `reason` (the first reason given wins)."""
        if self.end_reason is None:
            self.end_reason, self.tell_peer, self.passing = reason, tell_peer, passing
        self.cancel_scope.cancel()


@attrs.define(eq=False)
class _Pull:
    """A peer's push to us: its state machine, its inbox and its reply queue."""

    machine: TargetStream
    inbox: trio.MemorySendChannel[Mapping[Any, Any]]
    messages: trio.MemoryReceiveChannel[Mapping[Any, Any]]
    replies: trio.MemorySendChannel[dict[str, Any]]
    outgoing: trio.MemoryReceiveChannel[dict[str, Any]]


class Gate(Protocol):
    """Decides documents crossing this link, one call per batch (the interface this module
    owns; the node answers it with its token)."""

    async def outgoing(self, share: str, docs: list[Doc]) -> list[Doc]:
        """The documents of `docs` that may leave, in the form to send."""

    async def incoming(self, share: str, docs: list[Doc],
                       existing: dict[str, Doc]) -> list[Doc | str]:
        """For each doc in order: the form to write, or the reason it is refused.
        `existing` holds the local winner each doc would land on, by id."""


class PeerReplication:
    """Every replication stream with one peer over one connection.

    Run it with ``await nursery.start(replication.run)``; then `start_push` each share to send
    to this peer. `accept_share(share)` is asked when the peer opens a push of `share`: falsy
    refuses the share; a callable `accept(peer, doc) -> (ok, reason)` decides each incoming
    doc; `gate` decides whole batches; `check_chunks` checks attachment chunks as they arrive
    (see `attachment_sync.ChunkCheck`). `store_id` is `await store_instance_id(store)`.
    """

    def __init__(
        self,
        connection: MessageConnection,
        store: Store,
        *,
        peer: str,
        store_id: str,
        accept_share: Callable[[str], Accept | bool | None],
        guard_existing: GuardExisting | None = None,
        gate: Gate | None = None,
        on_event: EventSink | None = None,
        other_message: Callable[[Mapping[Any, Any]], Awaitable[None]] | None = None,
        config: ReplicationConfig = ReplicationConfig(),
        check_chunks: ChunkCheck | None = None,
        on_read: Callable[[str, str], bool] | None = None,
    ) -> None:
        self._connection = connection
        self._store = store
        self.peer = peer
        self._store_id = store_id
        self._accept_share = accept_share
        self._guard_existing = guard_existing
        self._gate = gate
        self._on_event = on_event
        self._other_message = other_message
        self.config = config
        self._on_read = on_read  # (share, doc id): its attachment data fetched on first read
        self._pushes: dict[str, _Push] = {}  # by share
        self._pushes_by_stream: dict[tuple[str, str], _Push] = {}
        self._pulls: dict[tuple[str, str], _Pull] = {}
        self.echoes = Echoes()  # what the peer sent us: our pushes do not offer it back
        self._stream_ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        # Refusals of streams that never opened; dropped (and logged) if the peer stops reading.
        self._control_send, self._control_receive = trio.open_memory_channel[dict[str, Any]](64)
        # Attachment data, on demand and apart from the document streams (attachment_sync).
        self.attachment_server = AttachmentServer(connection, store, peer=peer,
                                                  may_serve=self._may_serve)
        self.attachment_fetcher = AttachmentFetcher(connection, store, peer=peer,
                                                    on_event=self._emit,
                                                    check_chunks=check_chunks)

    @property
    def pushing(self) -> frozenset[str]:
        """The shares we are pushing to this peer right now."""
        return frozenset(self._pushes)

    def _emit(self, event: ReplicationEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)

    # -- running -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Route incoming messages until the connection closes, then stop every stream and
        return. Pushes can be started once this has started."""
        reason = "replication stopped"
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._send_control)
            nursery.start_soon(self.attachment_server.run)
            nursery.start_soon(self.attachment_fetcher.run)
            task_status.started()
            try:
                while True:
                    await self._route(await self._connection.receive())
            except PeerConnectionClosed as closed:
                reason = f"the connection closed: {closed.reason}"
            finally:
                self._nursery = None
                self._end_all(reason)
            nursery.cancel_scope.cancel()

    def _end_all(self, reason: str) -> None:
        """Report every stream as ended (their tasks are about to be cancelled)."""
        for push in self._pushes.values():
            self._emit(StreamEnded(share=push.share, peer=self.peer, direction="push", reason=reason))
        for pull in self._pulls.values():
            self._emit(StreamEnded(share=pull.machine.share, peer=self.peer, direction="pull", reason=reason))
        self._pushes.clear()
        self._pushes_by_stream.clear()
        self._pulls.clear()

    async def _route(self, message: Mapping[Any, Any]) -> None:
        message_type = message.get("type")
        if message_type in transfer.TO_SERVER or message_type in transfer.TO_FETCHER:
            side = (self.attachment_server if message_type in transfer.TO_SERVER
                    else self.attachment_fetcher)
            try:
                side.deliver(message)
            except transfer.TransferError as error:
                logger.warning("peer %s broke an attachment transfer; dropped: %s", self.peer, error)
            return
        if not (isinstance(message_type, str) and message_type.startswith("rep.")):
            if self._other_message is not None:
                await self._other_message(message)
            else:
                logger.warning("peer %s sent a message of unknown type %r; dropped", self.peer, message_type)
            return
        try:
            message_type, share, stream = parse_stream_key(message)
        except ProtocolError as error:
            logger.warning("peer %s sent a malformed replication message; dropped: %s", self.peer, error)
            return
        if message_type in TO_SOURCE:
            push = self._pushes_by_stream.get((share, stream))
            if push is None:
                logger.debug("dropped %s for stream %s/%s, which is not ours (any more)", message_type, share, stream)
                return
            try:
                push.inbox.send_nowait(message)
            except trio.WouldBlock:
                push.end("protocol error: the peer sent more replies than batches in flight", tell_peer=True)
            return
        pull = self._pulls.get((share, stream))
        if pull is None:
            if message_type == OPEN:
                self._open_pull(message, share, stream)
            else:
                logger.debug("dropped %s for stream %s/%s, which is not open", message_type, share, stream)
            return
        try:
            await pull.inbox.send(message)
        except trio.BrokenResourceError:
            logger.debug("dropped %s for stream %s/%s, which just ended", message_type, share, stream)

    # -- the peer's pushes to us ------------------------------------------------------------

    def _refuse(self, share: str, stream: str, reason: str) -> None:
        try:
            self._control_send.send_nowait(refusal(share, stream, reason))
        except trio.WouldBlock:
            logger.warning("peer %s is not reading; dropped the refusal of stream %s/%s", self.peer, share, stream)
        self._emit(StreamEnded(share=share, peer=self.peer, direction="pull", reason=reason))

    async def _send_control(self) -> None:
        try:
            async for message in self._control_receive:
                await self._connection.send(message)
        except PeerConnectionClosed:
            pass

    def _open_pull(self, message: Mapping[Any, Any], share: str, stream: str) -> None:
        try:
            check_open(message)
        except ProtocolError as error:
            self._refuse(share, stream, f"protocol error: {error}")
            return
        accept = self._accept_share(share)
        if not accept:
            self._refuse(share, stream, f"this node does not accept share {share!r} from you")
            return
        machine = TargetStream(share=share, stream=stream, peer=self.peer,
                               accept=accept if callable(accept) else None,
                               window=self.config.window, inline=self.config.inline_revisions)
        inbox, messages = trio.open_memory_channel[Mapping[Any, Any]](self.config.inbox_size)
        # Each batch a source has in flight gets at most two replies (rep.missing, rep.ack);
        # plus rep.opened and rep.refuse. A queue that size never blocks a well-behaved peer.
        replies, outgoing = trio.open_memory_channel[dict[str, Any]](2 * self.config.window + 2)
        pull = _Pull(machine, inbox, messages, replies, outgoing)
        self._pulls[(share, stream)] = pull
        assert self._nursery is not None
        self._nursery.start_soon(self._run_pull, pull)

    async def _run_pull(self, pull: _Pull) -> None:
        machine = pull.machine
        key = (machine.share, machine.stream)
        ending: Ending | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_replies, pull.outgoing)
                async with pull.replies:  # closing it lets the sender finish the queue and stop
                    ending = await self._serve_pull(pull)
        finally:
            pull.messages.close()  # a router blocked on a full inbox gets unstuck
            # Without a reason the connection is closing: run() reports the end, with its cause.
            if ending is not None and self._pulls.get(key) is pull:
                del self._pulls[key]
                self._emit(StreamEnded(share=machine.share, peer=self.peer, direction="pull",
                                       reason=ending.reason, passing=ending.passing))

    async def _send_replies(self, outgoing: trio.MemoryReceiveChannel[dict[str, Any]]) -> None:
        # Closing `outgoing` when the connection is gone makes a stream waiting to queue a
        # reply fail at once (BrokenResourceError) instead of waiting forever.
        async with outgoing:
            try:
                async for message in outgoing:
                    await self._connection.send(message)
            except PeerConnectionClosed:
                pass

    async def _write_guarded(self, share: str, docs: list[Doc]) -> list[dict[str, Any]]:
        """Write a batch with new_edits=false, after `guard_existing` has looked at the local
        docs it would land on; a guarded-out doc gets a refusal result and is not written."""
        if not docs:
            return []
        refusals: dict[int, dict[str, Any]] = {}
        if self._gate is not None:
            ids = [doc["_id"] for doc in docs]
            # A deleted doc's tombstone too: it keeps the doctype no write may change.
            local = await self._store.winners(ids, tombstones=True)
            decided = await self._gate.incoming(share, docs, local)
            if len(decided) != len(docs):
                raise LocalProtocolError("the gate answered for another number of docs")
            docs = list(docs)
            for index, answer in enumerate(decided):
                if isinstance(answer, str):
                    refusals[index] = {"id": docs[index]["_id"], "error": "forbidden",
                                       "reason": answer}
                else:
                    docs[index] = answer
        elif self._guard_existing is not None:
            local = await self._store.winners([doc["_id"] for doc in docs])
            for index, doc in enumerate(docs):
                existing = local.get(doc["_id"])
                reason = existing is not None and self._guard_existing(share, doc, existing)
                if reason:
                    refusals[index] = {"id": doc["_id"], "error": "forbidden", "reason": reason}
        written = iter(await self._store.bulk_docs(
            [doc for index, doc in enumerate(docs) if index not in refusals], new_edits=False))
        results = [refusals[index] if index in refusals else next(written)
                   for index in range(len(docs))]
        # A revision whose attachment data we lack waits (durably) for its data, fetched
        # apart from this stream: the batch, and the small docs behind it, go on.
        lacking = [index for index, result in enumerate(results)
                   if result.get("error") == "bad_request"
                   and "missing stub" in str(result.get("reason"))]
        if lacking and self._on_read is not None:
            later = [i for i in lacking if self._on_read(share, docs[i]["_id"])]
            left = await self._write_without_data(share, docs, later, results) if later else []
            lacking = [i for i in lacking if i not in later] + left
        if lacking:
            kept = await self.attachment_fetcher.defer(share, [docs[i] for i in lacking])
            for index, ok in zip(lacking, kept):
                if ok:
                    results[index] = {"id": docs[index]["_id"], "rev": docs[index]["_rev"], "ok": True}
        return results

    async def _write_without_data(self, share: str, docs: list[Doc], lacking: list[int],
                                  results: list[dict[str, Any]]) -> list[int]:
        """A share fetched on read: write the revisions with their stubs alone (the data
        comes when first read); those the store cannot keep so are left to fetch now."""
        left = []
        for index in lacking:
            try:
                await self._store.put_replicated_absent(docs[index], share)
            except StoreError as error:  # e.g. the CouchDB backend: fetched eagerly
                logger.info("fetching the data of %s now, not on read: %s",
                            docs[index].get("_id"), error.reason)
                left.append(index)
                continue
            results[index] = {"id": docs[index]["_id"], "rev": docs[index]["_rev"], "ok": True}
        return left

    async def _may_serve(self, share: str, doc: Doc) -> Doc | str | None:
        """What of `doc` the peer may fetch attachment data of: as our push of `share` would
        send it (its scope, then the gate), a reason, or None while we do not push it."""
        push = self._pushes.get(share)
        if push is None:
            return None
        if push.in_scope is not None and not push.in_scope(doc):
            return f"document {doc.get('_id')!r} is not in share {share!r}"
        if self._gate is not None:
            sent = await self._gate.outgoing(share, [doc])
            if not sent:
                return f"document {doc.get('_id')!r} may not leave in share {share!r}"
            doc = sent[0]
        return doc

    async def _serve_pull(self, pull: _Pull) -> Ending | None:
        """Serve one incoming stream until it ends; why it ended, or None when the
        connection went away (then `run` reports it)."""
        machine = pull.machine
        try:
            await pull.replies.send(machine.opened_message(self._store_id))
            self._emit(StreamStarted(share=machine.share, peer=self.peer, direction="pull", since=None))
            try:
                while True:
                    await self._carry_out_pull(pull, machine.receive(await pull.messages.receive()))
            except PlugshareError as error:
                ending = self._ending(error)
            if ending.tell_peer:  # the peer is told whether to open the stream again
                await pull.replies.send(machine.refuse_message(ending.reason, retry=ending.passing))
            return ending
        except trio.BrokenResourceError:  # the reply sender stopped: the connection is closed
            return None

    def _ending(self, error: PlugshareError) -> Ending:
        """How `error` ends a stream; one that says nothing of the kind is a bug here (logged),
        which ends that stream only, never the link or the node."""
        ending = ending_of(error)
        if ending is None:
            logger.error("a stream with peer %s failed", self.peer, exc_info=error)
            ending = Ending(f"this node failed: {error}")
        return ending

    async def _carry_out_pull(self, pull: _Pull, outputs: list[Output]) -> None:
        machine = pull.machine
        for output in outputs:
            if isinstance(output, Send):
                await pull.replies.send(output.message)
            elif isinstance(output, DiffRevs):
                answer = await self._store.revs_diff(output.revs)
                await self._carry_out_pull(pull, machine.diff_result(output.batch, answer))
            elif isinstance(output, WriteDocs):
                results = await self._write_guarded(machine.share, output.docs)
                self.echoes.add([(doc["_id"], doc["_rev"]) for doc, result in zip(output.docs, results)
                                 if result.get("ok")])
                await self._carry_out_pull(pull, machine.write_result(output.batch, results))
            elif isinstance(output, ReplicationEvent):
                self._emit(output)
            else:
                raise AssertionError(f"a target stream asked for {output!r}")

    # -- our pushes -------------------------------------------------------------------------

    def start_push(self, share: str, *, in_scope: InScope | None = None,
                   scope_tag: str = "") -> None:
        """Start pushing `share` to this peer: every leaf revision `in_scope(doc)` admits.
        `scope_tag` names the share's scope (e.g. a hash of its rule): the checkpoint is only
        resumed under the same tag. Requires `run` to have started."""
        if self._nursery is None:
            raise LocalProtocolError("start_push needs run() to have started")
        if share in self._pushes:
            raise LocalProtocolError(f"share {share!r} is already being pushed to peer {self.peer}")
        self._nursery.start_soon(self._run_push, self._new_push(share, in_scope, scope_tag))

    def _new_push(self, share: str, in_scope: InScope | None, scope_tag: str) -> _Push:
        """A new stream of our push of `share`, registered (its first run, or a restart)."""
        config = self.config
        machine = SourceStream(
            share=share,
            stream=str(next(self._stream_ids)),
            peer=self.peer,
            in_scope=in_scope,
            max_in_flight=config.max_in_flight,
            docs_message_bytes=config.docs_message_bytes,
            max_doc_bytes=config.max_doc_bytes,
            inline_bytes=config.inline_bytes,
        )
        # The target sends at most rep.opened, rep.refuse and two replies per batch in flight.
        inbox, replies = trio.open_memory_channel[Mapping[Any, Any]](2 * config.max_in_flight + 2)
        push = _Push(share, scope_tag, machine, inbox, replies, in_scope=in_scope)
        self._pushes[share] = push
        self._pushes_by_stream[(share, machine.stream)] = push
        return push

    def stop_push(self, share: str, reason: str = "its source stopped pushing it") -> None:
        """Stop pushing `share`, telling the peer `reason`; a no-op if it is not pushed.
        A push waiting to start again stops waiting."""
        push = self._pushes.get(share)
        if push is not None:
            push.stop_reason = push.stop_reason or reason
            push.end(reason, tell_peer=True)

    async def _run_push(self, push: _Push) -> None:
        """Run our push of a share, and again from its checkpoint after each passing failure
        (with back-off), until it ends for good, is stopped, or the connection closes."""
        retry = StreamRetry(self.config.retry_backoff)
        try:
            while True:
                await self._run_stream(push)
                if push.made_progress:
                    retry.succeeded()
                if self._pushes.get(push.share) is not push or push.end_reason is None:
                    return  # run() has reported the end already: the connection is closing
                if not push.passing or push.stop_reason is not None:
                    self._emit(StreamEnded(share=push.share, peer=self.peer, direction="push",
                                           reason=push.stop_reason or push.end_reason))
                    return
                delay = retry.next_delay()
                logger.info("push of share %r to peer %s ended (%s); starting again in %.1f s",
                            push.share, self.peer, push.end_reason, delay)
                self._emit(StreamEnded(share=push.share, peer=self.peer, direction="push",
                                       reason=push.end_reason, passing=True, retry_in=delay))
                push.cancel_scope = trio.CancelScope()  # stop_push cancels the wait
                with push.cancel_scope:
                    await trio.sleep(delay)
                if push.stop_reason is not None:
                    self._emit(StreamEnded(share=push.share, peer=self.peer, direction="push",
                                           reason=push.stop_reason))
                    return
                push = self._new_push(push.share, push.in_scope, push.scope_tag)
        finally:
            if self._pushes.get(push.share) is push:
                del self._pushes[push.share]

    async def _run_stream(self, push: _Push) -> None:
        """Run one stream of a push until it ends; `push.end_reason` says why."""
        try:
            with push.cancel_scope:
                await self._guarded(push, partial(self._push, push))
            if push.end_reason is not None and push.tell_peer:
                message = push.machine.end_message(
                    push.end_reason, retry=push.passing and push.stop_reason is None)
                with trio.move_on_after(self.config.end_timeout):
                    try:
                        await self._connection.send(message)
                    except PeerConnectionClosed:
                        pass
        finally:
            self._pushes_by_stream.pop((push.share, push.machine.stream), None)

    async def _push(self, push: _Push) -> None:
        machine = push.machine
        await self._connection.send(machine.open_message())
        while not machine.opened:
            await self._carry_out_push(push, machine.receive(await push.replies.receive(), trio.current_time()))
        checkpoint = await load_checkpoint(self._store, push.share, self.peer)
        since: Seq = 0
        if checkpoint is not None and (checkpoint.target_store, checkpoint.scope) == (machine.target_store, push.scope_tag):
            since = checkpoint.seq
            push.saved_seq = since
        machine.resume_from(since)
        self._emit(StreamStarted(share=push.share, peer=self.peer, direction="push", since=since))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._guarded, push, partial(self._feed, push, since))
            await self._guarded(push, partial(self._handle_replies, push))

    async def _guarded(self, push: _Push, work: Callable[[], Awaitable[None]]) -> None:
        """Run one of a push's tasks; an error ending the push ends it (and its sibling) here,
        so it reaches `_run_push` as a reason rather than as an exception group."""
        try:
            await work()
        except PeerConnectionClosed as closed:
            push.end(f"the connection closed: {closed.reason}", tell_peer=False)
        except LocalProtocolError as error:
            # After the push ended (a refusal came while its feed was between two steps),
            # a late step finds the stream ended: nothing more to do.
            if push.end_reason is None:
                ending = self._ending(error)
                push.end(ending.reason, tell_peer=ending.tell_peer, passing=ending.passing)
        except PlugshareError as error:
            ending = self._ending(error)
            push.end(ending.reason, tell_peer=ending.tell_peer, passing=ending.passing)

    async def _feed(self, push: _Push, since: Seq) -> None:
        """Read the changes feed in batches while the window allows, then follow it live."""
        machine = push.machine
        store = self._store
        read_seq = since
        while True:
            while not machine.can_add_batch:
                await push.progress.wait()
            limit = page_limit(self.config, machine.average_doc_bytes)
            page = await store.changes(read_seq, limit=limit)
            if not page.results:
                await self._carry_out_push(push, machine.feed_drained())
                await store.wait_for_change(read_seq)
                continue
            wanted = [(change.id, rev) for change in page.results for rev in change.revs
                      if (change.id, rev) not in self.echoes]
            echoes_only = not wanted
            docs = await store.bulk_get(wanted) if wanted else []
            if self._gate is not None and docs:
                docs = await self._gate.outgoing(push.share, [d for d in docs if "_id" in d])
            read_seq = page.last_seq
            # A short page ends the feed as it stands: nothing is pending, and the store need
            # not be asked (the common case once live).
            pending = 0 if len(page.results) < limit else await self._pending_after(push, read_seq)
            outputs = machine.add_batch(docs, read_seq, trio.current_time(), pending)
            if echoes_only and push.unsaved_echo_pages < MAX_UNSAVED_ECHO_PAGES:
                # A page of what the peer just sent us moves the checkpoint in memory only:
                # a durable write per change received (beside the reads of it) is not worth
                # it. The next batch's save carries it; lost, those pages are read again.
                push.unsaved_echo_pages += 1
                outputs = [output for output in outputs if not isinstance(output, SaveCheckpoint)]
            await self._carry_out_push(push, outputs)
            if len(page.results) < limit:
                # A short page is the end of the feed as it stands: wait for the next change
                # now rather than read the feed again to find it empty (a live change cost
                # each side two reads).
                await self._carry_out_push(push, machine.feed_drained())
                await store.wait_for_change(read_seq)

    async def _pending_after(self, push: _Push, seq: Seq) -> int | None:
        """`changes_after` the store's update_seq, read again only once the feed has reached
        the last one read: a long catch-up asks the store about once, not once per batch."""
        if seq_number(seq) is None:
            return None
        pending = changes_after(push.update_seq, seq)  # None before the first read
        if not pending:
            push.update_seq = await self._store.update_seq()
            pending = changes_after(push.update_seq, seq)
        return pending

    async def _handle_replies(self, push: _Push) -> None:
        machine = push.machine
        async for message in push.replies:
            await self._carry_out_push(push, machine.receive(message, trio.current_time()))
            push.progress.set()  # the window may have room again
            push.progress = trio.Event()

    async def _carry_out_push(self, push: _Push, outputs: list[Output]) -> None:
        for output in outputs:
            if isinstance(output, Send):
                await self._connection.send(output.message)
            elif isinstance(output, SaveCheckpoint):
                if (push.machine.caught_up
                        or trio.current_time() - push.saved_at >= CHECKPOINT_INTERVAL):
                    await self._save_checkpoint(push)
                else:
                    push.checkpoint_behind = True
            elif isinstance(output, ReplicationEvent):
                if isinstance(output, (BatchAcked, CaughtUp)):
                    push.made_progress = True
                if isinstance(output, CaughtUp) and push.checkpoint_behind:
                    # the last ack came before the feed found its end: save it now
                    await self._save_checkpoint(push)
                self._emit(output)
            else:
                raise AssertionError(f"a source stream asked for {output!r}")

    async def _save_checkpoint(self, push: _Push) -> None:
        # Both push tasks may complete batches; one writer at a time, always the latest
        # checkpoint, so a slower write can never put an older one back.
        async with push.checkpoint_lock:
            seq = push.machine.checkpoint
            push.checkpoint_behind = False
            if seq == push.saved_seq:
                return
            assert push.machine.target_store is not None
            await self._store.put_local(
                checkpoint_id(push.share, self.peer),
                {"seq": seq, "target_store": push.machine.target_store, "scope": push.scope_tag,
                 "share": push.share, "peer": self.peer},
            )
            push.saved_seq = seq
            push.saved_at = trio.current_time()
            push.unsaved_echo_pages = 0
        self._emit(CheckpointSaved(share=push.share, peer=self.peer, seq=seq))

