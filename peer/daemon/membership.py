"""The membership shell: turns discovery candidates, Hellos and heartbeats into inputs of the gossip core.

mDNS and static peers only propose candidates; a candidate joins the view once it answers a Hello with a
compatible protocol, schema and algorithm. Liveness comes from heartbeats (Hello calls with a short deadline)
and from pushes: after `membership.evict_after` missed heartbeats a peer is evicted from the topology, and it is
re-admitted as soon as it answers again. The decisions live in `peer.core.gossip.GossipCore`; this module performs the
calls and reports what changed through callbacks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from peer import PROTOCOL_VERSION
from peer.config import PeerConfig
from peer.core.gossip import GossipCore
from peer.errors import PeerError, SendError, StartupError
from peer.logs import OnceLogger
from peer.net.addresses import Candidate, StaticPeers
from peer.net.client import Client
from peer.v1 import gossip_pb2

DUPLICATE_PREFIX = "duplicate node id"


def reachable_address(advertised: str, peer: str) -> str:
    """The address to dial a peer that said Hello: its advertised one, unless that names an unspecified or
    loopback host while the call came from elsewhere; then the caller's IP with the advertised port."""
    host, _, port = advertised.rpartition(":")
    kind, _, rest = peer.partition(":")
    if kind != "ipv4" or not port:
        return advertised
    caller_ip = rest.rpartition(":")[0]
    if host in ("0.0.0.0", "", "localhost") or (host.startswith("127.") and not caller_ip.startswith("127.")):
        return f"{caller_ip}:{port}"
    return advertised


@dataclass
class Identity:
    """What this daemon says about itself in every Hello."""

    node_id: str
    fingerprint: str
    algorithm: str
    incarnation: int
    address: str = ""


@dataclass
class MembershipEvents:
    """Callbacks into the daemon shell. All run on the event loop and must not block."""

    view_changed: Callable[[], None]
    forget: Callable[[str], None]  # drop what the algorithm cached for this peer
    readmitted: Callable[[str], None]
    fatal: Callable[[PeerError], None]


class Membership:
    def __init__(
        self,
        cfg: PeerConfig,
        core: GossipCore,
        client: Client,
        identity: Identity,
        events: MembershipEvents,
        progress: Callable[[], tuple[int, float]],
        sleep: Callable[[float], Awaitable[None]],
        stopping: Callable[[], bool],
        log: logging.LoggerAdapter[logging.Logger],
    ) -> None:
        self.cfg = cfg
        self.core = core
        self.client = client
        self.me = identity
        self.events = events
        self.progress = progress
        self.sleep = sleep
        self.stopping = stopping
        self.log = log
        self.once = OnceLogger(log)
        self.candidates: asyncio.Queue[Candidate] = asyncio.Queue()
        self.closed_channels: asyncio.Queue[str] = asyncio.Queue()
        self._hello_in_progress: set[str] = set()
        self._heartbeats_in_flight: set[str] = set()
        self.peer_progress: dict[str, tuple[int, float]] = {}  # node id -> (step, epoch) from its last Hello
        # Incarnations that said goodbye: a push of theirs still in flight must not re-add them.
        self.departed: dict[str, int] = {}
        self.evictions = 0
        self.readmissions = 0

    # -------------------------------------------------------------------------------------------- hello out
    def hello_request(self) -> gossip_pb2.HelloRequest:
        return gossip_pb2.HelloRequest(
            node_id=self.me.node_id,
            protocol_version=PROTOCOL_VERSION,
            schema_fingerprint=self.me.fingerprint,
            algorithm=self.me.algorithm,
            degree=self.core.degree(),
            address=self.me.address,
            incarnation=self.me.incarnation,
            step=self.progress()[0],
            epoch=self.progress()[1],
        )

    def incompatibility(self, proto: str, fingerprint: str, algorithm: str) -> str:
        if proto != PROTOCOL_VERSION:
            return f"protocol {proto!r} != ours {PROTOCOL_VERSION!r}"
        if fingerprint != self.me.fingerprint:
            return f"schema fingerprint {fingerprint} != ours {self.me.fingerprint} (a different model?)"
        if algorithm != self.me.algorithm:
            return f"algorithm {algorithm!r} != ours {self.me.algorithm!r}"
        return ""

    async def hello_loop(self, tg: asyncio.TaskGroup) -> None:
        while True:
            cand = await self.candidates.get()
            if cand.address in self._hello_in_progress or cand.address == self.me.address:
                continue
            rec = self.core.peers.get(cand.node_id) if cand.node_id else None
            if rec is not None and rec.address == cand.address and not rec.evicted and rec.misses == 0:
                continue
            self._hello_in_progress.add(cand.address)
            tg.create_task(self._say_hello(cand))

    async def _say_hello(self, cand: Candidate) -> None:
        try:
            resp = await self.client.hello(cand.address, self.hello_request())
        except SendError as exc:
            self.log.debug("hello to %s failed: %s", cand.address, exc)
            return
        finally:
            self._hello_in_progress.discard(cand.address)
        self._on_hello_response(resp, cand.address, "hello")

    def _on_hello_response(self, resp: gossip_pb2.HelloResponse, address: str, source: str) -> bool:
        """Apply a Hello answer; returns True when the peer is (still) a compatible member."""
        if not resp.accepted:
            if resp.reason.startswith(DUPLICATE_PREFIX):
                self._duplicate(resp.incarnation, address)
            else:
                self.once.warning(
                    ("hello", address), "peer %s at %s refused us: %s", resp.node_id, address, resp.reason
                )
            return False
        problem = self.incompatibility(resp.protocol_version, resp.schema_fingerprint, resp.algorithm)
        if problem:
            self.once.warning(
                ("incompatible", resp.node_id), "ignoring peer %s at %s: %s", resp.node_id, address, problem
            )
            if self.core.peer_gone(resp.node_id) is not None:
                self.events.view_changed()
            return False
        self.peer_progress[resp.node_id] = (resp.step, resp.epoch)
        # The address we dialled is known to work from here; the one the peer advertises may not be (NAT, a
        # container bridge, a 0.0.0.0 listener).
        self.peer_up(resp.node_id, address, resp.degree, resp.incarnation, source)
        return True

    def _duplicate(self, their_incarnation: int, address: str) -> None:
        """Two live daemons share our node id. The one that started later gives way, with a clear error."""
        if self.me.incarnation > their_incarnation:
            self.events.fatal(
                StartupError(
                    f"another live peer at {address} already uses node_id {self.me.node_id!r}; "
                    "give this daemon another node_id"
                )
            )
        else:
            self.once.warning(
                ("dup", address), "a newer daemon at %s uses our node_id %r; it will stop", address, self.me.node_id
            )

    def has_departed(self, node_id: str, incarnation: int) -> bool:
        return self.departed.get(node_id) == incarnation

    def peer_up(self, node_id: str, address: str, degree: int, incarnation: int, source: str) -> None:
        if self.has_departed(node_id, incarnation):
            return
        self.departed.pop(node_id, None)  # a new incarnation is welcome
        old = self.core.peers.get(node_id)
        old_address = old.address if old else None
        was_evicted = old is not None and old.evicted
        upd = self.core.peer_up(node_id, address, degree, incarnation, time.monotonic(), source)
        if upd.new:
            self.log.info("new peer %s at %s (via %s)", node_id, address, source)
        elif upd.restarted:
            self.log.info("peer %s restarted (new incarnation) at %s", node_id, address)
            self.events.forget(node_id)
        if was_evicted:
            self._readmitted(node_id)
        if upd.redial and old_address and old_address != address:
            self.closed_channels.put_nowait(old_address)
        self.events.view_changed()

    def _readmitted(self, node_id: str) -> None:
        self.readmissions += 1
        self.log.info("re-admitted %s: it answers again", node_id)
        self.events.readmitted(node_id)

    # --------------------------------------------------------------------------------------------- hello in
    def handle_hello(self, request: gossip_pb2.HelloRequest, peer: str) -> gossip_pb2.HelloResponse:
        mine = self.hello_request()
        reply = gossip_pb2.HelloResponse(
            node_id=mine.node_id,
            protocol_version=mine.protocol_version,
            schema_fingerprint=mine.schema_fingerprint,
            algorithm=mine.algorithm,
            degree=mine.degree,
            address=mine.address,
            incarnation=mine.incarnation,
            step=mine.step,
            epoch=mine.epoch,
            accepted=True,
        )
        if request.node_id == self.me.node_id:
            if request.incarnation != self.me.incarnation:
                reply.accepted = False
                reply.reason = f"{DUPLICATE_PREFIX} {request.node_id!r}: already in use at {self.me.address}"
                self._duplicate(request.incarnation, reachable_address(request.address, peer))
            return reply
        problem = self.incompatibility(request.protocol_version, request.schema_fingerprint, request.algorithm)
        if problem:
            self.once.warning(
                ("incompatible", request.node_id),
                "ignoring hello from %s at %s: %s",
                request.node_id,
                request.address,
                problem,
            )
            reply.accepted, reply.reason = False, problem
            return reply
        self.peer_progress[request.node_id] = (request.step, request.epoch)
        self.peer_up(
            request.node_id, reachable_address(request.address, peer), request.degree, request.incarnation, "hello-in"
        )
        return reply

    # ----------------------------------------------------------------------------------- discovery sources
    def on_mdns_candidate(self, cand: Candidate) -> None:
        cluster = cand.txt.get("cluster", "default")
        if cluster != self.cfg.discovery.cluster:
            self.once.warning(
                ("cluster", cand.node_id or cand.address),
                "ignoring peer %s at %s: cluster %r != ours %r",
                cand.node_id,
                cand.address,
                cluster,
                self.cfg.discovery.cluster,
            )
            return
        self.candidates.put_nowait(cand)

    def on_mdns_removed(self, node_id: str) -> None:
        rec = self.core.peer_gone(node_id)
        if rec is not None:
            self.departed[node_id] = rec.incarnation
            self.log.info("peer %s left (mDNS goodbye)", node_id)
            self.events.forget(node_id)
            self.events.view_changed()

    async def static_loop(self) -> None:
        if not self.cfg.discovery.static_peers:
            return
        static = StaticPeers(self.cfg.discovery.static_peers, self.candidates.put_nowait)
        while not self.stopping():
            known = {r.address for r in self.core.peers.values() if not r.evicted}
            for cand in static.candidates():
                if cand.address not in known:
                    self.candidates.put_nowait(cand)
            await self.sleep(self.cfg.discovery.hello_retry_s)

    # --------------------------------------------------------------------------------------------- liveness
    async def heartbeat_loop(self, tg: asyncio.TaskGroup) -> None:
        tick = min(0.5, self.cfg.membership.heartbeat_interval_s / 4)
        while not self.stopping():
            for node_id in self.core.heartbeats_due(time.monotonic(), self._heartbeats_in_flight):
                self._heartbeats_in_flight.add(node_id)
                tg.create_task(self._heartbeat(node_id))
            await self.sleep(tick)

    async def _heartbeat(self, node_id: str) -> None:
        try:
            rec = self.core.peers.get(node_id)
            if rec is None:
                return
            address = rec.address
            timeout_s = min(self.cfg.gossip.rpc_timeout_s, self.cfg.membership.heartbeat_interval_s)
            try:
                resp = await self.client.hello(address, self.hello_request(), timeout_s=timeout_s)
            except SendError as exc:
                if self.core.heartbeat_failed(node_id, time.monotonic()):
                    self.evictions += 1
                    self.log.warning(
                        "evicted %s (%s): %d heartbeats missed (%s)",
                        node_id,
                        address,
                        self.cfg.membership.evict_after,
                        exc.code,
                    )
                    self.events.forget(node_id)
                    self.events.view_changed()
                return
            if resp.node_id != node_id:
                # Another daemon now answers at that address: the peer we knew is gone from there.
                self.core.heartbeat_failed(node_id, time.monotonic())
                return
            if self._on_hello_response(resp, address, "heartbeat"):
                self.core.heartbeat_ok(node_id, resp.degree, time.monotonic())
            elif self.core.heartbeat_failed(node_id, time.monotonic()):
                self.evictions += 1
                self.events.forget(node_id)
                self.events.view_changed()
        finally:
            self._heartbeats_in_flight.discard(node_id)

    def heard_from(self, node_id: str, degree: int) -> None:
        """Any valid push is a sign of life (and re-admits an evicted peer). A changed advertised degree changes
        the Metropolis-Hastings weights, so the view is refreshed then too (else the training thread would keep
        mixing with the old degree while pushes keep the peer's heartbeats, and their Hello, away)."""
        rec = self.core.peers.get(node_id)
        degree_changed = rec is not None and rec.degree != degree
        readmitted = self.core.heard_from(node_id, degree, time.monotonic())
        if readmitted:
            self._readmitted(node_id)
        if readmitted or degree_changed:
            self.events.view_changed()
