"""Bookkeeping of work a stranger can start on the peer port (pure: no I/O, no clock).

A handshake that has not completed, or a link whose peer is only joining, holds a socket and a
task for someone nobody vouched for yet. `Admission` bounds how many of them are held: at most
`per_source` for one source address and `total` overall. A newcomer is always admitted; to
make room the oldest of its own source is evicted first, then the oldest overall. So idle
sockets cannot lock the door: whoever holds them must keep opening new ones faster than an
honest peer completes its handshake, and one address can only ever evict its own.

Each admitted item gets a ticket; the caller maps tickets to what it cancels (a cancel scope),
cancels the evicted ones, and releases its ticket when the item ends (completed or not).
"""

from __future__ import annotations

from collections import OrderedDict

import attrs

__all__ = ["Admission", "Admitted"]


@attrs.frozen
class Admitted:
    """The newcomer's ticket, and the tickets to cancel to make room for it (oldest first)."""

    ticket: int
    evicted: tuple[int, ...] = ()


class Admission:
    def __init__(self, *, per_source: int, total: int) -> None:
        if per_source < 1 or total < 1:
            raise ValueError("the limits must be at least 1")
        self.per_source = per_source
        self.total = total
        self._next = 0
        self._held: OrderedDict[int, str] = OrderedDict()  # ticket -> source, oldest first
        self._by_source: dict[str, OrderedDict[int, None]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def held_by(self, source: str) -> int:
        return len(self._by_source.get(source, ()))

    def admit(self, source: str) -> Admitted:
        evicted: list[int] = []
        mine = self._by_source.get(source)
        if mine is not None and len(mine) >= self.per_source:
            evicted.append(next(iter(mine)))
            self.release(evicted[-1])
        if len(self._held) >= self.total:
            evicted.append(next(iter(self._held)))
            self.release(evicted[-1])
        ticket = self._next
        self._next += 1
        self._held[ticket] = source
        self._by_source.setdefault(source, OrderedDict())[ticket] = None
        return Admitted(ticket, tuple(evicted))

    def release(self, ticket: int) -> None:
        """Forget `ticket` (idempotent: an evicted ticket is already gone)."""
        source = self._held.pop(ticket, None)
        if source is None:
            return
        mine = self._by_source[source]
        del mine[ticket]
        if not mine:
            del self._by_source[source]
