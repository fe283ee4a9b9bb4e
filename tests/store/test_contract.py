"""The store contract (`plugshare/store/base.py`), checked on every backend.

Each test runs once per backend through the `store` fixture (or opens its own stores with
`open_backend`). Only what base.py promises is checked: revision ids made by a store are
checked for their format and generation, never for an exact hash; sequences are opaque
(never compared: CouchDB hands out a different one for the same state), and the changes feed
is at-least-once (a row read after a seq may be one delivered before it; nothing is lost).
The "couchdb-cluster" backend runs the CouchDB store through a proxy that does all that.
"""

import hashlib
import re

import hypothesis.strategies as st
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings

from plugshare.store.base import BadRequest, Conflict, NotFound
from plugshare.store.revtree import RevTree, history_of
from tests.store.conftest import open_backend
from tests.store.test_revtree import full_path, rev_forests

REV_FORMAT = re.compile(r"^\d+-[0-9a-f]{32}$")


def gen(rev: str) -> int:
    return int(rev.partition("-")[0])


def rev(pos: int, tag: str) -> str:
    """A revision id made by a (pretend) other node, for replicated writes."""
    return f"{pos}-{hashlib.md5(tag.encode()).hexdigest()}"


def replicated(doc_id: str, path, *, deleted: bool = False, **body) -> dict:
    """A document as replication delivers it: `_rev` with its `_revisions` (newest first)."""
    doc = {"_id": doc_id, "_rev": path[0], "_revisions": history_of(path), **body}
    if deleted:
        doc["_deleted"] = True
    return doc


def winner_of(leaves: dict[str, bool]) -> str:
    """CouchDB's winner among leaves {rev: deleted}: live, then generation, then hash."""
    return max(leaves, key=lambda r: (not leaves[r], gen(r), r.partition("-")[2]))


async def all_changes(store, since=0):
    return (await store.changes(since)).results


def feed_state(changes) -> list[tuple]:
    """The rows of a feed without their seqs: a seq is opaque, and two reads of the same
    state may give different ones (CouchDB)."""
    return [(c.id, c.revs, c.deleted) for c in changes]


def first_seen(ids: list[str]) -> list[str]:
    return list(dict.fromkeys(ids))


def new_rows_by_id(ids: list[str], seen: list[str]) -> list[str]:
    """The ids of a page not delivered before. The feed is at-least-once (a CouchDB cluster
    may replay a change it already delivered): a row seen before is allowed, never a loss."""
    return [doc_id for doc_id in first_seen(ids) if doc_id not in seen]


def new_rows(changes, seen: list[str]) -> list[str]:
    return new_rows_by_id([c.id for c in changes], seen)


async def change_of(store, doc_id):
    [change] = [c for c in await all_changes(store) if c.id == doc_id]
    return change


async def assert_empty(store):
    assert (await store.info())["doc_count"] == 0
    assert await all_changes(store) == []
    assert await store.all_docs() == []


# -- put / get / delete ------------------------------------------------------------------------


async def test_put_creates_generation_one_and_get_returns_it(store):
    rev1 = await store.put({"_id": "note", "text": "hello", "tags": ["a", "b"], "n": 1.5})
    assert REV_FORMAT.match(rev1) and gen(rev1) == 1
    assert await store.get("note") == {
        "_id": "note", "_rev": rev1, "text": "hello", "tags": ["a", "b"], "n": 1.5,
    }


async def test_update_with_the_current_rev_makes_the_next_generation(store):
    rev1 = await store.put({"_id": "note", "text": "one", "old": True})
    rev2 = await store.put({"_id": "note", "_rev": rev1, "text": "two"})
    assert REV_FORMAT.match(rev2) and gen(rev2) == 2 and rev2 != rev1
    assert await store.get("note") == {"_id": "note", "_rev": rev2, "text": "two"}


async def test_get_missing_is_not_found(store):
    with pytest.raises(NotFound):
        await store.get("nothing")
    with pytest.raises(NotFound):
        await store.get("nothing", rev=rev(1, "x"))


@pytest.mark.parametrize("which", ["missing", "stale", "unknown"])
async def test_update_without_the_current_rev_is_a_conflict_and_writes_nothing(store, which):
    rev1 = await store.put({"_id": "note", "v": 1})
    rev2 = await store.put({"_id": "note", "_rev": rev1, "v": 2})
    before = feed_state(await all_changes(store))
    doc = {"_id": "note", "v": 3}
    if which == "stale":
        doc["_rev"] = rev1
    elif which == "unknown":
        doc["_rev"] = rev(2, "never written")
    with pytest.raises(Conflict):
        await store.put(doc)
    assert await store.get("note") == {"_id": "note", "_rev": rev2, "v": 2}
    assert feed_state(await all_changes(store)) == before


async def test_put_with_a_rev_on_a_missing_doc_is_a_conflict(store):
    with pytest.raises(Conflict):
        await store.put({"_id": "note", "_rev": rev(1, "x"), "v": 1})
    await assert_empty(store)


async def test_concurrent_updates_of_one_rev_let_exactly_one_win(store):
    rev1 = await store.put({"_id": "counter", "n": 0})
    outcomes = []

    async def update(n):
        try:
            outcomes.append(await store.put({"_id": "counter", "_rev": rev1, "n": n}))
        except Conflict:
            outcomes.append("conflict")

    async with trio.open_nursery() as nursery:
        for n in range(1, 9):
            nursery.start_soon(update, n)
    [winner] = [o for o in outcomes if o != "conflict"]
    assert outcomes.count("conflict") == 7
    assert (await store.get("counter"))["_rev"] == winner
    assert (await change_of(store, "counter")).revs == (winner,)


async def test_delete_writes_a_tombstone(store):
    rev1 = await store.put({"_id": "note", "v": 1})
    await store.put({"_id": "other", "v": 1})
    tomb = await store.delete("note", rev1)
    assert REV_FORMAT.match(tomb) and gen(tomb) == 2
    with pytest.raises(NotFound):
        await store.get("note")
    assert await store.get("note", rev=tomb) == {"_id": "note", "_rev": tomb, "_deleted": True}
    assert [doc["_id"] for doc in await store.all_docs()] == ["other"]
    assert (await store.info())["doc_count"] == 1
    change = await change_of(store, "note")
    assert change.deleted and change.revs == (tomb,)


async def test_delete_with_a_stale_rev_is_a_conflict(store):
    rev1 = await store.put({"_id": "note", "v": 1})
    rev2 = await store.put({"_id": "note", "_rev": rev1, "v": 2})
    with pytest.raises(Conflict):
        await store.delete("note", rev1)
    assert (await store.get("note"))["_rev"] == rev2


async def test_delete_of_a_missing_doc_fails(store):
    with pytest.raises((NotFound, Conflict)):
        await store.delete("nothing", rev(1, "x"))
    await assert_empty(store)


async def test_put_deleted_true_writes_a_tombstone(store):
    rev1 = await store.put({"_id": "note", "v": 1})
    tomb = await store.put({"_id": "note", "_rev": rev1, "_deleted": True})
    assert gen(tomb) == 2
    with pytest.raises(NotFound):
        await store.get("note")


async def test_a_tombstone_keeps_the_fields_sent_with_it(store):
    rev1 = await store.put({"_id": "note", "doctype": "io.notes", "v": 1})
    tomb = await store.put({"_id": "note", "_rev": rev1, "_deleted": True, "doctype": "io.notes"})
    assert await store.get("note", rev=tomb) == {
        "_id": "note", "_rev": tomb, "_deleted": True, "doctype": "io.notes"}
    (sent,) = await store.bulk_get([("note", tomb)])
    assert sent["_deleted"] is True and sent["doctype"] == "io.notes"
    # and it replicates with its fields
    other = rev(3, "tomb")
    await store.bulk_docs([{**replicated("note", (other, tomb, rev1), deleted=True),
                            "doctype": "io.notes"}], new_edits=False)
    assert (await store.get("note", rev=other))["doctype"] == "io.notes"


async def test_a_deleted_doc_can_be_recreated_without_rev(store):
    rev1 = await store.put({"_id": "note", "v": 1})
    tomb = await store.delete("note", rev1)
    again = await store.put({"_id": "note", "v": 2})
    assert REV_FORMAT.match(again) and again not in (rev1, tomb)
    assert await store.get("note") == {"_id": "note", "_rev": again, "v": 2}
    change = await change_of(store, "note")
    assert not change.deleted and change.revs == (again,)  # continues the history, no conflict
    assert (await store.info())["doc_count"] == 1


async def test_get_of_a_given_leaf_rev(store):
    a, b, c = rev(1, "a"), rev(2, "b"), rev(2, "c")
    await store.bulk_docs(
        [replicated("doc", (b, a), v="b"), replicated("doc", (c, a), v="c")], new_edits=False
    )
    assert await store.get("doc", rev=b) == {"_id": "doc", "_rev": b, "v": "b"}
    assert await store.get("doc", rev=c) == {"_id": "doc", "_rev": c, "v": "c"}
    with pytest.raises(NotFound):
        await store.get("doc", rev=rev(2, "never"))


async def test_get_with_revs_gives_the_history(store):
    rev1 = await store.put({"_id": "note", "v": 1})
    rev2 = await store.put({"_id": "note", "_rev": rev1, "v": 2})
    rev3 = await store.put({"_id": "note", "_rev": rev2, "v": 3})
    doc = await store.get("note", revs=True)
    assert doc["_rev"] == rev3
    hashes = [r.partition("-")[2] for r in (rev3, rev2, rev1)]
    assert doc["_revisions"] == {"start": 3, "ids": hashes}


async def test_get_with_conflicts_only_when_there_are_some(store):
    await store.put({"_id": "note", "v": 1})
    assert "_conflicts" not in await store.get("note", conflicts=True)


# -- revision trees with conflicts ---------------------------------------------------------------


async def test_replicated_conflicts_and_the_deterministic_winner(store):
    a, b, c = rev(1, "a"), rev(2, "b"), rev(2, "c")
    results = await store.bulk_docs(
        [replicated("doc", (b, a), v="b"), replicated("doc", (c, a), v="c")], new_edits=False
    )
    assert results == [{"id": "doc", "rev": b, "ok": True}, {"id": "doc", "rev": c, "ok": True}]
    winner, loser = sorted([b, c], reverse=True)  # same generation: the higher hash wins
    doc = await store.get("doc", conflicts=True)
    assert doc["_rev"] == winner and doc["_conflicts"] == [loser]
    change = await change_of(store, "doc")
    assert change.revs[0] == winner and set(change.revs) == {b, c} and not change.deleted

    # A deleted leaf loses to a live one even of a lower generation.
    tomb = await store.delete("doc", winner)
    assert gen(tomb) == 3
    doc = await store.get("doc", conflicts=True)
    assert doc["_rev"] == loser and "_conflicts" not in doc
    change = await change_of(store, "doc")
    assert change.revs[0] == loser and set(change.revs) == {loser, tomb} and not change.deleted

    # With every leaf deleted the doc is gone; the winner is the highest tombstone.
    tomb2 = await store.delete("doc", loser)
    with pytest.raises(NotFound):
        await store.get("doc")
    change = await change_of(store, "doc")
    assert change.deleted and set(change.revs) == {tomb, tomb2}
    assert change.revs[0] == winner_of({tomb: True, tomb2: True})
    assert (await store.info())["doc_count"] == 0


async def test_conflicts_list_live_losers_in_winner_order(store):
    a = rev(1, "a")
    leaves = {rev(2, f"x{i}"): False for i in range(4)} | {rev(3, "dead"): True}
    docs = [replicated("doc", (leaf, a), v=leaf) for leaf in leaves if gen(leaf) == 2]
    docs.append(replicated("doc", (rev(3, "dead"), rev(2, "mid"), a), deleted=True))
    assert all(r.get("ok") for r in await store.bulk_docs(docs, new_edits=False))
    live = sorted((leaf for leaf, dead in leaves.items() if not dead), reverse=True)
    doc = await store.get("doc", conflicts=True)
    assert doc["_rev"] == live[0] and doc["v"] == live[0]
    assert doc["_conflicts"] == live[1:]


async def test_update_of_a_conflicted_doc_extends_the_winner(store):
    a, b, c = rev(1, "a"), rev(2, "b"), rev(2, "c")
    await store.bulk_docs(
        [replicated("doc", (b, a), v="b"), replicated("doc", (c, a), v="c")], new_edits=False
    )
    winner, loser = sorted([b, c], reverse=True)
    new = await store.put({"_id": "doc", "_rev": winner, "v": "new"})
    assert gen(new) == 3
    doc = await store.get("doc", conflicts=True, revs=True)
    assert doc["_rev"] == new and doc["_conflicts"] == [loser]
    assert doc["_revisions"]["ids"][1:] == [winner.partition("-")[2], a.partition("-")[2]]


async def test_a_known_revision_is_a_no_op(store):
    a, b = rev(1, "a"), rev(2, "b")
    docs = [replicated("doc", (b, a), v="b")]
    assert await store.bulk_docs(docs, new_edits=False) == [{"id": "doc", "rev": b, "ok": True}]
    page = await store.changes(0)
    assert await store.bulk_docs(docs, new_edits=False) == [{"id": "doc", "rev": b, "ok": True}]
    ancestor = [replicated("doc", (a,), v="a")]  # known (as b's parent): also a no-op
    assert await store.bulk_docs(ancestor, new_edits=False) == [{"id": "doc", "rev": a, "ok": True}]
    # CouchDB counts a re-sent ancestor as an update: the doc may show in the feed again,
    # unchanged (at-least-once), and nothing else may.
    again = (await store.changes(page.last_seq)).results
    assert feed_state(again) in ([], [("doc", (b,), False)])
    assert await store.get("doc") == {"_id": "doc", "_rev": b, "v": "b"}


async def test_replicated_history_extends_a_local_edit(store):
    rev1 = await store.put({"_id": "doc", "v": 1})
    later = (rev(3, "c"), rev(2, "b"), rev1)
    await store.bulk_docs([replicated("doc", later, v=3)], new_edits=False)
    doc = await store.get("doc", conflicts=True, revs=True)
    assert doc["_rev"] == later[0] and "_conflicts" not in doc
    assert doc["_revisions"] == history_of(later)
    assert (await change_of(store, "doc")).revs == (later[0],)


async def test_replicated_tombstone(store):
    rev1 = await store.put({"_id": "doc", "v": 1})
    tomb = rev(2, "tomb")
    await store.bulk_docs([replicated("doc", (tomb, rev1), deleted=True)], new_edits=False)
    with pytest.raises(NotFound):
        await store.get("doc")
    assert await store.get("doc", rev=tomb) == {"_id": "doc", "_rev": tomb, "_deleted": True}
    change = await change_of(store, "doc")
    assert change.deleted and change.revs == (tomb,)


# -- revs_diff / bulk_get -------------------------------------------------------------------------


async def test_revs_diff_reports_missing_revs_and_possible_ancestors(store):
    a, b, c = rev(1, "a"), rev(2, "b"), rev(2, "c")
    await store.bulk_docs(
        [replicated("doc", (b, a), v="b"), replicated("doc", (c, a), v="c")], new_edits=False
    )
    await store.put({"_id": "plain", "v": 1})
    new3, new2 = rev(3, "new"), rev(2, "other")
    diff = await store.revs_diff({"doc": [b, c, new3], "unknown": [a, new3], "plain": []})
    assert set(diff) == {"doc", "unknown"}
    assert diff["doc"]["missing"] == [new3]
    assert set(diff["doc"]["possible_ancestors"]) == {b, c}  # leaves below generation 3
    assert sorted(diff["unknown"]["missing"]) == sorted([a, new3])
    assert diff["unknown"]["possible_ancestors"] == []
    diff = await store.revs_diff({"doc": [new2]})
    assert diff == {"doc": {"missing": [new2], "possible_ancestors": []}}  # no leaf below gen 2
    assert await store.revs_diff({"doc": [b, c]}) == {}


async def test_revs_diff_knows_ancestors_received_in_a_history(store):
    a, b, c = rev(1, "a"), rev(2, "b"), rev(3, "c")
    await store.bulk_docs([replicated("doc", (c, b, a), v="c")], new_edits=False)
    assert await store.revs_diff({"doc": [a, b, c]}) == {}


async def test_bulk_get_returns_leaves_with_their_history(store):
    a, b, c = rev(1, "a"), rev(2, "b"), rev(3, "c")
    tomb = rev(2, "tomb")
    await store.bulk_docs(
        [
            replicated("doc", (c, b, a), v="c"),
            replicated("doc", (tomb, a), deleted=True),
            replicated("solo", (rev(1, "s"),), v="s"),
        ],
        new_edits=False,
    )
    docs = await store.bulk_get(
        [("doc", c), ("nothing", a), ("doc", rev(9, "nope")), ("doc", tomb), ("solo", rev(1, "s"))]
    )
    assert docs == [
        {"_id": "doc", "_rev": c, "v": "c", "_revisions": history_of((c, b, a))},
        {"_id": "doc", "_rev": tomb, "_deleted": True, "_revisions": history_of((tomb, a))},
        {"_id": "solo", "_rev": rev(1, "s"), "v": "s", "_revisions": history_of((rev(1, "s"),))},
    ]


async def test_replicating_through_the_api_copies_the_revision_tree(backend, request, tmp_path):
    """changes -> revs_diff -> bulk_get -> bulk_docs(new_edits=False), as the engine does."""
    source = await open_backend(backend, request, tmp_path)
    target = await open_backend(backend, request, tmp_path)
    try:
        r1 = await source.put({"_id": "a", "v": 1})
        await source.put({"_id": "a", "_rev": r1, "v": 2})
        r3 = await source.put({"_id": "gone", "v": 1})
        await source.delete("gone", r3)
        await source.bulk_docs(
            [replicated("a", (rev(2, "remote"), r1), v="remote")], new_edits=False
        )
        await target.put({"_id": "b", "only": "target"})

        changes = (await source.changes(0)).results
        diff = await target.revs_diff({c.id: list(c.revs) for c in changes})
        wanted = [(doc_id, r) for doc_id, d in diff.items() for r in d["missing"]]
        docs = await source.bulk_get(wanted)
        assert len(docs) == len(wanted)
        assert all(r.get("ok") for r in await target.bulk_docs(docs, new_edits=False))
        assert await target.revs_diff({c.id: list(c.revs) for c in changes}) == {}

        for change in changes:
            copied = await change_of(target, change.id)
            assert copied.revs[0] == change.revs[0] and set(copied.revs) == set(change.revs)
            assert copied.deleted == change.deleted
        assert await target.get("a", conflicts=True, revs=True) == await source.get(
            "a", conflicts=True, revs=True
        )
        assert [d["_id"] for d in await target.all_docs()] == ["a", "b"]
    finally:
        await source.aclose()
        await target.aclose()


# -- all_docs / info ------------------------------------------------------------------------------


async def test_compact_keeps_every_leaf_and_drops_old_bodies(store):
    rev1 = await store.put({"_id": "a", "secret": "old clear text"})
    rev2 = await store.put({"_id": "a", "_rev": rev1, "secret": "new"})
    await store.compact()
    for _ in range(50):  # CouchDB compacts in the background
        try:
            await store.get("a", rev=rev1)
        except NotFound:
            break
        await trio.sleep(0.1)
    else:
        raise AssertionError("the old revision's body survived compaction")
    assert await store.get("a") == {"_id": "a", "_rev": rev2, "secret": "new"}
    assert (await store.get("a", revs=True))["_revisions"]["start"] == 2


async def test_winners_gives_the_live_winner_of_each_existing_doc(store):
    a1 = await store.put({"_id": "a", "v": 1})
    a2 = await store.put({"_id": "a", "_rev": a1, "v": 2})
    b1 = await store.put({"_id": "b", "v": 1})
    await store.delete("b", b1)
    await store.put({"_id": "c", "v": 3})
    found = await store.winners(["a", "b", "missing", "c", "a"])
    assert found == {"a": {"_id": "a", "_rev": a2, "v": 2},
                     "c": {"_id": "c", "_rev": found["c"]["_rev"], "v": 3}}
    assert await store.winners([]) == {}
    with pytest.raises(BadRequest):
        await store.winners(["_bad"])


async def test_winners_with_tombstones_gives_what_a_write_lands_on(store):
    """`tombstones=True`: a deleted doc's winning tombstone too (it keeps the fields a write
    may not change, e.g. a doctype), in one call whatever the mix; live docs as without it."""
    a1 = await store.put({"_id": "a", "doctype": "t", "v": 1})
    b1 = await store.put({"_id": "b", "doctype": "t", "v": 1})
    b2 = await store.delete("b", b1)
    # a doc whose every leaf is deleted: the winner is the highest tombstone
    await store.bulk_docs([{"_id": "c", "_rev": "1-" + "a" * 32, "doctype": "t"},
                           {"_id": "c", "_rev": "1-" + "b" * 32, "doctype": "t"}],
                          new_edits=False)
    await store.bulk_docs([{"_id": "c", "_rev": "2-" + "c" * 32, "_deleted": True,
                            "doctype": "t", "_revisions": {"start": 2, "ids": ["c" * 32, "a" * 32]}},
                           {"_id": "c", "_rev": "2-" + "d" * 32, "_deleted": True,
                            "doctype": "t", "_revisions": {"start": 2, "ids": ["d" * 32, "b" * 32]}}],
                          new_edits=False)
    found = await store.winners(["a", "b", "c", "missing"], tombstones=True)
    assert set(found) == {"a", "b", "c"}
    assert found["a"] == {"_id": "a", "_rev": a1, "doctype": "t", "v": 1}
    assert found["b"]["_rev"] == b2 and found["b"]["_deleted"] is True
    assert found["c"]["_rev"] == "2-" + "d" * 32 and found["c"]["_deleted"] is True
    assert found["c"]["doctype"] == "t" and "_revisions" not in found["c"]
    assert set(await store.winners(["a", "b", "c"])) == {"a"}


async def test_all_docs_lists_live_winners_sorted_by_id(store):
    for doc_id in ["b", "a", "c", "d"]:
        await store.put({"_id": doc_id, "v": doc_id})
    doomed = await store.get("c")
    await store.delete("c", doomed["_rev"])
    await store.put_local("checkpoint", {"seq": 1})
    docs = await store.all_docs()
    assert [d["_id"] for d in docs] == ["a", "b", "d"]
    assert all(d["v"] == d["_id"] and REV_FORMAT.match(d["_rev"]) for d in docs)


async def test_info(store):
    await store.put({"_id": "a"})
    info = await store.info()
    assert info["backend"] == store.backend and info["doc_count"] == 1 and "update_seq" in info


async def test_update_seq_follows_every_write(store):
    """What a feed's follower asks when it catches up (it must not count every doc): a write
    made after it is in the feed after it. (A cluster may spell one state's seq two ways, so
    seqs are not compared as strings.)"""
    before = await store.update_seq()
    await store.put({"_id": "a"})
    after_a = await store.update_seq()
    assert "a" in [row.id for row in (await store.changes(before)).results]
    await store.put({"_id": "b"})
    assert "b" in [row.id for row in (await store.changes(after_a)).results]


# -- changes -------------------------------------------------------------------------------------


async def test_changes_one_row_per_doc_oldest_first(store):
    revs = {}
    for doc_id in ["d0", "d1", "d2", "d3"]:
        revs[doc_id] = await store.put({"_id": doc_id})
    revs["d1"] = await store.put({"_id": "d1", "_rev": revs["d1"], "v": 2})
    changes = await all_changes(store)
    assert [c.id for c in changes] == ["d0", "d2", "d3", "d1"]
    assert all(c.revs == (revs[c.id],) and not c.deleted for c in changes)


async def test_changes_pages_with_limit_and_continues_from_last_seq(store):
    for i in range(7):
        await store.put({"_id": f"d{i}"})
    seen, since = [], 0
    for _ in range(20):  # at-least-once: a page may hold rows of the last one again
        page = await store.changes(since, limit=3)
        assert len(page.results) <= 3
        if not page.results:
            break
        seen += [c.id for c in page.results]
        since = page.last_seq
    assert first_seen(seen) == [f"d{i}" for i in range(7)]

    # Later writes show up after the last seq; anything else is a replay.
    rev0 = (await store.get("d0"))["_rev"]
    await store.put({"_id": "d0", "_rev": rev0, "v": 2})
    await store.put({"_id": "d7"})
    page = await store.changes(since)
    assert new_rows(page.results, seen) == ["d7"] and "d0" in [c.id for c in page.results]
    assert set(c.id for c in page.results) <= {f"d{i}" for i in range(8)}
    assert new_rows((await store.changes(page.last_seq)).results, seen + ["d7"]) == []


async def test_changes_from_a_seq_skip_earlier_writes(store):
    await store.put({"_id": "early"})
    mark = (await store.changes(0)).last_seq
    await store.put({"_id": "late"})
    after = [c.id for c in await all_changes(store, mark)]
    assert new_rows_by_id(after, ["early"]) == ["late"]  # "early" again: a replay


# -- local documents ------------------------------------------------------------------------------


def body_of(doc):
    return {k: v for k, v in doc.items() if not k.startswith("_")}


async def test_local_docs_round_trip_and_stay_out_of_the_feed(store):
    with pytest.raises(NotFound):
        await store.get_local("checkpoint")
    await store.put_local("checkpoint", {"seq": 5, "peer": "x"})
    doc = await store.get_local("checkpoint")
    assert doc["_id"] == "_local/checkpoint" and body_of(doc) == {"seq": 5, "peer": "x"}
    await store.put_local("checkpoint", {"seq": 9})
    assert body_of(await store.get_local("checkpoint")) == {"seq": 9}
    await assert_empty(store)
    await store.delete_local("checkpoint")
    with pytest.raises(NotFound):
        await store.get_local("checkpoint")
    with pytest.raises(NotFound):
        await store.delete_local("checkpoint")


async def test_put_with_a_local_id_stores_a_local_doc(store):
    rev0 = await store.put({"_id": "_local/marker", "v": 1})
    assert isinstance(rev0, str)
    assert body_of(await store.get_local("marker")) == {"v": 1}
    await assert_empty(store)


# -- stemming -------------------------------------------------------------------------------------


async def test_revs_limit_stems_history(backend, request, tmp_path):
    store = await open_backend(backend, request, tmp_path, revs_limit=3)
    try:
        assert store.revs_limit == 3
        revs = [await store.put({"_id": "doc", "v": 0})]
        for i in range(1, 6):
            revs.append(await store.put({"_id": "doc", "_rev": revs[-1], "v": i}))
        doc = await store.get("doc", revs=True)
        assert doc["_revisions"] == {"start": 6, "ids": [r.partition("-")[2] for r in revs[:2:-1]]}
        diff = await store.revs_diff({"doc": [revs[0], revs[-1]]})
        assert diff["doc"]["missing"] == [revs[0]]  # stemmed away: no longer known

        long = tuple(rev(i, f"h{i}") for i in range(10, 0, -1))
        await store.bulk_docs([replicated("other", long, v=10)], new_edits=False)
        [got] = await store.bulk_get([("other", long[0])])
        assert got["_revisions"] == history_of(long[:3])
    finally:
        await store.aclose()


# -- wait_for_change ------------------------------------------------------------------------------


async def test_wait_for_change_returns_at_once_when_behind(store):
    await store.put({"_id": "a"})
    with trio.fail_after(30):  # a hang guard, not a timing assertion
        await store.wait_for_change(0)


async def test_wait_for_change_wakes_on_a_write(store):
    await store.put({"_id": "a"})
    since = (await store.changes(0)).last_seq
    woke = trio.Event()

    async def waiter():
        await store.wait_for_change(since)
        woke.set()

    with trio.fail_after(30):  # a hang guard, not a timing assertion
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert not woke.is_set()
            await store.put_local("checkpoint", {"seq": 1})  # not a change of the feed
            await trio.testing.wait_all_tasks_blocked()
            assert not woke.is_set()
            await store.put({"_id": "b"})
            await woke.wait()


async def test_wait_for_change_is_cancellable(store):
    since = (await store.changes(0)).last_seq
    with trio.fail_after(30):  # a hang guard, not a timing assertion
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.wait_for_change, since)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    await store.put({"_id": "after"})  # the store still works
    # (a CouchDB cluster's feed may show a fresh write a moment late: ask until it does)
    with trio.fail_after(30):
        while not (seen := [c.id for c in await all_changes(store)]):
            await trio.sleep(0.1)
    assert seen == ["after"]


# -- bad input ------------------------------------------------------------------------------------

BAD_DOCS = [
    pytest.param(["not", "a", "dict"], id="list"),
    pytest.param("doc", id="string"),
    pytest.param(None, id="none"),
    pytest.param({"v": 1}, id="no-id"),
    pytest.param({"_id": 7}, id="int-id"),
    pytest.param({"_id": "_secret"}, id="underscore-id"),
    pytest.param({"_id": "a", "_unknown": 1}, id="unknown-field"),
    pytest.param({"_id": "a", "_attachments": ["not", "an", "object"]}, id="attachments"),
    pytest.param({"_id": "a", "_attachments": {"a/b": {"stub": True}}}, id="attachment-name"),
    pytest.param({"_id": "a", "_attachments": {"x": {"stub": True}}}, id="stub-of-nothing"),
]

BAD_REPLICATED = [
    pytest.param({"_rev": rev(2, "b"), "_revisions": {"start": 2, "ids": ["zz", "yy"]}}, id="hex"),
    pytest.param(
        {"_rev": rev(2, "b"), "_revisions": {"start": 0, "ids": [rev(2, "b")[2:]]}}, id="start-0"
    ),
    pytest.param(
        {"_rev": rev(2, "b"), "_revisions": {"start": 2, "ids": [rev(2, "x")[2:]]}},
        id="rev-mismatch",
    ),
    pytest.param(
        {"_rev": rev(1, "b"), "_revisions": {"start": 1, "ids": [rev(1, "b")[2:], "a" * 32]}},
        id="below-generation-1",
    ),
    pytest.param({"_rev": "2-xyz"}, id="bad-rev"),
    pytest.param({"_revisions": {"start": 1, "ids": [rev(1, "b")[2:]]}}, id="no-rev"),
]


@pytest.mark.parametrize("doc", BAD_DOCS)
async def test_put_of_a_bad_doc_is_a_bad_request_and_writes_nothing(store, doc):
    with pytest.raises(BadRequest):
        await store.put(doc)
    await assert_empty(store)


@pytest.mark.parametrize("fields", BAD_REPLICATED)
async def test_bad_revision_history_is_a_bad_request_and_writes_nothing(store, fields):
    [result] = await store.bulk_docs([{"_id": "doc", "v": 1, **fields}], new_edits=False)
    assert result["error"] == "bad_request" and result["reason"]
    await assert_empty(store)


async def test_one_bad_doc_does_not_stop_the_others(store):
    rev1 = await store.put({"_id": "old", "v": 1})
    await store.put({"_id": "old", "_rev": rev1, "v": 2})
    results = await store.bulk_docs(
        [
            {"_id": "good1", "v": 1},
            ["not a doc"],
            {"_id": "bad", "_nope": 1},
            {"_id": "old", "_rev": rev1, "v": 3},  # stale
            {"_id": "good2", "v": 2},
        ]
    )
    errors = [r.get("error") for r in results]
    assert errors == [None, "bad_request", "bad_request", "conflict", None]
    assert results[0]["id"] == "good1" and results[0]["ok"] and REV_FORMAT.match(results[0]["rev"])
    assert results[4]["id"] == "good2" and results[4]["ok"]
    assert results[3]["id"] == "old" and results[3]["reason"]
    assert [d["_id"] for d in await store.all_docs()] == ["good1", "good2", "old"]
    assert (await store.get("good2"))["_rev"] == results[4]["rev"]


async def test_one_bad_replicated_doc_does_not_stop_the_others(store):
    good = replicated("good", (rev(2, "b"), rev(1, "a")), v=1)
    forged = {"_id": "forged", "_rev": rev(2, "b"), "_revisions": {"start": 2, "ids": ["x"]}}
    bad_id = {"_id": "_bad", "_rev": rev(1, "a")}
    results = await store.bulk_docs([forged, good, bad_id], new_edits=False)
    assert [r.get("error") for r in results] == ["bad_request", None, "bad_request"]
    assert results[1] == {"id": "good", "rev": rev(2, "b"), "ok": True}
    assert [c.id for c in await all_changes(store)] == ["good"]


async def test_other_bad_arguments_are_bad_requests(store):
    await store.put({"_id": "doc"})
    with pytest.raises(BadRequest):
        await store.get("doc", rev="not-a-rev")
    with pytest.raises(BadRequest):
        await store.put_local("checkpoint", ["not", "a", "dict"])
    with pytest.raises(BadRequest):
        await store.put_local("checkpoint", {"_secret": 1})
    with pytest.raises(BadRequest):
        await store.revs_diff({"doc": ["not-a-rev"]})


# -- properties: random histories delivered in random orders --------------------------------------
# Every revision arrives with its full history here. Truncated histories (as from a stemmed
# peer) are checked on SQLite only (test_sqlite_backend.py): pouchdb-server does not join two
# pieces of a tree that a later path bridges, which CouchDB's key-tree merge does.

PROPERTY_SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@st.composite
def deliveries(draw, *, partial: bool):
    """Docs with random revision forests, each revision delivered once (some twice) with its
    history (cut short at random when `partial`), in a random order and random batches."""
    forests = {f"doc{i}": draw(rev_forests()) for i in range(draw(st.integers(1, 3)))}
    docs = []
    for doc_id, nodes in forests.items():
        for node_rev, (_, deleted) in nodes.items():
            path = full_path(nodes, node_rev)
            if partial:
                path = path[: draw(st.integers(1, len(path)))]
            docs.append(replicated(doc_id, path, deleted=deleted, v=node_rev))
    docs = draw(st.permutations(docs))
    docs += draw(st.lists(st.sampled_from(docs), max_size=3))  # re-deliveries: no-ops
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(docs) - 1)), max_size=4)))
    return [docs[i:j] for i, j in zip([0, *cuts], [*cuts, len(docs)]) if docs[i:j]]


def model_of(batches) -> dict[str, RevTree]:
    trees: dict[str, RevTree] = {}
    for batch in batches:
        for doc in batch:
            start, ids = doc["_revisions"]["start"], doc["_revisions"]["ids"]
            path = tuple(f"{start - i}-{h}" for i, h in enumerate(ids))
            trees.setdefault(doc["_id"], RevTree()).merge(path, doc.get("_deleted", False))
    return trees


async def assert_store_matches_model(store, batches):
    for batch in batches:
        results = await store.bulk_docs(batch, new_edits=False)
        assert all(r.get("ok") for r in results), results
    model = model_of(batches)
    changes = {c.id: c for c in await all_changes(store)}
    assert set(changes) == set(model)
    for doc_id, tree in model.items():
        leaves = tree.leaves()
        winner = leaves[0]
        change = changes[doc_id]
        assert change.revs[0] == winner.rev, f"{store.backend}: winner of {doc_id}"
        assert set(change.revs) == {leaf.rev for leaf in leaves}, f"{store.backend}: leaves"
        assert change.deleted == winner.deleted
        if winner.deleted:
            with pytest.raises(NotFound):
                await store.get(doc_id)
        else:
            doc = await store.get(doc_id, conflicts=True)
            assert doc["_rev"] == winner.rev and doc["v"] == winner.rev
            assert doc.get("_conflicts", []) == tree.conflicts(), f"{store.backend}: conflicts"
        for leaf in leaves:
            doc = await store.get(doc_id, rev=leaf.rev)
            assert doc.get("_deleted", False) == leaf.deleted
            assert doc.get("v", leaf.rev) == leaf.rev


@PROPERTY_SETTINGS
@given(data=st.data())
async def test_random_histories_match_the_model(backend, request, tmp_path, data):
    batches = data.draw(deliveries(partial=False))
    store = await open_backend(backend, request, tmp_path)
    try:
        await assert_store_matches_model(store, batches)
    finally:
        await store.aclose()


@PROPERTY_SETTINGS
@given(data=st.data())
async def test_random_histories_agree_across_backends(request, tmp_path, data):
    batches = data.draw(deliveries(partial=False))
    stores = [
        await open_backend("sqlite", request, tmp_path),
        await open_backend("couchdb", request, tmp_path),
    ]
    try:
        for store in stores:
            await assert_store_matches_model(store, batches)
        sqlite_changes, couch_changes = [
            {c.id: (c.revs[0], frozenset(c.revs), c.deleted) for c in await all_changes(s)}
            for s in stores
        ]
        assert sqlite_changes == couch_changes
    finally:
        for store in stores:
            await store.aclose()
