"""Outgoing gossip: push each payload the training thread publishes to the neighbours the core names.

Pushes run as tasks of the daemon's TaskGroup, one per neighbour at a time; a slow or dead neighbour never
delays the others. Each push has a deadline, is retried with full-jitter backoff on transient errors (never
once a newer state supersedes it), and its outcome feeds the gossip core's circuit breaker.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from peer.algorithms import Payload
from peer.codec import Envelope, encode, iter_requests
from peer.config import PeerConfig
from peer.errors import SendError
from peer.faults import FaultInjector
from peer.gossip import GossipCore, retry_delay, should_retry
from peer.logs import OnceLogger
from peer.metrics import Counters
from peer.transport import Client

Encoded = tuple[Any, list[bytes], int]  # (PushHeader, chunks, total bytes)


class Pusher:
    def __init__(
        self,
        cfg: PeerConfig,
        core: GossipCore,
        client: Client,
        counters: Counters,
        faults: FaultInjector,
        envelope: Callable[[], Envelope],
        sleep: Callable[[float], Awaitable[None]],
        stopping: Callable[[], bool],
        log: logging.LoggerAdapter[logging.Logger],
        rng: random.Random,
    ) -> None:
        self.cfg = cfg
        self.core = core
        self.client = client
        self.counters = counters
        self.faults = faults
        self.envelope = envelope
        self.sleep = sleep
        self.stopping = stopping
        self.once = OnceLogger(log)
        self.rng = rng
        self.outbox: Payload | None = None
        self.outbox_event = asyncio.Event()
        self.in_flight: set[str] = set()
        self._encoded: tuple[int, Encoded] | None = None
        self.before_round: Callable[[], None] = lambda: None  # e.g. advance a time-varying topology

    def publish(self, payload: Payload) -> None:
        """The newest payload supersedes any older one that was not sent yet (on the loop thread)."""
        self.outbox = payload
        self.outbox_event.set()

    async def loop(self, tg: asyncio.TaskGroup) -> None:
        """Push each new payload as soon as it is published (a stale copy at the receiver slows consensus),
        but no more often than `gossip.interval_s` per neighbour. Also wakes every interval to retry neighbours
        that were skipped (breaker open, push in flight)."""
        interval = self.cfg.gossip.interval_s
        while not self.stopping():
            started = time.monotonic()
            self.before_round()
            self.outbox_event.clear()
            payload = self.outbox
            if payload is not None:
                due = self.core.sends_due(started, payload.seq, self.in_flight)
                if due:
                    encoded = await self._encode(payload)
                    for j in due:
                        self.in_flight.add(j)
                        tg.create_task(self.push(j, payload.seq, encoded))
            await self.sleep(interval - (time.monotonic() - started))
            if not self.outbox_event.is_set():
                try:
                    await asyncio.wait_for(self.outbox_event.wait(), timeout=interval)
                except TimeoutError:
                    pass

    async def _encode(self, payload: Payload) -> Encoded:
        """Encode once per payload, whatever the number of neighbours; big payloads off the loop."""
        if self._encoded is not None and self._encoded[0] == payload.seq:
            return self._encoded[1]
        env = self.envelope()
        big = sum(t.numel() * t.element_size() for t in payload.tensors.values()) > (1 << 20)
        fn = lambda: encode(env, payload, chunk_bytes=self.cfg.gossip.chunk_bytes)  # noqa: E731
        header, chunks = await asyncio.to_thread(fn) if big else fn()
        encoded = (header, chunks, int(header.total_bytes))
        self._encoded = (payload.seq, encoded)
        return encoded

    async def push(self, node_id: str, seq: int, encoded: Encoded) -> None:
        header, chunks, total = encoded
        g = self.cfg.gossip
        attempt = 0
        try:
            if self.faults.enabled and not await self._survives_faults(node_id, seq):
                return
            while True:
                rec = self.core.peers.get(node_id)
                if rec is None or self.stopping():
                    return
                try:
                    await self.client.push(rec.address, iter_requests(header, chunks), total, node_id)
                except SendError as exc:
                    newer = self.outbox is not None and self.outbox.seq > seq
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
                    skip = self.core.send_failed(node_id, exc.code, time.monotonic(), self.rng)
                    self.once.warning(
                        ("send", node_id), "%s%s", exc, f"; skipping {node_id} for {skip:.1f} s" if skip else ""
                    )
                    return
                self.core.send_ok(node_id, seq, time.monotonic())
                self.once.forget(("send", node_id))
                self.counters.add(bytes_sent=total, messages_sent=1)
                return
        finally:
            self.in_flight.discard(node_id)

    async def _survives_faults(self, node_id: str, seq: int) -> bool:
        """Injected faults (`faults:` config): an outage fails the push as a dead link would (so backoff and
        the breaker are exercised), a random drop loses the message silently, a delay holds it back."""
        decision = self.faults.decide(node_id, time.time())
        if decision.reason == "outage":
            self.counters.add(send_failures=1)
            self.core.send_failed(node_id, "UNAVAILABLE", time.monotonic(), self.rng)
            return False
        if decision.drop:
            rec = self.core.peers.get(node_id)
            if rec is not None:
                rec.last_sent_seq = max(rec.last_sent_seq, seq)
            return False
        if decision.delay_s > 0:
            await self.sleep(decision.delay_s)
        return True
