"""The pending-work bookkeeping of the peer port (pure)."""

import pytest

from plugshare.replication.admission import Admission


def test_admits_within_the_limits_and_evicts_nothing():
    admission = Admission(per_source=2, total=3)
    tickets = [admission.admit(source).ticket for source in ("a", "a", "b")]
    assert len(set(tickets)) == 3 and len(admission) == 3
    assert admission.held_by("a") == 2 and admission.held_by("b") == 1


def test_a_source_at_its_limit_evicts_its_own_oldest_not_anyone_elses():
    admission = Admission(per_source=2, total=10)
    b = admission.admit("b").ticket
    a1, a2 = admission.admit("a").ticket, admission.admit("a").ticket
    third = admission.admit("a")
    assert third.evicted == (a1,)
    assert admission.held_by("a") == 2 and admission.held_by("b") == 1
    assert admission.admit("a").evicted == (a2,)
    assert b not in admission.admit("c").evicted


def test_the_total_limit_evicts_the_oldest_overall():
    admission = Admission(per_source=5, total=3)
    first = admission.admit("a").ticket
    admission.admit("b")
    admission.admit("c")
    newcomer = admission.admit("d")
    assert newcomer.evicted == (first,) and len(admission) == 3
    assert admission.held_by("a") == 0


def test_release_frees_room_and_is_idempotent():
    admission = Admission(per_source=1, total=1)
    ticket = admission.admit("a").ticket
    admission.release(ticket)
    admission.release(ticket)
    assert len(admission) == 0
    assert admission.admit("a").evicted == ()


def test_many_sockets_from_one_source_hold_at_most_its_share():
    admission = Admission(per_source=8, total=64)
    evicted = [t for _ in range(1000) for t in admission.admit("10.0.0.1").evicted]
    assert len(admission) == 8 and len(evicted) == 992
    assert admission.admit("10.0.0.2").evicted == ()


def test_limits_must_make_sense():
    with pytest.raises(ValueError):
        Admission(per_source=0, total=4)
    with pytest.raises(ValueError):
        Admission(per_source=5, total=0)
