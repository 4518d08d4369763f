"""The gossip protocol core: membership, liveness, whom to push to, catch-up and timers, as one state machine.

Theory of operation.
  State:   the peer table (`PeerTable`: one record per compatible peer, with liveness and a circuit breaker),
           the topology, the catch-up policy, Hellos and heartbeats in flight, peers that said goodbye, the
           static peer list and the periodic timers (heartbeats, static re-dials, progress checks, checkpoints,
           metrics, the graph of a time-varying topology).
  Inputs:  `handle(event)` takes one of `peer.core.events.Input` (Started, Tick, CandidateFound, HelloReceived,
           HelloAnswered, HelloFailed, StateReceived, SendOk, SendFailed, FetchDone, ...), each with `now`.
  Effects: `handle` returns a list of `peer.core.events.Effect` (SayHello, Reply, Deliver, ViewChanged, Forget,
           StartCatchUp, CatchUpDone, RequestCheckpoint, Log, ...) for the shell to carry out, in order.
           `next_deadline()` says when the next Tick is due.
  Invariants: the neighbour set is a pure function of (topology, own id, ids of the members that are not
           evicted), so every peer with the same view computes the same graph; liveness comes from gRPC
           (heartbeats, pushes), never from mDNS, whose caches keep a crashed peer for >= 1125 s; a neighbour
           whose breaker is open is skipped, never waited on; one success closes the breaker; any sign of life
           re-admits an evicted peer; a claim that contradicts the caller's authenticated identity changes
           nothing.
No clocks, sockets or global randomness: `now` comes with every input and an `random.Random` with the core.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from peer.core import topology as topo
from peer.core.addresses import reachable_address
from peer.core.backoff import BreakerPolicy
from peer.core.catchup import CatchUpPolicy, CatchUpSettings, Fetch, Finish
from peer.core.events import (
    CandidateFound,
    CandidateGone,
    CatchUpDone,
    ClearLog,
    CloseChannel,
    Deliver,
    Effect,
    Fatal,
    FetchDone,
    Forget,
    HelloAnswered,
    HelloFailed,
    HelloReceived,
    Input,
    Log,
    PeerInfo,
    Progress,
    Reply,
    RequestCheckpoint,
    SayHello,
    SendDropped,
    SendFailed,
    SendOk,
    StartCatchUp,
    Started,
    StateReceived,
    Tick,
    ViewChanged,
    WriteMetrics,
)
from peer.core.peers import LivenessPolicy, PeerRecord, PeerTable
from peer.core.view import NeighbourView

DUPLICATE_PREFIX = "duplicate node id"


@dataclass(frozen=True)
class Identity:
    """What this daemon says about itself, and what a compatible peer must share with it."""

    node_id: str
    protocol_version: str
    schema_fingerprint: str
    algorithm: str
    incarnation: int


@dataclass(frozen=True)
class CoreSettings:
    identity: Identity
    topology: str = "ring"
    topology_seed: int = 0
    topology_period_s: float = 1.0  # how long each graph of a time-varying topology lasts (wall clock)
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    liveness: LivenessPolicy = field(default_factory=LivenessPolicy)
    catchup: CatchUpSettings = field(default_factory=CatchUpSettings)
    cluster: str = "default"
    static_peers: tuple[str, ...] = ()
    hello_retry_s: float = 2.0
    rpc_timeout_s: float = 5.0
    expected_members: int = 1  # one peer per data partition: the cluster a waiting peer waits for
    checkpoint_interval_s: float = 10.0
    metrics_interval_s: float = 1.0


class GossipCore:
    def __init__(self, settings: CoreSettings, rng: random.Random) -> None:
        self.settings = s = settings
        self.me = s.identity
        self.rng = rng  # breaker jitter only
        self.table = PeerTable(s.identity.node_id, s.topology, s.breaker, s.liveness, topology_seed=s.topology_seed)
        self.catchup = CatchUpPolicy(s.catchup)
        self.time_varying = topo.is_time_varying(self.table.spec)
        self.address = ""
        self.progress = Progress()
        self.departed: dict[str, int] = {}  # incarnations that said goodbye: their late pushes must not re-add them
        self.hellos_in_flight: set[str] = set()  # addresses
        self.heartbeats_in_flight: set[str] = set()  # node ids
        self.evictions = 0
        self.readmissions = 0
        self._last_view: NeighbourView | None = None
        self._timers: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ queries
    @property
    def peers(self) -> dict[str, PeerRecord]:
        """Read-only for callers: the records behind `members()` (tests inspect them)."""
        return self.table.peers

    def members(self) -> list[str]:
        return self.table.members()

    def neighbours(self) -> list[str]:
        return self.table.neighbours()

    def degree(self) -> int:
        return self.table.degree()

    def view(self) -> NeighbourView:
        return self.table.view()

    def state_of(self, node_id: str, now: float) -> str:
        return self.table.state_of(node_id, now)

    def sends_due(self, now: float, seq: int, in_flight: set[str] | frozenset[str] = frozenset()) -> list[str]:
        return self.table.sends_due(now, seq, in_flight)

    def may_send(self, node_id: str, now: float) -> bool:
        return self.table.may_send(node_id, now)

    def address_of(self, node_id: str) -> str | None:
        return self.table.address_of(node_id)

    def next_deadline(self, now: float) -> float:
        """When the next Tick is due (the earliest timer, probe, breaker or catch-up deadline)."""
        times = [*self._timers.values()]
        for t in (self.table.probe_deadline(), self.table.breaker_deadline(now), self.catchup.deadline()):
            if t is not None:
                times.append(t)
        return min(times, default=now + 1.0)

    def incompatibility(self, info: PeerInfo) -> str:
        me = self.me
        if info.protocol_version != me.protocol_version:
            return f"protocol {info.protocol_version!r} != ours {me.protocol_version!r}"
        if info.schema_fingerprint != me.schema_fingerprint:
            return f"schema fingerprint {info.schema_fingerprint} != ours {me.schema_fingerprint} (a different model?)"
        if info.algorithm != me.algorithm:
            return f"algorithm {info.algorithm!r} != ours {me.algorithm!r}"
        return ""

    # ------------------------------------------------------------------------------------------- inputs
    def handle(self, event: Input) -> list[Effect]:
        out: list[Effect] = []
        match event:
            case Started():
                self._started(event, out)
            case Tick():
                self.progress = event.progress
                self._tick(event.now, event.wall, out)
            case CandidateFound():
                self._candidate(event, out)
            case CandidateGone():
                self._goodbye(event, out)
            case HelloReceived():
                self._hello_received(event, out)
            case HelloAnswered():
                self._hello_answered(event, out)
            case HelloFailed():
                self._hello_failed(event, out)
            case StateReceived():
                self._state_received(event, out)
            case SendOk():
                self.table.send_ok(event.node_id, event.seq, event.now)
                out.append(ClearLog(("send", event.node_id)))
            case SendFailed():
                skip = self.table.send_failed(event.node_id, event.code, event.now, self.rng)
                if event.detail:
                    tail = f"; skipping {event.node_id} for {skip:.1f} s" if skip else ""
                    out.append(Log("warning", event.detail + tail, ("send", event.node_id)))
            case SendDropped():
                self.table.send_dropped(event.node_id, event.seq)
            case FetchDone():
                self.catchup.fetch_done(event.node_id, event.ok)
                if event.ok:
                    out.append(CatchUpDone("adopted a neighbour's model"))
                else:
                    self._decide_catchup(event.now, out)
        return out

    # -------------------------------------------------------------------------------------- start, timers
    def _started(self, ev: Started, out: list[Effect]) -> None:
        s = self.settings
        self.address = ev.address
        self.progress = ev.progress
        self._timers = {
            "static": ev.now,
            "progress": ev.now + s.liveness.heartbeat_interval_s,
            "checkpoint": ev.now + s.checkpoint_interval_s,
            "metrics": ev.now + s.metrics_interval_s,
        }
        if not s.static_peers:
            del self._timers["static"]
        if not self.catchup.start(ev.now, ev.wall, ev.state_saved_unix_s, ev.progress.done):
            out.append(CatchUpDone("not needed"))
        self._tick(ev.now, ev.wall, out)

    def _due(self, name: str, now: float, interval: float) -> bool:
        at = self._timers.get(name)
        if at is None or now < at:
            return False
        self._timers[name] = now + interval
        return True

    def _tick(self, now: float, wall: float, out: list[Effect]) -> None:
        s = self.settings
        if self.time_varying:
            r = topo.round_index_at(wall, s.topology_period_s)
            self._timers["topology"] = now + ((r + 1) * s.topology_period_s - wall)
            if r != self.table.round_index:
                self.table.round_index = r
                self._view_changed(now, out)
        if self._due("static", now, s.hello_retry_s):
            known = {r.address for r in self.table.peers.values() if not r.evicted}
            for address in s.static_peers:
                if address not in known:
                    self._say_hello(address, None, out)
        timeout = min(s.rpc_timeout_s, s.liveness.heartbeat_interval_s)
        for node_id in self.table.heartbeats_due(now, self.heartbeats_in_flight):
            self.heartbeats_in_flight.add(node_id)
            out.append(SayHello(self.table.peers[node_id].address, "heartbeat", timeout, node_id))
        if self._due("progress", now, s.liveness.heartbeat_interval_s):
            p = self.progress
            self.catchup.check_progress(now, p.epoch, p.done, self.table.neighbours())
        self._decide_catchup(now, out)
        if self._due("checkpoint", now, s.checkpoint_interval_s):
            out.append(RequestCheckpoint())
        if self._due("metrics", now, s.metrics_interval_s):
            out.append(WriteMetrics())

    # ------------------------------------------------------------------------------------------ discovery
    def _candidate(self, ev: CandidateFound, out: list[Effect]) -> None:
        if ev.cluster is not None and ev.cluster != self.settings.cluster:
            who = ev.node_id or ev.address
            out.append(
                Log(
                    "warning",
                    f"ignoring peer {ev.node_id} at {ev.address}: cluster {ev.cluster!r} != ours "
                    f"{self.settings.cluster!r}",
                    ("cluster", who),
                )
            )
            return
        rec = self.table.peers.get(ev.node_id) if ev.node_id else None
        if rec is not None and rec.address == ev.address and not rec.evicted and rec.misses == 0:
            return
        self._say_hello(ev.address, ev.node_id, out)

    def _say_hello(self, address: str, node_id: str | None, out: list[Effect]) -> None:
        if address in self.hellos_in_flight or address == self.address:
            return
        self.hellos_in_flight.add(address)
        out.append(SayHello(address, "join", self.settings.rpc_timeout_s, node_id))

    def _goodbye(self, ev: CandidateGone, out: list[Effect]) -> None:
        rec = self.table.peer_gone(ev.node_id)
        if rec is None:
            return
        self.departed[ev.node_id] = rec.incarnation
        out += [Log("info", f"peer {ev.node_id} left (mDNS goodbye)"), Forget(ev.node_id)]
        self._view_changed(ev.now, out)

    # ---------------------------------------------------------------------------------------------- hello
    def _hello_received(self, ev: HelloReceived, out: list[Effect]) -> None:
        info = ev.info
        if ev.identity is not None and ev.identity != info.node_id:
            out.append(self._impostor(info.node_id, ev.identity, "hello"))
            return
        if info.node_id == self.me.node_id:
            if info.incarnation != self.me.incarnation:
                out.append(Reply(False, f"{DUPLICATE_PREFIX} {info.node_id!r}: already in use at {self.address}"))
                self._duplicate(info.incarnation, reachable_address(info.address, ev.transport_peer), out)
            else:
                out.append(Reply(True))
            return
        problem = self.incompatibility(info)
        if problem:
            out.append(
                Log(
                    "warning",
                    f"ignoring hello from {info.node_id} at {info.address}: {problem}",
                    ("incompatible", info.node_id),
                )
            )
            out.append(Reply(False, problem))
            return
        self.catchup.report(info.node_id, info.step, info.epoch)
        address = reachable_address(info.address, ev.transport_peer)
        self._peer_up(info.node_id, address, info.degree, info.incarnation, "hello-in", ev.now, out)
        out.append(Reply(True))

    def _hello_answered(self, ev: HelloAnswered, out: list[Effect]) -> None:
        if ev.purpose == "join":
            self.hellos_in_flight.discard(ev.address)
            self._apply_answer(ev, "hello", out)
            return
        assert ev.node_id is not None
        self.heartbeats_in_flight.discard(ev.node_id)
        if ev.node_id not in self.table.peers:
            return
        if ev.info.node_id != ev.node_id:
            # Another daemon now answers at that address: the peer we knew is gone from there.
            self._missed(ev.node_id, ev.address, "another node answers there", ev.now, out)
            return
        if self._apply_answer(ev, "heartbeat", out):
            self.table.heartbeat_ok(ev.node_id, ev.info.degree, ev.now)
        else:
            self._missed(ev.node_id, ev.address, "refused", ev.now, out)

    def _apply_answer(self, ev: HelloAnswered, source: str, out: list[Effect]) -> bool:
        """A Hello answer; True when the peer is (still) a compatible member."""
        info = ev.info
        if ev.identity is not None and ev.identity != info.node_id:
            out.append(self._impostor(info.node_id, ev.identity, "hello answer"))
            return False
        if not ev.accepted:
            if ev.reason.startswith(DUPLICATE_PREFIX):
                self._duplicate(info.incarnation, ev.address, out)
            else:
                msg = f"peer {info.node_id} at {ev.address} refused us: {ev.reason}"
                out.append(Log("warning", msg, ("hello", ev.address)))
            return False
        problem = self.incompatibility(info)
        if problem:
            msg = f"ignoring peer {info.node_id} at {ev.address}: {problem}"
            out.append(Log("warning", msg, ("incompatible", info.node_id)))
            if self.table.peer_gone(info.node_id) is not None:
                self._view_changed(ev.now, out)
            return False
        self.catchup.report(info.node_id, info.step, info.epoch)
        # The address we dialled is known to work from here; the one the peer advertises may not be (NAT, a
        # container bridge, a 0.0.0.0 listener).
        self._peer_up(info.node_id, ev.address, info.degree, info.incarnation, source, ev.now, out)
        self._decide_catchup(ev.now, out)
        return True

    def _hello_failed(self, ev: HelloFailed, out: list[Effect]) -> None:
        if ev.purpose == "join":
            self.hellos_in_flight.discard(ev.address)
            out.append(Log("debug", f"hello to {ev.address} failed: {ev.detail}"))
            return
        assert ev.node_id is not None
        self.heartbeats_in_flight.discard(ev.node_id)
        self._missed(ev.node_id, ev.address, ev.code, ev.now, out)

    def _missed(self, node_id: str, address: str, why: str, now: float, out: list[Effect]) -> None:
        if not self.table.heartbeat_failed(node_id, now):
            return
        self.evictions += 1
        n = self.settings.liveness.evict_after
        out += [Log("warning", f"evicted {node_id} ({address}): {n} heartbeats missed ({why})"), Forget(node_id)]
        self._view_changed(now, out)

    def _duplicate(self, their_incarnation: int, address: str, out: list[Effect]) -> None:
        """Two live daemons share our node id. The one that started later gives way, with a clear error."""
        if self.me.incarnation > their_incarnation:
            out.append(
                Fatal(
                    f"another live peer at {address} already uses node_id {self.me.node_id!r}; "
                    "give this daemon another node_id"
                )
            )
        else:
            msg = f"a newer daemon at {address} uses our node_id {self.me.node_id!r}; it will stop"
            out.append(Log("warning", msg, ("dup", address)))

    def _impostor(self, claimed: str, identity: str, what: str) -> Reply:
        """A claim that contradicts the caller's certificate: refused, and nothing changes."""
        return Reply(
            False, f"{what} claims node id {claimed!r} but the certificate says {identity!r}", "PERMISSION_DENIED"
        )

    # ---------------------------------------------------------------------------------------------- pushes
    def _state_received(self, ev: StateReceived, out: list[Effect]) -> None:
        if ev.identity is not None and ev.identity != ev.sender_id:
            out.append(self._impostor(ev.sender_id, ev.identity, "push"))
            return
        if self.departed.get(ev.sender_id) == ev.incarnation:
            out.append(Reply(True, "sent before its goodbye"))
            return
        rec = self.table.peers.get(ev.sender_id)
        if (rec is None or rec.incarnation != ev.incarnation) and ev.address:
            address = reachable_address(ev.address, ev.transport_peer) if ev.transport_peer else ev.address
            self._peer_up(ev.sender_id, address, ev.degree, ev.incarnation, "push", ev.now, out)
        else:
            degree_changed = rec is not None and rec.degree != ev.degree
            readmitted = self.table.heard_from(ev.sender_id, ev.degree, ev.now)
            if readmitted:
                self._readmitted(ev.sender_id, ev.now, out)
            # A changed advertised degree changes the Metropolis-Hastings weights.
            if readmitted or degree_changed:
                self._view_changed(ev.now, out)
        out += [Deliver(ev.sender_id, ev.incarnation, ev.degree, ev.now), Reply(True)]

    # ---------------------------------------------------------------------------------------- membership
    def _peer_up(
        self, node_id: str, address: str, degree: int, incarnation: int, source: str, now: float, out: list[Effect]
    ) -> None:
        if self.departed.get(node_id) == incarnation:
            return
        self.departed.pop(node_id, None)  # a new incarnation is welcome
        upd = self.table.peer_up(node_id, address, degree, incarnation, now, source)
        if upd.new:
            out.append(Log("info", f"new peer {node_id} at {address} (via {source})"))
        elif upd.restarted:
            out += [Log("info", f"peer {node_id} restarted (new incarnation) at {address}"), Forget(node_id)]
        if upd.readmitted:
            self._readmitted(node_id, now, out)
        if upd.old_address:
            out.append(CloseChannel(upd.old_address))
        self._view_changed(now, out)

    def _readmitted(self, node_id: str, now: float, out: list[Effect]) -> None:
        self.readmissions += 1
        out.append(Log("info", f"re-admitted {node_id}: it answers again"))
        line = self.catchup.on_readmitted(now)
        if line:
            out.append(Log("info", line))

    def _view_changed(self, now: float, out: list[Effect]) -> None:
        view = self.table.view()
        self.catchup.isolation(bool(view.degrees), now)
        if view == self._last_view:
            return
        self._last_view = view
        known = bool(view.degrees) and len(self.table.members()) + 1 >= self.settings.expected_members
        out.append(ViewChanged(view, known))

    # ------------------------------------------------------------------------------------------- catch-up
    def _decide_catchup(self, now: float, out: list[Effect]) -> None:
        live = {j for j, rec in self.table.peers.items() if not rec.evicted}
        decision = self.catchup.decide(now, self.progress.epoch, live, self.table.neighbours())
        if isinstance(decision, Fetch):
            address = self.table.peers[decision.node_id].address
            out.append(StartCatchUp(decision.node_id, address, decision.step, decision.epoch))
        elif isinstance(decision, Finish):
            if decision.log:
                out.append(Log("info", decision.log))
            out.append(CatchUpDone(decision.reason))
