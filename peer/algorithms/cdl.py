"""Consensus Driven Learning (spec §6): local steps, push the full model, mix fresh cached neighbour models.

Reconstructed (spec v1) from distributed averaging consensus: θ_i ← θ_i + ε Σ_{j∈R_i} a_ij (θ̂_j − θ_i), where
R_i holds the neighbours whose cached copy is fresh (pattern P2: last-value cache, sequence numbers, staleness
bound). By default each received copy is mixed once: re-mixing an old copy in later rounds drags the model
back towards the neighbour's past and measurably slows training when rounds outpace gossip. With every
neighbour fresh and Metropolis–Hastings a_ij the update is symmetric and doubly stochastic,
so it preserves the network mean; with some copies missing it stays row stochastic (a convex combination).

The knobs of §6(a)/(c):

* ε (`epsilon`) and a_ij (`weights`): "metropolis" (default) and "uniform" are row-stochastic weight rules that
  ε then scales; "unit" is the DAC form a_ij = 1, stable only for ε < 1/Δ_max. Each node checks that bound
  per edge against the live degrees of the current view: an edge with ε·max(d_i, d_j) ≥ 1 is clipped to its
  Metropolis–Hastings weight 1/(1 + max(d_i, d_j)), and the node logs a warning once. Both ends compute the
  same clipped value from the advertised degrees, so the mixing matrix stays symmetric, and the self weight
  1 − Σ_j ε_ij stays positive (each term is below 1/d_i).
* T_c, the local steps between consensus updates, is the daemon's `train.steps_per_round`: mix mode runs that
  many optimizer steps, then `mix`, then `outgoing`, every round.
* The staleness bound is `staleness_s` (age) and `staleness_rounds` (rounds since receipt).
* The optimizer state (momentum, Adam moments) is not mixed (spec §6(a) default). The algorithm only sees the
  flat parameters (the optimizer lives in the trainer), mixing moments would double or triple every message,
  and the moments describe each node's own gradient history, which on biased data is exactly what should stay
  local.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from peer.algorithms.base import AlgoParams, Algorithm, InMessage, MixReport, NeighbourView, Payload
from peer.algorithms.mixing import WEIGHT_RULES
from peer.algorithms.robust import robust_received

log = logging.getLogger(__name__)


class CdlParams(AlgoParams):
    name: Literal["cdl"] = "cdl"
    epsilon: float = Field(1.0, gt=0.0, le=1.0, description="consensus rate ε in (0, 1]")
    weights: Literal["metropolis", "uniform", "unit"] = Field(
        "metropolis",
        description="a_ij: Metropolis–Hastings, uniform 1/(d_i + 1), or unit (DAC; an edge with ε·max(d_i, d_j) ≥ 1 "
        "falls back to its Metropolis–Hastings weight)",
    )
    staleness_s: float = Field(10.0, gt=0.0, description="cached copies older than this are not mixed")
    staleness_rounds: int = Field(50, ge=1, description="… nor copies received more than this many rounds ago")
    reuse: bool = Field(False, description="mix a cached copy again in later rounds (until it goes stale)")
    robust: Literal["none", "clip", "trimmed_mean", "median"] = Field(
        "none", description="robust aggregation of neighbours' models (peer.algorithms.robust)"
    )
    trim: float = Field(0.2, ge=0.0, lt=0.5, description="trimmed_mean: share of values dropped at each end")


def unit_weights(
    epsilon: float, self_degree: int, neighbour_degrees: Mapping[str, int]
) -> tuple[dict[str, float], int]:
    """ε·a_ij with a_ij = 1, per edge clipped to 1/(1 + max(d_i, d_j)) where ε·max(d_i, d_j) ≥ 1.

    Returns (ε_ij per neighbour, number of clipped edges).
    """
    out: dict[str, float] = {}
    clipped = 0
    for j, d_j in neighbour_degrees.items():
        d = max(self_degree, d_j, 1)
        if epsilon * d < 1.0:
            out[j] = epsilon
        else:
            out[j] = 1.0 / (1.0 + d)
            clipped += 1
    return out, clipped


@dataclass
class _Cached:
    incarnation: int
    seq: int
    params: torch.Tensor
    received_at: float
    received_round: int
    used: bool = False


class Cdl(Algorithm):
    name: ClassVar[str] = "cdl"
    params_type: ClassVar[type[AlgoParams]] = CdlParams
    provenance: ClassVar[str] = "reconstructed (spec v1)"
    default_max_steps_without_merge: ClassVar[int] = 1

    def __init__(self, params: AlgoParams, node_id: str) -> None:
        super().__init__(params, node_id)
        assert isinstance(params, CdlParams)
        self.p: CdlParams = params
        self.cache: dict[str, _Cached] = {}
        self.seq = 0
        self.round = 0
        self.dropped_out_of_order = 0
        self.clipped_edges = 0  # unit weights: edges mixed with their clipped weight (summed over rounds)
        self.neighbour_distance = math.nan  # see metrics()

    def on_message(self, msg: InMessage, now: float) -> bool:
        params = msg.payload.tensors.get("params")
        if msg.payload.kind != "state" or params is None:
            return False
        old = self.cache.get(msg.sender)
        # (incarnation, seq) orders messages across restarts: a restarted sender starts a new incarnation,
        # so its first state supersedes everything it sent before the crash.
        if old is not None and (msg.incarnation, msg.payload.seq) <= (old.incarnation, old.seq):
            self.dropped_out_of_order += 1
            return False
        self.cache[msg.sender] = _Cached(msg.incarnation, msg.payload.seq, params, msg.received_at, self.round)
        return True

    def fresh(self, now: float, view: NeighbourView) -> tuple[list[str], list[str]]:
        """Neighbours whose cached copy may be mixed now, and those skipped as stale."""
        used, stale = [], []
        for j in sorted(view.degrees):
            c = self.cache.get(j)
            if c is None:
                continue
            if c.used and not self.p.reuse:
                continue
            if now - c.received_at > self.p.staleness_s or self.round - c.received_round > self.p.staleness_rounds:
                stale.append(j)
            else:
                used.append(j)
        return used, stale

    def mix(self, x: torch.Tensor, now: float, view: NeighbourView) -> torch.Tensor:
        self.round += 1
        used, stale = self.fresh(now, view)
        if not used:
            self.last_report = MixReport((), tuple(stale), 1.0)
            return x
        alpha = self.edge_weights(view)
        models = self.robust_models(x, used, now, view)
        out = x.clone()
        total = 0.0
        spread = 0.0
        for j in used:
            a = alpha[j]
            diff = models[j] - x
            out.add_(diff, alpha=a)
            spread += float(diff.norm())
            self.cache[j].used = True
            total += a
        norm = float(x.norm())
        self.neighbour_distance = spread / len(used) / norm if norm > 0 else math.nan
        self.last_report = MixReport(tuple(used), tuple(stale), 1.0 - total)
        return out

    def robust_models(
        self, x: torch.Tensor, used: list[str], now: float, view: NeighbourView
    ) -> dict[str, torch.Tensor]:
        """The copies to mix for `used`, after `robust`. The rule compares every current neighbour's latest copy
        that is not stale, mixed before or not: in an asynchronous round often one copy is fresh, and a rule
        applied to it alone has nothing to compare (clip would pass it, a trimmed mean of two values trims nothing),
        so an attacker's copy would go in whole."""
        if self.p.robust == "none":
            return {j: self.cache[j].params for j in used}
        pool = {
            j: c.params
            for j, c in self.cache.items()
            if j in view.degrees
            and now - c.received_at <= self.p.staleness_s
            and self.round - c.received_round <= self.p.staleness_rounds
        }
        robust = robust_received(x, pool, self.p.robust, self.p.trim)
        return {j: robust[j] for j in used}

    def metrics(self) -> dict[str, float]:
        """`neighbour_distance`: mean ‖θ̂_j − θ_i‖ / ‖θ_i‖ over the copies mixed in the last round that mixed any,
        the local estimate of the network's consensus distance (the true one needs every model at once)."""
        return {"neighbour_distance": self.neighbour_distance}

    def edge_weights(self, view: NeighbourView) -> dict[str, float]:
        """ε·a_ij for every neighbour of the view (the live degrees)."""
        if self.p.weights != "unit":
            weights = WEIGHT_RULES[self.p.weights](view.self_degree, view.degrees)
            return {j: self.p.epsilon * w for j, w in weights.items()}
        alpha, clipped = unit_weights(self.p.epsilon, view.self_degree, view.degrees)
        if clipped and not self.clipped_edges:
            log.warning(
                "%s: cdl epsilon %.4g with unit weights needs epsilon < 1/max degree (%d here); %d edge(s) use "
                "their Metropolis-Hastings weight instead",
                self.node_id,
                self.p.epsilon,
                max([view.self_degree, *view.degrees.values()]),
                clipped,
            )
        self.clipped_edges += clipped
        return alpha

    def outgoing(self, x: torch.Tensor, step: int) -> Payload | None:
        self.seq += 1
        return Payload(kind="state", tensors={"params": x}, seq=self.seq, step=step)

    def forget(self, node_id: str) -> None:
        self.cache.pop(node_id, None)

    def state_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "round": self.round}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seq = int(state.get("seq", 0))
        self.round = int(state.get("round", 0))
