"""Retry and circuit-breaker decisions: which failures to retry, how long to wait, when to skip a neighbour.

Pure: the caller passes `now` and a `random.Random`; nothing here sleeps or reads a clock.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# gRPC status names that a retry may fix. DEADLINE_EXCEEDED only for idempotent calls (full-state pushes are,
# thanks to sequence numbers): a duplicate is dropped by the receiver.
RETRYABLE = frozenset({"UNAVAILABLE"})
RETRYABLE_IF_IDEMPOTENT = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})


def retry_delay(attempt: int, *, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base·2^attempt)), attempt counted from 0."""
    return rng.uniform(0.0, min(cap_s, base_s * (2.0**attempt)))


def should_retry(code: str, attempt: int, *, max_attempts: int, idempotent: bool, details: str = "") -> bool:
    """Retry only transient codes, never a TLS handshake failure, and at most `max_attempts` tries in all."""
    if attempt + 1 >= max_attempts:
        return False
    if "handshake" in details.lower():
        return False
    return code in (RETRYABLE_IF_IDEMPOTENT if idempotent else RETRYABLE)


@dataclass(frozen=True)
class BreakerPolicy:
    threshold: int = 3  # consecutive failures before the breaker opens
    base_s: float = 0.5
    cap_s: float = 20.0


@dataclass
class CircuitBreaker:
    """Skips a failing neighbour for a growing, jittered interval; one success resets it."""

    policy: BreakerPolicy
    failures: int = 0
    open_until: float = 0.0
    trips: int = 0

    def allows(self, now: float) -> bool:
        return now >= self.open_until

    def is_open(self, now: float) -> bool:
        return self.failures >= self.policy.threshold and now < self.open_until

    def record_success(self) -> None:
        self.failures = 0
        self.trips = 0
        self.open_until = 0.0

    def record_failure(self, now: float, rng: random.Random) -> float:
        """Count a failure; returns how long the neighbour is skipped (0 while under the threshold)."""
        self.failures += 1
        if self.failures < self.policy.threshold:
            return 0.0
        # Grow the window with each trip, with jitter so that many peers don't re-probe in lockstep. The
        # floor of half the window keeps the interval growing even with unlucky draws.
        window = min(self.policy.cap_s, self.policy.base_s * (2.0**self.trips))
        delay = window / 2 + rng.uniform(0.0, window / 2)
        self.trips += 1
        self.open_until = now + delay
        return delay

    def remaining(self, now: float) -> float:
        return max(0.0, self.open_until - now)
