"""When a replication stream that ended for a passing cause starts again (pure, sans-I/O).

A stream ends either for good (the peer refused the share, a member was revoked, the peer broke
the protocol) or for a cause that passes by itself: the store's server restarted or is out of
reach, the token process is being restarted by its supervisor, a cut long-poll. The replicator
classifies each end (`Ending`) and, for a passing one, starts the stream again from its
checkpoint after `StreamRetry.next_delay()`: an exponential back-off (0.5 s doubling to 30 s by
default, with some jitter) that starts over once a restarted stream has done useful work
(`succeeded`), so a store that is down for an hour costs a request every 30 s, and one that
blinked costs half a second.
"""

from __future__ import annotations

import random

import attrs

from plugshare.errors import PlugshareError
from plugshare.replication.backoff import Backoff
from plugshare.replication.protocol import PeerEndedStream, ProtocolError
from plugshare.store.base import StoreError

__all__ = ["STREAM_BACKOFF", "Ending", "GateRefused", "GateUnavailable", "StreamRetry", "ending_of"]

STREAM_BACKOFF = Backoff(initial=0.5, maximum=30.0, multiplier=2.0, jitter=0.2)


class GateUnavailable(PlugshareError):
    """The gate cannot decide right now (e.g. the token process is restarting): the stream
    ends and is started again later."""


class GateRefused(PlugshareError):
    """The gate refuses the whole batch for a reason that will not pass (e.g. the peer is no
    longer a member): the stream ends for good."""


@attrs.frozen
class Ending:
    """Why a stream ended, and whether the cause passes by itself (then it is retried)."""

    reason: str
    passing: bool = False
    tell_peer: bool = True  # send the peer the reason (not when it ended the stream itself)


def ending_of(error: BaseException) -> Ending | None:
    """How `error` ends a stream, or None when it is not a stream's to handle."""
    if isinstance(error, PeerEndedStream):
        return Ending(f"the peer ended it: {error.reason}", passing=error.retry, tell_peer=False)
    if isinstance(error, ProtocolError):
        return Ending(f"protocol error: {error}")
    if isinstance(error, StoreError):
        return Ending(f"this node's store failed: {error.reason}", passing=True)
    if isinstance(error, GateUnavailable):
        return Ending(f"documents cannot be decided now: {error}", passing=True)
    if isinstance(error, GateRefused):
        return Ending(f"refused: {error}")
    return None


@attrs.define
class StreamRetry:
    """The back-off of one stream across its restarts."""

    backoff: Backoff = STREAM_BACKOFF
    rng: random.Random = attrs.field(factory=random.Random)
    attempt: int = 0  # restarts since the last success

    def next_delay(self) -> float:
        """Seconds to wait before the next restart; each call waits longer, up to the cap."""
        delay = self.backoff.delay(self.attempt, self.rng)
        self.attempt += 1
        return delay

    def succeeded(self) -> None:
        """The stream did useful work (a batch written, or caught up): start over short."""
        self.attempt = 0
