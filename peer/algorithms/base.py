"""The algorithm interface every consensus algorithm implements: pure code over flat tensors, no I/O.

Theory of operation. The daemon's training thread owns one `Algorithm`, driven in one of two modes.

**Mix mode** (`owns_local_update = False`, e.g. `cdl`). Every round the thread runs:

1. `steps_per_round` optimizer steps of the trainer;
2. `on_message(msg, now)` for every message that arrived since the last round (already validated by the codec);
3. `mix(x, now, view)` to merge what arrived into the local parameters `x`, which returns the new `x`;
4. `outgoing(x, step)`: one latest-wins payload for every neighbour (a newer one supersedes an unsent older one).

**Step mode** (`owns_local_update = True`: momentum, tracking, push-sum, token, ADMM and compressed methods).
The algorithm owns the whole iteration and asks for gradients through an `Oracle`:

1. `start(x, now, view)` once;
2. `on_message(msg, now)` and `on_ack(to, key, now)` as messages and delivery acknowledgements arrive;
3. whenever `ready(now, view)` is true (P1: every frozen neighbour's round-k message is in), `advance(x, oracle,
   now, view)` runs one iteration and returns the new `x`;
4. `sends(now)` returns the per-destination messages due now: new ones and retransmissions of unacknowledged
   reliable ones. A `Send` with a `key` is reliable: the shell reports its delivery with `on_ack`, and the
   algorithm retransmits it until then (de-duplication on the receiving side is the algorithm's job too).

`now` is a float in seconds from any monotonic clock and `view` describes the current neighbours; the
algorithm never reads a clock, a socket or global randomness (randomness comes from a seeded generator it owns),
so tests drive it with plain numbers, and `peer.algorithms.sim` runs whole networks of them in memory.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict

# Re-exported: every algorithm takes the view as an argument.
from peer.core.view import NeighbourView as NeighbourView


@dataclass(frozen=True)
class Payload:
    """What an algorithm sends: named tensors plus counters. Transport-independent."""

    kind: str  # "state", "delta", "token", "admm", "push_sum", "momentum_state", "tracker"
    tensors: dict[str, torch.Tensor]
    seq: int = 0
    round: int = 0
    step: int = 0
    scalars: dict[str, float] = field(default_factory=dict)


Manifest = dict[str, tuple[tuple[int, ...], str]]  # tensor name -> (shape, dtype name)


@dataclass(frozen=True)
class Send:
    """One message to one neighbour. `key` non-empty means reliable: retransmitted until `on_ack(to, key)`."""

    to: str
    payload: Payload
    key: tuple[int, ...] = ()

    @property
    def reliable(self) -> bool:
        return bool(self.key)


def payload_floats(payload: Payload) -> int:
    """Number of values on the wire (tensor elements); scalars in the header are not counted."""
    return sum(t.numel() for t in payload.tensors.values())


class Oracle(Protocol):
    """Local information an algorithm in step mode may ask for. The daemon backs it with the trainer."""

    def gradient(self, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        """(loss, ∇f_i(x; ξ)) on the next minibatch (a full-batch gradient for deterministic oracles)."""
        ...

    def lr(self) -> float:
        """The scheduled learning rate for the next gradient step (the config's `train.lr` schedule)."""
        ...

    def local_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [J, P] float32, integer labels [J]) of this peer, for closed-form layer solvers (dSSFN)."""
        ...


@dataclass(frozen=True)
class InMessage:
    """A validated message from a neighbour, as the algorithm sees it."""

    sender: str
    incarnation: int
    sender_degree: int
    payload: Payload
    received_at: float


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
    # Whether `Payload.step` is the sender's own step count (pacing counts a state as fresh only when it moved).
    # Tokens (DIGEST) carry a walk's hop count instead: every visit is fresh.
    messages_carry_step: ClassVar[bool] = True
    # Fresh state reaches a node from one neighbour at a time (a token's random walk): pacing bounds the local steps
    # since fresh state from any neighbour was merged, not from each (peer.core.pacing.PooledPacer).
    paced_by_any_neighbour: ClassVar[bool] = False
    # Step-mode algorithms that can follow an optimizer the caller steps (library API, `peer.Gossip`): each round
    # takes exactly one gradient, at the iterate the round returned, and applies it as x - lr * g with nothing
    # built from it (no shared momentum, tracker or compressed half-step), so the caller's step can stand in for it.
    follows_caller_step: ClassVar[bool] = False
    # Step-mode algorithms that train something other than the model's flat parameters (dSSFN) set this;
    # the shell then reports `result_state()` instead of the parameters.
    trains_own_model: ClassVar[bool] = False
    # Default of `train.max_steps_without_merge` (see peer.core.pacing): local steps this algorithm may take
    # since it last took in fresh neighbour state. 0 = never wait: round-synchronous (P1) algorithms are already
    # held to one round of drift by their barrier, and `none` has no neighbours to wait for.
    default_max_steps_without_merge: ClassVar[int] = 0

    @property
    def mixes_buffers(self) -> bool:
        """The buffer rule. Mix-mode algorithms merge a model's floating-point buffers (BatchNorm running mean
        and variance) exactly like its parameters: they are appended to the flat vector, so every peer evaluates
        with statistics that match the averaged weights. Step-mode algorithms keep them local: their iterate is
        what gradients act on (momentum, trackers, push-sum weights), and a buffer has no gradient. Integer
        buffers (`num_batches_tracked`) always stay local."""
        return not self.owns_local_update

    def __init__(self, params: AlgoParams, node_id: str) -> None:
        self.params = params
        self.node_id = node_id
        self.last_report = MixReport()
        self.iteration = 0  # completed iterations (P1 round in step mode); for metrics and simulations

    # ------------------------------------------------------------------------------------------- step mode
    def start(self, x: torch.Tensor, now: float, view: NeighbourView) -> None:  # noqa: B027 - optional hook
        """Called once before the first `advance` (step mode): open round 0, queue the first messages."""

    def ready(self, now: float, view: NeighbourView) -> bool:
        """May `advance` run now? (P1: the current round is complete.) Step mode only."""
        return True

    def advance(self, x: torch.Tensor, oracle: Oracle, now: float, view: NeighbourView) -> torch.Tensor:
        """One iteration in step mode; returns the new parameters."""
        raise NotImplementedError(f"{self.name} runs in mix mode")

    def sends(self, now: float) -> list[Send]:
        """Per-destination messages due now, retransmissions included. Step mode only."""
        return []

    def holds_fresh_state(self) -> bool:
        """Does this node hold what pacing waits for itself (a token visiting it)? `paced_by_any_neighbour` only."""
        return False

    def neighbours_waiting(self) -> bool:
        """Is a neighbour blocked on this node's next message? The shell then skips its pacing (P1)."""
        return False

    def on_ack(self, to: str, key: tuple[int, ...], now: float) -> None:  # noqa: B027 - optional hook
        """A reliable message (`Send.key`) reached `to`."""

    def expected_by_kind(self, num_params: int) -> Mapping[str, Manifest | list[Manifest]] | None:
        """Per payload kind, the tensors a message of that kind carries (overrides `expected_tensors`); a list
        accepts any of several manifests."""
        return None

    def bind_data(self, input_dim: int, num_classes: int) -> None:  # noqa: B027 - optional hook
        """The shell tells the algorithm the local data's shape before `start`, so that algorithms whose
        messages depend on it (dSSFN) can check their config and declare their message shapes at once."""

    def metrics(self) -> dict[str, float]:
        """Algorithm-specific counters for `metrics.jsonl` (prefixed `algo_`): rounds, retransmissions, ..."""
        return {}

    def finished(self) -> bool:
        """For `trains_own_model` algorithms: training is complete (the shell then stops calling `advance`)."""
        return False

    def result_state(self) -> dict[str, torch.Tensor]:
        """For `trains_own_model` algorithms: the trained model's tensors, saved as the peer's result."""
        return {}

    # -------------------------------------------------------------------------------------------- mix mode
    @abc.abstractmethod
    def on_message(self, msg: InMessage, now: float) -> bool:
        """Take in a neighbour's message. Returns False if it was dropped (stale, duplicate, out of order)."""

    def mix(self, x: torch.Tensor, now: float, view: NeighbourView) -> torch.Tensor:
        """Merge received information into `x` and return the new parameters (may be `x` itself). Mix mode."""
        return x

    def outgoing(self, x: torch.Tensor, step: int) -> Payload | None:
        """The latest-wins payload to push to every neighbour after this round, or None. Mix mode."""
        return None

    def expected_tensors(self, num_params: int) -> Manifest:
        """Names, shapes and dtypes a received payload may carry; anything else is rejected by the codec."""
        return {"params": ((num_params,), "float32")}

    def forget(self, node_id: str) -> None:  # noqa: B027 - optional hook
        """A neighbour left the view; drop what is cached for it."""

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state: tensors, numbers, strings, lists and dicts only (loaded weights_only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore what `state_dict` returned."""
