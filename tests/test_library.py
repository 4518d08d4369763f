"""The library API (peer.Gossip in a plain PyTorch loop, `async with peer.Node`) and the examples, on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import peer
from examples.custom_model import bn_cnn
from peer.algorithms import REGISTRY
from peer.errors import ConfigError


@pytest.mark.timeout(120)
@pytest.mark.parametrize("algorithm", ["cdl", "dpsgd"])
def test_gossip_in_a_plain_pytorch_loop_merges_and_learns(algorithm: str) -> None:
    """Mix mode (cdl) and a round-synchronous algorithm that follows the caller's step (dpsgd)."""
    from examples.own_loop import main

    results = main(epochs=3, algorithm=algorithm)
    for acc, merges in results.values():
        assert merges > 0 and acc > 0.6, results


def test_dpsgd_round_applies_exactly_the_callers_step() -> None:
    """One D-PSGD round driven by the caller's step: x_{k+1} = Σ_j w_ij x_j^k − (x_k − x_k stepped), so a peer
    alone ends exactly where its optimizer put it, and the round's gradient is the caller's step."""
    from peer.algorithms.dpsgd import Dpsgd, DpsgdParams
    from peer.core.view import NeighbourView
    from peer.learn.oracle import CallerStepOracle

    algo = Dpsgd(DpsgdParams(momentum=0.0), "a")
    x0 = torch.tensor([1.0, 2.0])
    view = NeighbourView("a", {})
    algo.start(x0, 0.0, view)
    stepped = torch.tensor([0.5, 2.5])
    assert algo.ready(0.0, view)
    x1 = algo.advance(x0, CallerStepOracle(x0, stepped), 0.0, view)
    assert torch.allclose(x1, stepped)
    assert Dpsgd.follows_caller_step and not REGISTRY["local_sgd"].follows_caller_step


@pytest.mark.parametrize("name", ["dmsgd", "choco", "sgp"])
def test_gossip_refuses_step_mode_algorithms_naming_the_field(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match=r"algorithm\.name: .*owns the local update.*supports cdl, dpsgd, none"):
        peer.Gossip(bn_cnn((1, 8, 8), 10), {"node_id": "a", "state_dir": str(tmp_path), "algorithm": {"name": name}})


def test_gossip_step_outside_the_context_is_an_error(tmp_path: Path) -> None:
    gossip = peer.Gossip(torch.nn.Linear(2, 2), {"node_id": "a", "state_dir": str(tmp_path)})
    with pytest.raises(RuntimeError, match=r"with peer\.Gossip"):
        gossip.step()


def test_gossip_alone_steps_and_checkpoints(tmp_path: Path) -> None:
    model = bn_cnn((1, 8, 8), 10, width=4)
    cfg = {"node_id": "solo", "state_dir": str(tmp_path / "solo"), "discovery": {"mdns": False}}
    with peer.Gossip(model, cfg) as gossip:
        for _ in range(3):
            assert gossip.step() is False  # nobody to merge with
        assert gossip.steps == 3 and gossip.neighbours == []
        assert gossip.wait_for_neighbours(1, timeout_s=0.1) is False  # bounded: nobody else is coming
        assert gossip.node.worker.pacer.s.budget is None  # finish_together never holds the caller's loop
    assert (tmp_path / "solo" / "checkpoint.pt").exists()


@pytest.mark.slow  # 25 s; the plain-loop examples stay in CI
@pytest.mark.timeout(120)
async def test_image_folder_example_three_peers(tmp_path: Path) -> None:
    from examples.image_folder import run

    accs = await run(tmp_path)
    assert min(accs) > 0.7, accs


@pytest.mark.timeout(60)
async def test_growing_shards_example(tmp_path: Path) -> None:
    from examples.growing_shards import run

    trained, samples = await run(tmp_path)
    assert trained == 4 and samples > 1400
