"""CDL and mixing: pure tests on small tensors (spec §6(f) 1, 2 and the staleness / sequence rules)."""

from __future__ import annotations

import random

import pytest
import torch

from peer.algorithms import Cdl, CdlParams, InMessage, Isolated, NeighbourView, NoneParams, Payload
from peer.algorithms.mixing import metropolis_hastings, mixing_matrix
from peer.core.topology import topology_neighbours


def _adjacency(topology: str, n: int) -> dict[str, list[str]]:
    ids = [f"n{i}" for i in range(n)]
    return {i: topology_neighbours(topology, i, ids) for i in ids}


def _msg(sender: str, x: torch.Tensor, seq: int, now: float, incarnation: int = 1, degree: int = 2) -> InMessage:
    return InMessage(sender, incarnation, degree, Payload("state", {"params": x}, seq=seq), now)


@pytest.mark.parametrize("topology,n", [("ring", 3), ("ring", 4), ("ring", 7), ("full", 5)])
def test_metropolis_hastings_is_doubly_stochastic(topology: str, n: int) -> None:
    w = mixing_matrix(_adjacency(topology, n))
    for i, row in w.items():
        assert sum(row.values()) == pytest.approx(1.0)
        assert all(v > 0 for v in row.values())
        for j, v in row.items():
            assert w[j][i] == pytest.approx(v)  # symmetric, hence column sums are 1 too


def test_metropolis_hastings_irregular_graph() -> None:
    # A star plus one leaf edge: degrees differ, MH still doubly stochastic.
    adj = {"c": ["a", "b", "d"], "a": ["c", "b"], "b": ["c", "a"], "d": ["c"]}
    w = mixing_matrix(adj)
    for i in adj:
        assert sum(w[i].values()) == pytest.approx(1.0)
        assert sum(w[j].get(i, 0.0) for j in adj) == pytest.approx(1.0)
    assert metropolis_hastings(2, {"c": 3})["c"] == pytest.approx(1 / 4)


def _network(n: int, topology: str, dim: int = 4, seed: int = 0) -> tuple[dict[str, Cdl], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    ids = [f"n{i}" for i in range(n)]
    algos = {i: Cdl(CdlParams(staleness_s=1e9, staleness_rounds=10**9), i) for i in ids}
    xs = {i: torch.randn(dim, generator=gen, dtype=torch.float64) for i in ids}
    return algos, xs


def _view(i: str, adj: dict[str, list[str]]) -> NeighbourView:
    return NeighbourView(i, {j: len(adj[j]) for j in adj[i]})


def test_synchronous_pure_consensus_reaches_exact_average() -> None:
    """§6(f)1: lr = 0, synchronous symmetric updates → every θ_i → the initial average (1e-8)."""
    adj = _adjacency("ring", 4)
    algos, xs = _network(4, "ring")
    mean0 = torch.stack(list(xs.values())).mean(0)
    for t in range(200):
        outgoing = {i: algos[i].outgoing(xs[i], t) for i in algos}
        for i in algos:
            for j in adj[i]:
                p = outgoing[j]
                assert p is not None
                algos[i].on_message(InMessage(j, 1, len(adj[j]), p, float(t)), float(t))
        xs = {i: algos[i].mix(xs[i], float(t), _view(i, adj)) for i in algos}
        # Mean preservation holds at every synchronous step, not only in the limit.
        assert torch.stack(list(xs.values())).mean(0) == pytest.approx(mean0, abs=1e-12)
    for x in xs.values():
        assert torch.max(torch.abs(x - mean0)).item() < 1e-8


def test_async_lossy_consensus_agrees_within_convex_hull() -> None:
    """§6(f)2: random activation, 30% drops, staleness ≤ 3 → a common value inside the initial hull.

    The value need not be the exact average: a row-stochastic P2 step does not preserve the mean.
    """
    rng = random.Random(7)
    ids = [f"n{i}" for i in range(5)]
    adj = {i: topology_neighbours("ring", i, ids) for i in ids}
    gen = torch.Generator().manual_seed(3)
    xs = {i: torch.randn(4, generator=gen, dtype=torch.float64) for i in ids}
    lo = torch.stack(list(xs.values())).min(0).values
    hi = torch.stack(list(xs.values())).max(0).values
    algos = {i: Cdl(CdlParams(staleness_s=1e9, staleness_rounds=3, reuse=True), i) for i in ids}
    in_flight: list[tuple[int, str, str, Payload]] = []
    for t in range(3000):
        i = rng.choice(ids)  # random activation: one node wakes up
        deliver_now = [m for m in in_flight if m[0] <= t]
        in_flight = [m for m in in_flight if m[0] > t]
        rng.shuffle(deliver_now)  # reordering
        for _, src, dst, p in deliver_now:
            algos[dst].on_message(InMessage(src, 1, len(adj[src]), p, float(t)), float(t))
        xs[i] = algos[i].mix(xs[i], float(t), _view(i, adj))
        p = algos[i].outgoing(xs[i], t)
        assert p is not None
        for j in adj[i]:
            if rng.random() >= 0.3:  # 30% of messages are lost
                in_flight.append((t + rng.randint(0, 3), i, j, p))
    stacked = torch.stack(list(xs.values()))
    assert (stacked.max(0).values - stacked.min(0).values).max().item() < 1e-6
    common = stacked.mean(0)
    assert bool(((common >= lo - 1e-9) & (common <= hi + 1e-9)).all())


def test_out_of_order_and_duplicate_states_are_dropped() -> None:
    algo = Cdl(CdlParams(), "me")
    assert algo.on_message(_msg("a", torch.ones(2), seq=5, now=0.0), 0.0)
    assert not algo.on_message(_msg("a", torch.zeros(2), seq=4, now=0.1), 0.1)  # older: dropped
    assert not algo.on_message(_msg("a", torch.zeros(2), seq=5, now=0.2), 0.2)  # duplicate: dropped
    assert torch.equal(algo.cache["a"].params, torch.ones(2))
    assert algo.dropped_out_of_order == 2
    # A restarted sender (new incarnation) starts its sequence again and still supersedes.
    assert algo.on_message(_msg("a", torch.full((2,), 3.0), seq=1, now=0.3, incarnation=2), 0.3)
    assert torch.equal(algo.cache["a"].params, torch.full((2,), 3.0))
    # ...but its previous life's late messages are dropped.
    assert not algo.on_message(_msg("a", torch.zeros(2), seq=99, now=0.4, incarnation=1), 0.4)


def test_stale_copies_are_not_mixed() -> None:
    algo = Cdl(CdlParams(staleness_s=5.0, staleness_rounds=100), "me")
    view = NeighbourView("me", {"a": 1})
    algo.on_message(_msg("a", torch.ones(3), seq=1, now=0.0, degree=1), 0.0)
    x = torch.zeros(3)
    out = algo.mix(x, now=6.0, view=view)  # 6 s old > 5 s bound
    assert out is x and algo.last_report.skipped_stale == ("a",)
    algo.on_message(_msg("a", torch.ones(3), seq=2, now=6.0, degree=1), 6.0)
    out = algo.mix(x, now=6.5, view=view)
    assert torch.allclose(out, torch.full((3,), 0.5))  # MH weight 1/(1+1)
    assert algo.last_report.used == ("a",)


def test_staleness_in_rounds_and_use_once() -> None:
    algo = Cdl(CdlParams(staleness_s=1e9, staleness_rounds=2, reuse=True), "me")
    view = NeighbourView("me", {"a": 1})
    algo.on_message(_msg("a", torch.ones(1), seq=1, now=0.0, degree=1), 0.0)
    x = torch.zeros(1)
    assert algo.mix(x, 0.0, view) is not x  # round 1
    assert algo.mix(x, 0.0, view) is not x  # round 2: reused while fresh
    assert algo.mix(x, 0.0, view) is x  # round 3: more than 2 rounds old
    once = Cdl(CdlParams(), "me")
    once.on_message(_msg("a", torch.ones(1), seq=1, now=0.0, degree=1), 0.0)
    assert once.mix(x, 0.0, view) is not x
    assert once.mix(x, 0.0, view) is x  # default: each received copy is mixed once


def test_only_current_neighbours_are_mixed() -> None:
    algo = Cdl(CdlParams(), "me")
    algo.on_message(_msg("stranger", torch.ones(2), seq=1, now=0.0), 0.0)
    x = torch.zeros(2)
    assert algo.mix(x, 0.0, NeighbourView("me", {"a": 2})) is x


def test_epsilon_scales_the_step() -> None:
    algo = Cdl(CdlParams(epsilon=0.5), "me")
    algo.on_message(_msg("a", torch.ones(1), seq=1, now=0.0, degree=1), 0.0)
    out = algo.mix(torch.zeros(1), 0.0, NeighbourView("me", {"a": 1}))
    assert out.item() == pytest.approx(0.25)


def test_cdl_sends_one_model_sized_message_and_round_trips_state() -> None:
    algo = Cdl(CdlParams(), "me")
    x = torch.arange(10, dtype=torch.float32)
    p = algo.outgoing(x, step=3)
    assert p is not None and p.kind == "state" and p.step == 3 and p.seq == 1
    assert set(p.tensors) == {"params"} and p.tensors["params"].numel() == 10  # spec §8: CDL sends P floats
    restored = Cdl(CdlParams(), "me")
    restored.load_state_dict(algo.state_dict())
    assert restored.outgoing(x, 4).seq == 2  # type: ignore[union-attr]


def test_isolated_sends_nothing_and_ignores_everything() -> None:
    algo = Isolated(NoneParams(), "me")
    x = torch.ones(2)
    assert algo.outgoing(x, 0) is None
    assert not algo.on_message(_msg("a", torch.zeros(2), seq=1, now=0.0), 0.0)
    assert algo.mix(x, 0.0, NeighbourView("me", {"a": 1})) is x
