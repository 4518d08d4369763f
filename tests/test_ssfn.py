"""Centralized SSFN (`peer.algorithms.ssfn`): the exact layer solver (spec §2(f)1), the architecture's identities, the
progression property (§2(f)5) and the model-state round trip."""

from __future__ import annotations

import io
import itertools
from typing import Any

import pytest
import torch

from peer.algorithms import ssfn
from peer.learn.data import load_dataset


def _layer_problem(seed: int = 0, j: int = 600, n: int = 50, q: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.relu(torch.randn(j, n, generator=gen, dtype=torch.float64))
    t = ssfn.one_hot(torch.randint(0, q, (j,), generator=gen), q)
    return y, t


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: intra-op threads only add contention
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ds = load_dataset("digits", seed=0)
    flat = lambda a: torch.from_numpy(a).reshape(len(a), -1)  # noqa: E731
    return flat(ds.x_train), torch.from_numpy(ds.y_train), flat(ds.x_test), torch.from_numpy(ds.y_test)


def test_exact_solver_active_constraint_satisfies_kkt() -> None:
    """§2(f)1: λ* > 0, ‖O‖_F = ε, O(G + λ*I) = B, and no feasible point nearby does better."""
    y, t = _layer_problem()
    g, b = y.T @ y, t.T @ y
    unconstrained = ssfn.exact_ball_ls(g, b, 1e12)
    eps = 0.3 * float(torch.linalg.matrix_norm(unconstrained.o))
    sol = ssfn.exact_ball_ls(g, b, eps)
    assert sol.lam > 0
    assert float(torch.linalg.matrix_norm(sol.o)) == pytest.approx(eps, rel=1e-10)
    stationarity = sol.o @ (g + sol.lam * torch.eye(g.shape[0], dtype=g.dtype)) - b
    assert float(torch.linalg.matrix_norm(stationarity)) < 1e-9 * float(torch.linalg.matrix_norm(b))

    def cost(o: torch.Tensor) -> float:
        return float(torch.linalg.matrix_norm(t - y @ o.T) ** 2)

    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        other = ssfn.project_ball(sol.o + 1e-3 * torch.randn(sol.o.shape, generator=gen, dtype=g.dtype), eps)
        assert cost(other) >= cost(sol.o) - 1e-9


def test_exact_solver_inactive_constraint_is_least_squares() -> None:
    """§2(f)1: λ* = 0 when the unconstrained solution is feasible; it is then the least-squares solution."""
    y, t = _layer_problem(seed=2)
    sol = ssfn.exact_ball_ls(y.T @ y, t.T @ y, 1e12)
    assert sol.lam == 0.0
    lstsq = torch.linalg.lstsq(y, t).solution.T
    assert torch.allclose(sol.o, lstsq, rtol=1e-8, atol=1e-10)


def test_exact_solver_rank_deficient_gives_minimum_norm_solution() -> None:
    """Fewer samples than nodes: G is singular, λ* = 0, and O is the pseudo-inverse solution."""
    y, t = _layer_problem(seed=3, j=30, n=50)
    sol = ssfn.exact_ball_ls(y.T @ y, t.T @ y, 1e12)
    assert sol.lam == 0.0
    assert torch.allclose(sol.o, (torch.linalg.pinv(y) @ t).T, atol=1e-8)


def test_public_ls_admm_converges_to_the_exact_solution_when_mu_fits_the_data() -> None:
    y, t = _layer_problem()
    g, b = y.T @ y, t.T @ y
    eps = 0.3 * float(torch.linalg.matrix_norm(ssfn.exact_ball_ls(g, b, 1e12).o))
    sol = ssfn.exact_ball_ls(g, b, eps)
    ref = sol.o
    rel = lambda o: float(torch.linalg.matrix_norm(o - ref) / torch.linalg.matrix_norm(ref))  # noqa: E731
    # Centralized (M = 1), a penalty equal to the multiplier (μ = 1/λ*) is the fast choice.
    assert rel(ssfn.ls_admm(g, b, eps, mu=1.0 / sol.lam, iters=100)) < 1e-10
    assert rel(ssfn.ls_admm(g, b, eps, mu=10.0, iters=100)) > 1e-2  # a μ off the data scale stalls (spec §2(a))


def test_vq_uq_identity_and_ridge() -> None:
    t = torch.randn(7, 4, dtype=torch.float64)
    assert torch.equal(torch.relu(t @ ssfn.v_q(4).T) @ ssfn.u_q(4).T, t)
    y, tt = _layer_problem(seed=4)
    o = ssfn.ridge(y.T @ y, tt.T @ y, 3.0)
    grad = (y @ o.T - tt).T @ y + 3.0 * o
    assert float(grad.abs().max()) < 1e-9


def test_random_matrices_are_shared_by_seed_and_layer() -> None:
    a = ssfn.random_matrix(5, 2, 30, 40)
    assert torch.equal(a, ssfn.random_matrix(5, 2, 30, 40))
    assert not torch.equal(a, ssfn.random_matrix(5, 3, 30, 40))
    assert not torch.equal(a, ssfn.random_matrix(6, 2, 30, 40))
    assert a.dtype == torch.float64 and float(a.min()) >= -1.0 and float(a.max()) <= 1.0


def test_features_normalize_only_the_random_rows() -> None:
    cfg = ssfn.SsfnConfig(nodes=30)
    y_prev = torch.rand(5, 8, dtype=torch.float64)
    o_prev = torch.randn(3, 8, dtype=torch.float64)
    y = ssfn.next_features(cfg, 1, y_prev, o_prev)
    assert y.shape == (5, 30)
    assert torch.allclose(y[:, :6] @ ssfn.u_q(3).T, y_prev @ o_prev.T)  # the V_Q block carries T̂ exactly
    r = ssfn.random_matrix(cfg.seed, 1, 24, 8)
    assert torch.allclose(y[:, 6:], torch.relu(ssfn.normalize_rows(y_prev @ r.T)))


def test_progression_property_on_digits(digits: tuple[torch.Tensor, ...]) -> None:
    """§2(f)5: with α ≥ 1 and exact solves the training cost never increases with depth (1e-6 slack)."""
    x, y, _, _ = digits
    for alpha in (1.0, 2.0):
        cfg = ssfn.SsfnConfig(num_layers=4, nodes=120, alpha=alpha)
        costs = ssfn.training_costs(ssfn.train_centralized(x, y, 10, cfg), x, y)
        assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(costs))
        assert costs[-1] < 0.5 * costs[0]


def test_default_config_accuracy_and_state_round_trip(digits: tuple[torch.Tensor, ...]) -> None:
    x, y, xt, yt = digits
    cfg = ssfn.SsfnConfig()
    model = ssfn.train_centralized(x, y, 10, cfg)
    scores = ssfn.predict(model, xt)
    assert float((scores.argmax(1) == yt).double().mean()) > 0.95
    buf = io.BytesIO()
    torch.save(ssfn.model_state(model), buf)
    buf.seek(0)
    back = ssfn.model_from_state(torch.load(buf, weights_only=True), cfg)
    assert torch.equal(ssfn.predict(back, xt), scores)
    with pytest.raises(ValueError, match="seed"):
        ssfn.model_from_state(ssfn.model_state(model), ssfn.SsfnConfig(seed=1))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="alpha"):
        ssfn.SsfnConfig(alpha=0.5)
    with pytest.raises(ValueError, match="2Q"):
        ssfn.SsfnConfig(nodes=15).check(10)
