"""NEXT (peer.algorithms.next), spec §5(f): tracking invariant, convex optima, parallel step, lossy networks."""

from __future__ import annotations

import itertools

import pydantic
import pytest
import torch

from peer.algorithms.base import NeighbourView, payload_floats
from peer.algorithms.mixing import mixing_matrix
from peer.algorithms.next import LocalStep, Next, NextParams, block_bounds, num_agents, soft
from peer.algorithms.next_pushsum import NextPushsum, NextPushsumParams
from peer.algorithms.sim import FunctionOracle, Links, Simulation, ring
from peer.errors import ConfigError
from tests.next_problems import AGENTS, F64, LeastSquares, departure, rel_err, run


class GaussNewton(FunctionOracle):
    """A FunctionOracle that also gives residuals and the Jacobian (linear model: J = A)."""

    def __init__(self, problem: LeastSquares, i: str) -> None:
        super().__init__(lambda w: (0.0, problem.grad(i, w)))
        self.problem, self.i = problem, i

    def residuals_and_jacobian(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.problem.a[self.i]
        return a @ x - self.problem.b[self.i], a


def next_params(problem: LeastSquares, i: str, **kw: object) -> NextParams:
    base: dict[str, object] = dict(
        step="next", tau=AGENTS * problem.lipschitz(i), alpha0=0.5, epsilon=1e-2, regularizer="l2", lam=0.5
    )
    base.update(kw)
    return NextParams(**base, retransmit_s=0.01)  # type: ignore[arg-type]


def run_next(problem: LeastSquares, adj: object, iterations: int, drop: float = 0.0, **kw: object) -> Simulation:
    ids = list(problem.a)
    algos = {i: Next(next_params(problem, i, **kw), i) for i in ids}
    return run(algos, {i: problem.oracle(i) for i in ids}, adj, iterations, drop)


def reference_next(problem: LeastSquares, adj: dict[str, list[str]], iterations: int, lam: float) -> torch.Tensor:
    """The synchronous NEXT iteration of §5(a) (S1, ℓ2, MH weights) written as plain matrix algebra."""
    ids = sorted(adj)
    c = mixing_matrix(adj)
    wm = torch.tensor([[c[i].get(j, 0.0) for j in ids] for i in ids], dtype=F64)
    w = torch.zeros(len(ids), 6, dtype=F64)
    g = torch.stack([problem.grad(i, w[k]) for k, i in enumerate(ids)])
    y = g.clone()
    alpha = 0.5
    for _ in range(iterations):
        z = torch.empty_like(w)
        for k, i in enumerate(ids):
            tau = AGENTS * problem.lipschitz(i)
            pi = AGENTS * y[k] - g[k]
            w_tilde = (tau * w[k] - g[k] - pi) / (tau + 2 * lam)
            z[k] = w[k] + alpha * (w_tilde - w[k])
        alpha *= 1 - 1e-2 * alpha
        w_new = wm @ z
        g_new = torch.stack([problem.grad(i, w_new[k]) for k, i in enumerate(ids)])
        y = wm @ y + g_new - g
        w, g = w_new, g_new
    return w


# ----------------------------------------------------------------------------------------------- 1 invariant
def test_tracking_invariant_holds_at_every_iteration() -> None:
    adj = ring(AGENTS)
    problem = LeastSquares.make(list(adj))
    history: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    checked = []

    def invariant(sim: Simulation, node: str) -> None:
        algo = sim.algorithms[node]
        assert isinstance(algo, Next) and algo.y is not None and algo.g is not None
        row = history.setdefault(algo.iteration, {})
        row[node] = (algo.y.clone(), algo.g.clone())
        if len(row) == AGENTS:  # every agent has finished iteration n: (1/I) Σ y_i[n] = (1/I) Σ ∇g_i(w_i[n])
            ys = sum(v[0] for v in row.values()) / AGENTS
            gs = sum(v[1] for v in row.values()) / AGENTS
            scale = max(float(v[1].norm()) for v in row.values())
            assert float((ys - gs).norm()) <= 1e-9 * scale  # type: ignore[union-attr]
            checked.append(algo.iteration)
            del history[algo.iteration]

    algos = {i: Next(next_params(problem, i), i) for i in adj}
    run(algos, {i: problem.oracle(i) for i in adj}, adj, 60, drop=0.2, hook=invariant)
    assert checked[:60] == list(range(60))  # iteration 0 (initialization) included


# ------------------------------------------------------------------------------------------ 2 ridge optimum
def test_ridge_reaches_the_closed_form_optimum() -> None:
    adj = ring(AGENTS)
    problem = LeastSquares.make(list(adj))
    sim = run_next(problem, adj, 300)
    err = rel_err(sim.x, problem.ridge_optimum(0.5))
    assert err < 1e-7, err  # measured 2e-9 at 300 iterations (1e-15 by 500)


@pytest.mark.slow
def test_ridge_reaches_the_optimum_in_2000_iterations_spec_setup() -> None:
    adj = ring(AGENTS)
    problem = LeastSquares.make(list(adj))
    sim = run_next(problem, adj, 2000)
    assert rel_err(sim.x, problem.ridge_optimum(0.5)) < 1e-12


def test_lossy_run_equals_lossless_run_and_the_synchronous_reference() -> None:
    adj = ring(AGENTS)
    problem = LeastSquares.make(list(adj))
    lossless = run_next(problem, adj, 120)
    lossy = run_next(problem, adj, 120, drop=0.2)
    assert lossy.stats["n0"].dropped > 0 and lossy.stats["n0"].retransmissions > 0
    for i in adj:
        assert torch.equal(lossless.x[i], lossy.x[i])  # P1 is exact: bit for bit
    ref = reference_next(problem, adj, 120, lam=0.5)
    for k, i in enumerate(sorted(adj)):
        assert torch.allclose(lossless.x[i], ref[k], rtol=0, atol=1e-12)


# -------------------------------------------------------------------------------------------------- 3 lasso
def fista(problem: LeastSquares, lam: float, tol: float = 1e-13) -> torch.Tensor:
    """Centralized FISTA on Σ_i ||A_i w − b_i||² + λ||w||₁, run until the iterates stop moving (1e-13)."""
    ids = list(problem.a)
    lip = 2.0 * float(torch.linalg.matrix_norm(torch.cat([problem.a[i] for i in ids]), 2)) ** 2
    w = v = torch.zeros(6, dtype=F64)
    t = 1.0
    for _ in range(200_000):
        g = sum(problem.grad(i, v) for i in ids)
        w_new = soft(v - g / lip, lam / lip)  # type: ignore[operator]
        t_new = (1 + (1 + 4 * t * t) ** 0.5) / 2
        v = w_new + (t - 1) / t_new * (w_new - w)
        if float((w_new - w).norm()) < tol:
            return w_new
        w, t = w_new, t_new
    raise AssertionError("FISTA did not converge")


def test_lasso_matches_fista_with_identical_support() -> None:
    adj = ring(AGENTS)
    problem = LeastSquares.make(list(adj), sparse=True)
    lam = 40.0
    w_star = fista(problem, lam)
    assert 0 < int((w_star != 0).sum()) < 6  # a genuinely sparse optimum
    sim = run_next(problem, adj, 400, regularizer="l1", lam=lam)
    assert rel_err(sim.x, w_star) < 1e-6
    # The local prox step zeroes coordinates exactly, but mixing the z's leaves zeros at ~1e-50, not 0.0.
    cutoff = 1e-12 * float(w_star.norm())
    for i in adj:
        assert torch.equal(sim.x[i].abs() > cutoff, w_star != 0), (sim.x[i], w_star)


# ----------------------------------------------------------------------------------------------- 4 logistic
def test_logistic_l2_matches_a_newton_reference() -> None:
    adj = ring(AGENTS)
    gen = torch.Generator().manual_seed(5)
    d, lam = 5, 2.0
    feats = {i: 0.5 * torch.randn(20, d, generator=gen, dtype=F64) + 0.1 * k for k, i in enumerate(adj)}
    labels = {
        i: torch.sign(feats[i] @ torch.ones(d, dtype=F64) + torch.randn(20, generator=gen, dtype=F64)) for i in adj
    }

    def grad(i: str, w: torch.Tensor) -> torch.Tensor:  # g_i = Σ_m log(1 + exp(−y_m a_mᵀw))
        return -(feats[i].T @ (labels[i] * torch.sigmoid(-labels[i] * (feats[i] @ w))))

    a_all, y_all = torch.cat(list(feats.values())), torch.cat(list(labels.values()))
    w_star = torch.zeros(d, dtype=F64)
    for _ in range(50):  # Newton on Σ g_i + λ||w||², to machine precision
        s = torch.sigmoid(y_all * (a_all @ w_star))
        g = -(a_all.T @ (y_all * (1 - s))) + 2 * lam * w_star
        h = a_all.T @ (a_all * (s * (1 - s))[:, None]) + 2 * lam * torch.eye(d, dtype=F64)
        w_star = w_star - torch.linalg.solve(h, g)
    assert float(g.norm()) < 1e-12

    def tau(i: str) -> float:
        return AGENTS * 0.25 * float(torch.linalg.matrix_norm(feats[i], 2)) ** 2

    params = {i: NextParams(step="next", tau=tau(i), alpha0=0.5, epsilon=1e-2, regularizer="l2", lam=lam) for i in adj}
    oracles = {i: FunctionOracle(lambda w, i=i: (0.0, grad(i, w))) for i in adj}  # type: ignore[misc]
    sim = run({i: Next(params[i], i) for i in adj}, oracles, adj, 200, d=d)
    err = rel_err(sim.x, w_star)
    assert err < 1e-5, err  # measured 2.5e-7 (7.8e-11 at 400 iterations)


# ---------------------------------------------------------------------------------------- 5 parallel step
@pytest.mark.parametrize("regularizer", ["l2", "l1"])
def test_parallel_block_step_equals_the_serial_step(regularizer: str) -> None:
    adj = ring(4)
    problem = LeastSquares.make(list(adj), sparse=regularizer == "l1")
    lam = 40.0 if regularizer == "l1" else 0.5
    serial = run_next(problem, adj, 40, regularizer=regularizer, lam=lam)
    parallel = run_next(problem, adj, 40, regularizer=regularizer, lam=lam, blocks=4, parallel_workers=3)
    uneven = run_next(problem, adj, 40, regularizer=regularizer, lam=lam, blocks=5, parallel_workers=2)
    for i in adj:
        assert torch.allclose(serial.x[i], parallel.x[i], rtol=0, atol=1e-12)
        assert torch.allclose(serial.x[i], uneven.x[i], rtol=0, atol=1e-12)


def test_random_block_selection_still_reaches_the_optimum() -> None:
    adj = ring(4)
    problem = LeastSquares.make(list(adj))
    sim = run_next(problem, adj, 400, blocks=3, block_fraction=0.5, parallel_workers=2)
    assert rel_err(sim.x, problem.ridge_optimum(0.5)) < 1e-5  # measured 2e-6 (half the blocks: a slower descent)


def test_block_bounds_cover_the_vector() -> None:
    assert block_bounds(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert block_bounds(2, 5) == [(0, 1), (1, 2)]
    assert block_bounds(7, 1) == [(0, 7)]


# --------------------------------------------------------------------------------------- 6 nonconvex sanity
def test_nonconvex_consensus_and_stationarity() -> None:
    """A single tanh neuron fitted by squared loss (nonconvex in w), 6 agents on a ring, no regularizer."""
    adj = ring(6)
    gen = torch.Generator().manual_seed(7)
    d = 4
    feats = {i: torch.randn(15, d, generator=gen, dtype=F64) for i in adj}
    targets = {i: torch.tanh(feats[i] @ torch.randn(d, generator=gen, dtype=F64)) + 0.1 * k for k, i in enumerate(adj)}

    def loss_grad(i: str, w: torch.Tensor) -> tuple[float, torch.Tensor]:
        out = torch.tanh(feats[i] @ w)
        r = out - targets[i]
        return float((r * r).sum()), 2.0 * feats[i].T @ (r * (1 - out * out))

    def total(w: torch.Tensor) -> tuple[float, torch.Tensor]:
        parts = [loss_grad(i, w) for i in adj]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)  # type: ignore[return-value]

    lip = max(2.0 * float(torch.linalg.matrix_norm(feats[i], 2)) ** 2 * 3 for i in adj)
    params = NextParams(step="next", tau=6 * lip, alpha0=0.5, epsilon=1e-2)
    algos = {i: Next(params, i) for i in adj}
    oracles = {i: FunctionOracle(lambda w, i=i: loss_grad(i, w)) for i in adj}  # type: ignore[misc]
    x0 = {i: torch.full((d,), 0.1, dtype=F64) for i in adj}
    sim = Simulation(dict(algos), x0, oracles, adj, seed=2)  # type: ignore[arg-type]
    trace = []
    for n in range(1, 9):
        sim.run(iterations=60 * n)
        trace.append((sim.disagreement(), float(total(sim.mean())[1].norm())))
    consensus = [c for c, _ in trace]
    assert consensus[-1] < 1e-3 * consensus[0] and consensus[-1] < 1e-7 * float(sim.mean().norm())  # → 0
    stationarity = [s for _, s in trace]
    assert stationarity[-1] < 1e-3 * stationarity[0]  # measured 0.67 → 1.4e-4 (2e-5 at 800 iterations)
    assert all(b <= a * 1.05 for a, b in itertools.pairwise(stationarity))  # decreasing trend
    # Centralized gradient descent on U from the same point reaches the same objective value.
    w = torch.full((d,), 0.1, dtype=F64)
    for _ in range(1000):  # converged to |∇U| ~ 2e-14
        w = w - total(w)[1] / (6 * lip)
    assert total(sim.mean())[0] <= total(w)[0] * (1 + 1e-4)  # spec: a few percent; measured 2.5e-11 relative


# ----------------------------------------------------------------------------------------- 7 time-varying
def test_time_varying_graph_of_two_disconnected_halves() -> None:
    ids = [f"n{k}" for k in range(AGENTS)]
    even = {ids[k]: [ids[k ^ 1]] for k in range(AGENTS)}  # pairs (0,1), (2,3), …: disconnected
    # (1,2), (3,4), …, (7,0)
    odd = {ids[k]: [ids[(k + 1) % AGENTS] if k % 2 else ids[(k - 1) % AGENTS]] for k in range(AGENTS)}
    assert all(len(set(even[i]) | set(odd[i])) == 2 for i in ids)  # the union is the ring

    def adjacency(node: str, iteration: int) -> list[str]:
        return (even if iteration % 2 == 0 else odd)[node]

    problem = LeastSquares.make(ids)
    # α[0] = 0.5 (test 2's value) overshoots to |w| ~ 1e8 on this graph before converging, and float64 rounding
    # at that scale leaves the tracker off by 2e-3 for good (a 1.3e-6 plateau); α[0] = 0.2 does not overshoot.
    sim = run_next(problem, adjacency, 600, alpha0=0.2)
    err = rel_err(sim.x, problem.ridge_optimum(0.5))
    assert err < 1e-12, err  # measured 5e-16 (1e-10 at 400 iterations)


def test_departure_restarts_the_trackers_and_reaches_the_remaining_optimum() -> None:
    ids = [f"n{k}" for k in range(AGENTS)]
    rest = ids[:-1]
    adjacency, depart = departure(ids, 40)
    problem = LeastSquares.make(ids)
    history: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    after_wave = []

    def hook(sim: Simulation, node: str) -> None:
        depart(sim, node)
        algo = sim.algorithms[node]
        assert isinstance(algo, Next) and algo.y is not None and algo.g is not None
        if node in rest and algo.iteration > 60:  # the restart wave is over: Σ y = Σ ∇g among the remaining
            row = history.setdefault(algo.iteration, {})
            row[node] = (algo.y.clone(), algo.g.clone())
            if len(row) == len(rest):
                gap = sum(v[0] - v[1] for v in row.values())
                after_wave.append(float(gap.norm()))  # type: ignore[union-attr]

    algos = {i: Next(next_params(problem, i, give_up_s=0.2), i) for i in ids}
    x0 = {i: torch.zeros(6, dtype=F64) for i in ids}
    oracles = {i: problem.oracle(i) for i in ids}
    sim = Simulation(dict(algos), x0, oracles, adjacency, after_advance=hook, seed=4)  # type: ignore[arg-type]
    sim.run(iterations=400)
    assert all(algos[i].restarts >= 1 and algos[i].epoch == algos["n0"].epoch for i in rest)
    assert len(after_wave) > 300 and max(after_wave) < 1e-9  # measured ~1e-13; 65 before the departure
    err = rel_err(sim.x, problem.ridge_optimum(0.5, rest), rest)
    assert err < 1e-10, err  # measured 1.5e-15


def test_link_outage_restarts_the_trackers_and_still_reaches_the_optimum() -> None:
    """n0–n1 is down for the first 1.5 s: both ends give up on each other, mix without the edge, and take it back
    in later. Leaving it out and taking it back both restart the trackers (without the second restart the run
    settles 3% away from w*: while one end was excluded, the other may still have used its messages)."""
    adj = ring(AGENTS)
    problem = LeastSquares.make(list(adj))
    algos = {i: Next(next_params(problem, i, give_up_s=0.2), i) for i in adj}
    x0 = {i: torch.zeros(6, dtype=F64) for i in adj}
    oracles = {i: problem.oracle(i) for i in adj}
    cut = {frozenset(("n0", "n1")): 1.5}
    sim = Simulation(dict(algos), x0, oracles, adj, links=Links(drop=0.1), seed=1, cut_until=cut)  # type: ignore[arg-type]
    sim.run(iterations=400)
    assert algos["n0"].sync.gave_up >= 1 and all(a.restarts >= 2 for a in algos.values())
    err = rel_err(sim.x, problem.ridge_optimum(0.5))
    assert err < 1e-9, err  # measured 2.5e-12


# --------------------------------------------------------------------------------------------- surrogates
def test_gauss_newton_surrogate_reaches_the_ridge_optimum() -> None:
    adj = ring(AGENTS)
    problem = LeastSquares.make(list(adj), m=4)  # m < P: the Woodbury branch
    algos = {i: Next(next_params(problem, i, surrogate="gauss_newton"), i) for i in adj}
    sim = run(algos, {i: GaussNewton(problem, i) for i in adj}, adj, 250)
    assert rel_err(sim.x, problem.ridge_optimum(0.5)) < 1e-8  # measured 4e-10


def test_gauss_newton_block_solves_wide_and_tall_agree_with_the_normal_equations() -> None:
    gen = torch.Generator().manual_seed(3)
    w, y = torch.randn(6, generator=gen, dtype=F64), torch.randn(6, generator=gen, dtype=F64)
    step = LocalStep(NextParams(surrogate="gauss_newton", regularizer="l2", lam=0.3), "n0")
    for m in (3, 9):  # Woodbury (m < P) and the direct solve
        jac = torch.randn(m, 6, generator=gen, dtype=F64)
        got = step.solve(w, y, jac, agents=4, tau=2.0)
        # (2JᵀJ + (τ+2λ)·1)(w − w̃) = I·y + 2λw
        lhs = (2 * jac.T @ jac + (2.0 + 0.6) * torch.eye(6, dtype=F64)) @ (w - got)
        assert torch.allclose(lhs, 4 * y + 0.6 * w, rtol=0, atol=1e-12)


def test_gauss_newton_needs_residuals_and_rejects_l1() -> None:
    algo = Next(NextParams(surrogate="gauss_newton"), "n0")
    view = NeighbourView("n0", {})
    algo.start(torch.zeros(3), 0.0, view)
    with pytest.raises(ConfigError, match=r"algorithm\.surrogate"):
        algo.advance(torch.zeros(3), FunctionOracle(lambda w: (0.0, w)), 0.0, view)
    with pytest.raises(pydantic.ValidationError, match="gauss_newton"):
        NextParams(surrogate="gauss_newton", regularizer="l1")


# ------------------------------------------------------------------------------------ lr mode, wire, misc
def test_lr_mode_alone_is_gradient_descent_and_on_a_ring_reaches_the_optimum() -> None:
    solo = Next(NextParams(), "solo")
    view = NeighbourView("solo", {}, frozenset({"solo"}))
    x = torch.tensor([4.0], dtype=F64)
    oracle = FunctionOracle(lambda w: (0.0, 2 * w), lr_fn=lambda k: 0.25)
    solo.start(x, 0.0, view)
    for _ in range(4):  # initialization, then three iterations w ← w − lr·∇g
        x = solo.advance(x, oracle, 0.0, view)
    assert float(x) == pytest.approx(4.0 * 0.5**3)

    adj = ring(AGENTS)
    problem = LeastSquares.make(list(adj))
    lr = 0.5 / max(problem.lipschitz(i) for i in adj)
    algos = {i: Next(NextParams(regularizer="l2", lam=0.5, retransmit_s=0.01), i) for i in adj}
    sim = run(algos, {i: problem.oracle(i, lr) for i in adj}, adj, 400, drop=0.1)
    assert rel_err(sim.x, problem.ridge_optimum(0.5)) < 1e-8


def test_wire_sizes() -> None:
    d = 9
    view = NeighbourView("n0", {"n1": 2, "n2": 2}, frozenset({"n0", "n1", "n2"}))
    oracle = FunctionOracle(lambda w: (0.0, w.clone()))
    algo = Next(NextParams(), "n0")
    algo.start(torch.ones(d), 0.0, view)
    assert algo.ready(0.0, view)
    algo.advance(torch.ones(d), oracle, 0.0, view)
    sends = algo.sends(0.0)
    assert sorted(s.to for s in sends) == ["n1", "n2"]
    assert all(payload_floats(s.payload) == 2 * d and s.reliable and s.payload.kind == "tracker" for s in sends)
    assert algo.expected_by_kind(d) == {"tracker": {"params": ((d,), "float32"), "tracker": ((d,), "float32")}}
    assert algo.metrics()["epoch"] == 0 and algo.metrics()["round"] == 0
    ps = NextPushsum(NextPushsumParams(), "n0")
    ps.start(torch.ones(d), 0.0, view)
    ps.advance(torch.ones(d), oracle, 0.0, view)
    sends = ps.sends(0.0)
    assert sorted(s.to for s in sends) == ["n1", "n2"]
    assert all(payload_floats(s.payload) == 2 * d + 1 and not s.reliable for s in sends)


def test_number_of_agents() -> None:
    assert num_agents(NeighbourView("a", {"b": 1}, frozenset({"a", "b", "c"})), 7) == 3
    assert num_agents(NeighbourView("a", {"b": 1}), 7) == 7
    assert num_agents(NeighbourView("a", {"b": 1}), 0) == 2
