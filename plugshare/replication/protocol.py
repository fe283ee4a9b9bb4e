"""Pushing one share's documents from a SOURCE store to a TARGET store (pure, sans-I/O).

Both directions of a share between two nodes are two independent pushes: A pushes to B and
B pushes to A, over the same peer connection. One push is a *stream*, named by the share and a
stream id the source picks; every message carries both (`share`, `stream`), and its `type`
says which end it is for, so one connection carries any number of streams.

A push, message by message (the source reads its changes feed from its checkpoint)::

    source                                             target
      rep.open {v}                                 ->
                                                   <-  rep.opened {store, window, inline?}
      rep.diff {batch, revs: {id: [rev]}, pending?} ->  (its store's revs_diff)
                                                   <-  rep.missing {batch, missing: {id: [rev]}}
      rep.docs {batch, docs: [doc], last}  (x n)   ->  (accept(peer, doc), bulk_docs new_edits=false)
                                                   <-  rep.ack {batch, written, refused: [[id, rev, reason]]}
    or, for a small batch (one round trip; only to a target that announced `inline`):
      rep.batch {batch, docs: [doc], pending?}     ->  (revs_diff, then as rep.docs for the missing)
                                                   <-  rep.ack {batch, written, refused}
      rep.caught_up {}                             ->  (the source had nothing newer)
      rep.end {reason, retry?}                     ->  (the source stops)
                                                   <-  rep.refuse {reason, retry?}  (the target stops)

* A batch covers one page of the source's changes feed; the source offers every leaf revision
  its `in_scope(doc)` admits, with the seq the page ends at kept on its side only.
* `pending` (optional, a non-negative integer) is the source's estimate of the changes its
  feed still holds after this batch, for the target's progress display only: nothing depends
  on it being right (it counts updates, out-of-scope ones too, so it tends to run high; 0 on
  the page that ends the feed). A source that does not know, or an older one, leaves it out.
* `inline` in `rep.opened` (optional, an integer in 0..`MAX_INLINE_REVISIONS`) says the target
  takes `rep.batch`: a batch of at most that many revisions whose docs travel with the offer.
  The source sends one when the batch is small (`inline` revisions at most, all sendable, about
  `inline_bytes` in all, no more than one `rep.docs` would carry); the target diffs the docs' revisions against its store, drops those
  it already holds (neither written nor refused), checks and writes the rest as it would a
  `rep.docs`, and acknowledges: no `rep.missing` crosses. Larger batches (an initial sync) keep
  the diff-first path, so a big doc the target holds is not sent again. A target that does not
  announce it (an older one) gets diff-first batches only; a `rep.batch` it did not announce,
  or over its count, breaks the protocol.
* An empty `missing` completes the batch. Otherwise the source sends the asked revisions it
  offered (with `_revisions`) in one or more `rep.docs` messages, the final one with `last`
  (possibly with no docs), and the target acknowledges once every accepted doc is durable.
* Up to `window` batches are in flight (the source's limit, lowered to the target's). The
  checkpoint moves only to the seq of a completed batch whose earlier batches are all complete,
  so it never runs ahead of what the target has durably written.
* A batch offers at most `MAX_BATCH_REVISIONS` revisions and its `rep.docs` carry at most that
  many docs in all (a `rep.docs` for a batch not open, too): more breaks the protocol. A page
  offering more is sent as several batches, all but the last ending at the seq the previous
  page ended at, each sent when the window has room. The target asks for at most `MAX_LEAVES`
  revisions of one doc per batch: its store would refuse any more (a doc holds no more
  leaves), so they need not cross.
* Everything that arrives is checked. A message that breaks the protocol (malformed, for a
  batch that is not waiting for it, over the window) raises `ProtocolError`: the stream is then
  ended, nothing of that message is written. Single items are refused on their own and the rest
  of the batch goes on: a doc the target did not ask for in that batch, a forged or malformed
  `_revisions`, a doc `accept` refuses (target side); a revision the target asks for that the
  batch did not offer (source side, so nothing outside the share's scope ever leaves).
* `retry: true` on `rep.end` / `rep.refuse` says the cause passes (a store or token briefly
  unavailable): the source opens a new stream later and resumes from its checkpoint. Without
  it the end is for good (until something changes, such as the share's manifest).
* Resending a batch is harmless: the target may see any batch number again once it is closed,
  and writes with `new_edits=false` are idempotent.

`SourceStream` and `TargetStream` hold no socket, store or clock: the driver
(`plugshare.replication.replicator`) feeds them messages, store results and the time, and
carries out what they return (`Send`, `SaveCheckpoint`, `DiffRevs`, `WriteDocs`); everything
else they return is an event to report (`ReplicationEvent` subclasses).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any, Literal

import attrs
import msgpack

from plugshare.errors import PlugshareError
from plugshare.replication.frames import DEFAULT_MAX_FRAME_SIZE
from plugshare.store.base import MAX_LEAVES, BadRequest, Doc, Seq
from plugshare.store.revtree import check_doc_id, parse_history, parse_rev

__all__ = [
    "BATCH",
    "CAUGHT_UP",
    "DIFF",
    "DOCS",
    "END",
    "MAX_INLINE_REVISIONS",
    "MISSING",
    "OPEN",
    "OPENED",
    "PROTOCOL_VERSION",
    "PeerEndedStream",
    "REFUSE",
    "TO_SOURCE",
    "TO_TARGET",
    "ACK",
    "Accept",
    "BatchAcked",
    "BatchReceived",
    "BatchSent",
    "CaughtUp",
    "CheckpointSaved",
    "DiffRevs",
    "DocRefused",
    "DocWithheld",
    "InScope",
    "Lag",
    "LocalProtocolError",
    "Opened",
    "ProtocolError",
    "ReplicationError",
    "ReplicationEvent",
    "SaveCheckpoint",
    "Send",
    "SourceStream",
    "StreamEnded",
    "StreamStarted",
    "TargetStream",
    "WriteDocs",
    "check_open",
    "parse_stream_key",
    "refusal",
]

PROTOCOL_VERSION = 1

# Source -> target.
OPEN = "rep.open"
DIFF = "rep.diff"
DOCS = "rep.docs"
BATCH = "rep.batch"  # a small batch: the offer and its docs at once
CAUGHT_UP = "rep.caught_up"
END = "rep.end"
# Target -> source.
OPENED = "rep.opened"
MISSING = "rep.missing"
ACK = "rep.ack"
REFUSE = "rep.refuse"

TO_TARGET = frozenset({OPEN, DIFF, DOCS, BATCH, CAUGHT_UP, END})
TO_SOURCE = frozenset({OPENED, MISSING, ACK, REFUSE})

MAX_SHARE_ID_LENGTH = 256
MAX_STREAM_ID_LENGTH = 64
MAX_STORE_ID_LENGTH = 128
MAX_REASON_LENGTH = 500
MAX_WINDOW = 64
MAX_BATCH_NUMBER = 2**63 - 1
MAX_PENDING = 2**63 - 1
# Docs over this size are not sent: with the message envelope they would exceed a frame.
DEFAULT_MAX_DOC_BYTES = DEFAULT_MAX_FRAME_SIZE - 64 * 1024
DEFAULT_DOCS_MESSAGE_BYTES = 1024 * 1024
# Revisions one batch may offer, and docs it may bring. Every revision costs the target a
# revs_diff entry, a token decision and a store write in one go, so a peer must not choose
# how many: this is what one token batch command takes (`plugshare.token.door.MAX_BATCH`),
# and an honest page of 200 changes holds 10,000 revisions only at 50 conflicts per doc (a
# document holds at most `store.MAX_LEAVES`, 100). A rep.diff at the cap is about 0.5 MB,
# well inside a frame (`DEFAULT_MAX_FRAME_SIZE`, 16 MiB).
MAX_BATCH_REVISIONS = 10_000
# A `rep.batch` (docs sent with their offer) holds at most this many revisions: it is for a
# live change or a few, and the docs it brings that the target holds already are sent for
# nothing. The target announces its own count (`inline`), at most this.
MAX_INLINE_REVISIONS = 64
DEFAULT_INLINE_REVISIONS = 16
# The source sends a batch inline when its docs take about this many bytes at most.
DEFAULT_INLINE_BYTES = 64 * 1024

Direction = Literal["push", "pull"]
InScope = Callable[[Doc], bool]
"""`in_scope(doc) -> bool`: may this leaf revision (as `bulk_get` gives it, tombstones
included) leave in this share?"""
Accept = Callable[[str, Doc], "tuple[bool, str]"]
"""`accept(peer, doc) -> (ok, reason)`: may this incoming revision from `peer` be written?
Without one, the target checks the stream (asked for, well-formed history) and leaves the
decision to whoever carries out `WriteDocs` (a whole batch at once)."""


def _everything(_doc: Doc) -> bool:
    return True


def _accept_all(_peer: str, _doc: Doc) -> tuple[bool, str]:
    return True, "decided when written"


# --- errors ------------------------------------------------------------------------------------


class ReplicationError(PlugshareError):
    """Base of replication failures."""


class ProtocolError(ReplicationError):
    """The peer sent a message that breaks the replication protocol; the stream must end."""


class PeerEndedStream(ReplicationError):
    """The peer ended the stream (`rep.end` or `rep.refuse`); `reason` says why, `retry`
    whether the cause passes (the source then starts the stream again later)."""

    def __init__(self, reason: str, retry: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry = retry


class LocalProtocolError(ReplicationError):
    """This side's driver used a state machine out of order (a bug in the caller)."""


# --- what the state machines return ------------------------------------------------------------


@attrs.frozen
class Send:
    """Send `message` to the peer."""

    message: dict[str, Any]


@attrs.frozen
class SaveCheckpoint:
    """Source: every change up to `seq` is durable at the target; store it."""

    seq: Seq


@attrs.frozen
class DiffRevs:
    """Target: ask the store's `revs_diff(revs)` and hand the answer to `diff_result`."""

    batch: int
    revs: dict[str, list[str]]


@attrs.frozen
class WriteDocs:
    """Target: `bulk_docs(docs, new_edits=False)` and hand the results to `write_result`
    (call it even when `docs` is empty)."""

    batch: int
    docs: list[Doc]
    last: bool


@attrs.frozen(kw_only=True)
class ReplicationEvent:
    """Something to report (log, `watch`, tests). `peer` is the peer's node id as given."""

    share: str
    peer: str


@attrs.frozen(kw_only=True)
class Opened(ReplicationEvent):
    """Source: the target accepted the stream; `store` identifies the target's store."""

    store: str
    window: int


@attrs.frozen(kw_only=True)
class BatchSent(ReplicationEvent):
    """Source: a batch's missing revisions are sent (`offered` revisions, `sent` of them)."""

    batch: int
    offered: int
    sent: int


@attrs.frozen(kw_only=True)
class BatchAcked(ReplicationEvent):
    """Source: the target wrote a batch: `written` docs, `refused` refused; `bytes` is the
    msgpack size of the docs sent in it."""

    batch: int
    written: int
    refused: int
    bytes: int = 0


@attrs.frozen(kw_only=True)
class BatchReceived(ReplicationEvent):
    """Target: a batch is written: `written` docs, `refused` refused (here or by the store).
    `bytes` is the msgpack size of the docs written (about what they took on the wire);
    `pending` the source's estimate of the changes still to come after this batch, None when
    it gave none. `inline`: the docs came with the offer (`rep.batch`: one round trip, no
    `rep.missing` asked)."""

    batch: int
    written: int
    refused: int
    pending: int | None = None
    bytes: int = 0
    inline: bool = False


@attrs.frozen(kw_only=True)
class DocRefused(ReplicationEvent):
    """A revision was not written. `pull`: this node refused an incoming one; `push`: the peer
    refused one of ours (the reason is then the peer's)."""

    direction: Direction
    doc_id: str
    rev: str
    reason: str


@attrs.frozen(kw_only=True)
class DocWithheld(ReplicationEvent):
    """Source: a revision the target asked for was not sent (not offered, or unsendable)."""

    doc_id: str
    rev: str
    reason: str


@attrs.frozen(kw_only=True)
class CaughtUp(ReplicationEvent):
    """The target has everything the source's feed had. `push`: our changes reached the peer;
    `pull`: the peer says we have all of its changes."""

    direction: Direction


@attrs.frozen(kw_only=True)
class Lag(ReplicationEvent):
    """Source: `pending_docs` revisions read from the feed are not yet confirmed by the peer;
    the oldest was read `seconds` ago (0.0 when none are pending)."""

    pending_docs: int
    seconds: float


@attrs.frozen(kw_only=True)
class StreamStarted(ReplicationEvent):
    """A stream is open. `push`: reading our feed from `since`; `pull`: the peer pushes to us
    (`since` is None: the position is the peer's)."""

    direction: Direction
    since: Seq | None


@attrs.frozen(kw_only=True)
class CheckpointSaved(ReplicationEvent):
    """Source: the checkpoint of this (share, peer) is now `seq`."""

    seq: Seq


@attrs.frozen(kw_only=True)
class StreamEnded(ReplicationEvent):
    """A stream ended for `reason` (the peer's or ours); the checkpoint stays where it was.
    `passing`: the cause passes and the stream starts again, by us in `retry_in` seconds
    (a push of ours) or by the peer (a pull)."""

    direction: Direction
    reason: str
    passing: bool = False
    retry_in: float | None = None


Output = Send | SaveCheckpoint | DiffRevs | WriteDocs | ReplicationEvent


# --- message checks ----------------------------------------------------------------------------


def _text(value: object, *, limit: int) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= limit:
        return value
    return None


def _reason(value: object) -> str:
    """A peer's reason, shortened; never trusted to be text."""
    return value[:MAX_REASON_LENGTH] if isinstance(value, str) else repr(value)[:MAX_REASON_LENGTH]


def parse_stream_key(message: Mapping[Any, Any]) -> tuple[str, str, str]:
    """`(type, share, stream)` of a replication message; `ProtocolError` when it lacks them."""
    message_type = message.get("type")
    if message_type not in TO_TARGET and message_type not in TO_SOURCE:
        raise ProtocolError(f"{message_type!r} is not a replication message type")
    share = _text(message.get("share"), limit=MAX_SHARE_ID_LENGTH)
    stream = _text(message.get("stream"), limit=MAX_STREAM_ID_LENGTH)
    if share is None or stream is None:
        raise ProtocolError(
            f"{message_type} needs a share id (1..{MAX_SHARE_ID_LENGTH} chars) and a stream id "
            f"(1..{MAX_STREAM_ID_LENGTH} chars), got {message.get('share')!r} and {message.get('stream')!r}"
        )
    return message_type, share, stream


def refusal(share: str, stream: str, reason: str, *, retry: bool = False) -> dict[str, Any]:
    """The `rep.refuse` ending (or declining) the stream `share`/`stream` on the target side;
    `retry` tells the source the cause passes (it may open the stream again later)."""
    message = {"type": REFUSE, "share": share, "stream": stream, "reason": reason[:MAX_REASON_LENGTH]}
    if retry:
        message["retry"] = True
    return message


def check_open(message: Mapping[Any, Any]) -> tuple[str, str]:
    """`(share, stream)` of a `rep.open`; `ProtocolError` for a bad one or another version."""
    message_type, share, stream = parse_stream_key(message)
    if message_type != OPEN:
        raise ProtocolError(f"expected {OPEN}, got {message_type}")
    if message.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"replication protocol version {message.get('v')!r} is not supported "
            f"(this node speaks {PROTOCOL_VERSION})"
        )
    return share, stream


def _batch_number(message: Mapping[Any, Any]) -> int:
    number = message.get("batch")
    if type(number) is not int or not 0 <= number <= MAX_BATCH_NUMBER:
        raise ProtocolError(f"{message['type']}: batch must be an integer in 0..2**63-1, not {number!r}")
    return number


def _pending(message: Mapping[Any, Any]) -> int | None:
    """A `rep.diff`'s optional `pending` count: absent is None, anything but an integer in
    0..2**63-1 breaks the protocol."""
    if "pending" not in message:
        return None
    pending = message["pending"]
    if type(pending) is not int or not 0 <= pending <= MAX_PENDING:
        raise ProtocolError(f"{message['type']}: pending must be an integer in 0..2**63-1 or absent, not {pending!r}")
    return pending


def _revs_map(message: Mapping[Any, Any], field: str) -> dict[str, list[str]]:
    """`{doc id: [rev, ...]}` with valid ids (no local docs) and revs, each list non-empty."""
    value = message.get(field)
    where = f"{message['type']} {field}"
    if not isinstance(value, dict):
        raise ProtocolError(f"{where} must be a map of doc id to revisions, not {type(value).__name__}")
    revs_map: dict[str, list[str]] = {}
    for doc_id, revs in value.items():
        try:
            check_doc_id(doc_id)
        except BadRequest as error:
            raise ProtocolError(f"{where}: {error.reason}") from None
        if doc_id.startswith("_"):
            raise ProtocolError(f"{where}: {doc_id!r} is a local document, never replicated")
        if not isinstance(revs, list) or not revs:
            raise ProtocolError(f"{where}: the revisions of {doc_id!r} must be a non-empty list")
        for rev in revs:
            try:
                parse_rev(rev)
            except BadRequest as error:
                raise ProtocolError(f"{where}: {doc_id!r}: {error.reason}") from None
        revs_map[doc_id] = list(dict.fromkeys(revs))
    return revs_map


def _offered_pair(doc: object) -> tuple[str, str] | None:
    """A `rep.batch` doc's `(_id, _rev)` when both are valid (a replicable id, a rev), else None."""
    if not isinstance(doc, dict):
        return None
    doc_id, rev = doc.get("_id"), doc.get("_rev")
    try:
        check_doc_id(doc_id)
        parse_rev(rev)
    except BadRequest:
        return None
    if doc_id.startswith("_"):
        return None
    return doc_id, rev


def _pair(doc: object) -> tuple[str, str]:
    """A doc's `(_id, _rev)` for reports, whatever it holds."""
    if not isinstance(doc, dict):
        return "", ""
    doc_id, rev = doc.get("_id"), doc.get("_rev")
    return (doc_id if isinstance(doc_id, str) else "", rev if isinstance(rev, str) else "")


# --- source ------------------------------------------------------------------------------------


class _Phase(enum.Enum):
    QUEUED = "waiting for room in the window"
    DIFFING = "waiting for rep.missing"
    SENDING = "waiting for rep.ack"
    DONE = "complete"


@attrs.frozen
class _Offer:
    doc: Doc
    size: int | None  # its msgpack size, None when msgpack cannot encode it
    error: str = ""


def _measure(doc: Doc) -> _Offer:
    try:
        return _Offer(doc, len(msgpack.packb(doc, use_bin_type=True)))
    except (TypeError, ValueError, OverflowError) as error:
        return _Offer(doc, None, str(error))


@attrs.define
class _OutgoingBatch:
    number: int
    seq: Seq  # the changes feed position this batch reads up to
    read_at: float
    offered: dict[tuple[str, str], _Offer]  # emptied once the target has answered
    offered_count: int
    phase: _Phase
    pending: int | None = None  # the feed's estimate of the changes after it, for the target
    sent: int = 0
    sent_bytes: int = 0


class _StreamState(enum.Enum):
    OPENING = "opening"
    RUNNING = "running"
    ENDED = "ended"


class SourceStream:
    """The source end of one push (one share to one peer).

    Use: send `open_message()`; hand every message from the peer to `receive`; once it
    returned `Opened` (which names the target's store), `resume_from` the checkpoint saved for
    that store, add batches read from the changes feed with `add_batch` while `can_add_batch`,
    and call `feed_drained` when the feed has nothing after the last batch.
    """

    def __init__(
        self,
        *,
        share: str,
        stream: str,
        peer: str,
        in_scope: InScope | None = None,
        max_in_flight: int = 4,
        docs_message_bytes: int = DEFAULT_DOCS_MESSAGE_BYTES,
        max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES,
        inline_bytes: int = 0,
    ) -> None:
        if not 1 <= max_in_flight <= MAX_WINDOW:
            raise ValueError(f"max_in_flight must be in 1..{MAX_WINDOW}, not {max_in_flight}")
        if docs_message_bytes < 1 or max_doc_bytes < 1:
            raise ValueError("docs_message_bytes and max_doc_bytes must be positive")
        if inline_bytes < 0:
            raise ValueError("inline_bytes must not be negative")
        self.share = share
        self.stream = stream
        self.peer = peer
        self._in_scope = in_scope or _everything
        self.checkpoint: Seq = 0
        """Every change up to here is durable at the target (as far as this stream knows)."""
        self.window = max_in_flight
        """Batches allowed in flight: `max_in_flight`, lowered to the target's window."""
        self._docs_message_bytes = docs_message_bytes
        self._max_doc_bytes = max_doc_bytes
        self._inline_bytes = inline_bytes  # 0: every batch diff-first
        self.inline_revisions = 0
        """The most revisions the target takes in one `rep.batch` (0: it takes none)."""
        self._state = _StreamState.OPENING
        self._pending: dict[int, _OutgoingBatch] = {}  # batch order, oldest first
        self._next_batch = 0
        self._read_seq: Seq = 0  # where the last batch added ends in the feed
        self._drained = False  # the feed had nothing after the last batch added
        self._caught_up_reported = False
        self.target_store: str | None = None
        self.average_doc_bytes: float | None = None
        """The mean encoded size of the revisions offered in the last batch that had any."""

    def _common(self, message_type: str) -> dict[str, Any]:
        return {"type": message_type, "share": self.share, "stream": self.stream}

    def open_message(self) -> dict[str, Any]:
        return {**self._common(OPEN), "v": PROTOCOL_VERSION}

    def end_message(self, reason: str, *, retry: bool = False) -> dict[str, Any]:
        """The message ending this stream; the stream accepts nothing more afterwards.
        `retry` tells the target the cause passes (this source opens a new stream later)."""
        self._state = _StreamState.ENDED
        message = {**self._common(END), "reason": reason[:MAX_REASON_LENGTH]}
        if retry:
            message["retry"] = True
        return message

    def resume_from(self, since: Seq) -> None:
        """Start reading the feed at `since` (a checkpoint); only before the first batch."""
        if self._next_batch:
            raise LocalProtocolError("resume_from is only allowed before the first batch")
        self.checkpoint = self._read_seq = since

    # -- state

    @property
    def opened(self) -> bool:
        return self._state is _StreamState.RUNNING

    @property
    def in_flight(self) -> int:
        """Batches added and not yet behind the checkpoint."""
        return len(self._pending)

    @property
    def can_add_batch(self) -> bool:
        return self._state is _StreamState.RUNNING and len(self._pending) < self.window

    @property
    def caught_up(self) -> bool:
        """The feed had nothing after the last batch, and every batch is acknowledged."""
        return self._drained and not self._pending

    @property
    def pending_docs(self) -> int:
        """Revisions offered in batches the checkpoint has not passed."""
        return sum(batch.offered_count for batch in self._pending.values())

    def lag(self, now: float) -> Lag:
        oldest = next(iter(self._pending.values()), None)
        seconds = max(0.0, now - oldest.read_at) if oldest is not None else 0.0
        return Lag(share=self.share, peer=self.peer, pending_docs=self.pending_docs, seconds=seconds)

    # -- feeding

    def add_batch(self, docs: list[Doc], seq: Seq, now: float, pending: int | None = None) -> list[Output]:
        """A page of the changes feed ending at `seq`: `docs` are its leaf revisions as
        `bulk_get` returned them (with `_revisions`). Offers those in scope. `pending`, when
        known, estimates the changes the feed holds after `seq` (sent along for the target's
        progress display)."""
        if pending is not None and (type(pending) is not int or not 0 <= pending <= MAX_PENDING):
            raise ValueError(f"pending must be an integer in 0..2**63-1 or None, not {pending!r}")
        if not self.can_add_batch:
            raise LocalProtocolError(
                f"cannot add a batch: the stream is {self._state.value} with "
                f"{len(self._pending)} of {self.window} batches in flight"
            )
        offered = {(doc["_id"], doc["_rev"]): _measure(doc) for doc in docs if self._in_scope(doc)}
        if offered:
            self.average_doc_bytes = sum(offer.size or 0 for offer in offered.values()) / len(offered)
        self._drained = False
        previous_seq, self._read_seq = self._read_seq, seq
        if not offered:  # nothing in scope: the batch is complete as it stands
            number = self._next_batch
            self._next_batch += 1
            self._pending[number] = _OutgoingBatch(number, seq, now, {}, 0, _Phase.DONE)
            return self._advance(now)
        self._caught_up_reported = False
        # Over the cap, the page goes as several batches; only the last one ends at `seq`,
        # so the checkpoint passes the page once all of it is written.
        offers = list(offered.items())
        for start in range(0, len(offers), MAX_BATCH_REVISIONS):
            part = dict(offers[start:start + MAX_BATCH_REVISIONS])
            last = start + MAX_BATCH_REVISIONS >= len(offers)
            number = self._next_batch
            self._next_batch += 1
            self._pending[number] = _OutgoingBatch(number, seq if last else previous_seq, now,
                                                   part, len(part), _Phase.QUEUED, pending)
        return self._send_queued()

    def _send_queued(self) -> list[Output]:
        """The `rep.diff` of each queued batch the window has room for, oldest first."""
        batches = self._pending.values()
        room = self.window - sum(1 for b in batches if b.phase in (_Phase.DIFFING, _Phase.SENDING))
        outputs: list[Output] = []
        for batch in batches:
            if room <= 0:
                break
            if batch.phase is not _Phase.QUEUED:
                continue
            room -= 1
            if self._small(batch):
                outputs += self._send_inline(batch)
                continue
            revs: dict[str, list[str]] = {}
            for doc_id, rev in batch.offered:
                revs.setdefault(doc_id, []).append(rev)
            diff = {**self._common(DIFF), "batch": batch.number, "revs": revs}
            if batch.pending is not None:
                diff["pending"] = batch.pending
            batch.phase = _Phase.DIFFING
            outputs.append(Send(diff))
        return outputs

    def _small(self, batch: _OutgoingBatch) -> bool:
        """Does `batch` go inline: the target takes it, and every doc is sendable and all of
        them together about `inline_bytes` at most (a doc the target holds is then sent for
        little)?"""
        if not 0 < batch.offered_count <= self.inline_revisions:
            return False
        total = 0
        for offer in batch.offered.values():
            if offer.size is None or offer.size > self._max_doc_bytes:
                return False  # diff-first says why it is withheld, if it is asked for
            total += offer.size
        return total <= min(self._inline_bytes, self._docs_message_bytes)  # one docs message

    def _send_inline(self, batch: _OutgoingBatch) -> list[Output]:
        """The `rep.batch` of a small batch: every offered doc, then wait for the ack."""
        offers, batch.offered = list(batch.offered.values()), {}
        message = {**self._common(BATCH), "batch": batch.number, "docs": [offer.doc for offer in offers]}
        if batch.pending is not None:
            message["pending"] = batch.pending
        batch.sent = len(offers)
        batch.sent_bytes = sum(offer.size or 0 for offer in offers)
        batch.phase = _Phase.SENDING
        return [Send(message), BatchSent(share=self.share, peer=self.peer, batch=batch.number,
                                         offered=batch.offered_count, sent=batch.sent)]

    def feed_drained(self) -> list[Output]:
        """The changes feed has nothing after the last batch added."""
        self._drained = True
        return self._caught_up()

    # -- receiving

    def receive(self, message: Mapping[Any, Any], now: float) -> list[Output]:
        """Handle a message from the target. Raises `ProtocolError` for one that breaks the
        protocol and `PeerEndedStream` for `rep.refuse`."""
        message_type, share, stream = parse_stream_key(message)
        if (share, stream) != (self.share, self.stream) or message_type not in TO_SOURCE:
            raise LocalProtocolError(f"{message_type} for stream {share}/{stream} routed to {self.share}/{self.stream}")
        if self._state is _StreamState.ENDED:
            raise LocalProtocolError("the stream has ended")
        if message_type == REFUSE:
            self._state = _StreamState.ENDED
            raise PeerEndedStream(_reason(message.get("reason")), retry=message.get("retry") is True)
        if message_type == OPENED:
            return self._receive_opened(message)
        if self._state is not _StreamState.RUNNING:
            raise ProtocolError(f"{message_type} before {OPENED}")
        if message_type == MISSING:
            return self._receive_missing(message, now)
        return self._receive_ack(message, now)

    def _receive_opened(self, message: Mapping[Any, Any]) -> list[Output]:
        if self._state is not _StreamState.OPENING:
            raise ProtocolError(f"a second {OPENED}")
        store = _text(message.get("store"), limit=MAX_STORE_ID_LENGTH)
        if store is None:
            raise ProtocolError(f"{OPENED}: store must be a non-empty id of at most {MAX_STORE_ID_LENGTH} chars")
        window = message.get("window")
        if type(window) is not int or not 1 <= window <= MAX_WINDOW:
            raise ProtocolError(f"{OPENED}: window must be an integer in 1..{MAX_WINDOW}, not {window!r}")
        inline = message.get("inline", 0)  # absent: an older target, diff-first only
        if type(inline) is not int or not 0 <= inline <= MAX_INLINE_REVISIONS:
            raise ProtocolError(f"{OPENED}: inline must be an integer in 0..{MAX_INLINE_REVISIONS} or absent, not {inline!r}")
        self._state = _StreamState.RUNNING
        self.window = min(self.window, window)
        self.inline_revisions = inline if self._inline_bytes else 0
        self.target_store = store
        return [Opened(share=self.share, peer=self.peer, store=store, window=self.window)]

    def _batch_in(self, message: Mapping[Any, Any], phase: _Phase) -> _OutgoingBatch:
        number = _batch_number(message)
        batch = self._pending.get(number)
        if batch is None or batch.phase is not phase:
            state = "unknown" if batch is None else batch.phase.value
            raise ProtocolError(f"{message['type']} for batch {number}, which is {state}")
        return batch

    def _receive_missing(self, message: Mapping[Any, Any], now: float) -> list[Output]:
        batch = self._batch_in(message, _Phase.DIFFING)
        missing = _revs_map(message, "missing")
        offered, batch.offered = batch.offered, {}
        outputs: list[Output] = []
        wanted = []
        for doc_id, revs in missing.items():
            for rev in revs:
                offer = offered.pop((doc_id, rev), None)
                if offer is None:
                    reason = f"the peer asked for a revision batch {batch.number} did not offer"
                    outputs.append(self._withheld(doc_id, rev, reason))
                else:
                    wanted.append(offer)
        if not missing:
            batch.phase = _Phase.DONE
            outputs.append(BatchSent(share=self.share, peer=self.peer, batch=batch.number,
                                     offered=batch.offered_count, sent=0))
            return outputs + self._advance(now) + self._send_queued()
        outputs += self._docs_messages(batch, wanted)
        batch.phase = _Phase.SENDING
        outputs.append(BatchSent(share=self.share, peer=self.peer, batch=batch.number,
                                 offered=batch.offered_count, sent=batch.sent))
        return outputs

    def _withheld(self, doc_id: str, rev: str, reason: str) -> DocWithheld:
        return DocWithheld(share=self.share, peer=self.peer, doc_id=doc_id, rev=rev, reason=reason)

    def _docs_messages(self, batch: _OutgoingBatch, offers: list[_Offer]) -> list[Output]:
        """`rep.docs` messages of about `docs_message_bytes` each, the final one `last`."""
        outputs: list[Output] = []
        chunk: list[Doc] = []
        size = 0
        for offer in offers:
            doc = offer.doc
            if offer.size is None:
                outputs.append(self._withheld(doc["_id"], doc["_rev"], f"it cannot be encoded: {offer.error}"))
                continue
            if offer.size > self._max_doc_bytes:
                reason = f"it is {offer.size} bytes, over the limit of {self._max_doc_bytes}"
                outputs.append(self._withheld(doc["_id"], doc["_rev"], reason))
                continue
            if chunk and size + offer.size > self._docs_message_bytes:
                outputs.append(Send({**self._common(DOCS), "batch": batch.number, "docs": chunk, "last": False}))
                chunk, size = [], 0
            chunk.append(doc)
            size += offer.size
            batch.sent += 1
            batch.sent_bytes += offer.size
        outputs.append(Send({**self._common(DOCS), "batch": batch.number, "docs": chunk, "last": True}))
        return outputs

    def _receive_ack(self, message: Mapping[Any, Any], now: float) -> list[Output]:
        batch = self._batch_in(message, _Phase.SENDING)
        written = message.get("written")
        refused = message.get("refused")
        if type(written) is not int or not 0 <= written <= batch.sent:
            raise ProtocolError(f"{ACK}: written must be an integer in 0..{batch.sent}, not {written!r}")
        if not isinstance(refused, list) or written + len(refused) > batch.sent:
            raise ProtocolError(
                f"{ACK}: refused must be a list of at most {batch.sent - written} [id, rev, reason] entries"
            )
        outputs: list[Output] = []
        for entry in refused:
            if not (isinstance(entry, list) and len(entry) == 3 and all(isinstance(item, str) for item in entry)):
                raise ProtocolError(f"{ACK}: a refused entry must be [id, rev, reason], not {entry!r}")
            doc_id, rev, reason = entry
            outputs.append(DocRefused(share=self.share, peer=self.peer, direction="push",
                                      doc_id=doc_id, rev=rev, reason=_reason(reason)))
        batch.phase = _Phase.DONE
        outputs.append(BatchAcked(share=self.share, peer=self.peer, batch=batch.number,
                                  written=written, refused=len(refused), bytes=batch.sent_bytes))
        return outputs + self._advance(now) + self._send_queued()

    def _advance(self, now: float) -> list[Output]:
        """Move the checkpoint over the complete batches at the front, in batch order."""
        moved = False
        while self._pending:
            number, batch = next(iter(self._pending.items()))
            if batch.phase is not _Phase.DONE:
                break
            del self._pending[number]
            self.checkpoint = batch.seq
            moved = True
        if not moved:
            return []
        return [SaveCheckpoint(self.checkpoint), self.lag(now), *self._caught_up()]

    def _caught_up(self) -> list[Output]:
        if self._drained and not self._pending and not self._caught_up_reported:
            self._caught_up_reported = True
            return [CaughtUp(share=self.share, peer=self.peer, direction="push"), Send(self._common(CAUGHT_UP))]
        return []


# --- target ------------------------------------------------------------------------------------


@attrs.define
class _IncomingBatch:
    number: int
    pending: int | None  # the source's estimate of the changes after this batch
    asked: set[tuple[str, str]] = attrs.Factory(set)  # asked and not yet received
    received: int = 0  # docs that came for it, refused ones included
    written: int = 0
    written_bytes: int = 0
    refused: list[list[str]] = attrs.Factory(list)
    inline: list[object] | None = None  # a rep.batch's docs, held until its revs_diff answers


class TargetStream:
    """The target end of one push: checks what the source sends and says what to write.

    Use: send `opened_message(store_id)`; hand every message from the source to `receive` and
    carry out what it returns: a `DiffRevs` is answered with `diff_result`, a `WriteDocs` with
    `write_result`, before the next message is received.
    """

    def __init__(self, *, share: str, stream: str, peer: str, accept: Accept | None = None,
                 window: int = 8, inline: int = 0) -> None:
        if not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"window must be in 1..{MAX_WINDOW}, not {window}")
        if not 0 <= inline <= MAX_INLINE_REVISIONS:
            raise ValueError(f"inline must be in 0..{MAX_INLINE_REVISIONS}, not {inline}")
        self.share = share
        self.stream = stream
        self.peer = peer
        self.window = window
        self.inline = inline
        """The most revisions a `rep.batch` may bring (announced); 0 refuses rep.batch."""
        self._accept = accept or _accept_all
        self._open: dict[int, _IncomingBatch] = {}
        self._awaiting: DiffRevs | WriteDocs | None = None  # the action the driver owes us
        self._ended = False

    def _common(self, message_type: str) -> dict[str, Any]:
        return {"type": message_type, "share": self.share, "stream": self.stream}

    def opened_message(self, store_id: str) -> dict[str, Any]:
        message = {**self._common(OPENED), "store": store_id, "window": self.window}
        if self.inline:
            message["inline"] = self.inline
        return message

    def refuse_message(self, reason: str, *, retry: bool = False) -> dict[str, Any]:
        """The message ending this stream; the stream accepts nothing more afterwards."""
        self._ended = True
        return refusal(self.share, self.stream, reason, retry=retry)

    @property
    def open_batches(self) -> int:
        return len(self._open)

    def receive(self, message: Mapping[Any, Any]) -> list[Output]:
        """Handle a message from the source. Raises `ProtocolError` for one that breaks the
        protocol and `PeerEndedStream` for `rep.end`."""
        message_type, share, stream = parse_stream_key(message)
        if (share, stream) != (self.share, self.stream) or message_type not in TO_TARGET:
            raise LocalProtocolError(f"{message_type} for stream {share}/{stream} routed to {self.share}/{self.stream}")
        if self._ended:
            raise LocalProtocolError("the stream has ended")
        if self._awaiting is not None:
            raise LocalProtocolError(f"the result of {self._awaiting!r} is still owed")
        if message_type == END:
            self._ended = True
            raise PeerEndedStream(_reason(message.get("reason")), retry=message.get("retry") is True)
        if message_type == OPEN:
            raise ProtocolError(f"a second {OPEN} for stream {stream}")
        if message_type == CAUGHT_UP:
            return [CaughtUp(share=self.share, peer=self.peer, direction="pull")]
        if message_type == DIFF:
            return self._receive_diff(message)
        if message_type == BATCH:
            return self._receive_inline(message)
        return self._receive_docs(message)

    def _new_batch_number(self, message: Mapping[Any, Any]) -> int:
        """The number of a batch `message` opens, if the window has room for it."""
        number = _batch_number(message)
        kind = message["type"]
        if number in self._open:
            raise ProtocolError(f"{kind} for batch {number}, which is already open")
        if len(self._open) >= self.window:
            raise ProtocolError(f"{kind} for batch {number} while {len(self._open)} batches are open (window {self.window})")
        return number

    def _receive_inline(self, message: Mapping[Any, Any]) -> list[Output]:
        """A `rep.batch`: its docs are held while the store says which revisions it lacks."""
        if not self.inline:
            raise ProtocolError(f"{BATCH} on a stream that did not offer it (inline is off here)")
        docs = message.get("docs")
        if not isinstance(docs, list) or not docs:
            raise ProtocolError(f"{BATCH} needs docs (a non-empty list)")
        if len(docs) > self.inline:  # counted before anything else is looked at
            raise ProtocolError(f"{BATCH} brings {len(docs)} docs, over the {self.inline} this node takes in one")
        number = self._new_batch_number(message)
        pending = _pending(message)
        # What the store is asked about: each well-formed doc's (id, rev); the others are
        # refused one by one when the answer comes (as a rep.docs would have them).
        revs: dict[str, list[str]] = {}
        for doc in docs:
            pair = _offered_pair(doc)
            if pair is not None and pair[1] not in revs.get(pair[0], ()):
                revs.setdefault(pair[0], []).append(pair[1])
        self._open[number] = _IncomingBatch(number, pending, inline=docs)
        self._awaiting = DiffRevs(number, revs)
        return [self._awaiting]

    def _receive_diff(self, message: Mapping[Any, Any]) -> list[Output]:
        number = self._new_batch_number(message)
        offered = message.get("revs")
        if isinstance(offered, dict):  # counted before anything else is looked at
            count = sum(len(revs) if isinstance(revs, list) else 1 for revs in offered.values())
            if count > MAX_BATCH_REVISIONS:
                raise ProtocolError(f"{DIFF} for batch {number} offers {count} revisions, over "
                                    f"the cap of {MAX_BATCH_REVISIONS} per batch")
        revs = _revs_map(message, "revs")
        pending = _pending(message)
        self._open[number] = _IncomingBatch(number, pending)
        self._awaiting = DiffRevs(number, revs)
        return [self._awaiting]

    def diff_result(self, batch: int, answer: Mapping[str, Mapping[str, Any]]) -> list[Output]:
        """The store's `revs_diff` answer for the `DiffRevs` of `batch`."""
        action = self._awaiting
        if not isinstance(action, DiffRevs) or action.batch != batch:
            raise LocalProtocolError(f"no revs_diff is owed for batch {batch}")
        self._awaiting = None
        incoming = self._open[batch]
        missing: dict[str, list[str]] = {}
        for doc_id, offered in action.revs.items():
            lacking = set(answer.get(doc_id, {}).get("missing", ()))
            # Only ever ask for what was offered, and no more than a doc may hold.
            revs = [rev for rev in offered if rev in lacking][:MAX_LEAVES]
            if revs:
                missing[doc_id] = revs
                incoming.asked.update((doc_id, rev) for rev in revs)
        if incoming.inline is not None:
            return self._write_inline(incoming)
        if not missing:
            del self._open[batch]
        return [Send({**self._common(MISSING), "batch": batch, "missing": missing})]

    def _write_inline(self, incoming: _IncomingBatch) -> list[Output]:
        """A `rep.batch` once diffed: the docs the store lacks are checked and written as
        if asked for; the others (held already, over a doc's leaf cap, or a second copy in
        this batch) are dropped: neither written nor refused, as diff-first never sends them."""
        docs, incoming.inline = incoming.inline or [], []
        incoming.received = len(docs)
        outputs: list[Output] = []
        accepted = []
        for doc in docs:
            pair = _offered_pair(doc)
            if pair is None:
                reason = (f"not a document but a {type(doc).__name__}" if not isinstance(doc, dict)
                          else "no valid _id and _rev: it cannot be offered")
            elif pair not in incoming.asked:
                continue
            else:
                reason = self._check_doc(incoming, doc)
            if reason is None:
                accepted.append(doc)
            else:
                outputs.append(self._refused(incoming, doc, reason))
        self._awaiting = WriteDocs(incoming.number, accepted, True)
        return [*outputs, self._awaiting]

    def _receive_docs(self, message: Mapping[Any, Any]) -> list[Output]:
        number = _batch_number(message)
        docs = message.get("docs")
        last = message.get("last")
        if not isinstance(docs, list) or type(last) is not bool:
            raise ProtocolError(f"{DOCS} needs docs (a list) and last (true or false)")
        incoming = self._open.get(number)
        received = len(docs) + (incoming.received if incoming is not None else 0)
        if received > MAX_BATCH_REVISIONS:
            raise ProtocolError(f"{DOCS} for batch {number}: more than {MAX_BATCH_REVISIONS} "
                                f"docs ({received}), over the cap of a batch")
        if incoming is not None:
            incoming.received = received
        outputs: list[Output] = []
        accepted = []
        for doc in docs:
            if incoming is None:
                reason = f"not asked for: batch {number} is not open"
            else:
                reason = self._check_doc(incoming, doc)
            if reason is None:
                accepted.append(doc)
            else:
                outputs.append(self._refused(incoming, doc, reason))
        if incoming is None:
            return outputs  # nothing is written, and there is no batch to acknowledge
        self._awaiting = WriteDocs(number, accepted, last)
        return [*outputs, self._awaiting]

    def _refused(self, incoming: _IncomingBatch | None, doc: object, reason: str) -> DocRefused:
        """A doc of a batch refused: announced, and kept for the batch's ack if it is open."""
        doc_id, rev = _pair(doc)
        if incoming is not None:
            incoming.refused.append([doc_id, rev, reason])
        return DocRefused(share=self.share, peer=self.peer, direction="pull", doc_id=doc_id,
                          rev=rev, reason=reason)

    def _check_doc(self, incoming: _IncomingBatch, doc: object) -> str | None:
        """Why `doc` is refused, or None to write it."""
        if not isinstance(doc, dict):
            return f"not a document but a {type(doc).__name__}"
        pair = _pair(doc)
        if pair not in incoming.asked:
            return f"not asked for in batch {incoming.number} (or sent twice)"
        incoming.asked.discard(pair)
        if "_revisions" not in doc:
            return "no _revisions: a replicated revision must carry its history"
        try:
            parse_history(doc["_rev"], doc["_revisions"])
        except BadRequest as error:
            return f"forged or malformed history: {error.reason}"
        ok, reason = self._accept(self.peer, doc)
        if not ok:
            return f"refused: {reason}"
        return None

    def write_result(self, batch: int, results: list[Mapping[str, Any]]) -> list[Output]:
        """The store's `bulk_docs` results for the `WriteDocs` of `batch` (in its doc order)."""
        action = self._awaiting
        if not isinstance(action, WriteDocs) or action.batch != batch:
            raise LocalProtocolError(f"no write is owed for batch {batch}")
        if len(results) != len(action.docs):
            raise LocalProtocolError(f"{len(results)} write results for {len(action.docs)} docs")
        self._awaiting = None
        incoming = self._open[batch]
        outputs: list[Output] = []
        for doc, result in zip(action.docs, results):
            if result.get("ok"):
                incoming.written += 1
                # It came in msgpack, so it goes back out: this is the size it had there.
                incoming.written_bytes += len(msgpack.packb(doc, use_bin_type=True))
                continue
            doc_id, rev = _pair(doc)
            reason = f"the store refused it: {result.get('error')}: {result.get('reason')}"
            incoming.refused.append([doc_id, rev, reason])
            outputs.append(DocRefused(share=self.share, peer=self.peer, direction="pull",
                                      doc_id=doc_id, rev=rev, reason=reason))
        if not action.last:
            return outputs
        del self._open[batch]
        ack = {**self._common(ACK), "batch": batch, "written": incoming.written, "refused": incoming.refused}
        if incoming.inline is not None and not incoming.written and not incoming.refused:
            return [*outputs, Send(ack)]  # all held already: nothing was received, as diff-first
        received = BatchReceived(share=self.share, peer=self.peer, batch=batch, written=incoming.written,
                                 refused=len(incoming.refused), pending=incoming.pending,
                                 bytes=incoming.written_bytes, inline=incoming.inline is not None)
        return [*outputs, Send(ack), received]
