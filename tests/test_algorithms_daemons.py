"""Every registered algorithm runs in real daemons: two `Node`s over real gRPC on loopback train, gossip and
agree. The algorithms' maths is tested on the in-memory network; this checks their wiring into the daemon
(step mode or mix mode, per-destination sends, acknowledgements, the receiver's schema check of every
message kind, checkpoints)."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest

from peer.algorithms import REGISTRY
from peer.daemon import checkpoint
from peer.daemon.builder import build
from peer.daemon.metrics import Counters
from peer.daemon.node import Node
from peer.logs import node_logger
from tests.helpers import consensus_distance, fast_config, start_nodes, stop_nodes, unique, until

# Small settings where an algorithm's defaults would make this test slow.
FAST: dict[str, dict[str, Any]] = {
    "dssfn": {"num_layers": 1, "nodes": 40, "admm_iters": 20, "gossip_rounds": 2},
    "local_sgd": {"local_steps": 2},
}
# Non-default variants that change the messages or the synchronization: case id -> (algorithm, settings).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dssfn-pushsum": ("dssfn", {**FAST["dssfn"], "averaging": "pushsum", "gossip_rounds": 3}),
}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", sorted(n for n in REGISTRY if n != "none") + sorted(VARIANTS))
async def test_two_daemons_run_the_algorithm(tmp_path: Path, case: str) -> None:
    name, settings = VARIANTS.get(case, (case, FAST.get(case, {})))
    cluster = unique(case.replace("_", "-"))

    def node(i: int, static: list[str]) -> Node:
        cfg = fast_config(
            tmp_path,
            f"{cluster}-{i}",
            algorithm={"name": name, **settings},
            data={"partition": "shards:2", "num_partitions": 2, "partition_index": i},
            train={"epochs": 2, "wait_for_neighbors_s": 20, "steps_per_round": 1, "round_interval_s": 0.005},
            discovery={"static_peers": static},
        )
        return Node(cfg, stdout=io.StringIO())

    a = node(0, [])
    tasks = await start_nodes([a])
    b = node(1, [a.address])
    tasks += await start_nodes([b])
    nodes = [a, b]
    try:
        await asyncio.wait_for(asyncio.gather(*(x.trained.wait() for x in nodes)), timeout=60)
        if not REGISTRY[name].trains_own_model:
            await until(
                nodes, lambda: consensus_distance([x.trainer.get_flat() for x in nodes]) < 1e-2, 30, "consensus"
            )
    finally:
        await stop_nodes(nodes, tasks)
    for x in nodes:
        c = x.counters.snapshot()
        assert c["messages_received"] > 0 and c["bytes_sent"] > 0, c
        assert c["rejected_messages"] == 0, "a message kind failed the receiver's schema check"
        state = checkpoint.load(x.state_dir)
        assert state is not None and state["algorithm_name"] == name
        if REGISTRY[name].trains_own_model:
            assert state["result"], "the trained model is missing from the checkpoint"


@pytest.mark.parametrize("name", ["next", "next_pushsum"])
def test_the_daemon_refuses_the_gauss_newton_surrogate_naming_the_field(tmp_path: Path, name: str) -> None:
    from peer.errors import ConfigError

    cfg = fast_config(tmp_path, unique("gn"), algorithm={"name": name, "surrogate": "gauss_newton"})
    with pytest.raises(ConfigError) as err:
        build(cfg, reset=False, counters=Counters(), log=node_logger("test", cfg.node_id))
    assert err.value.field == "algorithm.surrogate"
