"""The convergence checks themselves (tests/node/chaos.py `problems`), on made-up outcomes: each
kind of breakage is reported, and a converged outcome is not. No nodes run here."""

from __future__ import annotations

from tests.node.chaos import HEALTH, NOTES, PRIVATE, TASKS, Chaos, Leaf, Outcome, Write, problems


def _leaf(*history: str, deleted: bool = False) -> Leaf:
    return Leaf(history[0], deleted, history)


def _outcome(writes: list[Write], trees: dict) -> Outcome:
    full = {name: trees.get(name, {}) for name in ("a", "b", "c")}
    doctypes = {name: {i: i.split("~")[0] for i in tree} for name, tree in full.items()}
    return Outcome(0, Chaos(), writes, full, doctypes, [])


NOTE = f"{NOTES}~a~0"
NOTE_WRITES = [Write(NOTE, "a", NOTES, {"n": 1}, False, "1-x"),
               Write(NOTE, "b", NOTES, {"n": 2}, False, "2-y")]
NOTE_TREE = (_leaf("2-y", "1-x"),)


def test_a_converged_outcome_has_no_problem():
    trees = {name: {NOTE: NOTE_TREE} for name in "abc"}
    assert problems(_outcome(NOTE_WRITES, trees)) == []


def test_members_with_different_leaves_have_diverged():
    trees = {"a": {NOTE: NOTE_TREE}, "b": {NOTE: NOTE_TREE},
             "c": {NOTE: (_leaf("2-y", "1-x"), _leaf("2-z", "1-x"))}}
    assert [p.split(" ")[0] for p in problems(_outcome(NOTE_WRITES, trees))] == ["diverged"]


def test_a_leaf_deleted_on_one_member_only_has_diverged():
    trees = {"a": {NOTE: NOTE_TREE}, "b": {NOTE: NOTE_TREE},
             "c": {NOTE: (_leaf("2-y", "1-x", deleted=True),)}}
    assert [p.split(" ")[0] for p in problems(_outcome(NOTE_WRITES, trees))] == ["diverged"]


def test_an_acknowledged_write_missing_everywhere_is_lost():
    writes = NOTE_WRITES + [Write(NOTE, "c", NOTES, {"n": 3}, False, "3-w")]
    trees = {name: {NOTE: NOTE_TREE} for name in "abc"}
    found = problems(_outcome(writes, trees))
    assert len(found) == 3 and all(p.startswith("lost") for p in found), found


def test_a_private_doc_on_another_node_crossed():
    doc = f"{PRIVATE}~a~1"
    writes = [Write(doc, "a", PRIVATE, {}, False, "1-p")]
    trees = {"a": {doc: (_leaf("1-p"),)}, "b": {doc: (_leaf("1-p"),)}}
    assert [p.split(" ")[0] for p in problems(_outcome(writes, trees))] == ["crossed:"]


def test_a_share_doc_on_a_node_outside_the_share_crossed():
    doc = f"{HEALTH}~b~1"  # health: b and c only
    writes = [Write(doc, "b", HEALTH, {}, False, "1-h")]
    trees = {name: {doc: (_leaf("1-h"),)} for name in "abc"}
    assert [p.split(" ")[0] for p in problems(_outcome(writes, trees))] == ["crossed:"]


def test_an_out_of_scope_version_on_a_member_crossed():
    doc = f"{TASKS}~a~1"
    writes = [Write(doc, "a", TASKS, {"shared": True}, False, "1-t"),
              Write(doc, "a", TASKS, {"shared": False}, False, "2-t")]
    trees = {name: {doc: (_leaf("2-t", "1-t"),)} for name in "abc"}
    found = problems(_outcome(writes, trees))
    assert found and all(p.startswith("crossed:") for p in found), found


def test_a_member_still_serving_what_left_the_scope_is_stale():
    doc = f"{TASKS}~a~1"
    writes = [Write(doc, "a", TASKS, {"shared": True}, False, "1-t"),
              Write(doc, "a", TASKS, {"shared": False}, False, "2-t")]
    trees = {"a": {doc: (_leaf("2-t", "1-t"),)}, "b": {doc: (_leaf("1-t"),)},
             "c": {doc: (_leaf("3-r", "2-t", "1-t", deleted=True),)}}
    found = problems(_outcome(writes, trees))
    assert [p.split(" ")[0] for p in found] == ["stale:"] and " b " in found[0], found
