"""Training paced by consensus progress: a bound, in local steps, on how far a model may drift from its neighbours.

Without it a peer whose steps are faster than its network mixes (a GPU, a tiny model, a slow link) runs
hundreds of local steps between merges: on biased data that is local training followed by averaging, and the
consensus model is poor (49% on digits where the paced run reaches 95%). With it, a peer may take at most
`max_steps` local steps since it last merged fresh state from each neighbour it waits for (stale-synchronous
style, counted in steps, whatever the ratio of compute speed to network speed). Stragglers and cut links cost
the others at most a bounded wait:

* **slower neighbours are waited for in their own steps.** Each message carries the sender's compute rate
  (steps per second of time spent stepping, waits excluded; the scalar `RATE_SCALAR`), and the pacer compares it
  with its own. Wall-clock progress would not do: a peer that waits for its neighbours progresses at their pace,
  so every neighbour would look slow. A neighbour computing r times slower than we do (r > 1) is given
  `ceil(max_steps * r * RATE_HEADROOM)` of our steps between its fresh states instead of `max_steps`: the drift
  stays bounded by `max_steps` of *its* steps, and since it publishes after each of them, it never holds us up.
  A graded allowance, not a cliff: peers sharing cores measure rates that differ two- to four-fold from moment
  to moment, and a hard "too slow, stop waiting" threshold let equal peers run ten epochs apart. Only a
  neighbour below `slow_fraction` of our rate (a device ten times slower) is not awaited at all;
* **peers with less data step less often** (`finish_together`): each message also carries the sender's step budget
  (`BUDGET_SCALAR`, its epochs times its steps per epoch). A peer whose budget differs from an awaited
  neighbour's does not run ahead of it in *fractions of the budget*: past that it takes idle turns (no step; mix
  mode keeps what arrives for its next step, round-synchronous algorithms join a round a neighbour waits for with a
  zero gradient) until the neighbour has moved on. On uneven partitions (Dirichlet 0.1:
  sizes differ up to 30-fold) every peer's steps are then spread over the whole run, as every sample is in
  centralized training, instead of the small peers finishing early and the large ones training alone at the end;
* **a wait has a deadline**, `wait_factor` times the usual gap between fresh messages (a moving average),
  clipped to [`min_wait_s`, `max_wait_s`]. A neighbour that misses it (a cut link, a stopped peer) is marked
  late and not waited for until it is heard from again, so a dead link costs one deadline, not one per step. A
  neighbour that is itself held (it sends its state again without stepping) and that we lead by `HELD_LEAD` of its
  allowances is the exception: waited for until it steps, falls silent, or `start_wait_s` passes.

Pure bookkeeping: the training thread feeds it `now`, its step count and the messages it took in, and asks
whether it may step.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

# The payload scalar that carries the sender's compute rate (added by the training thread, ignored by algorithms).
RATE_SCALAR = "_pace_steps_per_s"
# 1.0 when the sender finished its training budget: its consensus-only rounds never step again, so waiting for
# its "fresh" state would cost a full deadline at each of its idle publishes (and any state clears "late").
DONE_SCALAR = "_pace_done"
# The sender's step budget (epochs times steps per epoch) and its local steps so far, for `finish_together`. Its
# own scalar, not the payload's step: round-synchronous algorithms send their round there, or nothing.
BUDGET_SCALAR = "_pace_budget"
PROGRESS_SCALAR = "_pace_progress"
# Budgets this close count as equal: partitions that differ by a sample or two do not hold anyone back.
BUDGET_MARGIN = 1.1
# A budget claimed by a message is believed up to this size (a hostile value must not disable the rule by overflow).
MAX_BUDGET = 2**40
# Weight of the newest sample in the moving averages (gaps between messages, compute rate windows).
EWMA_WEIGHT = 0.2
# The compute rate is measured over windows of at least this much busy time: a single step's duration is
# dominated by preemption when peers share cores (we measured 430 to 1750 steps/s for four equal peers on two).
RATE_WINDOW_S = 0.5
# How far ahead of a neighbour that is itself held (alive, not stepping) we may run past the deadline, in its
# allowances (8 steps at the default bound; unbounded, one lossy demo peer ran 700 steps ahead and cost 33 points;
# bench-results/pacing-lossy.md compares 4 and 8 on a 4x straggler).
HELD_LEAD = 8
# The one neighbour that stands for all of them in a `PooledPacer`.
POOLED = "*"
# Slack on a slower neighbour's allowance, so that jitter in its step times does not make us wait for it.
RATE_HEADROOM = 1.25


@dataclass(frozen=True)
class PacingSettings:
    max_steps: int  # local steps allowed since fresh state was last merged from each awaited neighbour; 0 = off
    min_wait_s: float = 0.05
    max_wait_s: float = 2.0
    wait_factor: float = 4.0
    slow_fraction: float = 0.1  # neighbours computing slower than this fraction of our rate are not awaited
    # A neighbour not yet seen stepping (still starting up, waiting for its own members) is waited for this long:
    # the moving-average deadline, learned from a burst of first states, marked such neighbours late within 0.1 s,
    # and one peer of a compose cluster trained alone to the end while the others started (62.9%).
    start_wait_s: float = 30.0
    # Our step budget, for `finish_together` (None: the rule is off, as in the library API, whose caller owns it).
    budget: int | None = None


@dataclass(frozen=True)
class PaceDecision:
    go: bool
    wait_s: float = 0.0  # when not go: how long to wait for fresh state at most before asking again
    idle: bool = False  # not go because finish_together holds us (ahead of a neighbour with another budget)


GO = PaceDecision(True)


def _count(value: float | None) -> int | None:
    """A claimed step count or budget, if we believe it (a hostile value must not disable the rule by overflow)."""
    if value is None or not math.isfinite(value) or not 0 <= value <= MAX_BUDGET:
        return None
    return int(value)


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * new


@dataclass
class _Neighbour:
    merged_at: int  # our step count when its fresh state was last taken in
    rate: float | None = None  # its compute rate (steps per second while stepping), from its last message
    late: bool = False  # missed a deadline: not awaited until heard from again
    their_step: int | None = None  # the neighbour's own step count in the state last counted as fresh
    stepped: bool = False  # seen stepping (two different step counts), so its usual gap applies
    done: bool = False  # said it finished training: mixed, never awaited
    budget: int | None = None  # its step budget, if it says
    progress: int | None = None  # its local steps so far, if it says
    heard_at: float | None = None  # when its last state (any) was taken in
    held: bool = False  # its last state was not a step: it waits (pacing, finish_together) and sends it again


def _started(n: _Neighbour) -> bool:
    """Seen stepping (two step counts), or it says it took steps of its run."""
    return n.stepped or (n.progress is not None and n.progress > 0)


@dataclass
class Pacer:
    s: PacingSettings
    start_step: int = 0
    gap_s: float | None = None  # moving average of the time between fresh messages (any neighbour)
    own_rate: float | None = None  # our steps per second while stepping (waits excluded)
    neighbours: dict[str, _Neighbour] = field(default_factory=dict)
    waits: int = 0
    wait_s_total: float = 0.0
    missed_deadlines: int = 0
    idle_turns: int = 0  # times finish_together held us back
    idle_s_total: float = 0.0
    _idle_since: float | None = None
    _held_pending: float = 0.0  # seconds waited or idle since the last step allowed
    _last_fresh_at: float | None = None
    _waiting_since: float | None = None
    _last_go: tuple[int, float] | None = None  # (step, time) of the last step allowed
    _window: tuple[int, float] = (0, 0.0)  # steps and busy seconds not yet folded into own_rate

    @property
    def enabled(self) -> bool:
        """The bound on steps without fresh state is on."""
        return self.s.max_steps > 0

    @property
    def active(self) -> bool:
        """Anything paces us (the bound, or finish_together): neighbours need our rate, budget and progress."""
        return self.enabled or self.s.budget is not None

    def deadline_s(self) -> float:
        """How long a wait for fresh state may last."""
        if self.gap_s is None:
            return self.s.max_wait_s
        return min(self.s.max_wait_s, max(self.s.min_wait_s, self.s.wait_factor * self.gap_s))

    def took_in(
        self,
        sender: str,
        sender_rate: float | None,
        step: int,
        now: float,
        sender_step: int | None = None,
        sender_done: bool = False,
        sender_budget: float | None = None,
        sender_progress: float | None = None,
    ) -> None:
        """State from `sender` (computing at `sender_rate` steps/s, if it says; at its own step `sender_step`) was
        accepted; it is merged before our local step `step`.

        Only a state that moved on by a step counts as fresh: a neighbour that is itself waiting still mixes what
        it receives and publishes the result, and counting that echo would let two peers ping-pong each other
        forward while a third falls sixty steps behind (measured: four peers on two cores)."""
        n = self.neighbours.get(sender)
        if n is None:
            n = self.neighbours[sender] = _Neighbour(merged_at=self.start_step)
        if sender_rate is not None and math.isfinite(sender_rate) and sender_rate > 0:
            n.rate = sender_rate
        # Any state shows that the neighbour is alive and its link works: awaited again. (Clearing this only on a
        # step let a ring of four fall apart: a neighbour that missed a deadline because it was itself waiting
        # stayed unawaited, and we ran 200 steps ahead of it.)
        n.late = False
        n.done = sender_done
        budget, progress = _count(sender_budget), _count(sender_progress)
        n.heard_at = now
        if budget is not None and budget >= 1 and progress is not None:
            n.budget, n.progress = budget, progress
        if sender_step is not None:
            if sender_step == n.their_step:
                n.held = True  # mixed but not stepped: not progress, it waits itself
                return
            n.held = False
            n.stepped = n.stepped or n.their_step is not None
            n.their_step = sender_step
        if self._last_fresh_at is not None:
            self.gap_s = _ewma(self.gap_s, max(0.0, now - self._last_fresh_at))
        self._last_fresh_at = now
        n.merged_at = step
        n.late = False

    def holding(self, step: int, now: float) -> None:
        """We hold what pacing waits for ourselves (a token visiting us): only a `PooledPacer` counts it."""

    def awaited(self, neighbours: Collection[str]) -> list[str]:
        """The neighbours whose fresh state we wait for: not late, not done training, and not much slower than
        we compute."""
        out = []
        for j in neighbours:
            n = self.neighbours.get(j)
            if n is None:
                out.append(j)  # never heard from yet: give it one deadline
                continue
            slow = self.own_rate is not None and n.rate is not None and n.rate < self.s.slow_fraction * self.own_rate
            if not n.late and not slow and not n.done:
                out.append(j)
        return out

    def decide(self, step: int, now: float, neighbours: Collection[str]) -> PaceDecision:
        """May the peer take local step `step` now? `neighbours`: the current view."""
        if not self.enabled:
            return self._finish_together(step, now, self.awaited(neighbours)) if self.s.budget is not None else GO
        awaited = self.awaited(neighbours)
        blocking = [
            j for j in awaited if step - self._merged_at(j) >= self.allowance(j) and not self._ahead_of_us(j, step)
        ]
        if not blocking:
            return self._finish_together(step, now, awaited)
        if self._waiting_since is None:
            self._close_idle(now)
            self._waiting_since = now
            self.waits += 1
        deadline = self.deadline_s()
        if self._starting_up(blocking):
            deadline = max(deadline, self.s.start_wait_s)
        remaining = self._waiting_since + deadline - now
        if remaining > 0:
            return PaceDecision(False, remaining)
        return self._past_deadline(step, now, blocking, awaited)

    def _starting_up(self, blocking: list[str]) -> bool:
        """A blocking neighbour has not started its run, and none has: wait `start_wait_s` for it. Only while no
        neighbour has started: once one has, a neighbour we never heard from is more likely cut off than starting
        (a lossy demo's peer waited 20 s for one behind a flapping link, adopted catch-ups meanwhile and never
        trained on its own data: 76%), and one that starts later is held for by the HELD_LEAD rule (its first
        states repeat step 0) or catches up."""
        return any(not self._stepped(j) for j in blocking) and not self._a_neighbour_started()

    def _past_deadline(self, step: int, now: float, blocking: list[str], awaited: list[str]) -> PaceDecision:
        """`blocking` missed the deadline of our wait."""
        # Past the deadline, a neighbour is late (not awaited until heard from again), except one that is held far
        # behind us: it still sends its state without stepping (it waits for a neighbour of its own), and we lead
        # it by HELD_LEAD of its allowances. Each of its resends cleared "late" for one more short deadline, and a
        # demo peer ran 700 steps alone while its three neighbours waited out a cut link (63% instead of 95%).
        # Waiting for such a neighbour cannot deadlock: it does not wait for us (we are ahead), and the peer
        # furthest behind never waits past a deadline. Bounded by start_wait_s anyway. A silent neighbour, or one
        # that steps slowly (a straggler: its allowance grows once rates are known), is late as before.
        since = self._waiting_since
        assert since is not None, "decide() opened the wait"
        held_s = now - since
        held_behind = [j for j in blocking if self._held_far_behind(j, step, now)]
        if held_behind and held_s < self.s.start_wait_s:
            self._mark_late([j for j in blocking if j not in held_behind])
            until = min(self._heard_at(j) for j in held_behind) + self.s.max_wait_s
            return PaceDecision(False, min(until, since + self.s.start_wait_s) - now)
        self._mark_late(blocking)
        return self._finish_together(step, now, [j for j in awaited if j not in blocking])

    def _mark_late(self, late: list[str]) -> None:
        """`late` missed a deadline: not awaited again until heard from."""
        if late:
            self.missed_deadlines += 1
        for j in late:
            self.neighbours.setdefault(j, _Neighbour(merged_at=self._merged_at(j))).late = True

    def _heard_at(self, j: str) -> float:
        n = self.neighbours.get(j)
        return -math.inf if n is None or n.heard_at is None else n.heard_at

    def _held_far_behind(self, j: str, step: int, now: float) -> bool:
        """`j` was heard within `max_wait_s`, its last state was not a step (it is held), and its progress, in our
        steps, trails `step` by HELD_LEAD of its allowances. Needs both budgets, so that `j` knows we are ahead."""
        n = self.neighbours.get(j)
        own = self.s.budget
        if n is None or not n.held or own is None or n.budget is None or n.progress is None:
            return False
        if self._heard_at(j) <= now - self.s.max_wait_s:
            return False
        return step - n.progress * own / n.budget >= HELD_LEAD * self.allowance(j)

    def _finish_together(self, step: int, now: float, awaited: list[str]) -> PaceDecision:
        """GO, unless taking step `step` would put us ahead of an awaited neighbour whose budget differs from ours
        by more than `max_steps` of its steps, in fractions of each budget. Both ways: the peer with less data
        would otherwise finish first, and the one with more would run several steps per step of the other while
        both wait on messages (measured: a peer with twice the data finished when its neighbour was at 78%). A
        neighbour that falls silent (a cut link, a stopped peer) holds us `max_wait_s` after its last state, then
        is late like any other."""
        held_until = None
        own = self.s.budget
        if own is None:
            self._go(step, now)
            return GO
        for j in awaited:
            n = self.neighbours.get(j)
            if n is None or not self._uneven(n):
                continue  # equal budgets: the bound on steps without fresh state is enough
            assert n.budget is not None and n.progress is not None and n.heard_at is not None
            slack = max(1, self.s.max_steps)  # round-synchronous algorithms (bound 0) still move one step at a time
            if (step + 1) * n.budget <= (n.progress + slack) * own:
                continue
            # Alive is enough: a neighbour that is itself held (waiting, idle) publishes without stepping, and
            # marking it late after the usual gap between steps let 8 peers on uneven data fall 16 epochs apart.
            until = n.heard_at + self.s.max_wait_s
            if until <= now:
                self.missed_deadlines += 1
                n.late = True
                continue
            held_until = until if held_until is None else min(held_until, until)
        if held_until is None:
            self._go(step, now)
            return GO
        if self._idle_since is None:
            self._close_wait(now)
            self._idle_since = now
            self.idle_turns += 1
        return PaceDecision(False, held_until - now, idle=True)

    def _uneven(self, n: _Neighbour) -> bool:
        """finish_together applies between us and `n`: both budgets known and not about equal."""
        own = self.s.budget
        if own is None or n.budget is None or n.progress is None or n.heard_at is None:
            return False
        return max(own, n.budget) >= min(own, n.budget) * BUDGET_MARGIN

    def _ahead_of_us(self, j: str, step: int) -> bool:
        """Neighbour `j`'s next step would take it further through its run than our next step takes us through
        ours (finish_together): it waits for our step (idle, or for our fresh state), so waiting for its next one
        would deadlock. Compared after the next steps, exactly as `_finish_together` does: compared before them, a
        peer with coarse steps (budget 180) idled for one with fine ones (660) that waited for its fresh state.
        With equal budgets too: a neighbour held behind a third peer stalled 8 peers at one step per deadline."""
        n = self.neighbours.get(j)
        own = self.s.budget
        if n is None or own is None or n.budget is None or n.progress is None:
            return False
        return (n.progress + 1) * own > (step + 1) * n.budget

    def allowance(self, j: str) -> int:
        """Our local steps allowed between fresh states of neighbour `j`: `max_steps`, stretched by how many times
        slower than us it computes, so that the bound is `max_steps` of its steps."""
        n = self.neighbours.get(j)
        if n is None:
            return self.s.max_steps
        slower = 1.0
        if n.rate is not None and self.own_rate is not None and n.rate < self.own_rate:
            slower = self.own_rate / n.rate * RATE_HEADROOM
        if self.s.budget is not None and n.budget is not None and n.budget * BUDGET_MARGIN <= self.s.budget:
            # It steps less often by finish_together; budgets are exact, so no headroom (with it, a peer with
            # twice the data ran three steps per step of its neighbour and finished first).
            slower = max(slower, self.s.budget / n.budget)
        return self.s.max_steps if slower == 1.0 else math.ceil(self.s.max_steps * slower)

    def _stepped(self, j: str) -> bool:
        """`j` has started training: seen stepping, or it says it took steps of its run (a neighbour at step 1 that
        waits for a cut link of its own is not starting up: 30 s start-up waits froze a lossy demo's four peers for
        10 to 30 s). No step counts known: the usual rule."""
        n = self.neighbours.get(j)
        return n is not None and (n.their_step is None or _started(n))

    def _a_neighbour_started(self) -> bool:
        return any(_started(n) for n in self.neighbours.values())

    def _merged_at(self, j: str) -> int:
        n = self.neighbours.get(j)
        return n.merged_at if n is not None else self.start_step

    def _go(self, step: int, now: float) -> None:
        self._close_wait(now)
        self._close_idle(now)
        waited, self._held_pending = self._held_pending, 0.0  # waits and idle turns are not compute time
        if self._last_go is None:
            self._last_go = (step, now)
        elif step > self._last_go[0]:
            busy = max(0.0, now - self._last_go[1] - waited)
            steps, busy_s = self._window[0] + step - self._last_go[0], self._window[1] + busy
            if busy_s >= RATE_WINDOW_S:
                self.own_rate = _ewma(self.own_rate, steps / busy_s)
                steps, busy_s = 0, 0.0
            self._window = (steps, busy_s)
            self._last_go = (step, now)

    def _held_for(self, since: float | None, now: float) -> float:
        """Seconds held since `since` (0 if not held); they count against the next compute-rate window."""
        held = 0.0 if since is None else max(0.0, now - since)
        self._held_pending += held
        return held

    def _close_wait(self, now: float) -> None:
        self.wait_s_total += self._held_for(self._waiting_since, now)
        self._waiting_since = None

    def _close_idle(self, now: float) -> None:
        self.idle_s_total += self._held_for(self._idle_since, now)
        self._idle_since = None

    def forget(self, node_id: str) -> None:
        self.neighbours.pop(node_id, None)

    def restart_at(self, step: int) -> None:
        """Training resumed at `step` (a restored checkpoint or an adopted model): count from there."""
        self.start_step = step
        for n in self.neighbours.values():
            n.merged_at = max(n.merged_at, step)
        self._last_go = None

    def metrics(self) -> dict[str, float]:
        return {
            "pace_waits": self.waits,
            "pace_wait_s": self.wait_s_total,
            "pace_missed_deadlines": self.missed_deadlines,
            "pace_idle_s": self.idle_s_total,
            "pace_gap_s": self.gap_s if self.gap_s is not None else math.nan,
            "pace_steps_per_s": self.own_rate if self.own_rate is not None else math.nan,
        }


class PooledPacer(Pacer):
    """Fresh state from any neighbour counts, not from each: a token algorithm (digest) hears from one neighbour at a
    time, as its random walk passes. Waiting for every neighbour marked all but the token's sender late at each
    deadline and the peers ran free (the digest demo at 53%). The neighbours are pooled into one, POOLED."""

    def took_in(self, sender: str, *args: Any, **kwargs: Any) -> None:
        super().took_in(POOLED, *args, **kwargs)

    def decide(self, step: int, now: float, neighbours: Collection[str]) -> PaceDecision:
        return super().decide(step, now, [POOLED] if neighbours else [])

    def forget(self, node_id: str) -> None:
        """The others still pass the walk on."""

    def holding(self, step: int, now: float) -> None:
        """We hold fresh state ourselves (a token visits us), as if it had just arrived. A token's holder must step to
        pass it on: held in the start-up wait, the digest demo's origin kept its token 30 s and every peer waited."""
        n = self.neighbours.setdefault(POOLED, _Neighbour(merged_at=step))
        n.merged_at, n.late, n.heard_at = step, False, now
        n.stepped = True  # the walk is under way: no start-up wait for it

    def deadline_s(self) -> float:
        # A walk's return times are heavy-tailed and a lost token comes back only when its holder re-sends it: 4x
        # the usual gap marked the pooled neighbour late under 20% drops, and the peers ran free (75%).
        return self.s.max_wait_s

    def _starting_up(self, blocking: list[str]) -> bool:
        return False  # the walk starts at its origin, and a missed wait is bounded below

    def _past_deadline(self, step: int, now: float, blocking: list[str], awaited: list[str]) -> PaceDecision:
        """No token within `max_wait_s` (its origin still starting, a lost or slow walk): another bound's worth of
        steps, not freedom until the next token (marking the walk late let the peers run free until it came back).
        Drift stays at most `max_steps` per `max_wait_s`."""
        self.missed_deadlines += 1
        n = self.neighbours.setdefault(POOLED, _Neighbour(merged_at=step))
        n.merged_at = step
        return self._finish_together(step, now, awaited)

    def _ahead_of_us(self, j: str, step: int) -> bool:
        # The pooled progress is the last token sender's, not the walk's; and no one waits for us in particular (a
        # token's holder always steps), so there is no deadlock to avoid.
        return False
