"""P3 running-sum push-sum (peer.algorithms.pushsum): mass conservation under loss, convergence, ordering, forget."""

from __future__ import annotations

import random

import pytest
import torch

from peer.algorithms.base import Payload
from peer.algorithms.pushsum import WEIGHT, RunningSums, network_mass
from peer.algorithms.sim import random_graph, ring


class LossyNet:
    """Random activations; each message is dropped, duplicated or delayed (delivered in random order)."""

    def __init__(self, adj: dict[str, list[str]], x0: dict[str, dict[str, torch.Tensor]], seed: int) -> None:
        self.adj = adj
        self.nodes = {i: RunningSums(x0[i]) for i in adj}
        self.rng = random.Random(seed)
        self.flight: list[tuple[str, str, Payload]] = []

    def step(self, drop: float, dup: float) -> None:
        i = self.rng.choice(sorted(self.adj))
        for j, pl in self.nodes[i].emit(self.adj[i]).items():
            for _ in range(1 + (self.rng.random() < dup)):
                if self.rng.random() >= drop:
                    self.flight.append((i, j, pl))
        # Deliver a random subset in random order; the rest stays in flight (reordering, delay).
        self.rng.shuffle(self.flight)
        keep = []
        for i2, j2, pl2 in self.flight:
            if self.rng.random() < 0.5:
                self.nodes[j2].receive(i2, pl2)
            else:
                keep.append((i2, j2, pl2))
        self.flight = keep

    def flush(self) -> None:
        """Deliver what is in flight, then one lossless exchange: afterwards nothing is unapplied."""
        for i, j, pl in self.flight:
            self.nodes[j].receive(i, pl)
        self.flight = []
        emitted = {i: self.nodes[i].emit(self.adj[i]) for i in sorted(self.adj)}
        for i, per in emitted.items():
            for j, pl in per.items():
                assert self.nodes[j].receive(i, pl)


def initial(adj: dict[str, list[str]], p: int = 4) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return {
        i: {"a": torch.randn(p, generator=gen, dtype=torch.float64), "b": torch.rand(p, generator=gen) * 100}
        for i in adj
    }


def totals(x0: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: sum(v[k].to(torch.float64) for v in x0.values()) for k in ("a", "b")}  # type: ignore[misc]


def test_mass_is_conserved_under_drop_duplication_and_reordering() -> None:
    adj = random_graph(8, 0.3, seed=1)
    x0 = initial(adj)
    net = LossyNet(adj, x0, seed=2)
    want = totals(x0)
    for step in range(600):
        net.step(drop=0.3, dup=0.2)
        if step % 50 == 0:  # held + in flight (σ − ρ) is the initial total at any instant
            values, weight = network_mass(net.nodes)
            assert weight == pytest.approx(8.0, abs=1e-12)
            for k in want:
                assert torch.allclose(values[k], want[k], rtol=0, atol=1e-10)
    net.flush()
    held = {k: sum(n.values[k] for n in net.nodes.values()) for k in want}
    assert sum(n.weight for n in net.nodes.values()) == pytest.approx(8.0, abs=1e-12)
    for k in want:
        assert torch.allclose(held[k], want[k], rtol=0, atol=1e-10)  # type: ignore[arg-type]
    # The run was really lossy: some links had unapplied mass before the flush.
    assert sum(n.ignored for n in net.nodes.values()) > 0


@pytest.mark.parametrize("graph", ["ring", "random"])
def test_every_estimate_converges_to_the_exact_average_with_drops(graph: str) -> None:
    adj = ring(10) if graph == "ring" else random_graph(10, 0.25, seed=3)
    x0 = initial(adj)
    net = LossyNet(adj, x0, seed=4)
    for _ in range(2500 if graph == "ring" else 1200):
        net.step(drop=0.3, dup=0.1)
    net.flush()
    avg = {k: v / len(adj) for k, v in totals(x0).items()}
    for node in net.nodes.values():
        for k in avg:
            assert torch.allclose(node.estimate(k), avg[k], rtol=0, atol=1e-9), (k, node.estimate(k) - avg[k])


def test_an_older_message_is_ignored() -> None:
    a = RunningSums({"v": torch.tensor([3.0, 6.0])})
    b = RunningSums({"v": torch.zeros(2)}, weight=1.0)
    first = a.emit(["b"])["b"]
    second = a.emit(["b"])["b"]
    assert second.seq > first.seq
    assert b.receive("a", second)
    snapshot = (b.values["v"].clone(), b.weight)
    assert not b.receive("a", first)  # late and older: ignored, the newer running sum already covers it
    assert not b.receive("a", second)  # duplicate
    assert torch.equal(b.values["v"], snapshot[0]) and b.weight == snapshot[1]
    # Both shares arrived through the second message alone: a keeps 1/4, b got 3/4 of a's initial mass.
    assert torch.allclose(b.values["v"], torch.tensor([2.25, 4.5], dtype=torch.float64))
    assert b.weight == pytest.approx(1.75)
    assert b.ignored == 2


def test_wire_carries_values_plus_one_weight() -> None:
    s = RunningSums({"params": torch.zeros(7), "tracker": torch.zeros(7)})
    pl = s.emit(["x", "y"])
    assert set(pl) == {"x", "y"}
    assert {k: t.numel() for k, t in pl["x"].tensors.items()} == {"params": 7, "tracker": 7, WEIGHT: 1}
    assert all(t.dtype == torch.float64 for t in pl["x"].tensors.values())
    with pytest.raises(ValueError):
        RunningSums({WEIGHT: torch.zeros(1)})


def test_float32_wire_still_conserves_mass_exactly() -> None:
    adj = ring(5)
    x0 = initial(adj)
    net = LossyNet(adj, x0, seed=5)
    for n in net.nodes.values():
        n.wire_dtype = torch.float32
    for _ in range(300):
        net.step(drop=0.3, dup=0.1)
    values, weight = network_mass(net.nodes)
    assert weight == pytest.approx(5.0, abs=1e-12)
    for k, v in totals(x0).items():
        assert torch.allclose(values[k], v, rtol=0, atol=1e-10)


def test_forget_loses_the_links_mass_and_a_returning_neighbour_restarts_the_link() -> None:
    a = RunningSums({"v": torch.tensor([8.0])})
    b = RunningSums({"v": torch.tensor([0.0])})
    a.receive("b", b.emit(["a"])["a"])
    lost = a.emit(["b"])["b"]  # never delivered
    del lost
    a.forget("b")
    b.forget("a")
    before = a.values["v"] + b.values["v"]
    # The link restarts at zero on both ends: only mass sent after the forget crosses it, nothing twice.
    pa = a.emit(["b"])["b"]
    assert pa.scalars["gen"] == 1.0
    assert b.receive("a", pa)
    pb = b.emit(["a"])["a"]
    assert pb.scalars["gen"] == 1.0
    assert a.receive("b", pb)
    after = a.values["v"] + b.values["v"]
    assert torch.allclose(after, before)
    assert float(before) < 8.0  # the share a sent before forgetting b is lost, as documented


def test_forgotten_sender_that_did_not_forget_us_is_resynchronized() -> None:
    a = RunningSums({"v": torch.tensor([4.0])})
    b = RunningSums({"v": torch.tensor([0.0])})
    assert b.receive("a", a.emit(["b"])["b"])
    b.forget("a")  # b forgot a, a did not forget b: a's running sum to b keeps growing
    total = a.values["v"] + b.values["v"]
    assert b.receive("a", a.emit(["b"])["b"])  # delta unknown to b: dropped, ρ re-synchronized
    assert b.resynced == 1
    held = a.values["v"] + b.values["v"]
    assert float(held) < float(total)  # that one share is lost, nothing is double counted
    before = held
    assert b.receive("a", a.emit(["b"])["b"])  # from now on the link conserves again
    assert torch.allclose(a.values["v"] + b.values["v"], before)


def test_checkpoint_restores_held_mass_and_resynchronizes_links() -> None:
    a = RunningSums({"v": torch.tensor([4.0])})
    b = RunningSums({"v": torch.tensor([2.0])})
    for _ in range(3):
        b.receive("a", a.emit(["b"])["b"])
    state = b.state_dict()
    restored = RunningSums({})
    restored.load_state_dict(state)
    assert torch.equal(restored.values["v"], b.values["v"]) and restored.weight == b.weight
    before = restored.values["v"].clone()
    assert restored.receive("a", a.emit(["b"])["b"])  # a's cumulative sum is not applied in full
    assert torch.equal(restored.values["v"], before)


def test_restart_starts_a_fresh_instance_on_every_out_link() -> None:
    a = RunningSums({"v": torch.tensor([6.0])})
    b = RunningSums({"v": torch.tensor([0.0])})
    assert b.receive("a", a.emit(["b"])["b"])  # b now holds 3 from a, ρ = 3
    a.restart({"v": torch.tensor([10.0])}, 1.0)
    before = a.values["v"] + b.values["v"]
    pl = a.emit(["b"])["b"]
    assert pl.scalars["gen"] == 1.0 and float(pl.tensors["v"][0]) == 5.0  # σ counts from zero again
    assert b.receive("a", pl)  # applied in full (not 5 − 3): the new generation resets ρ
    assert torch.allclose(a.values["v"] + b.values["v"], before)
    assert float(b.values["v"][0]) == 8.0
