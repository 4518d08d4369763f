"""Catch-up: a peer whose model is stale fetches a neighbour's model and progress (FetchState) and adopts it.

When: a new peer, or one back from a long time without neighbours (its state is older than
catchup.max_state_age_s), takes any neighbour at least an epoch ahead; any peer, however fresh its state, takes
a neighbour more than catchup.max_epochs_behind ahead (after a restart, or when it straggles). The transfer is
chunked and validated like a push; the neighbours only stream their latest state and never wait for us.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from peer.errors import PayloadError, SendError
from peer.net.assembler import ReceiveLimits
from peer.v1 import gossip_pb2

if TYPE_CHECKING:
    from peer.daemon.node import Node


class CatchUp:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.running = False

    def on_readmitted(self, isolated_since: float | None) -> None:
        """A neighbour answers again: catch up if we spent longer than max_state_age_s without any."""
        cfg = self.node.cfg.catchup
        if (
            isolated_since is not None
            and cfg.enabled
            and time.monotonic() - isolated_since > cfg.max_state_age_s
            and not self.running
            and self.node._tg is not None
        ):
            self.node.log.info("back from %.0f s without neighbours: catching up", time.monotonic() - isolated_since)
            self.running = True
            self.node._tg.create_task(self.run(starting=False, old=True))

    def needed_at_start(self) -> bool:
        """Whether a starting peer should look for a neighbour to catch up with (it may find none)."""
        if not self.node.cfg.catchup.enabled or self.node.worker.done:
            return False
        # Nobody to fetch from: don't make a lone peer wait.
        return self.node.cfg.discovery.mdns or bool(self.node.cfg.discovery.static_peers)

    def check_progress(self) -> None:
        """A peer that falls more than catchup.max_epochs_behind behind a neighbour while training (a straggler)
        rejoins the cluster's progress: training on alone after the others finished would pull the consensus
        towards its own classes. Progress comes with every heartbeat answer."""
        if not self.node.cfg.catchup.enabled or self.node.worker.done or self.running or self.node._tg is None:
            return
        if self.node.algorithm.owns_local_update:
            return  # step-mode algorithms keep their own state once started (see TrainingWorker)
        mine = self.node.trainer.step_count / self.node.trainer.steps_per_epoch
        lead = max(
            (e for j, (_, e) in self.node.membership.peer_progress.items() if j in self.node.core.neighbours()),
            default=0.0,
        )
        if lead > mine + self.node.cfg.catchup.max_epochs_behind:
            self.running = True  # before the task starts, so that one check cannot start two
            self.node._tg.create_task(self.run(starting=False, old=False))

    def state_is_old(self) -> bool:
        saved = self.node._state_saved_unix_s
        return saved is None or time.time() - saved > self.node.cfg.catchup.max_state_age_s

    async def run(self, *, starting: bool, old: bool) -> None:
        """Fetch the most advanced neighbour's model (chunked, verified like a push) and adopt it, with its
        progress in epochs, when our state is old (a new peer, a long outage) and the neighbour is ahead, or
        when the neighbour is more than catchup.max_epochs_behind ahead (a restart that cost us time: training
        alone at the end on biased data would pull the consensus towards our classes).

        A starting peer's training waits for this at most catchup.wait_s; it never blocks the others, whose
        servers only stream their latest state.
        """
        self.running = True
        deadline = time.monotonic() + self.node.cfg.catchup.wait_s
        try:
            while not self.node._stop.is_set():
                mine = self.node.trainer.step_count / self.node.trainer.steps_per_epoch
                # An old state adopts any neighbour at least an epoch ahead (peers of a fresh cluster that start
                # a moment apart don't); a fresh one only a neighbour far ahead.
                lead = (
                    min(1.0, self.node.cfg.catchup.max_epochs_behind)
                    if old
                    else self.node.cfg.catchup.max_epochs_behind
                )
                ahead = [
                    (epoch, step, j)
                    for j, (step, epoch) in self.node.membership.peer_progress.items()
                    if epoch > mine + lead and j in self.node.core.peers and not self.node.core.peers[j].evicted
                ]
                if ahead:
                    epoch, step, j = max(ahead)
                    if await self._fetch_from(j, step, epoch):
                        return
                    self.node.membership.peer_progress.pop(j, None)
                    continue
                # Every neighbour answered and none is ahead enough: train from our own state.
                nbrs = self.node.core.neighbours()
                if nbrs and all(j in self.node.membership.peer_progress for j in nbrs):
                    return
                if time.monotonic() >= deadline:
                    if starting:
                        self.node.log.info(
                            "no neighbour ahead of us within %.0f s; training from our own state",
                            self.node.cfg.catchup.wait_s,
                        )
                    return
                await self.node._sleep(0.1)
        finally:
            self.running = False
            self.node.worker.catchup_done.set()

    async def _fetch_from(self, node_id: str, their_step: int, their_epoch: float) -> bool:
        rec = self.node.core.peers[node_id]
        request = gossip_pb2.FetchStateRequest(node_id=self.node.cfg.node_id, schema_fingerprint=self.node.fingerprint)
        limits = ReceiveLimits(
            max_payload_bytes=self.node.cfg.gossip.max_message_bytes,
            max_chunk_bytes=self.node.cfg.gossip.chunk_bytes,
            expected_fingerprint=self.node.fingerprint,
            expected_algorithm=self.node.algorithm.name,
            expected_tensors={"params": ((self.node.num_params,), "float32")},
        )
        timeout = self.node.client.push_timeout(4 * self.node.num_params)
        try:
            received = await self.node.client.fetch_state(rec.address, request, limits, timeout_s=timeout)
        except (SendError, PayloadError) as exc:
            self.node.log.warning("catch-up from %s failed: %s", node_id, exc)
            return False
        self.node.worker.adopt.append((received.payload.tensors["params"], their_epoch))
        self.node.counters.add(bytes_received=received.nbytes, catchups=1)
        self.node.log.info(
            "caught up: adopted %s's model and progress (its epoch %.2f, step %d; ours %.2f)",
            node_id,
            their_epoch,
            their_step,
            self.node.trainer.step_count / self.node.trainer.steps_per_epoch,
        )
        return True
