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
           nothing. Admission: a peer enters the table only once its address answered our own Hello; the table
           holds at most `admission.max_peers` records; verification Hellos in flight are bounded and expire;
           Hellos are rate-limited per source host, those that make us dial more tightly. No remote claim stops
           us: a Hello saying our id is in use is checked by dialling its address; only our id under another
           incarnation answering there counts (`Refused` otherwise, which changes nothing).
  Peer exchange (`peer.core.exchange`): our Hellos name a sample of our members, candidates to the receiver.
No clocks, sockets or global randomness: `now` comes with every input and an `random.Random` with the core.
"""

from __future__ import annotations

import random

from peer.core import events as ev
from peer.core import topology as topo
from peer.core.addresses import reachable_address
from peer.core.admission import RateLimiter, clip, source_of
from peer.core.catchup import CatchUpPolicy, Fetch, Finish
from peer.core.exchange import PeerExchange
from peer.core.peers import PeerRecord, PeerTable
from peer.core.settings import DUPLICATE_PREFIX, CoreSettings, incompatibility
from peer.core.view import NeighbourView


class GossipCore:
    def __init__(self, settings: CoreSettings, rng: random.Random) -> None:
        self.settings = s = settings
        self.me = s.identity
        self.rng = rng  # breaker jitter only
        self.table = PeerTable(s.identity.node_id, s.topology, s.breaker, s.liveness, topology_seed=s.topology_seed)
        self.catchup = CatchUpPolicy(s.catchup)
        self.time_varying = topo.is_time_varying(self.table.spec)
        self.address = ""
        self.progress = ev.Progress()
        self.departed: dict[str, int] = {}  # incarnations that said goodbye: their late pushes must not re-add them
        self.hellos_in_flight: dict[str, float] = {}  # join Hellos: address -> since (bounded, expiring)
        self.verifying: dict[str, float] = {}  # duplicate-id checks: address -> since (bounded, expiring)
        a = s.admission
        self.hello_limiter = RateLimiter(a.hello_rate_per_s, a.hello_burst, a.max_sources)
        # A stranger's Hello costs a dial (often to an address that never answers), a member's only an answer.
        self.dial_limiter = RateLimiter(a.dial_rate_per_s, a.dial_burst, a.max_sources)
        self.heartbeats_in_flight: set[str] = set()  # node ids
        self.exchange = PeerExchange(s.exchange)  # peer exchange: whom we name in Hellos, whom we learnt of
        self.evictions = 0
        self.readmissions = 0
        self._last_view: NeighbourView | None = None
        self._timers: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ queries
    @property
    def peers(self) -> dict[str, PeerRecord]:  # read-only for callers: the records behind `members()`
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

    def offer(self) -> tuple[ev.KnownPeer, ...]:
        """The members to name in our next Hello (peer exchange)."""
        return self.exchange.offer(self.table)

    def next_deadline(self, now: float) -> float:
        """When the next ev.Tick is due (the earliest timer, probe, breaker or catch-up deadline)."""
        times = [*self._timers.values()]
        for t in (self.table.probe_deadline(), self.table.breaker_deadline(now), self.catchup.deadline()):
            if t is not None:
                times.append(t)
        return min(times, default=now + 1.0)

    # ------------------------------------------------------------------------------------------- inputs
    def handle(self, event: ev.Input) -> list[ev.Effect]:
        out: list[ev.Effect] = []
        match event:
            case ev.Started():
                self._started(event, out)
            case ev.Tick():
                self.progress = event.progress
                self._tick(event.now, event.wall, out)
            case ev.CandidateFound():
                self._candidate(event, out)
            case ev.CandidateGone():
                self._goodbye(event, out)
            case ev.HelloReceived():
                self._hello_received(event, out)
            case ev.HelloAnswered():
                self._hello_answered(event, out)
            case ev.HelloFailed():
                self._hello_failed(event, out)
            case ev.StateReceived():
                self._state_received(event, out)
            case ev.SendOk():
                self.table.send_ok(event.node_id, event.seq, event.now)
                out.append(ev.ClearLog(("send", event.node_id)))
            case ev.SendFailed():
                skip = self.table.send_failed(event.node_id, event.code, event.now, self.rng)
                if event.detail:
                    tail = f"; skipping {event.node_id} for {skip:.1f} s" if skip else ""
                    out.append(ev.Log("warning", event.detail + tail, ("send", event.node_id)))
            case ev.SendDropped():
                self.table.send_dropped(event.node_id, event.seq)
            case ev.FetchDone():
                self.catchup.fetch_done(event.node_id, event.ok)
                if event.ok:
                    out.append(ev.CatchUpDone("adopted a neighbour's model"))
                else:
                    self._decide_catchup(event.now, out)
        return out

    # -------------------------------------------------------------------------------------- start, timers
    def _started(self, e: ev.Started, out: list[ev.Effect]) -> None:
        s = self.settings
        self.address = e.address
        self.progress = e.progress
        self._timers = {
            "static": e.now,
            "progress": e.now + s.liveness.heartbeat_interval_s,
            "checkpoint": e.now + s.checkpoint_interval_s,
            "metrics": e.now + s.metrics_interval_s,
        }
        if not s.static_peers:
            del self._timers["static"]
        if not self.catchup.start(e.now, e.wall, e.state_saved_unix_s, e.progress.done):
            out.append(ev.CatchUpDone("not needed"))
        self._tick(e.now, e.wall, out)

    def _due(self, name: str, now: float, interval: float) -> bool:
        at = self._timers.get(name)
        if at is None or now < at:
            return False
        self._timers[name] = now + interval
        return True

    def _tick(self, now: float, wall: float, out: list[ev.Effect]) -> None:
        s = self.settings
        ttl = s.admission.pending_ttl_s
        for pending in (self.hellos_in_flight, self.verifying):
            for address in [a for a, since in pending.items() if now - since >= ttl]:
                del pending[address]
        if self.time_varying:
            r = topo.round_index_at(wall, s.topology_period_s)
            self._timers["topology"] = now + ((r + 1) * s.topology_period_s - wall)
            if r != self.table.round_index:
                self.table.round_index = r
                self._view_changed(now, out)
        if self._due("static", now, s.hello_retry_s):
            known = {a for r in self.table.peers.values() if not r.evicted for a in (r.address, *r.aliases)}
            for address in s.static_peers:
                if address not in known:
                    self._say_hello(address, None, now, out)
        timeout = min(s.rpc_timeout_s, s.liveness.heartbeat_interval_s)
        for node_id in self.table.heartbeats_due(now, self.heartbeats_in_flight):
            self.heartbeats_in_flight.add(node_id)
            out.append(ev.SayHello(self.table.peers[node_id].address, "heartbeat", timeout, node_id))
        if self._due("progress", now, s.liveness.heartbeat_interval_s):
            p = self.progress
            self.catchup.check_progress(now, p.epoch, p.done, self.table.neighbours())
        self._decide_catchup(now, out)
        if self._due("checkpoint", now, s.checkpoint_interval_s):
            out.append(ev.RequestCheckpoint())
        if self._due("metrics", now, s.metrics_interval_s):
            out.append(ev.WriteMetrics())

    # ------------------------------------------------------------------------------------------ discovery
    def _candidate(self, e: ev.CandidateFound, out: list[ev.Effect]) -> None:
        if e.cluster is not None and e.cluster != self.settings.cluster:
            who = e.node_id or e.address
            out.append(
                ev.Log(
                    "warning",
                    f"ignoring peer {e.node_id} at {e.address}: cluster {e.cluster!r} != ours "
                    f"{self.settings.cluster!r}",
                    ("cluster", who),
                )
            )
            return
        rec = self.table.peers.get(e.node_id) if e.node_id else self.table.answering_at(e.address)
        if rec is not None and rec.answers_at(e.address) and not rec.evicted and rec.misses == 0:
            return
        self._say_hello(e.address, e.node_id, e.now, out)

    def _pending_full(self) -> bool:
        return len(self.hellos_in_flight) + len(self.verifying) >= self.settings.admission.max_pending

    def _say_hello(self, address: str, node_id: str | None, now: float, out: list[ev.Effect]) -> None:
        if address in self.hellos_in_flight or address == self.address or not address:
            return
        if self._pending_full():
            msg = f"not dialling {clip(address, 80)}: {len(self.hellos_in_flight)} Hellos already in flight"
            out.append(ev.Refused("pending_full", "join", msg))
            return
        self.hellos_in_flight[address] = now
        out.append(ev.SayHello(address, "join", self.settings.rpc_timeout_s, node_id))

    def _learn(self, info: ev.PeerInfo, now: float, out: list[ev.Effect]) -> None:
        """Peer exchange: a member named its members; each joins once its address answers our own Hello."""
        for k in self.exchange.learn(info.known_peers, self.table, self.address, now):
            self._say_hello(k.address, k.node_id, now, out)

    def _goodbye(self, e: ev.CandidateGone, out: list[ev.Effect]) -> None:
        known = self.table.peers.get(e.node_id)
        if known is not None and e.address is not None and e.address != known.address:
            # Another instance with the same node id (another cluster on this LAN, e.g. a second demo's "peer-1")
            # left; ours is still there. If it is ours under another address, heartbeats find out it left.
            return
        rec = self.table.peer_gone(e.node_id)
        if rec is None:
            return
        self.departed[e.node_id] = rec.incarnation
        out += [ev.Log("info", f"peer {e.node_id} left (mDNS goodbye)"), ev.Forget(e.node_id)]
        self._view_changed(e.now, out)

    # ---------------------------------------------------------------------------------------------- hello
    def _hello_received(self, e: ev.HelloReceived, out: list[ev.Effect]) -> None:
        info = e.info
        source = source_of(e.transport_peer)
        if self._over_budget(self.hello_limiter, "hello_rate", source, e.now, out):
            return
        if e.identity is not None and e.identity != info.node_id:
            out.append(self._impostor(info.node_id, e.identity, "hello"))
            return
        address = reachable_address(info.address, e.transport_peer)
        if info.node_id == self.me.node_id:
            if info.incarnation != self.me.incarnation:
                if self._over_budget(self.dial_limiter, "dial_rate", source, e.now, out):
                    return
                out.append(ev.Reply(False, f"{DUPLICATE_PREFIX} {info.node_id!r}: already in use at {self.address}"))
                self._verify_duplicate(address, source, e.now, out)
            else:
                out.append(ev.Reply(True))
            return
        problem = incompatibility(self.me, info)
        if problem:
            msg = f"ignoring hello from {clip(repr(info.node_id), 80)} at {clip(info.address, 80)}: {problem}"
            out += [ev.Refused("incompatible", source, msg), ev.Reply(False, problem)]
            return
        rec = self.table.peers.get(info.node_id)
        if rec is not None and rec.incarnation == info.incarnation and rec.answers_at(address):
            # A member we admitted, greeting from an address we confirmed: alive.
            self.catchup.report(info.node_id, info.step, info.epoch)
            self._peer_up(info.node_id, address, info.degree, info.incarnation, "hello-in", e.now, out)
            self._learn(info, e.now, out)
        else:
            # Admission: the peer joins once its address answers our own Hello (HelloAnswered).
            if self._over_budget(self.dial_limiter, "dial_rate", source, e.now, out):
                return
            self._say_hello(address, info.node_id, e.now, out)
        out.append(ev.Reply(True))

    def _over_budget(self, limiter: RateLimiter, reason: str, source: str, now: float, out: list[ev.Effect]) -> bool:
        if limiter.allow(source, now):
            return False
        msg = f"too many Hellos from {source} ({reason}): refused"
        out += [ev.Refused(reason, source, msg), ev.Reply(False, msg, "RESOURCE_EXHAUSTED")]
        return True

    def _verify_duplicate(self, address: str, source: str, now: float, out: list[ev.Effect]) -> None:
        """A Hello says our node id is in use at `address`: dial it, and act only on what answers there."""
        where = clip(address, 80)
        if not address or address == self.address:
            out.append(ev.Refused("duplicate_unverified", source, f"a claim of our node id points at {where}"))
            return
        if address in self.verifying:
            return
        if self._pending_full():
            msg = f"not checking a claim of our node id at {where}: too many checks in flight"
            out.append(ev.Refused("pending_full", source, msg))
            return
        self.verifying[address] = now
        timeout = self.settings.rpc_timeout_s
        out.append(ev.SayHello(address, "verify", timeout, self.me.node_id))

    def _hello_answered(self, e: ev.HelloAnswered, out: list[ev.Effect]) -> None:
        if e.purpose == "verify":
            self.verifying.pop(e.address, None)
            info = e.info
            if e.identity is not None and e.identity != info.node_id:
                out.append(self._impostor(info.node_id, e.identity, "hello answer"))
            elif info.node_id == self.me.node_id and info.incarnation != self.me.incarnation:
                self._duplicate(info.incarnation, e.address, out)
            else:
                msg = (
                    f"refused a claim that our node id is in use at {clip(e.address, 80)}: "
                    f"{clip(repr(info.node_id), 80)} (incarnation {info.incarnation}) answers there"
                )
                out.append(ev.Refused("duplicate_unverified", e.address, msg))
            return
        if e.purpose == "join":
            self.hellos_in_flight.pop(e.address, None)
            if self._apply_answer(e, "hello", out):
                self._learn(e.info, e.now, out)
            return
        assert e.node_id is not None
        self.heartbeats_in_flight.discard(e.node_id)
        if e.node_id not in self.table.peers:
            return
        if e.info.node_id != e.node_id:
            # Another daemon now answers at that address: the peer we knew is gone from there.
            self._missed(e.node_id, e.address, "another node answers there", e.now, out)
            return
        if self._apply_answer(e, "heartbeat", out):
            self.table.heartbeat_ok(e.node_id, e.info.degree, e.now)
            self._learn(e.info, e.now, out)
        else:
            self._missed(e.node_id, e.address, "refused", e.now, out)

    def _apply_answer(self, e: ev.HelloAnswered, source: str, out: list[ev.Effect]) -> bool:
        """A Hello answer; True when the peer is (still) a compatible member."""
        info = e.info
        if e.identity is not None and e.identity != info.node_id:
            out.append(self._impostor(info.node_id, e.identity, "hello answer"))
            return False
        if not e.accepted:
            # We dialled this address ourselves: a daemon there with our id and another incarnation is real.
            mine = info.node_id == self.me.node_id and info.incarnation != self.me.incarnation
            if mine and e.reason.startswith(DUPLICATE_PREFIX):
                self._duplicate(info.incarnation, e.address, out)
            else:
                msg = f"peer {clip(info.node_id, 80)} at {e.address} refused us: {clip(e.reason)}"
                out.append(ev.Log("warning", msg, ("hello", e.address)))
            return False
        if info.node_id == self.me.node_id:
            return False  # ourselves, or a twin that accepts us: never a member
        problem = incompatibility(self.me, info)
        if problem:
            msg = f"ignoring peer {clip(info.node_id, 80)} at {e.address}: {problem}"
            out.append(ev.Log("warning", msg, ("incompatible", info.node_id)))
            if self.table.peer_gone(info.node_id) is not None:
                self._view_changed(e.now, out)
            return False
        # The address we dialled is known to work from here; the one the peer advertises may not be (NAT, a
        # container bridge, a 0.0.0.0 listener).
        self._peer_up(info.node_id, e.address, info.degree, info.incarnation, source, e.now, out)
        if info.node_id not in self.table.peers:
            return False  # the table is full
        self.catchup.report(info.node_id, info.step, info.epoch)
        self._decide_catchup(e.now, out)
        return True

    def _hello_failed(self, e: ev.HelloFailed, out: list[ev.Effect]) -> None:
        if e.purpose == "verify":
            self.verifying.pop(e.address, None)
            msg = f"refused a claim that our node id is in use at {clip(e.address, 80)}: nothing answers ({e.code})"
            out.append(ev.Refused("duplicate_unverified", e.address, msg))
            return
        if e.purpose == "join":
            self.hellos_in_flight.pop(e.address, None)
            out.append(ev.Log("debug", f"hello to {e.address} failed: {clip(e.detail)}"))
            return
        assert e.node_id is not None
        self.heartbeats_in_flight.discard(e.node_id)
        self._missed(e.node_id, e.address, e.code, e.now, out)

    def _missed(self, node_id: str, address: str, why: str, now: float, out: list[ev.Effect]) -> None:
        if not self.table.heartbeat_failed(node_id, now):
            return
        self.evictions += 1
        n = self.settings.liveness.evict_after
        out += [ev.Log("warning", f"evicted {node_id} ({address}): {n} heartbeats missed ({why})"), ev.Forget(node_id)]
        self._view_changed(now, out)

    def _duplicate(self, their_incarnation: int, address: str, out: list[ev.Effect]) -> None:
        """Two live daemons share our node id. The one that started later gives way, with a clear error."""
        if self.me.incarnation > their_incarnation:
            msg = f"another live peer at {address} already uses node_id {self.me.node_id!r}; "
            out.append(ev.Fatal(msg + "give this daemon another node_id"))
        else:
            msg = f"a newer daemon at {address} uses our node_id {self.me.node_id!r}; it will stop"
            out.append(ev.Log("warning", msg, ("dup", address)))

    def _impostor(self, claimed: str, identity: str, what: str) -> ev.Reply:
        """A claim that contradicts the caller's certificate: refused, and nothing changes."""
        msg = f"{what} claims node id {claimed!r} but the certificate says {identity!r}"
        return ev.Reply(False, msg, "PERMISSION_DENIED")

    # ---------------------------------------------------------------------------------------------- pushes
    def _state_received(self, e: ev.StateReceived, out: list[ev.Effect]) -> None:
        if e.identity is not None and e.identity != e.sender_id:
            out.append(self._impostor(e.sender_id, e.identity, "push"))
            return
        if self.departed.get(e.sender_id) == e.incarnation:
            out.append(ev.Reply(True, "sent before its goodbye"))
            return
        rec = self.table.peers.get(e.sender_id)
        if rec is None and e.address:
            # Delivered (the algorithm mixes members only), but the sender joins once its address answers us.
            address = reachable_address(e.address, e.transport_peer) if e.transport_peer else e.address
            self._say_hello(address, e.sender_id, e.now, out)
        elif rec is not None and rec.incarnation != e.incarnation and e.address:
            address = reachable_address(e.address, e.transport_peer) if e.transport_peer else e.address
            self._peer_up(e.sender_id, address, e.degree, e.incarnation, "push", e.now, out)
        else:
            degree_changed = rec is not None and rec.degree != e.degree
            readmitted = self.table.heard_from(e.sender_id, e.degree, e.now)
            if readmitted:
                self._readmitted(e.sender_id, e.now, out)
            # A changed advertised degree changes the Metropolis-Hastings weights.
            if readmitted or degree_changed:
                self._view_changed(e.now, out)
        out += [ev.Deliver(e.sender_id, e.incarnation, e.degree, e.now), ev.Reply(True)]

    # ---------------------------------------------------------------------------------------- membership
    def _peer_up(
        self, node_id: str, address: str, degree: int, incarnation: int, source: str, now: float, out: list[ev.Effect]
    ) -> None:
        if self.departed.get(node_id) == incarnation:
            return
        if node_id not in self.table.peers and not self._make_room(node_id, out):
            return
        self.departed.pop(node_id, None)  # a new incarnation is welcome
        upd = self.table.peer_up(node_id, address, degree, incarnation, now, source)
        if upd.new:
            out.append(ev.Log("info", f"new peer {node_id} at {address} (via {source})"))
        elif upd.restarted:
            out += [ev.Log("info", f"peer {node_id} restarted (new incarnation) at {address}"), ev.Forget(node_id)]
        if upd.readmitted:
            self._readmitted(node_id, now, out)
        if upd.old_address:
            out.append(ev.CloseChannel(upd.old_address))
        self._view_changed(now, out)

    def _make_room(self, node_id: str, out: list[ev.Effect]) -> bool:
        """The table is bounded: a full table gives up its longest-evicted record, or refuses the newcomer."""
        peers = self.table.peers
        if len(peers) < self.settings.admission.max_peers:
            return True
        evicted = [r for r in peers.values() if r.evicted]
        if not evicted:
            msg = f"peer table full ({len(peers)} peers): not admitting {clip(node_id, 80)}"
            out.append(ev.Refused("table_full", "table", msg))
            return False
        oldest = min(evicted, key=lambda r: r.evicted_at)
        self.table.peer_gone(oldest.node_id)
        self.catchup.progress.pop(oldest.node_id, None)
        out += [ev.Log("info", f"forgot evicted peer {oldest.node_id} to make room"), ev.Forget(oldest.node_id)]
        return True

    def _readmitted(self, node_id: str, now: float, out: list[ev.Effect]) -> None:
        self.readmissions += 1
        out.append(ev.Log("info", f"re-admitted {node_id}: it answers again"))
        line = self.catchup.on_readmitted(now)
        if line:
            out.append(ev.Log("info", line))

    def _view_changed(self, now: float, out: list[ev.Effect]) -> None:
        view = self.table.view()
        self.catchup.isolation(bool(view.degrees), now)
        if view == self._last_view:
            return
        self._last_view = view
        known = bool(view.degrees) and len(self.table.members()) + 1 >= self.settings.expected_members
        out.append(ev.ViewChanged(view, known))

    # ------------------------------------------------------------------------------------------- catch-up
    def _decide_catchup(self, now: float, out: list[ev.Effect]) -> None:
        live = {j for j, rec in self.table.peers.items() if not rec.evicted}
        decision = self.catchup.decide(now, self.progress.epoch, live, self.table.neighbours())
        if isinstance(decision, Fetch):
            address = self.table.peers[decision.node_id].address
            out.append(ev.StartCatchUp(decision.node_id, address, decision.step, decision.epoch))
        elif isinstance(decision, Finish):
            if decision.log:
                out.append(ev.Log("info", decision.log))
            out.append(ev.CatchUpDone(decision.reason))
