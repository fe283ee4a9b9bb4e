"""The owner's files: documents' attachments as callers see them, streamed.

Each request is one token command carrying the caller's credential, decided as the
document's own access (`doc.read` for a read, `att.write` for a write or a removal: one
audit entry each); the data then streams between the caller and the store, never whole in
memory. The store checks names, digests and lengths (`plugshare.store.attachments`); here,
the caps: the node's own per-attachment cap and the cap of the shares the document is in.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import trio

from plugshare.errors import PlugshareError
from plugshare.node.documents import Documents, _check_doctype, _probe
from plugshare.store import BadRequest, Conflict, NotFound
from plugshare.node import sealed_files
from plugshare.store.attachments import (AttachmentMeta, StreamCheck, check_attachment_name,
                                         check_content_type)

log = logging.getLogger("plugshare.files")
DEFAULT_MAX_ATTACHMENT = 4 * 1024**3  # bytes: the node's cap on one attachment


class TooLarge(PlugshareError):
    """An attachment over a cap (HTTP 413)."""

    status, error = 413, "too_large"

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


async def capped(chunks: AsyncIterable[bytes], cap: int, why: str) -> AsyncIterator[bytes]:
    """`chunks`, refused (`TooLarge`) as soon as more than `cap` bytes have come."""
    total = 0
    async for piece in chunks:
        total += len(piece)
        if total > cap:
            raise TooLarge(f"the attachment is over {why} of {cap} bytes")
        yield piece


class Files:
    def __init__(self, documents: Documents, *, max_size: int = DEFAULT_MAX_ATTACHMENT,
                 open_stored=None):
        self.documents = documents
        self.max_size = max_size
        # Reads the stored data; the node's also fetches what a share fetched on read lacks.
        self._open_stored = open_stored

    @property
    def store(self):
        return self.documents.store

    async def _open_data(self, doc_id: str, name: str, *, rev: str,
                         range: tuple[int, int] | None):
        opener = self._open_stored or self.store.open_attachment
        return await opener(doc_id, name, rev=rev, range=range)

    async def _call(self, command: str, **args: Any) -> Any:
        return await self.documents._call(command, **args)

    async def put(self, credential: str, doctype: str, doc_id: str, name: str,
                  rev: str | None, content_type: str, chunks: AsyncIterable[bytes], *,
                  digest: str | None = None, length: int | None = None,
                  share: str | None = None) -> str:
        """Stream `chunks` in as attachment `name` of the document at `rev` (the current
        one; None: a new document of `doctype`, made with this attachment); the new rev.
        Whatever fails leaves the document as it was (a document made for the upload is
        deleted again: a tombstone stays)."""
        _check_doctype(doctype)
        check_attachment_name(name)
        check_content_type(content_type)
        current = (await self.documents.landing([doc_id])).get(doc_id)
        answer = await self._call("att.write", credential=credential, doctype=doctype,
                                  id=doc_id, name=name, current=current,
                                  content_type=content_type, **_scope(share))
        cap, why = self.max_size, "this node's cap"
        if answer.get("max_length") is not None and answer["max_length"] < cap:
            cap, why = answer["max_length"], "the share's cap"
        if length is not None and length > cap:
            raise TooLarge(f"the attachment ({length} bytes) is over {why} of {cap} bytes")
        base = answer.get("base")
        live = base is None
        if live and rev != current["_rev"]:
            # also a rev of a losing branch: the token decided on the winner
            raise Conflict("document update conflict: send the current rev")
        if not live and rev is not None:
            raise Conflict(f"document {doc_id!r} does not exist: send no rev to create it")
        if not live:
            rev = await self.store.put(base)  # the doc the attachment is written on
        try:
            if answer.get("seal"):
                new_rev = await self._put_sealed(
                    answer["seal"], doc_id, rev, name, content_type, capped(chunks, cap, why),
                    digest=digest, length=length)
            else:
                new_rev = await self.store.put_attachment(
                    doc_id, rev, name, content_type, capped(chunks, cap, why),
                    digest=digest, length=length)
        except BaseException:
            if not live:  # no half-made document stays live behind a failed upload
                with trio.CancelScope(shield=True):
                    try:
                        await self.store.delete(doc_id, rev)
                    except Exception as exc:  # the upload's own error is the one to tell
                        log.warning("document %r made for a failed upload stays: %s",
                                    doc_id, exc)
            raise
        self.documents.events.publish("doc.written", id=doc_id, doctype=doctype, rev=new_rev)
        return new_rev

    async def _put_sealed(self, seal: dict, doc_id: str, rev: str, name: str,
                          content_type: str, chunks: AsyncIterable[bytes], *,
                          digest: str | None, length: int | None) -> str:
        """Seal `chunks` in the token as they stream in, staging each sealed chunk in the
        store (durable, kept from GC), then write the new revision: its envelope, re-sealed
        by the token for the new generation, binds the new stubs. The clear data is checked
        against the declared digest and length here; the store checks the sealed data."""
        [current] = await self.store.bulk_get([(doc_id, rev)])
        parent_gen, _, parent_hash = rev.partition("-")
        generation = int(parent_gen) + 1
        clear_check = StreamCheck(digest=digest, length=length)
        sealed_check = StreamCheck()

        async def checked() -> AsyncIterator[bytes]:
            async for piece in chunks:
                clear_check.update(piece)
                yield piece

        staged: list[bytes] = []
        try:
            batch: list[bytes] = []
            async for sealed in sealed_files.seal_stream(self._call, seal, doc_id, name,
                                                         generation, checked()):
                sealed_check.update(sealed)
                batch.append(sealed)
                if len(batch) == sealed_files.BATCH:
                    staged.extend(await self.store.stage_chunks(batch))
                    batch = []
            if batch:
                staged.extend(await self.store.stage_chunks(batch))
            clear_check.finish()
            new = {"content_type": content_type, "digest": sealed_check.finish(),
                   "length": sealed_check.length, "revpos": generation}
            others = {n: {k: a[k] for k in ("content_type", "digest", "length", "revpos")}
                      for n, a in (current.get("_attachments") or {}).items() if n != name}
            answer = await self._call("att.seal_revision", current=current,
                                      attachments={**others, name: new}, generation=generation)
            new_rev = f"{generation}-{uuid.uuid4().hex}"
            doc = {**answer["doc"], "_id": doc_id, "_rev": new_rev,
                   "_revisions": {"start": generation,
                                  "ids": [new_rev.partition("-")[2], parent_hash]},
                   "_attachments": {**{n: {**a, "stub": True} for n, a in others.items()},
                                    name: {**new, "follows": True}}}

            # Linked where the chunks are staged, with the md5 taken on the way in (the
            # embedded store reads nothing back); a conflict if another write landed on the
            # document while the data came in.
            await self.store.put_staged(doc, {name: staged}, digests={name: new["digest"]},
                                        edit=True)
            return new_rev
        finally:
            if staged:
                with trio.CancelScope(shield=True):
                    await self.store.release_chunks(staged)

    async def stub(self, credential: str, doctype: str, doc_id: str, name: str, *,
                   rev: str | None = None) -> tuple[str, dict[str, Any], dict | None]:
        """(the revision read, the attachment's stub as the reader sees it, the scope its
        data is sealed under or None) once the token lets the caller read the document;
        `NotFound` alike for a missing doc, name or one it may not read."""
        check_attachment_name(name)
        doc = await self.documents.get(credential, doc_id, doctype=doctype, rev=rev)
        stub = (doc.get("_attachments") or {}).get(name)
        if doc.get("_deleted") or not isinstance(stub, dict):
            raise NotFound(f"document {doc_id!r} has no attachment {name!r}")
        stub, seal = await self.sealing(doc_id, doc["_rev"], name, stub)
        return doc["_rev"], stub, seal

    async def sealing(self, doc_id: str, rev: str, name: str, stub: dict
                      ) -> tuple[dict, dict | None]:
        """(the reader's `stub` of a read the token allowed, with the stored data's length
        when sealed; the scope it is sealed under, or None): what `open` takes."""
        [stored] = await self.store.bulk_get([(doc_id, rev)])
        seal = (await self._call("att.sealing", doc=stored))["seal"]
        if seal is not None:  # the token gave the clear length; the store holds the sealed data
            stub = {**stub, "sealed_length": stored["_attachments"][name]["length"]}
        return stub, seal

    async def open(self, doc_id: str, name: str, rev: str, range: tuple[int, int] | None,
                   *, stub: dict | None = None, seal: dict | None = None
                   ) -> tuple[AttachmentMeta, AsyncIterator[bytes]]:
        """The data of an attachment `stub` allowed the read of (same request); for a
        sealed one (`seal`, and its `stub`), opened by the token as it streams out."""
        if seal is None:
            return await self._open_data(doc_id, name, rev=rev, range=range)
        assert stub is not None
        start, stop = range if range is not None else (0, stub["length"])
        if stop <= start:
            async def nothing() -> AsyncIterator[bytes]:
                return
                yield b""
            return AttachmentMeta(name, stub["content_type"], stub["length"], stub["digest"],
                                  stub["revpos"]), nothing()
        sealed_length = stub["sealed_length"]
        first, sealed_start, sealed_stop = sealed_files.sealed_range(sealed_length, start, stop)
        meta, data = await self._open_data(doc_id, name, rev=rev,
                                           range=(sealed_start, sealed_stop))
        return meta, sealed_files.open_stream(self._call, seal, doc_id, name, meta.revpos,
                                              sealed_length, first, start, stop, data)

    async def delete(self, credential: str, doctype: str, doc_id: str, name: str,
                     rev: str | None, *, share: str | None = None) -> str:
        _check_doctype(doctype)
        check_attachment_name(name)
        if not rev:
            raise BadRequest("removing an attachment needs the current rev (?rev= or If-Match)")
        current = (await self.documents.landing([doc_id])).get(doc_id)
        if current is None or current.get("_deleted"):
            await self._call("doc.read", credential=credential, doc=_probe(doc_id, doctype),
                             doctype=doctype, **_scope(share))
            raise NotFound(f"no document {doc_id!r}")
        await self._call("att.write", credential=credential, doctype=doctype, id=doc_id,
                         name=name, current=current, **_scope(share))
        if rev != current["_rev"]:
            raise Conflict("document update conflict: send the current rev")
        new_rev = await self.store.delete_attachment(doc_id, rev, name)
        self.documents.events.publish("doc.written", id=doc_id, doctype=doctype, rev=new_rev)
        return new_rev


def _scope(share: str | None) -> dict[str, str]:
    """The token argument confining a command to a share's database (the CouchDB API's)."""
    return {"share": share} if share is not None else {}
