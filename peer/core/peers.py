"""The peer table: one record per known compatible peer, its liveness and send health, and the topology view.

Pure bookkeeping under `peer.core.gossip.GossipCore`: every method takes `now` (monotonic seconds) and returns
what changed; nothing here performs I/O or reads a clock.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from peer.core import topology as topo
from peer.core.backoff import BreakerPolicy, CircuitBreaker
from peer.core.view import NeighbourView


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
    # Other addresses that answered as this incarnation (a static peer's name beside the IP it advertises):
    # recognised as this peer, never switched to while the address in use works. Bounded by MAX_ALIASES.
    aliases: list[str] = field(default_factory=list)

    def answers_at(self, address: str) -> bool:
        return address == self.address or address in self.aliases


MAX_ALIASES = 4


@dataclass(frozen=True)
class PeerUpdate:
    """What `peer_up` decided: whether the peer is new, whether its channel must be re-dialled."""

    new: bool
    redial: bool
    restarted: bool
    readmitted: bool = False
    old_address: str = ""


@dataclass(frozen=True)
class PeerRow:
    """One row of the neighbour table, as `peer status` shows it."""

    node_id: str
    address: str
    state: str
    last_seen: float
    failures: int
    backoff_s: float
    degree: int
    last_seq: int
    neighbour: bool


@dataclass
class PeerTable:
    self_id: str
    topology: str
    policy: BreakerPolicy = field(default_factory=BreakerPolicy)
    liveness: LivenessPolicy = field(default_factory=LivenessPolicy)
    topology_seed: int = 0
    round_index: int = 0  # advanced by the core for time-varying topologies
    peers: dict[str, PeerRecord] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.spec = topo.parse_topology(self.topology)

    # -- liveness and identity ------------------------------------------------------------------------------
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
        old_address = rec.address
        restarted = incarnation != rec.incarnation and incarnation != 0
        # A live peer that also answers at another address keeps the one in use: switching would close the
        # channel and cancel the pushes in flight on it. It moves when it restarted or its address stopped working.
        working = bool(rec.address) and not rec.evicted and rec.misses == 0 and rec.breaker.failures == 0
        redial = bool(address) and address != rec.address and (restarted or not working)
        if restarted:
            rec.aliases.clear()
        if redial:
            rec.address = address
            if address in rec.aliases:
                rec.aliases.remove(address)
        elif address and address != rec.address and address not in rec.aliases:
            rec.aliases = [*rec.aliases, address][-MAX_ALIASES:]
        rec.degree = degree
        readmitted = self._alive(rec, now)
        if restarted:
            rec.incarnation = incarnation
            # The restarted process has a new sequence space: forget what we sent to its previous life.
            rec.last_sent_seq = 0
        if restarted or redial:
            rec.breaker.record_success()
        return PeerUpdate(False, redial, restarted, readmitted, old_address if redial else "")

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
        """The peer said goodbye (clean mDNS unregister) or turned out incompatible: drop it from the view."""
        return self.peers.pop(node_id, None)

    # -- sends ----------------------------------------------------------------------------------------------
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

    def send_dropped(self, node_id: str, seq: int) -> None:
        """An injected fault lost the push on purpose: count it as sent, so it is not sent again."""
        rec = self.peers.get(node_id)
        if rec is not None:
            rec.last_sent_seq = max(rec.last_sent_seq, seq)

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

    def may_send(self, node_id: str, now: float) -> bool:
        rec = self.peers.get(node_id)
        return rec is not None and rec.breaker.allows(now)

    def answering_at(self, address: str) -> PeerRecord | None:
        """The member that answers at `address` (its address in use or an alias), if any."""
        return next((r for r in self.peers.values() if r.answers_at(address)), None)

    def address_of(self, node_id: str) -> str | None:
        rec = self.peers.get(node_id)
        return rec.address if rec is not None else None

    def breaker_deadline(self, now: float) -> float | None:
        """The earliest time an open breaker closes (so the shell knows when to try again)."""
        times = [r.breaker.open_until for r in self.peers.values() if r.breaker.open_until > now]
        return min(times) if times else None

    def probe_deadline(self) -> float | None:
        return min((r.next_probe for r in self.peers.values()), default=None)

    def state_of(self, node_id: str, now: float) -> str:
        rec = self.peers[node_id]
        if rec.evicted:
            return "evicted"
        if rec.breaker.is_open(now):
            return "backoff"
        if rec.misses > 0 or rec.breaker.failures > 0:
            return "suspect"
        return "alive"

    def rows(self, now: float) -> list[PeerRow]:
        neighbours = set(self.neighbours())
        return [
            PeerRow(
                node_id=j,
                address=rec.address,
                state=self.state_of(j, now),
                last_seen=rec.last_seen,
                failures=max(rec.misses, rec.breaker.failures),
                backoff_s=rec.breaker.remaining(now),
                degree=rec.degree,
                last_seq=rec.last_sent_seq,
                neighbour=j in neighbours,
            )
            for j, rec in sorted(self.peers.items())
        ]
