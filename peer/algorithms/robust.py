"""Robust aggregation against authenticated but hostile neighbours: what a node mixes in place of each received
model. Pure functions over flat tensors.

* `clip`: self-centred clipping (in the spirit of clipped gossip): each neighbour's model x_j is replaced by
  x + clip_τ(x_j − x), with the adaptive radius τ = the lower median of this round's distances ‖x_j − x‖. A
  minority of far-away models is pulled to the honest distance; with a single neighbour there is nothing to
  compare and nothing is clipped.
* `trimmed_mean`: every neighbour's model is replaced by the coordinate-wise mean of {x, x_j ...} after dropping
  the b largest and b smallest values per coordinate (b = max(1, ⌊trim·n⌋) when n ≥ 3 values).
* `median`: the same with the coordinate-wise (lower) median.

With `trimmed_mean` and `median` the mix becomes w_ii x + (1 − w_ii) m: a step toward a robust centre m that lies
in the range of the honest values whenever fewer than b (resp. half) of the values are hostile.

Where the rules apply (`algorithm.robust`), and why not elsewhere. A rule is sound where the algorithm mixes
whole neighbour quantities with convex weights, so that replacing one received value by a value nearer the honest
ones only changes which point of the honest range the mix lands on:

| algorithm | rules | what is made robust |
|---|---|---|
| `cdl`, `dpsgd`, `local_sgd` | all | the received models |
| `dmsgd`, `dmsgd_async` | all | the received models and, separately, the received momenta (Form B: x_k − x_{k−1}) |
| `choco` | all | the consensus step's public copies x̂_j (centred on our x̂_i); the replicas themselves stay exact |
| `sgp`, `next_pushsum` | none | push-sum mass: altering a running sum breaks Σ x = Σ x₀ and the de-biasing |
| `next` | none | gradient tracking: y_i must keep Σ y = Σ ∇g; a clipped y_j leaves a permanent bias in the tracker |
| `digest` | none | tokens carry one global model along a random walk: there is no set of neighbour values to compare |
| `dssfn` | none | consensus ADMM needs the exact average of S_m; a trimmed one breaks the layer solve |
| `none` | n/a | no neighbours |
"""

from __future__ import annotations

from typing import Literal

import torch

Rule = Literal["none", "clip", "trimmed_mean", "median"]
RULES: tuple[str, ...] = ("none", "clip", "trimmed_mean", "median")


def clip_radius(x: torch.Tensor, received: dict[str, torch.Tensor]) -> float:
    """The lower median of the distances ‖x_j − x‖ over this round's neighbours."""
    dists = sorted(float(torch.linalg.vector_norm(v - x)) for v in received.values())
    return dists[(len(dists) - 1) // 2]


def robust_received(
    x: torch.Tensor, received: dict[str, torch.Tensor], rule: str, trim: float = 0.2
) -> dict[str, torch.Tensor]:
    """The tensors to mix in place of `received` (same keys). `rule` "none" returns `received` unchanged."""
    if rule == "none" or not received:
        return received
    if rule == "clip":
        tau = clip_radius(x, received)
        out = {}
        for j, v in received.items():
            d = v - x
            norm = float(torch.linalg.vector_norm(d))
            out[j] = v if norm <= tau or norm == 0.0 else x + d * (tau / norm)
        return out
    stack = torch.stack([x, *(received[j] for j in sorted(received))])
    if rule == "median":
        centre = stack.median(dim=0).values
    elif rule == "trimmed_mean":
        n = stack.shape[0]
        b = max(1, int(trim * n)) if n >= 3 else 0
        b = min(b, (n - 1) // 2)
        ordered = stack.sort(dim=0).values
        centre = ordered[b : n - b].mean(dim=0)
    else:
        raise ValueError(f"unknown robust rule {rule!r}; valid: {', '.join(RULES)}")
    return dict.fromkeys(received, centre)
