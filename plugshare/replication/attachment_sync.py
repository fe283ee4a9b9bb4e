"""Attachment data with one peer, on trio: the I/O around `transfer`.

`AttachmentServer` answers the peer's requests for the data of our documents' attachments
(only those of documents our push of the share would send it). `AttachmentFetcher` keeps the
revisions that came without their data aside, durably (local docs, one per revision and an
index per peer), fetches the chunks this store lacks, stages each one as it arrives (so a
transfer cut by a crash resumes with the chunks still missing), and writes the revision with
`put_replicated` once every chunk is staged and checked.

Neither ever waits on the network in the connection's receive loop: incoming messages go
into bounded queues (`deliver`), and an overflowing queue is the peer breaking the protocol.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

import attrs
import trio

from plugshare.errors import PlugshareError
from plugshare.replication import transfer
from plugshare.replication.backoff import Backoff
from plugshare.replication.protocol import DocRefused, ReplicationEvent
from plugshare.replication.transport import PeerConnectionClosed
from plugshare.store.attachments import rechunk
from plugshare.store.base import BadRequest, Doc, NotFound, Store, StoreError

logger = logging.getLogger(__name__)

MayServe = Callable[[str, Doc], Awaitable["Doc | str | None"]]
"""`may_serve(share, doc)`: the form of `doc` we would send this peer in `share` (its
`_attachments` are what may be served), a reason it is refused, or None when the share is not
being pushed to the peer right now (ask again later)."""

# Revisions kept aside for their data, per peer: past this, a revision without its data is
# refused like any missing stub (the peer cannot make us keep unboundedly many).
MAX_PENDING_REVISIONS = 10_000
FETCH_BACKOFF = Backoff(initial=1.0, maximum=60.0, multiplier=2.0, jitter=0.2)
PRUNE_EVERY = 64  # kept revisions dropped between two rewrites of the index
PROGRESS_BYTES = 16 * 1024 * 1024  # fetched between two progress lines in the log
REPLY_TIMEOUT = 120.0  # seconds without a reply before a request is given up (and retried)
# Kept revisions fetched at once: one file at a time made each cost two round trips and four
# durable writes in a row (~30 files/s whatever their size). Lanes leave one of the source's
# requests for a read that needs its data now (`node/on_read.py`). A revision whose data is
# larger than LANE_BYTES goes alone, so the data in flight stays within one request's window.
FETCH_LANES = transfer.MAX_OPEN_REQUESTS - 1
LANE_BYTES = 4 * 1024 * 1024


@attrs.frozen(kw_only=True)
class RevisionFetched(ReplicationEvent):
    """Target: a revision kept aside for its attachment data is written: `fetched_bytes` of
    chunk data came from the peer for it, `held_chunks` were here already (not sent)."""

    doc_id: str
    rev: str
    fetched_bytes: int
    held_chunks: int


class ChunkRefused(PlugshareError):
    """`check_chunks` refused chunks of an attachment (tampered, reordered, swapped): the
    revision is refused for good."""


ChunkCheck = Callable[[str, Doc, str, int, "list[tuple[int, bytes]]", int], Awaitable[None]]
"""`check_chunks(share, doc, name, revpos, chunks, count)`: `(index, data)` chunks of
attachment `name` (of `count` chunks) as they arrived, before they are staged;
raises `ChunkRefused` for chunks that must not be kept (a sealed share's chunk that does not
open where it stands), `TransferRefused(retry=True)` when it cannot tell now."""


ChunkProgress = Callable[["list[bytes]", "Collection[bytes]"], None]


class TransferRefused(PlugshareError):
    """The source will not send this attachment (for good, or `retry`: later)."""

    def __init__(self, reason: str, retry: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry = retry


def _send_or_break(channel: trio.MemorySendChannel, item: Any, what: str) -> None:
    try:
        channel.send_nowait(item)
    except trio.WouldBlock:
        raise transfer.TransferError(f"the peer sent more {what} than it may have outstanding")


# --- serving our attachments -------------------------------------------------------------------


class AttachmentServer:
    def __init__(self, connection: Any, store: Store, *, peer: str, may_serve: MayServe) -> None:
        self._connection = connection
        self._store = store
        self.peer = peer
        self._may_serve = may_serve
        # req -> (want, length, hashes) once its manifest is sent; None while it is made.
        self._open: dict[int, tuple[transfer.Want, int, list[bytes]] | None] = {}
        self._served: dict[int, list[int]] = {}  # req -> [chunks, bytes] sent
        self._asked: dict[int, int] = {}  # req -> chunks asked and not yet sent
        # A job per att.get; each asks >= 1 chunk, and a request has <= WINDOW asked.
        bound = transfer.MAX_OPEN_REQUESTS * (transfer.WINDOW + 2)
        self._jobs_send, self._jobs = trio.open_memory_channel[tuple[Any, ...]](bound)
        self.sent_bytes = 0  # chunk data sent to this peer, all requests

    def deliver(self, message: Mapping[Any, Any]) -> None:
        """Take a request from the peer (never waits). `TransferError` for a broken one."""
        kind = message.get("type")
        if kind == transfer.WANT:
            want = transfer.parse_want(message)
            if want.req in self._open:
                raise transfer.TransferError(f"request {want.req} is already open")
            if len(self._open) >= transfer.MAX_OPEN_REQUESTS:
                raise transfer.TransferError(f"more than {transfer.MAX_OPEN_REQUESTS} open requests")
            self._open[want.req] = None
            _send_or_break(self._jobs_send, ("want", want), "requests")
        elif kind == transfer.GET:
            req = message.get("req")
            opened = self._open.get(req) if type(req) is int else None
            if opened is None:
                raise transfer.TransferError(f"{transfer.GET} for request {req!r}, which has no manifest")
            _, indexes = transfer.parse_get(message, len(opened[2]))
            asked = self._asked.get(req, 0) + len(indexes)
            if asked > transfer.WINDOW:
                raise transfer.TransferError(f"more than {transfer.WINDOW} chunks asked of request {req}")
            self._asked[req] = asked
            _send_or_break(self._jobs_send, ("chunks", req, indexes), "chunk requests")
        elif kind == transfer.DONE:
            req = message.get("req")
            self._asked.pop(req, None)
            if self._open.pop(req, None) is not None:
                chunks, size = self._served.pop(req, [0, 0])
                logger.info("served %d chunks (%d bytes) of an attachment to peer %s",
                            chunks, size, self.peer)

    async def run(self) -> None:
        """Carry out requests one at a time until cancelled or the connection closes."""
        try:
            async for job in self._jobs:
                if job[0] == "want":
                    await self._manifest(job[1])
                else:
                    await self._chunks(job[1], job[2])
        except PeerConnectionClosed:
            pass

    async def _manifest(self, want: transfer.Want) -> None:
        try:
            docs = await self._store.bulk_get([(want.doc_id, want.rev)])
            answer = await self._may_serve(want.share, docs[0]) if docs else "no such revision here"
            if answer is None:
                raise TransferRefused(f"share {want.share!r} is not pushed to you now", retry=True)
            if isinstance(answer, str):
                raise TransferRefused(answer)
            stub = (answer.get("_attachments") or {}).get(want.name)
            if not isinstance(stub, dict):
                raise TransferRefused(f"revision {want.rev} of {want.doc_id!r} has no attachment {want.name!r}")
            meta, data = await self._store.open_attachment(want.doc_id, want.name, rev=want.rev)
            if transfer.chunk_count(meta.length) > transfer.MAX_MANIFEST_CHUNKS:
                await data.aclose()
                raise TransferRefused(f"attachment {want.name!r} is too big to transfer")
            hashes = await self._store.chunk_addresses(want.doc_id, want.name, want.rev)
            if hashes is None:  # a backend that does not keep them: read and hash the data
                hashes = [hashlib.sha256(piece).digest() async for piece in rechunk(data)]
            else:
                await data.aclose()
        except TransferRefused as refused:
            self._open.pop(want.req, None)
            await self._connection.send(transfer.fail_message(want.req, refused.reason, retry=refused.retry))
            return
        except (NotFound, BadRequest) as error:
            self._open.pop(want.req, None)
            await self._connection.send(transfer.fail_message(want.req, error.reason))
            return
        except StoreError as error:  # the store away: the peer may ask again later
            self._open.pop(want.req, None)
            await self._connection.send(transfer.fail_message(want.req, error.reason, retry=True))
            return
        if want.req not in self._open:
            return  # the peer gave up meanwhile
        self._open[want.req] = (want, meta.length, hashes)
        self._served[want.req] = [0, 0]
        await self._connection.send(transfer.manifest_message(want.req, meta.length, meta.digest, hashes))

    async def _chunks(self, req: int, indexes: list[int]) -> None:
        """Send the chunks of one att.get: each run of consecutive indexes read as one range
        (one store read per run, not one per chunk)."""
        runs: list[list[int]] = []
        for index in indexes:
            if runs and runs[-1][-1] + 1 == index:
                runs[-1].append(index)
            else:
                runs.append([index])
        for run in runs:
            opened = self._open.get(req)
            if opened is None:
                return  # done or failed meanwhile
            want, length, _ = opened
            start, stop = transfer.chunk_range(run[0], length)[0], transfer.chunk_range(run[-1], length)[1]
            try:
                _, data = await self._store.open_attachment(want.doc_id, want.name, rev=want.rev,
                                                            range=(start, stop))
                pieces = rechunk(data)
                try:
                    for index in run:
                        piece = await anext(pieces, b"")
                        first, end = transfer.chunk_range(index, length)
                        if len(piece) != end - first:
                            raise StoreError(f"attachment {want.name!r} of {want.doc_id!r} "
                                             "is shorter than it says")
                        if req not in self._open:
                            return
                        self._sent(req, len(piece))
                        await self._connection.send(transfer.chunk_message(req, index, piece))
                finally:
                    await pieces.aclose()
                    await data.aclose()
            except StoreError as error:
                self._open.pop(req, None)
                self._asked.pop(req, None)
                await self._connection.send(transfer.fail_message(req, error.reason, retry=True))
                return

    def _sent(self, req: int, size: int) -> None:
        served = self._served.setdefault(req, [0, 0])
        served[0] += 1
        served[1] += size
        self.sent_bytes += size
        if req in self._asked:
            self._asked[req] -= 1


# --- fetching the peer's ---------------------------------------------------------------------


@attrs.define
class _Tally:
    """Of one revision being fetched: chunk data that came for it, chunks already here."""

    fetched_bytes: int = 0
    held_chunks: int = 0
    digests: dict[str, str] = attrs.Factory(dict)  # md5s computed on the way, per attachment


@attrs.define
class _Pass:
    """One pass over the kept revisions, several fetched at once."""

    lanes: trio.Semaphore
    busy_docs: dict[str, trio.Event] = attrs.Factory(dict)  # doc id -> set when its fetch ends
    retry_later: bool = False
    stop: bool = False  # our store is away: start no other fetch


def _data_bytes(doc: Doc) -> int:
    attachments = doc.get("_attachments")
    if not isinstance(attachments, Mapping):
        return 0
    return sum(stub.get("length", 0) for stub in attachments.values()
               if isinstance(stub, Mapping) and type(stub.get("length")) is int)


def _index_id(peer: str) -> str:
    return "plugshare-fetch-" + hashlib.sha256(peer.encode()).hexdigest()[:32]


def _entry_id(peer: str, share: str, doc: Doc) -> str:
    key = "\0".join((peer, share, doc["_id"], doc["_rev"]))
    return "plugshare-fetch-entry-" + hashlib.sha256(key.encode()).hexdigest()[:32]


class AttachmentFetcher:
    def __init__(self, connection: Any, store: Store, *, peer: str,
                 on_event: Callable[[ReplicationEvent], None] | None = None,
                 check_chunks: ChunkCheck | None = None) -> None:
        self._connection = connection
        self._store = store
        self.peer = peer
        self._on_event = on_event
        self._check_chunks = check_chunks
        self._reqs = itertools.count(1)
        self._replies: dict[int, trio.MemorySendChannel[Mapping[Any, Any]]] = {}
        self._lock = trio.Lock()  # one writer of the index at a time
        self._wake = trio.Event()
        self._rng = random.Random()
        # The source takes MAX_OPEN_REQUESTS at once, the kept revisions' and reads' together.
        self._requests = trio.Semaphore(transfer.MAX_OPEN_REQUESTS)
        self.fetched_bytes = 0  # chunk data received from this peer
        self._forgotten: set[str] = set()  # kept revisions dropped, still in the index

    # -- the revisions kept aside, durably ------------------------------------------------

    async def _entries(self) -> list[str]:
        try:
            return list((await self._store.get_local(_index_id(self.peer))).get("entries", []))
        except NotFound:
            return []

    async def defer(self, share: str, docs: list[Doc]) -> list[bool]:
        """Keep each of `docs` (revisions whose attachment data this store lacks) to write
        once its data is fetched; False for those refused because too many are kept already.
        The index is written once for the whole batch."""
        kept = []
        async with self._lock:
            entries = await self._entries()
            known, added = set(entries), False
            for doc in docs:
                entry = _entry_id(self.peer, share, doc)
                if entry not in known:
                    if len(entries) >= MAX_PENDING_REVISIONS:
                        kept.append(False)
                        continue
                    await self._store.put_local(entry, {"share": share, "doc": doc})
                    entries.append(entry)
                    known.add(entry)
                    added = True
                kept.append(True)
            if added:
                await self._store.put_local(_index_id(self.peer), {"entries": entries})
        self._wake.set()
        return kept

    async def _forget(self, entry: str) -> None:
        """Drop a kept revision (written or refused). Its index entry goes later, with others
        (`_prune`): an entry whose doc is gone is skipped meanwhile, also after a restart."""
        try:
            await self._store.delete_local(entry)
        except NotFound:
            pass
        self._forgotten.add(entry)
        if len(self._forgotten) >= PRUNE_EVERY:
            await self._prune()

    async def _prune(self) -> None:
        if not self._forgotten:
            return
        async with self._lock:
            # Those forgotten until now: others may be while the index is written (fetches
            # run at once), and must stay to go with the next prune.
            dropped = set(self._forgotten)
            entries = await self._entries()
            await self._store.put_local(_index_id(self.peer), {
                "entries": [entry for entry in entries if entry not in dropped]})
            self._forgotten -= dropped

    async def pending(self) -> int:
        return len(await self._entries())

    # -- messages from the peer -----------------------------------------------------------

    def deliver(self, message: Mapping[Any, Any]) -> None:
        """An answer from the peer (never waits); one for a request no longer open is dropped."""
        req = message.get("req")
        channel = self._replies.get(req) if type(req) is int else None
        if channel is None:
            return
        _send_or_break(channel, message, "chunks")

    # -- fetching -------------------------------------------------------------------------

    async def run(self) -> None:
        """Fetch the data of every revision kept aside, oldest first (several at once), until
        cancelled or the connection closes; a request the source says to retry waits with a
        back-off."""
        attempt = 0
        try:
            while True:
                self._wake = trio.Event()
                retry_later = await self._fetch_pass()
                await self._prune()
                if retry_later:
                    attempt += 1
                    # New revisions kept aside meanwhile are fetched at once, not after it.
                    with trio.move_on_after(FETCH_BACKOFF.delay(attempt - 1, self._rng)):
                        await self._wake.wait()
                else:
                    attempt = 0
                    if not self._wake.is_set():
                        await self._wake.wait()
        except* PeerConnectionClosed:
            pass

    async def _fetch_pass(self) -> bool:
        """Fetch every revision kept aside now: small ones up to FETCH_LANES at once, a large
        one alone, two revisions of one document never at once (written in the order kept).
        True if some must be tried again later."""
        state = _Pass(trio.Semaphore(FETCH_LANES))
        async with trio.open_nursery() as nursery:
            for entry in await self._entries():
                if state.stop:
                    break
                try:
                    kept = await self._store.get_local(entry)
                except NotFound:
                    await self._forget(entry)
                    continue
                doc_id = str(kept["doc"].get("_id"))
                while doc_id in state.busy_docs:
                    await state.busy_docs[doc_id].wait()
                lanes = FETCH_LANES if _data_bytes(kept["doc"]) > LANE_BYTES else 1
                for _ in range(lanes):  # only this task acquires: a large one cannot starve
                    await state.lanes.acquire()
                if state.stop:
                    for _ in range(lanes):
                        state.lanes.release()
                    break
                state.busy_docs[doc_id] = trio.Event()
                nursery.start_soon(self._fetch_kept, entry, kept, state, lanes)
        return state.retry_later

    async def _fetch_kept(self, entry: str, kept: Doc, state: _Pass, lanes: int) -> None:
        doc_id = str(kept["doc"].get("_id"))
        claimed: list[bytes] = []
        try:
            await self._fetch_revision(kept["share"], kept["doc"], claimed)
        # On "later", what is staged stays staged (`keep_staged`): the next attempt resumes.
        except TransferRefused as refused:
            if refused.retry:
                logger.info("fetching the data of %s from %s later: %s", doc_id, self.peer,
                            refused.reason)
                state.retry_later = True
                await self._release(claimed, keep_staged=True)
                return  # the others may be served (e.g. another share's)
            self._refused(kept, refused.reason)
        except BadRequest as error:  # the data does not check: for good
            self._refused(kept, error.reason)
        except (transfer.TransferError, ChunkRefused) as error:
            self._refused(kept, str(error))
        except StoreError as error:  # our store away: later, from what is staged
            logger.warning("cannot fetch the data of %s from %s now: %s", doc_id, self.peer,
                           error)
            state.retry_later = state.stop = True
            await self._release(claimed, keep_staged=True)
            return
        except PlugshareError as error:  # a check that failed otherwise: later
            logger.warning("fetching the data of %s from %s failed; again later: %s",
                           doc_id, self.peer, error)
            state.retry_later = True
            await self._release(claimed, keep_staged=True)
            return
        except BaseException:  # cancelled (the link went): the next attempt resumes
            await self._release(claimed, keep_staged=True)
            raise
        finally:
            for _ in range(lanes):
                state.lanes.release()
            state.busy_docs.pop(doc_id).set()
        await self._release(claimed)
        await self._forget(entry)

    async def _release(self, claimed: list[bytes], *, keep_staged: bool = False) -> None:
        if claimed:
            with trio.CancelScope(shield=True):
                try:
                    await self._store.release_chunks(claimed, keep_staged=keep_staged)
                except StoreError as error:  # staged chunks stay; the resume window ends them
                    logger.warning("could not release staged chunks: %s", error)

    def _refused(self, kept: Doc, reason: str) -> None:
        logger.warning("refused revision %s of %s from peer %s: %s", kept["doc"].get("_rev"),
                       kept["doc"].get("_id"), self.peer, reason)
        if self._on_event is not None:
            self._on_event(DocRefused(share=kept["share"], peer=self.peer, direction="pull",
                                      doc_id=str(kept["doc"].get("_id")),
                                      rev=str(kept["doc"].get("_rev")),
                                      reason=f"its attachment data: {reason}"))

    async def _fetch_revision(self, share: str, doc: Doc, claimed: list[bytes]) -> None:
        """Fetch the chunks of every attachment of `doc` this store lacks (staging them, and
        claiming those it holds, into `claimed`), then write the revision."""
        attachments = doc.get("_attachments") or {}
        tally = _Tally()
        addresses = {name: await self._fetch_attachment(share, doc, name, stub, claimed,
                                                        tally=tally)
                     for name, stub in attachments.items()}
        follows = {name: {"follows": True, "content_type": stub["content_type"],
                          "length": stub["length"], "digest": stub["digest"],
                          "revpos": stub["revpos"]}
                   for name, stub in attachments.items()}
        await self._store.put_staged({**doc, "_attachments": follows}, addresses,
                                     digests=tally.digests)
        logger.info("wrote revision %s of %s with its attachments from peer %s (%d bytes "
                    "fetched)", doc["_rev"], doc["_id"], self.peer, tally.fetched_bytes)
        if self._on_event is not None:
            self._on_event(RevisionFetched(share=share, peer=self.peer, doc_id=doc["_id"],
                                           rev=doc["_rev"], fetched_bytes=tally.fetched_bytes,
                                           held_chunks=tally.held_chunks))

    async def fetch_attachment(self, share: str, doc: Doc, name: str, stub: Mapping[str, Any],
                               claimed: list[bytes], progress: ChunkProgress) -> list[bytes]:
        """Fetch the chunks of one attachment this store lacks, as the kept revisions' are
        (checked, staged; those it holds claimed), apart from them: a read that needs the
        data now (`node/on_read.py`). `progress(hashes, staged)` is called with the
        manifest's chunk addresses and each set of chunks staged, first those held. The
        caller writes the data and releases `claimed`."""
        return await self._fetch_attachment(share, doc, name, stub, claimed, progress)

    async def _fetch_attachment(self, share: str, doc: Doc, name: str, stub: Mapping[str, Any],
                                claimed: list[bytes], progress: ChunkProgress | None = None,
                                *, tally: _Tally | None = None) -> list[bytes]:
        if not isinstance(stub, Mapping) or type(stub.get("length")) is not int:
            raise transfer.TransferError(f"attachment {name!r} of {doc['_id']!r} has no stub")
        async with self._requests:
            return await self._request_attachment(share, doc, name, stub, claimed, progress,
                                                  tally or _Tally())

    async def _request_attachment(self, share: str, doc: Doc, name: str,
                                  stub: Mapping[str, Any], claimed: list[bytes],
                                  progress: ChunkProgress | None, tally: _Tally) -> list[bytes]:
        req = next(self._reqs)
        fetch = transfer.ChunkFetch(req, share, doc["_id"], doc["_rev"], name,
                                    length=stub["length"], digest=stub.get("digest"))
        send, replies = trio.open_memory_channel[Mapping[Any, Any]](transfer.WINDOW + 2)
        self._replies[req] = send
        try:
            await self._connection.send(fetch.want_message())
            hashes = fetch.manifest(await self._reply(replies, transfer.MANIFEST))
            held = await self._store.claim_chunks(hashes)
            claimed.extend(held)
            fetch.held(held)
            tally.held_chunks += len(held)
            if progress is not None:
                progress(hashes, held)
            logger.info("fetching attachment %r of %s from peer %s: %d chunks to fetch, %d "
                        "held here already", name, doc["_id"], self.peer, fetch.missing, len(held))
            while not fetch.complete:
                for ask in fetch.asks():
                    await self._connection.send(ask)
                # The chunk awaited, and those arrived meanwhile: checked, the next asked
                # for, then staged in one write (a durable write per chunk is what costs).
                messages = [await self._reply(replies, transfer.CHUNK)]
                while True:
                    try:
                        messages.append(self._checked(replies.receive_nowait(), transfer.CHUNK))
                    except trio.WouldBlock:
                        break
                taken = [fetch.take(message) for message in messages]
                # Checked (SHA-256) and hashed (the file's md5) in two threads beside the
                # trio thread, which goes on reading the link meanwhile; hashlib lets go of
                # the GIL, so the two overlap on a second core.
                refused: list[transfer.TransferError] = []  # raised as is, not in a group
                async with trio.open_nursery() as hashing:
                    hashing.start_soon(trio.to_thread.run_sync, fetch.hash_in_order, taken)
                    try:
                        await trio.to_thread.run_sync(fetch.check_addresses, taken)
                    except transfer.TransferError as error:
                        refused.append(error)
                if refused:
                    raise refused[0]
                batch = [data for _, data in taken]
                for ask in fetch.asks():
                    await self._connection.send(ask)
                if self._check_chunks is not None:
                    await self._check_chunks(share, doc, name, stub["revpos"],
                                             [(m["index"], data) for m, data in zip(messages, batch)],
                                             len(hashes))
                staged = await self._store.stage_chunks(
                    batch, checked=[fetch.hashes[index] for index, _ in taken])
                claimed.extend(staged)
                if progress is not None:
                    progress(hashes, staged)
                before = self.fetched_bytes
                self.fetched_bytes += sum(len(data) for data in batch)
                tally.fetched_bytes += sum(len(data) for data in batch)
                if before // PROGRESS_BYTES != self.fetched_bytes // PROGRESS_BYTES:
                    logger.info("attachment %r of %s: %d chunks fetched, %d to go", name,
                                doc["_id"], fetch.fetched, fetch.missing)
            logger.info("fetched attachment %r of %s from peer %s: %d chunks (%d bytes) "
                        "fetched, %d held here already", name, doc["_id"], self.peer,
                        fetch.fetched, fetch.fetched_bytes, len(set(hashes)) - fetch.fetched)
            if (digest := fetch.data_digest()) is not None:
                tally.digests[name] = digest
            return hashes
        finally:
            del self._replies[req]
            # Closes the request at the source, also after a failure (best effort: a closed
            # connection has closed it anyway).
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                try:
                    await self._connection.send(fetch.done_message())
                except PeerConnectionClosed:
                    pass

    @staticmethod
    def _checked(message: Mapping[Any, Any], expected: str) -> Mapping[Any, Any]:
        if message.get("type") == transfer.FAIL:
            raise TransferRefused(transfer.reason_of(message.get("reason")),
                                  retry=message.get("retry") is True)
        if message.get("type") != expected:
            raise transfer.TransferError(f"expected {expected}, got {message.get('type')!r}")
        return message

    async def _reply(self, replies: trio.MemoryReceiveChannel, expected: str) -> Mapping[Any, Any]:
        with trio.move_on_after(REPLY_TIMEOUT):
            return self._checked(await replies.receive(), expected)
        raise TransferRefused(f"no {expected} from the peer in {REPLY_TIMEOUT:.0f} s", retry=True)
