"""The peer table and backoff without sockets: topology, membership, backoff, circuit breaker, send decisions.

The event-driven core above the table (`GossipCore.handle`) is tested in test_core_events.py."""

from __future__ import annotations

import random

import pytest

from peer.core.backoff import BreakerPolicy, CircuitBreaker, retry_delay, should_retry
from peer.core.peers import PeerTable
from peer.core.topology import topology_neighbours
from peer.errors import UnknownNameError


def ring_neighbours(self_id: str, members: list[str]) -> list[str]:
    return topology_neighbours("ring", self_id, members)


def test_ring_is_by_sorted_node_id_and_same_everywhere() -> None:
    ids = ["d", "b", "a", "c"]
    assert ring_neighbours("a", ids) == ["b", "d"]
    assert ring_neighbours("c", ids) == ["b", "d"]
    # Every node computes the same undirected graph from the same view.
    edges = {(i, j) for i in ids for j in ring_neighbours(i, ids)}
    assert all((j, i) in edges for i, j in edges)
    assert ring_neighbours("a", ["a", "b"]) == ["b"]
    assert ring_neighbours("a", ["a"]) == []


def test_full_topology() -> None:
    assert topology_neighbours("full", "b", ["a", "b", "c"]) == ["a", "c"]
    with pytest.raises(UnknownNameError, match="unknown topology"):
        topology_neighbours("star", "a", ["a"])


def test_full_jitter_backoff_is_bounded_and_grows() -> None:
    rng = random.Random(1)
    for attempt in range(10):
        bound = min(20.0, 0.5 * 2**attempt)
        draws = [retry_delay(attempt, base_s=0.5, cap_s=20.0, rng=rng) for _ in range(200)]
        assert all(0.0 <= d <= bound for d in draws)
        assert max(draws) > 0.5 * bound  # full jitter spreads over the whole window


def test_retry_only_transient_codes_and_never_handshakes() -> None:
    assert should_retry("UNAVAILABLE", 0, max_attempts=3, idempotent=False)
    assert not should_retry("DEADLINE_EXCEEDED", 0, max_attempts=3, idempotent=False)
    assert should_retry("DEADLINE_EXCEEDED", 0, max_attempts=3, idempotent=True)
    for code in ("INVALID_ARGUMENT", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "UNKNOWN", "INTERNAL"):
        assert not should_retry(code, 0, max_attempts=3, idempotent=True)
    assert not should_retry("UNAVAILABLE", 2, max_attempts=3, idempotent=True)  # third try was the last
    assert not should_retry("UNAVAILABLE", 0, max_attempts=3, idempotent=True, details="SSL handshake failed")


def test_circuit_breaker_opens_grows_and_resets_on_success() -> None:
    rng = random.Random(0)
    br = CircuitBreaker(BreakerPolicy(threshold=3, base_s=1.0, cap_s=8.0))
    assert br.record_failure(0.0, rng) == 0.0 and br.allows(0.0)
    assert br.record_failure(0.0, rng) == 0.0 and br.allows(0.0)
    windows = []
    now = 0.0
    for _ in range(6):
        skip = br.record_failure(now, rng)
        assert skip > 0 and not br.allows(now) and br.is_open(now)
        windows.append(skip)
        now += skip
        assert br.allows(now)  # half-open: one probe goes through
    # The interval grows (each window is at least half its nominal size) up to the cap.
    assert windows[0] <= 1.0 and windows[3] >= 4.0 and max(windows) <= 8.0
    br.record_success()
    assert br.failures == 0 and br.allows(now) and br.record_failure(now, rng) == 0.0


def _core(topology: str = "ring") -> PeerTable:
    return PeerTable("b", topology, BreakerPolicy(threshold=2, base_s=1.0, cap_s=4.0))


def test_membership_drives_neighbours_and_view_degrees() -> None:
    core = _core()
    assert core.peer_up("a", "h:1", degree=1, incarnation=1, now=0.0).new
    assert core.neighbours() == ["a"]
    core.peer_up("c", "h:3", degree=2, incarnation=1, now=0.0)
    core.peer_up("d", "h:4", degree=2, incarnation=1, now=0.0)
    assert core.neighbours() == ["a", "c"]  # ring a-b-c-d
    assert dict(core.view().degrees) == {"a": 1, "c": 2}
    core.heard_from("a", 2, now=1.0)
    assert core.view().degrees["a"] == 2
    assert core.peer_gone("c") is not None
    assert core.neighbours() == ["a", "d"]
    assert not core.peer_up("b", "h:2", 2, 1, 0.0).new  # ourselves: ignored


def test_restart_is_recognised_and_resets_send_state() -> None:
    core = _core()
    core.peer_up("a", "h:1", 1, incarnation=10, now=0.0)
    core.send_ok("a", seq=7, now=0.1)
    rng = random.Random(0)
    core.send_failed("a", "UNAVAILABLE", 1.0, rng)
    upd = core.peer_up("a", "h:9", 1, incarnation=11, now=2.0)
    assert upd.restarted and upd.redial and not upd.new
    rec = core.peers["a"]
    assert rec.address == "h:9" and rec.last_sent_seq == 0 and rec.breaker.failures == 0
    same = core.peer_up("a", "h:9", 1, incarnation=11, now=3.0)
    assert not same.restarted and not same.redial


def test_sends_due_skips_sent_in_flight_and_open_breakers() -> None:
    rng = random.Random(0)
    core = _core("full")
    for n in ("a", "c", "d"):
        core.peer_up(n, f"h:{n}", 3, 1, 0.0)
    assert core.sends_due(0.0, seq=1) == ["a", "c", "d"]
    core.send_ok("a", 1, 0.0)
    assert core.sends_due(0.0, seq=1, in_flight={"c"}) == ["d"]
    assert core.send_failed("d", "UNAVAILABLE", 0.0, rng) == 0.0
    skip = core.send_failed("d", "UNAVAILABLE", 0.0, rng)
    assert skip > 0 and core.state_of("d", 0.0) == "backoff"
    assert core.sends_due(0.0, seq=2) == ["a", "c"]  # d is skipped, nobody waits for it
    assert core.breaker_deadline(0.0) == pytest.approx(skip)
    assert "d" in core.sends_due(skip, seq=2)
    core.send_ok("d", 2, skip)
    assert core.state_of("d", skip) == "alive"
