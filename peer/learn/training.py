"""Local training (a synchronous minibatch loop the daemon drives from its training thread), evaluation,
device selection, and the centralized reference training used by the demo.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.functional import cross_entropy

from peer.errors import CheckpointError, ConfigError, DataError, UnknownNameError
from peer.learn.models import build_model, flatten_params, load_flat_params
from peer.learn.streams import BatchStream

log = logging.getLogger(__name__)

OPTIMIZER_NAMES = ("sgd", "adam")
DEVICE_FORMS = ("auto", "cpu", "cuda", "cuda:N", "mps")


def select_device(requested: str) -> torch.device:
    """Resolve a `train.device` setting: "auto" prefers cuda, then mps, then cpu."""
    req = requested.strip().lower()
    mps_ok = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if req == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_ok else torch.device("cpu")
    if req == "cpu":
        return torch.device("cpu")
    if req == "mps":
        if not mps_ok:
            raise ConfigError("device 'mps' requested but MPS is not available", field="train.device")
        return torch.device("mps")
    if req == "cuda" or req.startswith("cuda:"):
        index = 0
        if req != "cuda":
            suffix = req[len("cuda:") :]
            if not suffix.isdigit():
                raise ConfigError(f"bad CUDA device {requested!r}; use cuda or cuda:N", field="train.device")
            index = int(suffix)
        if not torch.cuda.is_available():
            raise ConfigError(f"device {requested!r} requested but CUDA is not available", field="train.device")
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {requested!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist",
                field="train.device",
            )
        return torch.device(req)
    raise ConfigError(f"unknown device {requested!r}; valid forms: {', '.join(DEVICE_FORMS)}", field="train.device")


def _to_cpu(obj: Any) -> Any:
    # Checkpoints must load on a machine without the training device.
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj


class LocalTrainer:
    """Minibatch training of `model` on one peer's data, one `step()` at a time.

    In-memory data (`x`, `y`) is copied to `device` once; a `stream` (plugin data, image folders, shards) is read
    through a DataLoader instead. Each epoch visits every sample once in an order drawn from a private generator
    seeded by `seed`, so a run (and a resumed run) is reproducible. `loss_fn(output, target)` defaults to
    cross-entropy; `amp` runs forward passes under autocast (bfloat16); `exchange_buffers` puts the model's
    float buffers into `get_flat`/`set_flat` (see `Algorithm.mixes_buffers`). `steps_per_epoch` is fixed at
    construction: a growing stream's new samples join later epochs without changing the step budget.
    """

    def __init__(
        self,
        model: nn.Module,
        x: np.ndarray | None,
        y: np.ndarray | None,
        *,
        batch_size: int,
        lr: float,
        momentum: float,
        weight_decay: float,
        optimizer: str,
        device: torch.device,
        seed: int,
        stream: BatchStream | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        amp: bool = False,
        exchange_buffers: bool = False,
    ) -> None:
        self.stream = stream
        if stream is None:
            if x is None or y is None or len(x) != len(y):
                raise DataError(f"training data has {len(x or [])} inputs but {len(y or [])} labels")
            if len(x) == 0:
                raise DataError("training data is empty")
        if batch_size < 1:
            raise ConfigError(f"must be >= 1, got {batch_size}", field="train.batch_size")
        if not (math.isfinite(lr) and lr >= 0):
            raise ConfigError(f"must be a finite number >= 0, got {lr}", field="train.lr")
        self.model = model.to(device)
        self.device = device
        self.loss_fn = loss_fn or cross_entropy
        self.amp = amp
        self.exchange_buffers = exchange_buffers
        self.batch_size = batch_size
        if stream is None:
            assert x is not None and y is not None
            self.x = torch.tensor(np.asarray(x), dtype=torch.float32, device=device)
            y_arr = np.asarray(y)
            self.y = torch.tensor(
                y_arr, dtype=torch.int64 if y_arr.dtype.kind in "iub" else torch.float32, device=device
            )
            self.n = len(self.x)
        else:
            self.n = stream.n
        self.steps_per_epoch = math.ceil(self.n / batch_size)
        self.optimizer_name = optimizer
        params = list(self.model.parameters())
        if optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=lr, momentum=momentum, weight_decay=weight_decay
            )
        elif optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        else:
            raise UnknownNameError("optimizer", optimizer, OPTIMIZER_NAMES, field="train.optimizer")
        self._gen = torch.Generator(device="cpu")
        self._gen.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
        self._perm: torch.Tensor | None = None  # this epoch's order, on `device`; None between epochs
        self._pos = 0
        self.step_count = 0
        self.epoch = 0  # completed epochs

    @property
    def epoch_progress(self) -> float:
        """Completed epochs plus the fraction of the current one."""
        if self.stream is not None:
            return self.epoch + self.stream.fraction_done
        return self.epoch + (self._pos / self.n if self._perm is not None else 0.0)

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stream is not None:
            xb, yb, finished = self.stream.next_batch()
            if self.stream.new_shards:
                log.info(
                    "training on %d new shard(s): %s", len(self.stream.new_shards), ", ".join(self.stream.new_shards)
                )
                self.stream.new_shards = []
            self.epoch += 1 if finished else 0
            self.step_count += 1
            return xb, yb
        if self._perm is None:
            self._perm = torch.randperm(self.n, generator=self._gen).to(self.device)
            self._pos = 0
        idx = self._perm[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        if self._pos >= self.n:
            self._perm = None
            self._pos = 0
            self.epoch += 1
        self.step_count += 1
        return self.x[idx], self.y[idx]

    def _loss(self) -> torch.Tensor:
        xb, yb = self._next_batch()
        if not self.model.training:
            self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.model(xb)
        loss = self.loss_fn(out.float(), yb)
        loss.backward()
        return loss

    def step(self) -> float:
        """One optimizer step on the next minibatch; returns its loss (NaN/Inf is returned, not raised)."""
        loss = self._loss()
        self.optimizer.step()
        return float(loss.item())

    def gradient(self) -> tuple[float, torch.Tensor]:
        """Loss and flat CPU float32 gradient on the next minibatch, without an optimizer step.

        For algorithms that own the local update; the batch still counts as a step.
        """
        loss = self._loss()
        grads = [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to("cpu", torch.float32)
            for p in self.model.parameters()
        ]
        flat = torch.cat(grads) if grads else torch.zeros(0)
        return float(loss.item()), flat

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def get_flat(self) -> torch.Tensor:
        return flatten_params(self.model, buffers=self.exchange_buffers)

    def set_flat(self, flat: torch.Tensor) -> None:
        load_flat_params(self.model, flat, buffers=self.exchange_buffers)

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state, counters and data-order state (CPU tensors and plain values only).

        Model parameters are not included: checkpoint them via `get_flat`.
        """
        if self.stream is not None:
            return {
                "optimizer_name": self.optimizer_name,
                "optimizer": _to_cpu(self.optimizer.state_dict()),
                "step_count": self.step_count,
                "epoch": self.epoch,
                "batch_size": self.batch_size,
                "stream": self.stream.state_dict(),
            }
        perm = self._perm.cpu() if self._perm is not None else torch.zeros(0, dtype=torch.int64)
        return {
            "optimizer_name": self.optimizer_name,
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "step_count": self.step_count,
            "epoch": self.epoch,
            "n": self.n,
            "batch_size": self.batch_size,
            "pos": self._pos,
            "perm": perm,
            "has_perm": self._perm is not None,
            "rng_state": self._gen.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`: counters, optimizer state and data order continue where they were."""
        try:
            if state["optimizer_name"] != self.optimizer_name:
                raise CheckpointError(
                    f"trainer checkpoint used optimizer {state['optimizer_name']!r}, config says "
                    f"{self.optimizer_name!r}"
                )
            if self.stream is not None:
                self.optimizer.load_state_dict(state["optimizer"])
                self.stream.load_state_dict(state["stream"])
                self.step_count = int(state["step_count"])
                self.epoch = int(state["epoch"])
                return
            if int(state["n"]) != self.n:
                raise CheckpointError(
                    f"trainer checkpoint was made on {state['n']} local samples, this peer has {self.n}"
                )
            self.optimizer.load_state_dict(state["optimizer"])
            self._gen.set_state(state["rng_state"])
            if state["has_perm"]:
                perm = state["perm"]
                if perm.numel() != self.n:
                    raise CheckpointError("trainer checkpoint data order does not match the local data size")
                self._perm = perm.to(self.device)
            else:
                self._perm = None
            self._pos = int(state["pos"])
            self.step_count = int(state["step_count"])
            self.epoch = int(state["epoch"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"trainer checkpoint is malformed: {exc!r}") from exc
        if state.get("batch_size", self.batch_size) != self.batch_size:
            log.warning("batch size changed from %s to %d since the checkpoint", state["batch_size"], self.batch_size)


def evaluate(
    model: nn.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    *,
    device: torch.device | None = None,
    batch_size: int = 1024,
) -> tuple[float, float]:
    """(accuracy in [0, 1], mean cross-entropy) of `model` on (x, y), without gradients.

    The model is evaluated in eval mode and put back in the mode it was in.
    """
    if len(x) == 0 or len(x) != len(y):
        raise DataError(f"cannot evaluate on {len(x)} inputs and {len(y)} labels")
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    xt = torch.as_tensor(x, dtype=torch.float32, device=device)
    yt = torch.as_tensor(y, dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    try:
        with torch.no_grad():
            for start in range(0, len(xt), batch_size):
                logits = model(xt[start : start + batch_size])
                yb = yt[start : start + batch_size]
                total_loss += cross_entropy(logits, yb, reduction="sum").double()
                correct += (logits.argmax(dim=1) == yb).sum()
    finally:
        model.train(was_training)
    n = len(xt)
    return float(correct.item()) / n, float(total_loss.item()) / n


def train_reference(
    ds_x: np.ndarray,
    ds_y: np.ndarray,
    *,
    model_name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    epochs: float,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    optimizer: str,
    seed: int,
    device: torch.device,
    lr_schedule: str = "constant",
    model_seed: int | None = None,
    model_factory: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Train a fresh `model_name` for `epochs` passes, with the same learning-rate schedule as the daemon
    (`lr_schedule`: constant or cosine). The model is initialised from `model_seed` (default: `seed`), as the
    peers' are (from `model_factory` with `model_kwargs` when given); `seed` orders the minibatches."""
    model = build_model(
        model_name,
        input_shape,
        num_classes,
        seed=seed if model_seed is None else model_seed,
        factory=model_factory,
        kwargs=model_kwargs,
    )
    trainer = LocalTrainer(
        model,
        ds_x,
        ds_y,
        batch_size=batch_size,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        optimizer=optimizer,
        device=device,
        seed=seed,
    )
    total = max(1, math.ceil(epochs * trainer.steps_per_epoch))
    for t in range(total):
        trainer.set_lr(scheduled_lr(lr, lr_schedule, t, total))
        trainer.step()
    return model


def scheduled_lr(base_lr: float, schedule: str, step: int, total_steps: int) -> float:
    """The learning rate at `step` of `total_steps`: constant, or cosine decay to 0 at the end."""
    if schedule == "cosine" and total_steps > 0:
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    return base_lr
