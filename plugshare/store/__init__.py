"""Documents with CouchDB semantics: one contract (`base.Store`), two backends."""

from __future__ import annotations

import re
from pathlib import Path

from plugshare.config import StoreSection
from plugshare.store.base import (
    MAX_LEAVES,
    BadRequest,
    Change,
    ChangesPage,
    Conflict,
    DataAbsent,
    Doc,
    Forbidden,
    NotFound,
    OwnerMismatch,
    RangeNotSatisfiable,
    Seq,
    Store,
    StoreError,
    Unavailable,
)

__all__ = [
    "MAX_LEAVES", "BadRequest", "Change", "ChangesPage", "Conflict", "DataAbsent", "Doc", "Forbidden",
    "RangeNotSatisfiable",
    "NotFound", "OwnerMismatch", "Seq", "Store", "StoreError", "Unavailable",
    "couchdb_database_name", "open_store",
]

NODE_ID_IN_DB_NAME = 12  # base32 characters of the node id in a default database name (60 bits)


def couchdb_database_name(prefix: str, node_name: str, node_id: str | None = None) -> str:
    """CouchDB database names are lowercase `[a-z][a-z0-9_$()+/-]*`: map the node name onto
    that. Lowercasing makes "Alice" and "alice" one name, so with `node_id` the name ends with
    a short form of the node id too (`plugshare-alice-mfrggzdfmztg`): one database per node."""
    name = f"{prefix}-" + re.sub(r"[^a-z0-9_-]", "_", node_name.lower())
    if node_id is not None:
        short = re.sub(r"[^a-z0-9]", "", node_id.lower())[:NODE_ID_IN_DB_NAME]
        if not short:
            raise BadRequest(f"node id {node_id!r} has no letters or digits")
        name += f"-{short}"
    return name


async def open_store(
    section: StoreSection, home: Path, node_name: str, *, node_id: str | None = None
) -> Store:
    """Open the store `node.toml` asks for (the SQLite file lives in the home).

    With `node_id` the store belongs to that node: the default CouchDB database name includes
    it, the store records it when first opened (`_local/plugshare-owner`) and a store recorded
    as another node's is refused with `OwnerMismatch`. Without it (older callers) the name is
    the node name alone and no owner is recorded or checked. A database name configured
    explicitly (a `database` key, when the [store] section has one) is used as it is."""
    if section.backend == "couchdb":
        from plugshare.store.couchdb import CouchDBStore

        assert section.url is not None  # the config model refuses couchdb without url
        name = getattr(section, "database", None) or couchdb_database_name(
            section.database_prefix, node_name, node_id
        )
        return await CouchDBStore.open(
            section.url, name, revs_limit=section.revs_limit, owner=node_id
        )
    from plugshare.store.sqlite import SQLiteStore

    return await SQLiteStore.open(
        home / section.path, revs_limit=section.revs_limit, owner=node_id
    )
