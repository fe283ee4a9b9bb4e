"""CouchDB's Mango query language for `_find` and `_changes?filter=_selector` (pure: no I/O).

`compile_selector(selector)` validates a selector and compiles it once into closures: a
predicate over a document. `parse_query(body)` validates a whole `_find` body into a `Query`;
`run(query, docs)` filters, sorts, pages and projects an iterable of documents into CouchDB's
`_find` answer. Anything that is not valid Mango raises `MangoError` (a ValueError) whose
message says what and where, worded like CouchDB's, and whose `error` attribute is CouchDB's
error name (`invalid_operator`, `bad_arg`, ...); all of them are HTTP 400.

The semantics follow apache/couchdb's mango_selector.erl:
  - implicit `$and` (several keys) and implicit `$eq` (a bare value); nested objects and dotted
    paths (`a.b`, with `\\.` for a literal dot) reach into sub-objects, and a numeric segment
    indexes an array (`tags.0`);
  - negations are pushed down to the fields (`$not`, `$nor`, De Morgan), as CouchDB does, so
    `{"$not": {"a": 1}}` means `{"a": {"$ne": 1}}`: like every condition except
    `{"$exists": false}`, it never matches a document where `a` is missing;
  - a path that runs into a non-container (`a.b` where `a` is 5) matches nothing, not even
    `{"$exists": false}`;
  - `$eq $ne $gt $gte $lt $lte` compare by CouchDB's collation across types:
    null < false < true < numbers < strings < arrays < objects (arrays element by element,
    then shorter first; objects key then value pair by pair, then fewer keys first), so
    `{"$gt": 5}` also matches every string, array and object (strings: see below);
  - `$in` on an array field matches when any element equals any argument; `$in: []` matches
    nothing, `$nin: []` everything, `$and: []` and `$or: []` everything, `$all: []` nothing;
  - `$elemMatch` (any element), `$allMatch` (a non-empty array whose every element matches),
    `$keyMapMatch` (any key of an object) apply a sub-selector to the element or key itself;
  - `$mod` needs an integer field (CouchDB's `rem`: the remainder has the sign of the field).
Simplifications, on purpose:
  - strings collate by an approximation of CouchDB's ICU (UCA) collation, not ICU itself:
    symbols (ASCII in CouchDB's documented order) < digits < letters, compared without
    regard to case and accents, then accents, then case, lowercase first ("a" < "A" < "aa" <
    "b"); ICU's finer rules for other scripts and contractions are not reproduced; `_id`
    compares and sorts raw, by code point, as in CouchDB; equality is exact either way;
  - `$all` and `$in` compare by collation equality (1 == 1.0), CouchDB's `$all` by exact terms;
  - `$regex` is Python's syntax (close to PCRE for everyday patterns), unanchored like
    CouchDB's `re:run`, matched in linear time (linear_regex.py);
  - a condition with no field name (`{"$gt": 5}` at the top) is refused, where CouchDB
    compares the whole document;
  - there are no indexes: `_find` scans, orders in memory (by `_id` when there is no `sort`),
    and always carries CouchDB's no-index warning. A `sort` on fields orders by them and
    leaves out documents missing one of them, as a CouchDB JSON index on those fields would;
    ties are broken by `_id` (in the sort's direction);
  - documents with `_deleted: true` never match, nor do design documents in `_find`.

Bookmarks are opaque to clients: base64url of a small JSON object holding the sort, the last
document's sort key values and its `_id`; the next page starts strictly after that position
(and then applies `skip`, as CouchDB does).

Bounds (the selector, the query and the bookmark come from outside): a selector nests at most
`MAX_DEPTH` levels, holds at most `MAX_NODES` JSON values and `MAX_CONDITIONS` field
conditions (what each document costs: `$in` lists, and `$or` branches that are equalities on
one field, are one set lookup each); `$in`, `$nin` and `$all` hash, so they cost a document
the length of its array, not that times the list's; `sort` and `fields` are short;
a bookmark is at most `MAX_BOOKMARK` characters. A `$regex` pattern is at most
`MAX_REGEX_LENGTH` characters and `MAX_REGEX_PROGRAM` automaton steps, and is never run by
Python's backtracking `re` (which takes seconds on `[a-z]+\\d` over a 20,000-character string):
it is matched by a lazily built DFA, in time linear in the string whatever the pattern; what
no finite automaton can match (back-references, look-around, atomic groups) is refused, and
so is, when it happens, a pattern whose DFA grows past `MAX_DFA_STATES` states: the compiled
predicate and `run` can therefore raise MangoError too, mid-scan. `run` is CPU work in
proportion to the documents given (~25 ms per 100,000 for an equality; a regex ~0.3 µs a
character): a caller on an event loop may want it in a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import functools
import heapq
import json
import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from plugshare.node.couch.linear_regex import (MAX_DFA_STATES, RegexTooCostly,
                                               RegexUnsupported, Searcher)

__all__ = [
    "MangoError",
    "Query",
    "compile_selector",
    "parse_query",
    "run",
    "DEFAULT_LIMIT",
    "NO_INDEX_WARNING",
]

DEFAULT_LIMIT = 25
NO_INDEX_WARNING = "No matching index found, create an index to optimize query time."

MAX_DEPTH = 32  # nesting of the selector's JSON, literals included
MAX_NODES = 50_000  # JSON values in one selector (long `$in` lists count)
MAX_CONDITIONS = 128  # field conditions, which every document is tested against
MAX_SORT_FIELDS = 16
MAX_FIELDS = 256
MAX_BOOKMARK = 16_384
MAX_REGEX_LENGTH = 512

Predicate = Callable[[Any], bool]


class MangoError(ValueError):
    """A query or selector that is not valid Mango. `error` is CouchDB's error name."""

    def __init__(self, reason: str, error: str = "bad_request"):
        # A lone surrogate from the request ("\ud800" is valid JSON) would make the answer
        # unencodable as UTF-8: shown escaped instead.
        reason = reason.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(reason)
        self.reason = reason
        self.error = error


# --- JSON values: collation, equality, types ----------------------------------------------

_RANK_NULL, _RANK_BOOL, _RANK_NUMBER, _RANK_STRING, _RANK_ARRAY, _RANK_OBJECT = range(6)


def _rank(value: Any) -> int:
    t = type(value)
    if value is None:
        return _RANK_NULL
    if t is bool:
        return _RANK_BOOL
    if t is int or t is float:
        return _RANK_NUMBER
    if t is str:
        return _RANK_STRING
    if t is list:
        return _RANK_ARRAY
    return _RANK_OBJECT


# Strings collate like CouchDB's ICU (Unicode Collation Algorithm) default, approximately:
# symbols before digits before letters (ASCII in the order CouchDB documents), letters
# without regard to case or accents first, then accents, then case with lowercase first
# ("a" < "A" < "aa" < "b"); code point order only breaks what is left. `_id` compares raw
# (code points), as CouchDB's does.
_ASCII_SYMBOLS = " `^_-,;:!?.'\"()[]{}@*/\\&#%+<=>|~$"  # CouchDB's documented order
_PRIMARY = str.maketrans(
    {**{c: "\x01" for c in range(32)}, 127: "\x01",
     **{ord(ch): chr(2 + i) for i, ch in enumerate(_ASCII_SYMBOLS)},
     **{c: chr(c + 32) for c in range(ord("A"), ord("Z") + 1)}}
)
_CASE = str.maketrans({c: "1" if "A" <= chr(c) <= "Z" else "0" for c in range(128)})


def _text_key(s: str) -> tuple:
    """A sort key for a string, approximating CouchDB's ICU collation (see above)."""
    if s.isascii():
        return (s.translate(_PRIMARY), "", s.translate(_CASE), s)
    base: list[str] = []
    marks: list[str] = []
    for c in unicodedata.normalize("NFD", s):
        (marks if unicodedata.combining(c) else base).append(c)
    primary = "".join(c.translate(_PRIMARY) if c.isascii() else c.lower() for c in base)
    case = "".join("1" if c.isupper() else "0" for c in base)
    return (primary, "".join(marks), case, s)


def _raw_text_key(s: str) -> str:
    return s


def json_compare(a: Any, b: Any, text_key: Callable[[str], Any] = _text_key) -> int:
    """-1, 0 or 1: CouchDB's collation of two JSON values (strings by `text_key`; 1 == 1.0).
    Iterative, so a value nested deeper than Python's recursion limit still compares."""
    stack: list = [(a, b)]
    while stack:
        x, y = stack.pop()
        if x is _LENGTHS:  # all items so far equal: the shorter array or object first
            if y[0] != y[1]:
                return -1 if y[0] < y[1] else 1
            continue
        rx, ry = _rank(x), _rank(y)
        if rx != ry:
            return -1 if rx < ry else 1
        if rx == _RANK_ARRAY:
            stack.append((_LENGTHS, (len(x), len(y))))
            stack.extend(reversed(list(zip(x, y))))
        elif rx == _RANK_OBJECT:
            if not isinstance(x, Mapping) or not isinstance(y, Mapping):
                raise MangoError(f"{type(x).__name__} or {type(y).__name__} is not a JSON value")
            stack.append((_LENGTHS, (len(x), len(y))))
            for (kx, vx), (ky, vy) in reversed(list(zip(x.items(), y.items()))):
                stack.append((vx, vy))
                stack.append((kx, ky))  # keys first, then their values
        elif x != y:
            if rx == _RANK_STRING:
                x, y = text_key(x), text_key(y)
            return -1 if x < y else 1
    return 0


_LENGTHS: Any = object()  # a marker on json_compare's stack


@functools.total_ordering
class _Deep:
    """An array or object in a sort key, ordered by `json_compare`."""

    __slots__ = ("value", "text_key")

    def __init__(self, value: Any, text_key: Callable[[str], Any]):
        self.value = value
        self.text_key = text_key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Deep) and json_compare(self.value, other.value) == 0

    def __lt__(self, other: _Deep) -> bool:
        return json_compare(self.value, other.value, self.text_key) < 0

    __hash__ = None  # type: ignore[assignment]


def collation_key(value: Any, text_key: Callable[[str], Any] = _text_key) -> tuple:
    """A sort key whose Python ordering is CouchDB's collation of JSON values."""
    rank = _rank(value)
    if rank >= _RANK_ARRAY:
        return (rank, _Deep(value, text_key))
    if rank == _RANK_NULL:
        return (rank,)
    if rank == _RANK_STRING:
        return (rank, text_key(value))
    return (rank, value)


def _json_type(value: Any) -> str:
    return ("null", "boolean", "number", "string", "array", "object")[_rank(value)]


def _is_int(value: Any) -> bool:
    return type(value) is int


def _show(value: Any) -> str:
    """A value in an error message: JSON, cut short."""
    try:
        text = json.dumps(value, ensure_ascii=False, sort_keys=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


# --- field paths -------------------------------------------------------------------------

_UNESCAPED_DOT = re.compile(r"(?<!\\)\.")


def parse_field(field: Any) -> tuple[str, ...]:
    """`a.b\\.c` -> ("a", "b.c"). Raises MangoError for an empty segment."""
    if not isinstance(field, str):
        raise MangoError(f"Invalid field name: {_show(field)}", "invalid_field_name")
    if "\\" not in field:
        parts = field.split(".")
    else:
        parts = [p.replace("\\", "") for p in _UNESCAPED_DOT.split(field)]
    if any(not p for p in parts):
        raise MangoError(f"Invalid field name: {field}", "invalid_field_name")
    return tuple(parts)


class _Absent:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


MISSING: Any = _Absent("MISSING")  # the last segment is not there
BAD_PATH: Any = _Absent("BAD_PATH")  # the path runs into something that is not a container


_ARRAY_INDEX = re.compile(r"[+-]?[0-9]{1,18}")


def _index(segment: str) -> int | None:
    """A path segment as an array index (CouchDB: binary_to_integer, so "01" and "+1" index
    too; a negative one is a bad path), or None. ASCII digits only, and short: "²" or a
    5,000-digit segment is no index (and no ValueError from int())."""
    if _ARRAY_INDEX.fullmatch(segment):
        return int(segment)
    return None


def get_field(value: Any, path: tuple[str, ...]) -> Any:
    """The value at `path`, MISSING, or BAD_PATH (CouchDB's mango_doc:get_field)."""
    for segment in path:
        if isinstance(value, dict):
            value = value.get(segment, MISSING)
            if value is MISSING:
                return MISSING
        elif type(value) is list:
            position = _index(segment)
            if position is None or not 0 <= position < len(value):
                return BAD_PATH
            value = value[position]
        else:
            return BAD_PATH
    return value


def _getter(path: tuple[str, ...]) -> Callable[[Any], Any]:
    if not path:
        return lambda value: value
    if len(path) == 1:
        key = path[0]

        def get_one(value: Any) -> Any:
            if type(value) is dict:
                return value.get(key, MISSING)
            return get_field(value, path)

        return get_one
    return lambda value: get_field(value, path)


# --- the selector tree: parsing and normalisation -----------------------------------------
#
# A selector is parsed into a small tree in CouchDB's normal form: `_And`/`_Or` over `_Field`
# leaves, each a path and one condition; negations are pushed down to the conditions.


@attrs.frozen
class _And:
    items: tuple


@attrs.frozen
class _Or:
    items: tuple


@attrs.frozen
class _Field:
    path: tuple[str, ...]
    cond: Any  # _Op | _CondNot | _Sub


@attrs.frozen
class _Op:
    op: str  # "$eq", "$regex", ...
    arg: Any


@attrs.frozen
class _CondNot:
    cond: Any


@attrs.frozen
class _Sub:
    op: str  # "$elemMatch" | "$allMatch" | "$keyMapMatch"
    selector: Any  # a tree whose paths start at the element (or key)


_SUB_SELECTORS = frozenset({"$elemMatch", "$allMatch", "$keyMapMatch"})
_COMPARISONS = frozenset({"$eq", "$ne", "$gt", "$gte", "$lt", "$lte"})
_TERMINALS = _COMPARISONS | frozenset(
    {"$in", "$nin", "$exists", "$type", "$size", "$mod", "$regex", "$all", "$beginsWith"}
)
_UNSUPPORTED = frozenset(
    {"$where", "$geoWithin", "$geoIntersects", "$near", "$nearSphere", "$text", "$default"}
)
_EQ_ANY = "=any"  # internal: equal (as a whole, like $eq) to one of a list; not Mango syntax
_NEGATED = {
    "$lt": "$gte", "$lte": "$gt", "$gt": "$lte", "$gte": "$lt",
    "$eq": "$ne", "$ne": "$eq", "$in": "$nin", "$nin": "$in",
}


def _bad_arg(op: str, arg: Any, why: str = "", path: tuple[str, ...] = ()) -> MangoError:
    suffix = f" ({why})" if why else ""
    return MangoError(
        f"Bad argument for operator {op}: {_show(arg)}{suffix}{_where(path)}", "bad_arg"
    )


def _where(path: tuple[str, ...]) -> str:
    """ at field "a.b" for an error message; nothing at the top."""
    if not path:
        return ""
    return f" at field {_show('.'.join(p.replace('.', chr(92) + '.') for p in path))}"


def _check_size(selector: Any) -> None:
    """Refuse a selector nested deeper than MAX_DEPTH or larger than MAX_NODES (iteratively,
    before any recursion over it)."""
    stack = [(selector, 1)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise MangoError(f"Invalid selector: more than {MAX_NODES} values", "invalid_selector")
        if depth > MAX_DEPTH:
            raise MangoError(
                f"Invalid selector: nested deeper than {MAX_DEPTH} levels", "invalid_selector"
            )
        if isinstance(value, Mapping):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise MangoError(f"Invalid selector: key {key!r} is not a string",
                                     "invalid_selector")
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
        elif not (value is None or isinstance(value, (bool, int, float, str))):
            raise MangoError(
                f"Invalid selector: {type(value).__name__} {value!r} is not a JSON value",
                "invalid_selector",
            )
        elif isinstance(value, float) and not math.isfinite(value):
            raise MangoError(f"Invalid selector: {value!r} is not a JSON number",
                             "invalid_selector")


def _parse_object(obj: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """A JSON object in selector position (top level, under a field, in a combinator)."""
    if len(obj) == 1:
        ((key, value),) = obj.items()
        return _parse_pair(key, value, path)
    return _And(tuple(_parse_pair(key, value, path) for key, value in obj.items()))


def _parse_value(value: Any, path: tuple[str, ...]) -> Any:
    """A field's condition: an object of operators and/or sub-fields, or a bare value (=$eq).
    An empty object is a value too: `{"a": {}}` is `a == {}`."""
    if isinstance(value, Mapping) and value:
        return _parse_object(value, path)
    return _Field(path, _Op("$eq", value))


def _parse_pair(key: str, value: Any, path: tuple[str, ...]) -> Any:
    if not key.startswith("$"):
        return _parse_value(value, path + parse_field(key))
    if key in ("$and", "$or", "$nor"):
        if not isinstance(value, list):
            raise _bad_arg(key, value, "needs an array", path)
        items = tuple(_parse_value(item, path) for item in value)
        if key == "$and":
            return _And(items)
        either = _Or(_merge_equalities(items))
        return either if key == "$or" else _negate(either)
    if key == "$not":
        if not isinstance(value, Mapping):
            raise _bad_arg(key, value, "needs an object", path)
        return _negate(_parse_value(value, path))
    if key in _SUB_SELECTORS:
        if not isinstance(value, Mapping):
            raise _bad_arg(key, value, "needs an object", path)
        return _Field(path, _Sub(key, _parse_value(value, ())))
    if key in _TERMINALS:
        return _Field(path, _Op(key, _check_arg(key, value, path)))
    if key in _UNSUPPORTED:
        raise MangoError(f"Unsupported operator: {key}{_where(path)}", "not_supported")
    raise MangoError(f"Invalid operator: {key}{_where(path)}", "invalid_operator")


def _merge_equalities(items: tuple) -> tuple:
    """`$or` branches that are equalities on one field become one set lookup (`_EQ_ANY`):
    `{"$or": [{"_id": "a"}, {"_id": "b"}, ...]}` costs a document one test, not one per id."""
    values_by_path: dict[tuple[str, ...], list] = {}
    others = []
    for item in items:
        if isinstance(item, _Field) and isinstance(item.cond, _Op) and item.cond.op == "$eq":
            values_by_path.setdefault(item.path, []).append(item.cond.arg)
        else:
            others.append(item)
    merged = [
        _Field(path, _Op(_EQ_ANY, values) if len(values) > 1 else _Op("$eq", values[0]))
        for path, values in values_by_path.items()
    ]
    return tuple(merged + others)


def _check_arg(op: str, arg: Any, path: tuple[str, ...]) -> Any:
    if op in _COMPARISONS:
        return arg
    if op in ("$in", "$nin", "$all"):
        if not isinstance(arg, list):
            raise _bad_arg(op, arg, "needs an array", path)
    elif op == "$exists":
        if not isinstance(arg, bool):
            raise _bad_arg(op, arg, "needs true or false", path)
    elif op == "$type":
        if not isinstance(arg, str):
            raise _bad_arg(op, arg, "needs a type name", path)
    elif op == "$size":
        if not _is_int(arg) or arg < 0:
            raise _bad_arg(op, arg, "needs a non-negative integer", path)
    elif op == "$mod":
        if not (isinstance(arg, list) and len(arg) == 2 and all(_is_int(a) for a in arg)):
            raise _bad_arg(op, arg, "needs [divisor, remainder], two integers", path)
        if arg[0] == 0:
            raise _bad_arg(op, arg, "the divisor cannot be 0", path)
    elif op == "$beginsWith":
        if not isinstance(arg, str):
            raise _bad_arg(op, arg, "needs a string", path)
    elif op == "$regex":
        if not isinstance(arg, str):
            raise _bad_arg(op, arg, "needs a string", path)
        check_regex(arg, path)
    return arg


def _negate(node: Any) -> Any:
    """NOT node, pushed down to the conditions (De Morgan), as CouchDB normalises it."""
    if isinstance(node, _And):
        return _Or(tuple(_negate(item) for item in node.items))
    if isinstance(node, _Or):
        return _And(tuple(_negate(item) for item in node.items))
    return _Field(node.path, _negate_cond(node.cond))


def _negate_cond(cond: Any) -> Any:
    if isinstance(cond, _CondNot):
        return cond.cond
    if isinstance(cond, _Op):
        if cond.op in _NEGATED:
            return _Op(_NEGATED[cond.op], cond.arg)
        if cond.op == "$exists":
            return _Op("$exists", not cond.arg)
    return _CondNot(cond)


# --- regular expressions: `$regex` through the linear-time matcher (linear_regex.py) ----


def check_regex(pattern: str, path: tuple[str, ...] = ()) -> Searcher:
    """The searcher for a `$regex` pattern; MangoError for one too long, not Python syntax,
    or beyond a finite automaton."""
    if len(pattern) > MAX_REGEX_LENGTH:
        raise _bad_arg("$regex", pattern[:40] + "...",
                       f"longer than {MAX_REGEX_LENGTH} characters", path)
    try:
        return Searcher(pattern)
    except re.error as exc:
        raise _bad_arg("$regex", pattern, str(exc), path) from None
    except RegexUnsupported as exc:
        raise _bad_arg(
            "$regex", pattern,
            f"{exc} is not supported: back-references, look-around, conditionals, atomic "
            "groups and possessive repeats cannot be matched in linear time",
            path,
        ) from None
    except RecursionError:
        raise _bad_arg("$regex", pattern, "nested too deeply", path) from None


def _regex_test(pattern: str) -> Callable[[Any], bool]:
    search = check_regex(pattern).search

    def test(value: Any) -> bool:
        if type(value) is not str:
            return False
        try:
            return search(value)
        except RegexTooCostly:
            raise _bad_arg(
                "$regex", pattern,
                f"too costly to match: its automaton grows past {MAX_DFA_STATES} states; "
                "simplify the pattern",
            ) from None

    return test


# --- compilation into closures -------------------------------------------------------------


def _hashable(value: Any, depth: int = 0) -> Any:
    """A hash key, equal for collation-equal JSON values (1 and 1.0; not 1 and true; objects
    key by key in order), so `$in` and `$all` test membership in a set rather than compare
    each item with each listed value. None for a value nested deeper than a selector may be
    (MAX_DEPTH), which therefore equals no listed value."""
    t = type(value)
    if t is str:
        return ("s", value)
    if t is int or t is float:
        return ("n", value)
    if value is None:
        return ("z",)
    if t is bool:
        return ("b", value)
    if depth >= MAX_DEPTH:
        return None
    if t is list:
        items = tuple(_hashable(v, depth + 1) for v in value)
        return None if None in items else ("a", items)
    if isinstance(value, Mapping):
        pairs = tuple((k, _hashable(v, depth + 1)) for k, v in value.items())
        return None if any(h is None for _, h in pairs) else ("o", pairs)
    return None


def _eq_test(literal: Any) -> Predicate:
    t = type(literal)
    if t is str:
        return lambda v: type(v) is str and v == literal
    if t is int or t is float:
        return lambda v: (type(v) is int or type(v) is float) and v == literal
    if literal is None:
        return lambda v: v is None
    if t is bool:
        return lambda v: v is literal
    rank = _rank(literal)
    return lambda v: _rank(v) == rank and json_compare(v, literal) == 0


def _order_test(op: str, literal: Any, text_key: Callable[[str], Any]) -> Predicate:
    compare = {
        "$gt": lambda a, b: a > b, "$gte": lambda a, b: a >= b,
        "$lt": lambda a, b: a < b, "$lte": lambda a, b: a <= b,
    }[op]
    rank = _rank(literal)
    if rank == _RANK_NUMBER:
        # The common cases without building keys: same rank compares values, else ranks.
        def number(v: Any) -> bool:
            r = _rank(v)
            return compare(v, literal) if r == rank else compare(r, rank)

        return number
    if rank == _RANK_STRING:
        key = text_key(literal)

        def text(v: Any) -> bool:
            r = _rank(v)
            return compare(text_key(v), key) if r == rank else compare(r, rank)

        return text
    return lambda v: compare(json_compare(v, literal, text_key), 0)


def _membership(values: list) -> Predicate:
    """value -> it equals one of `values` (collation equality), by a set lookup."""
    keys = {_hashable(item) for item in values}  # selector literals: never too deep
    return lambda v: _hashable(v) in keys


def _op_test(op: str, arg: Any, text_key: Callable[[str], Any]) -> Predicate:
    """The test of one operator on a value that is present, strings ordered by `text_key`."""
    if op == "$eq":
        return _eq_test(arg)
    if op == "$ne":
        eq = _eq_test(arg)
        return lambda v: not eq(v)
    if op in ("$gt", "$gte", "$lt", "$lte"):
        return _order_test(op, arg, text_key)
    if op == _EQ_ANY:
        return _membership(arg)
    if op in ("$in", "$nin"):
        member = _membership(arg)

        def inside(v: Any) -> bool:
            if type(v) is list:
                return any(member(x) for x in v)
            return member(v)

        return inside if op == "$in" else (lambda v: not inside(v))
    if op == "$exists":
        return lambda v: arg
    if op == "$type":
        return lambda v: _json_type(v) == arg
    if op == "$size":
        return lambda v: type(v) is list and len(v) == arg
    if op == "$mod":
        divisor, remainder = arg

        def mod(v: Any) -> bool:
            if type(v) is not int:
                return False
            r = abs(v) % abs(divisor)  # Erlang's rem: the sign of the dividend
            return (-r if v < 0 else r) == remainder

        return mod
    if op == "$beginsWith":
        return lambda v: type(v) is str and v.startswith(arg)
    if op == "$regex":
        return _regex_test(arg)
    if op == "$all":
        if not arg:
            return lambda v: False
        wanted = {_hashable(item) for item in arg}
        whole = _eq_test(arg[0]) if len(arg) == 1 and type(arg[0]) is list else None

        def has_all(v: Any) -> bool:
            if type(v) is not list:
                return False
            if wanted.issubset({_hashable(x) for x in v}):
                return True
            return whole is not None and whole(v)

        return has_all
    raise AssertionError(op)  # _check_arg let through an operator this does not know


def _cond_test(cond: Any, text_key: Callable[[str], Any]) -> Predicate:
    if isinstance(cond, _Op):
        return _op_test(cond.op, cond.arg, text_key)
    if isinstance(cond, _CondNot):
        inner = _cond_test(cond.cond, text_key)
        return lambda v: not inner(v)
    sub = _compile_tree(cond.selector)
    if cond.op == "$elemMatch":
        return lambda v: type(v) is list and any(sub(x) for x in v)
    if cond.op == "$allMatch":
        return lambda v: type(v) is list and bool(v) and all(sub(x) for x in v)
    return lambda v: isinstance(v, dict) and any(sub(k) for k in v)  # $keyMapMatch


def _compile_tree(node: Any) -> Predicate:
    if isinstance(node, _And):
        preds = [_compile_tree(item) for item in node.items]
        if not preds:
            return lambda value: True
        if len(preds) == 1:
            return preds[0]
        if len(preds) == 2:
            a, b = preds
            return lambda value: a(value) and b(value)
        return lambda value: all(p(value) for p in preds)
    if isinstance(node, _Or):
        preds = [_compile_tree(item) for item in node.items]
        if not preds:
            return lambda value: True  # CouchDB: an empty $or matches
        return lambda value: any(p(value) for p in preds)
    get = _getter(node.path)
    # CouchDB compares `_id` raw (by code point), every other string by collation.
    test = _cond_test(node.cond, _raw_text_key if node.path == ("_id",) else _text_key)
    # A missing field matches only an exact {"$exists": false}; a bad path matches nothing.
    when_missing = node.cond == _Op("$exists", False)

    def field(value: Any) -> bool:
        v = get(value)
        if v is MISSING:
            return when_missing
        if v is BAD_PATH:
            return False
        return test(v)

    cond = node.cond
    if len(node.path) == 1 and isinstance(cond, _Op) and cond.op == "$eq" and type(cond.arg) is str:
        # The hot case, `{"field": "value"}`, in one closure.
        key, literal = node.path[0], cond.arg

        def equals(value: Any) -> bool:
            if type(value) is dict:
                v = value.get(key)
                return type(v) is str and v == literal
            return field(value)

        return equals
    return field


def _check_field_names(node: Any) -> None:
    """A condition outside `$elemMatch`/`$allMatch`/`$keyMapMatch` needs a field name."""
    if isinstance(node, (_And, _Or)):
        for item in node.items:
            _check_field_names(item)
    elif not node.path:
        raise MangoError("One or more conditions is missing a field name.", "invalid_selector")


def _parse_selector(selector: Any) -> Any:
    if not isinstance(selector, Mapping):
        raise MangoError(f"Selector must be a JSON object, not: {_show(selector)}",
                         "invalid_selector_json")
    _check_size(selector)
    if not selector:
        return _And(())
    tree = _parse_object(selector, ())
    _check_field_names(tree)
    _check_conditions(tree)
    return tree


def _check_conditions(tree: Any) -> None:
    """Refuse more than MAX_CONDITIONS field conditions: each costs every document a test
    (a long `$in` list is one condition, tested by a set lookup)."""
    count = 0
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (_And, _Or)):
            stack.extend(node.items)
            continue
        count += 1
        cond = node.cond
        while isinstance(cond, _CondNot):
            cond = cond.cond
        if isinstance(cond, _Sub):
            stack.append(cond.selector)
    if count > MAX_CONDITIONS:
        raise MangoError(
            f"Invalid selector: {count} conditions, more than {MAX_CONDITIONS}; "
            "use $in (or $or on one field) for a list of values", "invalid_selector",
        )


def compile_selector(selector: Any) -> Callable[[dict], bool]:
    """A predicate over documents for a Mango selector; raises MangoError if it is not one.
    A document with `_deleted: true` never matches. The predicate may raise MangoError when a
    `$regex` match overruns its time bound."""
    matches = _compile_tree(_parse_selector(selector))
    return lambda doc: doc.get("_deleted") is not True and matches(doc)


# --- the _find query ----------------------------------------------------------------------

# Accepted for compatibility and ignored (no indexes, one node), each with its validator.
_IGNORED_KEYS: dict[str, Callable[[Any], bool]] = {
    "use_index": lambda v: v is None or isinstance(v, str) or (
        isinstance(v, list) and len(v) <= 2 and all(isinstance(x, str) for x in v)
    ),
    "r": lambda v: _is_int(v) and v > 0,
    "conflicts": lambda v: isinstance(v, bool),
    "execution_stats": lambda v: isinstance(v, bool),
    "stable": lambda v: isinstance(v, bool),
    "update": lambda v: isinstance(v, bool),
    "stale": lambda v: v is False or v == "ok",
    "allow_fallback": lambda v: isinstance(v, bool),
    "partition": lambda v: v == "",
}
_QUERY_KEYS = frozenset({"selector", "fields", "sort", "limit", "skip", "bookmark"})


@attrs.frozen
class Bookmark:
    """Where the previous page ended: the last document's sort values and `_id`."""

    values: tuple
    doc_id: str


@attrs.frozen
class Query:
    """A validated `_find` body."""

    selector: Mapping[str, Any]
    matches: Callable[[dict], bool] = attrs.field(eq=False, repr=False)
    fields: tuple[tuple[str, ...], ...] | None  # None: whole documents
    sort: tuple[str, ...]  # field names as given; empty: by _id
    descending: bool
    limit: int
    skip: int
    bookmark: Bookmark | None
    # Asked for and not acted on here: the caller may add `_conflicts` to each document, or
    # CouchDB's "execution_stats" to the answer.
    conflicts: bool = False
    execution_stats: bool = False

    @property
    def sort_paths(self) -> tuple[tuple[str, ...], ...]:
        return tuple(parse_field(f) for f in self.sort)


def _non_negative(name: str, value: Any) -> int:
    if not _is_int(value) or value < 0:
        raise MangoError(f"{name} must be a non-negative integer, not: {_show(value)}",
                         "invalid_value")
    return value


def _parse_sort(sort: Any) -> tuple[tuple[str, ...], bool]:
    if not isinstance(sort, list):
        raise MangoError(f"Sort must be an array of sort specs, not: {_show(sort)}",
                         "invalid_sort_json")
    if len(sort) > MAX_SORT_FIELDS:
        raise MangoError(f"Sort has more than {MAX_SORT_FIELDS} fields", "invalid_sort_json")
    names, directions = [], set()
    for spec in sort:
        if isinstance(spec, str):
            name, direction = spec, "asc"
        elif isinstance(spec, Mapping) and len(spec) == 1:
            ((name, direction),) = spec.items()
            if direction not in ("asc", "desc"):
                raise MangoError(f"Invalid sort direction: {_show(direction)}",
                                 "invalid_sort_dir")
        else:
            raise MangoError(f"Invalid sort field: {_show(spec)}", "invalid_sort_field")
        if name == "":
            raise MangoError('Invalid sort field: ""', "invalid_sort_field")
        parse_field(name)
        names.append(name)
        directions.add(direction)
    if len(directions) > 1:
        raise MangoError("Sorts currently only support a single direction for all fields.",
                         "unsupported_mixed_sort")
    return tuple(names), directions == {"desc"}


def _parse_fields(fields: Any) -> tuple[tuple[str, ...], ...] | None:
    if not isinstance(fields, list):
        raise MangoError(f"Fields must be an array of strings, not: {_show(fields)}",
                         "invalid_fields")
    if len(fields) > MAX_FIELDS:
        raise MangoError(f"Fields has more than {MAX_FIELDS} entries", "invalid_fields")
    for field in fields:
        if not isinstance(field, str):
            raise MangoError(f"Invalid JSON for field spec: {_show(field)}", "invalid_field")
    return tuple(parse_field(f) for f in fields) or None


def _invalid_bookmark(text: Any, why: str) -> MangoError:
    shown = _show(text if len(str(text)) <= 80 else str(text)[:77] + "...")
    return MangoError(f"Invalid bookmark value: {shown} ({why})", "invalid_bookmark")


def encode_bookmark(sort: tuple[str, ...], descending: bool, values: tuple, doc_id: str) -> str:
    """A bookmark for the position after the document with these sort values and id. Sort
    values too deep or too long for a bookmark give one that says so when it comes back."""
    payload: dict[str, Any] = {"sort": list(sort), "desc": descending, "key": None, "id": doc_id}
    try:
        _check_size(list(values))
        payload["key"] = list(values)
        raw = json.dumps(payload, separators=(",", ":")).encode()  # ASCII (\u escapes)
        text = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        if len(text) <= MAX_BOOKMARK:
            return text
    except MangoError:
        pass
    payload["key"] = None
    raw = json.dumps(payload, separators=(",", ":")).encode()  # ASCII (\u escapes)
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_bookmark(text: Any, sort: tuple[str, ...], descending: bool) -> Bookmark | None:
    """The position a bookmark from a previous page holds; None for no bookmark."""
    if text is None or text == "" or text == "nil":
        return None
    if not isinstance(text, str):
        raise _invalid_bookmark(text, "a bookmark is a string")
    if len(text) > MAX_BOOKMARK:
        raise _invalid_bookmark(text, f"longer than {MAX_BOOKMARK} characters")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        payload = json.loads(raw)
    except (binascii.Error, ValueError, RecursionError):
        raise _invalid_bookmark(text, "not one this node gave") from None
    if not (
        isinstance(payload, dict)
        and payload.keys() == {"sort", "desc", "key", "id"}
        and isinstance(payload["key"], (list, type(None)))
        and isinstance(payload["id"], str)
    ):
        raise _invalid_bookmark(text, "not one this node gave")
    if payload["sort"] != list(sort) or payload["desc"] is not descending:
        raise _invalid_bookmark(text, "it continues a query with another sort")
    if payload["key"] is None:
        raise _invalid_bookmark(
            text, "the last document's sort value is too large to continue from; use skip"
        )
    if len(payload["key"]) != len(sort):
        raise _invalid_bookmark(text, "not one this node gave")
    try:
        _check_size(payload["key"])
    except MangoError:
        raise _invalid_bookmark(text, "not one this node gave") from None
    return Bookmark(tuple(payload["key"]), payload["id"])


def parse_query(body: Any) -> Query:
    """A `_find` body validated into a Query; MangoError says what is wrong."""
    if not isinstance(body, Mapping):
        raise MangoError(f"Request body must be a JSON object, not: {_show(body)}",
                         "bad_request")
    for key, value in body.items():
        if key in _QUERY_KEYS:
            continue
        check = _IGNORED_KEYS.get(key)
        if check is None:
            raise MangoError(f"Invalid key {key} for this request.", "invalid_key")
        if not check(value):
            raise MangoError(f"Invalid value for {key}: {_show(value)}", "invalid_value")
    if "selector" not in body:
        raise MangoError("Missing required key: selector", "missing_required_key")
    selector = body["selector"]
    matches = compile_selector(selector)
    sort, descending = _parse_sort(body.get("sort", []))
    fields = _parse_fields(body.get("fields", []))
    limit = _non_negative("limit", body.get("limit", DEFAULT_LIMIT))
    skip = _non_negative("skip", body.get("skip", 0))
    bookmark = decode_bookmark(body.get("bookmark"), sort, descending)
    return Query(
        selector, matches, fields, sort, descending, limit, skip, bookmark,
        conflicts=body.get("conflicts", False),
        execution_stats=body.get("execution_stats", False),
    )


# --- running it ---------------------------------------------------------------------------


def _project(doc: dict, fields: tuple[tuple[str, ...], ...]) -> dict:
    """Only `fields` of the document, nested as in it (CouchDB's mango_fields:extract)."""
    out: dict = {}
    for path in fields:
        value = get_field(doc, path)
        if value is MISSING or value is BAD_PATH:
            continue
        target = out
        for segment in path[:-1]:
            nested = target.get(segment)
            if not isinstance(nested, dict):
                nested = target[segment] = {}
            target = nested
        target[path[-1]] = value
    return out


def run(query: Query, docs: Iterable[dict]) -> dict:
    """CouchDB's `_find` answer for `query` over `docs`: {"docs", "bookmark", "warning"}.
    Memory is bounded by skip + limit documents, whatever the number of `docs`."""
    wanted = query.skip + query.limit
    matches = query.matches
    live = (
        doc for doc in docs
        if not str(doc.get("_id", "")).startswith("_design/") and matches(doc)
    )
    paths = query.sort_paths
    if query.limit == 0:
        page: list[tuple[Any, dict]] = []
    elif not paths:
        # By _id: a plain string key (code point order is CouchDB's raw _id order).
        def by_id(doc: dict) -> str:
            return str(doc.get("_id", ""))

        if query.bookmark is not None:
            after = query.bookmark.doc_id
            if query.descending:
                live = (d for d in live if by_id(d) < after)
            else:
                live = (d for d in live if by_id(d) > after)
        pick = heapq.nlargest if query.descending else heapq.nsmallest
        page = [((), d) for d in pick(wanted, live, key=by_id)][query.skip:]
    else:
        getters = [_getter(p) for p in paths]
        text_keys = [_raw_text_key if p == ("_id",) else _text_key for p in paths]

        def keyed() -> Iterable[tuple[tuple, dict]]:
            for doc in live:
                values = [get(doc) for get in getters]
                # A JSON index on the sort fields holds only documents that have them.
                if any(v is MISSING or v is BAD_PATH for v in values):
                    continue
                key = tuple(collation_key(v, k) for v, k in zip(values, text_keys)) + (
                    str(doc.get("_id", "")),
                )
                yield key, (values, doc)

        candidates: Iterable = keyed()
        if query.bookmark is not None:
            start = tuple(
                collation_key(v, k) for v, k in zip(query.bookmark.values, text_keys)
            ) + (
                query.bookmark.doc_id,
            )
            if query.descending:
                candidates = (c for c in candidates if c[0] < start)
            else:
                candidates = (c for c in candidates if c[0] > start)
        pick = heapq.nlargest if query.descending else heapq.nsmallest
        chosen = pick(wanted, candidates, key=lambda c: c[0])[query.skip:]
        page = [(tuple(values), doc) for _, (values, doc) in chosen]

    if page:
        last_values, last_doc = page[-1]
        bookmark = encode_bookmark(query.sort, query.descending, last_values,
                                   str(last_doc.get("_id", "")))
    elif query.bookmark is not None:
        bookmark = encode_bookmark(query.sort, query.descending, query.bookmark.values,
                                   query.bookmark.doc_id)
    else:
        bookmark = "nil"
    if query.fields is None:
        out_docs = [doc for _, doc in page]
    else:
        out_docs = [_project(doc, query.fields) for _, doc in page]
    return {"docs": out_docs, "bookmark": bookmark, "warning": NO_INDEX_WARNING}
