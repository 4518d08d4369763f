"""The training thread: local steps, then take in messages, mix, and publish the next payload.

It never touches a socket and never waits on the network: the event loop hands it messages through a
thread-safe inbox and a frozen neighbour view, and takes payloads and checkpoint states through callbacks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from peer.algorithms import Algorithm, InMessage, NeighbourView, Payload, Send
from peer.config import TrainConfig
from peer.core.pacing import BUDGET_SCALAR, DONE_SCALAR, GO, PROGRESS_SCALAR, RATE_SCALAR, PaceDecision
from peer.daemon.metrics import Counters
from peer.daemon.settings import make_pacer
from peer.daemon.snapshots import Snapshots
from peer.learn.oracle import CallerStepOracle, TrainerOracle
from peer.learn.training import LocalTrainer, scheduled_lr

# How long a step-mode worker blocked on its neighbours sleeps at most between looks at its retransmission
# timers; new messages and acknowledgements wake it at once.
STEP_MODE_POLL_S = 0.02
PROGRESS_REPORT_S = 0.01
# After local training, mix-mode rounds run when fresh state arrives, and at least this often (so a state of
# ours that a neighbour lost is sent again).
CONSENSUS_IDLE_S = 0.5
# A peer held by pacing sends its state again this often (a lost message must not cost a whole deadline).
PACE_RESEND_S = 0.1
# After local training a state is published only when mixing moved the model by more than this (relative), or
# CONSENSUS_IDLE_S after the last one: otherwise every arrival would trigger a publish that triggers the
# neighbours' next one, and converged peers would push at link speed forever.
CONSENSUS_TOLERANCE = 1e-7
# After local training, round-synchronous (step-mode) rounds run at most this often unless a neighbour still
# training waits for our next round.
CONSENSUS_ROUND_S = 0.1


class TrainingWorker:
    def __init__(
        self,
        *,
        train_cfg: TrainConfig,
        consensus_interval_s: float,
        trainer: LocalTrainer,
        algorithm: Algorithm,
        counters: Counters,
        log: logging.LoggerAdapter[logging.Logger],
        publish: Callable[[Payload], None],
        send: Callable[[list[Send]], None],
        on_checkpoint: Callable[[dict[str, Any]], None],
        on_trained: Callable[[], None] = lambda: None,
        on_progress: Callable[[], None] = lambda: None,
        snapshot_dir: Path | None = None,
        snapshot_interval_s: float = 0.0,
        slowdown: float = 1.0,
        external: bool = False,
    ) -> None:
        self.cfg = train_cfg
        self.consensus_interval_s = consensus_interval_s
        self.trainer = trainer
        self.algorithm = algorithm
        self.counters = counters
        self.log = log
        self.publish = publish
        self.send = send
        self.on_checkpoint = on_checkpoint
        self.on_trained = on_trained
        self.on_progress = on_progress
        self._last_progress_report = -math.inf
        self.snapshots = Snapshots(snapshot_dir, snapshot_interval_s)
        self.slowdown = slowdown  # injected straggler factor: every step and every round take this much longer
        self.inbox: deque[InMessage] = deque()
        self.acks: deque[tuple[str, tuple[int, ...]]] = deque()  # reliable sends delivered (step mode)
        self.wake = threading.Event()  # set by the shell when a message or an acknowledgement arrives
        self.forget: deque[str] = deque()  # neighbours that restarted or left: drop their cached state
        self.view = NeighbourView(algorithm.node_id, {})
        self.stop = threading.Event()
        self.checkpoint_requested = threading.Event()
        self.neighbours_ready = threading.Event()
        self.catchup_done = threading.Event()  # set by the shell when catch-up finished or was not needed
        # Models fetched by catch-up, with the sender's progress in epochs, to adopt at the next round start.
        self.adopt: deque[tuple[torch.Tensor, float]] = deque()
        self.latest_params = trainer.get_flat()  # what a catching-up neighbour fetches
        self.total_steps = max(1, math.ceil(train_cfg.epochs * trainer.steps_per_epoch))
        self.params_at_done: torch.Tensor | None = None  # step mode: the model when local training finished
        self._first_step_at: float | None = None
        # The library API's caller owns its steps and its run's length: finish_together never holds it (no budget).
        self.pacer = make_pacer(train_cfg, algorithm, budget=None if external else self.total_steps)
        self._last_publish = -math.inf
        self.external = external  # the library API (peer.Gossip): the caller's loop steps
        self._deferred_mix = False  # states taken in during a pacing wait, not yet mixed
        self._external_x: torch.Tensor | None = None  # library API, step mode: the iterate our last round returned
        self.waiting_for = ""  # before the first step: "neighbours", then "catch-up" (GetStatus shows it)

    @property
    def done(self) -> bool:
        return self.trainer.step_count >= self.total_steps

    def run(self) -> None:
        """Thread body; returns when `stop` is set."""
        if self.external:  # the caller's loop steps and merges (external_step); nothing to do here
            self.stop.wait()
            return
        if self.cfg.wait_for_neighbors_s > 0 and not self.done:
            # Bounded: a lonely peer starts alone after the timeout instead of waiting forever; a stop request
            # ends the wait at once.
            deadline = time.monotonic() + self.cfg.wait_for_neighbors_s
            self.waiting_for = "neighbours"
            while not self.neighbours_ready.is_set() and not self.stop.is_set() and time.monotonic() < deadline:
                self.neighbours_ready.wait(0.1)
            if not self.neighbours_ready.is_set() and not self.stop.is_set():
                self.log.warning("no neighbours after %.1f s; training alone for now", self.cfg.wait_for_neighbors_s)
        # Catch-up is bounded by catchup.wait_s on the shell's side; here we only wait for its verdict.
        self.waiting_for = "catch-up"
        while not self.catchup_done.is_set() and not self.stop.is_set():
            self.catchup_done.wait(0.1)
        self.waiting_for = ""
        self.pacer.restart_at(self.trainer.step_count)
        # Resumed from a finished checkpoint: say so at once (a status query saw training_done false before).
        if not self.algorithm.owns_local_update:
            self._mark_done_once()
        if self.algorithm.owns_local_update:
            self._run_step_mode()
            return
        while not self.stop.is_set():
            started = time.monotonic()
            if self.done:
                # Consensus only: mix when fresh state arrives, and at least every CONSENSUS_IDLE_S.
                self._wait_for_messages(max(CONSENSUS_IDLE_S, self.consensus_interval_s))
                self.round()
                continue
            decision = self._pace(started)
            # Held by the bound or by finish_together (idle): take in what arrived (or send ours again, or note the
            # missed deadline), ask again. Idle turns do not mix and publish each arrival: with 8 peers on uneven
            # data that echoed every state around the graph (14 GB in 40 s) and starved the steps.
            if not decision.go:
                self._wait_for_messages(min(decision.wait_s, PACE_RESEND_S))
                self.round(local_steps=False)
                continue
            self.round()
            remaining = self.cfg.round_interval_s * self.slowdown - (time.monotonic() - started)
            if remaining > 0:
                self.stop.wait(remaining)

    def _pace(self, now: float) -> PaceDecision:
        if self.done:
            return GO
        if self.algorithm.holds_fresh_state():
            self.pacer.holding(self.trainer.step_count, now)
        return self.pacer.decide(self.trainer.step_count, now, self.view.degrees.keys())

    def _wait_for_messages(self, timeout_s: float) -> None:
        """Sleep until a message (or an acknowledgement) arrives, the timeout passes, or the daemon stops."""
        self.wake.clear()
        if not self.inbox and not self.acks and not self.stop.is_set():
            self.wake.wait(timeout_s)

    def _worth_publishing(self, before: torch.Tensor, after: torch.Tensor, now: float, *, stepped: bool) -> bool:
        if now - self._last_publish >= CONSENSUS_IDLE_S:
            return True
        if not self.done:
            # A waiting paced peer publishes only after its next step: echoes carry no progress, only CPU cost.
            return stepped or not self.pacer.active
        if after is before:
            return False
        scale = float(before.norm()) or 1.0
        return float((after - before).norm()) > CONSENSUS_TOLERANCE * scale

    def _resend_while_waiting(self, now: float) -> None:
        """Send our state again every PACE_RESEND_S while pacing holds us: if our last one was lost (a dropped
        message, a link that was down), two peers would otherwise wait out their deadlines for each other (30% drops
        and a flapping link: two peers stalled 25 s). A receiver that has it counts it as no progress; the pusher
        sends one state at a time per link, so this never outruns the link."""
        if self.pacer.active and now - self._last_publish >= PACE_RESEND_S:
            payload = self.algorithm.outgoing(self.latest_params, self.trainer.step_count)
            if payload is not None:
                self._last_publish = now
                self.publish(self._with_rate(payload))

    def _with_rate(self, payload: Payload) -> Payload:
        """The payload with our compute rate and whether we finished, so that neighbours know whether to wait for
        us (peer.core.pacing)."""
        pace = {DONE_SCALAR: 1.0} if self.done else {}
        if self.pacer.own_rate is not None:
            pace[RATE_SCALAR] = self.pacer.own_rate
        if self.pacer.s.budget is not None:
            pace[BUDGET_SCALAR], pace[PROGRESS_SCALAR] = float(self.total_steps), float(self.trainer.step_count)
        if not self.pacer.active or not pace:
            return payload
        return dataclasses.replace(payload, scalars={**payload.scalars, **pace})

    def _took_in(self, msg: InMessage, now: float) -> None:
        """A neighbour's message was accepted: it is merged before our next local step."""
        self.pacer.took_in(
            msg.sender,
            msg.payload.scalars.get(RATE_SCALAR),
            self.trainer.step_count,
            msg.received_at,
            msg.payload.step if self.algorithm.messages_carry_step else None,
            msg.payload.scalars.get(DONE_SCALAR) == 1.0,
            msg.payload.scalars.get(BUDGET_SCALAR),
            msg.payload.scalars.get(PROGRESS_SCALAR),
        )

    def external_step(self) -> bool:
        """The library API (`peer.Gossip.step`), in the caller's thread: the caller's optimizer just took one
        step. Mix mode: wait as pacing asks (bounded), merge what arrived into the model, publish it. An algorithm
        that follows the caller's step (D-PSGD): run its round with that step (`_external_round`).
        Returns whether neighbour state was merged."""
        if self.algorithm.owns_local_update:
            return self._external_round()
        while not self.stop.is_set():
            decision = self._pace(time.monotonic())
            if decision.go:
                break
            self._wait_for_messages(decision.wait_s)
            self.round(local_steps=False)
        self.trainer.step_count += 1
        self.round(local_steps=False, external_step=True)
        return bool(self.algorithm.last_report.used)

    def round(self, local_steps: bool = True, *, external_step: bool = False) -> None:
        """One round: local steps (while epochs remain), merge what arrived, publish, checkpoint if asked.
        `external_step`: the caller's own loop took the step (library API); merge and publish regardless."""
        trainer = self.trainer
        loss = float("nan")
        while self.adopt:
            params, epoch = self.adopt.popleft()
            trainer.set_flat(params)
            # Rejoin the cluster's schedule (learning rate, epochs left) instead of retraining alone.
            trainer.step_count = max(trainer.step_count, min(self.total_steps, round(epoch * trainer.steps_per_epoch)))
            trainer.epoch = trainer.step_count // trainer.steps_per_epoch
        if local_steps and not self.done and self._deferred_mix:
            self._mix_before_step()
        if local_steps and not self.done:
            if self._first_step_at is None:
                self._first_step_at = time.monotonic()
            for _ in range(self.cfg.steps_per_round):
                trainer.set_lr(scheduled_lr(self.cfg.lr, self.cfg.lr_schedule, trainer.step_count, self.total_steps))
                started = time.monotonic()
                loss = trainer.step()
                if self.slowdown > 1.0:
                    self.stop.wait((self.slowdown - 1.0) * (time.monotonic() - started))
                if self.done:
                    break
            if not math.isfinite(loss):
                self.log.error("training loss is %s at step %d; check train.lr", loss, trainer.step_count)
        self._mark_done_once()
        now = time.monotonic()
        dropped = 0
        while self.forget:
            gone = self.forget.popleft()
            self.algorithm.forget(gone)
            self.pacer.forget(gone)
        took_in = 0
        while self.inbox:
            msg = self.inbox.popleft()
            if self.algorithm.on_message(msg, now):
                took_in += 1
                self._took_in(msg, now)
            else:
                dropped += 1
        if not local_steps and not external_step and (not took_in or (not self.done and self.pacer.active)):
            # A pacing wait: keep what arrived and mix it all at once before the next step. Mixing each state as
            # it lands weighs the neighbours unevenly (4/9, 2/9, 1/3 on a ring): a biased consensus.
            self._deferred_mix = self._deferred_mix or took_in > 0
            self._resend_while_waiting(now)
            return
        x = trainer.get_flat()
        mixed = self.algorithm.mix(x, now, self.view)
        if mixed is not x:
            trainer.set_flat(mixed)
        self.latest_params = mixed
        payload = None
        if self._worth_publishing(x, mixed, now, stepped=(local_steps or external_step)):
            payload = self.algorithm.outgoing(mixed, trainer.step_count)
        if payload is not None:
            self._last_publish = now
            self.publish(self._with_rate(payload))
        with self.counters.lock:
            self.counters.step = trainer.step_count
            self.counters.epoch = trainer.step_count / trainer.steps_per_epoch
            if math.isfinite(loss):
                self.counters.loss = loss
            self.counters.rounds += 1
            self.counters.mixes += 1 if self.algorithm.last_report.used else 0
            self.counters.dropped_stale += dropped
            self.counters.seq = payload.seq if payload is not None else self.counters.seq
        self._report_progress()
        self.snapshots.maybe(mixed, trainer.step_count)
        if self.checkpoint_requested.is_set():
            self.checkpoint_requested.clear()
            self.on_checkpoint(self.state())

    def _external_round(self) -> bool:
        """Library API, step mode (`Algorithm.follows_caller_step`): the caller's optimizer stepped from the
        iterate our last round returned; that step becomes the round's gradient step (`CallerStepOracle`), and the
        round waits for its neighbours' messages as the training thread would (bounded by the algorithm's own
        give-up), in the caller's thread."""
        algo, trainer = self.algorithm, self.trainer
        assert algo.follows_caller_step, algo.name
        stepped = trainer.get_flat()
        if self._external_x is None:  # the first round starts from the model as it was before the caller's step
            self._external_x = self.latest_params
            algo.start(self._external_x, time.monotonic(), self.view)
            self._flush_sends()
            self._first_step_at = time.monotonic()
        oracle = CallerStepOracle(self._external_x, stepped)
        while True:
            self.wake.clear()
            now = time.monotonic()
            self._drain_step_mode(now)
            if algo.ready(now, self.view):
                break
            if self.stop.is_set():
                return False  # shutting down: the caller keeps its own step
            self._flush_sends()  # retransmissions
            self.wake.wait(STEP_MODE_POLL_S)
        x = algo.advance(self._external_x, oracle, now, self.view)
        self._external_x = x
        trainer.set_flat(x)
        self.latest_params = x
        trainer.step_count += 1
        self._flush_sends()
        self._after_iteration(math.nan, x)
        return bool(algo.last_report.used)

    def _mark_done_once(self) -> None:
        if self.done and not self.counters.training_done:
            self.counters.training_done = True
            if self._first_step_at is not None:
                self.counters.training_s = time.monotonic() - self._first_step_at
            self.on_trained()
            self.log.info("training done after %d steps (%.2f epochs)", self.trainer.step_count, self.cfg.epochs)

    def _mix_before_step(self) -> None:
        """The states kept during a pacing wait, mixed in one go before the step they released."""
        self._deferred_mix = False
        x = self.trainer.get_flat()
        mixed = self.algorithm.mix(x, time.monotonic(), self.view)
        if mixed is not x:
            self.trainer.set_flat(mixed)
        with self.counters.lock:
            self.counters.mixes += 1 if self.algorithm.last_report.used else 0

    # ------------------------------------------------------------------------------------------- step mode
    @property
    def step_mode_finished(self) -> bool:
        return self.algorithm.finished() if self.algorithm.trains_own_model else self.done

    def _run_step_mode(self) -> None:
        """The algorithm owns the iteration: advance whenever it is ready (P1: its round is complete), send
        what it says is due (retransmissions included), and otherwise sleep until a message or an
        acknowledgement arrives. After the local epochs, P1 rounds go on at the consensus pace (mixing only),
        so neighbours still training are never left waiting for us."""
        algo = self.algorithm
        trainer = self.trainer
        oracle = TrainerOracle(trainer, self.cfg, self.total_steps)
        x = trainer.get_flat()
        while self.adopt:  # catch-up before the first iteration; later adoptions would break the algorithm's state
            params, epoch = self.adopt.popleft()
            x = params.to(x.dtype)
            trainer.set_flat(x)
            trainer.step_count = max(trainer.step_count, min(self.total_steps, round(epoch * trainer.steps_per_epoch)))
            trainer.epoch = trainer.step_count // trainer.steps_per_epoch
            self.pacer.restart_at(trainer.step_count)  # count steps without fresh state from the adopted step
        algo.start(x, time.monotonic(), self.view)
        self._flush_sends()
        self._first_step_at = time.monotonic()
        last_advance = -math.inf
        while not self.stop.is_set():
            self.wake.clear()
            now = time.monotonic()
            self._drain_step_mode(now)
            finished = self.step_mode_finished
            interval = (
                max(CONSENSUS_ROUND_S, self.consensus_interval_s)
                if finished
                else self.cfg.round_interval_s * self.slowdown
            )
            # Pacing never holds up a neighbour that already waits for our next round (P1).
            paced = now - last_advance < interval and not algo.neighbours_waiting()
            decision = self._pace(now) if not finished else GO
            # Held by finish_together: a round a neighbour waits for (P1) goes on without a gradient step; else
            # wait, as pacing does (idle push-sum rounds sent at loop speed took one sgp peer to 3 GB).
            idle_round = decision.idle and algo.neighbours_waiting()
            may_advance = not (finished and algo.trains_own_model) and not paced and (decision.go or idle_round)
            advanced = False
            if may_advance and algo.ready(now, self.view):
                started = time.monotonic()
                oracle.hold = not decision.go
                x = algo.advance(x, oracle, now, self.view)
                if self.slowdown > 1.0:
                    self.stop.wait((self.slowdown - 1.0) * (time.monotonic() - started))
                trainer.set_flat(x)
                self.latest_params = x
                last_advance = now
                advanced = True
                self._after_iteration(oracle.last_loss, x)
            self._flush_sends()
            if self.checkpoint_requested.is_set():
                self.checkpoint_requested.clear()
                self.on_checkpoint(self.state())
            if advanced and not decision.go:  # the next idle round when something arrives, not at CPU speed
                self.wake.wait(min(decision.wait_s, CONSENSUS_ROUND_S))
            elif not advanced:
                wait = STEP_MODE_POLL_S
                if not decision.go:
                    wait = min(wait, decision.wait_s)
                elif may_advance is False and not (finished and algo.trains_own_model):
                    wait = min(wait, max(0.0, interval - (time.monotonic() - last_advance)))
                self.wake.wait(wait)

    def _drain_step_mode(self, now: float) -> None:
        algo = self.algorithm
        dropped = 0
        if self.adopt:
            # A model fetched mid-run cannot be adopted: it would not match the algorithm's own state (momentum,
            # trackers, replicas, push-sum weights). Step-mode algorithms catch up through their protocol instead.
            self.adopt.clear()
            self.log.info("catch-up ignored: %s keeps its own state once started", algo.name)
        while self.forget:
            gone = self.forget.popleft()
            algo.forget(gone)
            self.pacer.forget(gone)
        while self.acks:
            to, key = self.acks.popleft()
            algo.on_ack(to, key, now)
        while self.inbox:
            msg = self.inbox.popleft()
            if algo.on_message(msg, now):
                self._took_in(msg, now)
            else:
                dropped += 1
        if dropped:
            self.counters.add(dropped_stale=dropped)

    def _flush_sends(self) -> None:
        sends = self.algorithm.sends(time.monotonic())
        if sends:
            if self.pacer.active:
                stamped: dict[int, Payload] = {}  # one stamped copy per payload, so its encoding is still shared
                sends = [
                    dataclasses.replace(x, payload=stamped.setdefault(id(x.payload), self._with_rate(x.payload)))
                    for x in sends
                ]
            self.send(sends)

    def _after_iteration(self, loss: float, x: torch.Tensor) -> None:
        trainer = self.trainer
        if self.step_mode_finished and not self.counters.training_done:
            self.params_at_done = x.clone()
            self.counters.training_done = True
            if self._first_step_at is not None:
                self.counters.training_s = time.monotonic() - self._first_step_at
            self.on_trained()
            self.log.info(
                "training done after %d steps, %d iterations of %s",
                trainer.step_count,
                self.algorithm.iteration,
                self.algorithm.name,
            )
        with self.counters.lock:
            self.counters.step = trainer.step_count
            self.counters.epoch = trainer.step_count / trainer.steps_per_epoch
            if math.isfinite(loss):
                self.counters.loss = loss
            self.counters.rounds = self.algorithm.iteration
            self.counters.mixes += 1 if self.algorithm.last_report.used else 0
        self._report_progress()
        self.snapshots.maybe(x, trainer.step_count)

    def _report_progress(self) -> None:
        """Tell the shell that counters moved, at most every PROGRESS_REPORT_S (a round can take microseconds)."""
        now = time.monotonic()
        if now - self._last_progress_report >= PROGRESS_REPORT_S:
            self._last_progress_report = now
            self.on_progress()

    def state(self) -> dict[str, Any]:
        """Checkpoint content. Call from the thread itself, or after it stopped."""
        model = self.trainer.model
        extra = {"result": self.algorithm.result_state()} if self.algorithm.trains_own_model else {}
        return {
            **extra,
            "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "trainer": self.trainer.state_dict(),
            "algorithm": self.algorithm.state_dict(),
            "counters": {k: v for k, v in self.counters.snapshot().items() if isinstance(v, (int, float, bool))},
        }
