"""The document store contract: CouchDB semantics behind one async interface.

Every backend (embedded SQLite, a real CouchDB server) implements `Store` and passes the
same contract suite (`tests/store/test_contract.py`). Documents are JSON objects with an
`_id` and a `_rev` (`N-<32 hex>`); an update makes a new revision; revisions form a tree
per document whose leaves are the conflicts; the winner is chosen as CouchDB does
(non-deleted first, then highest generation, then highest hash in byte order).

Sequences (`Seq`) are opaque: a backend hands one out in `changes()` and takes it back as
`since`. `0` always means "from the start". Callers only store and return them, and never
compare them: CouchDB hands out a different string for the same state from one read to the
next. The changes feed is at-least-once: a change may be seen twice, none is ever lost.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from plugshare.errors import PlugshareError

if TYPE_CHECKING:
    from plugshare.store.attachments import AttachmentMeta

Seq = int | str
Doc = dict[str, Any]

LOCAL_PREFIX = "_local/"

# Most leaf revisions (live or deleted) a document may have. Each replicated sibling is one
# more leaf, and every write to the doc reads all its leaves: a revision that would make a doc
# exceed this is refused for that doc (`Forbidden` in its `bulk_docs` result), so one write
# member cannot make a document unboundedly expensive for every node that holds it.
MAX_LEAVES = 100

# The local document recording which node a database belongs to: `{"node_id": ...}`.
OWNER_LOCAL_ID = "plugshare-owner"

# Top-level fields a caller may send; every other field starting with "_" is refused.
RESERVED_FIELDS = frozenset(
    {"_id", "_rev", "_deleted", "_revisions", "_conflicts", "_attachments"}
)


class StoreError(PlugshareError):
    """Base of every store failure; `status`/`error` map it onto the HTTP API."""

    status = 500
    error = "store_error"

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class BadRequest(StoreError):
    status = 400
    error = "bad_request"


class NotFound(StoreError):
    status = 404
    error = "not_found"


class Conflict(StoreError):
    status = 409
    error = "conflict"


class RangeNotSatisfiable(StoreError):
    """A byte range outside an attachment (HTTP 416)."""

    status = 416
    error = "range_not_satisfiable"


class Forbidden(StoreError):
    """The write is refused by policy (e.g. it would give a document over `MAX_LEAVES`
    leaves); in `bulk_docs` results it is `{"id", "rev", "error": "forbidden", "reason"}`."""

    status = 403
    error = "forbidden"


class DataAbsent(StoreError):
    """The attachment's data is not held here: its revision was written without it (a
    share fetched on read, `put_replicated_absent`). `meta` describes the data, `source`
    is what the writer tagged it with (the share it came through)."""

    status = 503
    error = "data_absent"

    def __init__(self, reason: str, *, meta: AttachmentMeta, source: str | None):
        super().__init__(reason)
        self.meta = meta
        self.source = source


class OwnerMismatch(StoreError):
    """The database (or SQLite file) is recorded as belonging to another node."""

    status = 409
    error = "owner_mismatch"

    def __init__(self, reason: str, *, database: str, owner: str):
        super().__init__(reason)
        self.database = database
        self.owner = owner


def owner_mismatch(kind: str, name: str, owner: object, setting: str) -> OwnerMismatch:
    """The error for store `name` (`kind`: "database" or "store") recorded as `owner`'s;
    `setting` is the [store] key that picks another one."""
    shown = owner if isinstance(owner, str) else f"of an unreadable owner record {owner!r}"
    return OwnerMismatch(
        f"{kind} {name} belongs to node {shown}; configure another [store] {setting}",
        database=name, owner=str(owner),
    )


class Unavailable(StoreError):
    """The backend cannot be reached (e.g. the CouchDB server is down)."""

    status = 503
    error = "unavailable"


@attrs.frozen
class Change:
    """One row of the changes feed: a document and all its leaf revisions."""

    seq: Seq
    id: str
    revs: tuple[str, ...]  # every leaf revision, the winner first
    deleted: bool  # the winning revision is a tombstone


@attrs.frozen
class ChangesPage:
    results: list[Change]
    last_seq: Seq  # pass back as `since` to continue after this page


class Store(abc.ABC):
    """A database of JSON documents with CouchDB semantics. All methods are async (trio)."""

    backend: str  # "sqlite" or "couchdb"
    revs_limit: int  # revision stemming: how many ancestors each leaf keeps (default 1000)

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release connections/files. Idempotent."""

    @abc.abstractmethod
    async def info(self) -> dict[str, Any]:
        """`{"backend", "doc_count" (live docs), "update_seq"}`. Counting may read every
        doc: what needs the seq alone asks `update_seq()`."""

    async def update_seq(self) -> Seq:
        """The seq of the latest change, as `info()` says it, without counting anything."""
        return (await self.info())["update_seq"]

    # -- documents (new_edits=True: the store makes the revision) --------------------

    @abc.abstractmethod
    async def put(self, doc: Doc) -> str:
        """Create or update `doc` and return its new rev.

        `_id` is required; `_rev` must name a current leaf to update (missing `_rev` on a live
        doc, or a stale one -> `Conflict`); editing or deleting a losing leaf is how a conflict
        is resolved. A doc whose winner is a tombstone may be recreated without `_rev`.
        `_deleted: true` writes a tombstone, which keeps the fields sent with it. An id starting with
        `_local/` stores a local document (see `put_local`); other ids starting with `_`, a
        non-object doc or an unknown `_field` -> `BadRequest`.

        Durable when the call returns; on a CouchDB cluster, when a write quorum of its nodes
        holds it. A revision the cluster accepts below quorum (HTTP 202) is copied again until
        a quorum has it; if none does in time it is returned all the same (it exists: a retry
        would only conflict), logged, and counted in `info()["writes_below_quorum"]`.
        """

    @abc.abstractmethod
    async def get(
        self, doc_id: str, *, rev: str | None = None, conflicts: bool = False, revs: bool = False
    ) -> Doc:
        """The winning revision (or `rev`). `NotFound` when missing or when the winner is deleted
        (a given `rev` that is a tombstone is returned as `{"_id", "_rev", "_deleted": True}`).
        `conflicts=True` adds `_conflicts` (the other non-deleted leaves, in winner order) when
        there are any; `revs=True` adds `_revisions: {"start": N, "ids": [hash, ...]}`."""

    @abc.abstractmethod
    async def delete(self, doc_id: str, rev: str) -> str:
        """Write an empty tombstone on top of leaf `rev` and return its rev."""

    @abc.abstractmethod
    async def compact(self) -> None:
        """Drop the bodies of non-leaf revisions (e.g. after re-writing docs encrypted, so no
        clear copy stays behind in the database's history)."""

    @abc.abstractmethod
    async def winners(self, doc_ids: list[str], *, tombstones: bool = False) -> dict[str, Doc]:
        """The winning revision of each of `doc_ids` that exists and is live (missing and
        deleted docs are left out). With `tombstones`, a deleted doc's winning tombstone too
        (with its body, no `_revisions`): what a write lands on."""

    @abc.abstractmethod
    async def all_docs(self) -> list[Doc]:
        """Every live document's winning revision, sorted by `_id` (no local docs)."""

    # -- replication ------------------------------------------------------------------

    @abc.abstractmethod
    async def revs_diff(self, revs: dict[str, list[str]]) -> dict[str, dict[str, list[str]]]:
        """CouchDB `_revs_diff`: for each id with revisions this store lacks,
        `{"missing": [...], "possible_ancestors": [...]}`; ids with nothing missing are omitted.
        A revision written a moment ago may still be reported missing (a CouchDB cluster node
        that has not seen it yet): delivering it again is a no-op."""

    @abc.abstractmethod
    async def bulk_docs(self, docs: list[Doc], *, new_edits: bool = True) -> list[dict[str, Any]]:
        """Write many docs; one result per input doc, in order: `{"id", "rev", "ok": True}` or
        `{"id", "error", "reason"}` (a bad doc never stops the others).

        With `new_edits=False` (replication) each doc carries `_rev` and `_revisions`
        (`{"start", "ids"}`, newest first) and is inserted as-is into the revision tree,
        merging with what is there; an already known revision is a no-op, never an error.
        A revision that would give its doc more than `MAX_LEAVES` leaves is refused for that
        doc alone: `{"id", "rev", "error": "forbidden", "reason"}` (the others are written).
        A replicated attachment stub must name an attachment a leaf of the same document
        holds here, by its name and digest (or, without a digest, its revpos); else that doc
        fails with a `bad_request` "missing stub".
        The write is durable when the call returns (see `put`); replicated revisions that a
        CouchDB cluster keeps accepting below its write quorum raise `Unavailable` instead of
        counting as stored: the caller delivers them again later."""

    @abc.abstractmethod
    async def bulk_get(self, wanted: list[tuple[str, str]]) -> list[Doc]:
        """The given (id, rev) pairs with `_revisions`, ready for `bulk_docs(new_edits=False)`
        on another store. A pair this store does not have (or has stemmed) is skipped.
        Attachments come as stubs: a target that lacks one gets its data through
        `put_replicated`, streamed from `open_attachment(id, name, rev=rev)`."""

    @abc.abstractmethod
    async def changes(self, since: Seq = 0, *, limit: int | None = None) -> ChangesPage:
        """Documents changed after `since`, oldest first, one row per doc (its latest change),
        listing all leaf revisions. Local docs never appear.

        At-least-once: every doc changed after `since` is listed, and a doc seen before may be
        listed again (a CouchDB cluster replays part of its feed when it resumes elsewhere, and
        counts a re-sent known revision as an update)."""

    @abc.abstractmethod
    async def wait_for_change(self, since: Seq) -> None:
        """Return as soon as the feed has a change after `since` (immediately if it already
        has; possibly for a replayed change). Never polls in a busy loop; cancel it with a trio
        cancel scope. A connection cut mid-wait is retried a bounded number of times; a backend
        that stays unreachable raises `Unavailable`."""

    # -- local documents: checkpoints, never replicated, no revision tree --------------

    @abc.abstractmethod
    async def get_local(self, local_id: str) -> Doc:
        """The local doc `_local/<local_id>`; `NotFound` when missing."""

    @abc.abstractmethod
    async def put_local(self, local_id: str, doc: Doc) -> None:
        """Store (replace) a local doc; durable when the call returns. On a CouchDB cluster a
        local doc accepted below quorum (HTTP 202) counts as written: local docs are
        checkpoints, and one lost with a node only makes a replication re-send."""

    @abc.abstractmethod
    async def delete_local(self, local_id: str) -> None:
        """Remove a local doc; `NotFound` when missing."""

    # -- attachments (see plugshare/store/attachments.py) --------------------------------
    #
    # Documents show their attachments as stubs in `_attachments`: `{name: {"content_type",
    # "length", "digest": "md5-<base64>", "revpos", "stub": true}}`. A write that sends a
    # stub for a name keeps that attachment; one that leaves the name out removes it. Data
    # only moves through the methods below, in chunks: never whole in memory.

    @abc.abstractmethod
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
        """Stream `chunks` in as attachment `name` of the document at leaf `rev` (None: a
        new or deleted document, made live with this attachment alone) and return the new
        rev; the document's other attachments are kept. The md5 digest and length are
        computed as the data streams. A `digest` or `length` the caller declares that the
        data does not match is a `BadRequest`; a bad name (empty, `/`, `..`, a leading `_`)
        too, before anything is read. A stale `rev` is a `Conflict`. Whatever fails (a
        stream cut or raising, a mismatch, a cancel) leaves the document as it was."""

    @abc.abstractmethod
    async def open_attachment(
        self,
        doc_id: str,
        name: str,
        *,
        rev: str | None = None,
        range: tuple[int, int] | None = None,
    ) -> tuple[AttachmentMeta, AsyncIterator[bytes]]:
        """The attachment's metadata and its data as an async iterator of chunks, of the
        winning revision (or `rev`). `range` is `(start, stop)`, half-open byte offsets;
        one outside the file is `RangeNotSatisfiable`. A missing doc, rev or name is
        `NotFound`. Close the iterator (`aclose()`) when stopping before its end."""

    @abc.abstractmethod
    async def delete_attachment(self, doc_id: str, rev: str, name: str) -> str:
        """Remove attachment `name` from the document at leaf `rev`; the new rev.
        `NotFound` when the revision has no such attachment."""

    @abc.abstractmethod
    async def put_replicated(
        self, doc: Doc, streams: Mapping[str, AsyncIterable[bytes]], *, edit: bool = False
    ) -> None:
        """Write one replicated revision (as `bulk_docs(new_edits=False)`) with the data of
        its new attachments: each `_attachments` entry is a stub this store can resolve (the
        same name and digest on a revision of this document it holds) or `{"follows": true,
        "content_type", "length", "digest", "revpos"}` whose data `streams[name]` yields,
        checked against that digest and length. `bulk_get` gives stubs; the replicator
        streams each attachment the target lacks from `open_attachment`. Errors as
        `put_attachment`; an already known revision is a no-op (its streams are not read).
        A stub that cannot be resolved is a `BadRequest` ("missing stub").

        `edit`: the revision is an edit its caller made a replicated one (an app's edit
        with inline data): `Conflict`, writing nothing, unless the revision its `_revisions`
        names as parent is still the document's winner (no parent: the document does not
        exist), as for any edit, and never a second branch (`revtree.overtaken_edit`).
        The embedded store checks in the write's transaction; CouchDB has no conditional
        replicated write, so that backend checks just before it writes."""

    # -- attachments held without their data (a share fetched on read) ----------------------
    #
    # A member that fetches a share's attachment data on first read writes replicated
    # revisions with their stubs alone: each attachment it lacks is kept as an *absent*
    # entry (its metadata and a `source` tag), `open_attachment` raises `DataAbsent` for it,
    # and `fill_absent` brings its data in later, the revision unchanged. Only the embedded
    # store keeps them.

    keeps_absent_data = False  # whether this backend implements the methods below

    async def put_replicated_absent(self, doc: Doc, source: str) -> None:
        """Write a replicated revision (as `bulk_docs(new_edits=False)`) whose stubs this
        store cannot resolve: those attachments are kept without their data, tagged
        `source`. Stubs must carry `content_type`, `length`, `digest` and `revpos`."""
        raise StoreError(f"the {self.backend} store does not keep attachments without their data")

    async def absent_attachments(self, doc_id: str, rev: str) -> dict[str, str]:
        """The attachments of revision `rev` whose data is not held here: name -> source."""
        return {}

    async def absent_documents(self, limit: int = 1000) -> list[tuple[str, str]]:
        """Up to `limit` (doc id, leaf rev) whose leaf holds an attachment without its data."""
        return []

    async def fill_absent(self, doc_id: str, rev: str, name: str,
                          data: AsyncIterable[bytes]) -> bool:
        """Stream the data of absent attachment `name` of leaf `rev` in (checked against its
        digest and length; `BadRequest` otherwise); every leaf of the document that holds the
        same absent attachment gets it. False when it was not absent (anymore)."""
        raise StoreError(f"the {self.backend} store does not keep attachments without their data")

    # -- staged chunks: an incoming attachment transfer, resumable ---------------------------
    #
    # A replicated attachment arrives as SHA-256-addressed chunks of `CHUNK_SIZE` bytes (the
    # last shorter). The receiver stages each chunk durably as it arrives, and once it holds
    # them all writes the revision with `put_replicated`, streaming them back from staging;
    # then it releases them. A transfer cut by a crash resumes with only the chunks not yet
    # staged. Staged chunks are never garbage-collected before they are released.

    async def chunk_addresses(self, doc_id: str, name: str, rev: str) -> list[bytes] | None:
        """The SHA-256 of each `CHUNK_SIZE` chunk of attachment `name` of revision `rev`,
        when the backend keeps them (the embedded store does), else None: the caller then
        reads the data to hash it. `NotFound` as `open_attachment`."""
        _, data = await self.open_attachment(doc_id, name, rev=rev)
        await data.aclose()
        return None

    async def claim_chunks(self, hashes: list[bytes]) -> set[bytes]:
        """Stage every chunk of `hashes` this store already holds (by any attachment or an
        earlier transfer) and return those: they need not travel."""
        raise StoreError(f"the {self.backend} store does not stage attachment chunks")

    async def stage_chunks(self, pieces: list[bytes], *,
                           checked: list[bytes] | None = None) -> list[bytes]:
        """Store chunks of an incoming transfer, durably (in one write where the backend
        can); their SHA-256s, in order. `checked`: those SHA-256s, as the caller computed
        them while checking each piece against its address (then taken as they are, not
        computed again: a SHA-256 per chunk is a measurable share of a transfer's CPU)."""
        raise StoreError(f"the {self.backend} store does not stage attachment chunks")

    async def read_staged_chunk(self, digest: bytes) -> bytes:
        """A staged chunk's data; `NotFound` when it is not staged."""
        raise StoreError(f"the {self.backend} store does not stage attachment chunks")

    async def put_staged(self, doc: Doc, addresses: Mapping[str, list[bytes]], *,
                         digests: Mapping[str, str] | None = None, edit: bool = False) -> None:
        """`put_replicated` of `doc` (`edit` as there), the data of each attachment that
        `follows` being the staged chunks `addresses[name]`, in order (checked against its
        length and digest as ever). Here: streamed back from staging; the embedded store
        links them where they are. `NotFound` for a chunk that is not staged.

        `digests[name]`, where given, is the md5 digest of those chunks in order as the
        caller computed it while checking each against its address: a store that would read
        them back only to hash them may take it instead (the embedded one does)."""

        async def staged(hashes: list[bytes]) -> AsyncIterator[bytes]:
            for digest in hashes:
                yield await self.read_staged_chunk(digest)

        await self.put_replicated(doc, {name: staged(h) for name, h in addresses.items()},
                                  edit=edit)

    async def release_chunks(self, hashes: list[bytes], *, keep_staged: bool = False) -> None:
        """Release staged chunks (their transfer is done or abandoned), each as often as
        it was claimed or staged. A chunk another transfer of this process still holds stays
        staged (`staging.StagingHolds`); the others are unstaged, and those no attachment
        holds go. With `keep_staged` (a transfer to be tried again: it resumes) they all stay
        staged, until claimed and released again or expired (`expire_staged`)."""
        raise StoreError(f"the {self.backend} store does not stage attachment chunks")

    async def expire_staged(self, older_than: float) -> int:
        """Unstage every chunk no transfer has staged or claimed for `older_than` seconds
        and none of this process holds: what a transfer cut for good left (its node killed,
        or its share left, before it could resume). Those no attachment holds go; returns
        how many. A backend that cannot list its staged chunks keeps them (0)."""
        return 0

    async def reclaim_space(self) -> int:
        """Give the disk back the space of attachment data no longer held, where the
        backend keeps it in files of its own (the embedded store's packs); returns how many
        bytes. A server that compacts its own files has nothing to do here (0)."""
        return 0
