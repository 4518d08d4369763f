"""DIGEST (spec §4(f), §8): merge invariant, schedule equivalence, convex optimum, S = 1 reduction, token loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import pytest
import torch

from peer.algorithms.base import AlgoParams, Algorithm, InMessage, NeighbourView, Oracle, Send, payload_floats
from peer.algorithms.digest import Digest, DigestParams
from peer.algorithms.sim import FunctionOracle, Links, Simulation, complete, random_graph, ring
from peer.algorithms.tokens import Token, TokenWalk

D = 5  # features = model size P
Problem = tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]


def _logreg(n: int, *, skew: bool = False, m: int = 32, lam: float = 0.1, seed: int = 0) -> Problem:
    """ℓ2-logistic regression split over n nodes (IID, or sorted by label), and its optimum (Newton, float64)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n * m, D, generator=gen, dtype=torch.float64)
    y = torch.sign(a @ torch.randn(D, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(n * m, generator=gen))
    order = torch.argsort(y, stable=True) if skew else torch.randperm(n * m, generator=gen)
    a, y = a[order], y[order]
    x = torch.zeros(D, dtype=torch.float64)
    for _ in range(30):
        s = torch.sigmoid(-y * (a @ x))
        g = -(a.T @ (y * s)) / len(y) + lam * x
        h = (a.T * (s * (1 - s))) @ a / len(y) + lam * torch.eye(D, dtype=torch.float64)
        x = x - torch.linalg.solve(h, g)
    return [(a[i * m : (i + 1) * m], y[i * m : (i + 1) * m]) for i in range(n)], x


def _grad(part: tuple[torch.Tensor, torch.Tensor], lam: float = 0.1) -> Callable[[torch.Tensor], Any]:
    a, y = part

    def grad(x: torch.Tensor) -> tuple[float, torch.Tensor]:
        z = y * (a @ x)
        loss = float(torch.nn.functional.softplus(-z).mean()) + lam / 2 * float(x @ x)
        return loss, -(a.T @ (y * torch.sigmoid(-z))) / len(y) + lam * x

    return grad


def _sim(
    adj: dict[str, list[str]],
    parts: list[tuple[torch.Tensor, torch.Tensor]],
    lr: Callable[[int], float],
    links: Links | None = None,
    seed: int = 3,
    cls: type[Algorithm] = Digest,
    **params: Any,
) -> Simulation:
    ids = sorted(adj)
    algos = {i: cls(DigestParams(**{"retransmit_s": 0.02, "momentum": 0.0, **params}), i) for i in ids}
    oracles = {i: FunctionOracle(_grad(parts[k]), lr_fn=lr) for k, i in enumerate(ids)}
    x0 = {i: torch.zeros(D, dtype=torch.float64) for i in ids}
    return Simulation(algos, x0, oracles, adj, links=links or Links(), seed=seed)  # type: ignore[arg-type]


def _digests(sim: Simulation) -> dict[str, Digest]:
    out = {i: a for i, a in sim.algorithms.items() if isinstance(a, Digest)}
    assert len(out) == len(sim.algorithms)
    return out


def _live(sim: Simulation) -> dict[int, list[Token]]:
    """The live copy of every stream: held ones, and in-flight ones whose destination has not accepted that hop
    (an in-flight copy already accepted downstream is dead: its destination rejects every retransmission)."""
    live: dict[int, list[Token]] = {}
    algos = _digests(sim)
    for algo in algos.values():
        for t in algo.walk.held.values():
            live.setdefault(t.stream, []).append(t)
        for f in algo.walk.inflight.values():
            if algos[f.to].walk.seen.get(f.token.stream, -1) < f.token.hop:
                live.setdefault(f.token.stream, []).append(f.token)
    return live


def _xbar(sim: Simulation) -> torch.Tensor:
    """The output model: the mean of the streams' global models x̄^(s) (x̄ itself with one stream)."""
    live = _live(sim)
    return torch.stack([copies[0].tensors["params"] for _, copies in sorted(live.items())]).mean(0)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))


def _settle_time(sim: Simulation, x_star: torch.Tensor, tol: float, t_end: float, dt: float = 0.1) -> float:
    """The first checkpoint from which the output stays within `tol` (relative) of x* until t_end (inf: never)."""
    settled = float("inf")
    for k in range(1, round(t_end / dt) + 1):
        sim.run(max_time_s=k * dt)
        if _rel(_xbar(sim), x_star) > tol:
            settled = float("inf")
        elif settled == float("inf"):
            settled = k * dt
    return settled


def _decaying(c: int) -> float:
    return 1.0 / (1.0 + c / 10)  # c: gradient calls at this node


# ------------------------------------------------------------------------------------------- §4(f)1
def test_merge_invariant_under_delays_and_duplicates() -> None:
    """x̄ − x^0 = (1/N) Σ merged Δ after every iteration; duplicated deliveries are rejected by hop."""
    n = 8
    parts, _ = _logreg(n)
    adj = random_graph(n, 0.3, seed=1)
    links = Links(duplicate=0.3, delay_min_s=0.001, delay_max_s=0.05)  # delays of up to 5 ticks: reordering
    sim = _sim(adj, parts, lambda c: 0.3, links=links)
    worst = [0.0]

    def check(sim: Simulation, node: str) -> None:
        live = _live(sim)
        assert list(live) == [0] and len(live[0]) == 1
        progress = sum(a.merged_progress[0] for a in _digests(sim).values())
        worst[0] = max(worst[0], float((live[0][0].tensors["params"] - progress).abs().max()))

    sim.after_advance = check
    sim.run(iterations=150)
    algos = list(_digests(sim).values())
    hop = _live(sim)[0][0].hop
    assert worst[0] < 1e-12
    assert sum(a.walk.duplicates for a in algos) > 20  # duplicated packets arrived, and were ignored
    assert sum(a.walk.accepted for a in algos) == hop  # every hop accepted exactly once
    assert hop <= sum(a.merges for a in algos) <= hop + 1  # one merge per visit, the origin's included
    assert all(a.merges > 0 for a in algos)
    for node, st in sim.stats.items():
        assert st.floats == D * st.messages, node  # wire size: P per token hop


# ------------------------------------------------------------------------------------------- §4(f)2
def test_cycle_schedule_equals_sequential_delta_merge_reference() -> None:
    """A fixed Hamiltonian order with H local steps between visits equals the single-process schedule."""
    n, h, lr = 5, 10, 0.2
    parts, _ = _logreg(n)
    adj = ring(n)
    ids = sorted(adj)
    links = Links(delay_min_s=0.001, delay_max_s=0.001)
    sim = _sim(adj, parts, lambda c: lr, links=links, walk="cycle", hold_steps=h)
    logs: dict[str, list[tuple[int, int, int, torch.Tensor]]] = {}
    for i, algo in _digests(sim).items():
        algo.merge_log = logs.setdefault(i, [])
    sim.run(iterations=12 * h)
    merges = sorted((hop, i, steps, xbar) for i, log in logs.items() for _, hop, steps, xbar in log)
    assert [hop for hop, *_ in merges] == list(range(len(merges))) and len(merges) >= 10 * n
    assert [i for _, i, _, _ in merges] == [ids[k % n] for k in range(len(merges))]  # the Hamiltonian cycle
    assert all(steps == h for hop, _, steps, _ in merges if hop >= n)  # after the first tour: exactly H steps

    # Single process: node v runs `steps` gradient steps from the model it adopted, then merges into x̄.
    grads = {i: _grad(parts[k]) for k, i in enumerate(ids)}
    x = {i: torch.zeros(D, dtype=torch.float64) for i in ids}
    ref = {i: torch.zeros(D, dtype=torch.float64) for i in ids}
    xbar = torch.zeros(D, dtype=torch.float64)
    worst = 0.0
    for _, v, steps, got in merges:
        for _ in range(steps):
            x[v] = x[v] - lr * grads[v](x[v])[1]
        xbar = xbar + (x[v] - ref[v]) / n
        x[v], ref[v] = xbar, xbar
        worst = max(worst, float((got - xbar).abs().max()))
    assert worst < 1e-6


# ------------------------------------------------------------------------------------------- §4(f)3
def test_convex_convergence_iid_single_stream() -> None:
    n = 8
    parts, x_star = _logreg(n)
    sim = _sim(random_graph(n, 0.3, seed=1), parts, _decaying)
    settled = _settle_time(sim, x_star, 1e-2, t_end=6.0)
    assert settled < 5.0  # within 1e-2 of the centralized optimum, and staying there
    assert _rel(_xbar(sim), x_star) < 1e-2


@pytest.mark.slow
def test_convex_convergence_iid_single_stream_to_1e_3() -> None:
    n = 8
    parts, x_star = _logreg(n)
    sim = _sim(random_graph(n, 0.3, seed=1), parts, _decaying)
    assert _settle_time(sim, x_star, 1e-3, t_end=80.0, dt=1.0) < 70.0


def test_multi_stream_is_not_slower_than_single_stream_on_label_skew() -> None:
    """Label-sorted split (each node sees one class): S = N streams settle within 1e-2 no later than S = 1."""
    n = 8
    parts, x_star = _logreg(n, skew=True)
    adj = random_graph(n, 0.3, seed=1)
    times = {}
    for s in (1, n):
        sim = _sim(adj, parts, _decaying, streams=s)
        times[s] = _settle_time(sim, x_star, 1e-2, t_end=4.0)
    assert times[n] <= times[1] < float("inf"), times


# ------------------------------------------------------------------------------------------- §4(f)4
class _SingleStream(Algorithm):
    """§4(a) single-stream DIGEST written plainly (one token, one reference), the reduction's reference."""

    name: ClassVar[str] = "single_stream"
    params_type: ClassVar[type[AlgoParams]] = DigestParams
    owns_local_update: ClassVar[bool] = True

    def __init__(self, params: AlgoParams, node_id: str) -> None:
        super().__init__(params, node_id)
        assert isinstance(params, DigestParams)
        self.p = params
        self.walk = TokenWalk(node_id, params.walk, params.retransmit_s, params.regen_s, params.seed)
        self.x_ref = torch.zeros(0)
        self.steps = 0

    def start(self, x: torch.Tensor, now: float, view: NeighbourView) -> None:
        self.x_ref = x.clone()
        if sorted(view.members)[0] == self.node_id:
            self.walk.create(0, {"params": x}, len(view.members))

    def advance(self, x: torch.Tensor, oracle: Oracle, now: float, view: NeighbourView) -> torch.Tensor:
        g = oracle.gradient(x)[1]
        x = x - oracle.lr() * g
        self.iteration += 1
        self.steps += 1
        if 0 in self.walk.held and view.degrees and self.steps >= self.p.hold_steps:
            token = self.walk.held[0]
            token.n = len(view.members)
            xbar = token.tensors["params"] + (x - self.x_ref) / token.n
            token.tensors = {"params": xbar}
            x, self.x_ref, self.steps = xbar.clone(), xbar, 0
            self.walk.forward(0, view)
        return x

    def sends(self, now: float) -> list[Send]:
        return self.walk.due(now)

    def on_ack(self, to: str, key: tuple[int, ...], now: float) -> None:
        self.walk.ack(to, key)

    def on_message(self, msg: InMessage, now: float) -> bool:
        return self.walk.receive(msg.payload) is not None


def test_one_stream_is_bit_identical_to_single_stream_digest() -> None:
    n = 6
    parts, _ = _logreg(n)
    adj = random_graph(n, 0.4, seed=2)
    links = Links(drop=0.2, duplicate=0.2, delay_max_s=0.03)
    runs = []
    for cls in (Digest, _SingleStream):
        sim = _sim(adj, parts, _decaying, links=links, cls=cls, walk="lazy_mh", hold_steps=2)
        sim.run(iterations=200)
        runs.append(sim)
    a, b = runs
    for i in a.x:
        assert torch.equal(a.x[i], b.x[i]), i
    assert a.now == b.now and a.stats == b.stats
    assert sum(x.walk.stays for x in _digests(a).values()) > 0


# ------------------------------------------------------------------------------------------- §4(f)5
def test_token_loss_robustness_keeps_exactly_s_tokens() -> None:
    """30% of packets (and ACKs) lost: retransmission keeps exactly S live tokens at every iteration, and the
    result stays within tolerance of the lossless run."""
    n, streams = 8, 2
    parts, x_star = _logreg(n)
    adj = random_graph(n, 0.3, seed=1)

    def check(sim: Simulation, node: str) -> None:
        live = _live(sim)
        assert sorted(live) == list(range(streams)) and all(len(c) == 1 for c in live.values()), live

    out = {}
    for drop in (0.0, 0.3):
        sim = _sim(adj, parts, _decaying, links=Links(drop=drop), streams=streams, retransmit_s=0.01)
        sim.after_advance = check
        sim.run(max_time_s=6.0)
        out[drop] = sim
    lossy, lossless = out[0.3], out[0.0]
    algos = list(_digests(lossy).values())
    assert sum(a.walk.retransmissions for a in algos) > 50
    assert sum(a.walk.duplicates for a in algos) > 10  # retransmissions of tokens whose ACK was lost
    assert sum(a.walk.regenerations for a in algos) == 0
    assert _rel(_xbar(lossy), _xbar(lossless)) < 1e-2
    assert _rel(_xbar(lossy), x_star) < 1e-2


def test_token_stuck_on_a_departed_node_is_regenerated_once() -> None:
    """A token in flight to an unreachable member is retransmitted, never re-drawn; once that node has left the
    membership (and was forgotten), the sender alone regenerates it, and N_current follows the membership."""
    parts, _ = _logreg(4)
    adj = complete(4)
    sim = _sim(adj, parts, lambda c: 0.2, regen_s=0.1)
    for j in ("n0", "n1", "n2"):
        sim.cut_until[frozenset({"n3", j})] = float("inf")  # n3 is unreachable, but still a member
    sim.run(max_time_s=1.0)
    algos = _digests(sim)
    stuck = [f for a in algos.values() for f in a.walk.inflight.values()]
    assert len(stuck) == 1 and stuck[0].to == "n3" and not any(a.walk.held for a in algos.values())
    assert sum(a.walk.regenerations for a in algos.values()) == 0
    hop = stuck[0].token.hop
    # n3 leaves: the membership and the topology drop it, and its neighbours forget it.
    adj.update({"n0": ["n1", "n2"], "n1": ["n0", "n2"], "n2": ["n0", "n1"], "n3": []})
    sim.members = frozenset({"n0", "n1", "n2"})
    for i in ("n0", "n1", "n2"):
        algos[i].forget("n3")
    sim.run(max_time_s=2.0)
    assert sum(a.walk.regenerations for a in algos.values()) == 1
    live = _live(sim)
    assert list(live) == [0] and len(live[0]) == 1
    token = live[0][0]
    assert token.hop > hop + 10 and token.regenerated == 1 and token.n == 3


# ------------------------------------------------------------------------------------------- rules
class _Const:
    """An oracle whose gradient is a fixed vector, with step size 1."""

    def __init__(self, g: torch.Tensor) -> None:
        self.g = g

    def gradient(self, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        return 0.0, self.g

    def lr(self) -> float:
        return 1.0

    def local_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("no data")


def _arrive(algo: Digest, stream: int, hop: int, xbar: torch.Tensor, n: int) -> None:
    token = Token(stream, hop, {"params": xbar}, n)
    assert algo.on_message(InMessage("a", 1, 1, token.payload(), 0.0), 0.0)


def test_option_a_shifts_other_references_and_meetings_average() -> None:
    members = frozenset({"a", "c", "d", "z"})  # N = 4; "z" originates neither of the two streams
    view = NeighbourView("z", {"a": 2, "c": 2}, members)
    g = torch.tensor([1.0, -2.0, 0.5])
    u, v = torch.tensor([4.0, 0.0, 1.0]), torch.tensor([0.0, 8.0, -1.0])
    algo = Digest(DigestParams(streams=2, momentum=0.0), "z")
    x = torch.zeros(3)
    algo.start(x, 0.0, view)
    assert not algo.walk.held
    _arrive(algo, 0, 1, u, 4)
    x = algo.advance(x, _Const(g), 0.0, view)  # one step (−g), then merge stream 0
    assert torch.allclose(x, u - g / 4)
    assert torch.allclose(algo.ref[1], x + g)  # x − ref^(1) is still exactly z's own progress, −g
    _arrive(algo, 1, 1, v, 4)
    x = algo.advance(x, _Const(g), 0.0, view)
    assert torch.allclose(algo.walk.inflight[1].token.tensors["params"], v - 2 * g / 4)  # both steps, once
    assert torch.allclose(x, v - g / 2)
    assert torch.allclose(x - algo.ref[0], -g)  # the one step z took since it merged stream 0, not the jump
    # Two tokens meeting: each gets z's progress once, then both carry their average (the sum is preserved).
    meet = Digest(DigestParams(streams=2, momentum=0.0), "z")
    meet.start(torch.zeros(3), 0.0, view)
    _arrive(meet, 0, 1, u, 4)
    _arrive(meet, 1, 1, v, 4)
    x = meet.advance(torch.zeros(3), _Const(g), 0.0, view)
    out = [meet.walk.inflight[s].token.tensors["params"] for s in (0, 1)]
    assert torch.allclose(out[0], out[1]) and torch.allclose(out[0] + out[1], u + v - 2 * g / 4)
    assert torch.equal(x, out[0]) and meet.meetings == 1
    assert all(torch.equal(r, x) for r in meet.ref)


def test_multi_stream_mean_invariant_with_meetings() -> None:
    """With S streams that meet and average, (1/S) Σ_s x̄^(s) − x^0 = (1/S) Σ merged Δ/N at every iteration."""
    n, streams = 6, 3
    parts, _ = _logreg(n)
    sim = _sim(random_graph(n, 0.4, seed=4), parts, lambda c: 0.2, streams=streams, hold_steps=3)
    worst = [0.0]

    def check(sim: Simulation, node: str) -> None:
        live = _live(sim)
        assert sorted(live) == list(range(streams)) and all(len(c) == 1 for c in live.values())
        progress = sum(sum(a.merged_progress) for a in _digests(sim).values()) / streams
        worst[0] = max(worst[0], float((_xbar(sim) - progress).abs().max()))

    sim.after_advance = check
    sim.run(iterations=150)
    assert worst[0] < 1e-12
    assert sum(a.meetings for a in _digests(sim).values()) > 0


def test_alone_is_local_sgd_with_momentum() -> None:
    """Zero neighbours: the node keeps its token, never merges, and runs plain heavy-ball SGD."""
    algo = Digest(DigestParams(momentum=0.9), "solo")
    view = NeighbourView("solo", {}, frozenset({"solo"}))
    g = torch.tensor([1.0, 2.0])
    x, ref, buf = torch.zeros(2), torch.zeros(2), torch.zeros(2)
    algo.start(x, 0.0, view)
    for _ in range(5):
        x = algo.advance(x, _Const(g), 0.0, view)
        buf = 0.9 * buf + g
        ref = ref - buf
    assert torch.allclose(x, ref) and algo.merges == 0 and algo.walk.holds(0) and algo.sends(0.0) == []
    assert algo.ready(0.0, view) and algo.iteration == 5


def test_state_dict_round_trip_and_manifest() -> None:
    view = NeighbourView("a", {"b": 1}, frozenset({"a", "b"}))
    algo = Digest(DigestParams(streams=2, momentum=0.5), "a")
    x = algo.advance(torch.zeros(3), _Const(torch.ones(3)), 0.0, view)
    algo.sends(0.0)
    state = algo.state_dict()
    again = Digest(DigestParams(streams=2, momentum=0.5), "a")
    again.load_state_dict(state)
    again.start(x, 1.0, view)  # a restored node does not create its streams again, nor reset its references
    assert again.iteration == 1 and again.originated
    assert again.walk.seen == algo.walk.seen and sorted(again.walk.inflight) == sorted(algo.walk.inflight)
    assert all(torch.equal(p, q) for p, q in zip(again.ref, algo.ref, strict=True))
    assert [payload_floats(s.payload) for s in again.sends(1.0)] == [3]
    assert Digest.provenance == "reconstructed (spec v1)"
    assert algo.expected_by_kind(3) == {"token": {"params": ((3,), "float32")}}
