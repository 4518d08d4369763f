"""An in-memory network of step-mode algorithms (spec §8): virtual time, lossy links, no sockets, no threads.

Each node runs the same loop the daemon's training thread runs (`ready` → `advance` → `sends`), on its own
virtual clock speed. Every message crosses a link that can drop it, delay it (reordering follows), or duplicate
it; reliable messages are acknowledged by an ACK packet that crosses the same kind of link back. Everything is
deterministic for a given seed, so tests can compare a lossy run with a lossless one.

This is the harness for the algorithms' invariant, reduction and optimum tests, and for quick sweeps; the
daemon-level tests use real gRPC instead.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from peer.algorithms.base import Algorithm, InMessage, NeighbourView, Oracle, Send, payload_floats

Adjacency = Mapping[str, Sequence[str]]


@dataclass(frozen=True)
class Links:
    """How every link behaves. Delays are uniform in [delay_min_s, delay_max_s] per packet."""

    drop: float = 0.0
    duplicate: float = 0.0
    delay_min_s: float = 0.001
    delay_max_s: float = 0.005
    drop_acks: bool = True  # ACK packets cross the same lossy link


@dataclass
class FunctionOracle:
    """An `Oracle` from a gradient function and a step-size schedule, for convex test problems.

    `lr()` is `lr_fn(calls)`, with `calls` the number of gradients taken so far: called after `gradient`, as the
    algorithms do, iteration k (0-based) gets `lr_fn(k + 1)`. Reference implementations in tests must use the
    same indexing. The simulator hands the sender's tensors to receivers without copying: algorithms must not
    modify a tensor in place after sending it."""

    grad_fn: Callable[[torch.Tensor], tuple[float, torch.Tensor]]
    lr_fn: Callable[[int], float] = lambda k: 0.01
    data: tuple[torch.Tensor, torch.Tensor] | None = None
    calls: int = 0

    def gradient(self, x: torch.Tensor) -> tuple[float, torch.Tensor]:
        loss, g = self.grad_fn(x)
        self.calls += 1
        return loss, g

    def lr(self) -> float:
        return self.lr_fn(self.calls)

    def local_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.data is None:
            raise RuntimeError("this oracle has no local data")
        return self.data


@dataclass
class NodeStats:
    messages: int = 0
    floats: int = 0
    bytes: int = 0
    retransmissions: int = 0
    delivered: int = 0
    dropped: int = 0


@dataclass
class Simulation:
    """N step-mode algorithms on a graph. `adjacency(node, iteration)` may vary with the node's iteration."""

    algorithms: dict[str, Algorithm]
    x: dict[str, torch.Tensor]
    oracles: Mapping[str, Oracle]
    adjacency: Adjacency | Callable[[str, int], Sequence[str]]
    links: Links = field(default_factory=Links)
    seed: int = 0
    speeds: Mapping[str, float] = field(default_factory=dict)  # virtual seconds per iteration (default 0.01)
    poll_s: float = 0.002  # how often a blocked node looks again (the daemon waits on its inbox instead)
    after_advance: Callable[[Simulation, str], None] | None = None  # per-iteration invariant checks
    now: float = 0.0
    stats: dict[str, NodeStats] = field(default_factory=dict)
    # Partition: links listed here are down (both directions) until the given virtual time.
    cut_until: dict[frozenset[str], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._queue: list[tuple[float, int, str, tuple[object, ...]]] = []
        self._order = itertools.count()
        self._sent_keys: set[tuple[str, str, tuple[int, ...]]] = set()
        self.stats = {i: NodeStats() for i in self.algorithms}
        self.members = frozenset(self.algorithms)
        self.started = False

    # ------------------------------------------------------------------------------------------- graph
    def neighbours(self, node: str) -> list[str]:
        adj = self.adjacency
        if callable(adj):
            return list(adj(node, self.algorithms[node].iteration))
        return list(adj[node])

    def view(self, node: str) -> NeighbourView:
        adj = self.adjacency
        if callable(adj):
            k = self.algorithms[node].iteration
            return NeighbourView(node, {j: len(adj(j, k)) for j in adj(node, k)}, self.members)
        return NeighbourView(node, {j: len(adj[j]) for j in adj[node]}, self.members)

    # ---------------------------------------------------------------------------------------- running
    def _push(self, at: float, kind: str, *data: object) -> None:
        heapq.heappush(self._queue, (at, next(self._order), kind, data))

    def start(self) -> None:
        for i, algo in self.algorithms.items():
            algo.start(self.x[i], 0.0, self.view(i))
            self._flush(i)
            self._push(self.rng.uniform(0, self.speeds.get(i, 0.01)), "tick", i)
        self.started = True

    def run(
        self,
        *,
        iterations: int | None = None,
        until: Callable[[Simulation], bool] | None = None,
        max_time_s: float = 1e9,
        max_events: int = 10_000_000,
    ) -> Simulation:
        """Run until every node completed `iterations`, or `until(sim)` is true, or virtual time runs out."""
        if not self.started:
            self.start()
        for _ in range(max_events):
            if iterations is not None and all(a.iteration >= iterations for a in self.algorithms.values()):
                return self
            if until is not None and until(self):
                return self
            if not self._queue or self._queue[0][0] > max_time_s:
                return self
            at, _, kind, data = heapq.heappop(self._queue)
            self.now = at
            if kind == "tick":
                self._tick(str(data[0]), iterations)
            elif kind == "deliver":
                self._deliver(*data)  # type: ignore[arg-type]
            elif kind == "ack":
                sender, to, key = data
                self.algorithms[str(sender)].on_ack(str(to), key, self.now)  # type: ignore[arg-type]
        raise RuntimeError(f"simulation did not finish within {max_events} events")

    def _tick(self, i: str, iterations: int | None) -> None:
        algo = self.algorithms[i]
        speed = self.speeds.get(i, 0.01)
        if iterations is not None and algo.iteration >= iterations:
            self._flush(i)  # a finished node still answers retransmissions (its neighbours may need them)
            self._push(self.now + max(speed, self.poll_s), "tick", i)
            return
        view = self.view(i)
        if algo.ready(self.now, view):
            self.x[i] = algo.advance(self.x[i], self.oracles[i], self.now, view)
            if self.after_advance is not None:
                self.after_advance(self, i)
            self._flush(i)
            self._push(self.now + speed, "tick", i)
        else:
            self._flush(i)
            self._push(self.now + self.poll_s, "tick", i)

    def _flush(self, i: str) -> None:
        for send in self.algorithms[i].sends(self.now):
            self._send(i, send)

    def _link_up(self, a: str, b: str) -> bool:
        until = self.cut_until.get(frozenset((a, b)))
        return until is None or self.now >= until

    def _send(self, sender: str, send: Send) -> None:
        st = self.stats[sender]
        st.messages += 1
        n = payload_floats(send.payload)
        st.floats += n
        st.bytes += sum(t.numel() * t.element_size() for t in send.payload.tensors.values())
        if send.key:
            mark = (sender, send.to, send.key)
            if mark in self._sent_keys:
                st.retransmissions += 1
            self._sent_keys.add(mark)
        copies = 1 + (1 if self.rng.random() < self.links.duplicate else 0)
        for _ in range(copies):
            if not self._link_up(sender, send.to) or self.rng.random() < self.links.drop:
                st.dropped += 1
                continue
            delay = self.rng.uniform(self.links.delay_min_s, self.links.delay_max_s)
            self._push(self.now + delay, "deliver", sender, send)

    def _deliver(self, sender: str, send: Send) -> None:
        receiver = self.algorithms.get(send.to)
        if receiver is None:
            return
        self.stats[send.to].delivered += 1
        msg = InMessage(sender, 1, len(self.neighbours(sender)), send.payload, self.now)
        receiver.on_message(msg, self.now)
        if send.key:
            # The receiver acknowledges every copy, duplicates included: an ACK can be lost as well.
            if self.links.drop_acks and (not self._link_up(sender, send.to) or self.rng.random() < self.links.drop):
                return
            delay = self.rng.uniform(self.links.delay_min_s, self.links.delay_max_s)
            self._push(self.now + delay, "ack", sender, send.to, send.key)

    # ---------------------------------------------------------------------------------------- results
    def mean(self) -> torch.Tensor:
        return torch.stack(list(self.x.values())).mean(0)

    def disagreement(self) -> float:
        """max_i ‖x_i − x̄‖."""
        m = self.mean()
        return max(float(torch.linalg.vector_norm(x - m)) for x in self.x.values())


def ring(n: int, prefix: str = "n") -> dict[str, list[str]]:
    ids = [f"{prefix}{i}" for i in range(n)]
    if n == 2:
        return {ids[0]: [ids[1]], ids[1]: [ids[0]]}
    return {ids[i]: [ids[(i - 1) % n], ids[(i + 1) % n]] for i in range(n)}


def complete(n: int, prefix: str = "n") -> dict[str, list[str]]:
    ids = [f"{prefix}{i}" for i in range(n)]
    return {i: [j for j in ids if j != i] for i in ids}


def random_graph(n: int, p: float, seed: int, prefix: str = "n") -> dict[str, list[str]]:
    """A connected Erdős–Rényi graph (a ring is added underneath so it is always connected)."""
    rng = random.Random(seed)
    adj = {k: set(v) for k, v in ring(n, prefix).items()}
    ids = sorted(adj)
    for a, b in itertools.combinations(ids, 2):
        if rng.random() < p:
            adj[a].add(b)
            adj[b].add(a)
    return {k: sorted(v) for k, v in adj.items()}
