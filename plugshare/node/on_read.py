"""Attachment data fetched on first read, for the shares a member keeps so.

`FetchModes` is the member's setting per share (`plugshare share fetch NAME on-read|eager`),
kept in its store (`_local/plugshare-share-fetch`, by share id), eager by default, and the
documents it pins (`plugshare file pin ID`): fetched eagerly whatever their share's mode.
While a share is on-read, the revisions of its unpinned documents replicate with their stubs
alone (the replicator writes them with `Store.put_replicated_absent`, tagged with the share's
id).

`OnRead` opens an attachment's data for a reader (`/data`, `/couch`, `plugshare file get`,
sealed or clear): data the store holds comes from the store; data a revision came without
(`DataAbsent`) is fetched from a connected member of the share it came through, once however
many read it at once. The fetch is the attachment transfer the eager path uses (each chunk
checked against the source's manifest, a sealed share's opened by the token where it stands,
staged durably as it arrives); every reader streams each chunk as soon as it is staged, and
once all are there the store takes the data in (`fill_absent`: md5 and length checked), so
the next read is local. The last chunk of the file goes out only after that check, so a
reader never gets a whole file that does not match its digest. With no member of the share
connected, or none that serves the data, a read fails after a bounded wait with a 503 naming
the share. Data still absent in a share that is eager (switched back), or of a document
pinned since, is fetched in the background.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from typing import Any

import attrs
import trio

from plugshare.errors import PlugshareError
from plugshare.replication.transport import PeerConnectionClosed
from plugshare.store import DataAbsent, NotFound, Store, StoreError
from plugshare.store.attachments import CHUNK_SIZE, AttachmentMeta, check_range
from plugshare.store.revtree import check_doc_id

log = logging.getLogger("plugshare.on_read")

EAGER, ON_READ = "eager", "on-read"
MODES = (EAGER, ON_READ)
MODES_LOCAL_ID = "plugshare-share-fetch"
PEER_WAIT = 5.0  # seconds a read waits for a member of the share to be connected
MANIFEST_WAIT = 30.0  # seconds a read waits for the serving member's first answer
SWEEP_RETRY = 30.0  # seconds before data an eager share still lacks is tried again
SWEEP_PAGE = 1000  # documents with absent data looked at per round
# Attachments fetched at once: a source serves 4 requests per peer (the eager fetcher
# holds one); more reads of other files wait their turn.
MAX_FETCHES = 3
MAX_PINS = 10_000  # documents a node may pin (they are all kept in one local doc)


class DataUnavailable(PlugshareError):
    """The data is not on this node and no member of its share can give it now (503)."""

    status, error = 503, "unavailable"

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class BadFetchMode(PlugshareError):
    status, error = 400, "bad_request"

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def check_mode(mode: object) -> str:
    if mode not in MODES:
        raise BadFetchMode(f"fetch must be 'eager' or 'on-read', not {mode!r}")
    return mode  # type: ignore[return-value]


class FetchModes:
    """Each share's fetch mode on this node, and the documents pinned for eager download (a
    member's own choice: nothing is decided by it, so it lives with the data it is about, in
    the store). `on_change()` is told when more may now be fetched eagerly."""

    def __init__(self, store: Store, on_change: Callable[[], None] | None = None):
        self._store = store
        self._modes: dict[str, str] = {}
        self._pins: set[str] = set()
        self._on_change = on_change

    async def load(self) -> None:
        try:
            stored = await self._store.get_local(MODES_LOCAL_ID)
        except NotFound:
            stored = {}
        modes = stored.get("modes") if isinstance(stored.get("modes"), dict) else {}
        self._modes = {share: mode for share, mode in modes.items() if mode in MODES}
        pins = stored.get("pins") if isinstance(stored.get("pins"), list) else []
        self._pins = {doc_id for doc_id in pins if isinstance(doc_id, str)}

    def mode(self, share_id: str) -> str:
        return self._modes.get(share_id, EAGER)

    def on_read(self, share_id: str, doc_id: str | None = None) -> bool:
        """Whether data of `share_id` (of document `doc_id`) waits for its first read."""
        return self.mode(share_id) == ON_READ and doc_id not in self._pins

    def pins(self) -> list[str]:
        return sorted(self._pins)

    async def pin(self, doc_id: object, pinned: bool) -> bool:
        """Pin a document for eager download (or unpin it: its data stays, its next
        revisions follow their share's mode); `doc_id` need not be here yet."""
        try:
            doc_id = check_doc_id(doc_id)
        except StoreError as error:
            raise BadFetchMode(error.reason) from None
        if doc_id.startswith("_"):
            raise BadFetchMode(f"{doc_id!r} is not a document that replicates")
        pins = self._pins | {doc_id} if pinned else self._pins - {doc_id}
        if len(pins) > MAX_PINS:
            raise BadFetchMode(f"this node pins {MAX_PINS} documents at most")
        if pins != self._pins:
            await self._save(self._modes, pins)
        if pinned and self._on_change is not None:
            self._on_change()
        return pinned

    async def _save(self, modes: dict[str, str], pins: set[str]) -> None:
        await self._store.put_local(MODES_LOCAL_ID, {"modes": modes, "pins": sorted(pins)})
        self._modes, self._pins = modes, pins

    async def set(self, share_id: str, mode: object) -> str:
        mode = check_mode(mode)
        if mode == ON_READ and not self._store.keeps_absent_data:
            raise BadFetchMode(
                f"fetching on read needs the embedded store (sqlite); this node's store is "
                f"{self._store.backend}, where a document is kept only with its attachment data")
        modes = {**self._modes, share_id: mode}
        if mode == EAGER:
            del modes[share_id]  # the default is not kept
        await self._save(modes, self._pins)
        if mode == EAGER and self._on_change is not None:
            self._on_change()
        return mode


@attrs.define(eq=False)
class _Fetch:
    """One attachment being fetched, shared by every reader of it."""

    doc_id: str
    rev: str
    name: str
    share: str
    hashes: list[bytes] | None = None  # the manifest's, once it came
    staged: set[bytes] = attrs.Factory(set)
    filled: bool = False  # the store holds the data now
    error: PlugshareError | None = None
    answered: trio.Event = attrs.Factory(trio.Event)  # manifest in, or failed
    finished: trio.Event = attrs.Factory(trio.Event)
    changed: trio.Event = attrs.Factory(trio.Event)

    def progress(self, hashes: list[bytes], staged: Collection[bytes]) -> None:
        self.hashes = hashes
        self.staged.update(staged)
        self.answered.set()
        self.notify()

    def notify(self) -> None:
        changed, self.changed = self.changed, trio.Event()
        changed.set()


class OnRead:
    """Reads attachment data, fetching what a share fetched on read lacks (see above).
    `sessions()` is the live links by peer fingerprint (each with its `replication`),
    `common(fingerprint)` the shares in common with that peer, `share_name(id)` a share's
    name for messages."""

    def __init__(self, store: Store, modes: FetchModes, *,
                 sessions: Callable[[], Mapping[bytes, Any]],
                 common: Callable[[bytes], list[Any]],
                 share_name: Callable[[str], str]):
        self._store = store
        self.modes = modes
        self._sessions = sessions
        self._common = common
        self._share_name = share_name
        self._fetches: dict[tuple[str, str, str], _Fetch] = {}
        self._nursery: trio.Nursery | None = None
        self._sweep_wake = trio.Event()
        self._slots = trio.Semaphore(MAX_FETCHES)

    def wake_sweep(self) -> None:
        self._sweep_wake.set()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Hold the fetches (they outlive the read that started them) and fetch what eager
        shares lack, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await self._sweep()
            finally:
                self._nursery = None

    # -- reading ------------------------------------------------------------------------

    async def open_attachment(self, doc_id: str, name: str, *, rev: str | None = None,
                              range: tuple[int, int] | None = None
                              ) -> tuple[AttachmentMeta, AsyncIterator[bytes]]:
        """As `Store.open_attachment`; data not here is fetched as it is read."""
        try:
            return await self._store.open_attachment(doc_id, name, rev=rev, range=range)
        except DataAbsent as absent:
            meta, share = absent.meta, absent.source or ""
        if rev is None:
            rev = (await self._store.get(doc_id))["_rev"]
        start, stop = check_range(range, meta.length)
        fetch = self._fetch(doc_id, rev, name, share)
        # A clear error before the response starts when no member can serve it.
        with trio.move_on_after(PEER_WAIT + MANIFEST_WAIT):
            await fetch.answered.wait()
        if fetch.error is not None:
            raise fetch.error
        if not fetch.answered.is_set():
            raise DataUnavailable(
                f"the data of attachment {name!r} of {doc_id!r} is not on this node, and "
                f"no member of share {self._share_name(share)!r} answered for it in "
                f"{PEER_WAIT + MANIFEST_WAIT:.0f} s (it is still being fetched)")
        return meta, self._stream(fetch, start, stop)

    async def _stream(self, fetch: _Fetch, start: int, stop: int) -> AsyncIterator[bytes]:
        index, last = start // CHUNK_SIZE, (stop - 1) // CHUNK_SIZE
        while stop > start and index <= last:
            if fetch.filled:  # the rest from the store, where it is now
                _, rest = await self._store.open_attachment(
                    fetch.doc_id, fetch.name, rev=fetch.rev,
                    range=(max(start, index * CHUNK_SIZE), stop))
                async for piece in rest:
                    yield piece
                return
            hashes = fetch.hashes
            # The file's last chunk waits for the store's check of the whole.
            ready = (hashes is not None and hashes[index] in fetch.staged
                     and index != len(hashes) - 1)
            if ready:
                try:
                    data = await self._store.read_staged_chunk(hashes[index])
                except NotFound:
                    if fetch.filled:
                        continue
                    raise DataUnavailable(f"chunk {index} of {fetch.name!r} of "
                                          f"{fetch.doc_id!r} went away while read") from None
                offset = index * CHUNK_SIZE
                yield data[max(start - offset, 0) : stop - offset]
                index += 1
                continue
            if fetch.error is not None:
                raise fetch.error
            await fetch.changed.wait()

    def _fetch(self, doc_id: str, rev: str, name: str, share: str) -> _Fetch:
        key = (doc_id, rev, name)
        fetch = self._fetches.get(key)
        if fetch is None:
            if self._nursery is None:
                raise DataUnavailable("this node is not serving its peers yet")
            fetch = _Fetch(doc_id, rev, name, share)
            self._fetches[key] = fetch
            self._nursery.start_soon(self._run_fetch, fetch)
        return fetch

    # -- fetching ------------------------------------------------------------------------

    def _members_connected(self, share: str) -> list[Any]:
        return [session for fingerprint, session in list(self._sessions().items())
                if getattr(session, "replication", None) is not None
                and any(m.share_id == share for m in self._common(fingerprint))]

    async def _run_fetch(self, fetch: _Fetch) -> None:
        claimed: list[bytes] = []
        try:
            if fetch.name not in await self._store.absent_attachments(fetch.doc_id, fetch.rev):
                fetch.filled = True  # a fetch that just ended brought it
                return
            async with self._slots:
                await self._fetch_from_members(fetch, claimed)

            async def staged() -> AsyncIterator[bytes]:
                assert fetch.hashes is not None
                for digest in fetch.hashes:
                    yield await self._store.read_staged_chunk(digest)

            await self._store.fill_absent(fetch.doc_id, fetch.rev, fetch.name, staged())
            fetch.filled = True
            log.info("fetched the data of attachment %r of %s, which it came without "
                     "(share %s)", fetch.name, fetch.doc_id, self._share_name(fetch.share))
        except (PlugshareError, PeerConnectionClosed) as error:
            if not isinstance(error, PlugshareError) or isinstance(error, StoreError):
                error = DataUnavailable(f"fetching attachment {fetch.name!r} of "
                                        f"{fetch.doc_id!r} failed: {error}")
            fetch.error = error
            log.warning("could not fetch attachment %r of %s on read: %s", fetch.name,
                        fetch.doc_id, error)
        finally:
            del self._fetches[(fetch.doc_id, fetch.rev, fetch.name)]
            fetch.answered.set()
            fetch.finished.set()
            fetch.notify()
            if claimed:  # a fetch that failed keeps them staged: the next read resumes
                with trio.CancelScope(shield=True):
                    try:
                        await self._store.release_chunks(claimed, keep_staged=not fetch.filled)
                    except StoreError as error:
                        log.warning("could not release staged chunks: %s", error)

    async def _fetch_from_members(self, fetch: _Fetch, claimed: list[bytes]) -> None:
        """Ask each connected member of the share in turn until one gives the data; wait
        `PEER_WAIT` for one to be connected."""
        [doc] = await self._store.bulk_get([(fetch.doc_id, fetch.rev)])
        stub = (doc.get("_attachments") or {}).get(fetch.name)
        if not isinstance(stub, dict):
            raise NotFound(f"revision {fetch.rev} of {fetch.doc_id!r} has no attachment "
                           f"{fetch.name!r}")
        tried: dict[int, str] = {}  # by session: why it did not serve
        deadline = trio.current_time() + PEER_WAIT
        while True:
            for session in self._members_connected(fetch.share):
                if id(session) in tried:
                    continue
                served = False
                try:
                    async with trio.open_nursery() as nursery:
                        # The link closing ends the wait at once (the fetcher's own bound
                        # is two minutes without a reply).
                        nursery.start_soon(_cancel_when_closed, session, nursery.cancel_scope)
                        await session.replication.attachment_fetcher.fetch_attachment(
                            fetch.share, doc, fetch.name, stub, claimed, fetch.progress)
                        served = True
                        nursery.cancel_scope.cancel()
                except (PlugshareError, PeerConnectionClosed) as error:
                    tried[id(session)] = f"{session.name}: {error}"
                    continue
                if served:
                    return
                tried[id(session)] = f"{session.name}: the link closed"
            if trio.current_time() >= deadline:
                share = self._share_name(fetch.share)
                why = ("; ".join(tried.values()) if tried
                       else f"no member of share {share!r} is connected")
                raise DataUnavailable(
                    f"the data of attachment {fetch.name!r} of {fetch.doc_id!r} is not on "
                    f"this node and share {share!r} could not give it: {why}")
            await trio.sleep(0.2)

    # -- shares switched back to eager, documents pinned ---------------------------------

    async def _sweep(self) -> None:
        while True:
            self._sweep_wake = trio.Event()
            left = False
            try:
                found = await self._store.absent_documents(SWEEP_PAGE)
                left = len(found) >= SWEEP_PAGE
                for doc_id, rev in found:
                    for name, share in (await self._store.absent_attachments(doc_id, rev)).items():
                        if self.modes.on_read(share, doc_id):
                            continue
                        if not self._members_connected(share):
                            left = True
                            continue
                        fetch = self._fetch(doc_id, rev, name, share)
                        await fetch.finished.wait()
                        left = left or fetch.error is not None
            except (StoreError, PlugshareError) as error:
                log.info("fetching the data eager shares lack: %s", error)
                left = True
            with trio.move_on_after(SWEEP_RETRY if left else math.inf):
                await self._sweep_wake.wait()


async def _cancel_when_closed(session: Any, scope: trio.CancelScope) -> None:
    await session.wait_closed()
    scope.cancel()


async def mark_absent(store: Store, doc: dict) -> dict:
    """`doc` with `"local": false` on the stubs of attachments whose data is not on this
    node yet (fetched when first read); the others are left as they are (local)."""
    stubs = doc.get("_attachments")
    if not isinstance(stubs, dict) or not stubs or "_rev" not in doc:
        return doc
    absent = await store.absent_attachments(doc["_id"], doc["_rev"])
    if not absent:
        return doc
    return {**doc, "_attachments": {name: {**stub, "local": False} if name in absent else stub
                                    for name, stub in stubs.items()}}
