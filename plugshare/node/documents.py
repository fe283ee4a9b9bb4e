"""The owner's documents as principals see them: every access decided by the token, sensitive
doctypes sealed by it, the store underneath.

Documents carry their doctype in a top-level `doctype` field; the API path names it, and a doc
is only ever served under its own doctype.
"""

from __future__ import annotations

import uuid
from typing import Any

from plugshare.node.access import Access, Forbidden, Principal
from plugshare.node.events import EventBus
from plugshare.token.envelope import is_sealed
from plugshare.store import BadRequest, Doc, NotFound, Store

def _check_doctype(doctype: str) -> None:
    if not doctype or doctype.startswith("_") or "/" in doctype or len(doctype) > 200:
        raise BadRequest(f"doctype {doctype!r} must be a non-empty name without '/' or leading '_'")


def _rev_generation(rev: str) -> int:
    head, _, _ = rev.partition("-")
    if not head.isdigit():
        raise BadRequest(f"rev {rev!r} is not of the form N-hash")
    return int(head)


class Documents:
    def __init__(self, store: Store, access: Access, events: EventBus):
        self.store = store
        self.access = access
        self.events = events

    # -- reads ----------------------------------------------------------------------

    async def get(
        self,
        principal: Principal,
        doc_id: str,
        *,
        doctype: str | None = None,
        rev: str | None = None,
        conflicts: bool = False,
    ) -> Doc:
        stored = await self.store.get(doc_id, rev=rev, conflicts=conflicts)
        if doctype is not None and stored.get("doctype") != doctype and not stored.get("_deleted"):
            raise NotFound(f"no document {doc_id!r} of doctype {doctype!r}")
        return self._readable(principal, stored)

    async def list(self, principal: Principal, doctype: str | None = None) -> list[Doc]:
        if doctype is not None:
            _check_doctype(doctype)
            self._require(self.access.may_access_doctype(principal, "read", doctype))
        docs = []
        for stored in await self.store.all_docs():
            if doctype is not None and stored.get("doctype") != doctype:
                continue
            try:
                docs.append(self._readable(principal, stored))
            except Forbidden:
                continue  # a listing shows what the principal may read, and only that
        return docs

    def _readable(self, principal: Principal, stored: Doc) -> Doc:
        if stored.get("_deleted"):
            return stored  # a tombstone carries no data
        return self.access.read(principal, stored)

    # -- writes ---------------------------------------------------------------------

    async def put(
        self, principal: Principal, doctype: str, doc_id: str | None, body: Any
    ) -> tuple[str, str]:
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
        doc = {**body, "_id": doc_id, "doctype": doctype}
        if doc_id.startswith("_"):
            raise BadRequest(f"document ids may not start with '_' ({doc_id!r})")
        await self._check_may_replace(principal, doc_id, doc.get("_rev"))
        self._require(self.access.decide(principal, "write", doc))
        scope = self.access.sealing_scope(doc)
        if scope is not None:
            generation = await self._next_generation(doc_id, doc.get("_rev"))
            doc = self.access.seal(doc, generation, scope)
        rev = await self.store.put(doc)
        self.events.publish("doc.written", id=doc_id, doctype=doctype, rev=rev)
        return doc_id, rev

    async def delete(
        self, principal: Principal, doc_id: str, rev: str, *, doctype: str | None = None
    ) -> str:
        if not rev:
            raise BadRequest("deleting needs the current rev (--rev / ?rev=)")
        current = await self.store.get(doc_id)
        if doctype is not None and current.get("doctype") != doctype:
            raise NotFound(f"no document {doc_id!r} of doctype {doctype!r}")
        self._require(self.access.decide(principal, "write", self.access.metadata(current)))
        # The tombstone keeps the doctype, so shares of that doctype replicate the deletion.
        new_rev = await self.store.put(
            {"_id": doc_id, "_rev": rev, "_deleted": True, "doctype": current["doctype"]})
        self.events.publish("doc.written", id=doc_id, doctype=current["doctype"], rev=new_rev,
                            deleted=True)
        return new_rev

    async def reseal(self, wanted, scope: str) -> int:
        """Re-write sealed (a new revision each) every live doc `wanted(doc)` selects, under
        `scope` ("doctype" or "share:<id>"), then compact so no clear revision stays in the
        database's history. Returns how many were re-written."""
        count = 0
        for doc in await self.store.all_docs():
            if not wanted(doc):
                continue
            plain = self.access.read(self.access.token.owner, doc) if is_sealed(doc) else doc
            generation = int(doc["_rev"].partition("-")[0]) + 1
            await self.store.put(self.access.seal(plain, generation, scope))
            count += 1
        if count:
            await self.store.compact()
        return count

    async def _check_may_replace(self, principal: Principal, doc_id: str, rev: str | None) -> None:
        """A writer may not overwrite a doc it could not write (e.g. one outside its selector)
        by making the new version fit its rule."""
        if rev is None:
            return
        try:
            current = await self.store.get(doc_id)
        except NotFound:
            return
        self._require(self.access.decide(principal, "write", self.access.metadata(current)))

    async def _next_generation(self, doc_id: str, rev: str | None) -> int:
        """The generation the store will give this write: sealed docs bind it as associated
        data. With no `_rev`, a doc whose winner is a tombstone continues after it."""
        if rev is not None:
            return _rev_generation(rev) + 1
        # revs_diff of an impossibly late revision lists every leaf as a possible ancestor:
        # the way to learn a tombstone's generation through the store contract.
        probe = f"{2**31}-{'0' * 32}"
        known = (await self.store.revs_diff({doc_id: [probe]})).get(doc_id, {})
        leaves = known.get("possible_ancestors", [])
        return max((_rev_generation(r) for r in leaves), default=0) + 1

    @staticmethod
    def _require(decision) -> None:
        if not decision.allowed:
            raise Forbidden(decision.reason)
