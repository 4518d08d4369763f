"""D-PSGD (Lian et al., NeurIPS 2017; spec §7), the synchronous baseline, run through the P1 synchronizer.

x_i^{k+1} = Σ_j w_ij x_j^k − γ ∇F_i(x_i^k; ξ_i^k): the gradient is taken at the pre-mixing iterate, and each
round sends P_model floats to every neighbour. With `momentum` > 0 a local heavy-ball buffer is added to the
gradient step (common in practice; 0, the default, is the published algorithm).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from peer.algorithms.base import AlgoParams, InMessage, Manifest, Oracle, Payload
from peer.algorithms.robust import robust_received
from peer.algorithms.sync import SynchronousAlgorithm, SyncParams


class DpsgdParams(SyncParams):
    name: Literal["dpsgd"] = "dpsgd"
    momentum: float = Field(
        0.9, ge=0.0, lt=1.0, description="local heavy-ball momentum on the gradient step (as train.momentum)"
    )
    robust: Literal["none", "clip", "trimmed_mean", "median"] = Field(
        "none", description="robust aggregation of neighbours' models (peer.algorithms.robust)"
    )
    trim: float = Field(0.2, ge=0.0, lt=0.5, description="trimmed_mean: share of values dropped at each end")


def mix(x: torch.Tensor, received: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Σ_j w_ij x_j with w_ii = 1 − Σ_{j≠i} w_ij, summed in sorted sender order (deterministic)."""
    out = x * (1.0 - sum(weights.values()))
    for j in sorted(received):
        out.add_(received[j], alpha=weights[j])
    return out


class Dpsgd(SynchronousAlgorithm):
    name: ClassVar[str] = "dpsgd"
    params_type: ClassVar[type[AlgoParams]] = DpsgdParams
    follows_caller_step: ClassVar[bool] = True  # one gradient per round at the returned iterate (momentum 0)

    def __init__(self, params: AlgoParams, node_id: str) -> None:
        super().__init__(params, node_id)
        assert isinstance(params, DpsgdParams)
        self.p: DpsgdParams = params
        self.buf: torch.Tensor | None = None

    def round_messages(self, x: torch.Tensor, round_: int, to: Sequence[str]) -> dict[str, Payload]:
        payload = Payload("state", {"params": x.clone()}, seq=round_ + 1, round=round_)
        return {j: payload for j in to}

    def direction(self, g: torch.Tensor) -> torch.Tensor:
        """The local step's direction: the gradient, or the heavy-ball buffer m ← μ m + g when `momentum` > 0."""
        if self.p.momentum > 0:
            self.buf = g.clone() if self.buf is None else self.buf.mul_(self.p.momentum).add_(g)
            return self.buf
        return g

    def update(
        self, x: torch.Tensor, received: dict[str, Payload], weights: dict[str, float], oracle: Oracle
    ) -> torch.Tensor:
        _, g = oracle.gradient(x)
        lr = oracle.lr()
        g = self.direction(g)
        models = {j: p.tensors["params"] for j, p in received.items()}
        out = mix(x, robust_received(x, models, self.p.robust, self.p.trim), weights)
        return out.add_(g, alpha=-lr)

    def on_message(self, msg: InMessage, now: float) -> bool:
        if "params" not in msg.payload.tensors:
            return False
        return super().on_message(msg, now)

    def expected_by_kind(self, num_params: int) -> dict[str, Manifest]:
        return {"state": {"params": ((num_params,), "float32")}}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "buf": self.buf if self.buf is not None else torch.zeros(0)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        buf = state.get("buf")
        self.buf = buf if isinstance(buf, torch.Tensor) and buf.numel() else None
