"""One virtual database as one credential sees it: the store underneath, every read filtered
and every write decided by the token.

A request costs a bounded number of store calls and token calls, never one per document: a
page of documents goes to the token as one `doc.list` (reads) or one `doc.write_batch`
(writes)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any, Awaitable

from plugshare.node.couch.databases import Database
from plugshare.node.couch.errors import CouchError, as_couch, bad_request, forbidden
from plugshare.node.couch.inline import DataSource, decoded_stubs, take_inline
from plugshare.node.couch.spool import Spool
from plugshare.node.token_pages import json_size, token_pages
from plugshare.store import Doc
from plugshare.store.base import LOCAL_PREFIX, NotFound, Seq, StoreError

log = logging.getLogger("plugshare.couch")

TokenCall = Callable[..., Awaitable[Any]]
SCAN_PAGE = 1_000  # store changes read per step while filling a filtered page, at most
MIN_SCAN = 50  # ...and at least (a page of few visible rows in a busy store)
ALL_DOCS_PAGE = 200  # stored documents shown to the token at a time for _all_docs
LOCAL_NAMESPACE = "couch"  # local docs of this API: couch/<principal>/<db>/<id>
CONFLICT_REASON = "Document update conflict."
DESIGN_REASON = "design documents are not supported"
UNDERSCORE_REASON = "Only reserved document ids may start with underscore."


def without_history(doc: Doc) -> Doc:
    return {k: v for k, v in doc.items() if k != "_revisions"}


def check_doc_id(doc_id: Any) -> str:
    """A document id this API accepts for an ordinary document (CouchDB's refusals)."""
    if not isinstance(doc_id, str) or not doc_id:
        raise bad_request("Document id must be a non-empty string")
    if doc_id.startswith("_design/"):
        raise forbidden(DESIGN_REASON)
    if doc_id.startswith("_"):
        raise bad_request(UNDERSCORE_REASON)
    return doc_id


def child_revision(doc: Doc, current: Doc | None) -> Doc:
    """An edit carrying attachment data, as the replicated revision it makes: the child of
    the revision it names (which must be the current one, as for any edit; a new doc over a
    tombstone continues it), a new rev id, its history, and its stubs resolved from the
    current revision (those it names: the others are removed, as CouchDB does)."""
    parent = doc.get("_rev")
    live = current is not None and not current.get("_deleted")
    if live:
        conflict = parent != current["_rev"]
    else:
        conflict = parent is not None and (current is None or parent != current["_rev"])
    if conflict:
        raise CouchError(409, "conflict", CONFLICT_REASON)
    if parent is None and current is not None:
        parent = current["_rev"]
    generation = int(parent.partition("-")[0]) + 1 if parent else 1
    new_hash = uuid.uuid4().hex
    held = (current or {}).get("_attachments") or {} if live else {}
    attachments = {}
    for name, entry in (doc.get("_attachments") or {}).items():
        if isinstance(entry, dict) and entry.get("stub") is True:
            if name not in held:
                raise bad_request(f"attachment {name!r}: a stub of no attachment the "
                                  "current revision has")
            entry = {**{k: held[name][k] for k in ("content_type", "length", "digest",
                                                   "revpos") if k in held[name]},
                     "stub": True}
        attachments[name] = entry
    history = [new_hash] + ([parent.partition("-")[2]] if parent else [])
    return {**doc, "_rev": f"{generation}-{new_hash}", "_attachments": attachments,
            "_revisions": {"start": generation, "ids": history}}


class DatabaseView:
    def __init__(self, db: Database, credential: str, *, documents: Any, call: TokenCall,
                 publish: Callable[..., Any]):
        self.db = db
        self._credential = credential
        self._documents = documents  # plugshare.node.documents.Documents: where writes land
        self._store = self.store = documents.store
        self._call = call
        self._publish = publish

    # -- reads --------------------------------------------------------------------------

    async def visible(self, stored: list[Doc], *, only_removals: bool = False) -> list[Doc]:
        """The documents of `stored` this credential may read in this database, in clear,
        in order (tombstones of a doctype it may read included, bare; with `only_removals`,
        only the removals the token made for this credential)."""
        out: list[Doc] = []
        removals = {"only_removals": True} if only_removals else {}
        for page in token_pages([without_history(d) for d in stored]):
            answer = await self._call("doc.list", credential=self._credential, docs=page,
                                      **self.db.scope(), **removals)
            if answer.get("tampered"):
                log.warning("documents failing the token's checks left out: %s",
                            answer["tampered"])
            out += answer["docs"]
        return out

    async def _stored_live(self) -> list[Doc]:
        """The stored winners of every live document of this database's doctype, by id."""
        return [d for d in await self._store.all_docs() if d.get("doctype") == self.db.doctype]

    async def count(self, docs: list[Doc] | None = None) -> int:
        """How many live documents of this database (or of `docs`, stored winners) this
        credential may read; no document is opened, nor a decision logged."""
        docs = await self._stored_live() if docs is None else docs
        total = 0
        for page in token_pages(docs):
            total += await self._call("doc.count", credential=self._credential, docs=page,
                                      **self.db.scope())
        return total

    async def all_live(self) -> list[Doc]:
        """Every live document of this database this credential may read, sorted by id."""
        return await self.visible(await self._stored_live())

    async def get(self, doc_id: str, rev: str | None = None, *,
                  conflicts: bool = False, revs: bool = False) -> Doc:
        """One document (the winner, or `rev`), as this credential may see it; `missing`
        (404) when absent, deleted or not its to read: the three answer alike."""
        try:
            stored = await self._store.get(doc_id, rev=rev, conflicts=conflicts, revs=revs)
        except NotFound:
            raise CouchError(404, "not_found", "missing") from None
        seen = await self.visible([stored])
        if not seen:
            raise CouchError(404, "not_found", "missing")
        doc = seen[0]
        for extra in ("_conflicts", "_revisions"):
            if extra in stored:
                doc = {**doc, extra: stored[extra]}
        return doc

    async def open_revs(self, doc_id: str, wanted: list[str] | None) -> list[dict]:
        """`[{"ok": doc (with _revisions)} | {"missing": rev}]` for the revisions `wanted`
        (None: every leaf); `missing` (404) when asked for every leaf of a doc this
        credential cannot see."""
        every_leaf = wanted is None
        if wanted is None:
            wanted = (await self._documents.leaves([doc_id])).get(doc_id, [])
        results = await self.bulk_get([(doc_id, rev) for rev in wanted], revs=True)
        out = [{"ok": r["docs"][0]["ok"]} if "ok" in r["docs"][0] else {"missing": rev}
               for rev, r in zip(wanted, results)]
        if every_leaf and not any("ok" in entry for entry in out):
            raise CouchError(404, "not_found", "missing")
        return out

    async def all_docs(self, *, keys: list | None, start: str | None, end: str | None,
                       inclusive_end: bool, descending: bool, skip: int, limit: int,
                       include_docs: bool) -> dict:
        """CouchDB's `_all_docs` over the documents this credential may read here (ids in
        code point order, as CouchDB collates them). The range is cut on ids first, and the
        token opens pages of it only until the rows are enough: a small `limit` costs little
        in a large database."""
        stored = await self._stored_live()
        total = await self.count(stored)
        if keys is not None:
            return {"total_rows": total, "offset": None,
                    "rows": await self._rows_of_keys(keys, include_docs)}
        if descending:
            stored.reverse()

        def before_start(doc_id: str) -> bool:
            return start is not None and (doc_id > start if descending else doc_id < start)

        def past_end(doc_id: str) -> bool:
            if end is None:
                return False
            if doc_id == end:
                return not inclusive_end
            return doc_id < end if descending else doc_id > end

        first = next((i for i, d in enumerate(stored) if not before_start(d["_id"])),
                     len(stored))
        stop = next((i for i in range(first, len(stored)) if past_end(stored[i]["_id"])),
                    len(stored))
        wanted = skip + limit
        seen: list[Doc] = []
        page = max(wanted, ALL_DOCS_PAGE)
        for at in range(first, stop, page):
            if len(seen) >= wanted:
                break
            seen += await self.visible(stored[at:min(at + page, stop)])
        rows = []
        for doc in seen[skip:wanted]:
            row = {"id": doc["_id"], "key": doc["_id"], "value": {"rev": doc["_rev"]}}
            if include_docs:
                row["doc"] = doc
            rows.append(row)
        offset = await self.count(stored[:first]) + min(skip, len(seen)) if first else \
            min(skip, len(seen))
        return {"total_rows": total, "offset": offset, "rows": rows}

    async def _rows_of_keys(self, keys: list, include_docs: bool) -> list[dict]:
        ids = list(dict.fromkeys(k for k in keys if isinstance(k, str)))
        landing = await self._documents.landing(ids)
        seen = {d["_id"]: d for d in await self.visible(list(landing.values()))}
        rows: list[dict] = []
        for key in keys:
            doc = seen.get(key) if isinstance(key, str) else None
            if doc is None:
                rows.append({"key": key, "error": "not_found"})
                continue
            row: dict[str, Any] = {"id": key, "key": key, "value": {"rev": doc["_rev"]}}
            if doc.get("_deleted"):
                row["value"]["deleted"] = True
                if include_docs:
                    row["doc"] = None
            elif include_docs:
                row["doc"] = doc
            rows.append(row)
        return rows

    async def changes(self, since: Seq, limit: int, *, doc_ids: set[str] | None = None,
                      selector: Callable[[Doc], bool] | None = None, all_leaves: bool = False,
                      include_docs: bool = False) -> tuple[list[dict], Seq]:
        """(rows, last_seq): up to `limit` rows of the changes after `since` that this
        credential may see. Reads the store's feed a page at a time until the rows are
        enough or the feed ends, so a page is empty only when nothing visible is left."""
        rows: list[dict] = []
        seq = since
        # Read about as many changes as asked for: a replicator asks for small pages often
        # (PouchDB: 100), and every change read is fetched and shown to the token.
        scan = min(max(limit, MIN_SCAN), SCAN_PAGE)
        while True:
            page = await self._store.changes(seq, limit=scan)
            wanted = [c for c in page.results if doc_ids is None or c.id in doc_ids]
            if wanted:
                stored = await self._store.bulk_get([(c.id, c.revs[0]) for c in wanted])
                seen = {d["_id"]: d for d in await self.visible(stored)}
                seen.update(await self._removals_seen([c for c in wanted if c.id not in seen]))
                for change in wanted:
                    doc = seen.get(change.id)
                    if doc is None or (selector is not None and not selector(doc)):
                        continue
                    leaves = change.revs if all_leaves else change.revs[:1]
                    if doc["_rev"] != change.revs[0]:  # the doc left this view: its removal
                        leaves = [doc["_rev"]]
                    row: dict[str, Any] = {"seq": change.seq, "id": change.id,
                                           "changes": [{"rev": r} for r in leaves]}
                    if change.deleted or doc.get("_deleted"):
                        row["deleted"] = True
                    if include_docs:
                        row["doc"] = doc
                    rows.append(row)
                    if len(rows) >= limit:
                        return rows, change.seq
            if len(page.results) < scan:
                return rows, page.last_seq
            seq = page.last_seq

    async def _removals_seen(self, unseen: list) -> dict[str, Doc]:
        """For changes whose winner this credential may not read: the removal the token
        serves it among their other leaves, by id. A write that takes a doc out of what a
        credential may read stores a removal for it (a tombstone beside the new revision:
        see the token's `doc.list`), so its client deletes its copy at its next pull."""
        others = [(c.id, rev) for c in unseen for rev in c.revs[1:]]
        if not others:
            return {}
        shown = await self.visible(await self._store.bulk_get(others), only_removals=True)
        return {d["_id"]: d for d in shown}

    async def bulk_get(self, wanted: list[tuple[str, str | None]], *,
                       revs: bool) -> list[dict]:
        """CouchDB's `_bulk_get` results: per request, `{"id", "docs": [{"ok": doc}]}` or
        `{"error": {...}}` when missing or not this credential's to read."""
        winners = await self._store.winners([i for i, rev in wanted if rev is None])
        pairs = [(i, rev if rev is not None else winners.get(i, {}).get("_rev"))
                 for i, rev in wanted]
        found = await self._store.bulk_get([(i, r) for i, r in pairs if r is not None])
        history = {(d["_id"], d["_rev"]): d.get("_revisions") for d in found}
        seen = {(d["_id"], d["_rev"]): d for d in await self.visible(found)}
        results = []
        for doc_id, rev in pairs:
            doc = seen.get((doc_id, rev))
            if doc is None:
                error = {"id": doc_id, "rev": rev or "undefined", "error": "not_found",
                         "reason": "missing"}
                results.append({"id": doc_id, "docs": [{"error": error}]})
                continue
            if revs and history.get((doc_id, rev)) is not None:
                doc = {**doc, "_revisions": history[(doc_id, rev)]}
            results.append({"id": doc_id, "docs": [{"ok": doc}]})
        return results

    async def open_attachment(self, doc_id: str, name: str, rev: str, *,
                              range: tuple[int, int] | None = None):
        """The data of an attachment of a revision this credential was just shown (the
        token decided that read); (meta, chunks)."""
        return await self._store.open_attachment(doc_id, name, rev=rev, range=range)

    async def revs_diff(self, asked: dict[str, list[str]]) -> dict[str, dict]:
        """CouchDB's `_revs_diff`. A document this credential may not read here is reported
        wholly missing: what the store holds of it is not its to learn (a push of it is then
        refused per document)."""
        diff = await self._store.revs_diff(asked)
        winners = await self._store.winners(list(asked))
        seen = {d["_id"] for d in await self.visible(list(winners.values()))}
        for doc_id, revs in asked.items():
            if doc_id in winners and doc_id not in seen:
                diff[doc_id] = {"missing": list(revs)}
        return diff

    # -- writes -------------------------------------------------------------------------

    async def write(self, docs: list[Any], *, new_edits: bool,
                    spool: Spool | None = None) -> list[dict]:
        """Write `docs` (decided by the token, a page of them per batch command): one result
        per doc, in order, `{"ok", "id", "rev"}` or `{"id", "error", "reason"}`; a refused or
        conflicting doc never fails the others. Inline attachment data is read from
        `spool` (what the request's body spooled) or decoded from the doc."""
        results: list[dict | None] = [None] * len(docs)
        prepared: list[tuple[int, Doc]] = []
        inline: dict[int, dict[str, DataSource]] = {}  # attachment data, by doc
        for index, doc in enumerate(docs):
            try:
                ready = decoded_stubs(self._prepare(doc, new_edits))
                ready, sources = take_inline(ready, spool, new_edits=new_edits)
                if sources:
                    inline[index] = sources
                prepared.append((index, ready))
            except CouchError as exc:
                doc_id = doc.get("_id") if isinstance(doc, dict) else None
                results[index] = {"id": doc_id, "error": exc.error, "reason": exc.reason}
        if prepared:
            landing = await self._documents.landing(sorted({d["_id"] for _, d in prepared}))

            def weight(item: tuple[int, Doc]) -> int:  # the doc, and the one it lands on
                return json_size(item[1]) + json_size(landing.get(item[1]["_id"]))

            for page in token_pages(prepared, weight):
                await self._write_prepared(page, landing, results, new_edits, inline)
        return [r for r in results if r is not None]

    async def _write_prepared(self, prepared: list[tuple[int, Doc]], landing: dict[str, Doc],
                              results: list[dict | None], new_edits: bool,
                              inline: dict[int, dict[str, DataSource]] | None = None) -> None:
        share = {"share": self.db.share} if self.db.share is not None else {}
        ids = {doc["_id"] for _, doc in prepared}
        answer = await self._call("doc.write_batch", credential=self._credential,
                                  docs=[doc for _, doc in prepared],
                                  current={i: d for i, d in landing.items() if i in ids},
                                  new_edits=new_edits, **share)
        to_store: list[tuple[int, Doc]] = []
        removals: list[Doc] = []
        for (index, doc), verdict in zip(prepared, answer["results"]):
            if "error" in verdict:
                results[index] = {"id": doc["_id"], "error": verdict["error"],
                                  "reason": verdict["reason"]}
            else:
                to_store.append((index, verdict["doc"]))
                removals += verdict.get("removals") or []
        if not to_store:
            return
        with_data = [(i, d) for i, d in to_store if inline and i in inline]
        to_store = [(i, d) for i, d in to_store if not (inline and i in inline)]
        stored = await self._store.bulk_docs([doc for _, doc in to_store], new_edits=new_edits) \
            if to_store else []
        for index, doc in with_data:  # a revision with its attachments' data
            try:
                if new_edits:  # an edit: the next revision of the one it names
                    doc = child_revision(doc, landing.get(doc["_id"]))
                await self._store.put_replicated(  # a conflict if another write came first
                    doc, {name: source() for name, source in inline[index].items()},
                    edit=new_edits)
                result: dict = {"ok": True, "id": doc["_id"], "rev": doc["_rev"]}
            except CouchError as exc:
                result = {"error": exc.error, "reason": exc.reason}
            except StoreError as exc:
                refusal = as_couch(exc)
                result = {"error": refusal.error, "reason": refusal.reason}
            to_store.append((index, doc))
            stored.append(result)
        for (index, doc), result in zip(to_store, stored):
            if "error" in result:
                reason = CONFLICT_REASON if result["error"] == "conflict" else result["reason"]
                results[index] = {"id": doc["_id"], "error": result["error"], "reason": reason}
                continue
            rev = result.get("rev") or doc.get("_rev")
            results[index] = {"ok": True, "id": doc["_id"], "rev": rev}
            self._publish("doc.written", id=doc["_id"], doctype=self.db.doctype, rev=rev,
                          **({"deleted": True} if doc.get("_deleted") else {}))
        if removals:
            for result in await self._store.bulk_docs(removals, new_edits=False):
                if "error" in result:
                    log.warning("removal of %s from a share not stored: %s",
                                result.get("id"), result.get("reason"))

    def _prepare(self, doc: Any, new_edits: bool) -> Doc:
        """A doc as the token is to decide it: a JSON object with an ordinary id (a new one
        when absent), of this database's doctype (given it when it has none)."""
        if not isinstance(doc, dict):
            raise bad_request("Document must be a JSON object")
        doc_id = doc.get("_id")
        if doc_id is None and new_edits:
            doc_id = uuid.uuid4().hex
        check_doc_id(doc_id)
        doctype = doc.get("doctype", self.db.doctype)
        if doctype != self.db.doctype:
            raise forbidden(f"database {self.db.name!r} holds {self.db.doctype!r} documents, "
                            f"not {doctype!r}")
        if not new_edits and not isinstance(doc.get("_rev"), str):
            raise bad_request("new_edits=false needs each document's _rev")
        return {**doc, "_id": doc_id, "doctype": doctype}

    # -- local documents: the credential's own, per database -----------------------------

    def _local_key(self, local_id: str) -> str:
        return f"{LOCAL_NAMESPACE}/{self.db.principal}/{self.db.name}/{local_id}"

    async def get_local(self, local_id: str) -> Doc:
        try:
            doc = await self._store.get_local(self._local_key(local_id))
        except NotFound:
            raise CouchError(404, "not_found", "missing") from None
        return {**doc, "_id": LOCAL_PREFIX + local_id}

    async def put_local(self, local_id: str, doc: Any) -> str:
        """Store a local doc; its new `0-N` rev. A `_rev` other than the stored one (or none
        over an existing doc) is a conflict, as in CouchDB."""
        if not isinstance(doc, dict):
            raise bad_request("Document must be a JSON object")
        key = self._local_key(local_id)
        current = await self._current_local(key)
        if current is not None and doc.get("_rev") != current["_rev"]:
            raise CouchError(409, "conflict", CONFLICT_REASON)
        body = {k: v for k, v in doc.items() if k not in ("_id", "_rev")}
        await self._store.put_local(key, body)
        stored = await self._current_local(key)
        return stored["_rev"] if stored is not None else "0-1"

    async def delete_local(self, local_id: str, rev: str | None) -> None:
        key = self._local_key(local_id)
        current = await self._current_local(key)
        if current is None:
            raise CouchError(404, "not_found", "missing")
        if rev is not None and rev != current["_rev"]:
            raise CouchError(409, "conflict", CONFLICT_REASON)
        await self._store.delete_local(key)

    async def _current_local(self, key: str) -> Doc | None:
        try:
            return await self._store.get_local(key)
        except NotFound:
            return None


