"""The relay's bounds (pure: no I/O; time is passed in).

`RelayLimits` is every number an outsider could make the relay spend; `TokenBucket` paces
bytes per second; `Counts` tracks how many of something each key (a source address, a node id)
holds, refusing past a cap.
"""

from __future__ import annotations

from collections import Counter

import attrs

__all__ = ["Counts", "RelayLimits", "TokenBucket"]


@attrs.frozen
class RelayLimits:
    """Connections, sessions and bandwidth one relay gives out (counts, seconds, bytes/s)."""

    max_connections: int = 1024  # open TCP connections in all; beyond, closed without a word
    connections_per_source: int = 32  # open connections from one IP address
    joins_per_node: int = 4  # control connections one node id keeps; a new one drops the oldest
    sessions_per_node: int = 32  # pending and paired sessions that involve one node id
    max_pending_sessions: int = 256  # sessions granted, not yet paired
    pending_per_source: int = 8  # ...asked for from one source address
    pending_per_node: int = 8  # ...for one node id; when full, a new dialer takes over the slot of
    # the oldest session of the source holding the most (dialers are anonymous: no waiting it out)
    pending_per_source_per_node: int = 2  # ...asked for from one source address for one node id
    max_sessions: int = 512  # paired sessions in all
    pending_timeout: float = 5.0  # an unpaired half waits this long for the other
    handshake_timeout: float = 10.0  # TLS and the first message of a connection
    keepalive: float = 20.0  # ping a joined node this often; drop it after 3 silent periods
    session_rate: int = 32 * 1024 * 1024  # bytes/s forwarded in each direction of a session
    source_rate: int = 64 * 1024 * 1024  # bytes/s forwarded from one source address
    burst: int = 1024 * 1024  # bytes a bucket may hold

    def __attrs_post_init__(self) -> None:
        for field in attrs.fields(type(self)):
            if not getattr(self, field.name) > 0:
                raise ValueError(f"{field.name} must be positive, got {getattr(self, field.name)}")


class TokenBucket:
    """`rate` tokens per second, up to `burst`. `take(n, now)` spends n tokens (the balance may
    go negative) and returns how long to wait before going on, so a sender is paced at `rate`
    on average and never more than `burst` ahead."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = now

    def take(self, amount: int, now: float) -> float:
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= amount
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class Counts:
    """How many each key holds, with a cap per key."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._held: Counter[object] = Counter()

    def __getitem__(self, key: object) -> int:
        return self._held[key]

    def try_add(self, key: object) -> bool:
        if self._held[key] >= self.cap:
            return False
        self._held[key] += 1
        return True

    def remove(self, key: object) -> None:
        self._held[key] -= 1
        if self._held[key] <= 0:
            del self._held[key]
