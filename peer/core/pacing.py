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
* **a wait has a deadline**, `wait_factor` times the usual gap between fresh messages (a moving average),
  clipped to [`min_wait_s`, `max_wait_s`]. A neighbour that misses it (a cut link, a stopped peer) is marked
  late and not waited for until it is heard from again, so a dead link costs one deadline, not one per step.

Pure bookkeeping: the training thread feeds it `now`, its step count and the messages it took in, and asks
whether it may step.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field

# The payload scalar that carries the sender's compute rate (added by the training thread, ignored by algorithms).
RATE_SCALAR = "_pace_steps_per_s"
# 1.0 when the sender finished its training budget: its consensus-only rounds never step again, so waiting for
# its "fresh" state would cost a full deadline at each of its idle publishes (and any state clears "late").
DONE_SCALAR = "_pace_done"
# Weight of the newest sample in the moving averages (gaps between messages, compute rate windows).
EWMA_WEIGHT = 0.2
# The compute rate is measured over windows of at least this much busy time: a single step's duration is
# dominated by preemption when peers share cores (we measured 430 to 1750 steps/s for four equal peers on two).
RATE_WINDOW_S = 0.5
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


@dataclass(frozen=True)
class PaceDecision:
    go: bool
    wait_s: float = 0.0  # when not go: how long to wait for fresh state at most before asking again


GO = PaceDecision(True)


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
    _last_fresh_at: float | None = None
    _waiting_since: float | None = None
    _last_go: tuple[int, float] | None = None  # (step, time) of the last step allowed
    _window: tuple[int, float] = (0, 0.0)  # steps and busy seconds not yet folded into own_rate

    @property
    def enabled(self) -> bool:
        return self.s.max_steps > 0

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
        if sender_step is not None:
            if sender_step == n.their_step:
                return  # mixed but not stepped: not progress
            n.stepped = n.stepped or n.their_step is not None
            n.their_step = sender_step
        if self._last_fresh_at is not None:
            self.gap_s = _ewma(self.gap_s, max(0.0, now - self._last_fresh_at))
        self._last_fresh_at = now
        n.merged_at = step
        n.late = False

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
            return GO
        blocking = [j for j in self.awaited(neighbours) if step - self._merged_at(j) >= self.allowance(j)]
        if not blocking:
            self._go(step, now)
            return GO
        if self._waiting_since is None:
            self._waiting_since = now
            self.waits += 1
        deadline = self.deadline_s()
        if any(not self._stepped(j) for j in blocking):
            deadline = max(deadline, self.s.start_wait_s)
        remaining = self._waiting_since + deadline - now
        if remaining > 0:
            return PaceDecision(False, remaining)
        self.missed_deadlines += 1
        for j in blocking:  # not awaited again until heard from
            self.neighbours.setdefault(j, _Neighbour(merged_at=self._merged_at(j))).late = True
        self._go(step, now)
        return GO

    def allowance(self, j: str) -> int:
        """Our local steps allowed between fresh states of neighbour `j`: `max_steps`, stretched by how many times
        slower than us it computes, so that the bound is `max_steps` of its steps."""
        n = self.neighbours.get(j)
        if n is None or n.rate is None or self.own_rate is None or n.rate >= self.own_rate:
            return self.s.max_steps
        return math.ceil(self.s.max_steps * self.own_rate / n.rate * RATE_HEADROOM)

    def _stepped(self, j: str) -> bool:
        n = self.neighbours.get(j)
        return n is not None and (n.stepped or n.their_step is None)  # no step counts known: the usual rule

    def _merged_at(self, j: str) -> int:
        n = self.neighbours.get(j)
        return n.merged_at if n is not None else self.start_step

    def _go(self, step: int, now: float) -> None:
        waited = 0.0
        if self._waiting_since is not None:
            waited = max(0.0, now - self._waiting_since)
            self.wait_s_total += waited
            self._waiting_since = None
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
            "pace_gap_s": self.gap_s if self.gap_s is not None else math.nan,
            "pace_steps_per_s": self.own_rate if self.own_rate is not None else math.nan,
        }
