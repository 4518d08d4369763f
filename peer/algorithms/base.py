"""The algorithm interface every consensus algorithm implements: pure code over flat tensors, no I/O.

Theory of operation. The daemon's training thread owns one `Algorithm`. It calls, in order, every round:

1. `local_steps` of the trainer (the optimizer step), unless `owns_local_update` is set, in which case the
   trainer hands each gradient to `local_update` instead (momentum, tracking and ADMM methods need that);
2. `on_message(msg, now)` for every message that arrived since the last round (already validated by the codec);
3. `mix(x, now, view)` to merge what arrived into the local parameters `x`, which returns the new `x`;
4. `outgoing(x, step)` for the payload(s) to push to neighbours.

`now` is a float in seconds from any monotonic clock and `view` describes the current neighbours; the
algorithm never reads a clock, a socket or global randomness, so tests drive it with plain numbers.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict


@dataclass(frozen=True)
class Payload:
    """What an algorithm sends: named tensors plus counters. Transport-independent."""

    kind: str  # "state", "delta", "token", "admm", "push_sum", "momentum_state", "tracker"
    tensors: dict[str, torch.Tensor]
    seq: int = 0
    round: int = 0
    step: int = 0
    scalars: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class InMessage:
    """A validated message from a neighbour, as the algorithm sees it."""

    sender: str
    incarnation: int
    sender_degree: int
    payload: Payload
    received_at: float


@dataclass(frozen=True)
class NeighbourView:
    """The current neighbour set and advertised degrees, frozen for one `mix` call."""

    self_id: str
    degrees: Mapping[str, int]  # neighbour id -> its advertised degree

    @property
    def self_degree(self) -> int:
        return len(self.degrees)


@dataclass(frozen=True)
class MixReport:
    """What a `mix` call did, for metrics and tests."""

    used: tuple[str, ...] = ()
    skipped_stale: tuple[str, ...] = ()
    self_weight: float = 1.0


class AlgoParams(BaseModel):
    """Base of every algorithm's parameter block (`algorithm:` in the config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str


class Algorithm(abc.ABC):
    """One consensus algorithm. Subclasses register themselves in `peer.algorithms.REGISTRY`."""

    name: ClassVar[str]
    params_type: ClassVar[type[AlgoParams]]
    # A faithful-to-paper label: runs of reconstructed rules are reported as "reconstructed (spec v1)".
    provenance: ClassVar[str] = "standard"
    owns_local_update: ClassVar[bool] = False

    def __init__(self, params: AlgoParams, node_id: str) -> None:
        self.params = params
        self.node_id = node_id
        self.last_report = MixReport()

    def local_update(self, x: torch.Tensor, grad: torch.Tensor, lr: float) -> torch.Tensor:
        """Apply one local gradient step; only called when `owns_local_update` is true."""
        raise NotImplementedError(f"{self.name} does not own the local update")

    @abc.abstractmethod
    def on_message(self, msg: InMessage, now: float) -> bool:
        """Take in a neighbour's message. Returns False if it was dropped (stale, duplicate, out of order)."""

    @abc.abstractmethod
    def mix(self, x: torch.Tensor, now: float, view: NeighbourView) -> torch.Tensor:
        """Merge received information into `x` and return the new parameters (may be `x` itself)."""

    @abc.abstractmethod
    def outgoing(self, x: torch.Tensor, step: int) -> Payload | None:
        """The payload to push to every neighbour after this round, or None to send nothing."""

    def expected_tensors(self, num_params: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Names, shapes and dtypes a received payload may carry; anything else is rejected by the codec."""
        return {"params": ((num_params,), "float32")}

    def forget(self, node_id: str) -> None:  # noqa: B027 - optional hook
        """A neighbour left the view; drop what is cached for it."""

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state: tensors, numbers, strings, lists and dicts only (loaded weights_only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore what `state_dict` returned."""
