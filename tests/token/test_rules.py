"""Rules and selectors (pure): compilation, matching, indexing, refusals."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from plugshare.token import RuleError, format_node_id
from plugshare.token.rules import Rule, RuleSet, compile_selector


def match(selector: dict, doc: dict) -> bool:
    pred = compile_selector(selector)
    return True if pred is None else pred(doc)


DOC = {
    "doctype": "io.notes",
    "author": "alice",
    "n": 5,
    "f": 2.5,
    "flag": True,
    "none": None,
    "tags": ["work", "urgent"],
    "meta": {"project": {"name": "apollo", "year": 1969}},
}


@pytest.mark.parametrize(
    "selector, expected",
    [
        ({}, True),
        ({"author": "alice"}, True),
        ({"author": "bob"}, False),
        ({"author": {"$eq": "alice"}}, True),
        ({"author": {"$ne": "alice"}}, False),
        ({"author": {"$ne": "bob"}}, True),
        ({"missing": {"$ne": "bob"}}, False),  # a missing field matches nothing...
        ({"missing": {"$exists": False}}, True),  # ...except $exists: false
        ({"author": {"$exists": True}}, True),
        ({"none": {"$exists": True}}, True),
        ({"none": None}, True),
        ({"n": 5}, True),
        ({"n": 5.0}, True),  # JSON numbers compare by value
        ({"flag": 1}, False),  # but true is not 1
        ({"n": True}, False),
        ({"flag": True}, True),
        ({"n": {"$gt": 4}}, True),
        ({"n": {"$gt": 5}}, False),
        ({"n": {"$gte": 5}}, True),
        ({"n": {"$lt": 5.5}}, True),
        ({"n": {"$lte": 4}}, False),
        ({"n": {"$gt": "a"}}, False),  # different types never order
        ({"author": {"$gt": "al", "$lt": "am"}}, True),
        ({"flag": {"$gt": 0}}, False),
        ({"author": {"$in": ["bob", "alice"]}}, True),
        ({"author": {"$nin": ["bob", "alice"]}}, False),
        ({"n": {"$in": [1, 5.0]}}, True),
        ({"n": {"$in": [True]}}, False),
        ({"tags": {"$in": ["urgent"]}}, True),  # an array field: any element
        ({"tags": {"$nin": ["urgent"]}}, False),
        ({"tags": ["work", "urgent"]}, True),  # equality of whole arrays
        ({"tags": ["urgent", "work"]}, False),
        ({"meta.project.name": "apollo"}, True),
        ({"meta": {"project": {"year": {"$gte": 1969}}}}, True),
        ({"meta.project.name.x": "apollo"}, False),
        ({"meta": {"project": {"name": "apollo", "year": 1969}}}, True),
        ({"$and": [{"author": "alice"}, {"n": {"$lt": 10}}]}, True),
        ({"$and": [{"author": "alice"}, {"n": {"$gt": 10}}]}, False),
        ({"$or": [{"author": "bob"}, {"n": 5}]}, True),
        ({"$or": [{"author": "bob"}, {"n": 6}]}, False),
        ({"$not": {"author": "bob"}}, True),
        ({"author": "alice", "n": {"$in": [4, 6]}}, False),
    ],
)
def test_selector_semantics(selector: dict, expected: bool) -> None:
    assert match(selector, DOC) is expected


@pytest.mark.parametrize(
    "selector, message",
    [
        ({"a": {"$regex": "x"}}, "unknown operator '\\$regex'"),
        ({"$nor": []}, "unknown operator '\\$nor'"),
        ({"a": {"$in": "x"}}, "\\$in needs a list"),
        ({"a": {"$gt": [1]}}, "\\$gt needs a number or a string"),
        ({"a": {"$gt": True}}, "\\$gt needs a number or a string"),
        ({"a": {"$exists": "yes"}}, "\\$exists needs true or false"),
        ({"$and": []}, "non-empty list"),
        ({"$or": {"a": 1}}, "non-empty list"),
        ({"a": {"$eq": 1, "b": 2}}, "mixes operators with field names"),
        ({"a..b": 1}, "empty path segment"),
        ({"a": {}}, "empty object"),
        ({"a": {"b": {"$and": [{"c": 1}]}}}, "selector at a.b: unknown operator '\\$and'"),
    ],
)
def test_malformed_selectors_are_refused_with_a_reason(selector: dict, message: str) -> None:
    with pytest.raises(RuleError, match=message):
        compile_selector(selector)


def test_rule_make_validates_and_normalises() -> None:
    fp = bytes(range(32))
    rule = Rule.make("r1", "io.notes", None, "peer", format_node_id(fp).lower(), "read")
    assert rule.subject == format_node_id(fp)
    assert Rule.make("r2", "io.notes", None, "peer", fp, "read").subject == format_node_id(fp)
    with pytest.raises(RuleError, match="subject kind"):
        Rule.make("r1", "io.notes", None, "group", "x", "read")
    with pytest.raises(RuleError, match="perm"):
        Rule.make("r1", "io.notes", None, "app", "x", "admin")
    with pytest.raises(RuleError, match="doctype"):
        Rule.make("r1", "", None, "app", "x", "read")
    with pytest.raises(RuleError, match="peer subject"):
        Rule.make("r1", "io.notes", None, "peer", "NOT-A-NODE-ID", "read")
    with pytest.raises(RuleError, match="not a JSON value"):
        Rule.make("r1", "io.notes", {"a": {1, 2}}, "app", "x", "read")
    with pytest.raises(RuleError, match="JSON object"):
        Rule.make("r1", "io.notes", ["a"], "app", "x", "read")  # type: ignore[arg-type]


def test_rule_selector_is_copied_so_later_mutation_cannot_change_it() -> None:
    selector: dict[str, Any] = {"author": "alice"}
    rule = Rule.make("r1", "io.notes", selector, "app", "x", "read")
    selector["author"] = "mallory"
    assert rule.selector == {"author": "alice"}


def test_ruleset_indexes_by_doctype_and_subject_and_levels() -> None:
    rules = [
        Rule.make("r1", "io.notes", {"author": "alice"}, "app", "notes", "read"),
        Rule.make("r2", "io.photos", None, "role", "family", "write"),
    ]
    rs = RuleSet(rules)
    app = (("app", "notes"),)
    member = (("peer", "X"), ("role", "family"))
    assert rs.match(app, 1, "io.notes", {"author": "alice"}).reason.startswith("rule r1")
    assert rs.match(app, 1, "io.notes", {"author": "bob"}) is None
    assert rs.match(app, 2, "io.notes", {"author": "alice"}) is None  # read does not give write
    assert rs.match(app, 1, "io.photos", {}) is None
    assert rs.match(member, 1, "io.photos", {}).allowed  # write implies read
    assert rs.match(member, 2, "io.photos", {}).allowed
    decision, restricted = rs.match_doctype(app, 1, "io.notes")
    assert decision.allowed and restricted
    assert rs.match_doctype(member, 2, "io.photos")[1] is False
    assert rs.match_doctype(app, 2, "io.notes") is None


def test_ruleset_reuses_compiled_selectors_of_unchanged_rules() -> None:
    r1 = Rule.make("r1", "d", {"a": 1}, "app", "x", "read")
    first = RuleSet([r1])
    second = RuleSet([r1, Rule.make("r2", "d", {"b": 1}, "app", "x", "read")], first)
    assert second._compiled["r1"][1] is first._compiled["r1"][1]


# --- compiled selectors agree with a plain reading of the documented semantics -------------

MISSING = object()


def _get(doc: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return MISSING
        doc = doc[part]
    return doc


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _eq(a: Any, b: Any) -> bool:
    if _is_num(a) and _is_num(b):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _ref(selector: dict, doc: dict) -> bool:
    for key, cond in selector.items():
        if key == "$and":
            ok = all(_ref(s, doc) for s in cond)
        elif key == "$or":
            ok = any(_ref(s, doc) for s in cond)
        else:
            value = _get(doc, key)
            (op, lit), = cond.items()
            if op == "$exists":
                ok = (value is not MISSING) == lit
            elif value is MISSING:
                ok = False
            elif op == "$eq":
                ok = _eq(value, lit)
            elif op == "$ne":
                ok = not _eq(value, lit)
            elif op == "$in":
                items = value if isinstance(value, list) else [value]
                ok = any(_eq(v, x) for v in items for x in lit)
            else:
                both_str = isinstance(value, str) and isinstance(lit, str)
                both_num = _is_num(value) and _is_num(lit)
                ok = (both_str or both_num) and (value > lit if op == "$gt" else value < lit)
        if not ok:
            return False
    return True


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([1.0, 2.5]),
    st.sampled_from(["a", "b", "c"]),
)
fields = st.sampled_from(["x", "y", "z.w"])
orderable = st.one_of(st.integers(-3, 3), st.sampled_from(["a", "b"]))
conditions = st.one_of(
    st.tuples(st.sampled_from(["$eq", "$ne"]), scalars),
    st.tuples(st.sampled_from(["$gt", "$lt"]), orderable),
    st.tuples(st.just("$in"), st.lists(scalars, max_size=3)),
    st.tuples(st.just("$exists"), st.booleans()),
)
leaf = st.builds(lambda f, c: {f: {c[0]: c[1]}}, fields, conditions)
selectors = st.recursive(
    leaf,
    lambda inner: st.builds(
        lambda op, items: {op: items}, st.sampled_from(["$and", "$or"]),
        st.lists(inner, min_size=1, max_size=3),
    ),
    max_leaves=6,
)
values = st.one_of(scalars, st.lists(scalars, max_size=3))
docs = st.fixed_dictionaries(
    {}, optional={"x": values, "y": values, "z": st.one_of(values, st.fixed_dictionaries({}, optional={"w": values}))}
)


@settings(max_examples=400, deadline=None)
@given(selectors, docs)
def test_compiled_selectors_agree_with_reference(selector: dict, doc: dict) -> None:
    assert match(selector, doc) == _ref(selector, doc)
