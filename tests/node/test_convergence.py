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

from tests.node.chaos import Chaos, problems, run_chaos

SEED_ENV = "PLUGSHARE_CONVERGE_SEED"

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


def test_converges_under_every_fault(tmp_path):
    """Everything at once, the whole of issue #10: the same, and the CouchDB server under node
    c cut (SIGKILL or SIGTERM) and restarted after the node kills, io.tasks docs edited into
    and out of the selector share's scope, and attempts to change a shared doc's doctype
    (refused), from every node."""
    _check(tmp_path, attrs.evolve(BASE, couchdb_cuts=2, scope_change=10, doctype_change=4))
