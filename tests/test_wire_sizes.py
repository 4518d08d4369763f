"""Wire sizes per algorithm (spec §8): what every message carries, checked on the real codec.

Each step-mode algorithm runs a few iterations on a 4-node ring in the in-memory network, with float32 model
tensors as in the daemon. Every message it sends must carry exactly the number of values the spec gives
(P = number of model parameters), and must pass the receiver's real schema check (`peer.net.assembler`) with the
algorithm's own `expected_by_kind`, so the daemon can never reject a well-formed message of its own kind.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from peer.algorithms import REGISTRY, Algorithm, Send, create
from peer.algorithms.base import payload_floats
from peer.algorithms.sim import FunctionOracle, Simulation, ring
from peer.net.assembler import Assembler, ReceiveLimits
from peer.net.encoder import encode, iter_requests
from peer.net.wire import Envelope

P = 40
Q = 3  # dssfn: classes
N_DATA = 30
SPEC: dict[str, tuple[dict[str, object], Callable[[int], int]]] = {
    # name: (params, values per message as a function of P); per neighbour per round unless noted
    "dpsgd": ({}, lambda p: p),
    "local_sgd": ({}, lambda p: p),
    "dmsgd": ({}, lambda p: 2 * p),
    "dmsgd_async": ({}, lambda p: 2 * p),
    "next": ({}, lambda p: 2 * p),
    "next_pushsum": ({}, lambda p: 2 * p + 1),  # z and y plus one shared push-sum weight
    "sgp": ({}, lambda p: p + 1),
    "digest": ({}, lambda p: p),  # per token hop
    "choco": ({"compressor": "topk:0.1"}, lambda p: 2 * math.ceil(0.1 * p)),  # k values + k indices
    "dssfn": ({"num_classes": Q, "num_layers": 1, "nodes": 8, "admm_iters": 2, "gossip_rounds": 2}, lambda p: 0),
}


def test_every_step_mode_algorithm_has_a_wire_size_row() -> None:
    step_mode = {n for n, cls in REGISTRY.items() if cls.owns_local_update}
    assert step_mode == set(SPEC)


def _oracle(i: int) -> FunctionOracle:
    gen = torch.Generator().manual_seed(i)
    target = torch.randn(P, generator=gen)
    x_data = torch.rand(N_DATA, P // 4, generator=gen)
    labels = torch.arange(N_DATA) % Q
    return FunctionOracle(lambda x: (0.0, x - target), lr_fn=lambda k: 0.05, data=(x_data, labels))


@pytest.mark.parametrize("name", sorted(SPEC))
def test_messages_carry_the_specified_number_of_values_and_pass_the_codec(name: str) -> None:
    params, size = SPEC[name]
    adj = ring(4)
    algos: dict[str, Algorithm] = {i: create(REGISTRY[name].params_type(name=name, **params), i) for i in adj}
    sent: list[Send] = []
    for algo in algos.values():
        original = algo.sends

        def recording(now: float, original: Callable[[float], list[Send]] = original) -> list[Send]:
            out = original(now)
            sent.extend(out)
            return out

        algo.sends = recording  # type: ignore[method-assign]
    sim = Simulation(algos, {i: torch.zeros(P) for i in adj}, {i: _oracle(k) for k, i in enumerate(adj)}, adj)
    sim.run(iterations=6, max_time_s=60)
    assert sent, "nothing was sent"
    for send in sent:
        values = payload_floats(send.payload)
        if name == "dssfn":
            shape = send.payload.tensors["s"].shape
            assert values == Q * shape[1] and shape[1] in (P // 4, 8)  # Q·n_l: layer 0 has n_0 = input dim
        else:
            assert values == size(P), (send.payload.kind, {k: tuple(t.shape) for k, t in send.payload.tensors.items()})
        receiver = algos[send.to]
        receiver.bind_data(P // 4, Q)
        limits = ReceiveLimits(
            max_payload_bytes=1 << 24,
            expected_fingerprint="f",
            expected_algorithm=name,
            expected_tensors=receiver.expected_tensors(P),
            expected_by_kind=receiver.expected_by_kind(P),
        )
        env = Envelope("sender", "f", name, 1, 2, "127.0.0.1:1", 0)
        header, chunks = encode(env, send.payload)
        asm = Assembler(limits)
        for request in iter_requests(header, chunks):
            asm.feed(request)
        got = asm.finish()
        assert got.nbytes == sum(t.numel() * t.element_size() for t in send.payload.tensors.values())
        assert set(got.payload.tensors) == set(send.payload.tensors)


def test_cdl_broadcasts_the_model_once_per_round() -> None:
    """CDL (mix mode): one latest-wins full model, P values, per broadcast."""
    algo = create(REGISTRY["cdl"].params_type(name="cdl"), "a")
    payload = algo.outgoing(torch.zeros(P), step=1)
    assert payload is not None and payload_floats(payload) == P and payload.kind == "state"
