"""Mango (CouchDB's `_find` query language): selectors, queries, paging, bounds.

Pure functions, so no node is needed: the tables follow CouchDB's documentation ("Selector
Syntax", "/db/_find") and the cases of apache/couchdb's own mango_selector tests."""

from __future__ import annotations

import base64
import json
import random
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


@pytest.mark.parametrize("segment", ["²", "٣", "1" * 5000, "-1", "1.5", " 1"])
def test_odd_numeric_segments_on_an_array_are_bad_paths(segment):
    doc = {"_id": "d", "a": [10, 20]}
    assert matches({f"a.{segment}": {"$exists": True}}, doc) is False
    assert find({"selector": {}, "fields": [f"a.{segment}"]}, [doc])["docs"] == [{}]


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

# CouchDB's documented collation order ("Views Collation"): types, then strings as ICU orders
# them (symbols in CouchDB's documented ASCII order, digits, then letters without regard to
# case or accent first, then accents, then lowercase before uppercase).
COLLATION_ORDER = [
    None, False, True, -3, 1, 1.5, 2,
    "", " ", "`", "_", "-", "!", "\"", "[", "{", "@", "&", "+", "~", "$", "0", "9",
    "a", "A", "aa", "ab", "Ab", "abc", "Abc", "ABC", "abc1", "AbcZZZZZ", "b", "B", "ba", "bb",
    "e", "é", "É", "f", "z", "Z", "ω",
    [], [None], [1], [1, 2], [1, 3], [2], ["a"], ["b"], ["b", "c"], ["b", "c", "a"],
    ["b", "d"], [[]], {}, {"a": 1}, {"a": 2}, {"b": 1}, {"b": 2}, {"b": 2, "a": 1},
    {"b": 2, "c": 2},
]


def test_collation_orders_every_pair():
    for i, low in enumerate(COLLATION_ORDER):
        for high in COLLATION_ORDER[i + 1:]:
            doc = {"_id": "d", "x": high}
            assert matches({"x": {"$gt": low}}, doc), (high, low)
            assert not matches({"x": {"$lte": low}}, doc), (high, low)
            assert matches({"x": {"$ne": low}}, doc), (high, low)
            assert not matches({"x": {"$lt": low}}, doc), (high, low)


def test_collation_sorts_strings_like_couchdb_and_ids_raw():
    words = ["b", "B", "aa", "A", "a", "é", "e", "ABC", "abc1", "Abc", "abc", "~", "1"]
    docs = [{"_id": w, "w": w} for w in words]
    by_word = find({"selector": {}, "sort": ["w"], "fields": ["w"], "limit": 99}, docs)
    assert [d["w"] for d in by_word["docs"]] == [
        "~", "1", "a", "A", "aa", "abc", "Abc", "ABC", "abc1", "b", "B", "e", "é"]
    # _id is compared and sorted raw, by code point, as CouchDB's _all_docs does.
    by_id = find({"selector": {"_id": {"$gt": "B"}}, "fields": ["_id"], "limit": 99}, docs)
    assert [d["_id"] for d in by_id["docs"]] == ["a", "aa", "abc", "abc1", "b", "e", "~", "é"]
    assert [d["_id"] for d in find({"selector": {}, "sort": ["_id"], "limit": 3}, docs)[
        "docs"]] == ["1", "A", "ABC"]


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
    # Every condition costs every document a test: their number is bounded too.
    branches = [{f"f{i}": {"$gt": i}} for i in range(mango.MAX_CONDITIONS)]
    compile_selector({"$or": branches})
    with pytest.raises(MangoError, match="conditions, more than"):
        compile_selector({"$or": branches + [{"_id": {"$elemMatch": {"$eq": 1}}}]})
    # ...but equalities on one field in a $or are one set lookup, as a $in list is.
    ids = compile_selector({"$or": [{"_id": str(i)} for i in range(10_000)] + [{"n": 1}]})
    assert ids({"_id": "9999"}) and ids({"_id": "x", "n": 1}) and not ids({"_id": "x"})


@pytest.mark.parametrize("selector, doc, expected", [
    ({"$or": [{"x": 1}, {"x": [1, 2]}]}, {"x": [1, 2]}, True),  # whole value, like $eq
    ({"$or": [{"x": 1}, {"x": [1, 2]}]}, {"x": [2, 1]}, False),
    ({"$or": [{"x": 1}, {"x": 2.0}]}, {"x": 2}, True),
    ({"$or": [{"x": 1}, {"x": 2}]}, {"x": True}, False),
    ({"$or": [{"x": 1}, {"x": 2}]}, {"y": 1}, False),
    ({"$nor": [{"x": 1}, {"x": 2}]}, {"x": 3}, True),
    ({"$nor": [{"x": 1}, {"x": 2}]}, {"x": 2}, False),
    ({"$nor": [{"x": 1}, {"x": 2}]}, {"y": 3}, False),  # like $ne: the field must be there
    ({"$not": {"$or": [{"x": 1}, {"x": 2}]}}, {"x": 3}, True),
])
def test_or_of_equalities_keeps_its_meaning(selector, doc, expected):
    assert matches(selector, doc) is expected


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


def test_regex_in_find():
    answer = find({"selector": {"title": {"$regex": "(?i)^a.*[ln]$"}}}, MOVIES)
    assert [d["_id"] for d in answer["docs"]] == ["m1", "m4"]
    assert matches({"x": {"$regex": "(?m)^b"}}, {"x": "a\nb"}) is True
    assert matches({"x": {"$regex": "^b"}}, {"x": "a\nb"}) is False


def test_a_regex_too_costly_mid_scan_is_a_mango_error():
    # The matcher's own bound (tests/node/test_linear_regex.py), surfaced as a MangoError
    # from the compiled predicate, on the document that makes it grow.
    predicate = compile_selector({"x": {"$regex": "(a|b)*a(a|b){60}c"}})
    text = "".join(random.Random(7).choices("ab", k=2 * mango.MAX_DFA_STATES))
    with pytest.raises(MangoError, match="too costly to match"):
        predicate({"x": text})


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


def test_membership_operators_are_linear_in_the_array_and_the_list():
    # $all and $in compare every document item with every listed value: 20,000 values against
    # 200,000 items would be 4·10⁹ comparisons (hours). In a child process with a generous
    # deadline; hashing makes it about a second.
    script = (
        "from plugshare.node.couch.mango import compile_selector\n"
        "values = list(range(20_000))\n"
        "doc = {'_id': 'd', 'x': list(range(1, 200_001))}\n"
        "assert compile_selector({'x': {'$all': values}})(doc) is False\n"
        "assert compile_selector({'x': {'$all': values[1:]}})(doc) is True\n"
        "boxed = {'_id': 'd', 'x': [[-i] for i in range(200_000)]}\n"
        "assert compile_selector({'x': {'$in': [[i] for i in range(1, 20_001)]}})(boxed) is False\n"
        "assert compile_selector({'x': {'$in': [[-5.0], {'a': 1}]}})(boxed) is True\n"
        "assert compile_selector({'x': {'$nin': [[i] for i in range(1, 20_001)]}})(boxed) is True\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], text=True, capture_output=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


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


# --- anything from outside: a MangoError or an answer, never another exception ----------------

OPERATOR_NAMES = [
    "$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$exists", "$type", "$in", "$nin", "$size",
    "$mod", "$regex", "$all", "$elemMatch", "$allMatch", "$keyMapMatch", "$and", "$or",
    "$nor", "$not", "$beginsWith", "$where", "$text", "$foo", "$",
]
json_keys = st.one_of(
    st.sampled_from(OPERATOR_NAMES),
    st.sampled_from(["a", "b", "a.b", "0", "a.0", "a\\.b", "", ".", "a..b", "²", "_id"]),
    st.text(max_size=4),
)
any_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False,
              allow_infinity=False), st.text(max_size=4),
              st.sampled_from(["(a", "a*", "^a$", "[", "\\", "number", "string"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(json_keys, inner, max_size=3)),
    max_leaves=12,
)
any_doc = st.dictionaries(st.sampled_from(["a", "b", "_id", "_deleted", "a.b"]), any_json,
                          max_size=4)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(json_keys, any_json, max_size=3), st.lists(any_doc, max_size=4))
def test_any_selector_is_an_answer_or_a_mango_error(selector, docs):
    try:
        predicate = compile_selector(selector)
    except MangoError:
        return
    for doc in docs:
        assert predicate(doc) in (True, False)


query_keys = st.sampled_from(["selector", "fields", "sort", "limit", "skip", "bookmark", "r",
                              "use_index", "conflicts", "stale", "bogus"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(query_keys, any_json, max_size=5), st.lists(any_doc, max_size=4))
def test_any_query_is_an_answer_or_a_mango_error(body, docs):
    try:
        query = parse_query({"selector": {}, **body})
    except MangoError:
        return
    answer = run(query, docs)
    assert set(answer) == {"docs", "bookmark", "warning"}
    json.dumps(answer)


# --- CouchDB's own integration cases (test/elixir/test/mango/03_operator_test.exs and
# src/mango/test/{17-multi-type-value,21-empty-selector}-tests.py), on the fields of their
# user documents those cases read ------------------------------------------------------------

USERS = [
    {"user_id": 0, "manager": False, "favorites": ["Ruby", "C", "Python"], "age": 48, "twitter": "@stephaniekirkland", "location": {"state": "Nevada"}},  # noqa: E501
    {"user_id": 1, "manager": False, "favorites": ["Ruby", "Python", "C", {"Versions": {"Alpha": "Beta"}}], "age": 31, "twitter": "@abbottwatson", "location": {"state": "Connecticut"}},  # noqa: E501
    {"user_id": 2, "manager": True, "favorites": ["Lisp", "Python", "Erlang"], "age": 42, "location": {"state": "New Mexico"}},  # noqa: E501
    {"user_id": 3, "manager": True, "favorites": [["Lisp", "Erlang", "Python"], "Erlang", "C", "Erlang"], "age": 79, "location": {"state": "Utah"}},  # noqa: E501
    {"user_id": 4, "manager": False, "favorites": ["Lisp", "C", "Ruby", "Ruby"], "age": 61, "twitter": "@nonahorton", "location": {"state": "Georgia"}},  # noqa: E501
    {"user_id": 5, "manager": True, "favorites": ["Lisp", "Lisp"], "age": 73, "location": {"state": "Michigan"}},  # noqa: E501
    {"user_id": 6, "manager": True, "favorites": ["C", "Lisp", "Ruby", "C"], "age": 47, "location": {"state": "Illinois"}},  # noqa: E501
    {"user_id": 7, "manager": True, "favorites": ["C", "C", "Ruby", "Ruby", "Erlang"], "age": 33, "ordered": None, "location": {"state": "Iowa"}},  # noqa: E501
    {"user_id": 8, "manager": True, "favorites": None, "age": 68, "ordered": False, "location": {"state": "Maine"}},  # noqa: E501
    {"user_id": 9, "manager": True, "favorites": ["Lisp", "Erlang", "Python"], "age": 22, "twitter": None, "ordered": True, "location": {"state": "Missouri"}},  # noqa: E501
    {"user_id": 10, "manager": True, "favorites": ["Erlang", "Erlang"], "age": 43, "ordered": 9, "location": {"state": "New Hampshire"}},  # noqa: E501
    {"user_id": 11, "manager": True, "favorites": ["Ruby", "Lisp", "C", "C++", "C++"], "age": 75, "ordered": 10000, "location": {"state": "Hawaii"}},  # noqa: E501
    {"user_id": 12, "manager": True, "favorites": ["C", "Python", "Lisp"], "age": 71, "ordered": "a", "location": {"state": "Pennsylvania"}},  # noqa: E501
    {"user_id": 13, "manager": False, "favorites": ["C", "Ruby", "Ruby"], "age": 78, "twitter": "@whitleyharvey", "ordered": "A", "location": {"state": "Minnesota"}},  # noqa: E501
    {"user_id": 14, "favorites": ["Erlang", "Python", "Lisp"], "age": 51, "ordered": "aa", "location": {"state": "North Dakota"}},  # noqa: E501
]
USERS = [{"_id": f"u{u['user_id']:02}", **u} for u in USERS]


@pytest.mark.parametrize("selector, user_ids", [
    ({"manager": True, "favorites": {"$all": ["Lisp", "Python"]}}, [2, 9, 12]),
    ({"manager": True, "location": {"$all": ["Ohai"]}}, []),
    ({"manager": True, "favorites": {"$in": ["Ruby", "Python"]}}, [2, 6, 7, 9, 11, 12]),
    ({"manager": True, "favorites": {"$nin": ["Erlang", "Python"]}}, [5, 6, 8, 11]),
    ({"age": {"$gt": 40}, "location.state": {"$regex": "(?i)new.*"}}, [2, 10]),
    ({"age": {"$gt": 0}, "twitter": {"$exists": False}}, [2, 3, 5, 6, 7, 8, 10, 11, 12, 14]),
    ({"age": {"$gt": 0}, "twitter": None}, [9]),
    ({"twitter": {"$ne": "notamatch"}}, [0, 1, 4, 9, 13]),
    ({"twitter": {"$lte": None}}, [9]),
    ({"twitter": {"$and": [{"$lte": "@z"}, {"$ne": None}]}}, [0, 1, 4, 13]),
    ({"twitter": {"$gte": None}}, [0, 1, 4, 9, 13]),
    ({"twitter": {"$exists": False}}, [2, 3, 5, 6, 7, 8, 10, 11, 12, 14]),
    ({"twitter": {"$lt": 1}}, [9]),
    ({"twitter": {"$lte": 1}}, [9]),
    ({"location.state": {"$beginsWith": "New"}}, [2, 10]),
    ({"location.state": {"$beginsWith": "New "}}, [2, 10]),
    ({"location.state": {"$beginsWith": "Foo"}}, []),
    ({"location.state": {"$beginsWith": " New"}}, []),
    # ICU collation, which CouchDB uses: "a" < "A" < "aa" (not code point order: "A" < "a")
    ({"ordered": {"$lte": "a"}}, [7, 8, 9, 10, 11, 12]),
    ({"ordered": {"$gte": "a"}}, [12, 13, 14]),
    ({"age": 22, "$or": []}, [9]),
    ({"age": 22, "company": {"$in": []}}, []),
    ({"age": 22, "$and": []}, [9]),
    ({"age": 22, "favorites": {"$all": []}}, []),
    ({"age": 22, "$and": [{"favorites": {"$all": []}}]}, []),
    ({"favorites": {"$nin": []}}, list(range(15))),
])
def test_couchdb_operator_cases(selector, user_ids):
    answer = find({"selector": selector, "limit": 100}, USERS)
    assert sorted(d["user_id"] for d in answer["docs"]) == user_ids


def test_couchdb_multi_type_and_keymap_cases():
    docs = [
        {"_id": "1", "name": "Jimi", "age": 10}, {"_id": "2", "name": {"forename": "Eddie"}, "age": 20},
        {"_id": "3", "name": None, "age": 30}, {"_id": "4", "name": 1, "age": 40},
        {"_id": "5", "forename": "Sam", "age": 50},
    ]
    ids = lambda selector: [d["_id"] for d in find({"selector": selector}, docs)["docs"]]  # noqa: E731
    assert ids({"name": {"$exists": True}}) == ["1", "2", "3", "4"]
    assert ids({"name.forename": {"$exists": True}}) == ["2"]
    assert ids({"name": {"$gte": 0}}) == ["1", "2", "4"]
    assert ids({"age": {"$gte": 0, "$lt": 40}, "name": {"$gte": 0}}) == ["1", "2"]
    maps = [{"_id": "a", "foo": {"aa": "bar", "bb": "bang"}},
            {"_id": "b", "foo": {"cc": "bar", "bb": "bang"}}]
    assert [d["_id"] for d in find({"selector": {"foo": {"$keyMapMatch": {"$eq": "aa"}}}},
                                   maps)["docs"]] == ["a"]
    for prefix in (123, True, [], {}):
        with pytest.raises(MangoError):
            compile_selector({"location.state": {"$beginsWith": prefix}})


# CouchDB's mango_selector unit cases for objects and combinators: each selector against
# documents in order; MISSING_X stands for a document without "x".
MISSING_X = object()
X_OBJECTS = [MISSING_X, {}, {"a": 1}, {"a": 1, "b": 2}, []]
X_NUMBERS = [6, 2, 9, MISSING_X]
X_FALSY = [0, False, [], MISSING_X]
RANGE_AND = {"$and": [{"$gt": 3}, {"$lt": 7}]}
RANGE_OR = {"$or": [{"$lt": 3}, {"$gt": 7}]}


@pytest.mark.parametrize("selector, values, expected", [
    ({}, X_OBJECTS, [True] * 5),
    ({"x": {}}, X_OBJECTS, [False, True, False, False, False]),
    ({"$not": {"x": {}}}, X_OBJECTS, [False, False, True, True, True]),
    ({"x": {"a": 1}}, X_OBJECTS, [False, False, True, True, False]),
    ({"x": {"a": 1, "b": 2}}, X_OBJECTS, [False, False, False, True, False]),
    ({"x.b": 2}, X_OBJECTS, [False, False, False, True, False]),
    ({"x": {"$and": []}}, X_FALSY, [True] * 4),
    ({"x": {"$not": {"$and": []}}}, X_FALSY, [True] * 4),
    ({"x": {"$or": []}}, X_FALSY, [True] * 4),
    ({"x": {"$not": {"$or": []}}}, X_FALSY, [True] * 4),
    ({"x": {"$nor": []}}, X_FALSY, [True] * 4),
    ({"x": RANGE_AND}, X_NUMBERS, [True, False, False, False]),
    ({"x": {"$not": RANGE_AND}}, X_NUMBERS, [False, True, True, False]),
    ({"x": RANGE_OR}, X_NUMBERS, [False, True, True, False]),
    ({"x": {"$not": RANGE_OR}}, X_NUMBERS, [True, False, False, False]),
    ({"x": {"$nor": RANGE_OR["$or"]}}, X_NUMBERS, [True, False, False, False]),
])
def test_couchdb_object_and_combinator_cases(selector, values, expected):
    docs = [{"_id": "d"} if v is MISSING_X else {"_id": "d", "x": v} for v in values]
    assert [matches(selector, doc) for doc in docs] == expected


def test_lone_surrogates_in_documents_are_handled():
    # JSON allows "\ud800"; Python's json decodes it into a str that UTF-8 cannot encode.
    docs = [{"_id": "a\ud800", "w": "\udfff"}, {"_id": "b", "w": "x"}]
    answer = find({"selector": {"w": {"$gt": ""}}, "sort": ["w"], "limit": 1}, docs)
    assert [d["_id"] for d in answer["docs"]] == ["b"]
    rest = find({"selector": {"w": {"$gt": ""}}, "sort": ["w"], "bookmark": answer["bookmark"]},
                docs)
    assert [d["_id"] for d in rest["docs"]] == ["a\ud800"]
    by_id = find({"selector": {}, "limit": 1}, docs)  # the bookmark holds the _id
    assert [d["_id"] for d in by_id["docs"]] == ["a\ud800"]
    assert find({"selector": {}, "bookmark": by_id["bookmark"]}, docs)["docs"][0]["_id"] == "b"
    assert matches({"w": {"$regex": "\udfff"}}, docs[0])
    with pytest.raises(MangoError) as caught:
        compile_selector({"$\ud800": 1})
    str(caught.value).encode("utf-8")  # the message can go into an answer
