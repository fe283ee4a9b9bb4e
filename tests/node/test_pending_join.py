"""A join whose owner is offline waits for it (issue #11 item 12): `share accept` answers
"pending" rather than failing, the node retries by itself (back-off, and at once when the owner
shows up) until the invitation expires, and the join completes with no further command. A code
the owner refuses still fails at once.

The bookkeeping (`plugshare.node.pending_joins`) is pure and tested alone first; then real
nodes over real sockets (tests/node/cluster.py)."""

from __future__ import annotations

import json

import pytest

from plugshare.node.pending_joins import (
    PENDING_STATE,
    PendingJoins,
    RetryPolicy,
    TooManyPendingJoins,
)
from plugshare.node.watch import SHARE_COLUMNS, share_rows
from tests.node.cluster import ApiError, cluster, wait_until  # noqa: F401  (fixture)

OWNER = b"\x01" * 32
OTHER = b"\x02" * 32


# -- the bookkeeping, alone -------------------------------------------------------------------


def test_retry_policy_doubles_from_two_seconds_up_to_a_minute():
    policy = RetryPolicy()
    assert [policy.delay(n) for n in range(1, 9)] == [2, 4, 8, 16, 32, 60, 60, 60]
    assert policy.delay(10_000) == 60  # no overflow however long it waits


def _add(book: PendingJoins, share: str = "s1", owner: bytes = OWNER, now: float = 1000.0,
         expires_at: float = 2000.0, code: str = "code-1"):
    return book.add(share_id=share, code=code, credential="cred", as_name=None, owner=owner,
                    expires_at=expires_at, reason="refused", now=now)


def test_a_pending_join_backs_off_and_is_due_when_its_time_comes():
    book = PendingJoins()
    join = _add(book)
    assert book.due(1000.0) == [] and book.next_wake(1000.0) == 2.0
    assert book.due(1002.0) == [join]
    book.failed(join, "still refused", 1002.0)
    assert join.tries == 2 and join.next_try == 1006.0 and join.reason == "still refused"
    row = join.to_json()
    assert row["state"] == PENDING_STATE and "code" not in row and "credential" not in row
    assert "code-1" not in json.dumps(row) and "cred" not in json.dumps(row)


def test_an_owner_seen_elsewhere_makes_its_joins_due_at_once():
    book = PendingJoins()
    mine, other = _add(book, "s1", OWNER), _add(book, "s2", OTHER)
    assert book.hurry(OWNER, 1000.5)
    assert book.due(1000.5) == [mine] and other.next_try > 1000.5
    assert not book.hurry(OWNER, 1000.5)  # due already: nothing more to hurry


def test_expired_joins_are_dropped_and_the_book_is_bounded():
    book = PendingJoins(limit=2)
    _add(book, "s1", expires_at=1500.0)
    _add(book, "s2", expires_at=3000.0)
    with pytest.raises(TooManyPendingJoins):
        _add(book, "s3")
    again = _add(book, "s2", code="code-2")  # a newer code for a share waited for already
    assert len(book) == 2 and book.get("s2") is again
    assert book.next_wake(1001.0) == 1.0  # the next try...
    assert PendingJoins().next_wake(0.0) is None
    soon = PendingJoins()
    _add(soon, expires_at=1001.5)
    assert soon.next_wake(1000.0) == 1.5  # ...or an expiry before it wakes the loop
    assert [j.share_id for j in book.drop_expired(1500.0)] == ["s1"]
    assert [j.share_id for j in book.all()] == ["s2"]
    assert book.next_wake(5000.0) == 0.0
    book.remove("s2")
    assert book.next_wake(5000.0) is None and book.owners() == set()


def test_watch_shows_a_pending_join_as_a_share_row():
    status = {"shares": [], "pending_joins": [
        {"share": "s1", "state": PENDING_STATE, "reason": "refused", "expires_at": 2000.0}]}
    [row] = share_rows(status, 1000.0)
    assert row[0] == "s1" and row[-1] == PENDING_STATE
    assert len(row) == len(SHARE_COLUMNS)


# -- real nodes -------------------------------------------------------------------------------


def _joins(node) -> list[dict]:
    return node.cli_json("share", "joins")["joins"]


def _invite(owner, *args: str) -> str:
    return owner.cli_json("share", "invite", "notes", *args)["code"]


def test_accept_with_the_owner_offline_waits_and_joins_when_it_is_back(cluster):
    alice, bob = cluster.add("alice"), cluster.add("bob")
    alice.cli_json("share", "create", "notes", "--doctype", "io.notes")
    alice.put("io.notes", {"title": "written before bob joined"}, "n1")
    code = _invite(alice)
    alice.stop()

    done = bob.cli("share", "accept", code)
    assert done.returncode == 0, done.stderr
    assert "pending" in done.stdout and "unreachable" in done.stdout
    assert "plugshare share joins" in done.stdout and "restart forgets" in done.stdout
    answer = bob.api("POST", "/join", json={"code": code})  # again: the same answer
    assert answer["pending"] is True and answer["state"] == PENDING_STATE
    share_id = answer["share"]
    [listed] = _joins(bob)
    assert listed["share"] == share_id and listed["state"] == PENDING_STATE
    assert PENDING_STATE in bob.cli_ok("share", "list")
    assert bob.api("GET", "/shares")["pending"][0]["share"] == share_id
    assert PENDING_STATE in bob.cli_ok("share", "show", share_id)
    assert bob.status()["pending_joins"][0]["share"] == share_id

    alice.start()  # same peer port as in the invitation; no command on bob
    wait_until(lambda: bob.get("n1"), timeout=120, what="alice's doc to reach bob")
    assert bob.share("notes")["status"] == "active"
    assert _joins(bob) == []
    assert "notes" in bob.cli_ok("share", "list") and PENDING_STATE not in bob.cli_ok(
        "share", "list")
    with pytest.raises(ApiError) as refused:  # a member now: the code admits no one again
        bob.api("POST", "/join", json={"code": code})
    assert refused.value.status == 409


def test_a_pending_join_is_dropped_when_its_invitation_expires(cluster):
    alice, bob = cluster.add("alice"), cluster.add("bob")
    alice.cli_json("share", "create", "notes", "--doctype", "io.notes")
    code = _invite(alice, "--ttl", "20s")
    alice.stop()
    answer = bob.cli_json("share", "accept", code)
    assert answer["pending"] is True
    assert [j["share"] for j in _joins(bob)] == [answer["share"]]
    wait_until(lambda: _joins(bob) == [], timeout=90, what="the expired join to be dropped")
    assert "expired" in bob.log()
    assert bob.api("GET", "/shares") == {"shares": [], "pending": []}


def test_a_pending_join_can_be_cancelled(cluster):
    alice, bob = cluster.add("alice"), cluster.add("bob")
    alice.cli_json("share", "create", "notes", "--doctype", "io.notes")
    code = _invite(alice)
    alice.stop()
    share_id = bob.cli_json("share", "accept", code)["share"]
    out = bob.cli_ok("share", "joins", "--cancel", share_id)
    assert "cancelled" in out and _joins(bob) == []
    again = bob.cli("--json", "share", "joins", "--cancel", share_id)
    assert again.returncode == 1 and json.loads(again.stdout)["error"] == "not_found"


def test_a_code_the_owner_refuses_fails_at_once(cluster):
    alice, bob = cluster.add("alice"), cluster.add("bob")
    alice.cli_json("share", "create", "notes", "--doctype", "io.notes")
    code = _invite(alice)
    alice.cli_json("share", "invite", "notes", "--cancel", code)
    done = bob.cli("--json", "share", "accept", code)
    assert done.returncode == 1, done.stdout
    assert json.loads(done.stdout)["error"] != "unreachable"
    assert _joins(bob) == []
