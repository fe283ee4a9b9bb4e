"""The owner's documents as callers see them: each access one token command, the store
underneath.

Documents carry their doctype in a top-level `doctype` field; the API path names it, and a doc
is only ever served under its own doctype. The node reads and writes the store; the token
decides, opens and seals (see `plugshare.token.door`).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Awaitable, Callable

from plugshare.node.events import EventBus
from plugshare.node.token_pages import token_pages
from plugshare.store import BadRequest, Conflict, Doc, NotFound, Store

log = logging.getLogger("plugshare.documents")
TokenCall = Callable[..., Awaitable[Any]]
RESEAL_PAGE = 500


def _check_doctype(doctype: str) -> None:
    if not doctype or doctype.startswith("_") or "/" in doctype or len(doctype) > 200:
        raise BadRequest(f"doctype {doctype!r} must be a non-empty name without '/' or leading '_'")


def _rev_generation(rev: str) -> int:
    head, _, _ = rev.partition("-")
    if not head.isdigit():
        raise BadRequest(f"rev {rev!r} is not of the form N-hash")
    return int(head)


class Documents:
    def __init__(self, store: Store, call: TokenCall, events: EventBus):
        self.store = store
        self._call = call
        self.events = events

    # -- reads ----------------------------------------------------------------------

    async def get(self, credential: str, doc_id: str, *, doctype: str | None = None,
                  rev: str | None = None, conflicts: bool = False) -> Doc:
        try:
            stored = await self.store.get(doc_id, rev=rev, conflicts=conflicts)
        except NotFound:
            stored = None
        if stored is None:
            # Asked all the same, so "missing" and "not yours" cost and answer the same.
            await self._call("doc.read", credential=credential, doc=_probe(doc_id, doctype),
                             doctype=doctype)
            raise NotFound(f"no document {doc_id!r}")
        answer = await self._call("doc.read", credential=credential, doc=stored, doctype=doctype)
        return answer["doc"]

    async def list(self, credential: str, doctype: str | None = None) -> dict[str, Any]:
        """{"docs": what the caller may read, "tampered": ids whose stored form failed the
        token's checks} (rows the caller may not read are simply left out)."""
        if doctype is not None:
            _check_doctype(doctype)
        rows = [doc for doc in await self.store.all_docs()
                if doctype is None or doc.get("doctype") == doctype]
        listing: dict[str, Any] = {"docs": [], "tampered": []}
        for page in token_pages(rows) if rows else [[]]:  # with none, the token still decides
            answer = await self._call("doc.list", credential=credential, doctype=doctype,
                                      docs=page)
            listing["docs"] += answer["docs"]
            listing["tampered"] += answer["tampered"]
        return listing

    # -- writes ---------------------------------------------------------------------

    async def put(self, credential: str, doctype: str, doc_id: str | None,
                  body: Any) -> tuple[str, str]:
        """Create or update; returns (id, new rev)."""
        _check_doctype(doctype)
        if not isinstance(body, dict):
            raise BadRequest("a document must be a JSON object")
        if body.get("doctype", doctype) != doctype:
            raise BadRequest(f"the body's doctype {body['doctype']!r} is not {doctype!r}")
        if doc_id is None:
            doc_id = body.get("_id") or uuid.uuid4().hex
        elif body.get("_id", doc_id) != doc_id:
            raise BadRequest(f"the body's _id {body['_id']!r} is not {doc_id!r}")
        if not isinstance(doc_id, str) or doc_id.startswith("_"):
            raise BadRequest(f"document ids are text and may not start with '_' ({doc_id!r})")
        doc = {**body, "_id": doc_id, "doctype": doctype}
        current = (await self.landing([doc_id])).get(doc_id)
        # Over a tombstone, a write without `_rev` continues after it.
        after = [current["_rev"]] if current is not None and current.get("_deleted") else []
        generation = _next_generation(doc.get("_rev"), after)
        answer = await self._call("doc.write", credential=credential, doc=doc, current=current,
                                  generation=generation)
        rev = await self._store_put(answer["doc"])
        if answer.get("removals"):
            await self._store_removals(answer["removals"])
        self.events.publish("doc.written", id=doc_id, doctype=doctype, rev=rev)
        return doc_id, rev

    async def _store_removals(self, removals: list[Doc]) -> None:
        """Store the token's removals (tombstones beside a write that took a doc out of
        shares this node owns): each share carries its own to the members like a deletion,
        while the live revision, outside the share, stays here and wins."""
        for result in await self.store.bulk_docs(removals, new_edits=False):
            if "error" in result:  # e.g. the doc's leaf cap: the members keep their copy
                log.warning("removal of %s from a share not stored: %s", result.get("id"),
                            result.get("reason"))

    async def delete(self, credential: str, doc_id: str, rev: str, *,
                     doctype: str | None = None) -> str:
        if not rev:
            raise BadRequest("deleting needs the current rev (--rev / ?rev=)")
        current = await self._winner(doc_id)
        if current is None or current.get("_deleted") or (
                doctype is not None and current.get("doctype") != doctype):
            await self._call("doc.read", credential=credential, doc=_probe(doc_id, doctype),
                             doctype=doctype)
            raise NotFound(f"no document {doc_id!r}")
        answer = await self._call("doc.delete", credential=credential, current=current, rev=rev)
        new_rev = await self._store_put(answer["doc"])
        self.events.publish("doc.written", id=doc_id, doctype=current.get("doctype"),
                            rev=new_rev, deleted=True)
        return new_rev

    async def _store_put(self, doc: Doc) -> str:
        try:
            return await self.store.put(doc)
        except Conflict:
            # The store's message names the winning rev; the caller may not be allowed to
            # read it (it may be another app's document), so say no more than CouchDB does.
            raise Conflict("document update conflict: send the current _rev") from None

    async def leaves(self, doc_ids: list[str]) -> dict[str, list[str]]:
        """Every leaf revision (live or deleted) of each of `doc_ids` the store holds, in one
        store call."""
        # revs_diff of an impossibly late revision lists every leaf as a possible ancestor:
        # the way to learn a document's leaves through the store contract.
        probe = f"{2**31}-{'0' * 32}"
        diff = await self.store.revs_diff({doc_id: [probe] for doc_id in doc_ids})
        return {doc_id: known["possible_ancestors"] for doc_id, known in diff.items()
                if known.get("possible_ancestors")}

    async def reseal(self, credential: str) -> int:
        """Re-write, sealed, every live doc whose stored form the token would now write
        differently (after `encrypt DOCTYPE` or a new encrypted share), one token call per
        page; then compact so no clear revision stays in the database. Returns the count."""
        docs = [doc for doc in await self.store.all_docs() if not doc.get("_deleted")]
        count = 0
        for page in token_pages(docs, batch=RESEAL_PAGE):
            answer = await self._call("doc.reseal", credential=credential, docs=page)
            for sealed in answer["docs"]:
                await self.store.put(sealed)
                count += 1
        if count:
            await self.store.compact()
        return count

    async def refuse_sealing_files(self, credential: str, doctype: str, action: str) -> None:
        """Before sealing `doctype` (made sensitive, or an encrypted share over it): refused
        while any of its live documents carries attachments, whose data cannot be sealed
        yet (it would stay in clear under a sealed document). The owner's question alone."""
        with_files = [doc["_id"] for doc in await self.store.all_docs()
                      if doc.get("doctype") == doctype and not doc.get("_deleted")
                      and doc.get("_attachments")]
        if with_files:
            await self._call("owner.check", credential=credential, action=action)
            raise BadRequest(
                f"{len(with_files)} {doctype!r} document(s) carry attachments (e.g. "
                f"{with_files[0]!r}), whose data cannot be sealed yet: remove them first")

    async def _winner(self, doc_id: str) -> Doc | None:
        return (await self.store.winners([doc_id])).get(doc_id)

    async def landing(self, doc_ids: list[str]) -> dict[str, Doc]:
        """What a write of each of `doc_ids` lands on: its live winner, else the winning
        tombstone of a deleted doc (it keeps the doctype a new write may not change), in one
        store call whatever the count; ids the store never held are left out."""
        return await self.store.winners(doc_ids, tombstones=True)

def _next_generation(rev: str | None, leaves: list[str]) -> int:
    """The generation the store will give this write: sealed docs bind it as associated data.
    With no `_rev`, a doc whose winner is a tombstone (`leaves`) continues after it."""
    if rev is not None:
        if not isinstance(rev, str):
            raise BadRequest("_rev must be text of the form N-hash")
        return _rev_generation(rev) + 1
    return max((_rev_generation(r) for r in leaves), default=0) + 1


def _probe(doc_id: str, doctype: str | None) -> Doc:
    """What the token is shown for a missing doc: a tombstone-shaped nothing, so a missing
    doc and one the caller may not read are decided (and logged) alike."""
    return {"_id": doc_id, "_deleted": True, "doctype": doctype or ""}
