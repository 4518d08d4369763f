"""`none`: isolated local training, the comparison point. Sends nothing and ignores what arrives."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from peer.algorithms.base import AlgoParams, Algorithm, InMessage, NeighbourView, Payload


class NoneParams(AlgoParams):
    name: Literal["none"] = "none"


class Isolated(Algorithm):
    name: ClassVar[str] = "none"
    params_type: ClassVar[type[AlgoParams]] = NoneParams

    def on_message(self, msg: InMessage, now: float) -> bool:
        return False

    def mix(self, x: torch.Tensor, now: float, view: NeighbourView) -> torch.Tensor:
        return x

    def outgoing(self, x: torch.Tensor, step: int) -> Payload | None:
        return None
