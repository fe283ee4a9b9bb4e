"""Joins waiting for an offline owner (pure: no I/O, the clock is given).

`share accept` with the share's owner unreachable (no address of the invitation answers) does
not fail: the join is kept here and retried with back-off, and at once when the owner's
address becomes known another way (LAN discovery, a link it opens), until the invitation
expires. An owner that answers and refuses the code ends the join for good: only
unreachability is waited out.

The invitation code is a single-use secret: pending joins live in the node's memory only, and
a node restart forgets them (the code may then be accepted again).
"""

from __future__ import annotations

import attrs

from plugshare.errors import PlugshareError
from plugshare.token import format_node_id

MAX_PENDING_JOINS = 32  # joins one node waits for at once; the API is the owner's alone
PENDING_STATE = "pending (owner unreachable, retrying)"


class TooManyPendingJoins(PlugshareError):
    """This node already waits for MAX_PENDING_JOINS owners."""

    status = 429
    error = "too_many_requests"


@attrs.frozen
class RetryPolicy:
    """Seconds between two tries: `first`, doubling after each failed try, at most `cap`."""

    first: float = 2.0
    cap: float = 60.0

    def delay(self, failed_tries: int) -> float:
        """The wait after `failed_tries` (>= 1) tries that could not reach the owner."""
        return min(self.cap, self.first * 2 ** max(0, min(failed_tries - 1, 32)))


@attrs.define(eq=False)
class PendingJoin:
    """One join waiting for its share's owner."""

    share_id: str
    code: str = attrs.field(repr=False)  # the single-use secret: never shown
    credential: str = attrs.field(repr=False)  # the owner's, who asked for the join
    as_name: str | None
    owner: bytes
    expires_at: float  # the invitation's expiry (unix time)
    reason: str  # why the last try failed
    since: float
    tries: int = 1
    next_try: float = 0.0

    def to_json(self) -> dict:
        return {"share": self.share_id, "owner": format_node_id(self.owner),
                "state": PENDING_STATE, "reason": self.reason, "since": self.since,
                "expires_at": self.expires_at, "tries": self.tries,
                "next_try": self.next_try}


class PendingJoins:
    """The pending joins of one node, by share id, and when each is tried next."""

    def __init__(self, policy: RetryPolicy = RetryPolicy(), limit: int = MAX_PENDING_JOINS):
        self.policy = policy
        self.limit = limit
        self._joins: dict[str, PendingJoin] = {}

    def __len__(self) -> int:
        return len(self._joins)

    def get(self, share_id: str) -> PendingJoin | None:
        return self._joins.get(share_id)

    def all(self) -> list[PendingJoin]:
        return sorted(self._joins.values(), key=lambda j: j.since)

    def add(self, *, share_id: str, code: str, credential: str, as_name: str | None,
            owner: bytes, expires_at: float, reason: str, now: float) -> PendingJoin:
        """Wait for the owner of `share_id` (a newer code for the same share replaces the
        older one); the first retry comes after the policy's first delay."""
        if share_id not in self._joins and len(self._joins) >= self.limit:
            raise TooManyPendingJoins(
                f"this node already waits for {self.limit} joins; cancel one first "
                "(plugshare share joins --cancel SHARE)")
        join = PendingJoin(share_id=share_id, code=code, credential=credential,
                           as_name=as_name, owner=owner, expires_at=expires_at,
                           reason=reason, since=now, next_try=now + self.policy.delay(1))
        self._joins[share_id] = join
        return join

    def remove(self, share_id: str) -> PendingJoin | None:
        return self._joins.pop(share_id, None)

    def failed(self, join: PendingJoin, reason: str, now: float) -> None:
        """Another try could not reach the owner: back off further."""
        join.tries += 1
        join.reason = reason
        join.next_try = now + self.policy.delay(join.tries)

    def hurry(self, owner: bytes, now: float) -> bool:
        """The owner's address became known another way: try its joins now. True if any."""
        hurried = False
        for join in self._joins.values():
            if join.owner == owner and join.next_try > now:
                join.next_try = now
                hurried = True
        return hurried

    def drop_expired(self, now: float) -> list[PendingJoin]:
        """Remove and return the joins whose invitation has expired."""
        gone = [j for j in self._joins.values() if j.expires_at <= now]
        for join in gone:
            del self._joins[join.share_id]
        return gone

    def due(self, now: float) -> list[PendingJoin]:
        return [j for j in self.all() if j.next_try <= now]

    def owners(self) -> set[bytes]:
        return {j.owner for j in self._joins.values()}

    def next_wake(self, now: float) -> float | None:
        """Seconds until a join is due or expires; None with no pending join."""
        if not self._joins:
            return None
        soonest = min(min(j.next_try, j.expires_at) for j in self._joins.values())
        return max(0.0, soonest - now)
