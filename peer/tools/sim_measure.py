"""Round-by-round consensus bookkeeping of `peer simulate`: pure arithmetic over the groups' per-round sums.

Each group sends, per round k, Σ_i x_i^k (float64), Σ_i ‖x_i^k‖², how many peers reported round k and how many
of those had finished training. Round k is final once every peer's iteration is at least k (a peer that jumped
over rounds after churn never reports them). Its disagreement is the root-mean-square distance to the average,
relative to the average's norm: sqrt(Σ‖x_i‖²/n − ‖x̄‖²) / ‖x̄‖, which a doubly stochastic mixing matrix W shrinks
by its second-largest eigenvalue modulus λ per round, asymptotically.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Round:
    k: int
    disagreement: float  # relative RMS distance to the average
    peers: int
    trained: bool  # every reporting peer had finished its local training (only mixing from here on)
    mean: torch.Tensor


@dataclass
class RoundTracker:
    """Adds up the groups' reports and hands out the rounds that became final, in order."""

    pending: dict[int, list[float | int | torch.Tensor]] = field(default_factory=dict)
    next_k: int = 0

    def add(self, rounds: dict[int, tuple[torch.Tensor, float, int, int]]) -> None:
        for k, (sx, sq, count, done) in rounds.items():
            acc = self.pending.get(k)
            if acc is None:
                self.pending[k] = [sx.clone(), sq, count, done]
            else:
                acc[0].add_(sx)  # type: ignore[union-attr]
                acc[1] += sq  # type: ignore[operator]
                acc[2] += count  # type: ignore[operator]
                acc[3] += done  # type: ignore[operator]

    def final(self, min_iteration: int) -> list[Round]:
        """Rounds up to `min_iteration` (every peer is past them), oldest first; each is returned once."""
        out: list[Round] = []
        while self.next_k <= min_iteration:
            k = self.next_k
            self.next_k += 1
            acc = self.pending.pop(k, None)
            if acc is None:
                continue  # every peer jumped over it
            sx, sq, count, done = acc
            assert isinstance(sx, torch.Tensor)
            mean = sx / float(count)
            norm2 = float(mean @ mean)
            spread = max(0.0, float(sq) / float(count) - norm2)
            rel = math.sqrt(spread) / math.sqrt(norm2) if norm2 > 0 else math.sqrt(spread)
            out.append(Round(k, rel, int(count), int(done) == int(count), mean))
        return out


def measured_rate(disagreements: Iterable[float]) -> float | None:
    """Per-round contraction of the disagreement over the later half of a mixing-only phase (the asymptotic
    regime λ describes; the first rounds also damp faster modes). None with fewer than two usable rounds."""
    d = [x for x in disagreements if x > 0]
    if len(d) < 2:
        return None
    start = len(d) // 2 if len(d) >= 8 else 0
    span = len(d) - 1 - start
    return (d[-1] / d[start]) ** (1.0 / span)


def predicted_rounds(slem: float, start: float, tol: float) -> int | None:
    """Rounds of x ← W x from relative disagreement `start` to `tol` at rate λ = `slem` (0 if already there)."""
    if start <= tol:
        return 0
    if not 0 < slem < 1:
        return None if slem >= 1 else 1
    return math.ceil(math.log(tol / start) / math.log(slem))
