"""Invariants of every topology form: symmetric, loop-free, deterministic, connected, doubly stochastic mixing."""

from __future__ import annotations

import random

import pytest

from peer.algorithms.mixing import mixing_matrix
from peer.core.topology import (
    TOPOLOGY_FORMS,
    TopologySpec,
    degrees,
    effective_degrees,
    graph,
    is_connected,
    is_time_varying,
    neighbours,
    num_phases,
    parse_topology,
    random_regular,
    round_index_at,
)
from peer.errors import ConfigError, UnknownNameError

SPECS = ["full", "ring", "exponential", "one-peer-exponential", *(f"random-regular:{k}" for k in range(1, 10))]


def ids(n: int) -> list[str]:
    return [f"node-{i:02d}" for i in range(n)]


def union(graphs: list[dict[str, frozenset[str]]]) -> dict[str, frozenset[str]]:
    out: dict[str, frozenset[str]] = {}
    for g in graphs:
        for node, nbrs in g.items():
            out[node] = out.get(node, frozenset()) | nbrs
    return out


def assert_doubly_stochastic(adj: dict[str, frozenset[str]]) -> None:
    w = mixing_matrix({i: sorted(nbrs) for i, nbrs in adj.items()})
    for i in adj:
        assert sum(w[i].values()) == pytest.approx(1.0)
        assert w[i][i] >= 0
        assert sum(w[j].get(i, 0.0) for j in adj) == pytest.approx(1.0)
        for j in adj[i]:
            assert w[i][j] == pytest.approx(w[j][i])


# -- parsing --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("full", TopologySpec("full")),
        ("ring", TopologySpec("ring")),
        ("exponential", TopologySpec("exponential")),
        ("one-peer-exponential", TopologySpec("one-peer-exponential")),
        ("random-regular:3", TopologySpec("random-regular", 3)),
        (" random-regular:12 ", TopologySpec("random-regular", 12)),
    ],
)
def test_parse_valid(text: str, spec: TopologySpec) -> None:
    assert parse_topology(text) == spec
    assert parse_topology(str(spec)) == spec


@pytest.mark.parametrize(
    "text", ["star", "", "Ring", "random-regular", "random-regular:", "random-regular:0", "random-regular:-1",
             "random-regular:2.5", "random-regular:x", "random-regular:+3", "ring:2", "full:", "exponential:3"],
)  # fmt: skip
def test_parse_invalid_names_field_and_forms(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_topology(text)
    assert info.value.field == "topology"
    assert str(info.value).startswith("topology: ")
    for form in TOPOLOGY_FORMS:
        assert form in str(info.value)


def test_unknown_name_is_unknown_name_error() -> None:
    with pytest.raises(UnknownNameError) as info:
        parse_topology("torus")
    assert info.value.name == "torus"


def test_spec_validates_itself() -> None:
    with pytest.raises(ConfigError):
        TopologySpec("random-regular")
    with pytest.raises(ConfigError):
        TopologySpec("ring", 3)
    with pytest.raises(UnknownNameError):
        TopologySpec("star")


def test_is_time_varying() -> None:
    assert [f for f in ("full", "ring", "random-regular:3", "exponential", "one-peer-exponential")
            if is_time_varying(parse_topology(f))] == ["one-peer-exponential"]  # fmt: skip


# -- invariants for every form, n in 1..9 ---------------------------------------------------------------------


@pytest.mark.parametrize("text", SPECS)
@pytest.mark.parametrize("n", range(1, 10))
def test_invariants(text: str, n: int) -> None:
    spec = parse_topology(text)
    members = ids(n)
    rounds = range(num_phases(n)) if is_time_varying(spec) else [0]
    per_round = []
    for r in rounds:
        adj = graph(spec, members, seed=7, round_index=r)
        per_round.append(adj)
        assert set(adj) == set(members)
        for i, nbrs in adj.items():
            assert i not in nbrs, "self loop"
            for j in nbrs:
                assert i in adj[j], "asymmetric"
        # Deterministic, whatever the order (or duplicates) of the members.
        shuffled = members[::-1] + members[:2]
        random.Random(n).shuffle(shuffled)
        assert graph(spec, shuffled, seed=7, round_index=r) == adj
        # neighbours() agrees with graph(), with or without self in the member list.
        for me in members:
            others = [m for m in members if m != me]
            assert neighbours(spec, me, others, seed=7, round_index=r) == sorted(adj[me])
            assert neighbours(spec, me, members, seed=7, round_index=r) == sorted(adj[me])
        assert degrees(spec, members, seed=7, round_index=r) == {i: len(v) for i, v in adj.items()}
        assert_doubly_stochastic(adj)
        if not is_time_varying(spec):
            assert is_connected(adj)
    assert is_connected(union(per_round))


def ring_neighbours(self_id: str, members: list[str]) -> list[str]:
    """Reference: the ring as the daemon first defined it (predecessor and successor by sorted node id)."""
    ids = sorted(set(members) | {self_id})
    if len(ids) < 2:
        return []
    i = ids.index(self_id)
    return sorted({ids[(i - 1) % len(ids)], ids[(i + 1) % len(ids)]} - {self_id})


@pytest.mark.parametrize("n", range(1, 12))
def test_ring_matches_gossip_ring(n: int) -> None:
    spec = parse_topology("ring")
    members = ids(n)
    for me in [*members, "zz-outsider", "aa-outsider"]:
        assert neighbours(spec, me, members) == ring_neighbours(me, members)


def test_ring_small_cases() -> None:
    spec = parse_topology("ring")
    assert graph(spec, ["a"]) == {"a": frozenset()}
    assert graph(spec, ["b", "a"]) == {"a": frozenset({"b"}), "b": frozenset({"a"})}
    assert neighbours(spec, "a", []) == []


def test_full() -> None:
    adj = graph(parse_topology("full"), ids(6))
    assert all(len(v) == 5 for v in adj.values())


@pytest.mark.parametrize("n", range(1, 40))
def test_exponential_offsets(n: int) -> None:
    adj = graph(parse_topology("exponential"), ids(n))
    members = ids(n)
    for i, me in enumerate(members):
        expected = set()
        p = 1
        while p < n:
            expected |= {members[(i + p) % n], members[(i - p) % n]}
            p *= 2
        assert adj[me] == expected - {me}


def test_exponential_degree_for_power_of_two() -> None:
    # n = 8: offsets ±1, ±2, ±4 (+4 and −4 coincide) → degree 5.
    assert set(degrees(parse_topology("exponential"), ids(8)).values()) == {5}


@pytest.mark.parametrize("n", range(1, 40))
def test_one_peer_exponential_union_is_exponential(n: int) -> None:
    spec = parse_topology("one-peer-exponential")
    big_l = num_phases(n)
    expo = graph(parse_topology("exponential"), ids(n))
    for start in (0, 5, 1000):  # any window of L consecutive rounds
        rounds = [graph(spec, ids(n), round_index=r) for r in range(start, start + big_l)]
        assert union(rounds) == expo
        for g in rounds:
            assert all(len(v) <= 2 for v in g.values())
            assert len({len(v) for v in g.values()}) == 1  # circulant: every node has the same degree


def test_one_peer_exponential_changes_with_round_and_cycles() -> None:
    spec = parse_topology("one-peer-exponential")
    members = ids(8)  # L = 3: offsets 1, 2, 4
    assert num_phases(8) == 3
    g0, g1, g2, g3 = (graph(spec, members, round_index=r) for r in range(4))
    assert g0["node-00"] == {"node-01", "node-07"}
    assert g1["node-00"] == {"node-02", "node-06"}
    assert g2["node-00"] == {"node-04"}
    assert g3 == g0
    assert not is_connected(g2)  # a single round need not be connected; the union over L rounds is


def test_num_phases() -> None:
    assert [num_phases(n) for n in range(1, 10)] == [1, 1, 2, 2, 3, 3, 3, 3, 4]


def test_round_index_at() -> None:
    assert round_index_at(1_700_000_000.5, 2.0) == 850_000_000
    assert round_index_at(0.0, 1.0) == 0
    with pytest.raises(ValueError):
        round_index_at(1.0, 0.0)


# -- random-regular -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("n", [*range(1, 13), 20, 31, 50])
def test_random_regular_degrees(n: int, k: int) -> None:
    spec = TopologySpec("random-regular", k)
    members = ids(n)
    for seed in range(5):
        adj = graph(spec, members, seed=seed)
        seq = effective_degrees(n, k)
        assert [len(adj[m]) for m in members] == seq
        assert is_connected(adj)
        assert_doubly_stochastic(adj)


def test_effective_degrees_degrades_as_documented() -> None:
    assert effective_degrees(1, 3) == [0]
    assert effective_degrees(2, 3) == [1, 1]  # K >= n: complete graph
    assert effective_degrees(4, 9) == [3, 3, 3, 3]
    assert effective_degrees(5, 1) == [2] * 5  # K = 1 cannot be connected on 3+ nodes: raised to 2
    assert effective_degrees(5, 3) == [3, 3, 3, 3, 4]  # n·K odd: the last node gets K + 1
    assert effective_degrees(8, 3) == [3] * 8


def test_random_regular_exact_regular_when_possible() -> None:
    adj = graph(parse_topology("random-regular:4"), ids(30), seed=3)
    assert {len(v) for v in adj.values()} == {4}


def test_random_regular_deterministic_and_seed_sensitive() -> None:
    spec = parse_topology("random-regular:3")
    members = ids(16)
    graphs = {seed: graph(spec, members, seed=seed) for seed in range(8)}
    assert all(graph(spec, members, seed=s) == g for s, g in graphs.items())
    distinct = {frozenset((a, b) for a, v in g.items() for b in v) for g in graphs.values()}
    assert len(distinct) >= 7  # different seeds give different graphs (almost always)


def test_random_regular_changes_with_membership() -> None:
    spec = parse_topology("random-regular:3")
    before = graph(spec, ids(16), seed=1)
    after = graph(spec, [*ids(16), "node-99"], seed=1)
    assert {k: v for k, v in after.items() if k != "node-99"} != before


def test_random_regular_independent_of_global_random() -> None:
    spec = parse_topology("random-regular:3")
    random.seed(1)
    a = graph(spec, ids(12), seed=4)
    random.seed(2)
    b = graph(spec, ids(12), seed=4)
    assert a == b


def test_random_regular_raw_edges() -> None:
    edges = random_regular(10, 3, seed=123)
    assert len(edges) == 15
    assert all(a < b for a, b in edges)
    assert random_regular(10, 3, seed=123) == edges


def test_graph_of_nobody() -> None:
    for text in SPECS:
        assert graph(parse_topology(text), []) == {}
