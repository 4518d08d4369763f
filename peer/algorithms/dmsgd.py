"""DMSGD (Balu et al., ICASSP 2021; spec §3): decentralized heavy-ball SGD that mixes parameters and momentum.

Reconstructed (spec v1): the paper's abstract gives the structure (heavy ball, agents share "model parameters as
well as gradient-momentum values", fixed topology); the update itself is spec §3(a)'s reconstruction.

* **Form A** (default): v_{k+1} = β (ω v_k + (1 − ω) Σ_l π_jl v_l) − α g_k and x_{k+1} = Σ_l π_jl x_l + v_{k+1}.
  ω = 1 is the lab's CDMSGD, β = 0 is D-PSGD (bit for bit, see `_step`).
* **Form B** (`form: B`): x_{k+1} = Σ_l π_jl x_l − α g_k + β (ω u_k + (1 − ω) Σ_l π_jl u_l), u_k = x_k − x_{k−1}.

α is the scheduled learning rate (`oracle.lr()`), g_k the gradient at the pre-mixing iterate. Each round sends
one "momentum_state" message {"params": x, "momentum": v (Form A) or u (Form B)} to every neighbour: 2·P floats.

Robust aggregation (`robust`, see peer.algorithms.robust): the parameter mix and the momentum mix are each
replaced by the same rule applied to that quantity alone (clip: centred on our own x, resp. our own momentum, with
its own adaptive radius; trimmed_mean/median: per coordinate over ours and the neighbours'). Both mixes are convex
combinations with the same weights, so the rule is as sound for the momentum as for the model; a hostile momentum
would otherwise enter x_{k+1} through β m.

`dmsgd` runs on the P1 synchronizer (§1.4), which reproduces the synchronous iteration exactly on a lossy network,
so the network mean follows centralized heavy ball (§3(a)). `dmsgd_async` is the P2 variant (§3(c)): no
barrier, cached neighbour copies with a staleness bound and renormalized weights. It is *not* the paper's
algorithm: renormalized weights are only row stochastic, so the mean-dynamics identity breaks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from peer.algorithms.base import (
    AlgoParams,
    Algorithm,
    InMessage,
    Manifest,
    MixReport,
    NeighbourView,
    Oracle,
    Payload,
    Send,
)
from peer.algorithms.dpsgd import mix
from peer.algorithms.mixing import WEIGHT_RULES
from peer.algorithms.robust import robust_received
from peer.algorithms.sync import SynchronousAlgorithm, SyncParams

KIND = "momentum_state"


def _manifest(num_params: int) -> dict[str, Manifest]:
    return {KIND: {"params": ((num_params,), "float32"), "momentum": ((num_params,), "float32")}}


def _carries_state(payload: Payload) -> bool:
    return payload.kind == KIND and "params" in payload.tensors and "momentum" in payload.tensors


def _step(
    x_mixed: torch.Tensor, m: torch.Tensor, g: torch.Tensor, lr: float, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_{k+1}, β m − α g) from the mixed iterate and the mixed momentum m (modifies `x_mixed` in place).

    x_{k+1} is computed as (Σ π x − α g) + β m rather than Σ π x + (β m − α g): the same number in exact
    arithmetic, and with β = 0 the first form performs exactly D-PSGD's operations (adding 0·m is exact), so the
    β = 0 reduction holds bit for bit whatever the tensor kernels fuse.
    """
    v_new = (m * beta).add_(g, alpha=-lr)
    x_new = x_mixed.add_(g, alpha=-lr).add_(m, alpha=beta)
    return x_new, v_new


def robust_mix(
    x: torch.Tensor,
    v: torch.Tensor,
    xs: dict[str, torch.Tensor],
    vs: dict[str, torch.Tensor],
    weights: dict[str, float],
    rule: str,
    trim: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ π x, Σ π v) with each neighbour's x_j and v_j first replaced by `rule` (identity for "none")."""
    return mix(x, robust_received(x, xs, rule, trim), weights), mix(v, robust_received(v, vs, rule, trim), weights)


# ---------------------------------------------------------------------------------------------------------
# dmsgd: the synchronous algorithm on the P1 synchronizer


class DmsgdParams(SyncParams):
    name: Literal["dmsgd"] = "dmsgd"
    beta: float = Field(0.9, ge=0.0, lt=1.0, description="heavy-ball momentum β")
    omega: float = Field(0.5, ge=0.0, le=1.0, description="weight ω of the own momentum against the neighbours' mix")
    form: Literal["A", "B"] = Field(
        "A", description="A: momentum buffer v is shared; B: iterate difference u = x_k − x_{k−1} is shared"
    )
    robust: Literal["none", "clip", "trimmed_mean", "median"] = Field(
        "none", description="robust aggregation of neighbours' models and momenta (peer.algorithms.robust)"
    )
    trim: float = Field(0.2, ge=0.0, lt=0.5, description="trimmed_mean: share of values dropped at each end")


class Dmsgd(SynchronousAlgorithm):
    """DMSGD on the P1 synchronizer. After a jump (the node fell behind) it continues from its current x and
    momentum; only a give-up makes a round differ from the synchronous algorithm (`sync.gave_up` counts them)."""

    name: ClassVar[str] = "dmsgd"
    params_type: ClassVar[type[AlgoParams]] = DmsgdParams
    provenance: ClassVar[str] = "reconstructed (spec v1)"
    kinds: ClassVar[tuple[str, ...]] = (KIND,)

    def __init__(self, params: AlgoParams, node_id: str) -> None:
        super().__init__(params, node_id)
        assert isinstance(params, DmsgdParams)
        self.p: DmsgdParams = params
        # Form A: the momentum v_k. Form B: u_k = x_k − x_{k−1}, which holds the same information as x_{k−1}
        # (given x_k) and is exactly what is sent, so it is what is kept and checkpointed.
        self.v: torch.Tensor | None = None

    def round_messages(self, x: torch.Tensor, round_: int, to: Sequence[str]) -> dict[str, Payload]:
        if self.v is None or self.v.shape != x.shape:
            self.v = torch.zeros_like(x)
        payload = Payload(KIND, {"params": x.clone(), "momentum": self.v.clone()}, seq=round_ + 1, round=round_)
        return {j: payload for j in to}

    def update(
        self, x: torch.Tensor, received: dict[str, Payload], weights: dict[str, float], oracle: Oracle
    ) -> torch.Tensor:
        assert self.v is not None
        _, g = oracle.gradient(x)
        lr = oracle.lr()
        # Messages missing after a give-up are absent from `weights`; `mix` moves their weight to the self
        # weight, identically for the x-mix and the momentum mix.
        xs = {j: p.tensors["params"] for j, p in received.items()}
        vs = {j: p.tensors["momentum"] for j, p in received.items()}
        x_mixed, v_mixed = robust_mix(x, self.v, xs, vs, weights, self.p.robust, self.p.trim)
        m = (self.v * self.p.omega).add_(v_mixed, alpha=1.0 - self.p.omega)
        x_new, v_new = _step(x_mixed, m, g, lr, self.p.beta)
        self.v = v_new if self.p.form == "A" else x_new - x
        return x_new

    def on_message(self, msg: InMessage, now: float) -> bool:
        if not _carries_state(msg.payload):
            return False
        return super().on_message(msg, now)

    def expected_by_kind(self, num_params: int) -> dict[str, Manifest]:
        return _manifest(num_params)

    def state_dict(self) -> dict[str, Any]:
        v = self.v if self.v is not None else torch.zeros(0)
        return {**super().state_dict(), "form": self.p.form, "momentum": v}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        v = state.get("momentum")
        # A Form A buffer means nothing to Form B (and vice versa): restart the momentum instead.
        same_form = state.get("form", self.p.form) == self.p.form
        self.v = v if isinstance(v, torch.Tensor) and v.numel() and same_form else None


# ---------------------------------------------------------------------------------------------------------
# dmsgd_async: P2, cached neighbour copies, no barrier


class DmsgdAsyncParams(AlgoParams):
    name: Literal["dmsgd_async"] = "dmsgd_async"
    beta: float = Field(0.9, ge=0.0, lt=1.0, description="heavy-ball momentum β")
    omega: float = Field(0.5, ge=0.0, le=1.0, description="weight ω of the own momentum against the neighbours' mix")
    weights: Literal["metropolis", "uniform"] = Field("metropolis", description="mixing weights Π")
    max_staleness: int = Field(
        4, ge=0, description="mix a neighbour's cached (x, v) only up to this many own iterations after its receipt"
    )
    send_every: int = Field(1, ge=1, description="send (x, v) to every neighbour every this many iterations")
    robust: Literal["none", "clip", "trimmed_mean", "median"] = Field(
        "none", description="robust aggregation of neighbours' models and momenta (peer.algorithms.robust)"
    )
    trim: float = Field(0.2, ge=0.0, lt=0.5, description="trimmed_mean: share of values dropped at each end")


@dataclass
class _Cached:
    incarnation: int
    seq: int
    params: torch.Tensor
    momentum: torch.Tensor
    received_iteration: int


class DmsgdAsync(Algorithm):
    """Form A on a last-value cache (P2). Staleness is counted in the receiver's own iterations since receipt,
    not as the sender's iteration lag: with peers of different speeds a lag bound would permanently exclude
    every faster (or slower) neighbour, while the age since receipt only grows when messages stop arriving."""

    name: ClassVar[str] = "dmsgd_async"
    params_type: ClassVar[type[AlgoParams]] = DmsgdAsyncParams
    provenance: ClassVar[str] = "reconstructed (spec v1)"
    owns_local_update: ClassVar[bool] = True
    default_max_steps_without_merge: ClassVar[int] = 1

    def __init__(self, params: AlgoParams, node_id: str) -> None:
        super().__init__(params, node_id)
        assert isinstance(params, DmsgdAsyncParams)
        self.p: DmsgdAsyncParams = params
        self.v: torch.Tensor | None = None
        self.cache: dict[str, _Cached] = {}
        self.seq = 0
        self.dropped_out_of_order = 0
        self._outbox: dict[str, Payload] = {}

    # ------------------------------------------------------------------------------------------ sending
    def _broadcast(self, x: torch.Tensor, view: NeighbourView) -> None:
        assert self.v is not None
        self.seq += 1
        payload = Payload(
            KIND,
            {"params": x.clone(), "momentum": self.v.clone()},
            seq=self.seq,
            round=self.iteration,
            step=self.iteration,
        )
        # Latest wins: a newer state supersedes one not yet handed to the transport.
        self._outbox = {j: payload for j in sorted(view.degrees)}

    def sends(self, now: float) -> list[Send]:
        out = [Send(j, p) for j, p in self._outbox.items()]
        self._outbox = {}
        return out

    # ---------------------------------------------------------------------------------------- receiving
    def on_message(self, msg: InMessage, now: float) -> bool:
        if not _carries_state(msg.payload):
            return False
        old = self.cache.get(msg.sender)
        # (incarnation, seq) orders messages across restarts: a restarted sender's first state supersedes all.
        if old is not None and (msg.incarnation, msg.payload.seq) <= (old.incarnation, old.seq):
            self.dropped_out_of_order += 1
            return False
        t = msg.payload.tensors
        self.cache[msg.sender] = _Cached(msg.incarnation, msg.payload.seq, t["params"], t["momentum"], self.iteration)
        return True

    def fresh(self, view: NeighbourView) -> tuple[list[str], list[str]]:
        """Current neighbours whose cached copy may be mixed now, and those skipped as stale."""
        used: list[str] = []
        stale: list[str] = []
        for j in sorted(view.degrees):
            c = self.cache.get(j)
            if c is None:
                continue
            (used if self.iteration - c.received_iteration <= self.p.max_staleness else stale).append(j)
        return used, stale

    def forget(self, node_id: str) -> None:
        self.cache.pop(node_id, None)
        self._outbox.pop(node_id, None)

    # ---------------------------------------------------------------------------------------- iterating
    def start(self, x: torch.Tensor, now: float, view: NeighbourView) -> None:
        if self.v is None or self.v.shape != x.shape:
            self.v = torch.zeros_like(x)
        self._broadcast(x, view)

    def advance(self, x: torch.Tensor, oracle: Oracle, now: float, view: NeighbourView) -> torch.Tensor:
        if self.v is None or self.v.shape != x.shape:
            self.v = torch.zeros_like(x)
        used, stale = self.fresh(view)
        all_w = WEIGHT_RULES[self.p.weights](view.self_degree, view.degrees)
        w_self = 1.0 - sum(all_w.values())
        total = w_self + sum(all_w[j] for j in used)
        # Renormalized over the fresh set R: (w_ii z_i + Σ_R w_ij ẑ_j) / (w_ii + Σ_R w_ij), for z = x and z = v.
        w = {j: all_w[j] / total for j in used}
        xs = {j: self.cache[j].params for j in used}
        vs = {j: self.cache[j].momentum for j in used}
        x_mixed, v_mixed = robust_mix(x, self.v, xs, vs, w, self.p.robust, self.p.trim)
        _, g = oracle.gradient(x)
        lr = oracle.lr()
        m = (self.v * self.p.omega).add_(v_mixed, alpha=1.0 - self.p.omega)
        x_new, self.v = _step(x_mixed, m, g, lr, self.p.beta)
        self.last_report = MixReport(tuple(used), tuple(stale), 1.0 - sum(w.values()))
        self.iteration += 1
        if self.iteration % self.p.send_every == 0:
            self._broadcast(x_new, view)
        return x_new

    def expected_by_kind(self, num_params: int) -> dict[str, Manifest]:
        return _manifest(num_params)

    def metrics(self) -> dict[str, float]:
        return {
            "iteration": self.iteration,
            "fresh": len(self.last_report.used),
            "stale": len(self.last_report.skipped_stale),
            "dropped_out_of_order": self.dropped_out_of_order,
        }

    def state_dict(self) -> dict[str, Any]:
        v = self.v if self.v is not None else torch.zeros(0)
        return {"iteration": self.iteration, "seq": self.seq, "momentum": v}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state.get("iteration", 0))
        self.seq = int(state.get("seq", 0))
        v = state.get("momentum")
        self.v = v if isinstance(v, torch.Tensor) and v.numel() else None
