"""Step-mode algorithms in real daemons: P1 rounds over real gRPC, with and without injected message loss.

The P1 synchronizer makes a synchronous algorithm exact on a lossy network, so three D-PSGD daemons that lose
30% of their messages (and retransmit them) must end training with bit-identical models to a lossless run.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest
import torch

from peer.daemon.node import Node
from tests.helpers import consensus_distance, fast_config, start_nodes, stop_nodes, unique, until


async def _run_cluster(tmp_path: Path, algorithm: dict[str, Any], faults: dict[str, Any] | None) -> list[Node]:
    cluster = unique("p1")
    n = 3

    def make(i: int) -> Node:
        sections: dict[str, Any] = {
            "data": {"partition": "shards:2", "num_partitions": n, "partition_index": i},
            "algorithm": algorithm,
            "train": {"epochs": 2, "wait_for_neighbors_s": 20, "round_interval_s": 0.0, "lr": 0.1},
            "discovery": {"mdns": True, "cluster": cluster},
        }
        if faults:
            sections["faults"] = faults
        return Node(fast_config(tmp_path, f"{cluster}-{i}", **sections), stdout=io.StringIO())

    nodes = [make(i) for i in range(n)]
    tasks = await start_nodes(nodes)
    try:
        await until(nodes, lambda: all(len(x.core.neighbours()) == n - 1 for x in nodes), 20, "membership")
        await asyncio.wait_for(asyncio.gather(*(x.trained.wait() for x in nodes)), timeout=90)
        await until(
            nodes,
            lambda: consensus_distance([x.trainer.get_flat() for x in nodes]) < 1e-4,
            30,
            "consensus after training",
        )
    finally:
        await stop_nodes(nodes, tasks)
    return nodes


@pytest.mark.timeout(240)
async def test_dpsgd_daemons_are_exact_under_message_loss(tmp_path: Path) -> None:
    algorithm = {"name": "dpsgd", "retransmit_s": 0.05}
    clean = await _run_cluster(tmp_path, algorithm, None)
    lossy = await _run_cluster(tmp_path, algorithm, {"drop_probability": 0.3, "seed": 3})
    for a, b in zip(clean, lossy, strict=True):
        assert a.worker.params_at_done is not None and b.worker.params_at_done is not None
        assert a.algorithm.iteration > 0
        # Bit for bit: the same rounds, the same messages, whatever was lost on the way.
        assert torch.equal(a.worker.params_at_done, b.worker.params_at_done)
        assert a.counters.snapshot()["rejected_messages"] == 0
    lost = sum(x.faults.counters.get("dropped", 0) for x in lossy)
    assert lost > 0, "the lossy run lost no message; the test proves nothing"


@pytest.mark.timeout(120)
async def test_p1_round_survives_a_neighbour_that_leaves(tmp_path: Path) -> None:
    """A P1 neighbour that stops mid-training is dropped from the next rounds; the others finish training."""
    cluster = unique("p1x")
    n = 3
    nodes = [
        Node(
            fast_config(
                tmp_path,
                f"{cluster}-{i}",
                data={"partition": "iid", "num_partitions": n, "partition_index": i},
                algorithm={"name": "dpsgd", "retransmit_s": 0.05, "give_up_s": 2.0},
                # Enough iterations that the leaver is gone long before the others finish.
                train={"epochs": 30, "wait_for_neighbors_s": 20, "round_interval_s": 0.01},
                discovery={"mdns": True, "cluster": cluster},
            ),
            stdout=io.StringIO(),
        )
        for i in range(n)
    ]
    tasks = await start_nodes(nodes)
    try:
        await until(nodes, lambda: all(x.algorithm.iteration >= 20 for x in nodes), 40, "20 P1 rounds")
        leaver = nodes[2]
        leaver.request_stop()
        await asyncio.wait_for(tasks[2], timeout=30)
        stayed = nodes[:2]
        at_leave = [x.algorithm.iteration for x in stayed]
        await asyncio.wait_for(asyncio.gather(*(x.trained.wait() for x in stayed)), timeout=60)
        for x, before in zip(stayed, at_leave, strict=True):
            assert x.algorithm.iteration > before + 50
            assert leaver.cfg.node_id not in x.core.neighbours()
    finally:
        await stop_nodes(nodes, tasks, return_exceptions=True)
