"""The communication graph over the current membership view: parse a topology spec, build the graph.

Every peer computes the same undirected graph from the same membership view, because each graph is a pure,
deterministic function of (spec, sorted member ids, seed, round index). No clocks, sockets or global
randomness: the random-regular graph draws from a private `random.Random` seeded by a SHA-256 of the seed and
the sorted ids, so a change of membership gives a new graph, the same on every peer that sees that change.

Forms (`TOPOLOGY_FORMS`):
  full                  complete graph.
  ring                  predecessor and successor by sorted node id (two members: one edge; one: none).
  random-regular:K      a random K-regular simple connected graph; see `random_regular` for how it degrades.
  exponential           static: i is linked to i ± 2^j (mod n) for every 2^j < n, on sorted ids.
  one-peer-exponential  time-varying: at round r, with L = max(1, ceil(log2 n)) and j = r mod L, i is linked to
                        i ± 2^j (mod n). The union over any L consecutive rounds is the exponential graph.

All graphs are undirected (so Metropolis–Hastings weights are doubly stochastic) and, for n ≥ 2, connected;
one-peer-exponential is connected over every window of L rounds rather than at each round. Ring, exponential
and one-peer-exponential are circulant, so every node has the same degree in them.

Time-varying graphs need a round index that all peers agree on. The shell derives it from wall-clock time,
`round_index_at(time.time(), period_s)` = `int(unix_time // period_s)`, so peers need roughly synchronized
clocks (NTP): two peers whose clocks differ by more than a small part of `period_s` disagree near round
boundaries, and for a moment one of them pushes along an edge the other does not mix along.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from peer.errors import ConfigError, UnknownNameError

TOPOLOGY_FORMS = ("full", "ring", "random-regular:K", "exponential", "one-peer-exponential")
_KINDS = ("full", "ring", "random-regular", "exponential", "one-peer-exponential")
_FIELD = "topology"
_FORMS_TEXT = ", ".join(TOPOLOGY_FORMS)

# Bounds on the random-regular search. Each attempt is cheap (O(n·K)); these are never reached in practice for
# K ≥ 3 (random regular graphs are connected with high probability), they only keep the worst case finite.
_PAIRING_ATTEMPTS = 50  # tries of the stub-pairing process per derived seed
_CONNECT_ATTEMPTS = 20  # derived seeds tried before falling back to adding a ring

Graph = dict[str, frozenset[str]]
T = TypeVar("T")


@dataclass(frozen=True)
class TopologySpec:
    """A parsed topology. `k` is the degree of `random-regular` and None for every other kind."""

    kind: str
    k: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise UnknownNameError("topology", self.kind, TOPOLOGY_FORMS, field=_FIELD)
        if self.kind == "random-regular":
            if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
                raise ConfigError(
                    f"random-regular needs an integer degree K >= 1, got {self.k!r}; valid forms: {_FORMS_TEXT}",
                    field=_FIELD,
                )
        elif self.k is not None:
            raise ConfigError(f"{self.kind} takes no parameter; valid forms: {_FORMS_TEXT}", field=_FIELD)

    def __str__(self) -> str:
        return f"{self.kind}:{self.k}" if self.kind == "random-regular" else self.kind


def parse_topology(text: str) -> TopologySpec:
    """Parse "full", "ring", "random-regular:K", "exponential" or "one-peer-exponential".

    Raises UnknownNameError (a ConfigError) for an unknown name and ConfigError for a bad or missing K, both with
    `field="topology"` and the valid forms in the message.
    """
    if not isinstance(text, str):
        raise ConfigError(f"expected a string, got {type(text).__name__}; valid forms: {_FORMS_TEXT}", field=_FIELD)
    name, sep, param = text.strip().partition(":")
    if name not in _KINDS:
        raise UnknownNameError("topology", text, TOPOLOGY_FORMS, field=_FIELD)
    if name == "random-regular":
        if not sep or not param.strip():
            raise ConfigError(
                f"random-regular needs a degree, e.g. random-regular:4; valid forms: {_FORMS_TEXT}", field=_FIELD
            )
        if not re.fullmatch(r"\d+", param.strip()) or int(param) < 1:
            raise ConfigError(
                f"random-regular degree K must be an integer >= 1, got {param.strip()!r}; valid forms: {_FORMS_TEXT}",
                field=_FIELD,
            )
        return TopologySpec("random-regular", int(param))
    if sep:
        raise ConfigError(f"{name} takes no parameter, got {text!r}; valid forms: {_FORMS_TEXT}", field=_FIELD)
    return TopologySpec(name)


def is_time_varying(spec: TopologySpec) -> bool:
    """True when the graph depends on `round_index` (the shell must then recompute it every round)."""
    return spec.kind == "one-peer-exponential"


def round_index_at(unix_time: float, period_s: float) -> int:
    """The round index of a time-varying graph: `int(unix_time // period_s)`; the shell passes `time.time()`."""
    if not period_s > 0:
        raise ValueError(f"period_s must be > 0, got {period_s!r}")
    return int(unix_time // period_s)


def num_phases(n: int) -> int:
    """L = max(1, ceil(log2 n)): how many rounds one-peer-exponential takes to cycle through its offsets."""
    return max(1, (n - 1).bit_length())


# -- graph construction ---------------------------------------------------------------------------------------


def graph(spec: TopologySpec, members: Iterable[str], *, seed: int = 0, round_index: int = 0) -> Graph:
    """The undirected adjacency over every member (duplicates ignored): node id -> frozenset of neighbour ids.

    Deterministic in (spec, set of members, seed, round_index); `seed` only matters for random-regular and
    `round_index` only for time-varying forms.
    """
    ids = sorted(set(members))
    n = len(ids)
    if spec.kind == "full":
        edges = {(i, j) for i in range(n) for j in range(i + 1, n)}
    elif spec.kind == "ring":
        edges = _circulant_edges(n, [1])
    elif spec.kind == "exponential":
        edges = _circulant_edges(n, _powers_below(n))
    elif spec.kind == "one-peer-exponential":
        edges = _circulant_edges(n, [1 << (round_index % num_phases(n))]) if n >= 2 else set()
    elif spec.kind == "random-regular":
        assert spec.k is not None
        edges = random_regular(n, spec.k, _derived_seed(seed, ids))
    else:  # __post_init__ rejects other kinds
        raise AssertionError(spec.kind)
    adj: dict[str, set[str]] = {node: set() for node in ids}
    for a, b in edges:
        assert a != b
        adj[ids[a]].add(ids[b])
        adj[ids[b]].add(ids[a])
    return {node: frozenset(nbrs) for node, nbrs in adj.items()}


def neighbours(
    spec: TopologySpec, self_id: str, members: Iterable[str], *, seed: int = 0, round_index: int = 0
) -> list[str]:
    """`self_id`'s neighbours, sorted. `members` may or may not include `self_id`; self always counts."""
    adj = graph(spec, {*members, self_id}, seed=seed, round_index=round_index)
    return sorted(adj[self_id])


def degrees(spec: TopologySpec, members: Iterable[str], *, seed: int = 0, round_index: int = 0) -> dict[str, int]:
    """Every member's degree in the graph: lets a peer know its neighbours' true degrees for Metropolis–Hastings
    weights without waiting for them to advertise it (advertised degrees lag when the graph changes)."""
    return {node: len(nbrs) for node, nbrs in graph(spec, members, seed=seed, round_index=round_index).items()}


def is_connected(adj: Mapping[T, Iterable[T]]) -> bool:
    """True when every node is reachable from every other (an empty or one-node graph is connected)."""
    if not adj:
        return True
    start = next(iter(adj))
    seen = {start}
    stack = [start]
    while stack:
        for nxt in adj[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return len(seen) == len(adj)


def _powers_below(n: int) -> list[int]:
    out, p = [], 1
    while p < n:
        out.append(p)
        p <<= 1
    return out


def _circulant_edges(n: int, offsets: Iterable[int]) -> set[tuple[int, int]]:
    """Undirected edges {i, i ± d mod n} on 0..n-1, without self loops (d ≡ 0 mod n gives none)."""
    edges: set[tuple[int, int]] = set()
    for d in offsets:
        for i in range(n):
            j = (i + d) % n
            if i != j:
                edges.add((min(i, j), max(i, j)))
    return edges


def _derived_seed(seed: int, ids: list[str]) -> int:
    """Mix the seed with the sorted ids (SHA-256, stable across processes, unlike hash())."""
    digest = hashlib.sha256(repr(seed).encode())
    for node in ids:
        digest.update(b"\x00" + node.encode())
    return int.from_bytes(digest.digest()[:8], "big")


# -- random regular graphs ------------------------------------------------------------------------------------


def effective_degrees(n: int, k: int) -> list[int]:
    """The degree sequence `random-regular:k` actually builds on n nodes (index = position in sorted ids).

    - K' = min(K, n − 1): a simple graph has no degree above n − 1 (K ≥ n gives the complete graph).
    - With n ≥ 3, K' = max(K', 2): a connected graph on three or more nodes with every degree 1 does not exist,
      so random-regular:1 is built as random-regular:2 (a random Hamiltonian cycle).
    - If n·K' is odd (no K'-regular graph exists) the last node in sorted order gets degree K' + 1, the nearest
      valid sequence (K' + 1 ≤ n − 1 here, since n·(n − 1) is always even).
    """
    if n <= 1:
        return [0] * n
    kk = min(k, n - 1)
    if n >= 3:
        kk = max(kk, 2)
    seq = [kk] * n
    if (n * kk) % 2:
        seq[-1] += 1
    return seq


def random_regular(n: int, k: int, seed: int) -> set[tuple[int, int]]:
    """A random connected simple graph on 0..n-1 with degree sequence `effective_degrees(n, k)`, as (i, j), i < j.

    Deterministic in (n, k, seed). Degree 2 is drawn as a uniform random Hamiltonian cycle. Otherwise the
    sparser of the graph and its complement is drawn by stub pairing (the networkx random_regular_graph
    process) and complemented if needed; graphs that are not connected are rejected and redrawn with the next
    derived seed. After `_CONNECT_ATTEMPTS` failures (not seen in practice) the ring edges are added to the last
    draw: connected, but some nodes then have up to two more than K' neighbours.
    """
    seq = effective_degrees(n, k)
    if n <= 1:
        return set()
    kk = min(seq)
    if kk == n - 1:
        return {(i, j) for i in range(n) for j in range(i + 1, n)}
    last: set[tuple[int, int]] = set()
    for attempt in range(_CONNECT_ATTEMPTS):
        rng = random.Random(seed + attempt)
        if kk == 2 and max(seq) == 2:
            order = list(range(n))
            rng.shuffle(order)
            edges = {(min(a, b), max(a, b)) for a, b in zip(order, order[1:] + order[:1], strict=True)}
        else:
            drawn = _with_degrees(seq, rng)
            if drawn is None:
                continue
            edges = drawn
        last = edges
        if _edges_connected(n, edges):
            return edges
    # Fallback (bounded search exhausted): connectivity matters more than exact regularity.
    return last | _circulant_edges(n, [1])


def _with_degrees(seq: list[int], rng: random.Random) -> set[tuple[int, int]] | None:
    """A random simple graph with degree sequence `seq`, or None if the pairing process got stuck every time.

    Dense sequences (degree above (n − 1) / 2) are drawn as the complement of a sparse one: pairing stalls on
    dense graphs, and the complement of a uniform random graph is uniform too.
    """
    n = len(seq)
    if 2 * max(seq) > n - 1:
        sparse = [n - 1 - d for d in seq]
        drawn = _with_degrees(sparse, rng) if any(sparse) else set()
        if drawn is None:
            return None
        return {(i, j) for i in range(n) for j in range(i + 1, n)} - drawn
    for _ in range(_PAIRING_ATTEMPTS):
        edges = _try_pairing(seq, rng)
        if edges is not None:
            return edges
    return None


def _try_pairing(seq: list[int], rng: random.Random) -> set[tuple[int, int]] | None:
    """One run of stub pairing: shuffle the stubs, pair them up, keep valid pairs, re-pair the rest."""
    edges: set[tuple[int, int]] = set()
    stubs = [node for node, d in enumerate(seq) for _ in range(d)]
    while stubs:
        leftover: dict[int, int] = {}
        rng.shuffle(stubs)
        for a, b in zip(stubs[::2], stubs[1::2], strict=True):
            pair = (min(a, b), max(a, b))
            if a != b and pair not in edges:
                edges.add(pair)
            else:
                leftover[a] = leftover.get(a, 0) + 1
                leftover[b] = leftover.get(b, 0) + 1
        if not _can_still_pair(edges, leftover):
            return None
        stubs = [node for node in sorted(leftover) for _ in range(leftover[node])]
    return edges


def _can_still_pair(edges: set[tuple[int, int]], leftover: dict[int, int]) -> bool:
    """False when no two nodes with stubs left can be joined (every candidate pair is a loop or already an edge)."""
    if not leftover:
        return True
    nodes = sorted(leftover)
    for x, a in enumerate(nodes):
        for b in nodes[x + 1 :]:
            if (a, b) not in edges:
                return True
    return False


def _edges_connected(n: int, edges: set[tuple[int, int]]) -> bool:
    adj: dict[int, set[int]] = {i: set() for i in range(n)}
    for a, b in edges:
        adj[a].add(b)
        adj[b].add(a)
    return is_connected(adj)


def topology_neighbours(
    topology: str, self_id: str, members: list[str], *, seed: int = 0, round_index: int = 0
) -> list[str]:
    """The neighbour set for the topology named `topology` over `members` (which may or may not include
    `self_id`)."""
    return neighbours(parse_topology(topology), self_id, members, seed=seed, round_index=round_index)
