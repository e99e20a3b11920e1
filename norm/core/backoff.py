"""Backoff sequences: pure, with the randomness passed in so that tests control it."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter and a cap: delay(n) for the n-th retry (n >= 0)."""

    first: float = 0.1
    factor: float = 2.0
    cap: float = 5.0
    jitter: float = 0.5  # fraction of the delay that is random

    def __post_init__(self) -> None:
        # Written so that NaN, which fails every comparison, fails these too.
        if not (0 <= self.first <= self.cap < math.inf and 1 <= self.factor < math.inf
                and 0 <= self.jitter <= 1):
            raise ValueError("backoff needs first >= 0, factor >= 1, cap >= first, 0 <= jitter <= 1")

    def delay(self, attempt: int, rand: float = 0.5) -> float:
        """The delay before retry `attempt`; `rand` in [0, 1) picks the jitter."""
        if attempt < 0:
            raise ValueError("attempt must be >= 0")
        try:
            base = min(self.cap, self.first * self.factor ** min(attempt, 64))
        except OverflowError:
            base = self.cap
        return base * (1 - self.jitter) + base * self.jitter * rand


def renewal_retry(ttl: float) -> Backoff:
    """Retries of a failed lease renewal. Jittered, so that a fleet whose renewals failed together
    (etcd down) does not come back in step; the longest wait is a sixth of the TTL, at most 1 s, so
    that several tries still fit before the lease could expire."""
    cap = min(1.0, ttl / 6)
    return Backoff(first=cap / 4, factor=2.0, cap=cap, jitter=0.75)
