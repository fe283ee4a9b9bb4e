"""Exponential back-off with jitter for reconnecting to peers (pure).

The delay before retry ``attempt`` (0-based) is ``min(maximum, initial * multiplier**attempt)``,
scaled down by a random factor in ``[1 - jitter, 1]``, so nodes that lost the same peer at the
same moment do not all come back in lock-step.
"""

from __future__ import annotations

import math
import random

import attrs

__all__ = ["Backoff"]


@attrs.frozen
class Backoff:
    """A back-off schedule, in seconds."""

    initial: float = 1.0
    maximum: float = 300.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def __attrs_post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError(f"need 0 < initial <= maximum, got {self.initial} and {self.maximum}")
        if not self.multiplier >= 1:
            raise ValueError(f"multiplier must be at least 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be within 0..1, got {self.jitter}")

    def ceiling(self, attempt: int) -> float:
        """The delay before retry `attempt` without jitter."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        if self.multiplier == 1:
            return self.initial
        # Compare exponents, not values: multiplier**attempt overflows a float for large attempts.
        if attempt >= math.log(self.maximum / self.initial, self.multiplier):
            return self.maximum
        return min(self.maximum, self.initial * self.multiplier**attempt)

    def delay(self, attempt: int, rng: random.Random) -> float:
        """The jittered delay before retry `attempt`, drawing from `rng`."""
        return self.ceiling(attempt) * (1 - self.jitter * rng.random())
