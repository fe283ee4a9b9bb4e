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
    `{"$gt": 5}` also matches every string, array and object;
  - `$in` on an array field matches when any element equals any argument; `$in: []` matches
    nothing, `$nin: []` everything, `$and: []` and `$or: []` everything, `$all: []` nothing;
  - `$elemMatch` (any element), `$allMatch` (a non-empty array whose every element matches),
    `$keyMapMatch` (any key of an object) apply a sub-selector to the element or key itself;
  - `$mod` needs an integer field (CouchDB's `rem`: the remainder has the sign of the field).
Simplifications, on purpose:
  - strings collate by Unicode code point, not by CouchDB's ICU (UCA) collation: "B" < "a"
    here, "a" < "B" in CouchDB; equality is the same;
  - `$all` and `$in` compare by collation equality (1 == 1.0), CouchDB's `$all` by exact terms;
  - `$regex` is Python's syntax (close to PCRE for everyday patterns), unanchored like
    CouchDB's `re:run`, matched in linear time (see "regular expressions" below);
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
`MAX_DEPTH` levels and holds at most `MAX_NODES` JSON values; `sort` and `fields` are short;
a bookmark is at most `MAX_BOOKMARK` characters. A `$regex` pattern is at most
`MAX_REGEX_LENGTH` characters and `MAX_REGEX_PROGRAM` automaton steps, and is never run by
Python's backtracking `re` (which takes seconds on `[a-z]+\\d` over a 20,000-character string):
it is matched by a lazily built DFA, in time linear in the string whatever the pattern; what
no finite automaton can match (back-references, look-around, atomic groups) is refused.
"""

from __future__ import annotations

import base64
import binascii
import functools
import heapq
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping

# Python's own regular-expression parser (private, stable since 3.11): $regex has Python's
# syntax, matched by the linear-time automaton below rather than by `re`.
from re import _constants as _re_constants  # type: ignore[attr-defined]
from re import _parser as _re_parser  # type: ignore[attr-defined]
from typing import Any

import attrs

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
MAX_SORT_FIELDS = 16
MAX_FIELDS = 256
MAX_BOOKMARK = 16_384
MAX_REGEX_LENGTH = 512

Predicate = Callable[[Any], bool]


class MangoError(ValueError):
    """A query or selector that is not valid Mango. `error` is CouchDB's error name."""

    def __init__(self, reason: str, error: str = "bad_request"):
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


def json_compare(a: Any, b: Any) -> int:
    """-1, 0 or 1: CouchDB's collation of two JSON values (strings by code point; 1 == 1.0).
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
            return -1 if x < y else 1
    return 0


_LENGTHS: Any = object()  # a marker on json_compare's stack


@functools.total_ordering
class _Deep:
    """An array or object in a sort key, ordered by `json_compare`."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Deep) and json_compare(self.value, other.value) == 0

    def __lt__(self, other: _Deep) -> bool:
        return json_compare(self.value, other.value) < 0

    __hash__ = None  # type: ignore[assignment]


def collation_key(value: Any) -> tuple:
    """A sort key whose Python ordering is CouchDB's collation of JSON values."""
    rank = _rank(value)
    if rank >= _RANK_ARRAY:
        return (rank, _Deep(value))
    if rank == _RANK_NULL:
        return (rank,)
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


def _index(segment: str) -> int | None:
    # CouchDB: binary_to_integer, so "01" and "+1" index too; negative is a bad path.
    if segment and (segment.isdigit() or (segment[0] in "+-" and segment[1:].isdigit())):
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
        if key == "$or":
            return _Or(items)
        return _And(tuple(_negate(item) for item in items))
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


# --- regular expressions: a linear-time matcher ----------------------------------------------
#
# Python's `re` backtracks: `[a-z]+\d` takes seconds on a 20,000-character string and
# `\w*\d\w*\d!` minutes, all of it holding the event loop. So `$regex` never runs `re` on a
# document. The pattern is parsed by Python's own parser (`re._parser`: same syntax, same
# errors), compiled into a Thompson NFA, and searched by a lazily built DFA whose transitions
# are cached per (state, character): time linear in the string, whatever the pattern.
# Back-references, look-around, conditionals, atomic groups and possessive repeats (which no
# finite automaton expresses) are refused. Only whether there is a match is computed, so
# greedy and lazy repeats are the same.

_CHAR, _SPLIT, _JUMP, _ASSERT, _MATCH = range(5)
MAX_REGEX_PROGRAM = 1_024  # NFA instructions (`x{500}` is 500 of them)
_DFA_CACHE_LIMIT = 50_000  # cached transitions per pattern before the cache starts afresh
# A DFA can have exponentially many states (`(a|b)*a(a|b){60}`: one more per character of a
# random a/b string, each costing ~50 µs to build): a pattern past these bounds is refused
# as too costly, rather than run for minutes over a large document. Everyday patterns have
# a few dozen states.
MAX_DFA_STATES = 10_000
MAX_DFA_STATE_POSITIONS = 500_000  # NFA positions held in all states together
_ASCII_SPACE = frozenset(" \t\n\r\f\v")


def _is_ascii_word(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c == "_")


def _is_word(c: str) -> bool:
    return c.isalnum() or c == "_"


def _category(category: Any, ascii_only: bool) -> Callable[[str], bool]:
    C = _re_constants
    if category in (C.CATEGORY_DIGIT, C.CATEGORY_NOT_DIGIT):
        test = (lambda c: "0" <= c <= "9") if ascii_only else str.isdecimal
    elif category in (C.CATEGORY_SPACE, C.CATEGORY_NOT_SPACE):
        test = _ASCII_SPACE.__contains__ if ascii_only else str.isspace
    elif category in (C.CATEGORY_WORD, C.CATEGORY_NOT_WORD):
        test = _is_ascii_word if ascii_only else _is_word
    else:
        raise _RegexUnsupported(f"character category {category}")
    if category in (C.CATEGORY_NOT_DIGIT, C.CATEGORY_NOT_SPACE, C.CATEGORY_NOT_WORD):
        return lambda c: not test(c)
    return test


class _RegexUnsupported(Exception):
    pass


def _case_variants(c: str, flags: int) -> frozenset[str]:
    """The characters `c` matches as, under the pattern's flags: itself, and its simple case
    mappings with IGNORECASE (ASCII letters only with the ASCII flag, as `re` does)."""
    C = _re_constants
    if not flags & C.SRE_FLAG_IGNORECASE or (flags & C.SRE_FLAG_ASCII and not c.isascii()):
        return frozenset(c)
    mapped = (c, c.lower(), c.upper(), c.lower().upper(), c.upper().lower())
    return frozenset(m for m in mapped if len(m) == 1 and (m.isascii() or not
                                                         flags & C.SRE_FLAG_ASCII))


def _char_class(items: list, flags: int) -> Callable[[str], bool]:
    """The predicate of `[...]` (or of `\\d`, which the parser gives as a one-item class)."""
    C = _re_constants
    ascii_only = bool(flags & C.SRE_FLAG_ASCII)
    negate = bool(items) and items[0][0] is C.NEGATE
    literals: set[str] = set()
    ranges: list[tuple[int, int]] = []
    tests: list[Callable[[str], bool]] = []
    for op, arg in items[1:] if negate else items:
        if op is C.LITERAL:
            literals.update(_case_variants(chr(arg), flags))
        elif op is C.RANGE:
            ranges.append(arg)
        elif op is C.CATEGORY:
            tests.append(_category(arg, ascii_only))
        else:
            raise _RegexUnsupported(f"{op} in a character class")

    def inside(c: str) -> bool:
        for v in _case_variants(c, flags):
            if v in literals:
                return True
            o = ord(v)
            if any(low <= o <= high for low, high in ranges):
                return True
        return any(test(c) for test in tests)

    return (lambda c: not inside(c)) if negate else inside


def _required_literal(items: list, flags: int) -> str:
    """The longest run of consecutive case-sensitive literal characters at the top level of a
    pattern: text without it cannot match. Empty when there is none to rely on."""
    C = _re_constants
    if flags & C.SRE_FLAG_IGNORECASE:
        return ""
    if any(op is C.BRANCH for op, _ in items):
        return ""
    best = run = ""
    for op, arg in items:
        if op is C.LITERAL:
            run += chr(arg)
            best = max(best, run, key=len)
        elif op is C.AT:
            continue  # zero-width: the run goes on across it
        else:
            run = ""
    return best


class _Program:
    """A Thompson NFA: a list of instructions, built from `re._parser`'s tree; and the
    longest run of plain characters every match contains (a fast first check)."""

    def __init__(self, pattern: str):
        tree = _re_parser.parse(pattern, 0)
        self.code: list[tuple] = []
        self._emit_sequence(list(tree), tree.state.flags)
        self.code.append((_MATCH,))
        self.required = _required_literal(list(tree), tree.state.flags)

    def _add(self, instruction: tuple) -> int:
        if len(self.code) >= MAX_REGEX_PROGRAM:
            raise _RegexUnsupported(f"a pattern longer than {MAX_REGEX_PROGRAM} steps once "
                                    "repetitions are counted")
        self.code.append(instruction)
        return len(self.code) - 1

    def _emit_sequence(self, items: list, flags: int) -> None:
        for op, arg in items:
            self._emit(op, arg, flags)

    def _emit(self, op: Any, arg: Any, flags: int) -> None:
        C = _re_constants
        if op is C.LITERAL or op is C.NOT_LITERAL:
            wanted = _case_variants(chr(arg), flags)
            if len(wanted) == 1:
                test = chr(arg).__eq__
            else:
                test = lambda c: not wanted.isdisjoint(_case_variants(c, flags))  # noqa: E731
            if op is C.LITERAL:
                self._add((_CHAR, test))
            else:
                self._add((_CHAR, lambda c: not test(c)))
        elif op is C.ANY:
            if flags & C.SRE_FLAG_DOTALL:
                self._add((_CHAR, lambda c: True))
            else:
                self._add((_CHAR, lambda c: c != "\n"))
        elif op is C.IN:
            self._add((_CHAR, _char_class(arg, flags)))
        elif op is C.AT:
            self._add((_ASSERT, arg, flags))
        elif op is C.SUBPATTERN:
            _group, add_flags, del_flags, sub = arg
            self._emit_sequence(list(sub), (flags | add_flags) & ~del_flags)
        elif op is C.BRANCH:
            _, alternatives = arg
            self._emit_branch([list(a) for a in alternatives], flags)
        elif op is C.MAX_REPEAT or op is C.MIN_REPEAT:
            low, high, sub = arg
            self._emit_repeat(list(sub), low, high, flags)
        else:
            raise _RegexUnsupported(str(op).lower().replace("_", " "))

    def _emit_branch(self, alternatives: list[list], flags: int) -> None:
        jumps_to_end = []
        for alternative in alternatives[:-1]:
            split = self._add((_SPLIT, None, None))
            self._emit_sequence(alternative, flags)
            jumps_to_end.append(self._add((_JUMP, None)))
            self.code[split] = (_SPLIT, split + 1, len(self.code))
        self._emit_sequence(alternatives[-1], flags)
        for jump in jumps_to_end:
            self.code[jump] = (_JUMP, len(self.code))

    def _emit_repeat(self, sub: list, low: int, high: int, flags: int) -> None:
        for _ in range(low):
            self._emit_sequence(sub, flags)
        if high == _re_constants.MAXREPEAT:
            loop = self._add((_SPLIT, None, None))
            self._emit_sequence(sub, flags)
            self._add((_JUMP, loop))
            self.code[loop] = (_SPLIT, loop + 1, len(self.code))
            return
        skips = []
        for _ in range(high - low):
            skips.append(self._add((_SPLIT, None, None)))
            self._emit_sequence(sub, flags)
        for split in skips:
            self.code[split] = (_SPLIT, split + 1, len(self.code))


# What an assertion needs to know of the character before a position: the start of the string
# (_BEGIN), or (is a newline, is a word character, is an ASCII word character).
_BEGIN = ("begin",)


def _before_kind(c: str) -> tuple[bool, bool, bool]:
    return (c == "\n", _is_word(c), _is_ascii_word(c))


def _assertion_holds(at: Any, flags: int, before: Any, after: str | None, last: bool) -> bool:
    """`^ $ \\A \\Z \\b \\B` between `before` (_BEGIN or a `_before_kind`) and `after` (a
    character, or None at the end); `last`: `after` is the string's last character."""
    C = _re_constants
    multiline = flags & C.SRE_FLAG_MULTILINE
    if at is C.AT_BEGINNING:
        return before is _BEGIN or (bool(multiline) and before[0])
    if at is C.AT_BEGINNING_STRING:
        return before is _BEGIN
    if at is C.AT_END:
        if after is None:
            return True
        return after == "\n" and (bool(multiline) or last)
    if at is C.AT_END_STRING:
        return after is None
    if at is C.AT_BOUNDARY or at is C.AT_NON_BOUNDARY:
        if before is _BEGIN and after is None:
            return False  # Python: neither \b nor \B matches in the empty string
        ascii_only = flags & C.SRE_FLAG_ASCII
        word = _is_ascii_word if ascii_only else _is_word
        word_before = before is not _BEGIN and before[2 if ascii_only else 1]
        boundary = word_before != (after is not None and word(after))
        return boundary if at is C.AT_BOUNDARY else not boundary
    raise _RegexUnsupported(f"the assertion {at}")


class _Searcher:
    """Whether a pattern matches anywhere in a string: a DFA over sets of NFA positions, built
    lazily. Each character costs one cached transition, or, the first time, a closure over at
    most the program's size: time linear in the string. The cache is bounded; past its bound
    it starts afresh (still linear, only slower)."""

    def __init__(self, pattern: str):
        program = _Program(pattern)
        self.code = program.code
        self._required = program.required
        self._transitions: dict[tuple, tuple[bool, frozenset, Any]] = {}
        self._states: dict[frozenset, frozenset] = {}  # equal position sets stored once
        self._state_positions = 0
        self._assertions = False
        # `^...` or `\A...` (not multiline): a match can only start at the beginning.
        first = self.code[0]
        self._anchored = first[0] == _ASSERT and (
            first[1] is _re_constants.AT_BEGINNING_STRING
            or (first[1] is _re_constants.AT_BEGINNING
                and not first[2] & _re_constants.SRE_FLAG_MULTILINE)
        )
        # Check every assertion once, so an unsupported one fails now, not mid-query.
        for instruction in self.code:
            if instruction[0] == _ASSERT:
                self._assertions = True
                _assertion_holds(instruction[1], instruction[2], _BEGIN, "a", False)

    def _closure(self, pcs: frozenset, before: Any, after: str | None, last: bool) -> set[int]:
        """The consuming positions (and MATCH) reachable from `pcs` without consuming."""
        code = self.code
        reached: set[int] = set()
        seen: set[int] = set()
        stack = list(pcs)
        while stack:
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            instruction = code[pc]
            kind = instruction[0]
            if kind == _JUMP:
                stack.append(instruction[1])
            elif kind == _SPLIT:
                stack.append(instruction[2])
                stack.append(instruction[1])
            elif kind == _ASSERT:
                if _assertion_holds(instruction[1], instruction[2], before, after, last):
                    stack.append(pc + 1)
            else:
                reached.add(pc)
        return reached

    def _step(self, pcs: frozenset, before: Any, c: str, last: bool) -> tuple:
        """(matched before `c`, the next position set, the next `before`)."""
        reached = self._closure(pcs, before, c, last)
        code = self.code
        if any(code[pc][0] == _MATCH for pc in reached):
            return True, pcs, before
        following = {pc + 1 for pc in reached if code[pc][1](c)}
        if not self._anchored:
            following.add(0)  # a match may also start after this character
        positions = frozenset(following)
        stored = self._states.get(positions)
        if stored is None:
            self._state_positions += len(positions)
            if (len(self._states) >= MAX_DFA_STATES
                    or self._state_positions > MAX_DFA_STATE_POSITIONS):
                raise _RegexTooCostly()
            stored = self._states[positions] = positions
        return False, stored, _before_kind(c) if self._assertions else None

    def search(self, text: str) -> bool:
        """Whether the pattern matches somewhere in `text`. Raises _RegexTooCostly."""
        if self._required and self._required not in text:
            return False
        transitions = self._transitions
        if len(transitions) > _DFA_CACHE_LIMIT:
            transitions.clear()
        pcs: frozenset = frozenset((0,))
        before: Any = _BEGIN
        last = len(text) - 1
        for i, c in enumerate(text):
            key = (pcs, before, c, i == last)
            step = transitions.get(key)
            if step is None:
                step = transitions[key] = self._step(pcs, before, c, i == last)
            matched, pcs, before = step
            if matched:
                return True
            if not pcs:  # anchored at the start, and no way forward
                return False
        reached = self._closure(pcs, before, None, False)
        return any(self.code[pc][0] == _MATCH for pc in reached)


class _RegexTooCostly(Exception):
    pass


def check_regex(pattern: str, path: tuple[str, ...] = ()) -> _Searcher:
    """The searcher for a `$regex` pattern; MangoError for one too long, not Python syntax,
    or beyond a finite automaton."""
    if len(pattern) > MAX_REGEX_LENGTH:
        raise _bad_arg("$regex", pattern[:40] + "...",
                       f"longer than {MAX_REGEX_LENGTH} characters", path)
    try:
        return _Searcher(pattern)
    except re.error as exc:
        raise _bad_arg("$regex", pattern, str(exc), path) from None
    except _RegexUnsupported as exc:
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
        except _RegexTooCostly:
            raise _bad_arg(
                "$regex", pattern,
                f"too costly to match: its automaton grows past {MAX_DFA_STATES} states; "
                "simplify the pattern",
            ) from None

    return test


# --- compilation into closures -------------------------------------------------------------


def _hashable(value: Any) -> Any:
    """A hash key equal for collation-equal scalars; None for arrays and objects."""
    t = type(value)
    if t is str:
        return ("s", value)
    if t is int or t is float:
        return ("n", value)
    if value is None:
        return ("z",)
    if t is bool:
        return ("b", value)
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


def _order_test(op: str, literal: Any) -> Predicate:
    compare = {
        "$gt": lambda a, b: a > b, "$gte": lambda a, b: a >= b,
        "$lt": lambda a, b: a < b, "$lte": lambda a, b: a <= b,
    }[op]
    rank = _rank(literal)
    if rank == _RANK_NUMBER or rank == _RANK_STRING:
        # The common case without building keys: same rank compares values, else ranks.
        def test(v: Any) -> bool:
            r = _rank(v)
            return compare(v, literal) if r == rank else compare(r, rank)

        return test
    return lambda v: compare(json_compare(v, literal), 0)


def _membership(values: list) -> Predicate:
    """value -> it equals one of `values` (collation equality), with a set for scalars."""
    keys = set()
    others = []
    for item in values:
        h = _hashable(item)
        if h is None:
            others.append(_eq_test(item))
        else:
            keys.add(h)

    def member(v: Any) -> bool:
        h = _hashable(v)
        if h is not None:
            return h in keys
        return any(test(v) for test in others)

    return member


def _op_test(op: str, arg: Any) -> Predicate:
    """The test of one operator on a value that is present."""
    if op == "$eq":
        return _eq_test(arg)
    if op == "$ne":
        eq = _eq_test(arg)
        return lambda v: not eq(v)
    if op in ("$gt", "$gte", "$lt", "$lte"):
        return _order_test(op, arg)
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
        wanted = [_membership([item]) for item in arg]
        whole = _eq_test(arg[0]) if len(arg) == 1 and type(arg[0]) is list else None

        def has_all(v: Any) -> bool:
            if type(v) is not list:
                return False
            if all(any(w(x) for x in v) for w in wanted):
                return True
            return whole is not None and whole(v)

        return has_all
    raise AssertionError(op)  # _check_arg let through an operator this does not know


def _cond_test(cond: Any) -> Predicate:
    if isinstance(cond, _Op):
        return _op_test(cond.op, cond.arg)
    if isinstance(cond, _CondNot):
        inner = _cond_test(cond.cond)
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
    test = _cond_test(node.cond)
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
    return tree


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
        raw = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        text = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        if len(text) <= MAX_BOOKMARK:
            return text
    except MangoError:
        pass
    payload["key"] = None
    raw = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
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

        def keyed() -> Iterable[tuple[tuple, dict]]:
            for doc in live:
                values = [get(doc) for get in getters]
                # A JSON index on the sort fields holds only documents that have them.
                if any(v is MISSING or v is BAD_PATH for v in values):
                    continue
                key = tuple(collation_key(v) for v in values) + (str(doc.get("_id", "")),)
                yield key, (values, doc)

        candidates: Iterable = keyed()
        if query.bookmark is not None:
            start = tuple(collation_key(v) for v in query.bookmark.values) + (
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
