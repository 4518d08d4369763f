"""`peer simulate`: many peers running the real algorithm, oracle, encoder and assembler, locally or on Ray."""

from __future__ import annotations

import importlib.util
import math
import sys
from typing import Any

import pytest

from peer.algorithms.mixing import mixing_matrix, second_largest_eigenvalue_modulus
from peer.cli import build_parser, main
from peer.core.topology import graph, parse_topology
from peer.errors import ConfigError
from peer.tools.sim_faults import plan_faults
from peer.tools.simulate import simulate_one

FAST = ["--set", "train.epochs=2", "--actors", "3", "--tol", "1e-3"]


def _run(*argv: str, topology: str = "exponential") -> dict[str, Any]:
    args = build_parser().parse_args(["simulate", "--peers", "16", *FAST, *argv])
    return simulate_one(args, topology)


def _slem(topology: str, n: int) -> float:
    ids = [f"p{i}" for i in range(n)]
    adj = graph(parse_topology(topology), ids)
    return second_largest_eigenvalue_modulus(mixing_matrix({i: sorted(adj[i]) for i in ids}))


@pytest.mark.parametrize("n", [5, 16, 64])
def test_slem_of_a_ring_is_the_circulant_formula(n: int) -> None:
    # Metropolis–Hastings on a ring: w = 1/3 to each side, so the eigenvalues are 1/3 + 2/3 cos(2πk/n).
    expected = max(abs(1 / 3 + 2 / 3 * math.cos(2 * math.pi * k / n)) for k in range(1, n))
    assert _slem("ring", n) == pytest.approx(expected, abs=1e-12)
    assert _slem("full", n) == pytest.approx(0.0, abs=1e-12)


def test_local_simulation_reaches_consensus_at_the_spectral_gap_rate() -> None:
    ring = _run(topology="ring")
    expo = _run(topology="exponential")
    for r in (ring, expo):
        assert r["reached"] and r["disagreement_final"] <= r["tol"]
        # Lossless D-PSGD mixes exactly with W: the measured rate is λ, the rounds what λ predicts.
        assert r["rate_measured"] == pytest.approx(r["slem_predicted"], abs=0.02)
        assert abs(r["rounds_to_consensus"] - r["predicted_rounds"]) <= 0.1 * r["predicted_rounds"] + 2
        assert r["bytes_sent"] > 0 and r["counters"]["rejected"] == 0
        assert r["accuracy_of_average"] > 0.2  # ten classes: twice chance after six rounds of training
    # The ordering the spectral gap predicts: the ring mixes more slowly than the exponential graph.
    assert ring["slem_predicted"] > expo["slem_predicted"]
    assert ring["rate_measured"] > expo["rate_measured"]
    assert ring["rounds_to_consensus"] > expo["rounds_to_consensus"]


def test_drops_and_stragglers_cost_ticks_not_rounds_and_churn_is_survived() -> None:
    clean = _run()
    lossy = _run("--faults", "drop=0.2,stragglers=0.25:3")
    # P1 retransmits until acknowledged: the same synchronous iteration, hence the same rounds and models.
    assert lossy["counters"]["dropped"] > 0 and lossy["counters"]["retransmissions"] > 0
    assert lossy["rounds_to_consensus"] == clean["rounds_to_consensus"]
    assert lossy["disagreement_final"] == pytest.approx(clean["disagreement_final"], rel=1e-6)
    assert lossy["ticks"] > clean["ticks"]
    churned = _run("--faults", "churn=0.25:0.05", "--set", "algorithm.give_up_s=0.02")
    assert churned["counters"]["lost_away"] > 0 and churned["counters"]["gave_up"] > 0
    assert churned["reached"]


def test_fault_spec_errors_name_the_item() -> None:
    ids = [f"peer-{i}" for i in range(4)]
    with pytest.raises(ConfigError, match="churn=2:1"):
        plan_faults("churn=2:1", ids, seed=0, tick_s=0.005, training_ticks=10)
    with pytest.raises(ConfigError, match="bogus"):
        plan_faults("bogus=1", ids, seed=0, tick_s=0.005, training_ticks=10)
    plan = plan_faults("stragglers=0.5:4,churn=0.25:0.1,drop=0.1", ids, seed=0, tick_s=0.005, training_ticks=10)
    assert sum(f.get("slowdown", 1.0) == 4.0 for f in plan.faults.values()) == 2
    assert len(plan.away) == 1 and all(f["drop_probability"] == 0.1 for f in plan.faults.values())


def test_backend_ray_without_ray_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main(["simulate", "--backend", "ray", "--peers", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'peer[ray]'" in err


def test_mix_mode_algorithms_are_refused_with_the_field() -> None:
    with pytest.raises(ConfigError, match=r"algorithm\.name"):
        _run("--set", "algorithm.name=cdl")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'peer[ray]')")
def test_ray_backend_gives_what_the_local_backend_gives() -> None:
    local = _run("--actors", "2")
    ray = _run("--backend", "ray", "--actors", "2", "--num-cpus", "2", "--object-store-mb", "128")
    assert ray["reached"]
    for key in ("rounds_training", "rounds_to_consensus", "bytes_sent", "accuracy_of_average"):
        assert ray[key] == local[key], key
    assert ray["disagreement_final"] == pytest.approx(local["disagreement_final"], rel=1e-9)


def test_round_tracker_waits_for_every_peer_and_skips_jumped_rounds() -> None:
    import torch

    from peer.tools.sim_measure import RoundTracker

    tracker = RoundTracker()
    a, b = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([3.0, 0.0], dtype=torch.float64)
    tracker.add({0: (a.clone(), float(a @ a), 1, 0)})
    assert tracker.final(min_iteration=-1) == []  # the other group has not reported round 0 yet
    tracker.add({0: (b.clone(), float(b @ b), 1, 0), 2: (a + b, float(a @ a + b @ b), 2, 2)})
    rounds = tracker.final(min_iteration=2)  # round 1: both peers jumped over it
    assert [r.k for r in rounds] == [0, 2]
    # mean (2, 0), each peer 1 away: relative RMS disagreement 1/2; round 2 is a mixing-only round.
    assert rounds[0].disagreement == pytest.approx(0.5) and not rounds[0].trained and rounds[1].trained
