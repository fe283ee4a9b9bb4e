"""The pure revision-tree model: revision ids, parsing, merge, winner, stemming, revs_diff.

Merge and stemming cases follow CouchDB's `couch_key_tree` tests (named after them where they
correspond); the property tests check the model against first principles.
"""

import hashlib
import json

import hypothesis.strategies as st
import msgpack
import pytest
from hypothesis import given, settings

from plugshare.store.base import BadRequest
from plugshare.store.revtree import (
    RevTree,
    check_json,
    compute_rev,
    history_of,
    parse_doc,
    parse_history,
    parse_rev,
)


def h(tag: str) -> str:
    """A stable 32-hex hash standing for the revision called `tag`."""
    return hashlib.md5(tag.encode()).hexdigest()


def r(pos: int, tag: str) -> str:
    return f"{pos}-{h(tag)}"


def chain(*revs: str) -> tuple[str, ...]:
    """A path newest first from revs given oldest first (easier to read in tests)."""
    return tuple(reversed(revs))


def tree_of(*paths, deleted=()) -> RevTree:
    tree = RevTree()
    for path in paths:
        tree.merge(path, path[0] in deleted)
    return tree


def leaf_revs(tree: RevTree) -> list[str]:
    return [leaf.rev for leaf in tree.leaves()]


# -- revision ids ---------------------------------------------------------------------------


def test_parse_rev_splits_generation_and_hash():
    assert parse_rev("12-" + "a" * 32) == (12, "a" * 32)


@pytest.mark.parametrize(
    "bad",
    [
        "0-" + "a" * 32,  # generations start at 1
        "01-" + "a" * 32,
        "-1-" + "a" * 32,
        "1-" + "A" * 32,  # lowercase only: byte order must equal CouchDB's
        "1-" + "a" * 31,
        "1-" + "a" * 33,
        "1-" + "g" * 32,
        "1" + "a" * 32,
        "1-" + "a" * 32 + "\n",
        "",
        None,
        1,
        ["1-" + "a" * 32],
    ],
)
def test_parse_rev_refuses_malformed_revisions(bad):
    with pytest.raises(BadRequest, match="invalid revision"):
        parse_rev(bad)


def test_compute_rev_is_deterministic_and_counts_generations():
    first = compute_rev(None, False, {"a": 1, "b": [1, 2]})
    assert first == compute_rev(None, False, {"b": [1, 2], "a": 1})  # key order does not matter
    assert parse_rev(first)[0] == 1
    second = compute_rev(first, False, {"a": 2})
    assert parse_rev(second)[0] == 2
    assert second == compute_rev(first, False, {"a": 2})


def test_compute_rev_depends_on_parent_deleted_flag_and_body():
    base = compute_rev(r(1, "p"), False, {"a": 1})
    others = {
        compute_rev(r(1, "q"), False, {"a": 1}),
        compute_rev(r(1, "p"), True, {"a": 1}),
        compute_rev(r(1, "p"), False, {"a": 2}),
        compute_rev(r(1, "p"), False, {"a": 1.5}),
        compute_rev(r(1, "p"), False, {"a": "1"}),
    }
    assert base not in others and len(others) == 5


def test_check_json_accepts_plain_json():
    check_json({"a": [1, 2.5, "x", None, True, {"b": []}], "ü": "€"})


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({1: "x"}, "non-string key"),
        ({"a": {"b": {None: 1}}}, "non-string key"),
        ({"a": float("nan")}, "JSON cannot represent"),
        ({"a": float("inf")}, "JSON cannot represent"),
        ({"a": {1, 2}}, "not a JSON value"),
        ({"a": b"bytes"}, "not a JSON value"),
        ({"a": object()}, "not a JSON value"),
        ({"a": "\ud800"}, "not valid Unicode"),
        ({"\udfff": 1}, "not valid Unicode"),
    ],
)
def test_check_json_refuses_what_json_cannot_hold(bad, message):
    with pytest.raises(BadRequest, match=message):
        check_json(bad)


def test_check_json_refuses_absurd_nesting():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(BadRequest, match="nested too deeply"):
        check_json({"a": deep})


# -- histories (_revisions) -----------------------------------------------------------------


def test_parse_history_gives_the_path_newest_first():
    revisions = {"start": 3, "ids": [h("c"), h("b"), h("a")]}
    assert parse_history(r(3, "c"), revisions) == (r(3, "c"), r(2, "b"), r(1, "a"))
    assert history_of(parse_history(r(3, "c"), revisions)) == revisions


def test_parse_history_of_a_stemmed_path_starts_above_one():
    assert parse_history(r(7, "g"), {"start": 7, "ids": [h("g"), h("f")]}) == (
        r(7, "g"),
        r(6, "f"),
    )


def test_parse_history_without_revisions_is_the_rev_alone():
    assert parse_history(r(4, "d"), None) == (r(4, "d"),)


@pytest.mark.parametrize(
    ("revisions", "message"),
    [
        ({"start": 0, "ids": [h("c")]}, "start must be an integer >= 1"),
        ({"start": -3, "ids": [h("c")]}, "start must be an integer >= 1"),
        ({"start": True, "ids": [h("c")]}, "start must be an integer >= 1"),
        ({"start": "3", "ids": [h("c")]}, "start must be an integer >= 1"),
        ({"start": 3, "ids": []}, "non-empty list"),
        ({"start": 3, "ids": h("c")}, "non-empty list"),
        ({"start": 3, "ids": [h("c"), "zz"]}, "not a 32 lowercase hex"),
        ({"start": 3, "ids": [h("c"), h("b").upper()]}, "not a 32 lowercase hex"),
        ({"start": 3, "ids": [h("c"), 7]}, "not a 32 lowercase hex"),
        ({"start": 2, "ids": [h("c"), h("b"), h("a")]}, "generations below 1"),
        ({"start": 3, "ids": [h("x"), h("b")]}, "does not match"),
        ({"start": 4, "ids": [h("c"), h("b")]}, "does not match"),
        ({"ids": [h("c")]}, "must be an object"),
        ({"start": 3, "ids": [h("c")], "extra": 1}, "must be an object"),
        ([3, [h("c")]], "must be an object"),
    ],
)
def test_parse_history_refuses_forged_or_malformed_histories(revisions, message):
    with pytest.raises(BadRequest, match=message):
        parse_history(r(3, "c"), revisions)


# -- parsing documents ---------------------------------------------------------------------


def test_parse_doc_splits_fields_from_body():
    doc = parse_doc({"_id": "a", "_rev": r(1, "x"), "_conflicts": [], "n": 1, "t": "x"})
    assert (doc.id, doc.rev, doc.deleted, doc.body, doc.path) == (
        "a",
        r(1, "x"),
        False,
        {"n": 1, "t": "x"},
        None,
    )


def test_parse_doc_keeps_a_tombstones_body():
    doc = parse_doc({"_id": "a", "_rev": r(1, "x"), "_deleted": True, "n": 1})
    assert doc.deleted and doc.body == {"n": 1}


def test_parse_doc_replicated_needs_rev_and_gives_the_path():
    doc = parse_doc(
        {"_id": "a", "_rev": r(2, "b"), "_revisions": {"start": 2, "ids": [h("b"), h("a")]}},
        new_edits=False,
    )
    assert doc.path == (r(2, "b"), r(1, "a"))
    with pytest.raises(BadRequest, match="needs _rev"):
        parse_doc({"_id": "a", "n": 1}, new_edits=False)


def test_parse_doc_local_ids():
    assert parse_doc({"_id": "_local/ck", "_rev": "0-3", "a": 1}).is_local
    with pytest.raises(BadRequest, match="never replicated"):
        parse_doc({"_id": "_local/ck", "_rev": r(1, "x")}, new_edits=False)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "must be a JSON object"),
        ("doc", "must be a JSON object"),
        ({"n": 1}, "_id must be a non-empty string"),
        ({"_id": ""}, "_id must be a non-empty string"),
        ({"_id": 5}, "_id must be a non-empty string"),
        ({"_id": "_design/x"}, "only '_local/<name>'"),
        ({"_id": "_x"}, "only '_local/<name>'"),
        ({"_id": "_local/"}, "only '_local/<name>'"),
        ({"_id": "a", "_attachments": []}, "_attachments must be an object"),
        ({"_id": "a", "_attachments": {"x": {"data": "aGk="}}}, "stream it with put_attachment"),
        ({"_id": "a", "_deleted": "yes"}, "_deleted must be true or false"),
        ({"_id": "a", "_rev": "3"}, "invalid revision"),
        ({"_id": "a", "x": float("nan")}, "JSON cannot represent"),
        ({"_id": "a", 3: "x"}, "non-string key"),
        ({"_id": "a", "_revisions": {"start": 1, "ids": [h("a")]}}, "needs _rev"),
        (
            {"_id": "a", "_rev": r(2, "b"), "_revisions": {"start": 1, "ids": [h("b")]}},
            "does not match",
        ),
    ],
)
def test_parse_doc_refuses_bad_documents(doc, message):
    with pytest.raises(BadRequest, match=message):
        parse_doc(doc)


# -- merge ---------------------------------------------------------------------------------


def test_merge_into_empty_tree():
    tree = RevTree()
    assert tree.merge((r(1, "1"),))
    assert leaf_revs(tree) == [r(1, "1")]


def test_merge_reflexive_changes_nothing():
    tree = tree_of(chain(r(1, "1"), r(2, "1a"), r(3, "1aa")))
    before = tree.copy()
    assert not tree.merge(chain(r(1, "1"), r(2, "1a"), r(3, "1aa")))
    assert not tree.merge(chain(r(1, "1"), r(2, "1a")))  # a prefix
    assert tree == before


def test_merge_unrelated_root_is_a_conflict():
    tree = tree_of((r(1, "1"),), (r(1, "2"),), (r(1, "3"),))
    assert set(leaf_revs(tree)) == {r(1, "1"), r(1, "2"), r(1, "3")}


def test_merge_extends_a_leaf_and_branches():
    tree = tree_of(chain(r(1, "1"), r(2, "1a")), chain(r(1, "1"), r(2, "1b")))
    assert set(leaf_revs(tree)) == {r(2, "1a"), r(2, "1b")}
    tree.merge(chain(r(1, "1"), r(2, "1a"), r(3, "1aa")))  # should_merge_tree_of_odd_length
    assert set(leaf_revs(tree)) == {r(3, "1aa"), r(2, "1b")}


def test_merge_stemmed_paths_into_a_full_tree():
    tree = tree_of(chain(r(1, "1"), r(2, "1a")), chain(r(1, "1"), r(2, "1b"), r(3, "1bb")))
    before = tree.copy()
    assert not tree.merge((r(2, "1a"),))  # should_merge_tree_with_stem
    assert not tree.merge((r(3, "1bb"),))  # should_merge_with_stem_at_deeper_level
    assert not tree.merge(chain(r(2, "1b"), r(3, "1bb")))
    assert tree == before


def test_merge_disjoint_stem_is_a_conflict_until_joined():
    # should_create_conflicts_on_merge, then should_create_no_conflicts_on_merge
    tree = tree_of(chain(r(1, "1"), r(2, "1a")), (r(3, "1aa"),))
    assert leaf_revs(tree) == [r(3, "1aa"), r(2, "1a")]
    assert tree.merge(chain(r(1, "1"), r(2, "1a"), r(3, "1aa")))
    assert leaf_revs(tree) == [r(3, "1aa")]
    assert tree.path(r(3, "1aa")) == chain(r(1, "1"), r(2, "1a"), r(3, "1aa"))


def test_merge_a_longer_history_rejoins_a_stemmed_root():
    tree = tree_of(chain(r(1, "a"), r(2, "b"), r(3, "c"), r(4, "d")))
    tree.stem(2)
    assert tree.path(r(4, "d")) == (r(4, "d"), r(3, "c"))
    assert tree.merge(chain(r(1, "a"), r(2, "b"), r(3, "c"), r(4, "d")))
    assert tree.path(r(4, "d")) == chain(r(1, "a"), r(2, "b"), r(3, "c"), r(4, "d"))


def test_merge_rejoining_a_stemmed_tombstone_keeps_it_deleted():
    tree = tree_of(chain(r(1, "a"), r(2, "b"), r(3, "c")), deleted={r(3, "c")})
    tree.stem(1)
    assert tree.merge(chain(r(1, "a"), r(2, "b"), r(3, "c")), deleted=False)
    assert tree.winner().rev == r(3, "c") and tree.winner().deleted
    assert tree.path(r(3, "c")) == chain(r(1, "a"), r(2, "b"), r(3, "c"))


def test_merge_clears_the_deleted_flag_of_an_extended_tombstone():
    tree = tree_of(chain(r(1, "a"), r(2, "b")), deleted={r(2, "b")})
    tree.merge(chain(r(1, "a"), r(2, "b"), r(3, "c")))
    assert tree == tree_of(chain(r(1, "a"), r(2, "b"), r(3, "c")))


def test_merge_ignores_a_conflicting_branch():
    # COUCHDB-902: a path through one branch leaves the other alone
    tree = tree_of(chain(r(1, "foo"), r(2, "foo2")), chain(r(1, "foo"), r(2, "foo3")))
    tree.merge(chain(r(1, "foo"), r(2, "foo3"), r(3, "foo4")))
    assert set(leaf_revs(tree)) == {r(2, "foo2"), r(3, "foo4")}


def test_merge_keeps_what_is_known_about_a_revision():
    tree = tree_of(chain(r(1, "a"), r(2, "b")), deleted={r(2, "b")})
    assert not tree.merge((r(2, "b"),), deleted=False)
    assert tree.winner().deleted


def test_merge_refuses_a_history_that_moves_a_revision_and_changes_nothing():
    tree = tree_of(chain(r(1, "a"), r(2, "b"), r(3, "c")))
    before = tree.copy()
    with pytest.raises(BadRequest, match="forged history"):
        tree.merge(chain(r(1, "x"), r(2, "y"), r(3, "c"), r(4, "d")))
    assert tree == before


# -- winner and conflicts ------------------------------------------------------------------


def test_winner_prefers_live_then_generation_then_hash():
    low, high = sorted([h("p"), h("q")])
    tree = tree_of(
        chain(r(1, "a"), f"2-{low}"),
        chain(r(1, "a"), f"2-{high}"),
        chain(r(1, "a"), r(2, "z"), r(3, "dead")),
        deleted={r(3, "dead")},
    )
    # a live generation 2 beats a deleted generation 3; between the two, the higher hash wins
    assert tree.winner().rev == f"2-{high}"
    assert tree.conflicts() == [f"2-{low}"]
    assert tree.leaves()[-1].rev == r(3, "dead")


def test_winner_of_only_tombstones_is_the_highest_tombstone():
    tree = tree_of(
        chain(r(1, "a"), r(2, "x")), chain(r(1, "a"), r(2, "y"), r(3, "y")),
        deleted={r(2, "x"), r(3, "y")},
    )
    assert tree.winner().rev == r(3, "y") and tree.winner().deleted
    assert tree.conflicts() == []


def test_hash_order_is_byte_order():
    a, b = "1-" + "9" * 32, "1-" + "a" * 32
    tree = tree_of((a,), (b,))
    assert tree.winner().rev == b  # '9' < 'a'
    assert tree.conflicts() == [a]


def test_conflicts_are_live_losing_leaves_in_winner_order():
    tree = tree_of(
        chain(r(1, "a"), r(2, "b"), r(3, "c")),
        chain(r(1, "a"), r(2, "x")),
        chain(r(1, "a"), r(2, "y")),
        chain(r(1, "a"), r(2, "w"), r(3, "w")),
        deleted={r(3, "w")},
    )
    expected = sorted([r(2, "x"), r(2, "y")], key=lambda rev: rev.partition("-")[2], reverse=True)
    assert tree.winner().rev == r(3, "c")
    assert tree.conflicts() == expected


def test_winner_of_empty_tree_is_an_error():
    with pytest.raises(ValueError):
        RevTree().winner()


# -- stemming --------------------------------------------------------------------------------


def test_stem_more_levels_than_exist_changes_nothing():
    tree = tree_of(chain(r(1, "1"), r(2, "1a"), r(3, "1aa")))
    assert tree.stem(3) == set()
    assert tree.path(r(3, "1aa")) == chain(r(1, "1"), r(2, "1a"), r(3, "1aa"))


def test_stem_keeps_the_deepest_nodes():
    tree = tree_of(chain(r(1, "1"), r(2, "1a"), r(3, "1aa")))
    assert tree.stem(2) == {r(1, "1")}  # should_return_two_deepest_nodes
    assert tree.history(r(3, "1aa")) == {"start": 3, "ids": [h("1aa"), h("1a")]}
    assert tree.stem(1) == {r(2, "1a")}  # should_return_one_deepest_node
    assert tree.revs() == {r(3, "1aa")}


def test_stem_counts_from_every_leaf():
    # A short branch off a node near the top of a long branch keeps that node's ancestors.
    trunk = [r(i, f"t{i}") for i in range(1, 8)]
    tree = tree_of(tuple(reversed(trunk)), (r(3, "side"), trunk[1], trunk[0]))
    removed = tree.stem(3)
    assert removed == set(trunk[:4]) - {trunk[0], trunk[1]}  # t3, t4 kept by the main leaf only
    assert tree.path(r(3, "side")) == (r(3, "side"), trunk[1], trunk[0])
    assert tree.path(trunk[-1]) == tuple(reversed(trunk[4:]))
    assert {leaf.rev for leaf in tree.leaves()} == {trunk[-1], r(3, "side")}


def test_stem_gives_each_node_the_budget_of_its_closest_leaf():
    # a4 reaches a2 with 1 revision to spare; s3 reaches it with 2, so a1 is kept too.
    trunk = [r(i, f"a{i}") for i in range(1, 5)]
    tree = tree_of(tuple(reversed(trunk)), (r(3, "s3"), trunk[1], trunk[0]))
    assert tree.stem(3) == set()
    assert tree.path(r(3, "s3")) == (r(3, "s3"), trunk[1], trunk[0])


def test_stem_refuses_a_limit_below_one():
    with pytest.raises(ValueError):
        RevTree().stem(0)


# -- revs_diff -------------------------------------------------------------------------------


def test_revs_diff_reports_unknown_revs_and_lower_leaves():
    tree = tree_of(chain(r(1, "a"), r(2, "b"), r(3, "c")), chain(r(1, "a"), r(2, "x")))
    missing, ancestors = tree.revs_diff([r(1, "a"), r(3, "c"), r(4, "d"), r(4, "d"), r(2, "q")])
    assert missing == [r(4, "d"), r(2, "q")]
    assert set(ancestors) == {r(3, "c"), r(2, "x")}  # leaves below generation 4
    missing, ancestors = tree.revs_diff([r(3, "q")])
    assert (missing, ancestors) == ([r(3, "q")], [r(2, "x")])
    assert tree.revs_diff([r(2, "b"), r(2, "x")]) == ([], [])


def test_revs_diff_counts_stemmed_revisions_as_missing():
    tree = tree_of(chain(r(1, "a"), r(2, "b"), r(3, "c")))
    tree.stem(1)
    assert tree.revs_diff([r(1, "a"), r(3, "c")]) == ([r(1, "a")], [])


def test_revs_diff_on_empty_tree():
    assert RevTree().revs_diff([r(1, "a")]) == ([r(1, "a")], [])


# -- serialisation ---------------------------------------------------------------------------


def test_to_obj_round_trips_through_json_and_msgpack():
    tree = tree_of(
        chain(r(1, "a"), r(2, "b"), r(3, "c")),
        chain(r(1, "a"), r(2, "x")),
        (r(5, "stem"), r(4, "s")),
        deleted={r(2, "x")},
    )
    for codec_out, codec_in in ((json.dumps, json.loads), (msgpack.packb, msgpack.unpackb)):
        twin = RevTree.from_obj(codec_in(codec_out(tree.to_obj())))
        assert twin == tree
        assert twin.leaves() == tree.leaves()


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [["nonsense", None, False]],
        [[r(1, "a"), 0, False]],  # its own parent
        [[r(1, "a"), None, False], [r(3, "c"), 0, False]],  # skips a generation
        [[r(1, "a"), None, False], [r(1, "a"), None, False]],
        [[r(1, "a"), None, "no"]],
        [[r(1, "a"), None]],
    ],
)
def test_from_obj_refuses_what_to_obj_cannot_make(bad):
    with pytest.raises(ValueError):
        RevTree.from_obj(bad)


# -- properties --------------------------------------------------------------------------------


@st.composite
def rev_forests(draw):
    """A random revision forest as {rev: (parent rev or None, deleted)}: each new revision
    edits a random earlier one or starts a new root (a concurrent creation)."""
    nodes: dict[str, tuple[str | None, bool]] = {}
    order: list[str] = []
    for _ in range(draw(st.integers(1, 14))):
        parent = draw(st.sampled_from([None, *order])) if order else None
        pos = 1 if parent is None else int(parent.partition("-")[0]) + 1
        rev = f"{pos}-{draw(st.binary(min_size=16, max_size=16)).hex()}"
        if rev in nodes:
            continue
        nodes[rev] = (parent, draw(st.booleans()))
        order.append(rev)
    return nodes


def full_path(nodes, rev):
    path = [rev]
    while (parent := nodes[path[-1]][0]) is not None:
        path.append(parent)
    return tuple(path)


def expected_leaves(nodes, links):
    """Leaves from first principles: the revisions no known link names as a parent."""
    parents = {parent for child, parent in links}
    return {rev for rev in nodes if rev not in parents}


def expected_winner(nodes, leaves):
    return max(leaves, key=lambda rev: (not nodes[rev][1], parse_rev(rev)))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_merging_full_histories_in_any_order_gives_the_same_tree(data):
    nodes = data.draw(rev_forests())
    arrivals = data.draw(st.permutations(list(nodes)))
    tree = RevTree()
    for rev in arrivals:
        tree.merge(full_path(nodes, rev), nodes[rev][1])
    links = {(rev, parent) for rev, (parent, _) in nodes.items() if parent is not None}
    leaves = expected_leaves(nodes, links)
    assert {leaf.rev for leaf in tree.leaves()} == leaves
    assert tree.winner().rev == expected_winner(nodes, leaves)
    for rev in nodes:
        assert tree.path(rev) == full_path(nodes, rev)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_merging_partial_histories_in_any_order_gives_the_same_tree(data):
    nodes = data.draw(rev_forests())
    deliveries = []
    for rev in data.draw(st.permutations(list(nodes))):
        path = full_path(nodes, rev)
        deliveries.append(path[: data.draw(st.integers(1, len(path)))])
    one, other = RevTree(), RevTree()
    for path in deliveries:
        one.merge(path, nodes[path[0]][1])
    for path in data.draw(st.permutations(deliveries)):
        other.merge(path, nodes[path[0]][1])
    links = {(child, parent) for path in deliveries for child, parent in zip(path, path[1:])}
    leaves = expected_leaves(nodes, links)
    assert one == other
    assert {leaf.rev for leaf in one.leaves()} == leaves
    assert one.winner().rev == expected_winner(nodes, leaves)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_stemming_keeps_the_last_revisions_of_every_leaf_path(data):
    nodes = data.draw(rev_forests())
    limit = data.draw(st.integers(1, 6))
    tree = RevTree()
    for rev in nodes:
        tree.merge(full_path(nodes, rev), nodes[rev][1])
    leaves_before = tree.leaves()
    tree.stem(limit)
    assert tree.leaves() == leaves_before
    kept = set()
    for leaf in leaves_before:
        kept.update(full_path(nodes, leaf.rev)[:limit])
    assert tree.revs() == kept
    for rev in kept:  # every kept link stays: a path runs up to the first removed ancestor
        path = full_path(nodes, rev)
        cut = next((i for i, ancestor in enumerate(path) if ancestor not in kept), len(path))
        assert tree.path(rev) == path[:cut]
    assert RevTree.from_obj(tree.to_obj()) == tree


# -- the leaf cap ---------------------------------------------------------------------------


def test_merge_refuses_a_path_that_would_exceed_max_leaves_and_changes_nothing():
    from plugshare.store.base import Forbidden

    root = r(1, "root")
    tree = tree_of(*[(r(2, f"s{i}"), root) for i in range(3)])
    assert tree.leaf_count() == 3
    before = tree.copy()
    with pytest.raises(Forbidden, match="more than 3 leaf revisions"):
        tree.merge((r(2, "s3"), root), max_leaves=3)
    assert tree == before and tree.leaf_count() == 3
    assert not tree.merge((r(2, "s0"), root), max_leaves=3)  # known: a no-op, never refused
    assert tree.merge((r(3, "child"), r(2, "s0"), root), max_leaves=3)  # replaces its leaf
    assert tree.leaf_count() == 3 and not tree.is_leaf(r(2, "s0"))


def test_leaf_growth_counts_new_leaves_and_extended_ones():
    tree = tree_of(chain(r(1, "a"), r(2, "b")))
    assert tree.leaf_growth((r(3, "c"), r(2, "b"))) == 0  # extends the leaf
    assert tree.leaf_growth((r(2, "x"), r(1, "a"))) == 1  # a new branch
    assert tree.leaf_growth((r(2, "b"), r(1, "a"))) == 0  # known
    assert tree.leaf_growth((r(1, "z"),)) == 1  # a new root


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_leaf_bookkeeping_matches_the_nodes_through_merges_and_stems(data):
    nodes = data.draw(rev_forests())
    tree = RevTree()
    for rev in data.draw(st.permutations(list(nodes))):
        path = full_path(nodes, rev)
        tree.merge(path[: data.draw(st.integers(1, len(path)))], nodes[rev][1])
        if data.draw(st.booleans()):
            tree.stem(data.draw(st.integers(1, 4)))
        parents = {tree.parent(rev) for rev in tree.revs()}
        leaves = {rev for rev in tree.revs() if rev not in parents}
        assert {leaf.rev for leaf in tree.leaves()} == leaves
        assert tree.leaf_count() == len(leaves)
        assert all(tree.is_leaf(rev) == (rev in leaves) for rev in tree.revs())
        assert RevTree.from_obj(tree.to_obj()).leaves() == tree.leaves()
