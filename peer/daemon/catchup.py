"""Catch-up I/O: performs the core's StartCatchUp effect (FetchState, validated like a push) and reports FetchDone.

Whether and from whom to catch up is decided by `peer.core.catchup`; the fetched model is handed to the training
thread, which adopts it with the neighbour's progress at its next round start.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

import torch

from peer.core.events import Effect, FetchDone, Input, StartCatchUp
from peer.daemon.metrics import Counters
from peer.errors import PayloadError, SendError
from peer.net.assembler import ReceiveLimits
from peer.net.client import Client
from peer.v1 import gossip_pb2


class CatchUpFetcher:
    def __init__(
        self,
        *,
        client: Client,
        node_id: str,
        fingerprint: str,
        limits: ReceiveLimits,
        expected_bytes: int,
        adopt: deque[tuple[torch.Tensor, float]],
        my_epoch: Callable[[], float],
        counters: Counters,
        log: logging.LoggerAdapter[logging.Logger],
        dispatch: Callable[[Input], list[Effect]],
    ) -> None:
        self.client = client
        self.node_id = node_id
        self.fingerprint = fingerprint
        self.limits = limits
        self.expected_bytes = expected_bytes
        self.adopt = adopt
        self.my_epoch = my_epoch
        self.counters = counters
        self.log = log
        self.dispatch = dispatch

    async def fetch(self, effect: StartCatchUp) -> None:
        ok = await self._fetch(effect)
        self.dispatch(FetchDone(effect.node_id, ok, time.monotonic()))

    async def _fetch(self, effect: StartCatchUp) -> bool:
        request = gossip_pb2.FetchStateRequest(node_id=self.node_id, schema_fingerprint=self.fingerprint)
        timeout = self.client.push_timeout(self.expected_bytes)
        try:
            received = await self.client.fetch_state(
                effect.address, request, self.limits, timeout_s=timeout, node_id=effect.node_id
            )
        except (SendError, PayloadError) as exc:
            self.log.warning("catch-up from %s failed: %s", effect.node_id, exc)
            return False
        # Queued before FetchDone releases the training thread, so the first round adopts it.
        self.adopt.append((received.payload.tensors["params"], effect.epoch))
        self.counters.add(bytes_received=received.nbytes, catchups=1)
        self.log.info(
            "caught up: adopted %s's model and progress (its epoch %.2f, step %d; ours %.2f)",
            effect.node_id,
            effect.epoch,
            effect.step,
            self.my_epoch(),
        )
        return True
