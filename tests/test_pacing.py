"""The pacing bound (peer.core.pacing): local steps since fresh state was last merged from each awaited
neighbour, with deadlines for late neighbours and no waiting for much slower ones. Pure: `now` is an argument."""

from __future__ import annotations

import pytest

from peer.core.pacing import Pacer, PacingSettings

AB = ("a", "b")


def pacer(max_steps: int = 1, **kw: float) -> Pacer:
    return Pacer(PacingSettings(max_steps=max_steps, **kw))


def test_a_peer_steps_freely_up_to_the_bound_then_waits() -> None:
    p = pacer(max_steps=3)
    assert all(p.decide(step, 0.0, AB).go for step in range(3))
    d = p.decide(3, 0.0, AB)
    assert not d.go and d.wait_s == pytest.approx(p.s.max_wait_s)


def test_it_waits_for_every_awaited_neighbour() -> None:
    p = pacer(max_steps=2)
    p.took_in("a", None, 2, 0.1)
    assert not p.decide(2, 0.1, AB).go  # b's state is still two steps old
    p.took_in("b", None, 2, 0.2)
    assert p.decide(2, 0.2, AB).go and p.decide(3, 0.2, AB).go
    assert not p.decide(4, 0.2, AB).go
    assert p.waits == 2 and p.wait_s_total == pytest.approx(0.1)


def test_no_neighbours_or_bound_zero_never_waits() -> None:
    assert pacer(max_steps=1).decide(100, 0.0, ()).go
    assert pacer(max_steps=0).decide(100, 0.0, AB).go


def test_the_deadline_follows_the_observed_gap_between_fresh_messages() -> None:
    p = pacer(max_steps=1, min_wait_s=0.01, max_wait_s=5.0, wait_factor=4.0)
    for i in range(50):  # a message every 20 ms
        p.took_in("a", None, 0, 0.02 * i)
    assert p.deadline_s() == pytest.approx(0.08, rel=1e-6)
    d = p.decide(1, 1.0, ("a",))
    assert not d.go and d.wait_s == pytest.approx(0.08, rel=1e-6)
    assert pacer(min_wait_s=0.5, max_wait_s=5.0).deadline_s() == 5.0  # nothing observed yet: the longest
    fast = pacer(min_wait_s=0.5, max_wait_s=5.0)
    fast.took_in("a", None, 0, 0.0)
    fast.took_in("a", None, 0, 0.001)
    assert fast.deadline_s() == 0.5


def test_a_late_neighbour_costs_one_deadline_until_it_is_heard_again() -> None:
    """A cut link or a dead neighbour: one bounded wait, then training goes on without waiting for it."""
    p = pacer(max_steps=1, max_wait_s=1.0)
    p.took_in("a", None, 0, 9.0)
    assert not p.decide(1, 10.0, ("a",)).go
    assert not p.decide(1, 10.9, ("a",)).go
    assert p.decide(1, 11.0, ("a",)).go  # deadline missed: a is late
    assert p.missed_deadlines == 1
    assert all(p.decide(step, 11.0 + step, ("a",)).go for step in range(2, 50))
    p.took_in("a", None, 49, 60.0)  # a is back
    assert p.decide(49, 60.0, ("a",)).go
    assert not p.decide(50, 60.0, ("a",)).go  # the bound applies to it again


def test_a_much_slower_neighbour_is_merged_but_not_awaited() -> None:
    """A straggler stepping at a quarter of our compute rate never holds us up; a peer at our pace does."""
    p = pacer(max_steps=1)
    t, step, blocked = 0.0, 0, []
    for k in range(1, 161):  # we step every 10 ms; a every 10 ms, s (the straggler) every 40 ms
        t = k * 0.01
        p.took_in("a", 100.0, step, t)  # a computes as fast as we do
        if k % 4 == 0:
            p.took_in("s", 25.0, step, t)  # s says it computes 4x slower
        if p.decide(step, t, ("a", "s")).go:
            step += 1
        else:
            blocked.append(k)
    # Until our own rate is known (RATE_WINDOW_S of busy time, at s's pace while we wait for it) s is awaited;
    # after that it never holds us up.
    assert blocked and max(blocked) <= 110
    assert p.own_rate == pytest.approx(100, rel=0.05)
    assert p.awaited(("a", "s")) == ["a"]
    assert not p.decide(step + 1, t, ("a", "s")).go  # a is still awaited


def test_a_restart_counts_from_the_restored_step() -> None:
    p = pacer(max_steps=2)
    p.restart_at(500)
    assert p.decide(500, 0.0, AB).go and p.decide(501, 0.0, AB).go
    assert not p.decide(502, 0.0, AB).go
