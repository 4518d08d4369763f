"""The gossip protocol core: membership view, topology, whom to push to, retry and circuit-breaker decisions.

Theory of operation.
  State:   one `PeerRecord` per compatible peer that answered a Hello or pushed to us (address, advertised
           degree, incarnation, last-seen time, missed heartbeats, eviction flag, breaker), plus the topology.
  Inputs:  `peer_up` (a verified Hello or push header), `peer_gone` (a clean mDNS goodbye), `send_ok`,
           `send_failed`, `heartbeat_ok`, `heartbeat_failed`, and `sends_due` / `heartbeats_due` queries.
           Every input carries `now` (seconds, monotonic).
  Effects: the return values: which neighbours to push to or probe now, whether to retry and after how long,
           whether a channel must be re-dialled, whether a peer was just evicted or re-admitted.
  Invariants: the neighbour set is a pure function of (topology, own id, ids of the members that are not
           evicted), so every peer with the same view computes the same graph; liveness comes from gRPC
           (heartbeats, pushes), never from mDNS, whose caches keep a crashed peer for ≥ 1125 s; a neighbour
           whose breaker is open is skipped, never waited on; one success closes the breaker, and any sign of
           life re-admits an evicted peer.
No clocks, sockets or global randomness here: `now` and an `random.Random` come in as arguments.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from peer.algorithms.base import NeighbourView
from peer.core import topology as topo

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


def topology_neighbours(
    topology: str, self_id: str, members: list[str], *, seed: int = 0, round_index: int = 0
) -> list[str]:
    """The neighbour set for `topology` over `members` (which may or may not include `self_id`)."""
    return topo.neighbours(topo.parse_topology(topology), self_id, members, seed=seed, round_index=round_index)


@dataclass(frozen=True)
class LivenessPolicy:
    heartbeat_interval_s: float = 2.0
    evict_after: int = 3  # consecutive missed heartbeats
    probe_evicted_max_s: float = 10.0  # evicted peers are re-probed with a growing interval up to this


@dataclass
class PeerRecord:
    node_id: str
    address: str
    degree: int
    incarnation: int
    source: str
    first_seen: float
    last_seen: float
    breaker: CircuitBreaker
    last_sent_seq: int = 0
    last_failure: str = ""
    sends_ok: int = 0
    sends_failed: int = 0
    misses: int = 0
    evicted: bool = False
    evicted_at: float = 0.0
    next_probe: float = 0.0
    evictions: int = 0


@dataclass(frozen=True)
class PeerUpdate:
    """What `peer_up` decided: whether the peer is new, whether its channel must be re-dialled."""

    new: bool
    redial: bool
    restarted: bool


@dataclass
class GossipCore:
    self_id: str
    topology: str
    policy: BreakerPolicy = field(default_factory=BreakerPolicy)
    liveness: LivenessPolicy = field(default_factory=LivenessPolicy)
    peers: dict[str, PeerRecord] = field(default_factory=dict)
    topology_seed: int = 0
    round_index: int = 0  # the shell advances it for time-varying topologies

    def __post_init__(self) -> None:
        self.spec = topo.parse_topology(self.topology)

    # -- inputs ---------------------------------------------------------------------------------------------
    def peer_up(
        self, node_id: str, address: str, degree: int, incarnation: int, now: float, source: str = "hello"
    ) -> PeerUpdate:
        """A peer proved it is alive and compatible (Hello answered, or a valid push arrived)."""
        if node_id == self.self_id:
            return PeerUpdate(False, False, False)
        rec = self.peers.get(node_id)
        if rec is None:
            rec = PeerRecord(node_id, address, degree, incarnation, source, now, now, CircuitBreaker(self.policy))
            rec.next_probe = now + self.liveness.heartbeat_interval_s
            self.peers[node_id] = rec
            return PeerUpdate(new=True, redial=True, restarted=False)
        restarted = incarnation != rec.incarnation and incarnation != 0
        redial = bool(address) and address != rec.address
        if address:
            rec.address = address
        rec.degree = degree
        self._alive(rec, now)
        if restarted:
            rec.incarnation = incarnation
            # The restarted process has a new sequence space: forget what we sent to its previous life.
            rec.last_sent_seq = 0
        if restarted or redial:
            rec.breaker.record_success()
        return PeerUpdate(new=False, redial=redial, restarted=restarted)

    def heard_from(self, node_id: str, degree: int, now: float) -> bool:
        """Any message from the peer proves it alive. Returns True if that re-admitted an evicted peer."""
        rec = self.peers.get(node_id)
        if rec is None:
            return False
        rec.degree = degree
        return self._alive(rec, now)

    def _alive(self, rec: PeerRecord, now: float) -> bool:
        readmitted = rec.evicted
        rec.last_seen = now
        rec.misses = 0
        rec.evicted = False
        # Heartbeats keep their own cadence even while pushes flow: their answers carry the peer's progress
        # (for catch-up) and its degree; only an evicted peer's backed-off probe is brought forward.
        if readmitted or rec.next_probe > now + self.liveness.heartbeat_interval_s:
            rec.next_probe = now + self.liveness.heartbeat_interval_s
        return readmitted

    def heartbeats_due(self, now: float, in_flight: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Peers to probe now: members not heard from for an interval, and evicted peers on their backoff."""
        return sorted(j for j, rec in self.peers.items() if j not in in_flight and now >= rec.next_probe)

    def heartbeat_ok(self, node_id: str, degree: int, now: float) -> bool:
        """A heartbeat was answered. Returns True if the peer had been evicted and is now re-admitted."""
        readmitted = self.heard_from(node_id, degree, now)
        rec = self.peers.get(node_id)
        if rec is not None:
            rec.next_probe = now + self.liveness.heartbeat_interval_s
        return readmitted

    def heartbeat_failed(self, node_id: str, now: float) -> bool:
        """A heartbeat went unanswered. Returns True if this miss evicted the peer."""
        rec = self.peers.get(node_id)
        if rec is None:
            return False
        rec.misses += 1
        if rec.evicted:
            # Keep probing for re-admission, but back off: an evicted peer may be gone for good.
            k = rec.misses - self.liveness.evict_after
            wait = min(self.liveness.probe_evicted_max_s, self.liveness.heartbeat_interval_s * (2.0 ** max(0, k)))
            rec.next_probe = now + wait
            return False
        rec.next_probe = now + self.liveness.heartbeat_interval_s
        if rec.misses >= self.liveness.evict_after:
            rec.evicted = True
            rec.evicted_at = now
            rec.evictions += 1
            return True
        return False

    def peer_gone(self, node_id: str) -> PeerRecord | None:
        """The peer said goodbye (clean mDNS unregister): drop it from the view."""
        return self.peers.pop(node_id, None)

    def send_ok(self, node_id: str, seq: int, now: float) -> None:
        rec = self.peers.get(node_id)
        if rec is None:
            return
        rec.breaker.record_success()
        rec.last_sent_seq = max(rec.last_sent_seq, seq)
        rec.last_seen = now
        rec.sends_ok += 1

    def send_failed(self, node_id: str, code: str, now: float, rng: random.Random) -> float:
        """Record a failed push (after its retries); returns the breaker's skip interval (0 if still closed)."""
        rec = self.peers.get(node_id)
        if rec is None:
            return 0.0
        rec.sends_failed += 1
        rec.last_failure = code
        return rec.breaker.record_failure(now, rng)

    # -- queries --------------------------------------------------------------------------------------------
    def members(self) -> list[str]:
        """Ids of the peers in the view: known, compatible and not evicted (ourselves excluded)."""
        return sorted(j for j, rec in self.peers.items() if not rec.evicted)

    def neighbours(self) -> list[str]:
        return topo.neighbours(
            self.spec, self.self_id, self.members(), seed=self.topology_seed, round_index=self.round_index
        )

    def degree(self) -> int:
        return len(self.neighbours())

    def view(self) -> NeighbourView:
        members = frozenset(self.members()) | {self.self_id}
        return NeighbourView(self.self_id, {j: self.peers[j].degree for j in self.neighbours()}, members)

    def sends_due(self, now: float, seq: int, in_flight: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Neighbours that should get payload `seq` now: not yet sent, breaker closed, no push in flight."""
        due = []
        for j in self.neighbours():
            rec = self.peers[j]
            if j in in_flight or rec.last_sent_seq >= seq or not rec.breaker.allows(now):
                continue
            due.append(j)
        return due

    def next_deadline(self, now: float) -> float | None:
        """The earliest time an open breaker closes (so the shell knows when to try again)."""
        times = [r.breaker.open_until for r in self.peers.values() if r.breaker.open_until > now]
        return min(times) if times else None

    def state_of(self, node_id: str, now: float) -> str:
        rec = self.peers[node_id]
        if rec.evicted:
            return "evicted"
        if rec.breaker.is_open(now):
            return "backoff"
        if rec.misses > 0 or rec.breaker.failures > 0:
            return "suspect"
        return "alive"
