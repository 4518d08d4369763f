"""Live evaluation: the daemon scores its own model on its test set every `metrics.eval_interval_s`.

What `peer eval` computes from a checkpoint, the daemon computes while it trains, so `peer status`, the Prometheus
endpoint and metrics.jsonl can say how good the model is now (accuracy for classification, loss otherwise)
without a checkpoint round trip. The model is copied (parameters and buffers, as a checkpoint would hold them) and
scored in a worker thread on at most `metrics.eval_max_samples` test samples (the first ones, so successive
figures are comparable); training never waits for it. The copy is taken while the training thread runs, so it
may mix two consecutive steps' tensors: harmless for a figure that is read as "about now".
"""

from __future__ import annotations

import asyncio
import copy
import math
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from peer.config import PeerConfig
from peer.daemon.metrics import Counters
from peer.learn.plugins import is_classification, resolve_loss
from peer.learn.sources import evaluate_dataset


class Evaluator:
    def __init__(
        self,
        model: torch.nn.Module,
        test: Dataset[Any],
        *,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        classification: bool,
        counters: Counters,
        max_samples: int,
    ) -> None:
        self.model = model
        n = len(test)  # type: ignore[arg-type]
        self.test: Dataset[Any] = test if n <= max_samples else Subset(test, range(max_samples))
        self.samples = min(n, max_samples)
        self.loss = loss
        self.classification = classification
        self.counters = counters

    def evaluate(self) -> tuple[int, float, float]:
        """(step, accuracy or NaN, loss) of the model as it is now. Blocking: call it from a thread."""
        step = self.counters.step
        model = copy.deepcopy(self.model)
        acc, loss = evaluate_dataset(model, self.test, loss_fn=self.loss, classification=self.classification)
        return step, acc, loss

    def record(self, step: int, acc: float, loss: float) -> None:
        with self.counters.lock:
            self.counters.eval_step = step
            self.counters.eval_accuracy = acc if self.classification else math.nan
            self.counters.eval_loss = loss
            self.counters.eval_samples = self.samples

    async def run(
        self, interval_s: float, sleep: Callable[[float], Awaitable[None]], stopping: Callable[[], bool]
    ) -> None:
        """Evaluate every `interval_s` while the model changes (once more after training ends, then idle)."""
        last_step = -1
        while not stopping():
            step = self.counters.step
            if step != last_step:
                self.record(*await asyncio.to_thread(self.evaluate))
                last_step = step
            await sleep(interval_s)


def evaluation_task(
    cfg: PeerConfig,
    model: torch.nn.Module,
    test: Dataset[Any] | None,
    counters: Counters,
    sleep: Callable[[float], Awaitable[None]],
    stopping: Callable[[], bool],
) -> list[Coroutine[Any, Any, None]]:
    """The live-evaluation task, or none (turned off, or no test set: `peer status` then says so)."""
    interval = cfg.metrics.eval_interval_s
    if interval <= 0 or test is None or len(test) == 0:  # type: ignore[arg-type]
        return []
    evaluator = Evaluator(
        model,
        test,
        loss=resolve_loss(cfg.train.loss),
        classification=is_classification(cfg.train.loss),
        counters=counters,
        max_samples=cfg.metrics.eval_max_samples,
    )
    return [evaluator.run(interval, sleep, stopping)]
