"""The daemon's `Oracle`: what a step-mode algorithm may ask of the local trainer (gradients, lr, data)."""

from __future__ import annotations

import math

import torch

from peer.config import TrainConfig
from peer.learn.training import LocalTrainer, scheduled_lr


class TrainerOracle:
    """Minibatch gradients of the local loss at any point, and the configured learning-rate schedule.

    Once the local epochs are done the oracle goes quiet (zero gradient, lr 0) instead of stopping: P1
    algorithms must keep taking part in rounds so their neighbours are not left waiting, and those rounds
    then only mix. `hold` does the same for one round (`train.finish_together`: a peer with less data skips
    steps to spread its budget over its neighbours' run).
    """

    hold = False

    def __init__(self, trainer: LocalTrainer, cfg: TrainConfig, total_steps: int) -> None:
        self.trainer = trainer
        self.cfg = cfg
        self.total_steps = total_steps
        self.last_loss = math.nan

    @property
    def done(self) -> bool:
        return self.trainer.step_count >= self.total_steps

    @property
    def quiet(self) -> bool:
        return self.hold or self.done

    def gradient(self, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        if self.quiet:
            return math.nan, torch.zeros_like(x)
        self.trainer.set_flat(x)
        loss, g = self.trainer.gradient()
        self.last_loss = loss
        return loss, g.to(x.dtype)

    def lr(self) -> float:
        if self.quiet:
            return 0.0
        return scheduled_lr(self.cfg.lr, self.cfg.lr_schedule, self.trainer.step_count, self.total_steps)

    def local_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.trainer.x.detach().to("cpu").reshape(self.trainer.n, -1), self.trainer.y.detach().to("cpu")


class CallerStepOracle:
    """The library API's `Oracle` for algorithms that follow the caller's optimizer (`follows_caller_step`): the
    caller already stepped from `before` to `after`, and that step is the round's gradient step, given as the
    gradient `before - after` with a learning rate of 1, so the algorithm applies exactly the caller's step."""

    last_loss = math.nan

    def __init__(self, before: torch.Tensor, after: torch.Tensor) -> None:
        self.step = before - after

    def gradient(self, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        return math.nan, self.step.to(x.dtype)

    def lr(self) -> float:
        return 1.0

    def local_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError("the caller's own loop owns the data")
