"""CDL options (spec §6(a)/(c)) and its learning tests §6(f)3–4, run as in-process synchronous loops in mix mode.

The loops call what the daemon's mix-mode round calls, in its order: T_c local steps, `on_message` for what
arrived, `mix`, `outgoing` (delivered to the neighbours for the next round, or dropped).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import pytest
import torch
from sklearn.datasets import load_digits

from peer.algorithms.base import InMessage, NeighbourView
from peer.algorithms.cdl import Cdl, CdlParams, unit_weights
from peer.algorithms.sim import ring

Adjacency = dict[str, list[str]]


def _view(i: str, adj: Adjacency) -> NeighbourView:
    return NeighbourView(i, {j: len(adj[j]) for j in adj[i]})


def _consensus_step(algos: dict[str, Cdl], xs: dict[str, torch.Tensor], adj: Adjacency) -> dict[str, torch.Tensor]:
    """Everyone sends, everyone receives, everyone mixes (synchronous DAC, no loss)."""
    out = {i: algos[i].outgoing(xs[i], 0) for i in algos}
    for i in algos:
        for j in adj[i]:
            p = out[j]
            assert p is not None
            algos[i].on_message(InMessage(j, 1, len(adj[j]), p, 0.0), 0.0)
    return {i: algos[i].mix(xs[i], 0.0, _view(i, adj)) for i in algos}


# ------------------------------------------------------------------------------------------- unit weights
def test_unit_weights_are_the_dac_update() -> None:
    """a_ij = 1 and ε < 1/Δ_max: θ_i ← θ_i + ε Σ_j (θ_j − θ_i) exactly, nothing clipped."""
    adj = ring(4)
    algos = {i: Cdl(CdlParams(weights="unit", epsilon=0.3), i) for i in adj}
    gen = torch.Generator().manual_seed(0)
    xs = {i: torch.randn(3, generator=gen, dtype=torch.float64) for i in adj}
    new = _consensus_step(algos, xs, adj)
    for i in adj:
        expected = xs[i] + 0.3 * sum((xs[j] - xs[i] for j in adj[i]), torch.zeros(3, dtype=torch.float64))
        assert torch.allclose(new[i], expected, atol=1e-15)
        assert algos[i].clipped_edges == 0
        assert algos[i].last_report.self_weight == pytest.approx(1 - 2 * 0.3)


def test_unit_weights_clip_per_edge_symmetrically_and_warn_once(caplog: pytest.LogCaptureFixture) -> None:
    """A star plus a leaf edge with ε = 0.4: edges at the hub (degree 3) violate ε < 1/Δ and fall back to their
    MH weight, the leaf edge keeps ε. The matrix stays symmetric with positive self weights, so pure consensus
    still reaches the exact average."""
    adj = {"hub": ["a", "b", "c"], "a": ["hub", "b"], "b": ["hub", "a"], "c": ["hub"]}
    rows = {i: unit_weights(0.4, len(adj[i]), {j: len(adj[j]) for j in adj[i]}) for i in adj}
    assert rows["hub"] == ({"a": 0.25, "b": 0.25, "c": 0.25}, 3)
    assert rows["a"] == ({"hub": 0.25, "b": 0.4}, 1)
    for i in adj:
        for j, w in rows[i][0].items():
            assert rows[j][0][i] == w  # symmetric
        assert 1 - sum(rows[i][0].values()) > 0
    algos = {i: Cdl(CdlParams(weights="unit", epsilon=0.4), i) for i in adj}
    gen = torch.Generator().manual_seed(1)
    xs = {i: torch.randn(4, generator=gen, dtype=torch.float64) for i in adj}
    mean0 = torch.stack(list(xs.values())).mean(0)
    with caplog.at_level(logging.WARNING, logger="peer.algorithms.cdl"):
        for _ in range(200):
            xs = _consensus_step(algos, xs, adj)
    for x in xs.values():
        assert torch.allclose(x, mean0, atol=1e-10)
    hub_warnings = [r for r in caplog.records if r.getMessage().startswith("hub:")]
    assert len(hub_warnings) == 1 and "epsilon" in hub_warnings[0].getMessage()
    assert algos["hub"].clipped_edges == 3 * 200 and algos["c"].clipped_edges == 200


def test_unit_weights_follow_the_live_degree() -> None:
    algo = Cdl(CdlParams(weights="unit", epsilon=0.3), "me")
    small = algo.edge_weights(NeighbourView("me", {"a": 2, "b": 2}))
    assert small == {"a": 0.3, "b": 0.3} and algo.clipped_edges == 0
    grown = algo.edge_weights(NeighbourView("me", {"a": 2, "b": 2, "c": 2, "d": 2}))  # ε·4 ≥ 1 now
    assert grown == {j: 0.2 for j in "abcd"} and algo.clipped_edges == 4
    assert Cdl(CdlParams(epsilon=0.5), "me").edge_weights(NeighbourView("me", {"a": 1})) == {"a": 0.25}


# ------------------------------------------------------------------------------------- §6(f)3 biased data
C, F = 10, 64  # digits: 10 classes, 8×8 pixels
DIGITS_ROUNDS = 300
DIGITS_LR = 1.0  # decays linearly to 0 over the run, the same schedule for every variant
# Calibrated on the first run (seeded, 300 rounds), mean per-node test accuracy: IID baseline 0.947; one class per
# node 0.934 (gap 0.013, worst node 0.929); with 20% drops 0.932 (gap 0.015, worst node 0.927; 0.929–0.932 over
# four drop seeds). The margin leaves room for other BLAS and torch versions.
MARGIN = 0.05


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)  # bundled with scikit-learn: no download
    xt, yt = torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y)
    test = torch.arange(len(yt)) % 4 == 0
    return xt[~test], yt[~test], xt[test], yt[test]


def _softmax_grad(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lam: float = 1e-3) -> torch.Tensor:
    w, b = theta[: C * F].view(C, F), theta[C * F :]
    p = torch.softmax(x @ w.T + b, 1)
    p[torch.arange(len(y)), y] -= 1
    p /= len(y)
    return torch.cat([(p.T @ x + lam * w).reshape(-1), p.sum(0)])


def _accuracy(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    w, b = theta[: C * F].view(C, F), theta[C * F :]
    return float(((x @ w.T + b).argmax(1) == y).float().mean())


def _train(
    parts: dict[str, tuple[torch.Tensor, torch.Tensor]], adj: Adjacency, *, mix: bool, drop: float = 0.0, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The daemon's mix-mode round per node: T_c = 1 local step, take the inbox, mix, push to every neighbour."""
    rng = random.Random(seed)
    ids = sorted(parts)
    theta = {i: torch.zeros(C * F + C) for i in ids}
    algos = {i: Cdl(CdlParams(), i) for i in ids}
    inbox: dict[str, list[InMessage]] = {i: [] for i in ids}
    for r in range(DIGITS_ROUNDS):
        lr = DIGITS_LR * (1 - r / DIGITS_ROUNDS)
        for i in ids:
            theta[i] = theta[i] - lr * _softmax_grad(theta[i], *parts[i])
        if not mix:
            continue
        for i in ids:
            for msg in inbox[i]:
                algos[i].on_message(msg, float(r))
            inbox[i] = []
            theta[i] = algos[i].mix(theta[i], float(r), _view(i, adj))
        for i in ids:
            payload = algos[i].outgoing(theta[i], r)
            assert payload is not None
            for j in adj[i]:
                if rng.random() >= drop:
                    inbox[j].append(InMessage(i, 1, len(adj[i]), payload, float(r)))
    return theta


def test_cdl_learns_from_one_class_per_node() -> None:
    """§6(f)3 (qualitative): 10 nodes on a ring, node c holds only digit c. Alone, a node knows one class
    (≤ 20% global accuracy); with CDL every node gets within MARGIN of the IID decentralized baseline, with and
    without 20% message drops."""
    x_train, y_train, x_test, y_test = _digits()
    adj = ring(C)
    ids = sorted(adj)
    biased = {f"n{c}": (x_train[y_train == c], y_train[y_train == c]) for c in range(C)}
    perm = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(0)).chunk(C)
    iid = {f"n{c}": (x_train[perm[c]], y_train[perm[c]]) for c in range(C)}

    def per_node(theta: dict[str, torch.Tensor]) -> list[float]:
        return [_accuracy(theta[i], x_test, y_test) for i in ids]

    isolated = per_node(_train(biased, adj, mix=False))
    baseline = sum(per_node(_train(iid, adj, mix=True))) / C
    cdl = per_node(_train(biased, adj, mix=True))
    lossy = per_node(_train(biased, adj, mix=True, drop=0.2, seed=1))
    assert max(isolated) <= 0.20
    assert baseline > 0.9  # the baseline itself learned
    assert sum(cdl) / C >= baseline - MARGIN and min(cdl) >= baseline - 2 * MARGIN
    assert sum(lossy) / C >= baseline - MARGIN and min(lossy) >= baseline - 2 * MARGIN


# ----------------------------------------------------------------------------------- §6(f)4 convex sanity
def _logistic_problem(n: int, m: int = 100, d: int = 10, lam: float = 0.1) -> tuple[dict, Callable, torch.Tensor]:
    """ℓ2-regularised logistic regression split IID over n nodes, and its optimum by Newton's method."""
    gen = torch.Generator().manual_seed(0)
    w_true = torch.randn(d, generator=gen, dtype=torch.float64)
    x = torch.randn(n * m, d, generator=gen, dtype=torch.float64)
    y = (torch.rand(n * m, generator=gen, dtype=torch.float64) < torch.sigmoid(x @ w_true)).double()

    def grad(w: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return xs.T @ (torch.sigmoid(xs @ w) - ys) / len(ys) + lam * w

    w = torch.zeros(d, dtype=torch.float64)
    for _ in range(30):
        s = torch.sigmoid(x @ w)
        hess = (x.T * (s * (1 - s))) @ x / len(x) + lam * torch.eye(d, dtype=torch.float64)
        w = w - torch.linalg.solve(hess, grad(w, x, y))
    assert float(torch.linalg.vector_norm(grad(w, x, y))) < 1e-14
    parts = {f"n{i}": (x[i * m : (i + 1) * m], y[i * m : (i + 1) * m]) for i in range(n)}
    return parts, grad, w


def _run_schedule(
    schedule: Callable[[int], tuple[float, float]], rounds: int, checkpoints: tuple[int, ...]
) -> list[float]:
    """‖x̄ − x*‖ at each checkpoint. Params are frozen, so each round's ε comes with a fresh Cdl per node."""
    parts, grad, w_star = _logistic_problem(6)
    adj = ring(6)
    xs = {i: torch.zeros_like(w_star) for i in parts}
    errors = []
    for r in range(rounds):
        eps, lr = schedule(r)
        xs = {i: xs[i] - lr * grad(xs[i], *parts[i]) for i in parts}
        xs = _consensus_step({i: Cdl(CdlParams(epsilon=eps), i) for i in parts}, xs, adj)
        if r + 1 in checkpoints:
            errors.append(float(torch.linalg.vector_norm(torch.stack(list(xs.values())).mean(0) - w_star)))
    return errors


def test_network_average_approaches_the_optimum_as_epsilon_and_lr_decay() -> None:
    """§6(f)4: with η_t = 1/(1 + t/20) and ε_t = (1 + t/20)^(−1/4) (η/ε → 0) the network average closes in on
    the Newton optimum at every checkpoint; with constant (ε, η) = (1, 1) it stalls at the DGD bias."""
    checkpoints = (100, 400, 1600)
    decayed = _run_schedule(lambda t: ((1 + t / 20) ** -0.25, 1 / (1 + t / 20)), 1600, checkpoints)
    constant = _run_schedule(lambda t: (1.0, 1.0), 1600, checkpoints)
    assert decayed[0] > decayed[1] > decayed[2]
    assert decayed[2] < 0.3 * decayed[0] and decayed[2] < 2e-3
    assert constant[2] == pytest.approx(constant[1], rel=1e-6)  # converged to its biased fixed point
    assert decayed[2] < 0.2 * constant[2]
