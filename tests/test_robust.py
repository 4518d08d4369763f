"""Robust aggregation (peer.algorithms.robust), without sockets: 4 honest nodes and 1 authenticated attacker on a
full graph run D-PSGD on quadratics. With each defence the honest nodes end near the honest optimum; without one
they are destroyed (so the test can fail)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from peer.algorithms.dpsgd import mix
from peer.algorithms.robust import clip_radius, robust_received

P = 16
HONEST = ["a", "b", "c", "d"]
ATTACKS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "sign_flip": lambda x, g: -10.0 * x,
    "scaled_1e4": lambda x, g: torch.full_like(x, 1e4),
    "random": lambda x, g: 100.0 * torch.randn(x.shape, generator=g),
}


def spread() -> float:
    """How far the honest optima lie from their mean: the bias a coordinate-wise rule may keep."""
    g = torch.Generator().manual_seed(0)
    centres = torch.stack([torch.randn(P, generator=g) for _ in HONEST])
    return float((centres - centres.mean(0)).norm(dim=1).max())


def run(rule: str, attack: str | None, rounds: int = 300, lr: float = 0.1) -> float:
    """Largest distance of an honest node to the honest optimum (the mean of the c_i) after `rounds`."""
    g = torch.Generator().manual_seed(0)
    centres = {i: torch.randn(P, generator=g) for i in HONEST}
    optimum = torch.stack(list(centres.values())).mean(0)
    x = {i: torch.zeros(P) for i in HONEST}
    weights = {j: 0.2 for j in [*HONEST, "evil"]}
    for _ in range(rounds):
        honest_mean = torch.stack(list(x.values())).mean(0)
        evil = ATTACKS[attack](honest_mean, g) if attack else honest_mean.clone()
        new = {}
        for i in HONEST:
            received = {j: x[j] for j in HONEST if j != i} | {"evil": evil}
            w = {j: weights[j] for j in received}
            mixed = mix(x[i], robust_received(x[i], received, rule), w)
            new[i] = mixed - lr * (x[i] - centres[i])
        x = new
    return max(float((x[i] - optimum).norm()) for i in HONEST)


@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("rule", ["clip", "trimmed_mean", "median"])
def test_each_defence_keeps_the_honest_nodes_near_the_optimum(rule: str, attack: str) -> None:
    baseline = run("none", None)
    defended = run(rule, attack)
    # Within half the honest spread of the optimum (the attacker-free run is 0.41 from it, the spread 4.55).
    assert defended < 0.5 * spread(), (rule, attack, baseline, defended)


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_without_a_defence_the_attacker_wins(attack: str) -> None:
    assert run("none", attack) > 2 * spread()


def test_rules_on_small_inputs() -> None:
    x = torch.zeros(2)
    received = {"h1": torch.tensor([1.0, 0.0]), "h2": torch.tensor([0.0, 2.0]), "evil": torch.tensor([300.0, 400.0])}
    assert clip_radius(x, received) == 2.0
    clipped = robust_received(x, received, "clip")
    assert torch.allclose(clipped["evil"], torch.tensor([1.2, 1.6])) and clipped["h1"] is received["h1"]
    med = robust_received(x, received, "median")
    assert torch.equal(med["evil"], torch.tensor([0.0, 0.0]))  # lower median of {0, 1, 0, 300} and {0, 0, 2, 400}
    tm = robust_received(x, received, "trimmed_mean", trim=0.25)
    assert torch.allclose(tm["h2"], torch.tensor([0.5, 1.0]))
    assert robust_received(x, received, "none") is received
    # With the attacker away, every rule leaves an honest consensus alone.
    same = {"h1": x.clone(), "h2": x.clone()}
    for rule in ("clip", "trimmed_mean", "median"):
        assert all(torch.equal(v, x) for v in robust_received(x, same, rule).values())
