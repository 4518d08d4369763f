"""NEXT with push-sum (peer.algorithms.next_pushsum), spec §5(f): the tracking invariant with mass in flight, the
ridge optimum under loss, tracker restarts on departure, waiting for mass."""

from __future__ import annotations

import pytest
import torch

from peer.algorithms.next_pushsum import NextPushsum, NextPushsumParams
from peer.algorithms.pushsum import network_mass
from peer.algorithms.sim import Links, Simulation, ring
from tests.next_problems import AGENTS, F64, LeastSquares, departure, rel_err, run


def _pushsum_kw(problem: LeastSquares, i: str) -> dict[str, object]:
    return dict(step="next", tau=AGENTS * problem.lipschitz(i), alpha0=0.5, epsilon=1e-2, regularizer="l2", lam=0.5)


def test_pushsum_tracking_invariant_holds_with_the_mass_in_flight() -> None:
    adj = ring(AGENTS)
    problem = LeastSquares.make(list(adj))
    count = [0]

    def invariant(sim: Simulation, node: str) -> None:
        # Σ_i Y_i + Σ_links (σ − ρ) = Σ_i ∇g_i(w_i) at every instant, however much mass is in flight.
        algos = sim.algorithms
        mass, _ = network_mass({i: a.sums for i, a in algos.items()})  # type: ignore[attr-defined,misc]
        gsum = sum(a.g for a in algos.values() if a.g is not None)  # type: ignore[attr-defined]
        scale = max(float(a.g.norm()) for a in algos.values() if a.g is not None)  # type: ignore[attr-defined]
        assert float((mass["tracker"] - gsum).norm()) <= 1e-9 * scale
        count[0] += 1

    algos = {i: NextPushsum(NextPushsumParams(**_pushsum_kw(problem, i)), i) for i in adj}
    run(algos, {i: problem.oracle(i) for i in adj}, adj, 40, drop=0.3, hook=invariant)
    assert count[0] >= 40 * AGENTS


def test_pushsum_reaches_the_ridge_optimum_under_drop() -> None:
    adj = ring(AGENTS)
    problem = LeastSquares.make(list(adj))
    algos = {i: NextPushsum(NextPushsumParams(**_pushsum_kw(problem, i)), i) for i in adj}
    sim = run(algos, {i: problem.oracle(i) for i in adj}, adj, 300, drop=0.2)
    err = rel_err(sim.x, problem.ridge_optimum(0.5))
    assert err < 1e-8, err  # measured 8.5e-11 (3e-14 from 400 iterations on)


def test_pushsum_departure_restarts_the_trackers_and_reaches_the_remaining_optimum() -> None:
    ids = [f"n{k}" for k in range(AGENTS)]
    rest = ids[:-1]
    adjacency, depart = departure(ids, 40)
    problem = LeastSquares.make(ids)
    algos = {i: NextPushsum(NextPushsumParams(**_pushsum_kw(problem, i)), i) for i in ids}
    oracles = {i: problem.oracle(i) for i in ids}
    x0 = {i: torch.zeros(6, dtype=F64) for i in ids}
    sim = Simulation(dict(algos), x0, oracles, adjacency, links=Links(drop=0.1), after_advance=depart, seed=4)  # type: ignore[arg-type]
    sim.run(iterations=300)
    assert all(algos[i].restarts >= 1 and algos[i].epoch == algos["n0"].epoch for i in rest)
    mass, weight = network_mass({i: algos[i].sums for i in rest})  # type: ignore[misc]
    assert weight == pytest.approx(len(rest), abs=1e-12)  # the epoch restarted the weights: Σ φ = I again
    gsum = sum(algos[i].g for i in rest)
    assert float((mass["tracker"] - gsum).norm()) < 1e-9 * float(gsum.norm())  # type: ignore[union-attr]
    err = rel_err(sim.x, problem.ridge_optimum(0.5, rest), rest)
    assert err < 1e-8, err


def test_next_pushsum_waits_for_mass_when_its_weight_collapsed_and_repeats_its_sums() -> None:
    """After pushing its mass away, a node iterates again only once mass came back (or after max_wait_s), and
    while it waits it repeats its latest running sums, so a lost message is recovered without new mass."""
    from peer.algorithms.base import NeighbourView as View
    from peer.algorithms.next_pushsum import NextPushsum, NextPushsumParams
    from peer.algorithms.sim import FunctionOracle

    algo = NextPushsum(NextPushsumParams(max_wait_s=1.0, resend_s=0.05), "a")
    view = View("a", {"b": 2, "c": 2}, frozenset({"a", "b", "c"}))
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    oracle = FunctionOracle(lambda w: (0.0, w - 1.0), lr_fn=lambda k: 0.1)
    algo.start(x, 0.0, view)
    assert algo.ready(0.0, view)
    algo.advance(x, oracle, 0.0, view)
    first = algo.sends(0.0)
    assert {s.to for s in first} == {"b", "c"}
    assert algo.sums is not None and algo.sums.weight == pytest.approx(1 / 3)
    assert not algo.ready(0.5, view) and algo.waits == 1  # nothing came back yet
    again = algo.sends(0.06)  # the latest sums, repeated
    assert [s.payload for s in again] == [s.payload for s in sorted(first, key=lambda s: s.to)]
    assert algo.sends(0.07) == []  # not more often than resend_s
    assert algo.ready(1.0, view)  # max_wait_s: never stuck
