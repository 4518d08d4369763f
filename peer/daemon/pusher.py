"""Outgoing gossip: push what the training thread publishes.

Two paths. Mix-mode algorithms publish one latest-wins payload for every neighbour the core names (`publish`).
Step-mode algorithms hand over per-destination `Send`s (`enqueue`): each destination has its own ordered
queue, drained by one task; a reliable send (non-empty key) reports its delivery through `on_ack` (a
successful Push RPC is the acknowledgement), and the algorithm retransmits what stays unacknowledged. An
unreliable one is latest-wins per destination: a newer unsent one replaces it.

Pushes run as tasks of the daemon's TaskGroup, one per neighbour at a time; a slow or dead neighbour never
delays the others. Each push has a deadline, is retried with full-jitter backoff on transient errors (never
once a newer state supersedes it), and its outcome feeds the gossip core's circuit breaker.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from peer.algorithms import Payload, Send
from peer.algorithms.delta import DeltaSender, parse_compression
from peer.config import PeerConfig
from peer.core.backoff import retry_delay, should_retry
from peer.core.events import Effect, Input, SendDropped, SendFailed, SendOk
from peer.core.faults import FaultInjector
from peer.core.gossip import GossipCore
from peer.daemon.handoff import LatestHandoff
from peer.daemon.metrics import Counters
from peer.errors import SendError
from peer.net.client import Client
from peer.net.encoder import encode_frames
from peer.net.wire import Envelope

Encoded = tuple[Any, list[bytes], int]  # (PushHeader, serialized stream messages, total bytes)
# How often the mix-mode loop looks again at neighbours it could not push to (breaker open, backing off).
RETRY_POLL_S = 0.05
_ANY_NEWER_SEQ = 1 << 62  # a sequence number above any real one: "could this link take a new state now?"


class Pusher:
    def __init__(
        self,
        cfg: PeerConfig,
        core: GossipCore,
        dispatch: Callable[[Input], list[Effect]],
        client: Client,
        counters: Counters,
        faults: FaultInjector,
        envelope: Callable[[], Envelope],
        sleep: Callable[[float], Awaitable[None]],
        stopping: Callable[[], bool],
        rng: random.Random,
    ) -> None:
        self.cfg = cfg
        self.core = core  # queries only; every outcome goes in through `dispatch`
        self.dispatch = dispatch
        self.client = client
        self.counters = counters
        self.faults = faults
        self.envelope = envelope
        self.sleep = sleep
        self.stopping = stopping
        self.rng = rng
        self.outbox: Payload | None = None
        self.outbox_event = asyncio.Event()
        # The training thread's payloads (`publish_threadsafe`): it wakes the loop only while a link is free.
        loop = asyncio.get_running_loop()  # built on the loop; `put` runs on the training thread
        self.handoff: LatestHandoff[Payload] = LatestHandoff(lambda: loop, self.publish)
        self.in_flight: set[str] = set()
        self._encoded: tuple[int, Encoded] | None = None
        self.on_ack: Callable[[str, tuple[int, ...]], None] = lambda to, key: None
        self.queues: dict[str, deque[Send]] = {}
        self.draining: set[str] = set()
        self._tg: asyncio.TaskGroup | None = None
        self._encoded_sends: dict[int, tuple[Payload, Encoded]] = {}  # id(payload) -> encoding, shared by dests
        compressor = parse_compression(cfg.gossip.compression)
        # gossip.compression: one encoding per destination (a delta against what it holds), not one for all.
        self.codec = DeltaSender(compressor) if compressor is not None else None

    # ------------------------------------------------------------------------------- step mode: per destination
    def enqueue(self, sends: list[Send]) -> None:
        """Queue step-mode sends (on the loop thread). A reliable send already queued is not queued twice; an
        unreliable one replaces the unsent older one to the same destination."""
        for send in sends:
            q = self.queues.setdefault(send.to, deque())
            if send.key:
                if any(s.key == send.key and s.payload.kind == send.payload.kind for s in q):
                    continue
            else:
                for old in [s for s in q if not s.key]:
                    q.remove(old)
            q.append(send)
            if send.to not in self.draining and self._tg is not None:
                self.draining.add(send.to)
                self._tg.create_task(self._drain(send.to))

    async def _drain(self, to: str) -> None:
        try:
            q = self.queues[to]
            while q and not self.stopping():
                send = q[0]
                delivered = await self._send_one(send)
                if q and q[0] is send:
                    q.popleft()
                if delivered and send.key:
                    self.on_ack(to, send.key)
            if not any(q for q in self.queues.values()):
                self._encoded_sends.clear()
        finally:
            self.draining.discard(to)

    async def _send_one(self, send: Send) -> bool:
        """One attempt series for one send; True once the receiver accepted it."""
        to = send.to
        address = self.core.address_of(to)
        if address is None or not self.core.may_send(to, time.monotonic()):
            return False  # unknown or backing off: the algorithm retransmits later
        if self.faults.enabled and not await self._survives_faults(to, None):
            return False
        cached = self._encoded_sends.get(id(send.payload))
        if self.codec is not None:
            cached = (send.payload, await self._encode_for(to, send.payload))
        elif cached is None or cached[0] is not send.payload:
            cached = (send.payload, await self._encode_payload(send.payload))
            self._encoded_sends[id(send.payload)] = cached
        header, frames, total = cached[1]
        g = self.cfg.gossip
        for attempt in range(g.max_attempts):
            try:
                await self._timed_push(address, header, frames, total, to)
            except SendError as exc:
                # Step-mode messages are idempotent at the receiver (de-duplicated by key or ordered by seq).
                if attempt + 1 < g.max_attempts and should_retry(
                    exc.code, attempt, max_attempts=g.max_attempts, idempotent=True, details=str(exc)
                ):
                    self.counters.add(send_retries=1)
                    await self.sleep(retry_delay(attempt, base_s=g.backoff_base_s, cap_s=g.backoff_cap_s, rng=self.rng))
                    continue
                self.counters.add(send_failures=1)
                self._link_lost(to)
                self.dispatch(SendFailed(to, exc.code, time.monotonic(), detail=str(exc)))
                return False
            self._link_acked(to)
            self.dispatch(SendOk(to, send.payload.seq, time.monotonic()))
            self.counters.add(bytes_sent=total, messages_sent=1)
            return True
        return False

    def publish(self, payload: Payload) -> None:
        """The newest payload supersedes any older one that was not sent yet (on the loop thread)."""
        self.outbox = payload
        self.outbox_event.set()

    def _newest(self) -> Payload | None:
        taken = self.handoff.take()
        if taken is not None:
            self.outbox = taken
        return self.outbox

    async def loop(self, tg: asyncio.TaskGroup) -> None:
        self._tg = tg
        for to, q in self.queues.items():  # sends queued before the loop started
            if q and to not in self.draining:
                self.draining.add(to)
                tg.create_task(self._drain(to))
        await self._mix_mode_loop(tg)

    async def _mix_mode_loop(self, tg: asyncio.TaskGroup) -> None:
        """Push each new payload to every neighbour as soon as the previous push to it finished (latest wins:
        a state that was superseded while a push was in flight is never sent), so pushes follow training
        rounds and are limited by what each link carries. `gossip.interval_s` > 0 adds a minimum spacing.
        Also wakes every RETRY_POLL_S to retry neighbours that were skipped (breaker open)."""
        interval = self.cfg.gossip.interval_s
        while not self.stopping():
            started = time.monotonic()
            self.outbox_event.clear()
            payload = self._newest()
            if payload is not None:
                due = self.core.sends_due(started, payload.seq, self.in_flight)
                if due:
                    for j in due:
                        encoded = await self._encode_for(j, payload)
                        self.in_flight.add(j)
                        tg.create_task(self.push(j, payload.seq, encoded))
            # Woken by the training thread only while some link could take a newer state now; a push that ends
            # wakes us itself (see push), and the retry poll looks again at neighbours that were backing off.
            free = bool(self.core.sends_due(time.monotonic(), _ANY_NEWER_SEQ, self.in_flight))
            if self.handoff.want(free) and free:
                self.outbox_event.set()
            if interval > 0:
                await self.sleep(interval - (time.monotonic() - started))
            if not self.outbox_event.is_set():
                try:
                    await asyncio.wait_for(self.outbox_event.wait(), timeout=max(interval, RETRY_POLL_S))
                except TimeoutError:
                    pass

    async def _encode(self, payload: Payload) -> Encoded:
        """Encode once per payload, whatever the number of neighbours; big payloads off the loop."""
        if self._encoded is not None and self._encoded[0] == payload.seq:
            return self._encoded[1]
        encoded = await self._encode_payload(payload)
        self._encoded = (payload.seq, encoded)
        return encoded

    async def _encode_for(self, to: str, payload: Payload) -> Encoded:
        """The encoding for one destination: shared by all without compression, a delta of its own with it."""
        if self.codec is None:
            return await self._encode(payload)
        big = sum(t.numel() for t in payload.tensors.values()) > (1 << 18)
        wire = await asyncio.to_thread(self.codec.encode, to, payload) if big else self.codec.encode(to, payload)
        return await self._encode_payload(wire)

    async def _encode_payload(self, payload: Payload) -> Encoded:
        env = self.envelope()
        big = sum(t.numel() * t.element_size() for t in payload.tensors.values()) > (1 << 20)
        fn = lambda: encode_frames(env, payload, chunk_bytes=self.cfg.gossip.chunk_bytes)  # noqa: E731
        header, frames = await asyncio.to_thread(fn) if big else fn()
        return header, frames, int(header.total_bytes)

    async def push(self, node_id: str, seq: int, encoded: Encoded) -> None:
        header, frames, total = encoded
        g = self.cfg.gossip
        attempt = 0
        try:
            if self.faults.enabled and not await self._survives_faults(node_id, seq):
                return
            while True:
                address = self.core.address_of(node_id)
                if address is None or self.stopping():
                    return
                try:
                    await self._timed_push(address, header, frames, total, node_id)
                except SendError as exc:
                    latest = self._newest()
                    newer = latest is not None and latest.seq > seq
                    # Full-state pushes are idempotent (the receiver drops old sequence numbers), so a timed-out
                    # push may be retried; but never once a newer state supersedes this one.
                    if not newer and should_retry(
                        exc.code, attempt, max_attempts=g.max_attempts, idempotent=True, details=str(exc)
                    ):
                        self.counters.add(send_retries=1)
                        attempt += 1
                        await self.sleep(
                            retry_delay(attempt - 1, base_s=g.backoff_base_s, cap_s=g.backoff_cap_s, rng=self.rng)
                        )
                        continue
                    self.counters.add(send_failures=1)
                    self._link_lost(node_id)
                    self.dispatch(SendFailed(node_id, exc.code, time.monotonic(), detail=str(exc)))
                    return
                self._link_acked(node_id)
                self.dispatch(SendOk(node_id, seq, time.monotonic()))
                self.counters.add(bytes_sent=total, messages_sent=1)
                return
        finally:
            self.in_flight.discard(node_id)
            latest = self._newest()
            # This link is free: a newer state waiting goes now, and the training thread's next one wakes us.
            waiting = self.handoff.want(True)
            if waiting or (latest is not None and latest.seq > seq):
                self.outbox_event.set()

    def _link_acked(self, to: str) -> None:
        if self.codec is not None:
            self.codec.delivered(to)

    def _link_lost(self, to: str) -> None:
        """The push may have arrived or not: with compression, the next message to `to` is a key frame."""
        if self.codec is not None:
            self.codec.failed(to)

    async def _timed_push(self, address: str, header: Any, frames: list[bytes], total: int, node_id: str) -> None:
        """One Push RPC; its duration goes into the push histogram by outcome (Prometheus)."""
        started = time.monotonic()
        outcome = "error"
        try:
            await self.client.push(address, frames, total, node_id)
            outcome = "ok"
        finally:
            self.counters.observe_push(outcome, time.monotonic() - started)

    async def _survives_faults(self, node_id: str, seq: int | None) -> bool:
        """Injected faults (`faults:` config): an outage fails the push as a dead link would (so backoff and
        the breaker are exercised), a random drop loses the message silently, a delay holds it back."""
        decision = self.faults.decide(node_id, time.time())
        if decision.reason == "outage":
            self.counters.add(send_failures=1)
            self.dispatch(SendFailed(node_id, "UNAVAILABLE", time.monotonic()))
            return False
        if decision.drop:
            if seq is not None:
                self.dispatch(SendDropped(node_id, seq, time.monotonic()))
            return False
        if decision.delay_s > 0:
            await self.sleep(decision.delay_s)
        return True
