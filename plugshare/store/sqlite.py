"""The embedded store: CouchDB document semantics on one SQLite file.

Layout: one `docs` row per document holds its revision tree, the bodies of its leaves and a
denormalised list of leaf revs (winner first) so the changes feed and plain reads never decode
the tree. The row's `seq` (its rowid) is the document's latest change, so the changes feed is
a range scan. Non-leaf bodies are not kept (like CouchDB after compaction). Local documents
live in `local_docs`, outside the feed.

Attachments: a leaf body's `_attachments` entries hold their metadata and the id of their
*content*, whose data lives in content-addressed chunks outside the JSON rows
(`plugshare/store/chunks.py`: deduplication and garbage collection). An upload streams into
a new content in transactions of `UPLOAD_BATCH` chunks, then one write transaction makes the
revision that references it: a cut upload leaves the document as it was, and its chunks are
collected at once (or by `compact` when the process died first).

Concurrency: one connection, used by one worker thread at a time (a capacity limiter of 1),
so every SQLite call runs off the trio thread and writes are serialised. Group commit: writes
that arrive while a commit is in flight queue up and share the next transaction (one fsync),
each in a savepoint of its own so that one write's error undoes that write alone; every
caller is answered once that transaction is durable. The file is opened in
WAL mode with `synchronous=FULL` (a write is on disk when the call returns) and an exclusive
lock, so a second store (in this process or another) cannot open it while this one is open.
The file (and so its -wal and -shm, which SQLite gives the same mode) is private: 0600.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
import msgpack
import trio

from plugshare.store import chunks, revtree
from plugshare.store.packs import ChunkPacks
from plugshare.store.staging import StagingHolds, check_addresses
from plugshare.store.attachments import (
    CHUNK_SIZE,
    AttachmentMeta,
    Follows,
    StreamCheck,
    Stub,
    check_attachment_name,
    check_content_type,
    check_range,
    rechunk,
)
from plugshare.store.base import (
    LOCAL_PREFIX,
    MAX_LEAVES,
    OWNER_LOCAL_ID,
    BadRequest,
    Change,
    ChangesPage,
    Conflict,
    DataAbsent,
    Doc,
    Forbidden,
    NotFound,
    Seq,
    Store,
    StoreError,
    owner_mismatch,
)
from plugshare.store.revtree import ParsedDoc, RevTree

T = TypeVar("T")

APPLICATION_ID = 0x706C7368  # "plsh": marks the file as a plugshare store
SCHEMA_VERSION = 3  # 2: attachment chunk tables; 3: chunks kept in packs (older files get them when opened)
UPLOAD_BATCH = 16  # chunks written per transaction while an attachment streams in (4 MiB)
READ_BATCH = 32  # staged chunks read per hop to the worker for a revision's digest (8 MiB)
LINK_BATCH = 256  # staged chunks linked to a content per transaction (64 MiB of data)
_SQL_CHUNK = 500  # ids per `IN (...)` query, well under SQLite's variable limit
# A read of at most this many documents (up to 8 MiB each: ~20 ms to decode), or of this
# many change rows (ids and leaf revs, no bodies), runs on the event loop's own thread when
# the worker is idle; see `_read`. A live change reads one doc at each step.
SMALL_READ_DOCS = 4
SMALL_READ_CHANGES = 256

_SCHEMA = """
CREATE TABLE docs (
    seq     INTEGER PRIMARY KEY,  -- the document's latest change
    id      TEXT NOT NULL UNIQUE,
    deleted INTEGER NOT NULL,     -- the winning revision is a tombstone
    leaves  TEXT NOT NULL,        -- every leaf rev, the winner first, space-separated
    tree    BLOB NOT NULL,        -- msgpack of RevTree.to_obj()
    bodies  BLOB NOT NULL         -- msgpack {leaf rev: JSON text, or nil for a tombstone}
);
CREATE TABLE local_docs (
    id      TEXT PRIMARY KEY,     -- without the "_local/" prefix
    version INTEGER NOT NULL,     -- shown as the rev "0-<version>"
    body    TEXT NOT NULL
);
"""


@attrs.frozen
class _Staged:
    """Attachment data streamed into a content, waiting for the revision that uses it."""

    content: int
    content_type: str
    length: int
    digest: str
    revpos: int | None  # replicated: the revpos sent; None: the new revision's generation


@attrs.frozen
class _Absent:
    """A replicated attachment written without its data (`put_replicated_absent`)."""

    content_type: str
    length: int
    digest: str
    revpos: int
    source: str


class _Job:
    """One call waiting for (or inside) a group commit or a group of calls: `fn(conn,
    *args)` and its outcome."""

    __slots__ = ("fn", "args", "result", "error", "done")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]):
        self.fn = fn
        self.args = args
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = trio.Event()  # set once its group committed (or failed)

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


class _Batcher:
    """Calls that share trips to the store's one worker thread: the first caller to find
    no trip in flight takes every call queued so far to the worker, in one
    `run_group(jobs)`; those queued behind it find theirs done when they get the lock.

    A trip is shielded: it holds other tasks' calls, which it must run. A cancelled
    caller whose call has not left the queue takes it back; one already in a trip waits
    for it (its effect happens either way) and then takes the cancellation."""

    def __init__(self, run_group: Callable[[list[_Job]], None], limiter: trio.CapacityLimiter):
        self._run_group = run_group
        self._limiter = limiter
        self._queue: list[_Job] = []
        self._lock = trio.Lock()  # held by the task taking a group to the worker

    async def run(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        job = _Job(fn, args)
        self._queue.append(job)
        try:
            async with self._lock:
                if not job.done.is_set():
                    group, self._queue = self._queue, []
                    try:
                        with trio.CancelScope(shield=True):
                            await trio.to_thread.run_sync(self._run_group, group,
                                                          limiter=self._limiter)
                    finally:
                        for queued in group:
                            queued.done.set()
        except trio.Cancelled:
            if job in self._queue:  # never started: it has no effect
                self._queue.remove(job)
                raise
            with trio.CancelScope(shield=True):  # in another task's trip: it completes
                await job.done.wait()
            raise
        return job.outcome()


class _Record:
    """A document as stored: its revision tree and the bodies of its leaves."""

    __slots__ = ("tree", "bodies")

    def __init__(self, tree: RevTree, bodies: dict[str, str | None]):
        self.tree = tree
        self.bodies = bodies  # leaf rev -> stored body (see _stored_body)


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _dump_body(body: dict[str, Any]) -> str:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


_TOMBSTONE = "~"  # prefix of a tombstone's stored body (a live body is a JSON object: "{")


def _stored_body(body: dict[str, Any], deleted: bool) -> str:
    """A leaf's body as stored. Tombstones keep their body too, as CouchDB's do: a deletion
    can carry fields (e.g. its doctype, so shares of that doctype replicate it)."""
    return (_TOMBSTONE if deleted else "") + _dump_body(body)


def _is_tombstone(stored: str | None) -> bool:
    return stored is None or stored.startswith(_TOMBSTONE)


def _document(doc_id: str, rev: str, stored: str | None) -> Doc:
    if stored is None:
        return {"_id": doc_id, "_rev": rev, "_deleted": True}
    deleted = stored.startswith(_TOMBSTONE)
    try:
        body = json.loads(stored[1:] if deleted else stored)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"the stored body of {doc_id!r} {rev} is corrupt: {exc}") from exc
    attachments = body.get("_attachments")
    if attachments is not None:
        body["_attachments"] = {
            name: {key: value for key, value in entry.items() if key not in _STORE_KEYS}
            | {"stub": True}
            for name, entry in attachments.items()
        }
    if deleted:
        return {"_id": doc_id, "_rev": rev, "_deleted": True, **body}
    return {"_id": doc_id, "_rev": rev, **body}


_STORE_KEYS = ("content", "absent")  # stored in an entry, never shown in a stub


def _has_attachments(stored: str | None) -> bool:
    """Whether a stored body may have attachments (a quick test, no parsing: a user field
    cannot be named `_attachments`, but a value may hold the text)."""
    return stored is not None and '"_attachments"' in stored


def _stored_attachments(stored: str | None) -> dict[str, dict[str, Any]]:
    """The `_attachments` of a stored leaf body, as stored (with their content ids)."""
    if not _has_attachments(stored):
        return {}
    body = json.loads(stored[1:] if stored.startswith(_TOMBSTONE) else stored)
    return body.get("_attachments") or {}


def _rev_body(body: dict[str, Any], attachments: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What a revision id is computed over: the body, and the digest of each attachment."""
    if not attachments:
        return body
    return {**body, "_attachments": {name: a["digest"] for name, a in attachments.items()}}


def _parse_seq(since: object) -> int:
    if type(since) is int and since >= 0:
        return since
    if isinstance(since, str) and since.isascii() and since.isdigit():
        return int(since)
    raise BadRequest(f"invalid sequence {since!r}: expected one handed out by this store")


class SQLiteStore(Store):
    """A `Store` in one SQLite file. Open with `await SQLiteStore.open(path)`."""

    backend = "sqlite"
    keeps_absent_data = True

    def __init__(self, conn: sqlite3.Connection, path: Path, revs_limit: int, update_seq: int,
                 packs: ChunkPacks):
        """Use `open()`; this takes an already opened and checked connection."""
        self.path = path
        self._packs = packs  # staged chunk data (packs.py)
        self.revs_limit = revs_limit
        self._conn: sqlite3.Connection | None = conn
        self._limiter = trio.CapacityLimiter(1)
        self._seq = update_seq  # last committed seq; advanced by the worker after COMMIT
        self._txn_seq = update_seq  # the last seq used inside the open transaction
        self._writes = _Batcher(self._commit_group, self._limiter)  # one group commit a trip
        self._calls = _Batcher(self._call_group, self._limiter)  # reads..., each on its own
        self.commits = 0  # write transactions committed (group commit shares them)
        self._notified_seq = update_seq
        self._changed = trio.Event()  # set (and replaced) when the feed grows
        self._in_use: Counter[int] = Counter()  # contents being written or read: kept by GC
        self._holds = StagingHolds()

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        revs_limit: int = revtree.DEFAULT_REVS_LIMIT,
        owner: str | None = None,
    ) -> SQLiteStore:
        """Open the store at `path`, creating the file (mode 0600) if it does not exist.

        A file that is not a plugshare store, is corrupt, is unreadable or is held open by
        another store is a `StoreError` saying which. With `owner` (a node id) the file is
        recorded as that node's the first time it is opened with one (local doc
        `plugshare-owner`), and a file recorded as another node's is refused with
        `OwnerMismatch`, changing nothing."""
        if type(revs_limit) is not int or revs_limit < 1:
            raise BadRequest(f"revs_limit must be an integer >= 1, not {revs_limit!r}")
        if owner is not None and (not isinstance(owner, str) or not owner):
            raise BadRequest(f"owner must be a node id, not {owner!r}")
        path = Path(path)
        conn, update_seq, packs = await trio.to_thread.run_sync(_open_connection, path, owner)
        return cls(conn, path, revs_limit, update_seq, packs)

    async def aclose(self) -> None:
        if self._conn is None:
            return
        await trio.to_thread.run_sync(self._close, limiter=self._limiter)
        self._wake_waiters()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            self._packs.close()

    # -- running SQLite off the trio thread ----------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(conn, *args)` on the worker, in one trip with the calls queued meanwhile
        (each on its own, in order); then wake `wait_for_change` if it wrote.

        The one connection runs one thing at a time: under concurrent requests each call
        used to wait its turn for a trip of its own to the worker thread (the PUTs of 8
        clients spent 13 of their 25 ms in their two reads)."""
        try:
            return await self._calls.run(fn, args)
        finally:
            self._notify()

    def _call_group(self, jobs: list[_Job]) -> None:
        for job in jobs:
            try:
                job.result = self._call(job.fn, job.args)
            except Exception as exc:  # raised in its own task
                job.error = exc

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        conn = self._conn
        if conn is None:
            raise StoreError(f"the store {self.path} is closed")
        try:
            return fn(conn, *args)
        except sqlite3.Error as exc:
            raise self._store_error(exc) from exc

    def _store_error(self, exc: sqlite3.Error) -> StoreError:
        if "malformed" in str(exc):
            return StoreError(
                f"the store file {self.path} is corrupt ({exc}): restore it from a backup, "
                "or move it away and sync again from peers"
            )
        return StoreError(f"SQLite store {self.path} failed: {exc}")

    async def _read(self, fn: Callable[..., T], *args: Any, small: bool) -> T:
        """Run the read `fn(conn, *args)`: a `small` one here, on the event loop's thread,
        when no trip to the worker is in flight; otherwise as `_run` does.

        A trip to the worker thread costs about 100 us on an idle machine and several times
        that on a busy one (two thread wake-ups), where the read itself costs some 40 us: a
        live change's path held seven such trips. The connection is safe to use here: every
        other use of it goes through the limiter, which only this thread can take, and
        between trips no transaction is open (each write group commits within its trip)."""
        if not small:
            return await self._run(fn, *args)
        await trio.lowlevel.checkpoint()  # a checkpoint like any store call
        if self._limiter.borrowed_tokens == 0:
            return self._call(fn, args)
        return await self._run(fn, *args)

    async def _transact(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(conn, *args)` in a write transaction, shared with the writes queued
        meanwhile (group commit); return (or raise) its own outcome once committed."""
        try:
            return await self._writes.run(fn, args)
        finally:
            self._notify()

    def _notify(self) -> None:
        if self._seq > self._notified_seq:
            self._notified_seq = self._seq
            self._wake_waiters()

    def _commit_group(self, jobs: list[_Job]) -> None:
        """In the worker thread: every job in one transaction, each in a savepoint (an
        error undoes that job alone), then one COMMIT. A failed COMMIT fails them all."""
        conn = self._conn
        if conn is None:
            for job in jobs:
                job.error = StoreError(f"the store {self.path} is closed")
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in jobs:
                seq_before = self._txn_seq
                conn.execute("SAVEPOINT job")
                try:
                    job.result = job.fn(conn, *job.args)
                except Exception as exc:
                    conn.execute("ROLLBACK TO job")
                    self._txn_seq = seq_before
                    job.error = self._store_error(exc) if isinstance(exc, sqlite3.Error) else exc
                conn.execute("RELEASE job")
            try:
                self._packs.sync()  # chunk data the rows name is durable before they are
            except StoreError as exc:
                conn.execute("ROLLBACK")
                self._txn_seq = self._seq
                for job in jobs:
                    job.error, job.result = exc, None
                return
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._txn_seq = self._seq
            for job in jobs:  # an error each: they are raised in different tasks
                job.error, job.result = self._store_error(exc), None
            return
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._txn_seq = self._seq
            for job in jobs:  # none of them was written
                job.error = StoreError(f"a write to {self.path} was interrupted")
                job.result = None
            raise
        self.commits += 1
        self._seq = self._txn_seq
        self._packs.reclaim(conn)

    def _wake_waiters(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- reading records -------------------------------------------------------------------

    def _decode(self, doc_id: str, tree: bytes, bodies: bytes) -> _Record:
        try:
            rev_tree = RevTree.from_obj(msgpack.unpackb(tree))
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise StoreError(f"the record of {doc_id!r} in {self.path} is corrupt: {exc}") from exc
        return _Record(rev_tree, self._bodies(doc_id, bodies))

    def _load_records(self, conn: sqlite3.Connection, ids: Iterable[str]) -> dict[str, _Record]:
        records = {}
        wanted = list(dict.fromkeys(ids))
        for start in range(0, len(wanted), _SQL_CHUNK):
            chunk = wanted[start : start + _SQL_CHUNK]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT id, tree, bodies FROM docs WHERE id IN ({marks})"
            for doc_id, tree, bodies in conn.execute(query, chunk):
                records[doc_id] = self._decode(doc_id, tree, bodies)
        return records

    def _bodies(self, doc_id: str, raw: bytes) -> dict[str, str | None]:
        try:
            bodies = msgpack.unpackb(raw)
        except (ValueError, msgpack.UnpackException) as exc:
            raise StoreError(f"the record of {doc_id!r} in {self.path} is corrupt: {exc}") from exc
        if not isinstance(bodies, dict):
            raise StoreError(f"the record of {doc_id!r} in {self.path} is corrupt")
        return bodies

    # -- writing documents -----------------------------------------------------------------

    def _apply(
        self, conn: sqlite3.Connection, docs: list[ParsedDoc | StoreError], new_edits: bool
    ) -> tuple[list[str | StoreError], int]:
        """Write the parsed docs in the current transaction: the new rev or the error of each,
        and the last seq used.

        Every revision of a doc is linked into its tree first; the tree is stemmed once per
        call afterwards (stemming walks the whole tree: once per revision made a batch of many
        revisions of one doc quadratic)."""
        records = self._load_records(
            conn, (doc.id for doc in docs if isinstance(doc, ParsedDoc) and not doc.is_local)
        )
        before: dict[str, RevTree] = {}  # replicated docs: their tree as this call found it
        changed: dict[str, None] = {}  # ids to save, in order
        results: list[str | StoreError] = []
        for doc in docs:
            if isinstance(doc, StoreError):
                results.append(doc)
                continue
            try:
                if doc.is_local:
                    rev = self._write_local_doc(conn, doc)
                else:
                    record = records.get(doc.id)
                    if record is None:
                        record = records[doc.id] = _Record(RevTree(), {})
                    if new_edits:
                        rev = self._edit(record, doc)
                        changed[doc.id] = None
                    else:
                        if doc.id not in before:
                            before[doc.id] = record.tree.copy()
                        rev, modified = self._merge(record, doc)
                        if modified:
                            changed[doc.id] = None
                results.append(rev)
            except StoreError as exc:
                results.append(exc)
        to_save = []
        for doc_id in changed:
            record = records[doc_id]
            record.tree.stem(self.revs_limit)
            if doc_id in before and record.tree == before[doc_id]:
                continue  # what the paths added was stemmed away again
            to_save.append((doc_id, record))
        last_seq = self._save(conn, to_save)
        return results, last_seq

    def _edit(self, record: _Record, doc: ParsedDoc) -> str:
        """A new revision made here, on top of `doc.rev` (which must be a leaf)."""
        tree = record.tree
        if not tree:
            if doc.rev is not None:
                raise Conflict(f"document {doc.id!r} has no revision {doc.rev}")
            parent = None
        elif doc.rev is None:
            winner = tree.winner()
            if not winner.deleted:
                raise Conflict(
                    f"document {doc.id!r} exists: pass its current _rev ({winner.rev}) to update"
                )
            parent = winner.rev  # recreating a deleted document continues its history
        elif tree.is_leaf(doc.rev):
            parent = doc.rev
        else:
            raise Conflict(
                f"revision {doc.rev} of {doc.id!r} is not current (the winner is "
                f"{tree.winner().rev})"
            )
        generation = 1 if parent is None else revtree.parse_rev(parent)[0] + 1
        attachments = self._resolve_attachments(
            doc, generation, _stored_attachments(record.bodies.get(parent)) if parent else {}
        )
        body = {**doc.body, "_attachments": attachments} if attachments else doc.body
        rev = revtree.compute_rev(parent, doc.deleted, _rev_body(doc.body, attachments))
        tree.add_child(parent, rev, doc.deleted)
        record.bodies[rev] = _stored_body(body, doc.deleted)
        return rev

    def _resolve_attachments(
        self, doc: ParsedDoc, generation: int, known: dict[str, dict[str, Any]],
        *, replicated: bool = False,
    ) -> dict[str, dict[str, Any]]:
        """The stored `_attachments` of a new revision of generation `generation`: a stub
        takes the entry of that name in `known` (the parent's; replicated: any leaf's with
        the same digest), staged data makes a new entry."""
        resolved = {}
        for name, spec in doc.attachments.items():
            if isinstance(spec, _Staged):
                resolved[name] = {
                    "content_type": spec.content_type, "length": spec.length,
                    "digest": spec.digest, "revpos": spec.revpos or generation,
                    "content": spec.content,
                }
            elif isinstance(spec, _Absent):
                entry = known.get(name)
                if entry is not None and entry["digest"] == spec.digest:
                    resolved[name] = {**entry, "revpos": spec.revpos}
                else:  # no data here: the entry says what it is and where it may come from
                    resolved[name] = {
                        "content_type": spec.content_type, "length": spec.length,
                        "digest": spec.digest, "revpos": spec.revpos, "content": None,
                        "absent": spec.source,
                    }
            elif isinstance(spec, Stub):
                entry = known.get(name)
                if entry is None or (spec.digest is not None and spec.digest != entry["digest"]):
                    where = "any revision this store holds" if replicated else "the revision"
                    raise BadRequest(
                        f"document {doc.id!r}: missing stub: {where} has no attachment "
                        f"{name!r}" + (f" with digest {spec.digest}" if spec.digest else
                                       f" of revpos {spec.revpos}" if replicated else "")
                    )
                resolved[name] = dict(entry)
                if replicated and spec.revpos is not None:
                    resolved[name]["revpos"] = spec.revpos
            else:
                assert isinstance(spec, Follows)
                raise BadRequest(
                    f"document {doc.id!r}: attachment {name!r} follows: its data goes with "
                    "put_replicated"
                )
        return resolved

    def _merge(self, record: _Record, doc: ParsedDoc) -> tuple[str, bool]:
        """Insert a replicated revision with its history; a known one changes nothing. One that
        would give the doc more than `MAX_LEAVES` leaves is refused (`Forbidden`)."""
        assert doc.path is not None and doc.rev is not None
        known = doc.rev in record.tree
        body = doc.body
        if not known and doc.attachments:  # resolved before the tree changes: may refuse
            held: dict[str, dict[str, Any]] = {}
            for stored in record.bodies.values():
                for name, entry in _stored_attachments(stored).items():
                    spec = doc.attachments.get(name)
                    if (isinstance(spec, Stub) and spec.matches(entry)) or (
                            isinstance(spec, _Absent) and spec.digest == entry["digest"]):
                        held[name] = entry
            generation = revtree.parse_rev(doc.rev)[0]
            attachments = self._resolve_attachments(doc, generation, held, replicated=True)
            body = {**doc.body, "_attachments": attachments}
        if not record.tree.merge(doc.path, doc.deleted, max_leaves=MAX_LEAVES):
            return doc.rev, False
        if not known:
            record.bodies[doc.rev] = _stored_body(body, doc.deleted)
        return doc.rev, True

    def _save(self, conn: sqlite3.Connection, records: list[tuple[str, _Record]]) -> int:
        """Write the records, each with a new seq; return the last one."""
        rows = []
        seq = self._txn_seq
        dropped: set[int] = set()
        for doc_id, record in records:
            leaves = record.tree.leaves()
            bodies = {leaf.rev: record.bodies.get(leaf.rev) for leaf in leaves}
            # `record.bodies` still holds the leaves this write replaced: a doc that had no
            # attachment before and has none now needs no bookkeeping (the common write).
            if any(_has_attachments(stored) for stored in record.bodies.values()):
                contents = {entry["content"] for stored in bodies.values()
                            for entry in _stored_attachments(stored).values()
                            if entry.get("content") is not None}
                dropped |= chunks.set_doc_contents(conn, doc_id, contents)
            seq += 1
            rows.append((
                seq,
                doc_id,
                leaves[0].deleted,
                " ".join(leaf.rev for leaf in leaves),
                _pack(record.tree.to_obj()),
                _pack(bodies),
            ))
        conn.executemany(
            "INSERT OR REPLACE INTO docs (seq, id, deleted, leaves, tree, bodies) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            rows,
        )
        chunks.collect(conn, self._packs, dropped, self._in_use)  # the data no leaf references anymore
        self._txn_seq = seq
        return seq

    def _write_docs(
        self, conn: sqlite3.Connection, docs: list[ParsedDoc | StoreError], new_edits: bool
    ) -> list[str | StoreError]:
        """Inside a `_transact` transaction: `self._seq` advances when it commits."""
        results, _ = self._apply(conn, docs, new_edits)
        return results

    # -- documents (Store API) -------------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        def count(conn: sqlite3.Connection) -> tuple[int, dict[str, int]]:
            docs = conn.execute("SELECT count(*) FROM docs WHERE deleted = 0").fetchone()[0]
            return docs, chunks.usage(conn)

        doc_count, usage = await self._run(count)
        return {"backend": self.backend, "doc_count": doc_count, "update_seq": self._seq,
                **usage}

    async def update_seq(self) -> int:
        return self._seq  # kept by the worker as it commits: no hop, no count

    async def put(self, doc: Doc) -> str:
        parsed = revtree.parse_doc(doc)
        [result] = await self._transact(self._write_docs, [parsed], True)
        if isinstance(result, StoreError):
            raise result
        return result

    async def delete(self, doc_id: str, rev: str) -> str:
        revtree.check_doc_id(doc_id)
        if doc_id.startswith(LOCAL_PREFIX):
            await self.delete_local(doc_id[len(LOCAL_PREFIX) :])
            return "0-0"
        revtree.parse_rev(rev)
        parsed = ParsedDoc(doc_id, rev, True, {}, None)

        def delete(conn: sqlite3.Connection) -> list[str | StoreError]:
            if conn.execute("SELECT 1 FROM docs WHERE id = ?", (doc_id,)).fetchone() is None:
                raise NotFound(f"document {doc_id!r} does not exist")
            return self._write_docs(conn, [parsed], True)

        [result] = await self._transact(delete)
        if isinstance(result, StoreError):
            raise result
        return result

    async def get(
        self, doc_id: str, *, rev: str | None = None, conflicts: bool = False, revs: bool = False
    ) -> Doc:
        revtree.check_doc_id(doc_id)
        if doc_id.startswith(LOCAL_PREFIX):
            return await self.get_local(doc_id[len(LOCAL_PREFIX) :])
        if rev is not None:
            revtree.parse_rev(rev)

        def read(conn: sqlite3.Connection) -> Doc:
            row = conn.execute(
                "SELECT deleted, leaves, tree, bodies FROM docs WHERE id = ?", (doc_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"document {doc_id!r} does not exist")
            deleted, leaves, tree, raw_bodies = row
            leaf_revs = leaves.split(" ")
            bodies = self._bodies(doc_id, raw_bodies)
            wanted = rev
            if wanted is None:
                if deleted:
                    raise NotFound(f"document {doc_id!r} is deleted")
                wanted = leaf_revs[0]
            if wanted not in bodies:
                raise NotFound(f"revision {wanted} of {doc_id!r} is not available")
            doc = _document(doc_id, wanted, bodies[wanted])
            if conflicts:
                others = [r for r in leaf_revs
                          if r != wanted and r in bodies and not _is_tombstone(bodies[r])]
                if others:
                    doc["_conflicts"] = others
            if revs:
                doc["_revisions"] = self._decode(doc_id, tree, raw_bodies).tree.history(wanted)
            return doc

        return await self._read(read, small=True)

    async def compact(self) -> None:
        """Only leaf bodies are ever kept; this collects attachment data no leaf references
        (uploads cut when the process died, data that was being read when dropped)."""
        await self._transact(chunks.sweep, self._packs, self._in_use)
        await self._run(self._packs.reclaim_all)  # packs left by a crash

    # -- attachments (Store API) -----------------------------------------------------------

    async def put_attachment(
        self,
        doc_id: str,
        rev: str | None,
        name: str,
        content_type: str,
        chunks: AsyncIterable[bytes],
        *,
        digest: str | None = None,
        length: int | None = None,
    ) -> str:
        _check_attachment_target(doc_id, rev, name)
        check_content_type(content_type)
        check = StreamCheck(digest=digest, length=length)
        await self._run(self._check_leaf, doc_id, rev)  # a stale rev fails before any upload
        staged = await self._stage(chunks, check, content_type, None)

        def write(conn: sqlite3.Connection) -> list[str | StoreError]:
            body, attachments = self._leaf_parts(conn, doc_id, rev)
            specs: dict[str, Any] = {n: Stub(a["digest"], None) for n, a in attachments.items()}
            specs[name] = staged
            parsed = ParsedDoc(doc_id, rev, False, body, None, specs)
            return self._write_docs(conn, [parsed], True)

        return await self._commit_staged(write, [staged])

    async def delete_attachment(self, doc_id: str, rev: str, name: str) -> str:
        _check_attachment_target(doc_id, rev, name)

        def write(conn: sqlite3.Connection) -> list[str | StoreError]:
            body, attachments = self._leaf_parts(conn, doc_id, rev)
            if name not in attachments:
                raise NotFound(f"revision {rev} of {doc_id!r} has no attachment {name!r}")
            specs = {n: Stub(a["digest"], None) for n, a in attachments.items() if n != name}
            return self._write_docs(conn, [ParsedDoc(doc_id, rev, False, body, None, specs)],
                                    True)

        [result] = await self._transact(write)
        if isinstance(result, StoreError):
            raise result
        return result

    async def put_replicated(
        self, doc: Doc, streams: Mapping[str, AsyncIterable[bytes]], *, edit: bool = False
    ) -> None:
        async def stage(name: str, check: StreamCheck, spec: Follows) -> _Staged:
            return await self._stage(streams[name], check, spec.content_type, spec.revpos)

        await self._replicate(doc, set(streams), stage, edit=edit)

    async def put_staged(self, doc: Doc, addresses: Mapping[str, list[bytes]], *,
                         digests: Mapping[str, str] | None = None, edit: bool = False) -> None:
        """Staged chunks are linked where they are (a pack, or a row), not hashed or written
        again: their bytes are read once, in the worker, for the md5 digest, or not at all
        when the caller hashed them on the way in (`digests`)."""
        async def stage(name: str, check: StreamCheck, spec: Follows) -> _Staged:
            return await self._link_staged(addresses[name], check, spec.content_type,
                                           spec.revpos, (digests or {}).get(name))

        await self._replicate(doc, set(addresses), stage, edit=edit)

    async def _replicate(
        self, doc: Doc, given: set[str],
        stage: Callable[[str, StreamCheck, Follows], Awaitable[_Staged]], *, edit: bool = False,
    ) -> None:
        parsed = revtree.parse_doc(doc, new_edits=False)
        follows = {n: s for n, s in parsed.attachments.items() if isinstance(s, Follows)}
        if given != set(follows):
            raise BadRequest(
                f"document {parsed.id!r}: data given for {sorted(given)}, but the "
                f"attachments that follow are {sorted(follows)}"
            )

        def known(conn: sqlite3.Connection) -> bool:
            record = self._load_records(conn, [parsed.id]).get(parsed.id)
            return record is not None and parsed.rev in record.tree

        staged: list[_Staged] = []
        specs = dict(parsed.attachments)
        if not await self._run(known):  # a known revision's data is not read again
            try:
                for name, spec in follows.items():
                    check = StreamCheck(digest=spec.digest, length=spec.length)
                    specs[name] = await stage(name, check, spec)
                    staged.append(specs[name])
            except BaseException:
                await self._release(staged, collect=True)
                raise
        else:
            specs = {n: Stub(s.digest, s.revpos) for n, s in specs.items()}
        replicated = attrs.evolve(parsed, attachments=specs)

        def write(conn: sqlite3.Connection) -> list[str | StoreError]:
            if edit:
                record = self._load_records(conn, [parsed.id]).get(parsed.id)
                winner = record.tree.winner().rev if record and record.tree.leaves() else None
                if (overtaken := revtree.overtaken_edit(parsed, winner)) is not None:
                    return [overtaken]
            return self._write_docs(conn, [replicated], False)

        await self._commit_staged(write, staged)

    async def open_attachment(
        self,
        doc_id: str,
        name: str,
        *,
        rev: str | None = None,
        range: tuple[int, int] | None = None,
    ) -> tuple[AttachmentMeta, AsyncIterator[bytes]]:
        revtree.check_doc_id(doc_id)
        check_attachment_name(name)
        if rev is not None:
            revtree.parse_rev(rev)

        def read(conn: sqlite3.Connection) -> tuple[AttachmentMeta, int, int]:
            row = conn.execute(
                "SELECT deleted, leaves, bodies FROM docs WHERE id = ?", (doc_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"document {doc_id!r} does not exist")
            deleted, leaves, raw_bodies = row
            bodies = self._bodies(doc_id, raw_bodies)
            wanted = rev
            if wanted is None:
                if deleted:
                    raise NotFound(f"document {doc_id!r} is deleted")
                wanted = leaves.partition(" ")[0]
            if wanted not in bodies:
                raise NotFound(f"revision {wanted} of {doc_id!r} is not available")
            entry = _stored_attachments(bodies[wanted]).get(name)
            if entry is None:
                raise NotFound(f"revision {wanted} of {doc_id!r} has no attachment {name!r}")
            if entry.get("content") is None:
                raise DataAbsent(
                    f"the data of attachment {name!r} of {doc_id!r} is not here yet",
                    meta=AttachmentMeta(name, entry["content_type"], entry["length"],
                                        entry["digest"], entry["revpos"]),
                    source=entry.get("absent"))
            chunk_size = chunks.chunk_size_of(conn, entry["content"])
            if chunk_size is None:
                raise StoreError(f"the data of attachment {name!r} of {doc_id!r} is missing")
            meta = AttachmentMeta(name, entry["content_type"], entry["length"],
                                  entry["digest"], entry["revpos"])
            return meta, entry["content"], chunk_size

        meta, content, chunk_size = await self._run(read)
        start, stop = check_range(range, meta.length)
        return meta, self._read_content(doc_id, name, content, chunk_size, start, stop)

    async def _read_content(
        self, doc_id: str, name: str, content: int, chunk_size: int, start: int, stop: int
    ) -> AsyncIterator[bytes]:
        """Bytes `start` to `stop` of a content, a chunk at a time. The content is kept from
        garbage collection while this runs; one collected before the first chunk (the
        attachment was removed meanwhile) is `NotFound`."""
        self._in_use[content] += 1
        try:
            for index in range(start // chunk_size, (stop - 1) // chunk_size + 1 if stop else 0):
                data = await self._run(chunks.read_chunk, self._packs, content, index)
                if data is None:
                    raise NotFound(f"attachment {name!r} of {doc_id!r} was removed while read")
                offset = index * chunk_size
                yield data[max(start - offset, 0) : stop - offset]
        finally:
            self._in_use[content] -= 1
            if not self._in_use[content]:
                del self._in_use[content]

    def _check_leaf(self, conn: sqlite3.Connection, doc_id: str, rev: str | None) -> None:
        """Fail now, as the write would, when `rev` is not a leaf to write on."""
        record = self._load_records(conn, [doc_id]).get(doc_id)
        if record is None:
            if rev is not None:
                raise Conflict(f"document {doc_id!r} has no revision {rev}")
            return
        if rev is None:
            winner = record.tree.winner()
            if not winner.deleted:
                raise Conflict(
                    f"document {doc_id!r} exists: pass its current _rev ({winner.rev}) to update"
                )
        elif not record.tree.is_leaf(rev):
            raise Conflict(f"revision {rev} of {doc_id!r} is not current")

    def _leaf_parts(
        self, conn: sqlite3.Connection, doc_id: str, rev: str | None
    ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """The body (no `_` fields) and stored attachments of leaf `rev` to write on; for
        `rev` None (a new or deleted doc: a new document) none."""
        self._check_leaf(conn, doc_id, rev)
        if rev is None:
            return {}, {}
        stored = self._load_records(conn, [doc_id])[doc_id].bodies.get(rev)
        if _is_tombstone(stored):
            raise Conflict(f"revision {rev} of {doc_id!r} is deleted")
        document = _document(doc_id, rev, stored)
        body = {k: v for k, v in document.items() if not k.startswith("_")}
        return body, _stored_attachments(stored)

    async def _stage(
        self, data: AsyncIterable[bytes], check: StreamCheck, content_type: str,
        revpos: int | None,
    ) -> _Staged:
        """Stream `data` into a new content, `UPLOAD_BATCH` chunks per transaction."""
        async def fill(content: int) -> None:
            batch: list[bytes] = []
            index = 0
            async for piece in rechunk(data):
                check.update(piece)
                batch.append(piece)
                if len(batch) == UPLOAD_BATCH:
                    await self._transact(chunks.add_chunks, self._packs, content, index, batch)
                    index, batch = index + len(batch), []
            if batch:
                await self._transact(chunks.add_chunks, self._packs, content, index, batch)

        return await self._new_content(fill, check, content_type, revpos)

    async def _link_staged(
        self, hashes: list[bytes], check: StreamCheck, content_type: str, revpos: int | None,
        hashed_as: str | None = None,
    ) -> _Staged:
        """A new content made of staged chunks, in order: each read once in the worker for
        the digest (8 MiB per hop, so other writes wait little) unless the caller hashed
        them (`hashed_as`: only their sizes are read then), linked 64 MiB per transaction.
        Every chunk but the last must be a full `CHUNK_SIZE` one."""
        def digest_of(conn: sqlite3.Connection, batch: list[bytes], last: int) -> None:
            for index, digest in enumerate(batch, last - len(batch) + 1):
                if hashed_as is None:
                    data = chunks.read_staged(conn, self._packs, digest)
                    size = None if data is None else len(data)
                else:
                    size = chunks.staged_size(conn, digest)
                if size is None:
                    raise NotFound(f"no staged chunk {digest.hex()}")
                if not 0 < size <= CHUNK_SIZE or (size < CHUNK_SIZE and index != len(hashes) - 1):
                    raise BadRequest(f"staged chunk {index} is {size} bytes: not a chunk of a file")
                if hashed_as is None:
                    check.update(data)
                else:
                    check.count(size)

        async def fill(content: int) -> None:
            for first in range(0, len(hashes), LINK_BATCH):
                batch = hashes[first : first + LINK_BATCH]
                for start in range(0, len(batch), READ_BATCH):
                    part = batch[start : start + READ_BATCH]
                    await self._run(digest_of, part, first + start + len(part) - 1)
                await self._transact(chunks.link_chunks, content, first, batch)

        return await self._new_content(fill, check, content_type, revpos, hashed_as)

    async def _new_content(
        self, fill: Callable[[int], Awaitable[None]], check: StreamCheck, content_type: str,
        revpos: int | None, hashed_as: str | None = None,
    ) -> _Staged:
        """A new content, its chunks added by `fill(content)`, then checked. It stays in use
        (kept from GC) until `_release`; on failure it is removed."""
        content = await self._transact(chunks.new_content)
        self._in_use[content] += 1
        staged = None
        try:
            await fill(content)
            digest = check.finish(hashed_as)
            await self._transact(chunks.finish_content, content, check.length, digest)
            staged = _Staged(content, content_type, check.length, digest, revpos)
        finally:
            if staged is None:
                await self._release([_Staged(content, content_type, 0, "", None)], collect=True)
        return staged

    async def _commit_staged(
        self, write: Callable[[sqlite3.Connection], list[str | StoreError]],
        staged: list[_Staged],
    ) -> Any:
        """Run the write that references `staged` contents, then release them, removing
        those it did not come to reference (it failed, or the replicated revision was
        delivered meanwhile by another call: a no-op)."""
        try:
            [result] = await self._transact(write)
        finally:
            await self._release(staged, collect=True)
        if isinstance(result, StoreError):
            raise result
        return result

    async def _release(self, staged: list[_Staged], *, collect: bool) -> None:
        for item in staged:
            self._in_use[item.content] -= 1
            if not self._in_use[item.content]:
                del self._in_use[item.content]
        if collect and staged and self._conn is not None:
            with trio.CancelScope(shield=True):  # also after a cancel: no orphan left
                await self._transact(
                    chunks.collect, self._packs, [item.content for item in staged], self._in_use
                )

    # -- attachments held without their data (see base.Store) --------------------------------

    async def put_replicated_absent(self, doc: Doc, source: str) -> None:
        parsed = revtree.parse_doc(doc, new_edits=False)
        raw = doc.get("_attachments") or {}
        specs: dict[str, Any] = {}
        for name, spec in parsed.attachments.items():
            entry = raw.get(name)
            if not isinstance(spec, Stub) or not isinstance(entry, Mapping) \
                    or type(entry.get("length")) is not int or entry["length"] < 0 \
                    or not isinstance(entry.get("content_type"), str) \
                    or not isinstance(spec.digest, str) or type(spec.revpos) is not int:
                raise BadRequest(f"document {parsed.id!r}: attachment {name!r} needs a full "
                                 "stub (content_type, length, digest, revpos)")
            specs[name] = _Absent(entry["content_type"], entry["length"], spec.digest,
                                  spec.revpos, source)
        replicated = attrs.evolve(parsed, attachments=specs)

        def write(conn: sqlite3.Connection) -> list[str | StoreError]:
            return self._write_docs(conn, [replicated], False)

        [result] = await self._transact(write)
        if isinstance(result, StoreError):
            raise result

    def _leaf_bodies(self, conn: sqlite3.Connection, doc_id: str) -> dict[str, str | None]:
        row = conn.execute("SELECT bodies FROM docs WHERE id = ?", (doc_id,)).fetchone()
        return {} if row is None else self._bodies(doc_id, row[0])

    async def absent_attachments(self, doc_id: str, rev: str) -> dict[str, str]:
        def read(conn: sqlite3.Connection) -> dict[str, str]:
            stored = self._leaf_bodies(conn, doc_id).get(rev)
            return {name: entry.get("absent") or "" for name, entry
                    in _stored_attachments(stored).items() if entry.get("content") is None}

        return await self._run(read)

    async def absent_documents(self, limit: int = 1000) -> list[tuple[str, str]]:
        def read(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            found = []
            # A quick filter on the packed bodies, then the real test on each leaf.
            for doc_id, raw in conn.execute(
                    "SELECT id, bodies FROM docs WHERE instr(bodies, ?) > 0",
                    (b'"absent":',)):
                for rev, stored in self._bodies(doc_id, raw).items():
                    if any(e.get("content") is None
                           for e in _stored_attachments(stored).values()):
                        found.append((doc_id, rev))
                if len(found) >= limit:
                    break
            return found[:limit]

        return await self._run(read)

    async def fill_absent(self, doc_id: str, rev: str, name: str,
                          data: AsyncIterable[bytes]) -> bool:
        def absent_entry(conn: sqlite3.Connection) -> dict[str, Any] | None:
            entry = _stored_attachments(self._leaf_bodies(conn, doc_id).get(rev)).get(name)
            return entry if entry is not None and entry.get("content") is None else None

        entry = await self._run(absent_entry)
        if entry is None:
            return False
        check = StreamCheck(digest=entry["digest"], length=entry["length"])
        staged = await self._stage(data, check, entry["content_type"], entry["revpos"])

        def write(conn: sqlite3.Connection) -> list[bool]:
            # Every leaf holding this absent data gets it; the revisions stay as they are
            # (their ids cover the digest, not where the data lives), so no new seq.
            bodies = self._leaf_bodies(conn, doc_id)
            filled = False
            for leaf, stored in bodies.items():
                if _is_tombstone(stored) or not _has_attachments(stored):
                    continue
                body = json.loads(stored)
                found = (body.get("_attachments") or {}).get(name)
                if found and found.get("content") is None and found["digest"] == entry["digest"]:
                    found["content"] = staged.content
                    del found["absent"]
                    bodies[leaf] = _dump_body(body)
                    filled = True
            if filled:
                conn.execute("UPDATE docs SET bodies = ? WHERE id = ?", (_pack(bodies), doc_id))
                contents = {e["content"] for stored in bodies.values()
                            for e in _stored_attachments(stored).values()
                            if e.get("content") is not None}
                chunks.set_doc_contents(conn, doc_id, contents)
            return [filled]

        return await self._commit_staged(write, [staged])

    # -- staged chunks of incoming transfers (see chunks.py) ---------------------------------

    async def chunk_addresses(self, doc_id: str, name: str, rev: str) -> list[bytes] | None:
        meta, data = await self.open_attachment(doc_id, name, rev=rev, range=None)
        await data.aclose()

        def read(conn: sqlite3.Connection) -> list[bytes] | None:
            row = conn.execute("SELECT bodies FROM docs WHERE id = ?", (doc_id,)).fetchone()
            entry = _stored_attachments(self._bodies(doc_id, row[0]).get(rev)).get(name) \
                if row is not None else None
            if entry is None or chunks.chunk_size_of(conn, entry["content"]) != CHUNK_SIZE:
                return None  # gone meanwhile, or stored in another chunking
            return chunks.chunk_hashes(conn, entry["content"])

        hashes = await self._run(read)
        if hashes is not None and len(hashes) != -(-meta.length // CHUNK_SIZE):
            return None
        return hashes

    # Holds are counted inside the transactions, which run one at a time: a release and a
    # claim of one chunk never interleave between the count and the staged mark.

    async def claim_chunks(self, hashes: list[bytes]) -> set[bytes]:
        def claim(conn: sqlite3.Connection) -> set[bytes]:
            held = chunks.claim_chunks(conn, hashes, time.time())
            self._holds.take(held)
            return held

        return await self._transact(claim)

    async def stage_chunks(self, pieces: list[bytes], *,
                           checked: list[bytes] | None = None) -> list[bytes]:
        check_addresses(pieces, checked)

        def stage(conn: sqlite3.Connection) -> list[bytes]:
            digests = chunks.stage_chunks(conn, self._packs, pieces, time.time(), checked)
            self._holds.take(digests)
            return digests

        return await self._transact(stage)

    async def read_staged_chunk(self, digest: bytes) -> bytes:
        data = await self._run(chunks.read_staged, self._packs, digest)
        if data is None:
            raise NotFound(f"no staged chunk {digest.hex()}")
        return data

    async def release_chunks(self, hashes: list[bytes], *, keep_staged: bool = False) -> None:
        def release(conn: sqlite3.Connection) -> None:
            free = self._holds.give_back(hashes)
            if not keep_staged:
                chunks.unstage(conn, self._packs, free)

        await self._transact(release)

    async def expire_staged(self, older_than: float) -> int:
        return await self._transact(chunks.expire_staged, self._packs,
                                    time.time() - older_than, self._holds)

    async def reclaim_space(self) -> int:
        # A pack per transaction: each holds the worker for at most half a pack's copy.
        freed = 0
        while given := await self._transact(chunks.repack, self._packs):
            freed += given
        return freed

    async def winners(self, doc_ids: list[str], *, tombstones: bool = False) -> dict[str, Doc]:
        for doc_id in doc_ids:
            revtree.check_doc_id(doc_id)

        def read(conn: sqlite3.Connection) -> dict[str, Doc]:
            found = {}
            for doc_id, record in self._load_records(conn, doc_ids).items():
                winner = record.tree.winner()
                if (tombstones or not winner.deleted) and winner.rev in record.bodies:
                    found[doc_id] = _document(doc_id, winner.rev, record.bodies[winner.rev])
            return found

        if not doc_ids:
            return {}
        return await self._read(read, small=len(doc_ids) <= SMALL_READ_DOCS)

    async def all_docs(self) -> list[Doc]:
        def read(conn: sqlite3.Connection) -> list[Doc]:
            rows = conn.execute("SELECT id, leaves, bodies FROM docs WHERE deleted = 0 ORDER BY id")
            docs = []
            for doc_id, leaves, raw_bodies in rows:
                winner = leaves.partition(" ")[0]
                docs.append(_document(doc_id, winner, self._bodies(doc_id, raw_bodies)[winner]))
            return docs

        return await self._run(read)

    # -- replication -----------------------------------------------------------------------

    async def revs_diff(self, revs: dict[str, list[str]]) -> dict[str, dict[str, list[str]]]:
        if not isinstance(revs, dict):
            raise BadRequest("revs_diff takes {doc id: [rev, ...]}")
        for doc_id, doc_revs in revs.items():
            revtree.check_doc_id(doc_id)
            if not isinstance(doc_revs, (list, tuple)):
                raise BadRequest(f"revs_diff: the revs of {doc_id!r} must be a list")
            for rev in doc_revs:
                revtree.parse_rev(rev)

        def diff(conn: sqlite3.Connection) -> dict[str, dict[str, list[str]]]:
            records = self._load_records(conn, revs)
            answer = {}
            for doc_id, doc_revs in revs.items():
                record = records.get(doc_id)
                tree = record.tree if record is not None else RevTree()
                missing, ancestors = tree.revs_diff(doc_revs)
                if missing:
                    answer[doc_id] = {"missing": missing, "possible_ancestors": ancestors}
            return answer

        return await self._read(diff, small=len(revs) <= SMALL_READ_DOCS)

    async def bulk_docs(self, docs: list[Doc], *, new_edits: bool = True) -> list[dict[str, Any]]:
        if not isinstance(docs, list):
            raise BadRequest("bulk_docs takes a list of documents")
        if type(new_edits) is not bool:
            raise BadRequest(f"new_edits must be true or false, not {new_edits!r}")
        return await self._transact(self._bulk_docs, docs, new_edits)

    def _bulk_docs(
        self, conn: sqlite3.Connection, docs: list[Doc], new_edits: bool
    ) -> list[dict[str, Any]]:
        parsed: list[ParsedDoc | StoreError] = []
        for doc in docs:
            try:
                parsed.append(revtree.parse_doc(doc, new_edits=new_edits))
            except StoreError as exc:
                parsed.append(exc)
        results = self._write_docs(conn, parsed, new_edits)
        answer = []
        for doc, result in zip(docs, results):
            doc_id = doc.get("_id") if isinstance(doc, dict) else None
            if isinstance(result, Forbidden):  # the refused revision is named too
                rev = doc.get("_rev") if isinstance(doc, dict) else None
                answer.append(
                    {"id": doc_id, "rev": rev, "error": result.error, "reason": result.reason}
                )
            elif isinstance(result, StoreError):
                answer.append({"id": doc_id, "error": result.error, "reason": result.reason})
            else:
                answer.append({"id": doc_id, "rev": result, "ok": True})
        return answer

    async def bulk_get(self, wanted: list[tuple[str, str]]) -> list[Doc]:
        pairs = []
        for pair in wanted:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise BadRequest(f"bulk_get takes (id, rev) pairs, not {pair!r}")
            doc_id, rev = pair
            revtree.check_doc_id(doc_id)
            revtree.parse_rev(rev)
            pairs.append((doc_id, rev))

        def read(conn: sqlite3.Connection) -> list[Doc]:
            records = self._load_records(conn, (doc_id for doc_id, _ in pairs))
            docs = []
            for doc_id, rev in pairs:
                record = records.get(doc_id)
                if record is None or rev not in record.bodies:
                    continue
                doc = _document(doc_id, rev, record.bodies[rev])
                doc["_revisions"] = record.tree.history(rev)
                docs.append(doc)
            return docs

        return await self._read(read, small=len(pairs) <= SMALL_READ_DOCS)

    async def changes(self, since: Seq = 0, *, limit: int | None = None) -> ChangesPage:
        after = _parse_seq(since)
        if limit is not None and (type(limit) is not int or limit < 1):
            raise BadRequest(f"limit must be a positive integer or None, not {limit!r}")

        def read(conn: sqlite3.Connection) -> list[Change]:
            rows = conn.execute(
                "SELECT seq, id, deleted, leaves FROM docs WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, -1 if limit is None else limit),
            )
            return [
                Change(seq, doc_id, tuple(leaves.split(" ")), bool(deleted))
                for seq, doc_id, deleted, leaves in rows
            ]

        results = await self._read(read, small=limit is not None and limit <= SMALL_READ_CHANGES)
        return ChangesPage(results, results[-1].seq if results else after)

    async def wait_for_change(self, since: Seq) -> None:
        after = _parse_seq(since)
        while self._seq <= after:
            if self._conn is None:
                raise StoreError(f"the store {self.path} is closed")
            await self._changed.wait()
        await trio.lowlevel.checkpoint()

    # -- local documents -------------------------------------------------------------------

    async def get_local(self, local_id: str) -> Doc:
        revtree.check_local_id(local_id)

        def read(conn: sqlite3.Connection) -> Doc:
            row = conn.execute(
                "SELECT version, body FROM local_docs WHERE id = ?", (local_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"local document {local_id!r} does not exist")
            version, body = row
            return _document(LOCAL_PREFIX + local_id, f"0-{version}", body)

        return await self._read(read, small=True)

    async def put_local(self, local_id: str, doc: Doc) -> None:
        revtree.check_local_id(local_id)
        body = revtree.parse_local_doc(local_id, doc)
        await self._transact(_put_local, local_id, body)

    async def delete_local(self, local_id: str) -> None:
        revtree.check_local_id(local_id)
        await self._transact(_delete_local, local_id)

    def _write_local_doc(self, conn: sqlite3.Connection, doc: ParsedDoc) -> str:
        """A `_local/` document written through `put`/`bulk_docs` (inside a transaction)."""
        local_id = doc.id[len(LOCAL_PREFIX) :]
        if doc.deleted:
            _delete_local(conn, local_id)
            return "0-0"
        return f"0-{_put_local(conn, local_id, doc.body)}"


def _check_attachment_target(doc_id: str, rev: str | None, name: str) -> None:
    revtree.check_doc_id(doc_id)
    if doc_id.startswith(LOCAL_PREFIX):
        raise BadRequest(f"local document {doc_id!r} has no attachments")
    if rev is not None:
        revtree.parse_rev(rev)
    check_attachment_name(name)


def _put_local(conn: sqlite3.Connection, local_id: str, body: dict[str, Any]) -> int:
    (version,) = conn.execute(
        "INSERT INTO local_docs (id, version, body) VALUES (?, 1, ?) "
        "ON CONFLICT (id) DO UPDATE SET version = version + 1, body = excluded.body "
        "RETURNING version",
        (local_id, _dump_body(body)),
    ).fetchone()
    return version


def _delete_local(conn: sqlite3.Connection, local_id: str) -> None:
    if conn.execute("DELETE FROM local_docs WHERE id = ?", (local_id,)).rowcount == 0:
        raise NotFound(f"local document {local_id!r} does not exist")


# -- opening the file ----------------------------------------------------------------------


_PRIVATE = 0o600
_SIDE_FILES = ("-wal", "-shm", "-journal")


def _make_private(path: Path) -> None:
    """Create the store file only its owner may read (SQLite gives its -wal, -shm and
    -journal files the database file's mode), and tighten one an older version left 0644."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, _PRIVATE)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StoreError(f"cannot create store {path}: {exc}") from exc
    else:
        os.close(fd)  # an empty file is an empty SQLite database
    for file in (path, *(path.with_name(path.name + side) for side in _SIDE_FILES)):
        try:
            if file.stat().st_mode & 0o077:
                os.chmod(file, _PRIVATE)
        except FileNotFoundError:
            pass
        except OSError as exc:  # e.g. owned by another user: opening it will tell more
            raise StoreError(f"cannot make store file {file} private (mode 0600): {exc}") from exc


def _open_connection(path: Path, owner: str | None) -> tuple[sqlite3.Connection, int, ChunkPacks]:
    """Open and check (or create) the store file; return the connection, its update seq and
    its chunk packs (those no row names anymore removed)."""
    if path.is_dir():
        raise StoreError(f"cannot open store {path}: it is a directory")
    if not path.parent.is_dir():
        raise StoreError(f"cannot open store {path}: the directory {path.parent} does not exist")
    _make_private(path)
    try:
        # timeout=0: a file held by another store fails at once instead of hanging.
        conn = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open store {path}: {exc}") from exc
    try:
        update_seq = _prepare(conn, path, owner)
        packs = ChunkPacks(path)
        packs.reclaim_all(conn)
    except BaseException as exc:
        conn.close()
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            raise StoreError(
                f"cannot open store {path}: another store has it open (one writer at a time)"
            ) from exc
        if isinstance(exc, sqlite3.DatabaseError):
            raise StoreError(f"cannot open store {path}: {exc}") from exc
        raise
    return conn, update_seq, packs


def _prepare(conn: sqlite3.Connection, path: Path, owner: str | None) -> int:
    # Exclusive locking before WAL: no shared-memory index, and no other connection may use
    # the file while this one is open.
    conn.execute("PRAGMA locking_mode = EXCLUSIVE")
    (application_id,) = conn.execute("PRAGMA application_id").fetchone()
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    (tables,) = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    new = application_id == 0 and version == 0 and tables == 0
    if not new and application_id != APPLICATION_ID:  # checked before anything is changed
        raise StoreError(f"cannot open store {path}: it is an SQLite file of another program")
    if not new and version not in (1, 2, SCHEMA_VERSION):
        raise StoreError(
            f"cannot open store {path}: schema version {version}, this program reads "
            f"version {SCHEMA_VERSION}"
        )
    (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
    if mode != "wal":
        raise StoreError(f"cannot open store {path}: WAL journal mode refused ({mode})")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA journal_size_limit = 67108864")  # trim the WAL after checkpoints
    conn.execute("BEGIN IMMEDIATE")  # takes the exclusive lock now, not at the first write
    try:
        if new:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        if new or version == 1:
            chunks.create_tables(conn, time.time())
        chunks.create_staging(conn, time.time())
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if owner is not None:
            _claim(conn, path, owner)
        (update_seq,) = conn.execute("SELECT coalesce(max(seq), 0) FROM docs").fetchone()
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return update_seq


def _claim(conn: sqlite3.Connection, path: Path, owner: str) -> None:
    """Record `owner` as the node this file belongs to, or check it is the one recorded."""
    row = conn.execute("SELECT body FROM local_docs WHERE id = ?", (OWNER_LOCAL_ID,)).fetchone()
    if row is None:
        _put_local(conn, OWNER_LOCAL_ID, {"node_id": owner})
        return
    try:
        recorded = json.loads(row[0]).get("node_id")
    except (ValueError, AttributeError):
        recorded = row[0]
    if recorded != owner:
        raise owner_mismatch("store", str(path), recorded, "path")
