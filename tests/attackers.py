"""Test-only attackers: an authenticated member that runs the real algorithm and the real client but sends crafted
models. Not a product feature: no config key reaches it; a test builds a `HostileNode` (or wraps an algorithm with
`hostile`) itself.

The attacker keeps its own honest iterate x (it trains and mixes like everyone else, so it stays a plausible
member: it answers the synchronizer, acknowledges, serves health) and replaces every floating-point tensor of every
message it sends by `ATTACKS[name](t)`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from peer.algorithms.base import Algorithm, Payload, Send
from peer.daemon.builder import Built
from peer.daemon.node import Node

Attack = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
ATTACKS: dict[str, Attack] = {
    # −10·x: a sign flip strong enough to outweigh the honest neighbours' pull in a plain mean.
    "sign_flip": lambda t, g: t * -10.0,
    # Every value 1e4 times the honest one (the reproduction pushed a constant 1e4).
    "scaled_1e4": lambda t, g: t * 1e4,
    # Noise of standard deviation 10 around nothing: the honest model is gone.
    "random": lambda t, g: 10.0 * torch.randn(t.shape, generator=g, dtype=t.dtype),
}


def craft(payload: Payload, attack: str, gen: torch.Generator) -> Payload:
    """`payload` with every floating-point tensor attacked (indices of sparse encodings stay valid)."""
    fn = ATTACKS[attack]
    tensors = {k: fn(t, gen) if t.dtype.is_floating_point else t for k, t in payload.tensors.items()}
    return dataclasses.replace(payload, tensors=tensors)


def hostile(algorithm: Algorithm, attack: str, seed: int = 0) -> Algorithm:
    """An attacker with `algorithm`'s class and current state: every message it sends is `craft`ed. The
    algorithm's own state (its x, momentum, replicas, rounds) is left honest."""
    base = type(algorithm)
    gen = torch.Generator().manual_seed(seed)
    # One crafted copy per original payload object, so that retransmissions repeat the same message.
    crafted: dict[int, tuple[Payload, Payload]] = {}

    def evil(p: Payload) -> Payload:
        hit = crafted.get(id(p))
        if hit is None or hit[0] is not p:
            hit = (p, craft(p, attack, gen))
            crafted[id(p)] = hit
            if len(crafted) > 256:
                crafted.pop(next(iter(crafted)))
        return hit[1]

    def outgoing(self: Algorithm, x: torch.Tensor, step: int) -> Payload | None:
        p = base.outgoing(self, x, step)
        return None if p is None else evil(p)

    def sends(self: Algorithm, now: float) -> list[Send]:
        return [dataclasses.replace(s, payload=evil(s.payload)) for s in base.sends(self, now)]

    cls: type[Any] = type(f"Hostile{base.__name__}", (base,), {"outgoing": outgoing, "sends": sends})
    evil_algorithm: Algorithm = object.__new__(cls)
    evil_algorithm.__dict__.update(algorithm.__dict__)
    return evil_algorithm


class HostileNode(Node):
    """A real daemon (certificate, server, client, synchronizer) whose algorithm sends `attack`ed models.
    `attack=None` is an honest node of the same kind (the attacker-free reference run)."""

    def __init__(self, *args: Any, attack: str | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.attack = attack

    def _assemble(self, built: Built) -> None:
        if self.attack is not None:
            built = dataclasses.replace(built, algorithm=hostile(built.algorithm, self.attack))
        super()._assemble(built)


# ------------------------------------------------------------------------------------- a cluster with an attacker
# D-PSGD with the local heavy ball (91% on digits in 4 epochs). The daemons start one after another, so the first
# rounds run before every member is known; a short give-up lets the late members in within a second instead of 10.
DPSGD: dict[str, Any] = {"name": "dpsgd", "momentum": 0.9, "give_up_s": 1.0}


async def attacked_cluster(
    work: Path,
    *,
    attack: str | None,
    algorithm: dict[str, Any],
    num_peers: int = 5,
    train: dict[str, Any] | None = None,
    timeout_s: float = 120,
) -> list[float]:
    """`num_peers` real daemons on loopback with mutual TLS (a throwaway CA in `work`), a full graph, digits split
    iid; the last one runs `attack` (None: it is honest). Trains to the end and returns the test accuracy of each
    honest peer."""
    from peer.learn.training import evaluate
    from peer.tools import certs
    from tests.helpers import fast_config, start_nodes, stop_nodes, unique

    cluster = unique("atk")
    ids = [f"{cluster}-{i}" for i in range(num_peers)]
    pki = work / "pki"
    certs.make_cluster(pki, ids)
    nodes: list[Node] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for i, node_id in enumerate(ids):
            cfg = fast_config(
                work,
                node_id,
                topology="full",
                algorithm=algorithm,
                security={
                    "ca_file": str(pki / "ca.pem"),
                    "cert_file": str(pki / f"{node_id}.pem"),
                    "key_file": str(pki / f"{node_id}.key"),
                },
                data={"partition": "iid", "num_partitions": num_peers, "partition_index": i},
                train={"epochs": 4, "wait_for_neighbors_s": 30, "steps_per_round": 1, **(train or {})},
                discovery={"static_peers": [n.address for n in nodes]},
            )
            evil = attack if i == num_peers - 1 else None
            node = HostileNode(cfg, stdout=io.StringIO(), attack=evil)
            tasks += await start_nodes([node])
            nodes.append(node)
        honest = nodes[:-1]
        await asyncio.wait_for(asyncio.gather(*(n.trained.wait() for n in honest)), timeout=timeout_s)
    finally:
        await stop_nodes(nodes, tasks)
    ds = honest[0].dataset
    return [evaluate(n.trainer.model, ds.x_test, ds.y_test)[0] for n in honest]
