"""Mango (CouchDB's `_find` query language): selectors, queries, paging, bounds.

Pure functions, so no node is needed: the tables follow CouchDB's documentation ("Selector
Syntax", "/db/_find") and the cases of apache/couchdb's own mango_selector tests."""

from __future__ import annotations

import base64
import json
import random
import re
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plugshare.node.couch import mango
from plugshare.node.couch.mango import MangoError, compile_selector, parse_query, run


def matches(selector, doc) -> bool:
    return compile_selector(selector)(doc)


def find(body, docs):
    return run(parse_query(body), docs)


# --- operator tables: {"x": S} on {"x": value}, and {"x": {"$not": S}} gives the opposite ----

OPERATOR_TABLE = [
    ({"$lt": 5}, [(True, 4), (False, 5), (False, 6)]),
    ({"$lt": "hello"}, [(True, "held"), (False, "hello"), (False, "help")]),
    ({"$lt": [1, 2, 3]}, [(True, [1, 2, 2]), (True, [1, 2]), (False, [1, 2, 3]),
                          (False, [1, 2, 4]), (False, [1, 3])]),
    ({"$lte": 5}, [(True, 4), (True, 5), (False, 6)]),
    ({"$lte": "hello"}, [(True, "held"), (True, "hello"), (False, "help")]),
    ({"$gt": 5}, [(False, 4), (False, 5), (True, 6)]),
    ({"$gt": [1, 2, 3]}, [(False, [1, 2, 2]), (False, [1, 2]), (False, [1, 2, 3]),
                          (True, [1, 2, 4]), (True, [1, 3])]),
    ({"$gte": "hello"}, [(False, "held"), (True, "hello"), (True, "help")]),
    ({"$eq": 5}, [(True, 5), (True, 5.0), (False, 6), (False, "5"), (False, True)]),
    ({"$eq": [1, [2, 3, 4], 5]}, [(True, [1, [2, 3, 4], 5]), (False, [1, [2, 3, 4]]),
                                  (False, [1, [2, 3, 4], 5, 6]), (False, [1, [2, 7, 4], 5])]),
    ({"$eq": {"a": {"b": {"c": 7}}}}, [(True, {"a": {"b": {"c": 7}}}),
                                       (False, {"a": {"b": {"c": 8}}}),
                                       (False, {"a": {"b": {"d": 7}}})]),
    ({"$ne": 5}, [(False, 5), (True, 6), (True, "5")]),
    ({"$in": []}, [(False, 0), (False, True), (False, "foo")]),
    ({"$in": [42, False, "bar", [["nested"], "list"], {"b": 2}]}, [
        (True, 42), (True, False), (True, "bar"), (True, {"b": 2}),
        (False, 43), (False, True), (False, "bars"), (False, {"b": 2, "c": 3}),
        # an array field is "in" when one of its items is...
        (True, [0, 42]), (True, [0, False]), (True, [0, {"b": 2}]),
        # ...so an array candidate matches only as an item
        (False, [["nested"], "list"]), (True, [0, [["nested"], "list"]]),
    ]),
    ({"$nin": []}, [(True, 0), (True, "foo")]),
    ({"$nin": [42, "bar"]}, [(False, 42), (True, 43), (False, [0, 42]), (True, [0, 1])]),
    ({"$all": []}, [(False, []), (False, [42]), (False, {}), (False, "foo")]),
    ({"$all": [1, 2, 3, 4]}, [(True, [3, 2, 4, 1]), (True, [0, 4, 3, 5, 2, 1, 6]),
                              (False, [3, 2, 4]), (False, [])]),
    ({"$all": [[1, 2, 3, 4]]}, [(True, [1, 2, 3, 4]), (False, [4, 3, 2, 1]),
                                (False, [1, 3, 4]), (True, [5, [1, 2, 3, 4], 6]),
                                (False, [5, [1, 3, 4], 6])]),
    ({"$all": ["hello"]}, [(False, "hello"), (True, ["hello"]), (True, [0, "hello", 1]),
                           (False, [])]),
    ({"$all": [{"a": 1}]}, [(True, [{"a": 1}]), (False, [{"a": 1, "b": 2}])]),
    ({"$type": "null"}, [(True, None), (False, False), (False, {})]),
    ({"$type": "boolean"}, [(True, True), (True, False), (False, 0)]),
    ({"$type": "number"}, [(True, 42), (True, 3.14), (True, 0), (False, True), (False, [1]),
                           (False, "1")]),
    ({"$type": "string"}, [(True, ""), (True, "hello"), (False, [])]),
    ({"$type": "array"}, [(True, []), (True, [1, 2]), (False, {}), (False, "hi")]),
    ({"$type": "object"}, [(True, {}), (True, {"a": 1}), (False, [{"a": 1}]), (False, None)]),
    ({"$regex": "^[0-9a-f]+$"}, [(False, ""), (True, "3a0df5e"), (False, "3a0gf5e"),
                                 (False, 42)]),
    ({"$regex": "ill"}, [(True, "Bill"), (False, "Bob")]),  # unanchored, like re:run
    ({"$beginsWith": "foo"}, [(True, "foo"), (True, "food"), (False, "more food"),
                              (False, "fo"), (False, 42)]),
    ({"$mod": [28, 1]}, [(True, 1), (True, 29), (True, 57), (False, 58), (False, "57"),
                         (False, 29.0)]),
    ({"$mod": [3, -2]}, [(True, -5), (False, 1)]),  # Erlang rem: the sign of the field
    ({"$size": 3}, [(False, 3), (False, "fun"), (True, [0, 0, 0]), (False, [0, 0]),
                    (False, [0, 0, 0, 0])]),
    ({"$allMatch": {"$eq": 0}}, [(False, []), (True, [0]), (False, [1]), (False, [0, 1])]),
    ({"$elemMatch": {"$ne": 0}}, [(False, []), (False, [0]), (True, [1]), (True, [0, 1])]),
    ({"$elemMatch": {"$eq": 0}}, [(False, []), (True, [0]), (False, [1]), (True, [0, 1])]),
    ({"$elemMatch": {"$gte": 80, "$lt": 85}}, [(True, [70, 82]), (False, [70, 85])]),
    ({"$keyMapMatch": {"$regex": "^[a-z]+$"}}, [(True, {"hello": 0}), (True, {"a": 1, "b": 2}),
                                                (True, {"a": 1, "b4": 2}), (False, {"b4": 2}),
                                                (False, {})]),
    ({"$exists": True}, [(True, 0), (True, None)]),
    ({"$and": [{"$gt": 1}, {"$lt": 5}]}, [(True, 3), (False, 5)]),
    ({"$or": [{"$lt": 1}, {"$gt": 5}]}, [(True, 0), (False, 3), (True, 6)]),
    ({"$nor": [{"$lt": 1}, {"$gt": 5}]}, [(False, 0), (True, 3), (False, 6)]),
    ({"$gt": 1, "$lt": 5}, [(True, 3), (False, 1), (False, 5)]),
]


@pytest.mark.parametrize(
    "selector, value, expected",
    [(sel, value, result) for sel, cases in OPERATOR_TABLE for result, value in cases],
    ids=lambda v: json.dumps(v) if not isinstance(v, bool) else str(v),
)
def test_operator_and_its_negation(selector, value, expected):
    doc = {"_id": "d", "x": value}
    assert matches({"x": selector}, doc) is expected
    assert matches({"x": {"$not": selector}}, doc) is (not expected)
    assert matches({"$not": {"x": selector}}, doc) is (not expected)


# --- missing fields and paths -------------------------------------------------------------

@pytest.mark.parametrize("selector, expected", [
    ({"x": {"$exists": True}}, False),
    ({"x": {"$exists": False}}, True),
    ({"x": {"$ne": 5}}, False),  # $ne still needs the field
    ({"$not": {"x": 5}}, False),  # normalised to {"x": {"$ne": 5}}, as CouchDB does
    ({"x": {"$not": {"$eq": 0}}}, False),
    ({"x": {"$not": {"$exists": True, "$eq": 0}}}, True),  # De Morgan: missing OR != 0
    ({"x": {"$nin": [1]}}, False),
    ({"x": {"$lt": None}}, False),
    ({"x": {"$regex": "a"}}, False),
    ({"x": {"$not": {"$regex": "a"}}}, False),
    ({"$nor": [{"x": 1}]}, False),
    ({"$or": [{"x": 1}, {"y": {"$exists": False}}]}, True),
])
def test_missing_field(selector, expected):
    assert matches(selector, {"_id": "d", "z": 1}) is expected


def test_bad_path_matches_nothing_not_even_exists_false():
    doc = {"_id": "d", "a": 5, "l": [1, 2]}
    assert matches({"a.b": {"$exists": False}}, doc) is False
    assert matches({"l.x": {"$exists": False}}, doc) is False
    assert matches({"l.5": {"$exists": False}}, doc) is False
    assert matches({"a.b": {"$exists": True}}, doc) is False
    assert matches({"c.b": {"$exists": False}}, doc) is True  # plain missing


@pytest.mark.parametrize("selector, expected", [
    ({"imdb.rating": 8}, True),
    ({"imdb": {"rating": 8}}, True),
    ({"imdb": {"rating": {"$gt": 7}, "votes": {"$lt": 100}}}, False),
    ({"imdb": {"$and": [{"rating": 8}, {"votes": 1000}]}}, True),
    ({"imdb": {"rating": 8, "votes": 1000}}, True),
    ({"a\\.b": 1}, True),  # an escaped dot is part of the name
    ({"a.b": 1}, False),
    ({"nested.a\\.b.c": 2}, True),
    ({"genre.0": "Horror"}, True),  # a numeric segment indexes an array
    ({"genre.1": "Horror"}, False),
    ({"cast.1.name": "Bo"}, True),
    ({"genre": "Horror"}, False),  # equality is on the whole value, not "contains"
    ({"genre": ["Horror", "Comedy"]}, True),
    ({"imdb": {}}, False),  # an empty object is a value: imdb == {}
    ({"empty": {}}, True),
])
def test_paths(selector, expected):
    doc = {
        "_id": "m1", "imdb": {"rating": 8, "votes": 1000}, "a.b": 1,
        "nested": {"a.b": {"c": 2}}, "genre": ["Horror", "Comedy"],
        "cast": [{"name": "Al"}, {"name": "Bo"}], "empty": {},
    }
    assert matches(selector, doc) is expected


# --- the CouchDB documentation's examples over a small movie collection --------------------

MOVIES = [
    {"_id": "m1", "title": "Alien", "year": 1979, "director": "Ridley Scott",
     "genre": ["Horror", "Science Fiction"], "imdb": {"rating": 8.5}, "cameras": {"cam1": 1}},
    {"_id": "m2", "title": "Antichrist", "year": 2009, "director": "Lars von Trier",
     "genre": ["Horror", "Drama"], "imdb": {"rating": 6.5}},
    {"_id": "m3", "title": "Melancholia", "year": 2011, "director": "Lars von Trier",
     "genre": ["Drama", "Science Fiction"], "imdb": {"rating": 7.1}, "cameras": {"Cam": 2}},
    {"_id": "m4", "title": "Arrival", "year": 2016, "director": "Denis Villeneuve",
     "genre": ["Science Fiction"], "imdb": {"rating": 7.9}},
    {"_id": "m5", "title": "Brazil", "year": 1985, "director": "Terry Gilliam",
     "genre": ["Comedy", "Science Fiction"]},
]


@pytest.mark.parametrize("selector, ids", [
    ({"director": "Lars von Trier"}, ["m2", "m3"]),
    ({"director": {"$eq": "Lars von Trier"}}, ["m2", "m3"]),
    ({"year": {"$gt": 2010}}, ["m3", "m4"]),
    ({"imdb.rating": {"$gte": 7}}, ["m1", "m3", "m4"]),
    ({"director": "Lars von Trier", "year": 2011}, ["m3"]),
    ({"$and": [{"year": {"$gte": 1980}}, {"year": {"$lt": 2010}}]}, ["m2", "m5"]),
    ({"year": 2016, "$or": [{"director": "George Lucas"}, {"director": "Denis Villeneuve"}]},
     ["m4"]),
    ({"year": {"$gte": 1900, "$lte": 2010},
      "$nor": [{"year": 1979}, {"year": 1985}]}, ["m2"]),
    ({"year": {"$gte": 1900}, "$not": {"year": 2009}}, ["m1", "m3", "m4", "m5"]),
    ({"genre": {"$elemMatch": {"$eq": "Horror"}}}, ["m1", "m2"]),
    ({"genre": {"$allMatch": {"$eq": "Science Fiction"}}}, ["m4"]),
    ({"cameras": {"$keyMapMatch": {"$eq": "cam1"}}}, ["m1"]),
    ({"title": {"$regex": "^A"}}, ["m1", "m2", "m4"]),
    ({"title": {"$regex": "(?i)^a"}}, ["m1", "m2", "m4"]),
    ({"title": {"$beginsWith": "Al"}}, ["m1"]),
    ({"year": {"$mod": [5, 0]}}, ["m5"]),
    ({"genre": {"$size": 1}}, ["m4"]),
    ({"imdb": {"$exists": False}}, ["m5"]),
    ({"year": {"$in": [1979, 2016, 1900]}}, ["m1", "m4"]),
    ({"director": {"$nin": ["Lars von Trier", "Ridley Scott"]}}, ["m4", "m5"]),
    ({"genre": {"$all": ["Science Fiction", "Comedy"]}}, ["m5"]),
    ({"genre": {"$in": ["Drama"]}}, ["m2", "m3"]),
    ({"title": {"$type": "string"}, "imdb.rating": {"$type": "number"}},
     ["m1", "m2", "m3", "m4"]),
    ({"_id": {"$gt": None}}, ["m1", "m2", "m3", "m4", "m5"]),
    ({}, ["m1", "m2", "m3", "m4", "m5"]),
])
def test_documented_examples(selector, ids):
    answer = find({"selector": selector}, MOVIES)
    assert [d["_id"] for d in answer["docs"]] == ids


# --- collation across types ---------------------------------------------------------------

# CouchDB's documented collation order ("Views Collation"), strings simplified to code points.
COLLATION_ORDER = [
    None, False, True, -3, 1, 1.5, 2, "", "A", "B", "a", "aa", "b", "é",
    [], [None], [1], [1, 2], [1, 3], [2], ["a"], [[]], {}, {"a": 1}, {"a": 2}, {"b": 1},
    {"b": 1, "c": 0},
]


def test_collation_orders_every_pair():
    for i, low in enumerate(COLLATION_ORDER):
        for high in COLLATION_ORDER[i + 1:]:
            doc = {"_id": "d", "x": high}
            assert matches({"x": {"$gt": low}}, doc), (high, low)
            assert not matches({"x": {"$lte": low}}, doc), (high, low)
            assert matches({"x": {"$ne": low}}, doc), (high, low)
            assert not matches({"x": {"$lt": low}}, doc), (high, low)


def test_numbers_compare_by_value_and_booleans_are_not_numbers():
    assert matches({"x": 1}, {"x": 1.0})
    assert matches({"x": [1, {"a": 2}]}, {"x": [1.0, {"a": 2.0}]})
    assert not matches({"x": 1}, {"x": True})
    assert not matches({"x": {"$in": [1]}}, {"x": True})
    assert matches({"x": {"$gt": 100}}, {"x": False}) is False
    assert matches({"x": {"$gt": 100}}, {"x": "a string"})  # strings collate after numbers


# --- invalid selectors ----------------------------------------------------------------------

@pytest.mark.parametrize("selector, message", [
    ([], "Selector must be a JSON object"),
    ("x", "Selector must be a JSON object"),
    ({"x": {"$foo": 1}}, "Invalid operator: $foo"),
    ({"$foo": 1}, "Invalid operator: $foo"),
    ({"x": {"$where": "1"}}, "Unsupported operator: $where"),
    ({"$and": {"x": 1}}, "Bad argument for operator $and"),
    ({"$or": 1}, "Bad argument for operator $or"),
    ({"$nor": "x"}, "Bad argument for operator $nor"),
    ({"$not": [1]}, "Bad argument for operator $not"),
    ({"x": {"$in": 1}}, "Bad argument for operator $in"),
    ({"x": {"$nin": {}}}, "Bad argument for operator $nin"),
    ({"x": {"$all": "a"}}, "Bad argument for operator $all"),
    ({"x": {"$exists": 1}}, "Bad argument for operator $exists"),
    ({"x": {"$type": 1}}, "Bad argument for operator $type"),
    ({"x": {"$size": -1}}, "Bad argument for operator $size"),
    ({"x": {"$size": 1.5}}, "Bad argument for operator $size"),
    ({"x": {"$mod": [2]}}, "Bad argument for operator $mod"),
    ({"x": {"$mod": [0, 1]}}, "Bad argument for operator $mod"),
    ({"x": {"$mod": [2.0, 1]}}, "Bad argument for operator $mod"),
    ({"x": {"$regex": 1}}, "Bad argument for operator $regex"),
    ({"x": {"$regex": "("}}, "Bad argument for operator $regex"),
    ({"x": {"$beginsWith": 1}}, "Bad argument for operator $beginsWith"),
    ({"x": {"$elemMatch": 1}}, "Bad argument for operator $elemMatch"),
    ({"x": {"$allMatch": []}}, "Bad argument for operator $allMatch"),
    ({"x": {"$keyMapMatch": "k"}}, "Bad argument for operator $keyMapMatch"),
    ({"$gt": 5}, "One or more conditions is missing a field name."),
    ({"$and": [{"$eq": 1}]}, "One or more conditions is missing a field name."),
    ({"a..b": 1}, "Invalid field name: a..b"),
    ({"": 1}, "Invalid field name"),
    ({"x": {"$eq": float("nan")}}, "not a JSON number"),
    ({"x": {"$eq": {1, 2}}}, "is not a JSON value"),
])
def test_invalid_selector(selector, message):
    with pytest.raises(MangoError) as caught:
        compile_selector(selector)
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert caught.value.error  # CouchDB's error name, for the HTTP answer


@pytest.mark.parametrize("selector, where", [
    ({"a": {"b": {"$in": 1}}}, 'at field "a.b"'),
    ({"a": {"$foo": 1}}, 'Invalid operator: $foo at field "a"'),
    ({"a\\.b": {"$regex": "(a)\\1"}}, 'at field "a\\\\.b"'),
])
def test_errors_say_where(selector, where):
    with pytest.raises(MangoError) as caught:
        compile_selector(selector)
    assert where in str(caught.value)


def test_selector_depth_and_size_are_bounded():
    deep: dict = {"x": 1}
    for _ in range(mango.MAX_DEPTH):
        deep = {"$and": [deep]}
    with pytest.raises(MangoError, match="nested deeper"):
        compile_selector(deep)
    # Far deeper than Python's recursion limit: refused before any recursion.
    very_deep: object = 1
    for _ in range(100_000):
        very_deep = [very_deep]
    with pytest.raises(MangoError, match="nested deeper"):
        compile_selector({"x": {"$eq": very_deep}})
    with pytest.raises(MangoError, match="more than"):
        compile_selector({"x": {"$in": list(range(mango.MAX_NODES + 1))}})
    compile_selector({"x": {"$in": list(range(10_000))}})  # a long list is fine


@pytest.mark.parametrize("pattern, why", [
    ("(a)\\1", "groupref"),
    ("(?P<n>a)(?P=n)", "groupref"),
    ("a(?=b)", "assert"),
    ("(?<!a)b", "assert not"),
    ("(?>a+)b", "atomic group"),
    ("a++b", "possessive repeat"),
    ("(a)?(?(1)b|c)", "groupref exists"),
    ("(x{40}){40}", "steps once repetitions are counted"),
    ("a" * (mango.MAX_REGEX_LENGTH + 1), "characters"),
    ("(", "missing ), unterminated subpattern"),
])
def test_regex_beyond_a_finite_automaton_is_refused(pattern, why):
    with pytest.raises(MangoError, match=r"Bad argument for operator \$regex") as caught:
        compile_selector({"x": {"$regex": pattern}})
    assert why in str(caught.value)


@pytest.mark.parametrize("pattern", [
    "^[0-9a-f]+$", "(ab)+", "(a+)+", "(a|aa)*b", "[(a+)]+", "\\(a+\\)+", "(?:a|b){1}",
    "^A.*z$", "(?i)hello", "colou?r", "\\d{3}-\\d{4}", "x{500}",
])
def test_everyday_regex_is_accepted(pattern):
    compile_selector({"x": {"$regex": pattern}})


def test_regex_flags_and_anchors():
    answer = find({"selector": {"title": {"$regex": "(?i)^a.*[ln]$"}}}, MOVIES)
    assert [d["_id"] for d in answer["docs"]] == ["m1", "m4"]
    assert matches({"x": {"$regex": "^b"}}, {"x": "a\nb"}) is False
    assert matches({"x": {"$regex": "(?m)^b"}}, {"x": "a\nb"}) is True
    assert matches({"x": {"$regex": "a$"}}, {"x": "a\n"}) is True  # before a final newline
    assert matches({"x": {"$regex": "a\\Z"}}, {"x": "a\n"}) is False
    assert matches({"x": {"$regex": "\\bfoo\\b"}}, {"x": "a foo."}) is True
    assert matches({"x": {"$regex": "\\bfoo\\b"}}, {"x": "afoo"}) is False
    assert matches({"x": {"$regex": "a"}}, {"x": "A"}) is False
    assert matches({"x": {"$regex": ""}}, {"x": ""}) is True


# Patterns that make Python's backtracking `re` take seconds to hours on these strings.
CATASTROPHIC = [
    ("[a-z]+\\d", "a" * 200_000, False),
    ("[a-z]+\\d", "a" * 200_000 + "1", True),
    ("\\w*\\d\\w*\\d!", "a1" * 50_000, False),
    ("(a+)+$", "a" * 100_000 + "!", False),
    ("(a|aa)*b", "a" * 100_000, False),
    ("^(\\w+\\s?)*$", "word " * 20_000 + "!", False),
    (".*.*.*=", "x" * 100_000 + "=", True),
]


def test_regex_is_linear_in_the_string_whatever_the_pattern():
    # In a child process with a generous deadline (minutes, where the automaton needs about a
    # second): a backtracking matcher would hold the node's event loop for hours.
    script = (
        "import json, sys\n"
        "from plugshare.node.couch.mango import compile_selector\n"
        "for pattern, text, expected in json.loads(sys.stdin.read()):\n"
        "    got = compile_selector({'x': {'$regex': pattern}})({'x': text})\n"
        "    assert got is expected, (pattern, got)\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps(CATASTROPHIC), text=True,
        capture_output=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_a_regex_whose_automaton_keeps_growing_is_refused_at_a_bounded_cost():
    # Each character of a random a/b string is a new DFA state for this pattern, each costing
    # ~50 µs to build: minutes over a large document. The bound counts states, not time, so
    # the outcome is the same on any machine.
    predicate = compile_selector({"x": {"$regex": "(a|b)*a(a|b){60}c"}})
    text = "".join(random.Random(7).choices("ab", k=2 * mango.MAX_DFA_STATES))
    with pytest.raises(MangoError, match="too costly to match"):
        predicate({"x": text})
    # An automaton that stays small is fine on the same string.
    assert compile_selector({"x": {"$regex": "(a|b)*a(a|b){8}c"}})({"x": text}) is False


regex_pieces = st.sampled_from([
    "a", "b", "ab", ".", "\\d", "\\w", "\\s", "\\W", "\\D", "[ab]", "[^a]", "[a-c1]",
    "[\\d_]", "[^\\w]", "\\n", " ", "^", "$", "\\b", "\\B", "\\A", "\\Z", "*", "+", "?",
    "*?", "{2}", "{1,3}", "{2,}", "|", "(", ")", "(?:", "(?i:", "(?m:", "(?s:",
    "A", "é", "É", "_", "1", "k", "\u212a", "ſ",
])
# (A scoped `(?a:...)` is left out: Python's `re` applies it to `\w` but not to `\W`.)
regex_flags = st.sampled_from(["", "(?i)", "(?m)", "(?s)", "(?a)", "(?im)", "(?ia)"])
regex_subjects = st.text(alphabet="abAB1_ \néÉ-kK\u212aſ", max_size=12)


@settings(max_examples=1500, deadline=None)
@given(regex_flags, st.lists(regex_pieces, min_size=1, max_size=8).map("".join),
       st.lists(regex_subjects, min_size=1, max_size=6))
def test_regex_agrees_with_python_re(flags, body, subjects):
    pattern = flags + body
    try:
        expected = re.compile(pattern)
    except (re.error, ValueError, OverflowError):
        return
    try:
        predicate = compile_selector({"x": {"$regex": pattern}})
    except MangoError as refused:
        assert "possessive repeat is not supported" in str(refused)  # `a*+`, `a++`
        return
    for subject in subjects:
        assert predicate({"x": subject}) is (expected.search(subject) is not None), subject


# --- deleted and design documents --------------------------------------------------------

def test_deleted_documents_never_match():
    deleted = {"_id": "d", "_deleted": True, "x": 1}
    assert not matches({}, deleted)
    assert not matches({"_deleted": True}, deleted)
    assert not matches({"x": 1}, deleted)
    assert matches({"x": 1}, {"_id": "d", "_deleted": False, "x": 1})
    assert find({"selector": {}}, [deleted])["docs"] == []


def test_design_documents_are_not_found():
    docs = [{"_id": "_design/x", "x": 1}, {"_id": "a", "x": 1}]
    assert [d["_id"] for d in find({"selector": {"x": 1}}, docs)["docs"]] == ["a"]


# --- queries ---------------------------------------------------------------------------------

@pytest.mark.parametrize("body, message", [
    ([], "Request body must be a JSON object"),
    ({}, "Missing required key: selector"),
    ({"selector": []}, "Selector must be a JSON object"),
    ({"selector": {}, "bogus": 1}, "Invalid key bogus for this request."),
    ({"selector": {}, "limit": -1}, "limit must be a non-negative integer"),
    ({"selector": {}, "limit": "5"}, "limit must be a non-negative integer"),
    ({"selector": {}, "limit": 2.0}, "limit must be a non-negative integer"),
    ({"selector": {}, "limit": True}, "limit must be a non-negative integer"),
    ({"selector": {}, "skip": -3}, "skip must be a non-negative integer"),
    ({"selector": {}, "sort": "year"}, "Sort must be an array of sort specs"),
    ({"selector": {}, "sort": [{"year": "up"}]}, "Invalid sort direction"),
    ({"selector": {}, "sort": [{"a": "asc", "b": "asc"}]}, "Invalid sort field"),
    ({"selector": {}, "sort": [1]}, "Invalid sort field"),
    ({"selector": {}, "sort": [""]}, "Invalid sort field"),
    ({"selector": {}, "sort": ["a..b"]}, "Invalid field name"),
    ({"selector": {}, "sort": [{"a": "asc"}, {"b": "desc"}]},
     "Sorts currently only support a single direction for all fields."),
    ({"selector": {}, "fields": "title"}, "Fields must be an array of strings"),
    ({"selector": {}, "fields": [1]}, "Invalid JSON for field spec"),
    ({"selector": {}, "fields": ["a..b"]}, "Invalid field name"),
    ({"selector": {}, "bookmark": 5}, "Invalid bookmark value"),
    ({"selector": {}, "bookmark": "!!!not base64!!!"}, "Invalid bookmark value"),
    ({"selector": {}, "bookmark": base64.urlsafe_b64encode(b"[1, 2]").decode()},
     "Invalid bookmark value"),
    ({"selector": {}, "bookmark": "x" * (mango.MAX_BOOKMARK + 1)}, "Invalid bookmark value"),
    ({"selector": {}, "r": 0}, "Invalid value for r"),
    ({"selector": {}, "conflicts": "yes"}, "Invalid value for conflicts"),
    ({"selector": {}, "use_index": 3}, "Invalid value for use_index"),
])
def test_invalid_query(body, message):
    with pytest.raises(MangoError) as caught:
        parse_query(body)
    assert message in str(caught.value)


def test_compatibility_keys_are_accepted_and_ignored():
    query = parse_query({
        "selector": {"year": {"$gt": 2000}}, "use_index": ["_design/idx", "by-year"], "r": 1,
        "conflicts": False, "execution_stats": True, "stable": True, "update": False,
        "stale": "ok", "bookmark": None,
    })
    assert [d["_id"] for d in run(query, MOVIES)["docs"]] == ["m2", "m3", "m4"]
    assert query.execution_stats is True and query.conflicts is False  # for the caller


def test_answer_shape_default_limit_and_id_order():
    docs = [{"_id": f"doc{i:03}", "n": i} for i in reversed(range(60))]
    answer = find({"selector": {"n": {"$gte": 0}}}, docs)
    assert set(answer) == {"docs", "bookmark", "warning"}
    assert answer["warning"] == "No matching index found, create an index to optimize query time."
    assert [d["n"] for d in answer["docs"]] == list(range(mango.DEFAULT_LIMIT))
    assert find({"selector": {"n": 1000}}, docs)["bookmark"] == "nil"
    assert find({"selector": {}, "limit": 0}, docs)["docs"] == []


def test_sort_limit_skip_and_ties_broken_by_id():
    docs = [
        {"_id": "e", "year": 2011}, {"_id": "b", "year": 1979}, {"_id": "d", "year": 2011},
        {"_id": "a", "year": 2016}, {"_id": "c"}, {"_id": "f", "year": "later"},
    ]
    ids = lambda body: [d["_id"] for d in find(body, docs)["docs"]]  # noqa: E731
    # A document without the sort field is left out, as from a JSON index on it.
    assert ids({"selector": {}, "sort": ["year"]}) == ["b", "d", "e", "a", "f"]
    assert ids({"selector": {}, "sort": [{"year": "asc"}]}) == ["b", "d", "e", "a", "f"]
    assert ids({"selector": {}, "sort": [{"year": "desc"}]}) == ["f", "a", "e", "d", "b"]
    assert ids({"selector": {}, "sort": ["year"], "limit": 2, "skip": 1}) == ["d", "e"]
    assert ids({"selector": {}, "sort": [{"_id": "desc"}], "limit": 3}) == ["f", "e", "d"]
    assert ids({"selector": {"year": {"$type": "number"}}, "sort": ["year", "_id"]}) == [
        "b", "d", "e", "a"]


def test_fields_project_nested_paths():
    answer = find({"selector": {"_id": "m1"}, "fields": ["_id", "imdb.rating", "genre.1",
                                                          "nope", "title.x"]}, MOVIES)
    assert answer["docs"] == [
        {"_id": "m1", "imdb": {"rating": 8.5}, "genre": {"1": "Science Fiction"}}
    ]


def test_bookmark_continues_and_refuses_another_sort():
    docs = [{"_id": f"d{i}", "n": i % 4} for i in range(10)]
    body = {"selector": {}, "sort": ["n"], "limit": 3}
    first = find(body, docs)
    second = find({**body, "bookmark": first["bookmark"]}, docs)
    assert [d["_id"] for d in first["docs"]] == ["d0", "d4", "d8"]
    assert [d["_id"] for d in second["docs"]] == ["d1", "d5", "d9"]
    with pytest.raises(MangoError, match="another sort"):
        parse_query({"selector": {}, "sort": [{"n": "desc"}], "bookmark": first["bookmark"]})
    with pytest.raises(MangoError, match="another sort"):
        parse_query({"selector": {}, "bookmark": first["bookmark"]})
    # A page past the end is empty and keeps the bookmark it was given.
    bookmark = first["bookmark"]
    for _ in range(5):
        answer = find({**body, "bookmark": bookmark}, docs)
        bookmark = answer["bookmark"]
    assert answer["docs"] == [] and bookmark != "nil"


# --- properties -------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 5), st.sampled_from([0.5, -1.5, 2.0]),
    st.sampled_from(["", "a", "B", "ab", "é"]),
)
values = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                     st.dictionaries(st.sampled_from(["a", "b"]), inner,
                                                     max_size=2)),
    max_leaves=6,
)
conditions = st.one_of(
    scalars, st.lists(values, max_size=3),  # a bare object would be a path, not a value
    st.builds(lambda op, v: {op: v},
              st.sampled_from(["$eq", "$ne", "$gt", "$gte", "$lt", "$lte"]), values),
    st.builds(lambda op, v: {op: v}, st.sampled_from(["$in", "$nin", "$all"]),
              st.lists(values, max_size=3)),
    st.builds(lambda v: {"$type": v},
              st.sampled_from(["null", "boolean", "number", "string", "array", "object"])),
    st.builds(lambda v: {"$size": v}, st.integers(0, 3)),
    st.builds(lambda v: {"$mod": [v, 1]}, st.integers(1, 3)),
    st.builds(lambda v: {"$regex": v}, st.sampled_from(["^a", "b$", "é"])),
    st.builds(lambda v: {"$beginsWith": v}, st.sampled_from(["a", ""])),
    st.builds(lambda v: {"$elemMatch": {"$gt": v}}, scalars),
    st.builds(lambda v: {"$allMatch": {"$lte": v}}, scalars),
)
selectors = st.recursive(
    st.builds(lambda f, c: {f: c}, st.sampled_from(["a", "b"]), conditions),
    lambda inner: st.one_of(
        st.builds(lambda op, items: {op: items}, st.sampled_from(["$and", "$or", "$nor"]),
                  st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda s: {"$not": s}, inner),
    ),
    max_leaves=5,
)
# Every document has both fields: CouchDB's $not does not match a document missing the field
# it negates (it becomes $ne, $nin, ... which need the field), so the complement holds there.
documents = st.builds(lambda a, b, i: {"_id": f"d{i}", "a": a, "b": b}, values, values,
                      st.integers(0, 1000))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(selectors, st.lists(documents, max_size=8))
def test_not_is_the_complement_on_live_documents(selector, docs):
    positive = compile_selector(selector)
    negative = compile_selector({"$not": selector})
    for doc in docs:
        assert negative(doc) is (not positive(doc))
    deleted = [{**doc, "_deleted": True} for doc in docs]
    assert not any(positive(d) or negative(d) for d in deleted)


sortable = st.builds(
    lambda i, n, tag: {"_id": f"k{i:04}", "n": n, "tag": tag},
    st.integers(0, 9999), st.one_of(st.integers(0, 4), st.sampled_from(["x", "y"]), st.none()),
    st.sampled_from(["p", "q"]),
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(sortable, max_size=40, unique_by=lambda d: d["_id"]),
    st.integers(1, 7),
    st.sampled_from([[], ["n"], [{"n": "desc"}], ["tag", "n"], [{"_id": "desc"}]]),
    st.sampled_from([{}, {"tag": "p"}, {"n": {"$gte": 1}}]),
)
def test_bookmarks_page_without_duplicate_or_gap(docs, limit, sort, selector):
    everything = find({"selector": selector, "sort": sort, "limit": 10_000}, docs)["docs"]
    seen: list[str] = []
    bookmark = None
    for _ in range(len(docs) + 2):
        body = {"selector": selector, "sort": sort, "limit": limit}
        if bookmark is not None:
            body["bookmark"] = bookmark
        page = find(body, docs)
        if not page["docs"]:
            break
        seen.extend(d["_id"] for d in page["docs"])
        bookmark = page["bookmark"]
    assert seen == [d["_id"] for d in everything]
    assert len(seen) == len(set(seen))


# --- hostile documents ------------------------------------------------------------------------

def _nested(depth: int, leaf) -> list:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def test_deeply_nested_document_values_compare_and_sort():
    # An app may store a value nested deeper than Python's recursion limit; comparing it
    # with a selector's literal, or sorting by it, must still answer (no RecursionError).
    deep_one, deep_two = _nested(5000, 1), _nested(5000, 2)
    assert matches({"x": {"$eq": [[1]]}}, {"x": deep_one}) is False
    assert matches({"x": {"$gt": [[1]]}}, {"x": deep_one}) is True  # [[[...]]] > [[1]]
    assert matches({"x": {"$in": [[[1]]]}}, {"x": deep_one}) is False
    assert matches({"x": {"$all": [[[1]]]}}, {"x": deep_one}) is False
    docs = [{"_id": "b", "x": deep_one}, {"_id": "a", "x": deep_two}, {"_id": "c", "x": 5}]
    answer = find({"selector": {}, "sort": ["x"], "fields": ["_id"]}, docs)
    assert [d["_id"] for d in answer["docs"]] == ["c", "b", "a"]
    # Paging past a deep value: its bookmark is refused as too deep, with a clear error.
    answer = find({"selector": {}, "sort": ["x"], "limit": 2, "fields": ["_id"]}, docs)
    with pytest.raises(MangoError, match="Invalid bookmark value"):
        parse_query({"selector": {}, "sort": ["x"], "bookmark": answer["bookmark"]})
