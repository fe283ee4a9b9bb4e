"""Access rules at document granularity (pure: no I/O, no keys).

A rule grants `read` or `write` (which implies read) on documents of one doctype, optionally
only those matching a Mango-style selector, to one subject: an app, a peer (by node id), a
role, or the owner. Everything not granted is denied; the owner is allowed everything.

Selectors are compiled once into closures (`compile_selector`) and the rules indexed by
(doctype, subject) in a `RuleSet`, so a decision is a few dict lookups and closure calls.

Selector language (a subset of CouchDB Mango):
  {"field": value}                 equality (JSON equality: 1 == 1.0, true != 1)
  {"a.b": ...}, {"a": {"b": ...}}  dotted paths and nested objects reach into sub-objects
  {"f": {"$eq"|"$ne": v}}          equal / not equal
  {"f": {"$gt"|"$gte"|"$lt"|"$lte": v}}  ordering; v and the field are both numbers or both
                                   strings, otherwise no match
  {"f": {"$in"|"$nin": [v, ...]}}  membership; an array field matches if any element does
  {"f": {"$exists": true|false}}
  {"$and": [sel, ...]}, {"$or": [sel, ...]}, {"$not": sel}
A missing field matches nothing except `{"$exists": false}`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from .errors import InvalidArgument, RuleError
from .identity import format_node_id, parse_node_id
from .principal import APP_KIND, OWNER_KIND, PEER_KIND, Decision

ROLE_KIND = "role"
SUBJECT_KINDS = (APP_KIND, ROLE_KIND, PEER_KIND, OWNER_KIND)
PERMS = ("read", "write")
ACTIONS = ("read", "write", "list")

# Permission levels: a rule of level L grants every action of level <= L.
ACTION_LEVEL = {"read": 1, "list": 1, "write": 2}
PERM_LEVEL = {"read": 1, "write": 2}

MAX_NAME = 200
MAX_SELECTOR_DEPTH = 16

Predicate = Callable[[Mapping[str, Any]], bool]


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def check_name(what: str, value: object, error: type[InvalidArgument] = InvalidArgument) -> str:
    """A doctype, app name, role or share id: a non-empty printable string."""
    if not isinstance(value, str) or not value:
        raise error(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > MAX_NAME:
        raise error(f"{what} is {len(value)} characters long; the limit is {MAX_NAME}")
    if not value.isprintable():
        raise error(f"{what} {value!r} contains control characters")
    return value


@attrs.frozen
class Rule:
    """One grant. Build with `Rule.make`, which validates and normalises."""

    id: str
    doctype: str
    selector: dict[str, Any] | None
    subject_kind: str  # "app" | "role" | "peer" | "owner"
    subject: str  # app name, role name, peer node id, or "owner"
    perm: str  # "read" | "write"

    @classmethod
    def make(
        cls,
        id: str,
        doctype: str,
        selector: Mapping[str, Any] | None,
        subject_kind: str,
        subject: str | bytes,
        perm: str,
    ) -> Rule:
        """A validated rule; peer subjects are normalised to the canonical node id.
        Raises `RuleError` naming the bad part."""
        check_name("rule doctype", doctype, RuleError)
        if subject_kind not in SUBJECT_KINDS:
            raise RuleError(
                f"rule subject kind must be one of {', '.join(SUBJECT_KINDS)}, got {subject_kind!r}"
            )
        if subject_kind == PEER_KIND:
            if isinstance(subject, (bytes, bytearray)):
                subject = format_node_id(bytes(subject))
            else:
                try:
                    subject = format_node_id(parse_node_id(subject))
                except ValueError as exc:
                    raise RuleError(f"rule peer subject: {exc}") from None
        elif subject_kind == OWNER_KIND:
            subject = "owner"
        else:
            check_name(f"rule {subject_kind} name", subject, RuleError)
        if perm not in PERMS:
            raise RuleError(f"rule perm must be 'read' or 'write', got {perm!r}")
        if selector is not None:
            if not isinstance(selector, Mapping):
                raise RuleError(
                    f"a selector is a JSON object, got {type(selector).__name__}: {selector!r}"
                )
            selector = _json_copy(selector, "selector")
            compile_selector(selector)  # refuse a malformed selector now, not at decision time
        return cls(id, doctype, selector, subject_kind, subject, perm)

    @property
    def subject_label(self) -> str:
        return f"{self.subject_kind}:{self.subject}"


def _json_copy(value: Any, where: str, depth: int = 0) -> Any:
    """A deep copy of a JSON value; anything that is not JSON is a `RuleError`."""
    if depth > MAX_SELECTOR_DEPTH * 2:
        raise RuleError(f"{where} is nested too deeply")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RuleError(f"{where}: {value!r} is not a JSON number")
        return value
    if isinstance(value, (list, tuple)):
        return [_json_copy(v, where, depth + 1) for v in value]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise RuleError(f"{where}: object keys are strings, got {k!r}")
            out[k] = _json_copy(v, where, depth + 1)
        return out
    raise RuleError(f"{where}: {type(value).__name__} {value!r} is not a JSON value")


# --- JSON equality and ordering ----------------------------------------------------------


def _is_number(v: Any) -> bool:
    t = type(v)
    return t is int or t is float


def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values: numbers by value, booleans distinct from numbers."""
    ta, tb = type(a), type(b)
    if ta is bool or tb is bool:
        return ta is tb and a == b
    if (ta is int or ta is float) and (tb is int or tb is float):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if ta is not tb:
        return False
    return a == b


# --- selector compilation -----------------------------------------------------------------


def _getter(path: tuple[str, ...]) -> Callable[[Mapping[str, Any]], Any]:
    if len(path) == 1:
        key = path[0]
        return lambda doc: doc.get(key, MISSING)

    def get(doc: Mapping[str, Any]) -> Any:
        value: Any = doc
        for part in path:
            if not isinstance(value, Mapping):
                return MISSING
            value = value.get(part, MISSING)
            if value is MISSING:
                return MISSING
        return value

    return get


def _eq_test(literal: Any) -> Callable[[Any], bool]:
    """value -> value == literal (JSON equality), specialised by literal type for speed."""
    if literal is None:
        return lambda v: v is None
    t = type(literal)
    if t is bool:
        return lambda v: v is literal
    if t is str:
        return lambda v: v == literal  # a str only equals a str
    if t is int or t is float:
        return lambda v: v == literal and type(v) is not bool
    return lambda v: json_equal(v, literal)


def _order_test(op: str, literal: Any, where: str) -> Callable[[Any], bool]:
    if isinstance(literal, bool) or not (_is_number(literal) or isinstance(literal, str)):
        raise RuleError(f"selector at {where}: {op} needs a number or a string, got {literal!r}")
    cmp = {
        "$gt": lambda v: v > literal,
        "$gte": lambda v: v >= literal,
        "$lt": lambda v: v < literal,
        "$lte": lambda v: v <= literal,
    }[op]
    if isinstance(literal, str):
        return lambda v: type(v) is str and cmp(v)
    return lambda v: (type(v) is int or type(v) is float) and cmp(v)


def _in_test(literal: Any, where: str, op: str) -> Callable[[Any], bool]:
    if not isinstance(literal, list):
        raise RuleError(f"selector at {where}: {op} needs a list, got {literal!r}")
    tests = [_eq_test(item) for item in literal]
    strings = frozenset(item for item in literal if type(item) is str)
    only_strings = len(strings) == len(literal)

    def one(v: Any) -> bool:
        if only_strings:
            return type(v) is str and v in strings
        return any(test(v) for test in tests)

    # As in CouchDB, an array field is "in" the list if any of its elements is.
    return lambda v: any(one(x) for x in v) if type(v) is list else one(v)


_FIELD_OPS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists")
_COMBINATORS = ("$and", "$or", "$not")


def _field_condition(path: tuple[str, ...], condition: Any, depth: int) -> list[Predicate]:
    where = ".".join(path)
    if isinstance(condition, dict) and any(k.startswith("$") for k in condition):
        plain = [k for k in condition if not k.startswith("$")]
        if plain:
            raise RuleError(
                f"selector at {where}: mixes operators with field names {plain!r}; "
                "nest the fields or use $and"
            )
        get = _getter(path)
        preds: list[Predicate] = []
        for op, literal in condition.items():
            if op == "$exists":
                if not isinstance(literal, bool):
                    raise RuleError(f"selector at {where}: $exists needs true or false")
                if literal:
                    preds.append(lambda doc, g=get: g(doc) is not MISSING)
                else:
                    preds.append(lambda doc, g=get: g(doc) is MISSING)
                continue
            if op == "$eq":
                test = _eq_test(literal)
            elif op == "$ne":
                eq = _eq_test(literal)
                test = lambda v, eq=eq: not eq(v)  # noqa: E731
            elif op in ("$gt", "$gte", "$lt", "$lte"):
                test = _order_test(op, literal, where)
            elif op == "$in":
                test = _in_test(literal, where, op)
            elif op == "$nin":
                inside = _in_test(literal, where, op)
                test = lambda v, inside=inside: not inside(v)  # noqa: E731
            else:
                raise RuleError(
                    f"selector at {where}: unknown operator {op!r} "
                    f"(supported: {', '.join(_FIELD_OPS)})"
                )
            preds.append(
                lambda doc, g=get, t=test: (v := g(doc)) is not MISSING and t(v)  # type: ignore[misc]
            )
        return preds
    if isinstance(condition, dict):
        # {"a": {"b": 1}} reaches into sub-object a, as Mango does.
        if not condition:
            raise RuleError(f"selector at {where}: empty object; use {{'$exists': true}}")
        return _object_predicates(condition, path, depth + 1)
    get = _getter(path)
    test = _eq_test(condition)
    return [lambda doc: (v := get(doc)) is not MISSING and test(v)]


def _object_predicates(
    selector: Mapping[str, Any], prefix: tuple[str, ...], depth: int
) -> list[Predicate]:
    if depth > MAX_SELECTOR_DEPTH:
        raise RuleError(f"selector is nested deeper than {MAX_SELECTOR_DEPTH} levels")
    preds: list[Predicate] = []
    for key, value in selector.items():
        if not isinstance(key, str):
            raise RuleError(f"selector keys are strings, got {key!r}")
        if key.startswith("$"):  # only at top level: under a field, "$" keys are operators
            preds.append(_combinator(key, value, depth))
            continue
        parts = tuple(key.split("."))
        if any(not p for p in parts):
            raise RuleError(f"selector field {key!r} has an empty path segment")
        preds.extend(_field_condition(prefix + parts, value, depth))
    return preds


def _combinator(op: str, value: Any, depth: int) -> Predicate:
    if op == "$not":
        if not isinstance(value, dict):
            raise RuleError(f"selector: $not needs a selector object, got {value!r}")
        inner = _all(_object_predicates(value, (), depth + 1))
        return lambda doc: not inner(doc)
    if op not in ("$and", "$or"):
        raise RuleError(
            f"selector: unknown operator {op!r} at top level "
            f"(supported: {', '.join(_COMBINATORS)}, or a field name)"
        )
    if not isinstance(value, list) or not value:
        raise RuleError(f"selector: {op} needs a non-empty list of selectors, got {value!r}")
    branches = []
    for item in value:
        if not isinstance(item, dict):
            raise RuleError(f"selector: every {op} branch is an object, got {item!r}")
        branches.append(_all(_object_predicates(item, (), depth + 1)))
    if op == "$and":
        return _all(branches)
    return lambda doc: any(branch(doc) for branch in branches)


def _all(preds: list[Predicate]) -> Predicate:
    if not preds:
        return lambda doc: True
    if len(preds) == 1:
        return preds[0]
    if len(preds) == 2:
        a, b = preds
        return lambda doc: a(doc) and b(doc)
    return lambda doc: all(p(doc) for p in preds)


def compile_selector(selector: Mapping[str, Any] | None) -> Predicate | None:
    """A predicate over document metadata, or None for "every document".
    Raises `RuleError` for a malformed selector."""
    if selector is None:
        return None
    if not isinstance(selector, Mapping):
        raise RuleError(f"a selector is a JSON object, got {type(selector).__name__}")
    if not selector:
        return None
    return _all(_object_predicates(selector, (), 0))


# --- the compiled rule set ----------------------------------------------------------------

Subject = tuple[str, str]  # (kind, value)
_Entry = tuple[int, Predicate | None, Decision]


class RuleSet:
    """Rules indexed by (doctype, subject) with compiled selectors.

    Immutable once built: when rules change, build a new one (`RuleSet(rules, previous)`
    reuses the compiled selectors of unchanged rules)."""

    __slots__ = ("rules", "_index", "_compiled")

    def __init__(self, rules: Iterable[Rule], previous: RuleSet | None = None):
        self.rules: dict[str, Rule] = {r.id: r for r in rules}
        reuse = previous._compiled if previous is not None else {}
        self._compiled: dict[str, tuple[Rule, Predicate | None]] = {}
        index: dict[tuple[str, Subject], list[_Entry]] = {}
        for rule in self.rules.values():
            cached = reuse.get(rule.id)
            if cached is not None and cached[0] == rule:
                pred = cached[1]
            else:
                pred = compile_selector(rule.selector)
            self._compiled[rule.id] = (rule, pred)
            scope = "" if rule.selector is None else " on matching documents"
            allow = Decision(
                True,
                f"rule {rule.id} grants {rule.perm} on {rule.doctype!r}{scope} "
                f"to {rule.subject_label}",
            )
            key = (rule.doctype, (rule.subject_kind, rule.subject))
            index.setdefault(key, []).append((PERM_LEVEL[rule.perm], pred, allow))
        # Unconditional grants first: they decide without evaluating a selector.
        self._index = {
            key: tuple(sorted(entries, key=lambda e: e[1] is not None))
            for key, entries in index.items()
        }

    def match(
        self, subjects: Iterable[Subject], level: int, doctype: str, meta: Mapping[str, Any]
    ) -> Decision | None:
        """The allowing decision of the first rule granting `level` on this document to one
        of `subjects`, or None if none does."""
        index = self._index
        for subject in subjects:
            entries = index.get((doctype, subject))
            if entries is not None:
                for rule_level, pred, allow in entries:
                    if rule_level >= level and (pred is None or pred(meta)):
                        return allow
        return None

    def doctypes(self, subjects: Iterable[Subject], level: int) -> list[str]:
        """The doctypes on some documents of which a rule grants `level` to `subjects`."""
        wanted = set(subjects)
        return sorted({doctype for (doctype, subject), entries in self._index.items()
                       if subject in wanted and any(e[0] >= level for e in entries)})

    def match_doctype(
        self, subjects: Iterable[Subject], level: int, doctype: str
    ) -> tuple[Decision, bool] | None:
        """(decision, restricted) for the first rule granting `level` on some documents of
        `doctype`; restricted is True when every such grant has a selector."""
        index = self._index
        found: Decision | None = None
        for subject in subjects:
            for rule_level, pred, allow in index.get((doctype, subject), ()):
                if rule_level >= level:
                    if pred is None:
                        return allow, False
                    found = found or allow
        return (found, True) if found is not None else None
