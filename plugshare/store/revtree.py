"""Revision trees: CouchDB's model of a document's history, pure (no I/O).

A revision id is `N-<32 hex>`: `N` is the generation (1 for a new document, parent + 1 for an
edit) and the hash is an MD5 over the parent rev, the deleted flag and the canonical JSON body,
so the same edit made on two nodes gets the same id.

A document's revisions form a forest: normally one tree rooted at generation 1, but stemming
(keeping only `revs_limit` ancestors per leaf) and replicating from a stemmed source can leave
several trees whose roots have a higher generation. This module models it as nodes keyed by
rev id, each with a parent pointer (None at a root). Merging a replicated path links the path's
revisions into that graph; because a rev id names its ancestry, this gives the same trees as
CouchDB's `couch_key_tree` merge followed by its stemming (which re-joins overlapping trees),
whatever order the paths arrive in.

The leaves are the document's current revisions; the winner is the leaf that sorts highest by
(not deleted, generation, hash in byte order), and the other live leaves are its conflicts.

This module also parses the documents callers hand to a store (`parse_doc`), so every backend
refuses the same bad input with the same `BadRequest`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import attrs

from plugshare.store.attachments import parse_attachments
from plugshare.store.base import LOCAL_PREFIX, RESERVED_FIELDS, BadRequest, Conflict, Forbidden

DEFAULT_REVS_LIMIT = 1000

_REV_RE = re.compile(r"([1-9][0-9]*)-([0-9a-f]{32})")
_HASH_RE = re.compile(r"[0-9a-f]{32}")


# -- revision ids ------------------------------------------------------------------------


def parse_rev(rev: object) -> tuple[int, str]:
    """Split `"N-<32 hex>"` into `(N, hash)`; anything else is a `BadRequest`."""
    match = _REV_RE.fullmatch(rev) if isinstance(rev, str) else None
    if match is None:
        raise BadRequest(f"invalid revision {rev!r}: expected 'N-<32 lowercase hex>' with N >= 1")
    return int(match[1]), match[2]


def make_rev(pos: int, rev_hash: str) -> str:
    return f"{pos}-{rev_hash}"


def compute_rev(parent: str | None, deleted: bool, body: Mapping[str, Any]) -> str:
    """The id of the revision made by writing `body` (no `_` fields) on top of `parent`."""
    pos = 1 if parent is None else parse_rev(parent)[0] + 1
    digest = hashlib.md5(canonical_json([parent, deleted, body]), usedforsecurity=False)
    return make_rev(pos, digest.hexdigest())


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8: equal JSON values give equal bytes."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def check_json(value: Any, where: str = "document") -> None:
    """Raise `BadRequest` unless `value` is plain JSON: dicts with string keys, lists, strings
    (valid Unicode), finite numbers, booleans and None. A silent conversion (an int key turned
    into a string, NaN into invalid JSON) would otherwise store something else than was sent."""
    try:
        _check_json(value, where)
    except RecursionError:
        raise BadRequest(f"{where} is nested too deeply") from None


_SCALARS = (type(None), bool, int)


def _check_json(value: Any, where: str) -> None:
    kind = type(value)
    if kind is str:
        _check_text(value, where)
    elif kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise BadRequest(f"{where} has a non-string key {key!r}")
            _check_text(key, where)
            _check_json(item, where)
    elif kind is list or kind is tuple:
        for item in value:
            _check_json(item, where)
    elif kind is float:
        if not math.isfinite(value):
            raise BadRequest(f"{where} holds {value!r}, which JSON cannot represent")
    elif kind not in _SCALARS:
        raise BadRequest(f"{where} holds a {kind.__name__}, which is not a JSON value")


def _check_text(text: str, where: str) -> None:
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            raise BadRequest(f"{where} holds a string that is not valid Unicode") from None


# -- replicated histories ---------------------------------------------------------------


def parse_history(rev: object, revisions: object) -> tuple[str, ...]:
    """Validate a replicated revision's `_rev` and `_revisions` and return its path, newest
    first (`("3-c", "2-b", "1-a")`). Without `_revisions` the path is just `_rev`.

    A forged or malformed history is a `BadRequest`: ids must be 32 lowercase hex, `start`
    >= 1, the path cannot reach below generation 1, and `_rev` must be `start-ids[0]`."""
    pos, rev_hash = parse_rev(rev)
    if revisions is None:
        return (make_rev(pos, rev_hash),)
    if not isinstance(revisions, Mapping) or set(revisions) != {"start", "ids"}:
        raise BadRequest('_revisions must be an object {"start": N, "ids": [hash, ...]}')
    start, ids = revisions["start"], revisions["ids"]
    if type(start) is not int or start < 1:
        raise BadRequest(f"_revisions.start must be an integer >= 1, not {start!r}")
    if not isinstance(ids, list) or not ids:
        raise BadRequest("_revisions.ids must be a non-empty list of revision hashes")
    if len(ids) > start:
        raise BadRequest(
            f"_revisions lists {len(ids)} ids but start is {start}: generations below 1"
        )
    for item in ids:
        if not isinstance(item, str) or _HASH_RE.fullmatch(item) is None:
            raise BadRequest(f"_revisions.ids holds {item!r}, not a 32 lowercase hex hash")
    if (start, ids[0]) != (pos, rev_hash):
        raise BadRequest(f"_rev {rev} does not match _revisions (start {start}, {ids[0]})")
    return tuple(make_rev(start - i, item) for i, item in enumerate(ids))


def history_of(path: Sequence[str]) -> dict[str, Any]:
    """`_revisions` for a path given newest first (the inverse of `parse_history`)."""
    pos = parse_rev(path[0])[0]
    return {"start": pos, "ids": [rev.partition("-")[2] for rev in path]}


# -- documents handed to a store ----------------------------------------------------------


@attrs.frozen
class ParsedDoc:
    """A document a caller asked to write, split into its parts and checked."""

    id: str
    rev: str | None  # `_rev`: the parent for an edit, the revision itself when replicated
    deleted: bool
    body: dict[str, Any]  # the fields without `_` prefix; empty for a tombstone
    path: tuple[str, ...] | None  # replicated: the revision and its ancestors, newest first
    # `_attachments` as sent (attachments.Stub / Follows; a store adds its own staged kinds)
    attachments: dict[str, Any] = attrs.field(factory=dict)

    @property
    def is_local(self) -> bool:
        return self.id.startswith(LOCAL_PREFIX)


def overtaken_edit(parsed: ParsedDoc, winner: str | None) -> Conflict | None:
    """For a replicated revision made from an edit (its path: itself, then the revision it
    edits): the `Conflict` to answer when it no longer continues the document's winning
    revision `winner` (a deleted one included) or, with no parent, would make a document
    that exists (`winner` not None): another write came first. None when it may go."""
    assert parsed.path is not None
    if (parsed.path[1] if len(parsed.path) > 1 else None) == winner:
        return None
    return Conflict(f"document {parsed.id!r}: the revision this edit continues is no longer "
                    "the current one")


def check_doc_id(doc_id: object) -> str:
    """A document id is a non-empty string; only `_local/<name>` may start with `_`."""
    if not isinstance(doc_id, str) or not doc_id:
        raise BadRequest(f"_id must be a non-empty string, not {doc_id!r}")
    _check_text(doc_id, "_id")
    if doc_id.startswith("_") and (not doc_id.startswith(LOCAL_PREFIX) or doc_id == LOCAL_PREFIX):
        raise BadRequest(f"_id {doc_id!r}: only '_local/<name>' ids may start with '_'")
    return doc_id


def parse_doc(doc: object, *, new_edits: bool = True) -> ParsedDoc:
    """Check a document for `put`/`bulk_docs` and split it; bad input is a `BadRequest`.

    With `new_edits=False` (replication) `_rev` is required and `_revisions`, when present,
    must be a valid history ending in it. With `new_edits=True` a `_revisions`, when present,
    must agree with `_rev`. `_conflicts` is accepted and ignored (so a document read with
    `conflicts=True` can be written back). A tombstone keeps its body, as in CouchDB."""
    if not isinstance(doc, dict):
        raise BadRequest(f"a document must be a JSON object, not {type(doc).__name__}")
    doc_id = check_doc_id(doc.get("_id"))
    body: dict[str, Any] = {}
    for key, value in doc.items():
        if type(key) is not str:
            raise BadRequest(f"document {doc_id!r} has a non-string key {key!r}")
        if key.startswith("_"):
            if key not in RESERVED_FIELDS:
                raise BadRequest(f"document {doc_id!r}: unknown special field {key!r}")
        else:
            body[key] = value
    check_json(body, f"document {doc_id!r}")
    deleted = doc.get("_deleted", False)
    if type(deleted) is not bool:
        raise BadRequest(f"document {doc_id!r}: _deleted must be true or false, not {deleted!r}")
    rev = doc.get("_rev")
    attachments: dict[str, Any] = {}
    if "_attachments" in doc:
        if doc_id.startswith(LOCAL_PREFIX):
            raise BadRequest(f"document {doc_id!r}: local documents have no attachments")
        attachments = parse_attachments(doc_id, doc["_attachments"], new_edits=new_edits)
    if doc_id.startswith(LOCAL_PREFIX):
        if not new_edits:
            raise BadRequest(f"document {doc_id!r}: local documents are never replicated")
        return ParsedDoc(doc_id, None, deleted, {} if deleted else body, None)
    revisions = doc.get("_revisions")
    path: tuple[str, ...] | None = None
    try:
        if not new_edits or revisions is not None:
            if rev is None:
                needs = "_revisions needs" if new_edits else "a replicated revision needs"
                raise BadRequest(f"{needs} _rev")
            path = parse_history(rev, revisions)
        elif rev is not None:
            parse_rev(rev)
    except BadRequest as exc:
        raise BadRequest(f"document {doc_id!r}: {exc.reason}") from None
    return ParsedDoc(doc_id, rev, deleted, body, None if new_edits else path, attachments)


def check_local_id(local_id: object) -> str:
    """A local document's id (without `_local/`); `BadRequest` if unusable."""
    if not isinstance(local_id, str) or not local_id:
        raise BadRequest(f"a local document id must be a non-empty string, not {local_id!r}")
    check_doc_id(LOCAL_PREFIX + local_id)
    return local_id


def parse_local_doc(local_id: str, doc: object) -> dict[str, Any]:
    """The fields of a local document, checked like any document's (both backends)."""
    if not isinstance(doc, dict):
        raise BadRequest(f"a document must be a JSON object, not {type(doc).__name__}")
    full_id = LOCAL_PREFIX + local_id
    if doc.get("_id", full_id) != full_id:
        raise BadRequest(f"_id {doc['_id']!r} does not match the local document {full_id!r}")
    body = {}
    for key, value in doc.items():
        if type(key) is not str:
            raise BadRequest(f"document {full_id!r} has a non-string key {key!r}")
        if not key.startswith("_"):
            body[key] = value
        elif key not in ("_id", "_rev", "_revisions"):  # a local doc has no history: the
            # `_revisions` CouchDB's replicator sends with its checkpoint is dropped, as there
            raise BadRequest(f"document {full_id!r}: unknown special field {key!r}")
    check_json(body, f"document {full_id!r}")
    return body


# -- the tree -----------------------------------------------------------------------------


@attrs.frozen
class Leaf:
    """A current revision of a document (a leaf of its revision tree)."""

    rev: str
    pos: int
    hash: str
    deleted: bool

    def sort_key(self) -> tuple[bool, int, str]:
        """Higher wins: live before deleted, then generation, then hash (byte order)."""
        return (not self.deleted, self.pos, self.hash)


class _Node(NamedTuple):
    pos: int
    hash: str
    parent: str | None  # None at a root: generation 1, or the oldest kept after stemming
    deleted: bool  # a tombstone; always False on inner nodes, so equal trees compare equal


class RevTree:
    """The revision forest of one document. Mutable; `copy()` is cheap (nodes are frozen).

    Besides the nodes it keeps how many children each revision has, so finding, counting and
    testing leaves costs O(leaves) or O(1), not a walk over every revision."""

    __slots__ = ("_nodes", "_children")

    def __init__(self) -> None:
        self._nodes: dict[str, _Node] = {}
        self._children: dict[str, int] = {}  # rev -> its number of children (absent: a leaf)

    # -- reading

    def __contains__(self, rev: object) -> bool:
        return rev in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RevTree) and self._nodes == other._nodes

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"RevTree({[(rev, node.parent) for rev, node in self._nodes.items()]!r})"

    def copy(self) -> RevTree:
        twin = RevTree()
        twin._nodes = dict(self._nodes)
        twin._children = dict(self._children)
        return twin

    def revs(self) -> set[str]:
        return set(self._nodes)

    def parent(self, rev: str) -> str | None:
        return self._nodes[rev].parent

    def leaf_count(self) -> int:
        return len(self._nodes) - len(self._children)

    def leaves(self) -> list[Leaf]:
        """Every leaf, the winner first, then in the same order."""
        children = self._children
        leaves = [
            Leaf(rev, node.pos, node.hash, node.deleted)
            for rev, node in self._nodes.items()
            if rev not in children
        ]
        leaves.sort(key=Leaf.sort_key, reverse=True)
        return leaves

    def is_leaf(self, rev: str) -> bool:
        return rev in self._nodes and rev not in self._children

    def winner(self) -> Leaf:
        """The winning leaf; `ValueError` for an empty tree."""
        leaves = self.leaves()
        if not leaves:
            raise ValueError("an empty revision tree has no winner")
        return leaves[0]

    def conflicts(self) -> list[str]:
        """The live leaves other than the winner, in winner order."""
        return [leaf.rev for leaf in self.leaves()[1:] if not leaf.deleted]

    def path(self, rev: str) -> tuple[str, ...]:
        """`rev` and its known ancestors, newest first; `KeyError` if `rev` is not here."""
        path = [rev]
        parent = self._nodes[rev].parent
        while parent is not None:
            path.append(parent)
            parent = self._nodes[parent].parent
        return tuple(path)

    def history(self, rev: str) -> dict[str, Any]:
        """`_revisions` of `rev`: `{"start": N, "ids": [hash, parent hash, ...]}`."""
        return history_of(self.path(rev))

    def revs_diff(self, revs: Iterable[str]) -> tuple[list[str], list[str]]:
        """CouchDB `_revs_diff` for one document: `(missing, possible_ancestors)`.

        Missing are the given revs not in the tree (stemmed ones included), in the given order
        without repeats. Possible ancestors are the leaves of a lower generation than some
        missing rev: the revisions the missing ones may descend from."""
        missing = [rev for rev in dict.fromkeys(revs) if rev not in self._nodes]
        if not missing:
            return [], []
        top = max(parse_rev(rev)[0] for rev in missing)
        return missing, [leaf.rev for leaf in self.leaves() if leaf.pos < top]

    # -- writing

    def check_path(self, path: Sequence[str]) -> None:
        """`BadRequest` if `path` (newest first) gives a revision here another parent."""
        for child, parent in zip(path, path[1:]):
            node = self._nodes.get(child)
            if node is not None and node.parent is not None and node.parent != parent:
                raise BadRequest(
                    f"forged history: revision {child} has parent {node.parent}, not {parent}"
                )

    def merge(
        self, path: Sequence[str], deleted: bool = False, *, max_leaves: int | None = None
    ) -> bool:
        """Link a path of revisions (newest first, consecutive generations, as given by
        `parse_history`) into the tree; `deleted` is the newest revision's flag. A known
        revision keeps what is known about it. Returns whether the tree changed.

        With `max_leaves`, a path that would leave the tree with more leaves than that (and
        more than it has) is refused with `Forbidden` before anything changes."""
        self.check_path(path)
        nodes = self._nodes
        if max_leaves is not None:
            growth = self.leaf_growth(path)
            if growth > 0 and self.leaf_count() + growth > max_leaves:
                raise Forbidden(
                    f"revision {path[0]} would give the document more than {max_leaves} leaf "
                    f"revisions (conflicts); resolve its conflicts first"
                )
        changed = False
        children = self._children
        last = len(path) - 1
        for i, rev in enumerate(path):
            parent = path[i + 1] if i < last else None
            node = nodes.get(rev)
            if node is None:
                pos, rev_hash = parse_rev(rev)
                nodes[rev] = _Node(pos, rev_hash, parent, deleted and i == 0)
                if parent is not None:
                    children[parent] = children.get(parent, 0) + 1
                changed = True
                continue
            rejoin = node.parent is None and parent is not None  # a stemmed root regains history
            inner = i > 0 and node.deleted  # it has a child now: only leaves carry the flag
            if rejoin or inner:
                new_parent = parent if rejoin else node.parent
                nodes[rev] = _Node(node.pos, node.hash, new_parent, node.deleted and i == 0)
                if rejoin:
                    children[parent] = children.get(parent, 0) + 1  # type: ignore[index]
                changed = True
        return changed

    def leaf_growth(self, path: Sequence[str]) -> int:
        """How many leaves merging `path` would add (negative: remove), in O(len(path)): its
        newest revision is a new leaf unless known, and the known leaves among its older
        revisions stop being leaves."""
        nodes, children = self._nodes, self._children
        growth = 0 if path[0] in nodes else 1
        for i in range(1, len(path)):
            rev = path[i]
            if rev in nodes and rev not in children:
                growth -= 1
        return growth

    def add_child(self, parent: str | None, rev: str, deleted: bool) -> None:
        """Add a new edit `rev` on top of `parent` (None: a first revision)."""
        self.merge((rev,) if parent is None else (rev, parent), deleted)

    def stem(self, limit: int) -> set[str]:
        """Keep at most `limit` revisions on each leaf's path (the leaf included), as
        CouchDB's `revs_limit` does; return the removed revisions (never a leaf)."""
        if limit < 1:
            raise ValueError(f"revs_limit must be >= 1, not {limit}")
        nodes = self._nodes
        if len(nodes) <= limit:
            return set()
        budget: dict[str, int] = {}  # rev -> how many revisions its best leaf path still keeps
        for leaf in self.leaves():
            rev: str | None = leaf.rev
            left = limit
            while rev is not None and left > 0 and budget.get(rev, 0) < left:
                budget[rev] = left
                rev = nodes[rev].parent
                left -= 1
        removed = set(nodes) - budget.keys()
        if removed:
            for rev in budget:
                node = nodes[rev]
                if node.parent in removed:
                    nodes[rev] = node._replace(parent=None)
            for rev in removed:
                del nodes[rev]
            self._count_children()
        return removed

    def _count_children(self) -> None:
        children: dict[str, int] = {}
        for node in self._nodes.values():
            if node.parent is not None:
                children[node.parent] = children.get(node.parent, 0) + 1
        self._children = children

    # -- storage

    def to_obj(self) -> list[list[Any]]:
        """A JSON/msgpack-ready form: `[[rev, parent index or None, deleted], ...]`, parents
        before children."""
        order = sorted(self._nodes.items(), key=lambda item: item[1].pos)
        index = {rev: i for i, (rev, _) in enumerate(order)}
        return [
            [rev, None if node.parent is None else index[node.parent], node.deleted]
            for rev, node in order
        ]

    @classmethod
    def from_obj(cls, obj: Any) -> RevTree:
        """Rebuild a tree from `to_obj()`; `ValueError` if `obj` is not such a form."""
        tree = cls()
        nodes = tree._nodes
        revs: list[str] = []
        try:
            for rev, parent_index, deleted in obj:
                pos_text, _, rev_hash = rev.partition("-")
                pos = int(pos_text)
                if pos < 1 or len(rev_hash) != 32 or rev in nodes or type(deleted) is not bool:
                    raise ValueError(f"bad node {rev!r}")
                parent = None
                if parent_index is not None:
                    if not 0 <= parent_index < len(revs):
                        raise ValueError(f"bad parent index {parent_index!r}")
                    parent = revs[parent_index]
                    if nodes[parent].pos != pos - 1:
                        raise ValueError(f"{rev} cannot be a child of {parent}")
                nodes[rev] = _Node(pos, rev_hash, parent, deleted)
                revs.append(rev)
        except (TypeError, AttributeError) as exc:
            raise ValueError(f"not a revision tree: {exc}") from exc
        tree._count_children()
        return tree
