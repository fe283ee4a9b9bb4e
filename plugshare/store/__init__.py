"""Documents with CouchDB semantics: one contract (`base.Store`), two backends."""

from __future__ import annotations

import re
from pathlib import Path

from plugshare.config import StoreSection
from plugshare.store.base import (
    BadRequest,
    Change,
    ChangesPage,
    Conflict,
    Doc,
    NotFound,
    Seq,
    Store,
    StoreError,
    Unavailable,
)

__all__ = [
    "BadRequest", "Change", "ChangesPage", "Conflict", "Doc", "NotFound", "Seq", "Store",
    "StoreError", "Unavailable", "couchdb_database_name", "open_store",
]


def couchdb_database_name(prefix: str, node_name: str) -> str:
    """CouchDB database names are lowercase `[a-z][a-z0-9_$()+/-]*`: map the node name onto that."""
    return f"{prefix}-" + re.sub(r"[^a-z0-9_-]", "_", node_name.lower())


async def open_store(section: StoreSection, home: Path, node_name: str) -> Store:
    """Open the store `node.toml` asks for (the SQLite file lives in the home)."""
    if section.backend == "couchdb":
        from plugshare.store.couchdb import CouchDBStore

        assert section.url is not None  # the config model refuses couchdb without url
        name = couchdb_database_name(section.database_prefix, node_name)
        return await CouchDBStore.open(section.url, name, revs_limit=section.revs_limit)
    from plugshare.store.sqlite import SQLiteStore

    return await SQLiteStore.open(home / section.path, revs_limit=section.revs_limit)
