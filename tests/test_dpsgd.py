"""D-PSGD on the P1 synchronizer (spec §7, §1.4): exactness on a lossy network, the synchronous reference, wire
size, the complete graph, give-up on a dead neighbour and the jump rule."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

from peer.algorithms.base import AlgoParams, Algorithm, InMessage, NeighbourView, Payload, payload_floats
from peer.algorithms.dpsgd import Dpsgd, DpsgdParams
from peer.algorithms.mixing import mixing_matrix
from peer.algorithms.sim import FunctionOracle, Links, Simulation, complete, random_graph, ring
from tests.sim_harness import F64, Recorder, grad, initial, lsq, max_err, oracles, simulate


def dpsgd(**kw: object) -> Callable[[str], Algorithm]:
    # Plain D-PSGD (momentum 0, the paper's rule) unless a test asks otherwise; the daemon's default is 0.9.
    kw = {"momentum": 0.0, **kw}
    return lambda i: Dpsgd(DpsgdParams(retransmit_s=0.01, **kw), i)  # type: ignore[arg-type]


def test_lossy_network_gives_the_lossless_result_bit_for_bit() -> None:
    adj = random_graph(6, 0.4, seed=3)
    prob = lsq(sorted(adj))
    speeds = {f"n{i}": 0.01 + 0.004 * i for i in range(6)}
    clean, _ = simulate(dpsgd(), adj, prob, 80, speeds=speeds)
    lossy, _ = simulate(dpsgd(), adj, prob, 80, links=Links(drop=0.3, duplicate=0.2), speeds=speeds, seed=4)
    assert all(torch.equal(clean.x[i], lossy.x[i]) for i in adj)
    assert sum(s.retransmissions for s in lossy.stats.values()) > 0
    assert sum(a.sync.duplicates for a in lossy.algorithms.values()) > 0  # type: ignore[attr-defined]
    assert all(a.sync.gave_up == 0 and a.jumps == 0 for a in lossy.algorithms.values())  # type: ignore[attr-defined]


def test_matches_the_synchronous_reference() -> None:
    """x_i^{k+1} = Σ_j w_ij x_j^k − γ ∇f_i(x_i^k), written out, at every iteration (1e-12)."""
    adj = random_graph(7, 0.3, seed=2)
    prob = lsq(sorted(adj))
    gamma, k_max = 0.02, 50
    _, rec = simulate(dpsgd(), adj, prob, k_max, lr=lambda k: gamma)
    w = mixing_matrix(adj)
    x = initial(sorted(adj))
    for k in range(k_max):
        x = {i: sum(w[i][j] * x[j] for j in w[i]) - gamma * grad(prob, i, x[i]) for i in x}  # type: ignore[misc]
        assert max(max_err(rec.x[i][k + 1], x[i]) for i in x) < 1e-12
    assert max_err(x["n0"], initial(sorted(adj))["n0"]) > 0.1


def test_message_is_p_floats_per_neighbour_per_round() -> None:
    p = 6
    algo = Dpsgd(DpsgdParams(momentum=0.0), "a")
    view = NeighbourView("a", {"b": 2, "c": 1})
    x = torch.ones(p, dtype=F64)
    oracle = FunctionOracle(lambda x: (0.0, x.clone()))
    algo.start(x, 0.0, view)
    for k in range(3):
        sends = algo.sends(0.0)
        assert sorted(s.to for s in sends) == ["b", "c"]
        assert all(payload_floats(s.payload) == p and s.payload.round == k and s.key == (k,) for s in sends)
        for j in ("b", "c"):
            algo.on_message(InMessage(j, 1, 2, Payload("state", {"params": x}, round=k), 0.0), 0.0)
        x = algo.advance(x, oracle, 0.0, view)
    assert algo.expected_by_kind(p) == {"state": {"params": ((p,), "float32")}}


def test_complete_graph_mean_is_gradient_descent_on_the_average() -> None:
    """W = 11ᵀ/N. For any f_i every node mixes to the exact mean: x_i^{k+1} + γ ∇f_i(x_i^k) = x̄^k, hence
    x̄^{k+1} = x̄^k − γ (1/N) Σ_i ∇f_i(x_i^k). With a common Hessian (f_i = ½‖A x − b_i‖²) that average is
    ∇F(x̄^k), so x̄^k is exactly gradient descent on F = (1/N) Σ f_i, i.e. full-batch SGD on N·b samples."""
    adj = complete(5)
    ids = sorted(adj)
    gamma, k_max = 0.01, 40
    prob = lsq(ids, common_a=True)
    x0 = dict.fromkeys(ids, initial(ids)["n0"])
    _, rec = simulate(dpsgd(), adj, prob, k_max, lr=lambda k: gamma, x0=x0)
    x_gd = x0["n0"].clone()
    for k in range(k_max):
        for i in ids:
            assert max_err(rec.x[i][k + 1] + gamma * grad(prob, i, rec.x[i][k]), rec.mean("x", k)) < 1e-12
        x_gd = x_gd - gamma * torch.stack([grad(prob, i, x_gd) for i in ids]).mean(0)
        assert max_err(rec.mean("x", k + 1), x_gd) < 1e-12
    assert max_err(rec.x["n0"][k_max], rec.x["n1"][k_max]) > 1e-3  # the nodes themselves differ


class Dead(Algorithm):
    """A neighbour that never answers: it sends nothing and never advances."""

    name: ClassVar[str] = "dead"
    params_type: ClassVar[type[AlgoParams]] = AlgoParams
    owns_local_update: ClassVar[bool] = True

    def ready(self, now: float, view: NeighbourView) -> bool:
        return False

    def on_message(self, msg: InMessage, now: float) -> bool:
        return False


def test_dead_neighbour_is_given_up_and_the_survivors_advance() -> None:
    """n0 never answers. Its neighbours n1, n4 exclude it after give_up_s once, then keep excluding it without a
    new wait while it stays silent, and mix with weight w_i0 moved into their self weight; the survivors run
    exactly the reference below."""
    adj = ring(5)
    live = ["n1", "n2", "n3", "n4"]
    prob = lsq(sorted(adj))
    gamma, k_max, give_up = 0.02, 30, 0.05
    x0 = initial(sorted(adj))
    algos: dict[str, Algorithm] = {"n0": Dead(AlgoParams(name="dead"), "n0")}
    for i in live:
        algos[i] = Dpsgd(
            DpsgdParams(momentum=0.0, retransmit_s=0.01, give_up_s=give_up if i in ("n1", "n4") else 5.0), i
        )
    rec = Recorder(x0)
    sim = Simulation(
        algos, {i: x.clone() for i, x in x0.items()}, oracles(prob, lambda k: gamma), adj, after_advance=rec
    )
    sim.run(until=lambda s: all(s.algorithms[i].iteration >= k_max for i in live), max_time_s=60.0)
    assert all(algos[i].iteration >= k_max for i in live)
    # One wait for the dead node, not one per round.
    assert give_up <= sim.now < k_max * give_up
    for i in live:
        assert algos[i].sync.gave_up == (1 if i in ("n1", "n4") else 0)  # type: ignore[attr-defined]
    assert algos["n1"].last_report.used == ("n2",) and algos["n2"].last_report.used == ("n1", "n3")
    w = mixing_matrix(adj)
    x = {i: x0[i] for i in live}
    for k in range(k_max):
        x = {
            i: (1 - sum(w[i][j] for j in adj[i] if j != "n0")) * x[i]
            + sum(w[i][j] * x[j] for j in adj[i] if j != "n0")
            - gamma * grad(prob, i, x[i])
            for i in live
        }
        assert max(max_err(rec.x[i][k + 1], x[i]) for i in live) < 1e-12


def test_a_node_whose_neighbour_is_far_ahead_jumps_to_its_round() -> None:
    algo = Dpsgd(DpsgdParams(momentum=0.0), "a")
    view = NeighbourView("a", {"b": 1})
    x = torch.tensor([1.0, 2.0], dtype=F64)
    oracle = FunctionOracle(lambda x: (0.0, torch.zeros_like(x)))
    algo.start(x, 0.0, view)
    algo.sends(0.0)
    xb = torch.tensor([3.0, 4.0], dtype=F64)
    algo.on_message(InMessage("b", 1, 1, Payload("state", {"params": xb}, round=1), 0.0), 0.0)
    assert algo.sync.jump_to is None  # one round ahead is normal: buffered, no jump
    algo.on_message(InMessage("b", 1, 1, Payload("state", {"params": xb}, round=5), 0.0), 0.0)
    assert algo.ready(0.0, view)
    y = algo.advance(x, oracle, 0.0, view)
    assert torch.equal(y, x) and algo.iteration == 5 and algo.jumps == 1  # continues from its current state
    assert [(s.to, s.payload.round) for s in algo.sends(0.0)] == [("b", 5)]
    assert algo.ready(0.0, view)  # b's round-5 message was kept
    y = algo.advance(y, oracle, 0.0, view)
    assert algo.iteration == 6 and max_err(y, (x + xb) / 2) < 1e-15


def test_a_slow_node_jumps_instead_of_replaying_rounds() -> None:
    """n0 is five times slower and its neighbours give up on it after 20 ms: they run ahead, and n0 jumps to
    their round whenever it sees a message more than one round ahead of its own."""
    adj = ring(4)
    prob = lsq(sorted(adj))
    x0 = initial(sorted(adj))
    algos = {i: Dpsgd(DpsgdParams(momentum=0.0, retransmit_s=0.01, give_up_s=0.02), i) for i in adj}
    sim = Simulation(
        dict(algos),
        {i: x.clone() for i, x in x0.items()},
        oracles(prob, lambda k: 0.02),
        adj,
        speeds={"n0": 0.05},
    )
    sim.run(until=lambda s: s.algorithms["n2"].iteration >= 100, max_time_s=60.0)
    assert algos["n0"].jumps > 0
    assert algos["n0"].iteration >= 90  # kept up with the network's round, not its own pace (~1/3 of that)
    assert all(torch.isfinite(x).all() for x in sim.x.values())
