"""What the training thread sees of the cluster: the current neighbours and their advertised degrees."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class NeighbourView:
    """The current neighbour set and advertised degrees, frozen for one `mix` call."""

    self_id: str
    degrees: Mapping[str, int]  # neighbour id -> its advertised degree
    # Every live cluster member this node knows of, itself included (membership, not topology): token
    # algorithms use it for N_current and to agree on stream origins. Empty when unknown.
    members: frozenset[str] = frozenset()

    @property
    def self_degree(self) -> int:
        return len(self.degrees)
