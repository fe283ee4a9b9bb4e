"""Three real nodes converge under faults (issue #10): shares of each kind (doctype, selector,
encrypted), random writes, edits, deletions and conflicting edits from every side, nodes
SIGKILLed and restarted, the CouchDB server cut under one of them; once everything is back and
quiet, every member holds the same revision trees, every acknowledged write is there (winner,
conflict or ancestor), and nothing crossed outside a share's scope. See tests/node/chaos.py.

The seed comes from PLUGSHARE_CONVERGE_SEED, or is drawn at random; a failure names it:
    PLUGSHARE_CONVERGE_SEED=1234 python -m pytest tests/node/test_convergence.py

`test_converges_under_node_kills` passes on main. The other three wait for fixes being made in
parallel and are strict expected failures until the switches below are flipped: each fault or
op kind is a field of `Chaos` (tests/node/chaos.py), 0 turning it off.
"""

from __future__ import annotations

import os
import random

import attrs
import pytest

from tests.node.chaos import Chaos, problems, run_chaos

SEED_ENV = "PLUGSHARE_CONVERGE_SEED"

# Switches for the lead to flip once the fixes they wait for are merged:
# - RECOVERY_FIXED: a sync stream survives a store error (the CouchDB server going away and
#   coming back) instead of dying for good.
# - SCOPE_FIXED: a doc edited out of a share's scope leaves its members too. (A shared doc's
#   doctype cannot be changed already: those attempts are refused on main, and stay in.)
RECOVERY_FIXED = False
SCOPE_FIXED = False


def _seed() -> int:
    value = os.environ.get(SEED_ENV)
    return int(value) if value else random.SystemRandom().randrange(2**32)


def _check(tmp_path, chaos: Chaos) -> None:
    seed = _seed()
    try:
        outcome = run_chaos(tmp_path, seed, chaos)
    except Exception as exc:  # a node that would not start, an API error...: name the seed too
        exc.add_note(f"seed {seed} ({SEED_ENV}={seed} to replay the plan)")
        raise
    found = problems(outcome)
    print("\n".join(outcome.log))
    assert not found, (f"{len(found)} problem(s) with seed {seed} "
                       f"({SEED_ENV}={seed} to replay the plan):\n" + "\n".join(found[:40]))


BASE = Chaos()


def test_converges_under_node_kills(tmp_path):
    """Writes, edits, deletions and conflicts from every node, nodes SIGKILLed at random."""
    _check(tmp_path, BASE)


# While a fix is missing its test is an expected failure; it waits less for a quiesce that
# cannot come, so the expected failure costs CI seconds, not minutes.
EXPECTED_FAILURE_QUIESCE = 20.0


def _variant(fixed: bool, **changes) -> Chaos:
    return attrs.evolve(BASE, **changes,
                        **({} if fixed else {"quiesce_timeout": EXPECTED_FAILURE_QUIESCE}))


@pytest.mark.xfail(not RECOVERY_FIXED, strict=True,
                   reason="recovery: a sync stream ends for good on a store error")
def test_converges_through_couchdb_outages(tmp_path):
    """The same, and the CouchDB server under node c cut (SIGKILL or SIGTERM) and restarted,
    after the node kills."""
    _check(tmp_path, _variant(RECOVERY_FIXED, couchdb_cuts=2))


@pytest.mark.xfail(not SCOPE_FIXED, strict=True,
                   reason="scope: a doc edited out of a share's scope stays on its members")
def test_converges_through_scope_changes(tmp_path):
    """The same, and io.tasks docs edited into and out of the selector share's scope, and
    attempts to change a shared doc's doctype (refused), from every node."""
    _check(tmp_path, _variant(SCOPE_FIXED, scope_change=10, doctype_change=4))


@pytest.mark.xfail(not (RECOVERY_FIXED and SCOPE_FIXED), strict=True,
                   reason="needs both the recovery and the scope fixes")
def test_converges_under_every_fault(tmp_path):
    """Everything at once: the whole of issue #10."""
    _check(tmp_path, _variant(RECOVERY_FIXED and SCOPE_FIXED, couchdb_cuts=2,
                              scope_change=10, doctype_change=4))
