"""`dmsgd_async`, the P2 variant of DMSGD (spec §3(f)): renormalized mixes over the fresh set, staleness and
sequence rules, latest-wins sends, heavy ball alone, convergence under message loss."""

from __future__ import annotations

import pytest
import torch

from peer.algorithms.base import InMessage, NeighbourView, Payload, payload_floats
from peer.algorithms.dmsgd import DmsgdAsync, DmsgdAsyncParams
from peer.algorithms.sim import FunctionOracle, Links, ring
from tests.sim_harness import F64, Schedule, _msg, grad, heavy_ball, lsq, max_err, simulate


def _state(x: list[float], v: list[float], seq: int) -> Payload:
    return Payload(
        "momentum_state", {"params": torch.tensor(x, dtype=F64), "momentum": torch.tensor(v, dtype=F64)}, seq=seq
    )


ZERO_GRAD = FunctionOracle(lambda x: (0.0, torch.zeros_like(x)))


def test_async_renormalizes_both_mixes_over_the_fresh_set() -> None:
    beta, omega = 0.5, 0.25
    algo = DmsgdAsync(DmsgdAsyncParams(beta=beta, omega=omega), "a")
    view = NeighbourView("a", {"b": 2, "c": 2})  # MH: w_ab = w_ac = w_aa = 1/3
    x, v = torch.tensor([1.0, 2.0], dtype=F64), torch.tensor([0.5, -0.5], dtype=F64)
    algo.load_state_dict({"momentum": v.clone()})
    algo.start(x, 0.0, view)
    assert algo.on_message(_msg("b", _state([3.0, 0.0], [1.0, 1.0], seq=1)), 0.0)
    x_new = algo.advance(x, ZERO_GRAD, 0.0, view)
    # Only b is fresh: (w_aa z + w_ab ẑ_b) / (w_aa + w_ab) = (z + ẑ_b) / 2, for z = x and z = v alike.
    v_ref = beta * (omega * v + (1 - omega) * (v + torch.tensor([1.0, 1.0], dtype=F64)) / 2)
    assert max_err(algo.v, v_ref) < 1e-15  # type: ignore[arg-type]
    assert max_err(x_new, (x + torch.tensor([3.0, 0.0], dtype=F64)) / 2 + v_ref) < 1e-15
    assert algo.last_report.used == ("b",) and algo.last_report.self_weight == pytest.approx(0.5)


def test_async_stale_copies_are_skipped_and_old_sequence_numbers_dropped() -> None:
    algo = DmsgdAsync(DmsgdAsyncParams(max_staleness=4), "a")
    view = NeighbourView("a", {"b": 1})
    x = torch.zeros(2, dtype=F64)
    algo.start(x, 0.0, view)
    assert algo.on_message(_msg("b", _state([1.0, 1.0], [0.0, 0.0], seq=5)), 0.0)
    for _ in range(5):  # ages 0..4 since receipt: still fresh
        x = algo.advance(x, ZERO_GRAD, 0.0, view)
        assert algo.last_report.used == ("b",)
    x = algo.advance(x, ZERO_GRAD, 0.0, view)  # age 5 > max_staleness
    assert algo.last_report.used == () and algo.last_report.skipped_stale == ("b",)
    assert algo.metrics()["stale"] == 1 and algo.metrics()["fresh"] == 0
    assert not algo.on_message(_msg("b", _state([9.0, 9.0], [0.0, 0.0], seq=4)), 0.0)  # older
    assert not algo.on_message(_msg("b", _state([9.0, 9.0], [0.0, 0.0], seq=5)), 0.0)  # duplicate
    assert algo.dropped_out_of_order == 2
    assert algo.on_message(InMessage("b", 2, 1, _state([2.0, 2.0], [0.0, 0.0], seq=1), 0.0), 0.0)  # restarted
    algo.advance(x, ZERO_GRAD, 0.0, view)
    assert algo.last_report.used == ("b",) and float(algo.cache["b"].params[0]) == 2.0
    algo.forget("b")
    assert "b" not in algo.cache


def test_async_sends_are_latest_wins_and_unkeyed() -> None:
    p = 5
    algo = DmsgdAsync(DmsgdAsyncParams(send_every=2), "a")
    view = NeighbourView("a", {"b": 2, "c": 2})
    x = torch.zeros(p, dtype=F64)
    algo.start(x, 0.0, view)
    first = algo.sends(0.0)
    assert [(s.to, s.key, s.payload.seq) for s in first] == [("b", (), 1), ("c", (), 1)]
    assert all(payload_floats(s.payload) == 2 * p for s in first) and algo.sends(0.0) == []
    oracle = FunctionOracle(lambda x: (0.0, x - 1.0), lr_fn=lambda k: 0.1)
    x = algo.advance(x, oracle, 0.0, view)
    assert algo.sends(0.0) == []  # send_every = 2
    for _ in range(3):
        x = algo.advance(x, oracle, 0.0, view)
    out = algo.sends(0.0)  # iterations 2 and 4 both queued a state; only the newest goes
    assert [(s.to, s.payload.seq, s.payload.round) for s in out] == [("b", 3, 4), ("c", 3, 4)]
    assert torch.equal(out[0].payload.tensors["params"], x)


def test_async_alone_is_heavy_ball() -> None:
    prob = lsq(["a"])
    algo = DmsgdAsync(DmsgdAsyncParams(beta=0.9), "a")
    view = NeighbourView("a", {})
    x = torch.zeros(4, dtype=F64)
    algo.start(x, 0.0, view)
    oracle = FunctionOracle(lambda x: (0.0, grad(prob, "a", x)), lr_fn=lambda k: 0.01)
    for _ in range(30):
        x = algo.advance(x, oracle, 0.0, view)
    ref = heavy_ball(lambda x: grad(prob, "a", x), torch.zeros(4, dtype=F64), 0.9, 0.01, 30)
    assert max_err(x, ref[-1]) < 1e-12 and algo.sends(0.0) == []


def test_async_converges_under_30_percent_drop() -> None:
    """Different speeds, 30% of the messages lost, decaying α: the nodes agree and approach x*."""
    adj = ring(6)
    prob = lsq(sorted(adj))
    speeds = {f"n{i}": 0.01 * (1 + 0.1 * i) for i in range(6)}
    sim, rec = simulate(
        lambda i: DmsgdAsync(DmsgdAsyncParams(beta=0.9, omega=0.5), i),
        adj,
        prob,
        0,
        lr=Schedule(0.01),
        links=Links(drop=0.3),
        speeds=speeds,
        time_s=4.0,
    )
    start = max(float(torch.linalg.vector_norm(rec.x[j][0] - rec.mean("x", 0))) for j in adj)
    rel = float((sim.mean() - prob[2]).norm() / prob[2].norm())
    assert start > 1.0 and sim.disagreement() < 0.03 and rel < 0.03, (sim.disagreement(), rel)  # 0.016, 0.016
    assert min(a.iteration for a in sim.algorithms.values()) > 250
    assert sum(s.dropped for s in sim.stats.values()) > 500
    assert sum(s.retransmissions for s in sim.stats.values()) == 0  # unkeyed: nothing is retransmitted
