"""The pacing bound (peer.core.pacing): local steps since fresh state was last merged from each awaited
neighbour, with deadlines for late neighbours and no waiting for much slower ones. Pure: `now` is an argument."""

from __future__ import annotations

import pytest

from peer.core.pacing import HELD_LEAD, Pacer, PacingSettings, PooledPacer

AB = ("a", "b")


def pacer(max_steps: int = 1, **kw: float) -> Pacer:
    kw.setdefault("start_wait_s", kw.get("max_wait_s", PacingSettings(max_steps=1).max_wait_s))
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


def run_with_straggler(p: Pacer, slowdown: int, steps: int) -> tuple[int, list[int]]:
    """We step every 10 ms when allowed; a sends every 10 ms, s (the straggler) every `slowdown` * 10 ms, and
    each says its compute rate. Returns our step count and the ticks at which we were held up."""
    step, blocked = 0, []
    for k in range(1, steps + 1):
        t = k * 0.01
        p.took_in("a", 100.0, step, t)  # a computes as fast as we do
        if k % slowdown == 0:
            p.took_in("s", 100.0 / slowdown, step, t)
        if p.decide(step, t, ("a", "s")).go:
            step += 1
        else:
            blocked.append(k)
    return step, blocked


def test_a_slower_neighbour_is_waited_for_in_its_own_steps() -> None:
    """A straggler stepping at a quarter of our compute rate is still awaited, but with an allowance of its own
    step time: it never holds us up, and we never run more than a few of our steps past its last state."""
    p = pacer(max_steps=1)
    step, blocked = run_with_straggler(p, 4, 400)
    # Until our own rate is known (RATE_WINDOW_S of busy time, 50 steps at s's pace while we wait for it) s
    # holds us to one step per state; after that it never holds us up.
    assert blocked and max(blocked) <= 220
    assert step >= 50 + 170
    assert p.own_rate == pytest.approx(100, rel=0.05)
    assert p.awaited(("a", "s")) == ["a", "s"]
    assert p.allowance("a") == 1 and p.allowance("s") == 5  # ceil(4 * RATE_HEADROOM)
    s_merged = p.neighbours["s"].merged_at
    p.took_in("a", 100.0, s_merged + 5, 5.0)
    assert p.decide(s_merged + 4, 5.0, ("a", "s")).go
    assert not p.decide(s_merged + 5, 5.0, ("a", "s")).go  # five of our steps past s's last state: wait for s


def test_a_neighbour_measured_somewhat_slower_still_bounds_the_drift() -> None:
    """Equal peers sharing cores measure rates two- to four-fold apart; none may then run away from another."""
    p = pacer(max_steps=1)
    for k in range(100):
        p.decide(k, k * 0.01, ())  # we compute 100 steps/s
    p.took_in("b", 40.0, 100, 1.0)  # b says 40 steps/s: 2.5x slower
    assert p.allowance("b") == 4  # ceil(2.5 * 1.25)
    assert all(p.decide(step, 1.0, ("b",)).go for step in range(100, 104))
    assert not p.decide(104, 1.0, ("b",)).go


def test_a_far_slower_neighbour_is_merged_but_not_awaited() -> None:
    p = pacer(max_steps=1)
    step, blocked = run_with_straggler(p, 20, 400)
    assert p.own_rate == pytest.approx(100, rel=0.05)
    assert p.awaited(("a", "s")) == ["a"]  # below slow_fraction (0.1) of our rate
    # Its first states cost a few waits (until it is seen stepping: the start-up wait), then none.
    assert step >= 350 and max(blocked) <= 100


def test_a_restart_counts_from_the_restored_step() -> None:
    p = pacer(max_steps=2)
    p.restart_at(500)
    assert p.decide(500, 0.0, AB).go and p.decide(501, 0.0, AB).go
    assert not p.decide(502, 0.0, AB).go


def test_an_echo_without_a_step_is_merged_but_not_progress() -> None:
    """A waiting neighbour mixes what it receives and publishes it at the same step: that must not release us,
    or two peers ping-pong each other forward while the third falls behind."""
    p = pacer(max_steps=1)
    p.took_in("a", None, 0, 0.0, sender_step=7)
    assert p.decide(0, 0.0, ("a",)).go
    assert not p.decide(1, 0.01, ("a",)).go
    p.took_in("a", None, 1, 0.02, sender_step=7)  # a mixed our state and echoed it, still at its step 7
    assert not p.decide(1, 0.02, ("a",)).go
    p.took_in("a", None, 1, 0.03, sender_step=8)  # a stepped
    assert p.decide(1, 0.03, ("a",)).go
    p.took_in("a", None, 2, 0.04, sender_step=3)  # a restarted from an older checkpoint: a different step is progress
    assert p.decide(2, 0.04, ("a",)).go


def test_a_late_neighbour_that_was_itself_waiting_is_awaited_again_when_heard() -> None:
    """It missed our deadline because it waited for its own neighbour: its next state, even one without a step,
    shows it is alive, so it bounds us again instead of letting us run away from it."""
    p = pacer(max_steps=1, max_wait_s=0.1)
    p.took_in("a", None, 0, 0.0, sender_step=5)
    assert p.decide(0, 0.0, ("a",)).go
    assert not p.decide(1, 0.05, ("a",)).go
    assert p.decide(1, 0.2, ("a",)).go  # deadline missed: a is late, we step on
    assert p.decide(2, 0.2, ("a",)).go
    p.took_in("a", None, 3, 0.6, sender_step=5)  # a publishes while it waits (same step)
    assert not p.decide(3, 0.6, ("a",)).go  # awaited again: we wait for its step
    p.took_in("a", None, 3, 0.65, sender_step=6)
    assert p.decide(3, 0.65, ("a",)).go


def test_a_neighbour_held_far_behind_us_is_waited_for_not_marked_late() -> None:
    """It waits for a neighbour of its own (a cut link) and sends its state again meanwhile, without stepping. The
    old rule marked it late after the short deadline, each resend made it awaited for one more short deadline, and a
    demo peer ran 700 steps alone while its three neighbours waited (63% instead of 95%). Now a held neighbour is
    late as before while we lead it by less than HELD_LEAD allowances, and awaited beyond that until it steps, falls
    silent for max_wait_s, or start_wait_s passes."""
    p = budget_pacer(100, min_wait_s=0.05, max_wait_s=1.0, start_wait_s=10.0)
    for k in range(4):  # it stepped every 10 ms: a short usual deadline
        p.took_in("a", None, k, 0.01 * k, sender_step=k, sender_budget=100, sender_progress=k)
    assert p.deadline_s() == pytest.approx(0.05)
    step, t = 4, 0.03
    while t < 5.0:  # now held itself: its resends, every 0.1 s, repeat its step 3
        t += 0.1
        p.took_in("a", None, step, t, sender_step=3, sender_budget=100, sender_progress=3)
        for _ in range(20):  # a few decisions between resends, as the training thread asks
            d = p.decide(step, t, ("a",))
            if not d.go:
                break
            step += 1
        t += 0.06
        if p.decide(step, t, ("a",)).go:
            step += 1
    assert step == 3 + HELD_LEAD  # it ran ahead up to the lead, then waited
    assert p.awaited(("a",)) == ["a"]
    p.took_in("a", None, step, t + 0.05, sender_step=4, sender_budget=100, sender_progress=4)  # it stepped
    assert p.decide(step, t + 0.05, ("a",)).go
    # Held again, then silent (the link went down): late one max_wait_s after its last resend.
    step += 1
    p.took_in("a", None, step, t + 0.1, sender_step=4, sender_budget=100, sender_progress=4)
    assert not p.decide(step, t + 0.1, ("a",)).go
    assert not p.decide(step, t + 1.05, ("a",)).go
    assert p.decide(step, t + 1.15, ("a",)).go and p.awaited(("a",)) == []
    # Held without end (it keeps sending, never steps): start_wait_s, then late.
    q = budget_pacer(100, min_wait_s=0.05, max_wait_s=1.0, start_wait_s=10.0)
    q.took_in("a", None, 0, 0.0, sender_step=0, sender_budget=100, sender_progress=0)
    q.took_in("a", None, 0, 0.01, sender_step=1, sender_budget=100, sender_progress=1)
    q.restart_at(20)
    t, went = 0.01, None
    while went is None and t < 20:
        t += 0.1
        q.took_in("a", None, 20, t, sender_step=1, sender_budget=100, sender_progress=1)
        went = t if q.decide(21, t, ("a",)).go else None
    assert went is not None and 10.1 <= went <= 10.3  # its wait began at 0.11


def test_without_progress_counts_a_held_neighbour_is_late_after_the_deadline() -> None:
    """finish_together off: we cannot tell that the neighbour knows we are ahead (it could be waiting for us), so
    the deadline marks it late as always."""
    p = pacer(max_steps=1, min_wait_s=0.05, max_wait_s=1.0, start_wait_s=10.0)
    p.took_in("a", None, 0, 0.0, sender_step=0)
    p.took_in("a", None, 0, 0.01, sender_step=1)
    p.restart_at(10)
    p.took_in("a", None, 10, 0.02, sender_step=1)
    assert p.decide(10, 0.02, ("a",)).go
    assert not p.decide(11, 0.02, ("a",)).go
    assert p.decide(11, 0.1, ("a",)).go and p.missed_deadlines == 1


def test_a_neighbour_not_yet_seen_stepping_is_waited_for_as_long_as_a_start_up_takes() -> None:
    """Its first states come in a burst while it waits for its own members: the short deadline learned from that
    burst must not mark it late, or we train alone to the end while it starts."""
    p = pacer(max_steps=1, max_wait_s=2.0, start_wait_s=30.0)
    for k in range(5):  # a burst of its first state (step 0), 10 ms apart
        p.took_in("a", None, 0, 0.01 * k, sender_step=0)
    assert p.deadline_s() <= 2.0
    assert p.decide(0, 0.05, ("a",)).go
    d = p.decide(1, 0.06, ("a",))
    assert not d.go and d.wait_s == pytest.approx(30.0)
    assert not p.decide(1, 20.0, ("a",)).go
    p.took_in("a", None, 1, 25.0, sender_step=1)  # it started
    assert p.decide(1, 25.0, ("a",)).go
    assert not p.decide(2, 25.0, ("a",)).go
    assert p.decide(2, 27.1, ("a",)).go  # seen stepping now: the usual deadline (at most max_wait_s)
    assert p.missed_deadlines == 1


def test_a_neighbour_that_says_it_took_steps_has_started_even_if_seen_at_one_step_only() -> None:
    """The start-up wait is for neighbours that have not begun their run (progress 0). One at step 1 that waits for
    a cut link of its own gets the usual deadline: the start-up wait froze four lossy demo peers for 10 to 30 s."""
    starting, started = (
        budget_pacer(100, max_wait_s=2.0, start_wait_s=30.0),
        budget_pacer(100, max_wait_s=2.0, start_wait_s=30.0),
    )
    for p, progress in ((starting, 0), (started, 1)):
        p.took_in("a", None, 0, 0.0, sender_step=progress, sender_budget=100, sender_progress=progress)
        assert p.decide(0, 0.0, ("a",)).go
    assert starting.decide(1, 0.0, ("a",)).wait_s == pytest.approx(30.0)
    assert started.decide(1, 0.0, ("a",)).wait_s == pytest.approx(2.0)


def test_once_a_neighbour_has_started_one_never_heard_from_gets_the_usual_deadline() -> None:
    """A neighbour behind a cut link at start-up is never heard from: with another neighbour already stepping it is
    more likely cut off than starting, and a 30 s start-up wait for it kept a lossy demo peer from training on its
    own data for 20 s (76%). Alone (no neighbour started yet), the start-up wait stands."""
    p = budget_pacer(100, max_wait_s=2.0, start_wait_s=30.0)
    p.took_in("a", None, 0, 0.0, sender_step=5, sender_budget=100, sender_progress=5)
    assert p.decide(0, 0.0, AB).go
    assert p.decide(1, 0.0, AB).wait_s == pytest.approx(2.0)  # b: never heard from
    assert p.decide(1, 2.0, AB).go and p.awaited(AB) == ["a"]
    alone = budget_pacer(100, max_wait_s=2.0, start_wait_s=30.0)
    assert alone.decide(0, 0.0, AB).go
    assert alone.decide(1, 0.0, AB).wait_s == pytest.approx(30.0)


def test_a_neighbour_that_finished_training_is_mixed_but_never_awaited() -> None:
    p = pacer(max_steps=2)
    p.took_in("a", None, 0, 0.0, sender_step=10)
    p.took_in("b", None, 0, 0.0, sender_step=10)
    assert p.decide(1, 0.0, AB).go
    # b is done: its idle consensus rounds repeat step 10, which is never fresh, yet we do not wait for it.
    p.took_in("b", None, 1, 0.1, sender_step=10, sender_done=True)
    p.took_in("a", None, 2, 0.1, sender_step=11)
    assert p.awaited(AB) == ["a"]
    assert p.decide(2, 0.1, AB).go and p.decide(3, 0.1, AB).go
    assert not p.decide(4, 0.1, AB).go  # a still bounds us
    # Restarted with a larger budget, b trains again and is awaited again.
    p.took_in("b", None, 4, 0.2, sender_step=11)
    assert p.awaited(AB) == ["a", "b"]


def budget_pacer(budget: int, max_steps: int = 1, **kw: float) -> Pacer:
    kw.setdefault("start_wait_s", kw.get("max_wait_s", PacingSettings(max_steps=1).max_wait_s))
    return Pacer(PacingSettings(max_steps=max_steps, budget=budget, **kw))


def test_a_peer_with_less_data_spreads_its_steps_over_its_larger_neighbours_run() -> None:
    """finish_together: budget 10 against a neighbour's 300 -> one of our steps per 30 of its, never ahead."""
    p = budget_pacer(10, max_wait_s=1.0)
    taken, t = [], 0.0
    for their_step in range(1, 300):
        t += 0.01
        p.took_in("big", None, len(taken), t, sender_step=their_step, sender_budget=300, sender_progress=their_step)
        d = p.decide(len(taken), t, ("big",))
        if d.go:
            taken.append(their_step)
        else:
            assert d.idle and 0 < d.wait_s <= 1.0 + 1e-9
    assert taken == [29 + 30 * k for k in range(10)][: len(taken)] and len(taken) == 10
    assert p.idle_turns == 10 and p.idle_s_total > 0
    assert p.waits == 0  # idle turns are not waits for fresh state


def test_the_larger_peer_leads_by_at_most_one_step_of_the_smaller_one() -> None:
    p = budget_pacer(300)
    p.took_in("small", None, 0, 0.0, sender_step=0, sender_budget=10, sender_progress=0)
    assert p.allowance("small") == 30  # 300/10: budgets are exact, no headroom
    assert all(p.decide(step, 0.001 * step, ("small",)).go for step in range(30))
    assert not p.decide(30, 0.04, ("small",)).go  # still bounded: a fresh state every ~30 of our steps


def test_equal_or_nearly_equal_budgets_never_idle() -> None:
    for theirs in (100, 105, 90, 10):
        p = budget_pacer(100, max_steps=2)
        p.took_in("a", None, 0, 0.0, sender_step=0, sender_budget=theirs, sender_progress=0)
        assert p.decide(1, 0.0, ("a",)).go, theirs
        assert p.idle_turns == 0


def test_a_larger_neighbour_that_falls_silent_holds_us_the_longest_wait_then_is_late() -> None:
    p = budget_pacer(10, max_wait_s=1.0)
    p.took_in("big", None, 0, 5.0, sender_step=3, sender_budget=300, sender_progress=3)
    d = p.decide(0, 5.5, ("big",))
    assert d.idle and d.wait_s == pytest.approx(0.5)
    assert p.decide(0, 6.0, ("big",)).go and p.missed_deadlines == 1
    assert p.awaited(("big",)) == []  # late until heard from again
    p.took_in("big", None, 1, 6.5, sender_step=4, sender_budget=300, sender_progress=4)
    assert p.decide(1, 6.5, ("big",)).idle


def test_no_own_budget_or_a_hostile_budget_turns_the_rule_off() -> None:
    off = Pacer(PacingSettings(max_steps=1, start_wait_s=2.0))  # the library API: no budget of ours
    off.took_in("big", None, 0, 0.0, sender_step=0, sender_budget=300, sender_progress=0)
    assert off.decide(0, 0.0, ("big",)).go
    for bad in (float("nan"), float("inf"), -5.0, 0.0, 2.0**50):
        p = budget_pacer(10)
        p.took_in("big", None, 0, 0.0, sender_step=0, sender_budget=bad, sender_progress=0)
        assert p.decide(0, 0.0, ("big",)).go, bad
        assert p.allowance("big") == 1


def test_idle_turns_do_not_count_as_compute_time() -> None:
    p = budget_pacer(10)
    t = 0.0
    for step in range(1, 200):  # one step per 10 ms of compute, then 90 ms idle behind a 10x larger neighbour
        p.took_in("big", None, step - 1, t, sender_step=10 * step - 5, sender_budget=100, sender_progress=10 * step - 5)
        assert p.decide(step - 1, t, ("big",)).idle or step == 1
        t += 0.09
        p.took_in("big", None, step - 1, t, sender_step=10 * step, sender_budget=100, sender_progress=10 * step)
        assert p.decide(step - 1, t, ("big",)).go
        t += 0.01
    assert p.own_rate == pytest.approx(100, rel=0.05)


def test_finish_together_also_paces_round_synchronous_algorithms_without_a_bound() -> None:
    p = budget_pacer(10, max_steps=0)
    p.took_in("big", None, 0, 0.0, sender_step=5, sender_budget=300, sender_progress=5)
    assert p.decide(0, 0.0, ("big",)).idle
    p.took_in("big", None, 0, 0.1, sender_step=29, sender_budget=300, sender_progress=29)
    assert p.decide(0, 0.1, ("big",)).go
    assert p.decide(1, 0.1, ("big",)).idle


def test_progress_comes_from_its_own_scalar_not_the_payload_step() -> None:
    """D-PSGD and CHOCO send their round (or nothing) as the payload's step; finish_together needs local steps."""
    p = budget_pacer(10, max_steps=0)
    p.took_in("big", None, 0, 0.0, sender_step=0, sender_budget=300, sender_progress=3)
    assert p.decide(0, 0.0, ("big",)).idle
    p.took_in("big", None, 0, 0.2, sender_step=0, sender_budget=300, sender_progress=40)
    assert p.decide(0, 0.2, ("big",)).go  # a moving progress count keeps the neighbour's deadline fresh too
    for bad in (float("nan"), -1.0, 2.0**60):
        q = budget_pacer(10)
        q.took_in("big", None, 0, 0.0, sender_step=0, sender_budget=300, sender_progress=bad)
        assert q.decide(0, 0.0, ("big",)).go, bad


def test_a_neighbour_ahead_of_us_in_its_run_is_not_waited_for_so_the_two_never_deadlock() -> None:
    """The larger peer takes idle turns once it is ahead in fractions; the smaller one must then step without a
    fresh state from it (the larger one waits for ours), or both would wait out a deadline."""
    small, big = budget_pacer(138), budget_pacer(270)
    small.took_in("big", None, 40, 0.0, sender_step=82, sender_budget=270, sender_progress=82)
    big.took_in("small", None, 82, 0.0, sender_step=40, sender_budget=138, sender_progress=40)
    assert big.decide(82, 0.0, ("small",)).idle  # 83/270 > 41/138: big would run ahead
    assert small.decide(41, 0.0, ("big",)).go  # no fresh state from big since step 40, but big is ahead of us
    d = small.decide(42, 0.0, ("big",))  # 42/138 > 82/270: we caught up, so its fresh state is due again
    assert not d.go and not d.idle


def test_coarse_and_fine_steps_do_not_hold_each_other() -> None:
    """The deadlock 8 demo peers on Dirichlet data hit: budget 180 at step 1 idled for budget 660 at step 5 (its
    next step, 2/180, passes 6/660), while the 660 peer waited for a fresh state from the 180 one (1/180 is behind
    5/660). Both rules compare positions after the next steps, so the 660 peer steps."""
    coarse, fine = budget_pacer(180), budget_pacer(660)
    coarse.took_in("fine", None, 1, 0.0, sender_step=5, sender_budget=660, sender_progress=5)
    fine.took_in("coarse", None, 1, 0.0, sender_step=1, sender_budget=180, sender_progress=1)
    assert fine.allowance("coarse") == 4  # so its fresh state is due at step 5
    assert coarse.decide(1, 0.0, ("fine",)).idle
    assert fine.decide(5, 0.0, ("coarse",)).go


def test_pooled_fresh_state_from_any_neighbour_counts_for_all() -> None:
    """A token algorithm hears from one neighbour at a time (whichever the walk came from). Waiting for each marked
    the others late at every deadline and the peers ran free (the digest demo at 53%); pooled, a token from any
    neighbour is fresh state, and the bound counts local steps since the last one."""
    p = PooledPacer(PacingSettings(max_steps=2, max_wait_s=1.0, start_wait_s=1.0))
    p.took_in("a", None, 0, 0.0)
    assert p.decide(0, 0.0, AB).go and p.decide(1, 0.0, AB).go
    assert not p.decide(2, 0.0, AB).go  # b never sent anything, and need not: a's token was fresh state
    p.took_in("b", None, 2, 0.01)
    assert p.decide(2, 0.01, AB).go and p.decide(3, 0.01, AB).go and not p.decide(4, 0.01, AB).go
    p.forget("a")  # a left; the walk goes on through b
    assert not p.decide(4, 0.02, AB).go
    assert p.decide(4, 5.0, ()).go  # nobody left to wait for
    per_neighbour = Pacer(PacingSettings(max_steps=2, max_wait_s=1.0, start_wait_s=1.0))
    per_neighbour.took_in("a", None, 0, 0.0)
    per_neighbour.took_in("a", None, 1, 0.01)
    assert not per_neighbour.decide(2, 0.01, AB).go  # waits for b too


def test_pooled_a_holder_of_fresh_state_steps_at_once() -> None:
    """The node a token starts at, or visits, must step to pass it on: held by the start-up wait, the digest
    demo's origin kept the only token 30 s and every peer waited for it."""
    p = PooledPacer(PacingSettings(max_steps=2, max_wait_s=1.0, start_wait_s=30.0))
    assert not p.decide(2, 0.0, AB).go  # nothing heard yet: the start-up wait
    p.holding(2, 0.0)
    assert p.decide(2, 0.0, AB).go and p.decide(3, 0.0, AB).go
    d = p.decide(4, 0.0, AB)
    assert not d.go and d.wait_s <= 1.0  # the walk is under way: the usual deadline, not the start-up wait
    plain = Pacer(PacingSettings(max_steps=2, start_wait_s=30.0))
    plain.holding(2, 0.0)
    assert not plain.decide(2, 0.0, AB).go  # not pooled: holding means nothing


def test_pooled_no_token_within_the_deadline_allows_one_more_bound_not_freedom() -> None:
    """The walk's token is late (its origin still starting, a lost copy): after `max_wait_s` a pooled peer takes
    another `max_steps` and waits again. A 30 s start-up wait held a demo's peers at step 16; marking the walk late
    instead let them run free until it came back."""
    p = PooledPacer(PacingSettings(max_steps=2, max_wait_s=1.0, start_wait_s=30.0))
    assert p.decide(0, 0.0, AB).go and p.decide(1, 0.0, AB).go
    d = p.decide(2, 0.0, AB)
    assert not d.go and d.wait_s == pytest.approx(1.0)  # the usual deadline, never the start-up wait
    assert p.decide(2, 1.0, AB).go and p.decide(3, 1.0, AB).go
    assert not p.decide(4, 1.0, AB).go and p.missed_deadlines == 1
    assert not p.decide(4, 1.5, AB).go and p.decide(4, 2.0, AB).go
