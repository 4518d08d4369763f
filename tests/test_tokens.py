"""The P4 token protocol (spec §1.4 P4, §1.2 random-walk kernels): pure tests of `TokenWalk`, no network."""

from __future__ import annotations

import collections

import pytest
import torch

from peer.algorithms.base import NeighbourView, payload_floats
from peer.algorithms.tokens import Token, TokenWalk, stream_origins

P = 6


def _view(node: str, adj: dict[str, list[str]], members: frozenset[str] | None = None) -> NeighbourView:
    return NeighbourView(node, {j: len(adj[j]) for j in adj[node]}, frozenset(adj) if members is None else members)


LINE = {"a": ["b"], "b": ["a", "c"], "c": ["b"]}


def _walks(walk: str = "uniform", regen_s: float = 1.0) -> dict[str, TokenWalk]:
    return {i: TokenWalk(i, walk, retransmit_s=0.5, regen_s=regen_s) for i in LINE}  # type: ignore[arg-type]


def test_token_payload_round_trip_and_size() -> None:
    t = Token(3, 7, {"params": torch.arange(P, dtype=torch.float32)}, n=8, regenerated=1)
    p = t.payload()
    assert (p.kind, p.round, p.scalars["stream"], p.scalars["hop"], p.scalars["n"]) == ("token", 7, 3.0, 7.0, 8.0)
    assert payload_floats(p) == P  # one model per hop
    back = Token.from_payload(p)
    assert back is not None and (back.stream, back.hop, back.n, back.regenerated) == (3, 7, 8, 1)
    assert torch.equal(back.tensors["params"], t.tensors["params"])
    assert back.tensors["params"] is not t.tensors["params"]  # the receiver never aliases the sender's copy


def test_retransmit_until_ack_and_deduplicate_by_stream_and_hop() -> None:
    w = _walks()
    w["a"].create(0, {"params": torch.zeros(P)}, 3)
    assert w["a"].forward(0, _view("a", LINE)) == "b"
    first = w["a"].due(0.0)
    assert [(s.to, s.key) for s in first] == [("b", (0, 1))]
    assert w["a"].due(0.2) == []  # not due yet
    assert [s.key for s in w["a"].due(0.5)] == [(0, 1)]  # retransmitted after retransmit_s
    assert w["a"].retransmissions == 1
    assert w["b"].receive(first[0].payload) is not None
    assert w["b"].receive(first[0].payload) is None  # the retransmitted copy: same (stream, hop)
    assert w["b"].duplicates == 1 and w["b"].accepted == 1
    w["a"].ack("b", (0, 0))  # an ACK for another hop does not release the copy
    w["a"].ack("c", (0, 1))  # … nor one from another node
    assert w["a"].holds(0)
    w["a"].ack("b", (0, 1))
    assert not w["a"].holds(0) and w["a"].due(9.0) == []
    assert w["b"].holds(0)


def test_stale_lower_hop_is_rejected_and_higher_hop_is_an_implicit_ack() -> None:
    w = _walks()
    w["a"].create(0, {"params": torch.zeros(P)}, 3)
    w["a"].forward(0, _view("a", LINE))
    to_b = w["a"].due(0.0)[0].payload
    w["b"].receive(to_b)
    assert w["b"].forward(0, _view("b", LINE)) in ("a", "c")
    hop2 = w["b"].due(0.0)[0].payload
    # The ACK of hop 1 was lost: `a` still has its copy, and the stream comes back to it with hop 2.
    token = w["a"].receive(hop2)
    assert token is not None and token.hop == 2
    assert w["a"].implicit_acks == 1 and 0 not in w["a"].inflight and 0 in w["a"].held
    assert w["a"].receive(to_b) is None  # an old hop of the stream is never accepted again


def test_forget_never_redraws_while_destination_is_a_member() -> None:
    w = _walks(regen_s=1.0)
    w["b"].create(0, {"params": torch.ones(P)}, 3)
    w["b"].rng.seed(0)
    to = w["b"].forward(0, _view("b", LINE))
    assert to is not None
    w["b"].forget(to)
    # Still a member (only its ACK may be lost): keep retransmitting to it, however long it takes.
    assert w["b"].regenerate(_view("b", LINE), 0.0) == []
    assert w["b"].regenerate(_view("b", LINE), 100.0) == []
    assert w["b"].inflight[0].to == to
    # It left the membership: after regen_s the last holder takes its copy back, flagged, and re-draws.
    other = "a" if to == "c" else "c"
    left = {"b": [other], other: ["b"]}
    view = _view("b", left, members=frozenset(left))
    assert w["b"].regenerate(view, 200.0) == []  # the grace period starts
    assert w["b"].regenerate(view, 200.5) == []
    assert w["b"].regenerate(view, 201.0) == [0]
    assert w["b"].held[0].regenerated == 1 and w["b"].regenerations == 1
    assert w["b"].forward(0, view) == other
    assert w["b"].due(201.0)[0].payload.scalars["regenerated"] == 1.0


def test_ack_during_grace_period_cancels_regeneration() -> None:
    w = _walks(regen_s=1.0)
    w["a"].create(0, {"params": torch.zeros(P)}, 3)
    w["a"].forward(0, _view("a", LINE))
    w["a"].forget("b")
    alone = NeighbourView("a", {}, frozenset({"a", "c"}))
    assert w["a"].regenerate(alone, 0.0) == []
    w["a"].ack("b", (0, 1))
    assert w["a"].regenerate(alone, 5.0) == [] and not w["a"].holds(0)


def test_zero_neighbours_keep_the_token() -> None:
    w = TokenWalk("solo")
    w.create(0, {"params": torch.zeros(P)}, 1)
    alone = NeighbourView("solo", {}, frozenset({"solo"}))
    for walk in ("uniform", "lazy_mh", "cycle"):
        w.walk = walk  # type: ignore[assignment]
        assert w.next_hop(alone) is None
        assert w.forward(0, alone) is None
    assert w.held[0].hop == 0 and w.due(0.0) == []


def test_regenerated_token_with_no_neighbour_left_is_kept() -> None:
    w = _walks(regen_s=0.0)
    w["a"].create(0, {"params": torch.zeros(P)}, 3)
    w["a"].forward(0, _view("a", LINE))
    w["a"].forget("b")
    alone = NeighbourView("a", {}, frozenset({"a"}))
    assert w["a"].regenerate(alone, 0.0) == [0]
    assert w["a"].forward(0, alone) is None and w["a"].holds(0)


def _stationary(adj: dict[str, list[str]], walk: str, steps: int) -> dict[str, float]:
    walks = {i: TokenWalk(i, walk, seed=1) for i in adj}  # type: ignore[arg-type]
    views = {i: _view(i, adj) for i in adj}
    at, visits = sorted(adj)[0], collections.Counter[str]()
    for _ in range(steps):
        visits[at] += 1
        at = walks[at].next_hop(views[at]) or at
    return {i: visits[i] / steps for i in adj}


def test_walk_kernels_have_the_stated_stationary_laws() -> None:
    """Simple walk: visits ∝ degree. Lazy Metropolis–Hastings: uniform visits (spec §1.2)."""
    adj = {"a": ["b", "c", "d", "e"], "b": ["a", "c"], "c": ["a", "b"], "d": ["a"], "e": ["a"]}
    total_degree = sum(len(v) for v in adj.values())
    simple = _stationary(adj, "uniform", 40_000)
    for i, f in simple.items():
        assert f == pytest.approx(len(adj[i]) / total_degree, abs=0.015)
    lazy = _stationary(adj, "lazy_mh", 40_000)
    for f in lazy.values():
        assert f == pytest.approx(1 / len(adj), abs=0.015)
    leaf = TokenWalk("d", "lazy_mh")
    draws = collections.Counter(leaf.next_hop(_view("d", adj)) for _ in range(4000))
    assert set(draws) == {"a", None}  # a proposal to a is accepted with d_d / d_a = 1/4, else the token stays
    assert draws[None] / 4000 == pytest.approx(3 / 4, abs=0.03) and leaf.stays == draws[None]


def test_cycle_follows_sorted_members_through_neighbours() -> None:
    adj = {"n0": ["n1", "n3"], "n1": ["n0", "n2"], "n2": ["n1", "n3"], "n3": ["n2", "n0"]}
    hops = ["n0"]
    walks = {i: TokenWalk(i, "cycle") for i in adj}
    for _ in range(8):
        nxt = walks[hops[-1]].next_hop(_view(hops[-1], adj))
        assert nxt is not None
        hops.append(nxt)
    assert hops == ["n0", "n1", "n2", "n3"] * 2 + ["n0"]
    # When the next member is not a neighbour, the first later member that is one is taken.
    assert TokenWalk("n0", "cycle").next_hop(_view("n0", {"n0": ["n2"], "n1": [], "n2": ["n0"]})) == "n2"


def test_stream_origins() -> None:
    assert stream_origins(3, ["c", "a", "b", "d"], []) == ["a", "b", "c"]
    assert stream_origins(3, ["b", "a"], []) == ["a", "b", "a"]  # more streams than members: wrap around
    assert stream_origins(2, ["a", "b"], ["z"]) == ["z", "z"]  # the configured list wins
    assert stream_origins(2, [], []) == []  # nothing to agree on yet


def test_state_dict_round_trip() -> None:
    w = _walks()
    w["a"].create(0, {"params": torch.full((P,), 2.0)}, 3)
    w["a"].create(1, {"params": torch.full((P,), 3.0)}, 3)
    w["a"].forward(1, _view("a", LINE))
    w["a"].due(0.0)
    restored = TokenWalk("a")
    restored.load_state_dict(w["a"].state_dict())
    assert restored.seen == {0: 0, 1: 1}
    assert torch.equal(restored.held[0].tensors["params"], torch.full((P,), 2.0))
    assert restored.inflight[1].to == "b" and restored.inflight[1].token.hop == 1
    assert [s.key for s in restored.due(0.0)] == [(1, 1)]  # re-sent at once after a restart


def test_the_token_retransmission_timeout_follows_the_round_trip() -> None:
    """A lost token on a fast link is re-sent after a few round trips, not after the configured maximum."""
    from peer.algorithms.tokens import TokenWalk

    a = TokenWalk("a", retransmit_s=0.5)
    view = NeighbourView("a", {"b": 1}, frozenset({"a", "b"}))
    a.create(0, {"params": torch.zeros(3)}, 2)
    a.forward(0, view)
    (first,) = a.due(0.0)
    a.ack("b", first.key, now=0.004)  # a 4 ms round trip
    assert abs(a.timer.timeout_s - 0.012) < 1e-9
    a.create(1, {"params": torch.zeros(3)}, 2)
    a.forward(1, view)
    a.due(1.0)
    assert a.due(1.011) == [] and len(a.due(1.013)) == 1 and a.retransmissions == 1
