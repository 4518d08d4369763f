"""Tarpit: how long to hold a refusal before answering it. Pure bookkeeping: every method takes `now`.

Refusing a call cheaply is not cheap enough: grpc.aio's own per-call machinery costs about 200 us of the event
loop's CPU per call whatever the handler does, so 1,000 refused calls a second from hostile clients cost a
daemon a large part of the core its training shares. A client that loops and awaits each answer sends its next
request only after the last one was answered: holding its refusals (an asyncio wait, no CPU) cuts its request
rate to about one per `delay_s`, and with it what it costs us.

Who is held: a refusal is held once the connection it came on has spent its free refusals (`free_refusals` per
`window_s`, refilled evenly), or once its source host has spent the host's (`free_refusals_per_source`). The
connection (gRPC's `context.peer()`, "ipv4:HOST:PORT") is what one client controls: on loopback, behind a NAT or
on a shared host, every client has the same host, and holding by host alone would hold the first refusal of a
peer that never misbehaved. The host budget still catches an attacker who opens a new connection for every few
requests. Calls that are not refused are never held, whatever their connection or host did.

Memory: a held call keeps its request (at most gRPC's message limit) until answered, so holds are bounded per
connection, in number and in bytes over all connections; beyond a bound a refusal is answered at once (what it
cost before). Key tables are bounded too (least recently used key forgotten: it only starts afresh).

Release times fall on a grid (`release_grid_s`): holds then end together, a few event-loop wake-ups a second for
all held calls rather than one per call. What a wake-up costs is mostly not its CPU but taking the GIL from the
training thread: with refusals released one by one, 120 answered calls a second cost training 15% of its steps
against 8% of a core in CPU (scripts/bench_hostile.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from peer.core.admission import RateLimiter

HOLD_OVERHEAD_BYTES = 16 * 1024  # what a held call costs besides its request (call state, task, buffers)


@dataclass(frozen=True)
class TarpitSettings:
    delay_s: float = 2.0  # how long a refusal is held (0: never)
    free_refusals: int = 10  # refusals per connection per window answered at once
    free_refusals_per_source: int = 100  # ... and per source host
    window_s: float = 60.0  # the free budgets refill evenly over this
    max_held: int = 1024  # refusals held at once, over all connections
    max_held_per_connection: int = 128
    max_held_bytes: int = 64 << 20  # requests (and overhead) of held refusals, over all connections
    max_keys: int = 4096  # connections (and, apart, hosts) remembered
    release_grid_s: float = 0.25  # holds end on multiples of this (so at least delay_s, at most this much more)


class Tarpit:
    def __init__(self, settings: TarpitSettings) -> None:
        s = self.settings = settings
        self._by_connection = RateLimiter(s.free_refusals / s.window_s, s.free_refusals, max_keys=s.max_keys)
        self._by_source = RateLimiter(
            s.free_refusals_per_source / s.window_s, s.free_refusals_per_source, max_keys=s.max_keys
        )
        self._held: dict[str, int] = {}  # connection -> refusals held now
        self.held = 0
        self.held_bytes = 0
        self.total_held = 0  # refusals ever held (a metric)

    def hold(self, connection: str, source: str, request_bytes: int, now: float) -> float:
        """Seconds to hold this refusal (0: answer it now). After a positive answer the caller must call
        `release(connection, request_bytes)` once the refusal was answered (or the call ended)."""
        if self.settings.delay_s <= 0:
            return 0.0
        # Both budgets are charged, so that a connection's refusals also spend its host's budget.
        free_connection = self._by_connection.allow(connection, now)
        free_source = self._by_source.allow(source, now)
        if free_connection and free_source:
            return 0.0
        cost = HOLD_OVERHEAD_BYTES + max(0, request_bytes)
        n = self._held.get(connection, 0)
        s = self.settings
        if n >= s.max_held_per_connection or self.held >= s.max_held or self.held_bytes + cost > s.max_held_bytes:
            return 0.0
        self._held[connection] = n + 1
        self.held += 1
        self.held_bytes += cost
        self.total_held += 1
        if s.release_grid_s <= 0:
            return s.delay_s
        return math.ceil((now + s.delay_s) / s.release_grid_s) * s.release_grid_s - now

    def release(self, connection: str, request_bytes: int) -> None:
        n = self._held.get(connection, 0)
        if n <= 1:
            self._held.pop(connection, None)
        else:
            self._held[connection] = n - 1
        self.held = max(0, self.held - 1)
        self.held_bytes = max(0, self.held_bytes - HOLD_OVERHEAD_BYTES - max(0, request_bytes))

    def connections_held(self) -> int:
        return len(self._held)
