"""Keeps a store's checked writes of a document apart from its other edits of it.

The CouchDB backend writes an edit that brings new attachment data as a replicated revision
(`new_edits=false`: the data inline, under a revision the node chose). CouchDB never refuses
such a write, so the store checks just before that the edit still continues the winning
revision. Ordinary edits (`new_edits=true`) are checked by the server as they land; one of
this process landing between that check and that write would make a second branch instead
of a 409. The gate lets any number of ordinary edits of a document run at once, or one
checked write alone; a checked write waiting keeps new ordinary edits of its document back,
so a stream of them cannot starve it. Writers of other processes are not this gate's to
order: the node holds its database alone (`_local/plugshare-owner`).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Iterable

import trio


class EditGate:
    def __init__(self) -> None:
        self._ordinary: Counter[str] = Counter()  # doc id -> ordinary edits in flight
        self._checked: set[str] = set()  # doc ids with a checked write in flight
        self._waiting: Counter[str] = Counter()  # doc id -> checked writes waiting
        self._lot = trio.lowlevel.ParkingLot()

    @contextlib.asynccontextmanager
    async def ordinary(self, doc_ids: Iterable[str]) -> AsyncIterator[None]:
        """Around an edit the server checks itself (of several documents: `_bulk_docs`)."""
        ids = set(doc_ids)
        while any(i in self._checked or i in self._waiting for i in ids):
            await self._lot.park()
        self._ordinary.update(ids)
        try:
            yield
        finally:
            self._ordinary.subtract(ids)
            for doc_id in ids:
                if self._ordinary[doc_id] <= 0:
                    del self._ordinary[doc_id]
            self._lot.unpark_all()

    @contextlib.asynccontextmanager
    async def checked(self, doc_id: str) -> AsyncIterator[None]:
        """Around a check of the winning revision and the write it allows."""
        self._waiting[doc_id] += 1
        try:
            while doc_id in self._checked or doc_id in self._ordinary:
                await self._lot.park()
        finally:
            self._waiting[doc_id] -= 1
            if not self._waiting[doc_id]:
                del self._waiting[doc_id]
                self._lot.unpark_all()  # ordinary edits it kept back (it may be cancelled)
        self._checked.add(doc_id)
        try:
            yield
        finally:
            self._checked.discard(doc_id)
            self._lot.unpark_all()
