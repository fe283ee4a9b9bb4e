"""A document's leaves are capped (`MAX_LEAVES`): a write member that floods one doc with
sibling revisions gets a per-doc `forbidden` result for the revisions over the cap, the rest
of its batch is written, and the node is not blocked for minutes.

Seen on real nodes: 9,000 siblings of one doc in one `bulk_docs(new_edits=False)` blocked
the node for 77 s (stemming and leaf listing were O(revisions) per merged revision) and then
stored 8,999 conflicts."""

import hashlib

import trio

from plugshare.store.base import MAX_LEAVES
from plugshare.store.revtree import history_of
from tests.store.conftest import open_backend

FLOOD = 9000
HANG_GUARD = 300  # seconds; a hang guard, not a timing assertion


def rev(pos: int, tag: str) -> str:
    return f"{pos}-{hashlib.md5(tag.encode()).hexdigest()}"


def replicated(doc_id, path, **body):
    return {"_id": doc_id, "_rev": path[0], "_revisions": history_of(path), **body}


ROOT = rev(1, "root")


def sibling(i: int) -> dict:
    return replicated("flooded", (rev(2, f"sibling-{i}"), ROOT), n=i)


async def leaves_of(store, doc_id):
    [change] = [c for c in (await store.changes(0)).results if c.id == doc_id]
    return change.revs


async def test_a_flood_of_siblings_is_capped_per_doc(backend, request, tmp_path):
    store = await open_backend(backend, request, tmp_path)
    try:
        good = [replicated(f"good-{k}", (rev(1, f"good-{k}"),), k=k) for k in range(4)]
        batch = [good[0], *(sibling(i) for i in range(FLOOD // 2)), good[1], good[2],
                 *(sibling(i) for i in range(FLOOD // 2, FLOOD)), good[3]]
        with trio.fail_after(HANG_GUARD):
            results = await store.bulk_docs(batch, new_edits=False)

        assert len(results) == len(batch)
        by_id = {}
        for doc, result in zip(batch, results):
            assert result["id"] == doc["_id"] and result["rev"] == doc["_rev"]
            by_id.setdefault(doc["_id"], []).append(result)
        for k in range(4):
            assert by_id[f"good-{k}"] == [{"id": f"good-{k}", "rev": rev(1, f"good-{k}"),
                                           "ok": True}]
            assert (await store.get(f"good-{k}"))["k"] == k
        flooded = by_id["flooded"]
        accepted = [r for r in flooded if r.get("ok")]
        refused = [r for r in flooded if not r.get("ok")]
        assert len(accepted) == MAX_LEAVES  # the first ones, in batch order
        assert [r["rev"] for r in accepted] == [sibling(i)["_rev"] for i in range(MAX_LEAVES)]
        assert len(refused) == FLOOD - MAX_LEAVES
        assert all(r["error"] == "forbidden" and str(MAX_LEAVES) in r["reason"] for r in refused)
        assert all(set(r) == {"id", "rev", "error", "reason"} for r in refused)

        stored = await leaves_of(store, "flooded")
        assert len(stored) == MAX_LEAVES
        assert set(stored) == {r["rev"] for r in accepted}
        doc = await store.get("flooded", conflicts=True)
        assert len(doc["_conflicts"]) == MAX_LEAVES - 1
    finally:
        await store.aclose()


async def test_a_capped_doc_still_takes_known_revisions_and_edits_of_its_leaves(
    backend, request, tmp_path
):
    store = await open_backend(backend, request, tmp_path)
    try:
        await store.bulk_docs([sibling(i) for i in range(MAX_LEAVES)], new_edits=False)
        first = sibling(0)["_rev"]
        again = await store.bulk_docs([sibling(0)], new_edits=False)  # known: a no-op
        assert again == [{"id": "flooded", "rev": first, "ok": True}]
        child = replicated("flooded", (rev(3, "child"), first, ROOT), n="child")
        [extended] = await store.bulk_docs([child], new_edits=False)  # replaces a leaf
        assert extended == {"id": "flooded", "rev": child["_rev"], "ok": True}
        [local_edit] = await store.bulk_docs(
            [{"_id": "flooded", "_rev": sibling(1)["_rev"], "n": "edited"}]
        )
        assert local_edit.get("ok"), local_edit
        [refused] = await store.bulk_docs([sibling(MAX_LEAVES)], new_edits=False)
        assert refused["error"] == "forbidden" and refused["rev"] == sibling(MAX_LEAVES)["_rev"]
        stored = await leaves_of(store, "flooded")
        assert len(stored) == MAX_LEAVES and child["_rev"] in stored and first not in stored
    finally:
        await store.aclose()
