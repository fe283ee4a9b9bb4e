"""Virtual databases: what a `/couch/{db}` name means for a credential (pure).

A doctype's database is `/couch/{doctype}` (the documents of that doctype the token lets the
credential read); a share's is `/couch/share:{name}` (the documents in the share's scope). The
token says which a credential may open (`db.list`); a name it may not open is "not found",
whether the share or doctype exists or not."""

from __future__ import annotations

from typing import Any

import attrs

from plugshare.node.couch.errors import no_database

SHARE_PREFIX = "share:"


@attrs.frozen
class Database:
    name: str  # as the client names it
    doctype: str  # of every document in it
    share: str | None = None  # the share's id, for a share's database
    principal: str = ""  # who opened it, as the token labels it ("app:notes")

    def scope(self) -> dict[str, str]:
        """The token arguments that confine a command to this database."""
        return {"share": self.share} if self.share is not None else {"doctype": self.doctype}


def valid_doctype(name: str) -> bool:
    return bool(name) and not name.startswith("_") and "/" not in name and len(name) <= 200 \
        and name.isprintable()


def resolve(name: str, opened: dict[str, Any]) -> Database:
    """The database `name` names among those `opened` (the token's `db.list` answer)."""
    label = opened.get("principal", "")
    if name.startswith(SHARE_PREFIX):
        wanted = name[len(SHARE_PREFIX):]
        named = [s for s in opened["shares"] if s["name"] == wanted] or \
            [s for s in opened["shares"] if s["id"] == wanted]
        if len(named) != 1:
            raise no_database()
        return Database(name, named[0]["doctype"], named[0]["id"], label)
    if valid_doctype(name) and (opened["any_doctype"] or name in opened["doctypes"]):
        return Database(name, name, None, label)
    raise no_database()


def names(opened: dict[str, Any]) -> list[str]:
    """Every database the credential may open, sorted (as `_all_dbs` lists them)."""
    return sorted([*opened["doctypes"], *(SHARE_PREFIX + s["name"] for s in opened["shares"])])
