"""The store on a CouchDB server over HTTP (Apache CouchDB 2.x/3.x; pouchdb-server in tests).

The server owns the revision trees: it makes revisions, detects conflicts atomically, merges
replicated histories and stems them to `_revs_limit`. This module maps `base.Store` onto the
CouchDB HTTP API and smooths over where servers differ from the contract:

- input is checked client-side with the helpers the SQLite backend uses (`revtree.parse_doc`
  and friends), so both backends refuse the same things, and one bad doc in a batch never
  reaches the server (which would refuse the whole request);
- `_changes` rows, `_conflicts` and `_revs_diff` answers are normalised to the contract's
  order and shape (pouchdb-server lists leaves in tree order and omits `possible_ancestors`);
- `_local` docs need their current `_rev` to be updated on CouchDB; the store remembers the
  last one it saw and refetches it on a conflict, so callers simply replace them;
- `_design/` documents (which this store never writes) are left out of every answer;
- a server without `/{db}/_revs_limit` (stock pouchdb-server) or that will not let us set it
  is found out at open time: one warning, and histories are cut to `revs_limit` here;
- the server would store any number of sibling revisions: replicated writes that would take a
  doc over `MAX_LEAVES` leaves are refused here, per doc, before the batch is sent.

Apache CouchDB 3.x (clustered, even on one node) differs from pouchdb-server where a store
could slip (tests/store/test_couchdb_cluster.py, through tests/support/couch_proxy.py):

- a database has 2 shards by default and `_changes` keeps order only within a shard: it is
  created with `?q=1` (a server that refuses `q` gets a plain PUT);
- seqs are opaque strings that differ between two reads of the same state, and the feed is
  at-least-once (a node that resumes a feed may replay changes; re-sending a known revision
  counts as an update): seqs are only handed back, and a doc listed twice in one answer
  becomes one row, where it last stands;
- a write may be answered 202 Accepted (stored, but on fewer nodes than the write quorum):
  the store copies it again (`_ensure_quorum`, `_write_replicated`) and says what it could
  not make durable (see `Store.put` and `Store.bulk_docs`);
- the store may be given several URLs (a cluster's nodes): it stays on one while it answers
  and moves to the next on connection failures and 5xx (`_request`); a longpoll cut mid-way
  is asked again a bounded number of times before `wait_for_change` raises `Unavailable`.

HTTP goes through httpcore's async connection pool (httpx's own transport layer), which runs
natively on trio: requests are cancellable, and `aclose()` closes every connection. It costs
less client CPU per request than httpx.AsyncClient and keeps up with couchdb-python run in
worker threads, which could not be cancelled or closed (`python bench/store.py --clients`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import re
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from functools import partial
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlencode, urlsplit

import attrs
import httpcore
import trio

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
    Doc,
    Forbidden,
    NotFound,
    Seq,
    Store,
    StoreError,
    Unavailable,
    owner_mismatch,
)
from plugshare.store.edit_gate import EditGate
from plugshare.store.revtree import (
    DEFAULT_REVS_LIMIT,
    ParsedDoc,
    check_doc_id,
    check_local_id,
    history_of,
    overtaken_edit,
    parse_doc,
    parse_local_doc,
    parse_rev,
)
from plugshare.store.staging import StagingHolds, check_addresses

T = TypeVar("T")
R = TypeVar("R")

logger = logging.getLogger("plugshare.store")

CONNECT_TIMEOUT = 10.0  # seconds: an unreachable server fails within this
READ_TIMEOUT = 120.0  # a large _bulk_docs on a busy server can take a while
# The most of one answer read whole (JSON): a document as large as CouchDB's default
# max_document_size (8 MB) fits twice. Pages of documents over it are asked in halves.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
ALL_DOCS_PAGE = 1000  # docs per `_all_docs` page when listing them all
HEARTBEAT_MS = 10_000  # longpoll keep-alive newlines; a feed silent for 3x this is dead
KEEPALIVE_EXPIRY = 4.0  # below Node's 5 s server-side keep-alive: never reuse a closing socket
MAX_CONNECTIONS = 100  # every waiting `wait_for_change` holds one
LOCAL_WRITE_ATTEMPTS = 10  # a local doc rewritten concurrently this often is a Conflict
LEAF_QUERY_IDS = 100  # ids per `_changes?filter=_doc_ids` (CouchDB scans the feed above 100)

DESIGN_PREFIX = "_design/"
_DB_NAME = re.compile(r"[a-z][a-z0-9_$()+/-]*")
_JSON_HEADERS = [(b"Content-Type", b"application/json"), (b"Accept", b"application/json")]
_ERLANG_INTEGER = re.compile(r"[+-]?[0-9]+")  # what CouchDB's config reads as an integer
_UNSUPPORTED = (400, 404, 405, 501)  # how servers without an endpoint answer it
_REQUEST_FAILURES = (httpcore.NetworkError, httpcore.TimeoutException, httpcore.ProtocolError)
_NOT_SENT = (httpcore.ConnectError, httpcore.ConnectTimeout)  # the request never left
QUORUM_ATTEMPTS = 3  # sends of a write the server keeps answering 202 (below quorum)
QUORUM_RETRY_DELAY = 0.1  # seconds before the second send; doubles each time
FEED_RETRIES = 5  # longpolls cut in a row before `wait_for_change` gives up
FEED_RETRY_DELAY = 0.25  # seconds before asking again after the first cut; doubles each time
LOCAL_DOCS_PAGE = 500  # local ids per `_local_docs` request
RECORDS_PAGE = 64  # staging records, with their docs, per `_local_docs` request
RECORD_CHUNKS = 4096  # chunks one staging record names at most (a claim of more writes several)
# What one expiry looks at: whoever can write the database could add millions of records,
# or of chunks. Those beyond are not looked at (their chunks stay until a later expiry).
MAX_STAGING_RECORDS = 100_000
MAX_NAMED_CHUNKS = 262_144  # digests held in memory by one expiry (about 40 MB at most)
CLOCK_SKEW = 86_400.0  # seconds a staging record may seem to come from the future (clock set back)


@attrs.frozen
class _Written:
    data: Any  # the server's answer
    below_quorum: bool  # HTTP 202: not (yet) on a write quorum of a cluster's nodes


class CouchDBStore(Store):
    """A `Store` in one database of a CouchDB server. Open with `await CouchDBStore.open(...)`."""

    backend = "couchdb"

    def __init__(
        self,
        pool: httpcore.AsyncConnectionPool,
        nodes: list[tuple[str, list[tuple[bytes, bytes]]]],
        revs_limit: int,
    ):
        """Use `open()`; this takes a pool and, for each server (cluster node), the database's
        URL and the request headers, as `open()` prepared them."""
        self.revs_limit = revs_limit
        self._pool = pool
        # (database url: no trailing slash, no credentials, safe to show in messages;
        #  headers: JSON content type, and Basic auth when that node's url had a user)
        self._nodes = nodes
        self._node = 0  # the node in use; the next one is tried when it fails (sticky)
        self._local_revs: dict[str, str] = {}  # local id -> the last `_rev` seen
        self._history_limit: int | None = None  # set when the server cannot stem for us
        self._writes_below_quorum = 0  # writes returned though still short of a quorum
        self._closed = False
        self._holds = StagingHolds()  # staged chunks the transfers of this process hold
        self._staging = trio.Lock()
        self._edits = EditGate()  # its checked writes apart from its other edits
        self._said_unlisted = False  # warned once that the server has no `_local_docs`
        # Staging records this process wrote: local id -> (rev, chunks still staged).
        self._records: dict[str, tuple[str, set[bytes]]] = {}

    @property
    def _db_url(self) -> str:
        """The database's URL on the node in use (for messages)."""
        return self._nodes[self._node][0]

    @classmethod
    async def open(
        cls,
        url: str | list[str],
        db_name: str,
        *,
        revs_limit: int = DEFAULT_REVS_LIMIT,
        owner: str | None = None,
    ) -> CouchDBStore:
        """Connect to the server at `url` (`http[s]://[user:password@]host[:port][/prefix]`),
        create database `db_name` if it is missing (with one shard, `?q=1`, so its changes
        feed keeps one order) and set its `_revs_limit`.

        `url` may be a list: the nodes of one CouchDB cluster. Requests go to the first one
        while it answers; a node that refuses connections or answers 5xx is left for the
        next one (for good: the store stays on a node while it is healthy).

        A server without `_revs_limit` (a stock pouchdb-server), or one that does not let us
        set it, keeps its own stemming: one warning says so, and this store cuts the histories
        it sends and hands out to `revs_limit` revisions itself.

        With `owner` (a node id) the database is recorded as that node's when first opened so
        (`_local/plugshare-owner`), and one recorded as another node's is refused with
        `OwnerMismatch`."""
        if type(revs_limit) is not int or revs_limit < 1:
            raise BadRequest(f"revs_limit must be an integer >= 1, not {revs_limit!r}")
        if owner is not None and (not isinstance(owner, str) or not owner):
            raise BadRequest(f"owner must be a node id, not {owner!r}")
        if not isinstance(db_name, str) or _DB_NAME.fullmatch(db_name) is None:
            raise BadRequest(
                f"invalid CouchDB database name {db_name!r}: it must match [a-z][a-z0-9_$()+/-]*"
            )
        urls = [url] if isinstance(url, str) else url
        if not isinstance(urls, list) or not urls:
            raise BadRequest(f"the CouchDB url must be a url or a list of urls, not {url!r}")
        nodes = []
        for node_url in urls:
            server_url, headers = _parse_server_url(node_url)
            nodes.append((server_url + "/" + quote(db_name, safe=""), headers))
        pool = httpcore.AsyncConnectionPool(
            max_connections=MAX_CONNECTIONS, keepalive_expiry=KEEPALIVE_EXPIRY
        )
        store = cls(pool, nodes, revs_limit)
        try:
            await store._refuse_compression()  # before anything is made on the server
            await store._create_database()
            if owner is not None:
                await store._claim(db_name, owner)
            await store._set_revs_limit()
        except BaseException:
            await store.aclose()
            raise
        return store

    async def _set_revs_limit(self) -> None:
        """Make the server stem to `revs_limit`, or else stem histories on our side."""
        status, data = await self._request("GET", "/_revs_limit")
        if status in _UNSUPPORTED:
            self._stem_here(f"it has no _revs_limit (GET answered {_detail(status, data)})")
            return
        if status >= 400:
            raise self._error(status, data, "read the database's _revs_limit")
        if data == self.revs_limit:
            return
        status, data = await self._request("PUT", "/_revs_limit", body=self.revs_limit)
        if status in _UNSUPPORTED or status in (401, 403):
            self._stem_here(
                f"it did not let us set _revs_limit to {self.revs_limit} "
                f"(PUT answered {_detail(status, data)})"
            )
        elif status >= 400:
            raise self._error(status, data, "set the database's _revs_limit")

    async def _refuse_compression(self) -> None:
        """Refuse a server that stores some attachments gzip-encoded: Apache CouchDB does so
        for the types of `[attachments] compressible_types` (text/* and JSON by default,
        also when the setting is unset or empty, as an empty value reads after a restart)
        unless `compression_level` is 0. It gives them the digest of the compressed bytes,
        which no peer can check against the file, so their sync would fail. A server
        without that configuration (pouchdb-server) never compresses; one that does not show
        it to these credentials is taken as it is, with a warning."""
        status, data = await self._request("GET", "/_membership", server=True)
        nodes = data.get("all_nodes") if status == 200 and isinstance(data, dict) else None
        compressing, unread = [], []
        for node in nodes if isinstance(nodes, list) and nodes else ["_local"]:
            path = f"/_node/{quote(str(node), safe='')}/_config/attachments"
            status, section = await self._request("GET", path, server=True)
            if status in (401, 403):
                unread.append(str(node))
            elif status == 200 and isinstance(section, dict) and \
                    (compression := _compression(section)) is not None:
                compressing.append(f"{node}: {compression}")
        if compressing:
            raise StoreError(
                f"CouchDB at {self._db_url} stores some attachments gzip-encoded ([attachments] "
                f"{'; '.join(compressing)}), with the digest of the compressed bytes, which the "
                "node's peers cannot check. Turn it off on every CouchDB node: curl -X PUT "
                "http://ADMIN:PASSWORD@HOST:5984/_node/_local/_config/attachments/"
                "compression_level -d '\"0\"' (files stored compressed before keep that "
                "digest)")
        if unread:
            logger.warning(
                "CouchDB at %s: these credentials cannot read whether %s compress "
                "attachments ([attachments] compression_level); if they do, files of the "
                "compressible types will not sync to peers", self._db_url, ", ".join(unread))

    def _stem_here(self, why: str) -> None:
        self._history_limit = self.revs_limit
        logger.warning(
            "CouchDB at %s: %s; the server keeps its own revision stemming, and this store "
            "cuts the histories it sends and hands out to %d revisions",
            self._db_url, why, self.revs_limit,
        )

    def _stemmed(self, doc: Doc) -> Doc:
        """`doc` with its `_revisions` cut to the limit the server could not be given."""
        limit = self._history_limit
        revisions = doc.get("_revisions")
        if limit is not None and isinstance(revisions, dict) and len(revisions["ids"]) > limit:
            doc["_revisions"] = {"start": revisions["start"], "ids": revisions["ids"][:limit]}
        return doc

    async def _claim(self, db_name: str, owner: str) -> None:
        """Record `owner` as the node the database belongs to, or check it is the one
        recorded. Creating the record never overwrites one (two nodes claiming at once: the
        second one's create fails, and it reads who won)."""
        path = _local_path(OWNER_LOCAL_ID)
        for _ in range(LOCAL_WRITE_ATTEMPTS):
            status, data = await self._request("GET", path)
            if status == 200 and isinstance(data, dict):
                if data.get("node_id") != owner:
                    raise owner_mismatch("database", db_name, data.get("node_id"), "database")
                self._local_revs[OWNER_LOCAL_ID] = data["_rev"]
                return
            if status != 404:
                raise self._error(status, data, "read the database's owner")
            status, data = await self._request("PUT", path, body={"node_id": owner})
            if status == 409:  # claimed meanwhile: read by whom
                continue
            if status >= 400:
                raise self._error(status, data, "record the database's owner")
            self._local_revs[OWNER_LOCAL_ID] = data["rev"]
            return
        raise Conflict(f"the owner record of database {db_name} kept changing")

    async def _create_database(self) -> None:
        """Create the database with a single shard: CouchDB (3.x) makes 2 by default, and a
        changes feed merged from several shards keeps no order across them. A server that
        refuses `q` (not a CouchDB cluster) gets the plain request."""
        status, data = await self._request("GET", "")
        if status == 404:
            status, data = await self._request("PUT", "", params={"q": "1"})
            if status == 400:
                status, data = await self._request("PUT", "")
            if status == 412:  # made meanwhile by someone else
                return
        if status >= 400:
            raise self._error(status, data, "open the database")

    async def aclose(self) -> None:
        self._closed = True
        await self._pool.aclose()

    async def info(self) -> dict[str, Any]:
        info = await self._call("GET", "")
        # CouchDB counts design documents too; this store's documents never include them.
        design = await self._call(
            "GET", "/_all_docs", params={"startkey": '"_design/"', "endkey": '"_design0"'}
        )
        doc_count = info["doc_count"] - len(design["rows"])
        return {"backend": self.backend, "doc_count": doc_count, "update_seq": info["update_seq"],
                "database": self._db_url.rsplit("/", 1)[-1],
                "writes_below_quorum": self._writes_below_quorum}

    async def update_seq(self) -> Seq:
        return (await self._call("GET", ""))["update_seq"]  # without info()'s design-doc count

    # -- documents ------------------------------------------------------------------------

    async def put(self, doc: Doc) -> str:
        parsed = parse_doc(doc)
        if parsed.is_local:
            return await self._write_local_doc(parsed)
        completed = await self._complete_stubs(parsed)
        if isinstance(completed, StoreError):
            raise completed
        parsed = completed
        async with self._edits.ordinary([parsed.id]):
            answer = await self._write(
                "PUT", _doc_path(parsed.id), body=_wire_doc(parsed),
                action=f"write {parsed.id!r}",
            )
        if answer.below_quorum:
            await self._ensure_quorum([(parsed.id, answer.data["rev"])])
        return answer.data["rev"]

    async def get(
        self, doc_id: str, *, rev: str | None = None, conflicts: bool = False, revs: bool = False
    ) -> Doc:
        check_doc_id(doc_id)
        if doc_id.startswith(LOCAL_PREFIX):
            return await self.get_local(doc_id[len(LOCAL_PREFIX) :])
        params = {}
        if rev is not None:
            parse_rev(rev)
            params["rev"] = rev
        if conflicts:
            params["conflicts"] = "true"
        if revs:
            params["revs"] = "true"
        doc = await self._call("GET", _doc_path(doc_id), params=params, action=f"get {doc_id!r}")
        if "_conflicts" in doc:
            doc["_conflicts"] = _live_winner_order(doc["_conflicts"])
        return self._stemmed(doc)

    async def delete(self, doc_id: str, rev: str) -> str:
        check_doc_id(doc_id)
        if doc_id.startswith(LOCAL_PREFIX):
            await self.delete_local(doc_id[len(LOCAL_PREFIX) :])
            return "0-0"
        parse_rev(rev)
        async with self._edits.ordinary([doc_id]):
            answer = await self._write(
                "DELETE", _doc_path(doc_id), params={"rev": rev}, action=f"delete {doc_id!r}"
            )
        if answer.below_quorum:
            await self._ensure_quorum([(doc_id, answer.data["rev"])])
        return answer.data["rev"]

    async def _winner_rev(self, doc_id: str) -> str | None:
        """The winning revision of `doc_id`, a deleted one too; None when it does not exist."""
        answer = await self._call("POST", "/_all_docs", body={"keys": [doc_id]})
        [row] = answer["rows"]
        return (row.get("value") or {}).get("rev")

    async def compact(self) -> None:
        """Ask the server to compact the database (it does so in the background)."""
        await self._call("POST", "/_compact", body={})

    async def winners(self, doc_ids: list[str], *, tombstones: bool = False) -> dict[str, Doc]:
        for doc_id in doc_ids:
            check_doc_id(doc_id)
        if not doc_ids:
            return {}
        rows = await self._in_halves(list(dict.fromkeys(doc_ids)), self._rows_with_docs)
        found = {row["id"]: row["doc"] for row in rows
                 if row.get("doc") and not row.get("value", {}).get("deleted")}
        # A deleted doc's row names its winning tombstone (no body): read it.
        deleted = [(row["id"], row["value"]["rev"]) for row in rows
                   if tombstones and isinstance(row.get("value"), dict)
                   and row["value"].get("deleted") and isinstance(row["value"].get("rev"), str)]
        for doc in await self.bulk_get(deleted) if deleted else []:
            if doc.get("_deleted") is True:
                found[doc["_id"]] = {k: v for k, v in doc.items() if k != "_revisions"}
        return found

    async def all_docs(self) -> list[Doc]:
        # In pages by id, each answer under the cap: a page over it is asked again smaller.
        # A page starts at the last id of the one before (its row, if still there, is
        # dropped): `skip=1` would skip another doc if that one was deleted meanwhile.
        docs: list[Doc] = []
        limit, last = ALL_DOCS_PAGE, None
        while True:
            params = {"include_docs": "true", "limit": str(limit)}
            if last is not None:
                params["startkey"] = json.dumps(last)
            try:
                answer = await self._call("GET", "/_all_docs", params=params)
            except ResponseTooLarge:
                if limit <= 2:  # two docs of over half the cap each, after each other
                    raise
                limit //= 2
                continue
            rows = answer["rows"]
            docs += [row["doc"] for row in rows
                     if row["id"] != last and not _is_design(row["id"])]
            if len(rows) < limit:
                break
            last = rows[-1]["id"]
        # Servers collate ids differently (CouchDB raw bytes, PouchDB UTF-16): code point order.
        docs.sort(key=lambda doc: doc["_id"])
        return docs

    # -- replication ----------------------------------------------------------------------

    async def revs_diff(self, revs: dict[str, list[str]]) -> dict[str, dict[str, list[str]]]:
        if not isinstance(revs, dict):
            raise BadRequest("revs_diff takes {doc id: [rev, ...]}")
        for doc_id, doc_revs in revs.items():
            check_doc_id(doc_id)
            if not isinstance(doc_revs, list):
                raise BadRequest(f"revs_diff: the revs of {doc_id!r} must be a list")
            for rev in doc_revs:
                parse_rev(rev)
        asked = {doc_id: doc_revs for doc_id, doc_revs in revs.items() if doc_revs}
        if not asked:
            return {}
        answer = await self._call("POST", "/_revs_diff", body=asked)
        diff: dict[str, dict[str, list[str]]] = {}
        for doc_id, entry in answer.items():
            missing = set(entry.get("missing", ()))
            if missing:
                diff[doc_id] = {
                    "missing": [rev for rev in dict.fromkeys(asked[doc_id]) if rev in missing],
                    # CouchDB leaves the key out when there are none.
                    "possible_ancestors": entry.get("possible_ancestors", []),
                }
        return diff

    async def bulk_docs(self, docs: list[Doc], *, new_edits: bool = True) -> list[dict[str, Any]]:
        if not isinstance(docs, list):
            raise BadRequest("bulk_docs takes a list of documents")
        results: list[dict[str, Any] | None] = [None] * len(docs)
        remote: list[tuple[int, ParsedDoc]] = []
        for i, doc in enumerate(docs):
            try:
                parsed = parse_doc(doc, new_edits=new_edits)
                if parsed.is_local:
                    results[i] = _ok(parsed.id, await self._write_local_doc(parsed))
                else:
                    remote.append((i, parsed))
            except StoreError as exc:
                doc_id = doc.get("_id") if isinstance(doc, dict) else None
                results[i] = _failed(doc_id, exc.error, exc.reason)
        checked: list[tuple[int, ParsedDoc | StoreError]]
        if new_edits:
            checked = [(i, await self._complete_stubs(parsed)) for i, parsed in remote]
        else:
            checked = await self._complete_replicated_stubs(remote)
        remote = []
        for i, parsed_or_error in checked:
            if isinstance(parsed_or_error, StoreError):
                results[i] = _failed(docs[i].get("_id"), parsed_or_error.error,
                                     parsed_or_error.reason)
            else:
                remote.append((i, parsed_or_error))
        if remote and not new_edits:
            remote, refused = await self._cap_leaves(remote)
            for i, parsed, reason in refused:
                results[i] = {"id": parsed.id, "rev": parsed.rev, "error": "forbidden",
                              "reason": reason}
        if remote:
            wire = [
                _wire_doc(parsed, with_history=not new_edits, limit=self._history_limit)
                for _, parsed in remote
            ]
            body = {"docs": wire, "new_edits": new_edits}
            if new_edits:
                async with self._edits.ordinary(parsed.id for _, parsed in remote):
                    written = await self._write("POST", "/_bulk_docs", body=body)
                answer = written.data
                # One answer per doc, in order: {"id", "rev", "ok"} or {"id", "error", "reason"}.
                for (i, parsed), entry in zip(remote, answer, strict=True):
                    results[i] = _bulk_result(parsed.id, entry)
                if written.below_quorum:
                    made = [results[i] for i, _ in remote]  # not the local docs
                    await self._ensure_quorum([(r["id"], r["rev"]) for r in made if r.get("ok")])
            else:
                answer = await self._write_replicated(body)
                # Only failures are listed (CouchDB >= 2, PouchDB); match them by (id, rev).
                failures = {(e.get("id"), e.get("rev")): e for e in answer if "error" in e}
                for i, parsed in remote:
                    failure = failures.get((parsed.id, parsed.rev))
                    results[i] = (
                        _ok(parsed.id, parsed.rev)
                        if failure is None
                        else _bulk_result(parsed.id, failure)
                    )
        return results  # type: ignore[return-value]  # every slot is filled above

    async def _cap_leaves(
        self, remote: list[tuple[int, ParsedDoc]]
    ) -> tuple[list[tuple[int, ParsedDoc]], list[tuple[int, ParsedDoc, str]]]:
        """Split replicated revisions into those to send and those refused because they
        would give their doc more than `MAX_LEAVES` leaves (with the reason), as the SQLite
        backend refuses them: the server would take them all, however many.

        Costs one `_changes` request per `LEAF_QUERY_IDS` ids (the leaves of the docs in the
        batch, no bodies) and, only for docs the batch could take over the cap, one
        `_revs_diff` to tell revisions the server already has (no-ops) from new ones."""
        ids = list(dict.fromkeys(parsed.id for _, parsed in remote))
        leaves = await self._leaves(ids)
        delivered = Counter(parsed.id for _, parsed in remote)
        at_risk = {doc_id for doc_id in ids
                   if len(leaves.get(doc_id, ())) + delivered[doc_id] > MAX_LEAVES}
        if not at_risk:
            return remote, []
        asked: dict[str, list[str]] = {}
        for _, parsed in remote:
            if parsed.id in at_risk:
                asked.setdefault(parsed.id, []).append(parsed.rev)  # type: ignore[arg-type]
        diff = await self._call("POST", "/_revs_diff", body=asked)
        missing = {(doc_id, rev) for doc_id, entry in diff.items()
                   for rev in entry.get("missing", ())}
        kept: list[tuple[int, ParsedDoc]] = []
        refused: list[tuple[int, ParsedDoc, str]] = []
        for i, parsed in remote:
            if parsed.id not in at_risk:
                kept.append((i, parsed))
                continue
            assert parsed.path is not None
            current = leaves.setdefault(parsed.id, set())
            new = (parsed.id, parsed.rev) in missing and parsed.rev not in current
            ended = [rev for rev in parsed.path[1:] if rev in current]
            growth = int(new) - len(ended)
            if growth > 0 and len(current) + growth > MAX_LEAVES:
                refused.append((i, parsed, (
                    f"revision {parsed.rev} would give the document more than {MAX_LEAVES} "
                    "leaf revisions (conflicts); resolve its conflicts first"
                )))
                continue
            current.difference_update(ended)
            if new:
                current.add(parsed.rev)  # type: ignore[arg-type]
                missing.discard((parsed.id, parsed.rev))  # a re-delivery in this batch: known
            kept.append((i, parsed))
        return kept, refused

    async def _leaves(self, doc_ids: list[str]) -> dict[str, set[str]]:
        """Every leaf revision (live or deleted) of each of `doc_ids` that exists."""
        leaves: dict[str, set[str]] = {}
        for start in range(0, len(doc_ids), LEAF_QUERY_IDS):
            answer = await self._call(
                "POST", "/_changes", params={"filter": "_doc_ids", "style": "all_docs"},
                body={"doc_ids": doc_ids[start : start + LEAF_QUERY_IDS]},
            )
            for row in answer["results"]:
                leaves[row["id"]] = {change["rev"] for change in row["changes"]}
        return leaves

    async def bulk_get(self, wanted: list[tuple[str, str]]) -> list[Doc]:
        pairs = []
        for pair in wanted:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise BadRequest(f"bulk_get takes (id, rev) pairs, not {pair!r}")
            doc_id, rev = pair
            check_doc_id(doc_id)
            parse_rev(rev)
            pairs.append({"id": doc_id, "rev": rev})
        if not pairs:
            return []
        return [self._stemmed(doc) for doc in await self._in_halves(pairs, self._bulk_get)]

    async def _bulk_get(self, pairs: list[dict[str, str]]) -> list[Doc]:
        answer = await self._call(
            "POST", "/_bulk_get", params={"revs": "true"}, body={"docs": pairs}
        )
        # Each result holds {"ok": doc}, or {"error": ...} / {"missing": rev} for what is not here.
        return [item["ok"] for result in answer["results"] for item in result["docs"]
                if "ok" in item]

    async def _rows_with_docs(self, doc_ids: list[str], **params: str) -> list[dict[str, Any]]:
        """`_all_docs` rows of `doc_ids`, with their winning docs."""
        answer = await self._call("POST", "/_all_docs", params={"include_docs": "true", **params},
                                  body={"keys": doc_ids})
        return answer["rows"]

    async def _in_halves(self, items: list[T], read: Callable[[list[T]], Awaitable[list[R]]]
                         ) -> list[R]:
        """`read(items)`; when its answer is over the cap, each half of `items` read apart
        (down to one item, whose answer over the cap is the error)."""
        try:
            return await read(items)
        except ResponseTooLarge:
            if len(items) <= 1:
                raise
            half = len(items) // 2
            return await self._in_halves(items[:half], read) + await self._in_halves(items[half:], read)

    async def changes(self, since: Seq = 0, *, limit: int | None = None) -> ChangesPage:
        params = {"style": "all_docs", "since": _seq_param(since)}
        if limit is not None:
            if type(limit) is not int or limit < 1:
                raise BadRequest(f"limit must be a positive integer or None, not {limit!r}")
            params["limit"] = str(limit)
        answer = await self._call("GET", "/_changes", params=params)
        rows = _latest_row_per_doc(
            [row for row in answer["results"] if not _is_design(row["id"])]
        )
        winners = await self._winners(
            [row["id"] for row in rows if len(row["changes"]) > 1 and not row.get("deleted")]
        )
        results = [
            Change(
                seq=row["seq"],
                id=row["id"],
                revs=_leaves_in_winner_order(
                    [c["rev"] for c in row["changes"]], winners.get(row["id"])
                ),
                deleted=bool(row.get("deleted", False)),
            )
            for row in rows
        ]
        return ChangesPage(results, answer["last_seq"])

    async def _winners(self, doc_ids: list[str]) -> dict[str, tuple[str, list[str]]]:
        """For live conflicted docs: (winning rev, live losing revs). `_changes` does not say
        which leaves are tombstones, and pouchdb-server does not list the winner first."""
        if not doc_ids:
            return {}
        rows = await self._in_halves(doc_ids, partial(self._rows_with_docs, conflicts="true"))
        return {
            row["id"]: (row["value"]["rev"], row["doc"].get("_conflicts", []))
            for row in rows
            if "value" in row and row.get("doc")
        }

    async def wait_for_change(self, since: Seq) -> None:
        """A longpoll on `_changes`. A feed cut off (the server restarted, a connection reset,
        a node failed over) is asked again, `FEED_RETRIES` times in a row at most, waiting
        longer each time; a server that stays away raises `Unavailable` (a `StoreError`)."""
        since = _seq_param(since)
        failures = 0
        while True:
            # With a heartbeat the server keeps the request open (sending newlines) until a
            # change comes; a connection silent for three heartbeats is taken as dead.
            try:
                answer = await self._call(
                    "GET",
                    "/_changes",
                    params={"feed": "longpoll", "since": since, "limit": "1",
                            "heartbeat": str(HEARTBEAT_MS)},
                    read_timeout=3 * HEARTBEAT_MS / 1000,
                )
            except Unavailable as exc:
                failures += 1
                if failures > FEED_RETRIES:
                    raise Unavailable(
                        f"the changes feed of {self._db_url} failed {failures} times in a row: "
                        f"{exc.reason}"
                    ) from exc
                logger.info("CouchDB changes feed cut (%s); asking again", exc.reason)
                await trio.sleep(FEED_RETRY_DELAY * 2 ** (failures - 1))
                continue
            failures = 0
            if any(not _is_design(row["id"]) for row in answer["results"]):
                return
            since = _seq_param(answer["last_seq"])

    # -- attachments ----------------------------------------------------------------------
    #
    # Real CouchDB attachments, so other CouchDB clients see them: `PUT /db/doc/name?rev=`
    # streamed, `GET` streamed, `DELETE`. An upload is spooled to a temporary file and checked
    # (digest, length, a cut stream) before the server sees a byte of it: pouchdb-server
    # 4.2.0 writes an empty attachment when a request body is cut short, so a check that
    # failed half-way through the request would leave a new revision behind.
    # Replicated revisions with new attachment data go as one `_bulk_docs` new_edits=false,
    # the data inline as base64, the JSON body generated from the spool files as it is
    # sent: the form both pouchdb-server 4.2.0 and CouchDB 3 take (`follows` parts need a
    # multipart/related PUT per document; not tried). This process never holds a file
    # whole; the server may (pouchdb-server buffers every attachment body, and CouchDB
    # decodes a JSON body whole).

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
        # Fail a stale rev before the upload (pouchdb-server would even make the doc anew
        # on a rev of a missing doc).
        if rev is not None and rev not in (await self._leaves([doc_id])).get(doc_id, ()):
            raise Conflict(f"revision {rev} of {doc_id!r} is not current")
        async with _spooled(chunks, check) as spool, self._edits.ordinary([doc_id]):
            if rev is None:
                # A new document, or one recreated over a tombstone: the doc with its data
                # inline, in one write (pouchdb-server's attachment PUT without a rev
                # answers 404 on a deleted doc).
                body_length, body = _streamed_doc_body(
                    {"_id": doc_id}, {}, {name: ({"content_type": content_type}, check.length)},
                    {name: spool}, replicated=False,
                )
                status, data = await self._send_stream(
                    "PUT", _doc_path(doc_id), body,
                    [(b"Content-Type", b"application/json"),
                     (b"Content-Length", str(body_length).encode())],
                )
            else:
                headers = [(b"Content-Type", content_type.encode()),
                           (b"Content-Length", str(check.length).encode())]
                status, data = await self._send_stream(
                    "PUT", _attachment_path(doc_id, name), _read_spool(spool), headers,
                    params={"rev": rev},
                )
        if status >= 400:
            if status == 404 and rev is not None:  # no such doc or revision to write on
                status = 409
            raise self._error(status, data, f"put attachment {name!r} of {doc_id!r}")
        if status == 202:
            await self._ensure_quorum([(doc_id, data["rev"])])
        return data["rev"]

    async def open_attachment(
        self,
        doc_id: str,
        name: str,
        *,
        rev: str | None = None,
        range: tuple[int, int] | None = None,
    ) -> tuple[AttachmentMeta, AsyncIterator[bytes]]:
        check_doc_id(doc_id)
        check_attachment_name(name)
        params = {}
        if rev is not None:
            parse_rev(rev)
            params["rev"] = rev
        doc = await self._call("GET", _doc_path(doc_id), params=params, action=f"get {doc_id!r}")
        if doc.get("_deleted"):
            raise NotFound(f"revision {doc['_rev']} of {doc_id!r} is deleted")
        entry = (doc.get("_attachments") or {}).get(name)
        if entry is None:
            raise NotFound(f"revision {doc['_rev']} of {doc_id!r} has no attachment {name!r}")
        meta = AttachmentMeta(name, entry["content_type"], entry["length"], entry["digest"],
                              entry["revpos"])
        start, stop = check_range(range, meta.length)
        return meta, self._read_attachment(doc_id, name, doc["_rev"], start, stop)

    async def _read_attachment(
        self, doc_id: str, name: str, rev: str, start: int, stop: int
    ) -> AsyncIterator[bytes]:
        """Bytes `start` to `stop` of the attachment, as the server sends them. A server
        that ignores `Range` (pouchdb-server) sends the whole file: the bytes outside the
        range are skipped as they come, never kept."""
        if stop == 0:
            return
        db_url, headers = self._nodes[self._node]
        headers = [h for h in headers if h[0] != b"Accept"] + [(b"Accept", b"*/*")]
        headers.append((b"Range", f"bytes={start}-{stop - 1}".encode()))
        url = db_url + _attachment_path(doc_id, name) + "?" + urlencode({"rev": rev})
        try:
            async with self._pool.stream("GET", url, headers=headers,
                                         extensions={"timeout": _timeouts()}) as response:
                if response.status >= 400:
                    body = b"".join([piece async for piece in _bounded(response, 64 * 1024)])
                    try:
                        data = json.loads(body)
                    except ValueError:
                        data = None
                    raise self._error(response.status, data, f"read attachment {name!r}")
                offset = start if response.status == 206 else 0
                async for piece in response.aiter_stream():
                    lo, hi = max(start - offset, 0), min(stop - offset, len(piece))
                    offset += len(piece)
                    if lo < hi:
                        yield piece[lo:hi]
                    if offset >= stop:
                        break
        except _REQUEST_FAILURES as exc:
            raise Unavailable(
                f"CouchDB at {db_url}: reading attachment {name!r} of {doc_id!r} failed "
                f"({type(exc).__name__}: {exc})"
            ) from exc

    async def delete_attachment(self, doc_id: str, rev: str, name: str) -> str:
        _check_attachment_target(doc_id, rev, name)
        # pouchdb-server answers 500 for a name the revision lacks: look first.
        doc = await self._call("GET", _doc_path(doc_id), params={"rev": rev},
                               action=f"get {doc_id!r}")
        if name not in (doc.get("_attachments") or {}):
            raise NotFound(f"revision {rev} of {doc_id!r} has no attachment {name!r}")
        async with self._edits.ordinary([doc_id]):
            answer = await self._write(
                "DELETE", _attachment_path(doc_id, name), params={"rev": rev},
                action=f"delete attachment {name!r} of {doc_id!r}",
            )
        if answer.below_quorum:
            await self._ensure_quorum([(doc_id, answer.data["rev"])])
        return answer.data["rev"]

    async def put_replicated(
        self, doc: Doc, streams: Mapping[str, AsyncIterable[bytes]], *, edit: bool = False
    ) -> None:
        parsed = parse_doc(doc, new_edits=False)
        follows = {n: s for n, s in parsed.attachments.items() if isinstance(s, Follows)}
        if set(streams) != set(follows):
            raise BadRequest(
                f"document {parsed.id!r}: streams given for {sorted(streams)}, but the "
                f"attachments that follow are {sorted(follows)}"
            )
        assert parsed.rev is not None
        files: dict[str, Any] | None = None
        async with contextlib.AsyncExitStack() as spools:

            async def spooled() -> dict[str, Any]:
                """Each stream that follows, in a checked spool file (read once)."""
                nonlocal files
                if files is None:
                    files = {name: await spools.enter_async_context(_spooled(
                        streams[name], StreamCheck(digest=spec.digest, length=spec.length)))
                        for name, spec in follows.items()}
                return files

            if not edit:
                await self._write_with_data(parsed, follows, spooled)
                return
            # No conditional replicated write in CouchDB: an edit is checked just before,
            # its data in already (an upload takes its time), and no other edit of this
            # process lands between the check and the write (edit_gate.py).
            await spooled()
            async with self._edits.checked(parsed.id):
                if overtaken := overtaken_edit(parsed, await self._winner_rev(parsed.id)):
                    raise overtaken
                await self._write_with_data(parsed, follows, spooled)

    async def _write_with_data(
        self, parsed: ParsedDoc, follows: Mapping[str, Follows],
        spooled: Callable[[], Awaitable[dict[str, Any]]],
    ) -> None:
        """`put_replicated`'s write: `spooled()` gives the spool file of each attachment that
        follows, asked for only when the server lacks the revision."""
        assert parsed.rev is not None
        diff = await self.revs_diff({parsed.id: [parsed.rev]})
        stubs = {n: Stub(s.digest, s.revpos) if isinstance(s, Follows) else s
                 for n, s in parsed.attachments.items()}
        if not diff or not follows:  # known (its data is not read again), or nothing to send
            [result] = await self.bulk_docs(
                [_replicated_doc(attrs.evolve(parsed, attachments=stubs))], new_edits=False
            )
            if "error" in result:
                raise _result_error(result)
            return
        [(_, checked)] = await self._complete_replicated_stubs(
            [(0, attrs.evolve(parsed, attachments={
                n: s for n, s in parsed.attachments.items() if isinstance(s, Stub)}))]
        )
        if isinstance(checked, StoreError):
            raise checked
        _, refused = await self._cap_leaves([(0, parsed)])
        if refused:
            raise Forbidden(refused[0][2])
        wire = _wire_doc(attrs.evolve(parsed, attachments={}), with_history=True,
                         limit=self._history_limit)
        files = await spooled()
        # Sent again (from the spool files) while the server answers 202, as
        # `_write_replicated` does; still below quorum: `Unavailable`.
        for attempt in range(QUORUM_ATTEMPTS):
            if attempt:
                await trio.sleep(QUORUM_RETRY_DELAY * 2 ** (attempt - 1))
            for file in files.values():
                await file.seek(0)
            inline = {name: ({"content_type": spec.content_type, "revpos": spec.revpos,
                              "digest": spec.digest, "length": spec.length}, spec.length)
                      for name, spec in follows.items()}
            length, body = _streamed_doc_body(
                wire, checked.attachments, inline, files, replicated=True
            )
            status, data = await self._send_stream(
                "POST", "/_bulk_docs", body,
                [(b"Content-Type", b"application/json"),
                 (b"Content-Length", str(length).encode())],
            )
            if status >= 400:
                raise self._error(status, data, f"write replicated {parsed.id!r}")
            for entry in data or []:
                if "error" in entry:
                    raise _result_error(_bulk_result(parsed.id, entry))
            if status != 202:
                return
        raise Unavailable(
            f"CouchDB at {self._db_url} accepted {parsed.id!r} {parsed.rev} on fewer nodes "
            f"than its write quorum (HTTP 202), {QUORUM_ATTEMPTS} times; deliver it again"
        )

    async def _complete_stubs(self, parsed: ParsedDoc) -> ParsedDoc | StoreError:
        """A doc written here with stubs: each stub completed from the parent revision
        (pouchdb-server refuses a bare `{"stub": true}`), or the doc's error."""
        if not parsed.attachments:
            return parsed
        parent = {}
        if parsed.rev is not None:
            status, data = await self._request(
                "GET", _doc_path(parsed.id), params={"rev": parsed.rev}
            )
            if status == 200 and isinstance(data, dict):
                parent = data.get("_attachments") or {}
            elif status != 404:
                return self._error(status, data, f"get {parsed.id!r}")
        completed: dict[str, Any] = {}
        for name, spec in parsed.attachments.items():
            entry = parent.get(name)
            if entry is None or (spec.digest is not None and spec.digest != entry["digest"]):
                return BadRequest(
                    f"document {parsed.id!r}: missing stub: the revision has no attachment "
                    f"{name!r}"
                )
            completed[name] = entry
        return attrs.evolve(parsed, attachments=completed)

    async def _complete_replicated_stubs(
        self, remote: list[tuple[int, ParsedDoc]]
    ) -> list[tuple[int, ParsedDoc | StoreError]]:
        """Replicated docs with stubs: each stub must name an attachment (`Stub.matches`)
        a leaf of the same document holds here, as the SQLite store requires (a server may
        resolve a digest from any document, or keep a stub whose data it lacks); it is sent
        with that attachment's metadata (pouchdb-server keeps a stub as sent)."""
        out: list[tuple[int, ParsedDoc | StoreError]] = []
        leaves_of: dict[str, list[dict[str, Any]]] = {}
        for i, parsed in remote:
            if not parsed.attachments:
                out.append((i, parsed))
                continue
            if parsed.id not in leaves_of:
                status, data = await self._request(
                    "GET", _doc_path(parsed.id), params={"open_revs": "all"}
                )
                if status == 404:
                    data = []
                elif status >= 400 or not isinstance(data, list):
                    out.append((i, self._error(status, data, f"get {parsed.id!r}")))
                    continue
                leaves_of[parsed.id] = [
                    item["ok"].get("_attachments") or {} for item in data if "ok" in item
                ]
            completed: dict[str, Any] = {}
            error: StoreError | None = None
            for name, spec in parsed.attachments.items():
                if isinstance(spec, Follows):
                    error = BadRequest(
                        f"document {parsed.id!r}: attachment {name!r} follows: its data goes "
                        "with put_replicated"
                    )
                    break
                held = [a[name] for a in leaves_of[parsed.id]
                        if name in a and spec.matches(a[name])]
                if not held:
                    error = BadRequest(
                        f"document {parsed.id!r}: missing stub: no revision held here has "
                        f"attachment {name!r} with " + (f"digest {spec.digest}" if spec.digest
                                                         else f"revpos {spec.revpos}")
                    )
                    break
                completed[name] = {**held[0], "revpos": spec.revpos or held[0]["revpos"],
                                   "stub": True}
            out.append((i, error or attrs.evolve(parsed, attachments=completed)))
        return out

    async def _send_stream(
        self,
        method: str,
        path: str,
        content: AsyncIterable[bytes],
        headers: list[tuple[bytes, bytes]],
        *,
        params: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """Send a streamed body to the node in use (once: a stream cannot be sent again).
        An exception from `content` (a cut upload, a digest that does not match) aborts the
        request before its body is complete, so the server writes nothing."""
        if self._closed:
            raise StoreError(f"the store on {self._db_url} is closed")
        db_url, node_headers = self._nodes[self._node]
        names = {name.lower() for name, _ in headers}
        all_headers = [h for h in node_headers if h[0].lower() not in names] + headers
        query = "?" + urlencode(params) if params else ""
        try:
            response = await self._pool.request(
                method, db_url + path + query, headers=all_headers, content=content,
                extensions={"timeout": _timeouts()},
            )
        except _REQUEST_FAILURES as exc:
            raise Unavailable(
                f"CouchDB at {db_url} is unreachable ({type(exc).__name__}: {exc})"
            ) from exc
        try:
            data = json.loads(response.content)
        except ValueError:
            data = None
        return response.status, data

    # -- local documents ------------------------------------------------------------------

    async def get_local(self, local_id: str) -> Doc:
        path = _local_path(check_local_id(local_id))
        doc = await self._call("GET", path, action=f"get local document {local_id!r}")
        self._local_revs[local_id] = doc["_rev"]
        return doc

    async def put_local(self, local_id: str, doc: Doc) -> None:
        check_local_id(local_id)
        await self._put_local(local_id, parse_local_doc(local_id, doc))

    async def delete_local(self, local_id: str) -> None:
        path = _local_path(check_local_id(local_id))
        for _ in range(LOCAL_WRITE_ATTEMPTS):
            rev = self._local_revs.get(local_id) or await self._local_rev(local_id)
            if rev is None:
                raise NotFound(f"local document {local_id!r} does not exist")
            status, data = await self._request("DELETE", path, params={"rev": rev})
            if status in (404, 409):  # our remembered rev is stale: look again
                self._local_revs.pop(local_id, None)
                continue
            if status >= 400:
                raise self._error(status, data, f"delete local document {local_id!r}")
            self._local_revs.pop(local_id, None)
            return
        raise Conflict(f"local document {local_id!r} kept changing while being deleted")

    async def _put_local(self, local_id: str, body: dict[str, Any]) -> str:
        path = _local_path(local_id)
        rev = self._local_revs.get(local_id)
        for _ in range(LOCAL_WRITE_ATTEMPTS):
            status, data = await self._request(
                "PUT", path, body=body if rev is None else {**body, "_rev": rev}
            )
            if status in (404, 409):  # changed elsewhere, or not seen by us: replace it
                rev = await self._local_rev(local_id)
                continue
            if status >= 400:
                raise self._error(status, data, f"write local document {local_id!r}")
            self._local_revs[local_id] = data["rev"]
            return data["rev"]
        raise Conflict(f"local document {local_id!r} kept changing while being written")

    async def _put_locals(self, bodies: dict[str, dict[str, Any]]) -> None:
        """Write local documents in one `_bulk_docs`; one the server refuses (changed
        elsewhere, or a rev this process did not know) is then written by itself."""
        ids = list(bodies)
        docs = [{**bodies[local_id], "_id": LOCAL_PREFIX + local_id}
                | ({"_rev": self._local_revs[local_id]} if local_id in self._local_revs else {})
                for local_id in ids]
        again = []
        for local_id, entry in zip(ids, await self._bulk_locals(docs), strict=True):
            if entry.get("ok") and isinstance(entry.get("rev"), str):
                self._local_revs[local_id] = entry["rev"]
            else:
                again.append(local_id)
        for local_id in again:
            await self._put_local(local_id, bodies[local_id])

    async def _delete_locals(self, local_ids: list[str]) -> None:
        """Delete local documents: those whose rev this process knows in one `_bulk_docs`,
        the others (and any the server refuses) one by one; a missing one is no error."""
        known = [local_id for local_id in local_ids if local_id in self._local_revs]
        again = [local_id for local_id in local_ids if local_id not in self._local_revs]
        docs = [{"_id": LOCAL_PREFIX + local_id, "_rev": self._local_revs[local_id],
                 "_deleted": True} for local_id in known]
        for local_id, entry in zip(known, await self._bulk_locals(docs), strict=True):
            if entry.get("ok"):
                self._local_revs.pop(local_id, None)
            else:
                again.append(local_id)
        for local_id in again:
            try:
                await self.delete_local(local_id)
            except NotFound:
                pass

    async def _bulk_locals(self, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`_bulk_docs` of local documents: one answer per doc, in order."""
        if not docs:
            return []
        status, data = await self._request("POST", "/_bulk_docs", body={"docs": docs})
        if status >= 400:
            raise self._error(status, data, "write local documents")
        if not (isinstance(data, list) and len(data) == len(docs)
                and all(isinstance(entry, dict) for entry in data)):
            raise StoreError(f"CouchDB at {self._db_url}: _bulk_docs of {len(docs)} local "
                             f"documents answered {str(data)[:200]}")
        return data

    async def _local_rev(self, local_id: str) -> str | None:
        status, data = await self._request("GET", _local_path(local_id))
        if status == 404:
            return None
        if status >= 400:
            raise self._error(status, data, f"read local document {local_id!r}")
        return data["_rev"]

    async def _write_local_doc(self, parsed: ParsedDoc) -> str:
        """A `_local/` document written through `put`/`bulk_docs`."""
        local_id = parsed.id[len(LOCAL_PREFIX) :]
        if parsed.deleted:
            await self.delete_local(local_id)
            return "0-0"
        return await self._put_local(local_id, parsed.body)

    # -- staged chunks of incoming transfers (see base.Store) ---------------------------------
    #
    # Each staged chunk is a local document (never replicated, not in the feed) named by its
    # SHA-256, its data in base64. CouchDB's own attachments are not chunk-addressed, so only
    # chunks staged by a transfer (one that was cut, or another revision's) are found held.
    #
    # Holds are not durable, so that what a cut transfer left is found after a crash, each
    # stage and claim first writes a staging record: the chunks' SHA-256s and the time.
    # Record first: a crash in between leaves a record of a chunk never staged (its removal
    # finds nothing), never a chunk no record names. A release removes the records of this
    # process that no longer date a staged chunk, so only a crash leaves records behind.
    # `expire_staged` lists the records (`_local_docs`, CouchDB >= 2), dates each chunk by
    # its newest record, removes the chunks older than the window that no transfer of this
    # process holds, then the old records that speak for no chunk still staged.

    # One staging call at a time (`_staging`): a release's delete never runs between
    # another transfer's claim or stage of the same chunk and its hold.

    async def claim_chunks(self, hashes: list[bytes]) -> set[bytes]:
        async with self._staging:
            wanted = list(dict.fromkeys(hashes))
            revs = await self._current_local_revs([_staged_id(digest) for digest in wanted])
            if revs is None:  # the server cannot list local docs: a read each
                held = {digest for digest in wanted
                        if await self._local_rev(_staged_id(digest)) is not None}
            else:
                self._local_revs.update(revs)
                held = {digest for digest in wanted if _staged_id(digest) in revs}
            if held:
                await self._record_staging(list(held))  # a resume: its window starts anew
            self._holds.take(held)
            return held

    async def stage_chunks(self, pieces: list[bytes], *,
                           checked: list[bytes] | None = None) -> list[bytes]:
        check_addresses(pieces, checked)
        digests = ([hashlib.sha256(data).digest() for data in pieces] if checked is None
                   else list(checked))
        async with self._staging:
            await self._record_staging(digests)
            await self._put_locals({_staged_id(digest): {"data": base64.b64encode(data).decode()}
                                    for digest, data in zip(digests, pieces, strict=True)})
            self._holds.take(digests)
            return digests

    async def read_staged_chunk(self, digest: bytes) -> bytes:
        status, doc = await self._request("GET", _local_path(_staged_id(digest)))
        if status == 404:
            raise NotFound(f"no staged chunk {digest.hex()}")
        if status >= 400:
            raise self._error(status, doc, f"read staged chunk {digest.hex()}")
        data = base64.b64decode(doc["data"])
        if hashlib.sha256(data).digest() != digest:
            raise StoreError(f"staged chunk {digest.hex()} was altered in the database")
        return data

    async def release_chunks(self, hashes: list[bytes], *, keep_staged: bool = False) -> None:
        async with self._staging:
            free = self._holds.give_back(hashes)
            if keep_staged:
                return
            await self._delete_locals([_staged_id(digest) for digest in free])
            gone = set(free)
            done = []  # the records that date no chunk any more
            for local_id, (rev, staged) in self._records.items():
                staged -= gone
                if not staged:
                    done.append((local_id, rev))
            await self._remove_records(done)

    async def expire_staged(self, older_than: float) -> int:
        async with self._staging:
            listed = await self._staging_records()
            if listed is None:
                return 0
            records, complete = listed
            if complete:
                await self._date_unrecorded(records)
            cutoff = time.time() - older_than
            newest: dict[bytes, _StagingRecord] = {}
            for record in records:
                for digest in record.chunks:
                    if digest not in newest or newest[digest].at < record.at:
                        newest[digest] = record
            expired: list[str] = []
            speaking: set[str] = set()  # records that still date a staged chunk
            for digest, record in newest.items():
                if record.at > cutoff or digest in self._holds:
                    speaking.add(record.id)
                else:
                    expired.append(_staged_id(digest))
            # Only those staged: a record may name a chunk released already, or never
            # staged (a crash between the two).
            staged = await self._current_local_revs(expired) or {}
            self._local_revs.update(staged)
            await self._delete_locals(list(staged))
            await self._remove_records([(record.id, record.rev) for record in records
                                        if record.at <= cutoff and record.id not in speaking])
            return len(staged)

    async def _current_local_revs(self, local_ids: list[str]) -> dict[str, str] | None:
        """The current rev of each of `local_ids` that exists, `LOCAL_DOCS_PAGE` ids per
        `_local_docs` request; None where the server cannot list local documents."""
        revs: dict[str, str] = {}
        for start in range(0, len(local_ids), LOCAL_DOCS_PAGE):
            keys = [LOCAL_PREFIX + local_id
                    for local_id in local_ids[start:start + LOCAL_DOCS_PAGE]]
            rows = await self._local_docs("look up local documents", body={"keys": keys})
            if rows is None:
                return None
            asked = set(keys)
            for row in rows:
                if not isinstance(row, dict) or row.get("id") not in asked:
                    continue  # a missing one ({"key", "error": "not_found"}), or not asked
                rev = (row.get("value") or {}).get("rev")
                if isinstance(rev, str):
                    revs[row["id"][len(LOCAL_PREFIX):]] = rev
        return revs

    async def _local_docs(self, action: str, *, params: dict[str, str] | None = None,
                          body: Any = None) -> list[Any] | None:
        """The rows of one `_local_docs` request (GET with `params`, or POST with `body`);
        None where the server has no `_local_docs` (CouchDB < 2, pouchdb-server)."""
        status, data = await self._request("GET" if body is None else "POST", "/_local_docs",
                                           params=params, body=body)
        if status in _UNSUPPORTED:
            return None
        if status >= 400:
            raise self._error(status, data, action)
        rows = data.get("rows") if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise StoreError(f"CouchDB at {self._db_url}: _local_docs answered no rows")
        return rows

    async def _date_unrecorded(self, records: list[_StagingRecord]) -> None:
        """Give the staged chunks no record names (staged before the store wrote records, or
        by someone else) a record dated now: they expire one window from now. Only after a
        complete listing of the records, or chunks whose record was not read would be dated
        again at each expiry."""
        named = {digest for record in records for digest in record.chunks}
        found = await self._staged_digests()
        if found is None:
            return
        unrecorded = [digest for digest in found
                      if digest not in named and digest not in self._holds]
        if unrecorded:
            logger.info("%s: %d staged chunks no staging record names; they expire one "
                        "resume window from now", self._db_url, len(unrecorded))
            await self._record_staging(unrecorded)

    async def _staged_digests(self) -> list[bytes] | None:
        """The digests of the staged chunks, at most MAX_NAMED_CHUNKS of them; None where
        the server cannot list local documents or there are more."""
        digests: list[bytes] = []
        start = LOCAL_PREFIX + _staged_id(b"")

        def take(rows: list[Any]) -> bool:
            for row in rows:
                tail = str(row.get("id", ""))[len(start):] if isinstance(row, dict) else ""
                if _SHA256_HEX.fullmatch(tail):
                    digests.append(bytes.fromhex(tail))
            return len(digests) < MAX_NAMED_CHUNKS

        listed = await self._list_locals(_staged_id(b""), "list staged chunks", take,
                                         page=LOCAL_DOCS_PAGE)
        return digests if listed else None

    async def _list_locals(self, prefix: str, action: str,
                           take: Callable[[list[Any]], bool], *, page: int,
                           include_docs: bool = False) -> bool | None:
        """Hand `take` the `_local_docs` rows of the local ids starting with `prefix`, `page`
        at a time, until it returns False. True once every row was handed over, False when
        `take` stopped first, None where the server cannot list local documents."""
        start = LOCAL_PREFIX + prefix
        params = {"startkey": json.dumps(start), "endkey": json.dumps(start + "\uffff"),
                  "limit": str(page)}
        if include_docs:
            params["include_docs"] = "true"
        assert page >= 2, "a page repeats the last row of the one before"
        last = None
        while True:
            rows = await self._local_docs(action, params=params)
            if rows is None:
                if last is not None:
                    raise StoreError(f"CouchDB at {self._db_url}: _local_docs stopped answering")
                return None
            # As in all_docs: a page starts at the last id of the one before, whose row (if
            # still there) is dropped; `skip=1` would skip another if that one went meanwhile.
            go_on = take(rows if last is None else
                         [row for row in rows if not (isinstance(row, dict) and row.get("id") == last)])
            if len(rows) < page:
                return True
            if not go_on:
                return False
            last = rows[-1]["id"]
            params = {**params, "startkey": json.dumps(last)}

    async def _record_staging(self, digests: list[bytes]) -> None:
        for first in range(0, len(digests), RECORD_CHUNKS):
            part = digests[first:first + RECORD_CHUNKS]
            local_id = f"{STAGING_RECORD}{uuid.uuid4().hex}"
            status, data = await self._request(
                "PUT", _local_path(local_id),
                body={"at": time.time(), "chunks": [digest.hex() for digest in part]})
            if status >= 400:
                raise self._error(status, data, "write a staging record")
            self._records[local_id] = (data["rev"], set(part))

    async def _remove_records(self, records: list[tuple[str, str]]) -> None:
        """Delete staging records `(local id, rev)` in one `_bulk_docs`; one gone already, or
        rewritten by someone else, stays as it is."""
        for local_id, _ in records:
            self._records.pop(local_id, None)
        await self._bulk_locals([{"_id": LOCAL_PREFIX + local_id, "_rev": rev, "_deleted": True}
                                 for local_id, rev in records])

    async def _staging_records(self) -> tuple[list[_StagingRecord], bool] | None:
        """The staging records, and whether that is all of them (not cut at
        MAX_STAGING_RECORDS rows or MAX_NAMED_CHUNKS chunks); None where the server cannot
        list local documents (pouchdb-server): its staged chunks are then kept."""
        records: list[_StagingRecord] = []
        seen = malformed = named = 0
        latest = time.time() + CLOCK_SKEW  # a record dated later than this is not one of ours

        def take(rows: list[Any]) -> bool:
            nonlocal seen, malformed, named
            seen += len(rows)
            for row in rows:
                record = _StagingRecord.from_row(row)
                if record is None or record.at > latest:
                    malformed += 1
                else:
                    records.append(record)
                    named += len(record.chunks)
            return seen < MAX_STAGING_RECORDS and named < MAX_NAMED_CHUNKS

        complete = await self._list_locals(STAGING_RECORD, "list staging records", take,
                                           page=RECORDS_PAGE, include_docs=True)
        if complete is None:
            if not self._said_unlisted:
                self._said_unlisted = True
                logger.warning(
                    "CouchDB at %s cannot list local documents (_local_docs, CouchDB "
                    ">= 2.0): staged chunks of file transfers cut for good are kept",
                    self._db_url)
            return None
        if malformed:
            logger.warning("ignoring %d malformed staging records in %s (not as this "
                           "store writes them, or dated in the future)", malformed,
                           self._db_url)
        if not complete:
            logger.warning("%s holds more than %d staging records or %d staged chunks: "
                           "expiring among the first only", self._db_url,
                           MAX_STAGING_RECORDS, MAX_NAMED_CHUNKS)
        return records, complete

    # -- HTTP ----------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        read_timeout: float = READ_TIMEOUT,
        action: str | None = None,
    ) -> Any:
        """Send a request to the database and return the decoded answer; an error status
        raises the matching `StoreError`, its message starting with `action`."""
        status, data = await self._request(
            method, path, params=params, body=body, read_timeout=read_timeout
        )
        if status >= 400:
            raise self._error(status, data, action or f"{method} {path or '/'}")
        return data

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        read_timeout: float = READ_TIMEOUT,
        idempotent: bool = True,
        server: bool = False,
    ) -> tuple[int, Any]:
        """Send a request to the node in use; when it cannot be reached, or answers 5xx, send
        it to the next node (each node once). A request that is not `idempotent` (a write
        that makes a revision) goes to the next node only if it never reached this one.
        `path` is the database's, or with `server` the server's (`/_membership`...)."""
        if self._closed:
            raise StoreError(f"the store on {self._db_url} is closed")
        query = "?" + urlencode(params) if params else ""
        content = None
        if body is not None:
            content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        timeouts = {
            "connect": CONNECT_TIMEOUT,
            "read": read_timeout,
            "write": READ_TIMEOUT,
            "pool": READ_TIMEOUT,
        }
        for attempt in range(len(self._nodes)):
            last = attempt == len(self._nodes) - 1
            node = self._node
            db_url, headers = self._nodes[node]
            base = db_url.rsplit("/", 1)[0] if server else db_url
            try:
                async with self._pool.stream(
                    method, base + path + query, headers=headers, content=content,
                    extensions={"timeout": timeouts},
                ) as response:
                    status = response.status
                    if status >= 500 and idempotent and not last:
                        self._leave(node, f"HTTP {status}")
                        continue
                    raw = await _read_whole(response, f"CouchDB at {db_url} answered {method} "
                                                      f"{path or '/'}")
            except _REQUEST_FAILURES as exc:
                failure = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, httpcore.PoolTimeout):  # our own pool is full, not the node
                    raise Unavailable(f"CouchDB at {db_url}: no free connection ({failure})") \
                        from exc
                self._leave(node, failure)
                if last or not (idempotent or isinstance(exc, _NOT_SENT)):
                    raise Unavailable(f"CouchDB at {db_url} is unreachable ({failure})") from exc
                continue
            break
        try:
            data = json.loads(raw)
        except ValueError:
            if status < 400:
                raise StoreError(
                    f"CouchDB at {db_url} answered {method} {path or '/'} with "
                    f"HTTP {status} and a body that is not JSON"
                ) from None
            data = None  # e.g. an HTML error page from a proxy: the status says enough
        return status, data

    def _leave(self, node: int, why: str) -> None:
        """Use the next node from now on, if `node` is still the one in use (requests that
        fail together move the store on once)."""
        if len(self._nodes) > 1 and self._node == node:
            self._node = (node + 1) % len(self._nodes)
            logger.warning("CouchDB node %s failed (%s); using %s from now on",
                           self._nodes[node][0], why, self._db_url)

    async def _write(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        action: str | None = None,
    ) -> _Written:
        """A write that makes revisions (not idempotent): its answer, and whether the server
        accepted it below its write quorum (HTTP 202)."""
        status, data = await self._request(
            method, path, params=params, body=body, idempotent=False
        )
        if status >= 400:
            raise self._error(status, data, action or f"{method} {path or '/'}")
        return _Written(data, below_quorum=status == 202)

    async def _write_replicated(self, body: dict[str, Any]) -> Any:
        """`_bulk_docs` with new_edits=false, sent again (it is idempotent) while the server
        answers 202; still short of a quorum after `QUORUM_ATTEMPTS`: `Unavailable`, so the
        caller does not count the revisions as stored and delivers them again later."""
        for attempt in range(QUORUM_ATTEMPTS):
            if attempt:
                await trio.sleep(QUORUM_RETRY_DELAY * 2 ** (attempt - 1))
            status, data = await self._request("POST", "/_bulk_docs", body=body)
            if status >= 400:
                raise self._error(status, data, "write replicated revisions")
            if status != 202:
                return data
        raise Unavailable(
            f"CouchDB at {self._db_url} accepted {len(body['docs'])} replicated revision(s) "
            f"on fewer nodes than its write quorum (HTTP 202), {QUORUM_ATTEMPTS} times: "
            "they are not known to be durable; send them again later"
        )

    async def _ensure_quorum(self, written: list[tuple[str, str]]) -> None:
        """Revisions just made, answered 202: read each back with its history and send it
        again with new_edits=false (a no-op where a node has it, a copy where it has not)
        until the server answers 201. Still short after `QUORUM_ATTEMPTS`, the revisions are
        returned anyway (they exist, and a caller's retry would only conflict): counted in
        `info()["writes_below_quorum"]` and logged."""
        if not written:
            return
        why = f"HTTP 202 after {QUORUM_ATTEMPTS} attempts"
        try:
            for attempt in range(QUORUM_ATTEMPTS):
                if attempt:
                    await trio.sleep(QUORUM_RETRY_DELAY * 2 ** (attempt - 1))
                docs = await self.bulk_get(written)  # a node that lacks one skips it
                if not docs:
                    continue
                status, data = await self._request(
                    "POST", "/_bulk_docs", body={"docs": docs, "new_edits": False}
                )
                if status >= 400:
                    raise self._error(status, data, "copy written revisions to a quorum")
                if status != 202 and len(docs) == len(written):
                    return
        except StoreError as exc:  # the write itself is made: it must not look failed
            why = exc.reason
        self._writes_below_quorum += len(written)
        logger.warning(
            "CouchDB at %s: %d written revision(s) may be on fewer nodes than the write "
            "quorum (%s); returned anyway, the cluster copies them to its other nodes when "
            "it can", self._db_url, len(written), why,
        )

    def _error(self, status: int, data: Any, action: str) -> StoreError:
        error, reason = "", ""
        if isinstance(data, dict):
            error, reason = str(data.get("error", "")), str(data.get("reason", ""))
        detail = f"{error}: {reason}" if reason else error or f"HTTP {status}"
        if status == 400 or status == 413:
            return BadRequest(f"{action}: {detail}")
        if status == 404:
            return NotFound(f"{action}: {detail}")
        if status == 409:
            return Conflict(f"{action}: {detail}")
        if status in (401, 403):
            return Unavailable(
                f"CouchDB at {self._db_url} refused to {action} ({detail}): "
                "check the user and password in the store url"
            )
        if status in (502, 503, 504):
            return Unavailable(f"CouchDB at {self._db_url} cannot {action} now ({detail})")
        return StoreError(
            f"CouchDB at {self._db_url} failed to {action}: HTTP {status} {detail}"
        )


# -- pure helpers ----------------------------------------------------------------------------


def _compression(section: dict[str, Any]) -> str | None:
    """What an Apache CouchDB `[attachments]` config section compresses, or None. CouchDB
    reads `compression_level` as an integer, and one unset, empty or unreadable as its
    default, 8; the types of `compressible_types` (its default list when unset or empty)
    are stored gzip-encoded unless the level reads as 0."""
    level = str(section.get("compression_level", "")).strip()
    if not _ERLANG_INTEGER.fullmatch(level):  # (not int(): it reads "٠" or "1_0" too)
        level = "8"
    elif int(level) == 0:
        return None
    types = str(section.get("compressible_types", "")).strip() or "the default types"
    return f"compression_level {level}, {types}"


def _detail(status: int, data: Any) -> str:
    if isinstance(data, dict) and data.get("error"):
        return f"HTTP {status} {data['error']}"
    return f"HTTP {status}"


def _parse_server_url(url: str) -> tuple[str, list[tuple[bytes, bytes]]]:
    """Split a server url into (url without credentials, request headers)."""
    if not isinstance(url, str):
        raise BadRequest(f"the CouchDB url must be a string, not {url!r}")
    parts = urlsplit(url)
    shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()  # no password
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(f"invalid CouchDB url {shown!r}: expected http[s]://host[:port]")
    try:
        port = parts.port
    except ValueError:
        raise BadRequest(f"invalid CouchDB url {shown!r}: bad port") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = host if port is None else f"{host}:{port}"
    server_url = f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"
    headers = list(_JSON_HEADERS)
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        token = base64.b64encode(credentials.encode()).decode()
        headers.append((b"Authorization", f"Basic {token}".encode()))
    return server_url, headers


def _doc_path(doc_id: str) -> str:
    return "/" + quote(doc_id, safe="")  # ids may hold "/" or any Unicode


def _staged_id(digest: bytes) -> str:
    return "plugshare-chunk-" + digest.hex()


STAGING_RECORD = "plugshare-staging-"  # local id prefix of a staging record
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@attrs.frozen
class _StagingRecord:
    """Chunks staged or claimed together, and when (see the store's staged chunks)."""

    id: str  # its local id, without "_local/"
    rev: str
    at: float
    chunks: tuple[bytes, ...]

    @classmethod
    def from_row(cls, row: object) -> _StagingRecord | None:
        """A `_local_docs` row (with its doc) as a record; None for one that is not (the
        database may have been written by anyone)."""
        doc = row.get("doc") if isinstance(row, dict) else None
        if not isinstance(doc, dict):
            return None
        local_id, rev, at, chunks = (doc.get("_id"), doc.get("_rev"), doc.get("at"),
                                     doc.get("chunks"))
        if not (isinstance(local_id, str) and local_id.startswith(LOCAL_PREFIX + STAGING_RECORD)
                and isinstance(rev, str) and isinstance(at, (int, float))
                and not isinstance(at, bool) and isinstance(chunks, list)
                and len(chunks) <= RECORD_CHUNKS
                and all(isinstance(c, str) and _SHA256_HEX.fullmatch(c) for c in chunks)):
            return None
        return cls(local_id[len(LOCAL_PREFIX):], rev, float(at),
                   tuple(bytes.fromhex(c) for c in chunks))


def _local_path(local_id: str) -> str:
    return "/_local/" + quote(local_id, safe="")


def _latest_row_per_doc(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per doc, its last, where it stands: a cluster's feed may list a doc twice in one
    answer (a change replayed while shard copies are merged)."""
    latest: dict[str, dict[str, Any]] = {}
    for row in rows:
        latest.pop(row["id"], None)
        latest[row["id"]] = row
    return list(latest.values())


def _is_design(doc_id: str) -> bool:
    return doc_id.startswith(DESIGN_PREFIX)


def _seq_param(since: Seq) -> str:
    if type(since) is int and since >= 0:
        return str(since)
    if isinstance(since, str) and since:
        return since
    raise BadRequest(f"invalid sequence {since!r}: expected one handed out by this store")


def _wire_doc(
    parsed: ParsedDoc, *, with_history: bool = False, limit: int | None = None
) -> dict[str, Any]:
    """A parsed doc as CouchDB takes it. `_revisions` is only sent for replicated writes:
    with new_edits=true CouchDB would take it, not `_rev`, as the revision to update. `limit`
    cuts the history sent (stemming on our side for a server that cannot be told to)."""
    doc: dict[str, Any] = {"_id": parsed.id, **parsed.body}
    if parsed.rev is not None:
        doc["_rev"] = parsed.rev
    if parsed.attachments:  # stubs completed with the server's metadata (_complete_stubs)
        assert all(isinstance(a, dict) for a in parsed.attachments.values())
        doc["_attachments"] = parsed.attachments
    if parsed.deleted:
        doc["_deleted"] = True
    if with_history:
        assert parsed.path is not None
        doc["_revisions"] = history_of(parsed.path[:limit])
    return doc


def _rev_key(rev: str) -> tuple[int, str]:
    pos, _, rev_hash = rev.partition("-")
    return int(pos), rev_hash


def _live_winner_order(revs: list[str]) -> list[str]:
    """Live leaves in winner order: highest generation, then highest hash."""
    return sorted(revs, key=_rev_key, reverse=True)


def _leaves_in_winner_order(
    leaves: list[str], winner: tuple[str, list[str]] | None
) -> tuple[str, ...]:
    """Order a `_changes` row's leaves as the contract does: live before deleted, then by
    generation, then by hash. `winner` is (winning rev, live losers) for a live conflicted doc;
    without it every leaf has the same liveness (a single leaf, or all deleted)."""
    if winner is None or winner[0] not in leaves:  # (the doc changed since the row was read)
        return tuple(_live_winner_order(leaves))
    winning, live = winner[0], set(winner[1])
    others = [rev for rev in leaves if rev != winning]
    return (
        winning,
        *_live_winner_order([rev for rev in others if rev in live]),
        *_live_winner_order([rev for rev in others if rev not in live]),
    )


def _ok(doc_id: str, rev: str) -> dict[str, Any]:
    return {"id": doc_id, "rev": rev, "ok": True}


def _failed(doc_id: Any, error: str, reason: str) -> dict[str, Any]:
    return {"id": doc_id, "error": error, "reason": reason}


def _bulk_result(doc_id: str, entry: dict[str, Any]) -> dict[str, Any]:
    if "error" not in entry:
        return _ok(doc_id, entry["rev"])
    error = entry["error"]
    reason = entry.get("reason") or error
    if error not in ("conflict", "not_found", "bad_request"):
        reason = f"{error}: {reason}"
        error = "forbidden" if error in ("forbidden", "unauthorized") else "store_error"
    return _failed(doc_id, error, reason)


def _check_attachment_target(doc_id: str, rev: str | None, name: str) -> None:
    check_doc_id(doc_id)
    if doc_id.startswith(LOCAL_PREFIX):
        raise BadRequest(f"local document {doc_id!r} has no attachments")
    if rev is not None:
        parse_rev(rev)
    check_attachment_name(name)


def _attachment_path(doc_id: str, name: str) -> str:
    return _doc_path(doc_id) + "/" + quote(name, safe="")


def _timeouts() -> dict[str, float]:
    return {"connect": CONNECT_TIMEOUT, "read": READ_TIMEOUT, "write": READ_TIMEOUT,
            "pool": READ_TIMEOUT}


@contextlib.asynccontextmanager
async def _spooled(chunks: AsyncIterable[bytes], check: StreamCheck) -> AsyncIterator[Any]:
    """`chunks` written to an anonymous temporary file as they come, checked (`check`
    raises on a digest or length that does not match); the file, rewound. It is gone when
    the block ends, and on any failure."""
    file = trio.wrap_file(await trio.to_thread.run_sync(tempfile.TemporaryFile))
    try:
        async for piece in rechunk(chunks):
            check.update(piece)
            await file.write(piece)
        check.finish()
        await file.seek(0)
        yield file
    finally:
        with trio.CancelScope(shield=True):
            await file.aclose()


async def _read_spool(file: Any, size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
    while piece := await file.read(size):
        yield piece


class ResponseTooLarge(StoreError):
    """An answer over MAX_RESPONSE_BYTES: not read further (the connection is dropped)."""


async def _read_whole(response: Any, what: str) -> bytes:
    """The body of `response`, refused once over MAX_RESPONSE_BYTES (said in a
    Content-Length, or counted as it comes): whoever can write the database, or answers in
    the server's place, must not make the node hold any amount of memory."""
    limit = MAX_RESPONSE_BYTES

    def too_large() -> ResponseTooLarge:  # made only when raised: every request comes by
        return ResponseTooLarge(
            f"{what} with more than {limit} bytes: not read (the most this store reads at once)")

    declared = next((v for k, v in response.headers if k.lower() == b"content-length"), b"")
    if declared.isdigit() and int(declared) > limit:
        raise too_large()
    pieces, size = [], 0
    async for piece in response.aiter_stream():
        size += len(piece)
        if size > limit:
            raise too_large()
        pieces.append(piece)
    return b"".join(pieces)


async def _bounded(response: Any, limit: int) -> AsyncIterator[bytes]:
    """At most `limit` bytes of a streamed response (an error body)."""
    seen = 0
    async for piece in response.aiter_stream():
        yield piece[: limit - seen]
        seen += len(piece)
        if seen >= limit:
            break


_BASE64_PIECE = 3 * 87_381  # bytes: a multiple of 3 near 256 KiB, so pieces encode apart


def _streamed_doc_body(
    wire: dict[str, Any],
    stubs: Mapping[str, Any],
    inline: Mapping[str, tuple[dict[str, Any], int]],
    files: Mapping[str, Any],
    *,
    replicated: bool,
) -> tuple[int, AsyncIterator[bytes]]:
    """A document with the data of its `inline` attachments ({name: (metadata, length)},
    read from their checked spool files) as base64, generated as it is sent, and the body's
    length, known beforehand (a body with a Content-Length passes every proxy). Replicated:
    as `{"new_edits": false, "docs": [doc]}` for `_bulk_docs`; else the doc alone."""
    doc = json.dumps(wire, ensure_ascii=False, separators=(",", ":"))
    head = '{"new_edits":false,"docs":[' if replicated else ""
    parts: list[bytes | str] = [(head + doc[:-1] + ',"_attachments":{').encode()]
    entries = [json.dumps(name) + ":" + json.dumps(stub, separators=(",", ":"))
               for name, stub in stubs.items()]
    parts.append(",".join(entries).encode())
    for i, (name, (meta, _)) in enumerate(inline.items()):
        opening = json.dumps(meta, separators=(",", ":"))[:-1] + ',"data":"'
        separator = "," if entries or i else ""
        parts.extend([(separator + json.dumps(name) + ":" + opening).encode(), name, b'"}'])
    parts.append(b"}}]}" if replicated else b"}}")
    length = sum(len(p) if isinstance(p, bytes) else 4 * -(-inline[p][1] // 3) for p in parts)

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            if isinstance(part, bytes):
                yield part
            else:
                async for piece in _read_spool(files[part], _BASE64_PIECE):
                    yield base64.b64encode(piece)

    return length, body()


def _replicated_doc(parsed: ParsedDoc) -> Doc:
    """A parsed replicated doc back as a document for `bulk_docs(new_edits=False)`."""
    assert parsed.path is not None
    doc = _wire_doc(attrs.evolve(parsed, attachments={}), with_history=True)
    if parsed.attachments:
        doc["_attachments"] = {
            name: {"stub": True, "digest": spec.digest, "revpos": spec.revpos}
            for name, spec in parsed.attachments.items()
        }
    return doc


def _result_error(result: dict[str, Any]) -> StoreError:
    kinds = {"bad_request": BadRequest, "not_found": NotFound, "conflict": Conflict,
             "forbidden": Forbidden}
    return kinds.get(result["error"], StoreError)(result["reason"])
