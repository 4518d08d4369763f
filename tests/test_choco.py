"""CHOCO-SGD (spec §7, §8) on the simulated lossy network: reductions, replica consistency, convergence, wire size."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from pydantic import ValidationError

from peer.algorithms.base import InMessage, NeighbourView, Payload, payload_floats
from peer.algorithms.choco import Choco, ChocoParams
from peer.algorithms.mixing import mixing_matrix
from peer.algorithms.sim import FunctionOracle, Links, Simulation, random_graph, ring

D = 20


def _problem(adj: dict[str, list[str]], *, interpolating: bool, seed: int = 0) -> tuple[dict, dict, torch.Tensor]:
    """Per-node least squares f_i(x) = ‖A_i x − b_i‖²/(2m). Interpolating: every f_i is minimised at x_true."""
    gen = torch.Generator().manual_seed(seed)
    x_true = torch.randn(D, generator=gen, dtype=torch.float64)
    a = {i: torch.randn(10, D, generator=gen, dtype=torch.float64) for i in adj}
    b = {i: a[i] @ x_true if interpolating else torch.randn(10, generator=gen, dtype=torch.float64) for i in adj}
    return a, b, x_true


def _oracle(a: torch.Tensor, b: torch.Tensor, lr: Callable[[int], float]) -> FunctionOracle:
    return FunctionOracle(lambda x: (0.0, a.T @ (a @ x - b) / a.shape[0]), lr_fn=lr)


def _sim(
    adj: dict[str, list[str]],
    params: dict[str, ChocoParams] | ChocoParams,
    *,
    interpolating: bool = True,
    lr: Callable[[int], float] = lambda k: 0.1,
    links: Links | None = None,
    hook: Callable[[Simulation, str], None] | None = None,
    adjacency: object = None,
    speeds: dict[str, float] | None = None,
) -> Simulation:
    a, b, _ = _problem(adj, interpolating=interpolating)
    per_node = params if isinstance(params, dict) else {i: params for i in adj}
    return Simulation(
        {i: Choco(per_node[i], i) for i in adj},
        {i: torch.zeros(D, dtype=torch.float64) for i in adj},
        {i: _oracle(a[i], b[i], lr) for i in adj},
        adjacency if adjacency is not None else adj,  # type: ignore[arg-type]
        links=links or Links(),
        seed=1,
        after_advance=hook,
        speeds=speeds or {},
    )


class ReplicaCheck:
    """after_advance hook: records every holder's x̂_j and every owner's x̂_j per iteration, then compares."""

    def __init__(self) -> None:
        self.owner: dict[tuple[str, int], torch.Tensor] = {}
        self.held: dict[tuple[str, int], list[torch.Tensor]] = {}

    def __call__(self, sim: Simulation, i: str) -> None:
        algo = sim.algorithms[i]
        assert isinstance(algo, Choco) and algo.hat_self is not None
        assert (i, algo.iteration) not in self.owner  # one snapshot per completed iteration
        self.owner[(i, algo.iteration)] = algo.hat_self.clone()
        for j, h in algo.hat.items():
            self.held.setdefault((j, algo.iteration), []).append(h.clone())

    def verify(self) -> int:
        """Number of replica snapshots checked; asserts they are bitwise equal to the owner's copy."""
        checked = 0
        for key, copies in self.held.items():
            ref = self.owner.get(key, copies[0])  # an owner that jumped over iteration t has no snapshot there
            for h in copies:
                assert torch.equal(h, ref), f"replica of {key[0]} at iteration {key[1]} diverged"
                checked += 1
        return checked


def test_identity_with_gamma_one_is_dpsgd_of_the_half_steps() -> None:
    """§8 reduction: Q = id, γ = 1 ⇒ x_i^{t+1} = Σ_j w_ij (x_j^t − η_t ∇f_j(x_j^t)), here on a random graph."""
    adj = random_graph(6, 0.4, seed=2)
    lr = lambda k: 0.2 / (1 + k / 50)  # noqa: E731 - the schedule of the reference too
    sim = _sim(
        adj, ChocoParams(compressor="none", gamma=1.0, retransmit_s=0.01, momentum=0.0), interpolating=False, lr=lr
    )
    sim.run(iterations=80)
    a, b, _ = _problem(adj, interpolating=False)
    w = mixing_matrix(adj)
    x = {i: torch.zeros(D, dtype=torch.float64) for i in adj}
    for k in range(80):
        half = {i: x[i] - lr(k + 1) * (a[i].T @ (a[i] @ x[i] - b[i]) / 10) for i in adj}
        x = {i: sum(w[i][j] * half[j] for j in sorted(w[i])) for i in adj}
    # Not bitwise: x̂ + (x^{t+½} − x̂) rounds differently from x^{t+½}.
    assert max(float((sim.x[i] - x[i]).abs().max()) for i in adj) < 1e-12
    assert float(torch.stack(list(x.values())).abs().max()) > 0.1  # the comparison is not vacuous


@pytest.mark.parametrize("compressor", ["topk:0.2", "qsgd:8"])
def test_replicas_stay_identical_and_lossy_equals_lossless(compressor: str) -> None:
    """§8 invariant: every holder's x̂_j equals j's own x̂_j at every iteration, under 20% drop + duplication; and
    the lossy run equals the lossless one bit for bit (P1 applies every q exactly once)."""
    adj = random_graph(6, 0.4, seed=3)
    params = ChocoParams(compressor=compressor, retransmit_s=0.01)
    check = ReplicaCheck()
    lossy = _sim(adj, params, links=Links(drop=0.2, duplicate=0.2), hook=check).run(iterations=120)
    lossless = _sim(adj, params).run(iterations=120)
    assert check.verify() == sum(len(adj[i]) for i in adj) * 121  # every replica, every iteration 0..120
    for i in adj:
        assert torch.equal(lossy.x[i], lossless.x[i])
        algo = lossy.algorithms[i]
        assert isinstance(algo, Choco) and algo.sync.gave_up == 0 and algo.resets_sent == 0
    assert sum(s.retransmissions for s in lossy.stats.values()) > 0  # the loss was real


@pytest.mark.parametrize("compressor", ["topk:0.1", "qsgd:4", "sign", "randk:0.2"])
def test_converges_on_a_convex_problem(compressor: str) -> None:
    """Consistent least squares (one minimiser for every node): every x_i → x_true at a constant step size."""
    adj = ring(6)
    sim = _sim(adj, ChocoParams(compressor=compressor, retransmit_s=0.01))
    _, _, x_true = _problem(adj, interpolating=True)
    errors = []
    for it in (100, 400):
        sim.run(iterations=it)
        errors.append(max(float(torch.linalg.vector_norm(x - x_true)) for x in sim.x.values()))
    assert errors[1] < 0.02 * float(torch.linalg.vector_norm(x_true))
    assert errors[1] < 0.3 * errors[0]


def test_topk_wire_size_is_k_values_plus_k_indices_per_neighbour_per_round() -> None:
    adj = ring(5)
    p = ChocoParams(compressor="topk:0.1", retransmit_s=0.01)
    sim = _sim(adj, p).run(iterations=30)
    k = math.ceil(0.1 * D)
    for i, st in sim.stats.items():
        assert st.floats == st.messages * 2 * k
        assert st.messages == 31 * len(adj[i])  # rounds 0..30 opened, one message per neighbour, no loss
    # The payload of one round, checked against the receiver's schema in the daemon's dtype.
    algo = Choco(p, "n0")
    x = torch.randn(D)
    view = NeighbourView("n0", {"n1": 2, "n4": 2})
    algo.start(x, 0.0, view)
    algo.advance(x, _oracle(torch.eye(D), torch.zeros(D), lambda k: 0.1), 0.0, view)
    sends = algo.sends(0.0)
    assert sorted(s.to for s in sends) == ["n1", "n4"]
    manifest = algo.expected_by_kind(D)["delta"]
    for s in sends:
        assert s.payload.kind == "delta" and s.reliable and payload_floats(s.payload) == 2 * k
        got = {n: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in s.payload.tensors.items()}
        assert got == manifest == {"values": ((k,), "float32"), "indices": ((k,), "int32")}


def test_a_neighbour_left_out_loses_its_replica_until_a_reset() -> None:
    """A link cut longer than give_up_s: the silent neighbour is excluded, its replica dropped (stale), and a reset
    re-establishes it once the link is back. Replicas stay consistent throughout and the network still converges."""
    adj = ring(6)
    check = ReplicaCheck()
    sim = _sim(adj, ChocoParams(compressor="topk:0.2", retransmit_s=0.01, give_up_s=0.05), hook=check)
    sim.cut_until[frozenset(("n0", "n1"))] = 1.0
    sim.run(iterations=300)
    assert check.verify() > 0
    algos = {i: a for i, a in sim.algorithms.items() if isinstance(a, Choco)}
    assert algos["n0"].sync.gave_up > 0 and algos["n1"].sync.gave_up > 0
    assert algos["n0"].resets_sent > 0 and algos["n1"].resets_applied > 0
    assert "n1" in algos["n0"].hat and "n0" in algos["n1"].hat  # re-established after the cut
    _, _, x_true = _problem(adj, interpolating=True)
    assert max(float(torch.linalg.vector_norm(x - x_true)) for x in sim.x.values()) < 0.05 * float(x_true.norm())


def test_a_node_that_fell_behind_jumps_and_resets_its_neighbours() -> None:
    """n0 is cut off and three times slower: the others go on without it, so when the links come back it is many
    rounds behind, jumps, and re-establishes every replica with resets."""
    adj = ring(6)
    check = ReplicaCheck()
    params = ChocoParams(compressor="topk:0.2", retransmit_s=0.01, give_up_s=0.05)
    sim = _sim(adj, params, hook=check, links=Links(drop=0.1), speeds={"n0": 0.03})
    sim.cut_until[frozenset(("n0", "n1"))] = sim.cut_until[frozenset(("n0", "n5"))] = 1.0
    sim.run(iterations=300)
    n0 = sim.algorithms["n0"]
    assert isinstance(n0, Choco) and n0.jumps >= 1 and n0.resets_sent >= 2
    assert check.verify() > 0
    # n0 stays slow, so a round now and then gives up on it and drops the replica until the next reset: at any
    # one moment a replica may be missing, but all four come back together.
    pairs = (("n0", "n1"), ("n0", "n5"), ("n1", "n0"), ("n5", "n0"))
    sim.run(until=lambda s: all(j in s.algorithms[i].hat for i, j in pairs), max_time_s=sim.now + 5.0)  # type: ignore[attr-defined]
    assert all(j in sim.algorithms[i].hat for i, j in pairs)  # type: ignore[attr-defined]
    _, _, x_true = _problem(adj, interpolating=True)
    assert max(float(torch.linalg.vector_norm(x - x_true)) for x in sim.x.values()) < 0.05 * float(x_true.norm())


def test_membership_change_resets_the_new_link() -> None:
    """The edge n0–n1 disappears for iterations 30–59 and comes back: both ends drop the replica, then reset."""
    base = ring(6)

    def adjacency(node: str, k: int) -> list[str]:
        cut = 30 <= k < 60
        return [j for j in base[node] if not (cut and {node, j} == {"n0", "n1"})]

    check = ReplicaCheck()
    sim = _sim(
        base, ChocoParams(compressor="topk:0.2", retransmit_s=0.01, give_up_s=0.05), hook=check, adjacency=adjacency
    )
    sim.run(iterations=150)
    assert check.verify() > 0
    for i, j in (("n0", "n1"), ("n1", "n0")):
        algo = sim.algorithms[i]
        assert isinstance(algo, Choco) and algo.resets_sent >= 1 and j in algo.hat


def test_alone_it_is_plain_gradient_descent() -> None:
    algo = Choco(ChocoParams(momentum=0.0), "solo")
    view = NeighbourView("solo", {})
    oracle = _oracle(torch.eye(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), lambda k: 0.5)
    x = torch.zeros(3, dtype=torch.float64)
    algo.start(x, 0.0, view)
    for _ in range(4):
        assert algo.ready(0.0, view)
        x = algo.advance(x, oracle, 0.0, view)
        assert algo.sends(0.0) == []
    expected = torch.full((3,), 1 - (5 / 6) ** 3, dtype=torch.float64)  # ∇f = (x − 1)/3, η = 0.5, 3 steps
    assert algo.iteration == 3 and torch.allclose(x, expected)


def test_corrupt_and_unknown_messages_are_rejected() -> None:
    algo = Choco(ChocoParams(compressor="topk:0.1"), "me")
    algo.start(torch.zeros(D), 0.0, NeighbourView("me", {"a": 1}))
    bad = {"values": torch.ones(2), "indices": torch.tensor([0, D], dtype=torch.int32)}  # index out of range
    assert not algo.on_message(InMessage("a", 1, 1, Payload("delta", bad, round=0), 0.0), 0.0)
    assert algo.corrupt == 1
    assert not algo.on_message(InMessage("a", 1, 1, Payload("state", {"params": torch.ones(D)}, round=0), 0.0), 0.0)
    good = {"values": torch.ones(2), "indices": torch.tensor([0, 5], dtype=torch.int32)}
    assert algo.on_message(InMessage("a", 1, 1, Payload("delta", good, round=0), 0.0), 0.0)
    assert not algo.on_message(InMessage("a", 1, 1, Payload("delta", good, round=0), 0.0), 0.0)  # duplicate
    assert not algo.on_message(InMessage("a", 1, 1, Payload("momentum_state", good, round=0), 0.0), 0.0)


def test_restored_node_resets_every_neighbour_and_forgotten_ones_get_a_reset() -> None:
    algo = Choco(ChocoParams(compressor="topk:0.1"), "me")
    algo.load_state_dict({"iteration": 7})
    view = NeighbourView("me", {"a": 2, "b": 2})
    x = torch.randn(D)
    algo.start(x, 0.0, view)
    algo.advance(x, _oracle(torch.eye(D), torch.zeros(D), lambda k: 0.1), 0.0, view)
    sends = {s.to: s.payload for s in algo.sends(0.0)}
    for p in sends.values():
        assert p.kind == "state" and p.round == 7 and torch.equal(p.tensors["hat"], x)
        assert p.scalars == {"resync": 1.0}  # it holds no replica of anyone either
        assert set(p.tensors) == set(algo.expected_by_kind(D)["state"])
    fresh = Choco(ChocoParams(compressor="topk:0.1"), "me")
    fresh.start(x, 0.0, view)
    fresh.advance(x, _oracle(torch.eye(D), torch.zeros(D), lambda k: 0.1), 0.0, view)
    assert {s.payload.kind for s in fresh.sends(0.0)} == {"delta"}  # a fresh start needs no reset
    assert fresh.state_dict() == {"iteration": 0}


def test_params_are_validated() -> None:
    with pytest.raises(ValidationError, match="compressor"):
        ChocoParams(compressor="gzip")
    with pytest.raises(ValidationError):
        ChocoParams(gamma=0.0)
    assert ChocoParams().compressor == "topk:0.1" and Choco.provenance == "standard"


@pytest.mark.parametrize("compressor", ["none", "fp16", "topk:0.1", "randk:0.1", "qsgd:16", "sign"])
def test_messages_pass_the_daemon_codec_against_the_manifest(compressor: str) -> None:
    """float32 round messages (a delta, and the reset of a restored node) survive encode → schema check against
    `expected_by_kind` → decode, and the receiver accepts them."""
    from peer.net.assembler import Assembler, ReceiveLimits
    from peer.net.encoder import encode
    from peer.net.wire import Envelope
    from peer.v1 import gossip_pb2

    p = ChocoParams(compressor=compressor)
    oracle = _oracle(torch.eye(D), torch.ones(D), lambda k: 0.1)
    x = torch.randn(D, generator=torch.Generator().manual_seed(0))
    receiver = Choco(p, "b")
    receiver.start(x, 0.0, NeighbourView("b", {"a": 1, "c": 1}))
    limits = ReceiveLimits(
        max_payload_bytes=1 << 20,
        expected_fingerprint="fp",
        expected_algorithm="choco",
        expected_by_kind=receiver.expected_by_kind(D),
    )
    fresh, restored = Choco(p, "a"), Choco(p, "c")
    restored.load_state_dict({"iteration": 1})
    for algo in (fresh, restored):
        view = NeighbourView(algo.node_id, {"b": 2})
        algo.start(x, 0.0, view)
        algo.advance(x, oracle, 0.0, view)
        (send,) = algo.sends(0.0)
        assert send.payload.kind == ("delta" if algo is fresh else "state")
        header, chunks = encode(Envelope(algo.node_id, "fp", "choco", 1, 1, "", 0), send.payload)
        asm = Assembler(limits)
        asm.on_header(header)
        for index, data in enumerate(chunks):
            asm.on_chunk(gossip_pb2.Chunk(index=index, data=data))
        got = asm.finish().payload
        assert receiver.on_message(InMessage(algo.node_id, 1, 1, got, 0.0), 0.0)
    assert receiver.corrupt == 0


def test_local_momentum_is_the_heavy_ball_on_the_half_step() -> None:
    """`momentum` > 0: the half-step uses m ← μ m + ∇f (as dpsgd's), so Q = id, γ = 1 is D-PSGD of momentum
    half-steps."""
    adj = random_graph(6, 0.4, seed=2)
    mu = 0.9
    lr = lambda k: 0.05 / (1 + k / 50)  # noqa: E731 - the schedule of the reference too
    params = ChocoParams(compressor="none", gamma=1.0, retransmit_s=0.01, momentum=mu)
    sim = _sim(adj, params, interpolating=False, lr=lr)
    sim.run(iterations=60)
    a, b, _ = _problem(adj, interpolating=False)
    w = mixing_matrix(adj)
    x = {i: torch.zeros(D, dtype=torch.float64) for i in adj}
    m: dict[str, torch.Tensor] = {}
    for k in range(60):
        half = {}
        for i in adj:
            g = a[i].T @ (a[i] @ x[i] - b[i]) / 10
            m[i] = g if i not in m else mu * m[i] + g
            half[i] = x[i] - lr(k + 1) * m[i]
        x = {i: sum(w[i][j] * half[j] for j in sorted(w[i])) for i in adj}
    assert max(float((sim.x[i] - x[i]).abs().max()) for i in adj) < 1e-12
    assert float(torch.stack(list(x.values())).abs().max()) > 0.1
