"""P1, the round synchronizer (spec §1.4): round-tagged reliable messages and a frozen neighbour set per round.

A node in round k has sent its round-k message to every member of the round's frozen neighbour set and may
advance once it holds the round-k message of every member. That reproduces a synchronous algorithm exactly on
a lossy, reordering, duplicating network:

* every round-k message is retransmitted until acknowledged. An acknowledgement is either explicit (`ack`, the
  daemon's RPC success or a simulated ACK packet) or implicit: a neighbour's round-r message proves it finished
  every round before r, so it holds all our messages for those rounds. The retransmission timeout adapts to
  the measured round trip (`rto.RetransmitTimer`, as TCP's), at most `retransmit_s`, which is also the timeout
  before the first sample: a lost message on a LAN costs milliseconds, not the worst-case timeout;
* the receiver de-duplicates by (sender, round) and buffers messages of later rounds (a neighbour can be at
  most one round ahead of a member that waits for it, but a jump can put it further);
* the neighbour set is frozen when a round opens; membership changes take effect at the next round, where the
  algorithm recomputes its mixing weights;
* liveness over exactness: a member silent for `give_up_s` after the round opened is excluded from that round
  (counted in `gave_up`), so a dead or partitioned neighbour cannot stall training forever. It stays excluded
  from later rounds without a new wait until a message from it arrives again (otherwise every round would cost
  `give_up_s` until membership evicts it). Such rounds mix over fewer neighbours, which is not the synchronous
  algorithm any more, and the counter says so;
* a message from a round beyond k + 1 means this node fell behind (it restarted, or was cut off): `jump_to`
  tells the algorithm to continue from that round with its current state instead of replaying the gap.

Pure: no clock, no I/O. `now` comes from the caller.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from peer.algorithms.base import (
    AlgoParams,
    Algorithm,
    InMessage,
    MixReport,
    NeighbourView,
    Oracle,
    Payload,
    Send,
)
from peer.algorithms.mixing import WEIGHT_RULES
from peer.algorithms.rto import RetransmitTimer


@dataclass
class _Pending:
    payload: Payload
    last_sent: float | None = None  # None: never sent yet
    sends: int = 0


@dataclass
class RoundSync:
    node_id: str
    retransmit_s: float = 0.5  # the largest retransmission timeout, and the one used before any RTT sample
    give_up_s: float = 30.0
    retransmissions: int = 0
    round: int = -1  # -1 until the first round opens
    members: frozenset[str] = frozenset()
    opened_at: float = 0.0
    gave_up: int = 0  # members excluded from a round after give_up_s of silence (each counts once per round)
    duplicates: int = 0
    stale: int = 0
    jump_to: int | None = None
    _excluded: set[str] = field(default_factory=set)
    _silent: set[str] = field(default_factory=set)  # given up on, and not heard from since
    _received: dict[int, dict[str, Payload]] = field(default_factory=dict)
    _pending: dict[tuple[str, int], _Pending] = field(default_factory=dict)
    timer: RetransmitTimer = field(init=False)

    def __post_init__(self) -> None:
        self.timer = RetransmitTimer(max_s=self.retransmit_s)

    # ------------------------------------------------------------------------------------------ rounds
    def open(self, round_: int, messages: Mapping[str, Payload], now: float) -> None:
        """Start `round_` with one message per member (the keys of `messages` are the frozen members)."""
        if round_ <= self.round:
            raise ValueError(f"round {round_} is not after the current round {self.round}")
        self.round = round_
        self.members = frozenset(messages)
        self.opened_at = now
        self._excluded = self._silent & self.members
        if self.jump_to is not None and self.jump_to <= round_:
            self.jump_to = None
        for r in [r for r in self._received if r < round_]:
            del self._received[r]
        for to, payload in messages.items():
            if payload.round != round_:
                raise ValueError(f"message for {to} is tagged round {payload.round}, not {round_}")
            self._pending[(to, round_)] = _Pending(payload)

    def complete(self, now: float) -> bool:
        """Does this node hold the current round's message from every member (or gave up on the silent ones)?"""
        if self.jump_to is not None:
            return True
        missing = self.missing()
        if missing and now - self.opened_at >= self.give_up_s:
            self._excluded |= missing
            self._silent |= missing
            self.gave_up += len(missing)
            missing = set()
        return not missing

    def missing(self) -> set[str]:
        got = self._received.get(self.round, {})
        return set(self.members) - set(got) - self._excluded

    def take(self) -> dict[str, Payload]:
        """The current round's messages from members (call once `complete`)."""
        got = self._received.get(self.round, {})
        return {j: got[j] for j in sorted(self.members) if j in got and j not in self._excluded}

    # ---------------------------------------------------------------------------------------- receiving
    def receive(self, sender: str, payload: Payload) -> bool:
        """Store a round-tagged message. False for duplicates and for rounds already finished."""
        r = payload.round
        self._silent.discard(sender)
        # Implicit acknowledgement: a round-r message means the sender finished every round before r.
        for key in [k for k in self._pending if k[0] == sender and k[1] < r]:
            del self._pending[key]
        if r < self.round:
            self.stale += 1
            return False
        slot = self._received.setdefault(r, {})
        if sender in slot:
            self.duplicates += 1
            return False
        slot[sender] = payload
        if r > self.round + 1 and self.round >= 0:
            self.jump_to = max(self.jump_to or 0, r)
        return True

    def ack(self, to: str, key: tuple[int, ...], now: float | None = None) -> None:
        if not key:
            return
        p = self._pending.pop((to, key[0]), None)
        if p is not None:
            self.timer.acknowledged(p.last_sent, p.sends, now)

    @property
    def timeout_s(self) -> float:
        """The current retransmission timeout."""
        return self.timer.timeout_s

    # ------------------------------------------------------------------------------------------ sending
    def due(self, now: float) -> list[Send]:
        """Messages never sent, or unacknowledged for `retransmit_s`; marks them sent at `now`."""
        out: list[Send] = []
        timeout = self.timeout_s
        for (to, r), p in sorted(self._pending.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            if p.last_sent is None or now - p.last_sent >= timeout:
                if p.last_sent is not None:
                    self.retransmissions += 1
                p.last_sent = now
                p.sends += 1
                out.append(Send(to, p.payload, (r,)))
        return out

    def ahead(self) -> bool:
        """Has a message of a later round arrived? Its sender finished our round and now waits for us."""
        return any(r > self.round and got for r, got in self._received.items())

    def unacked(self) -> int:
        return len(self._pending)

    def forget(self, node_id: str) -> None:
        """`node_id` left or restarted: stop waiting for it and stop sending to it."""
        self._excluded.add(node_id)
        self._silent.discard(node_id)
        for key in [k for k in self._pending if k[0] == node_id]:
            del self._pending[key]
        for slot in self._received.values():
            slot.pop(node_id, None)


# ---------------------------------------------------------------------------------------------------------
# The template every P1 algorithm builds on (dpsgd, dmsgd, local_sgd, next, choco, dssfn).


class SyncParams(AlgoParams):
    """Parameters every P1 algorithm shares (`algorithm.retransmit_s` and so on)."""

    weights: Literal["metropolis", "uniform"] = Field(
        "metropolis", description="mixing weights: Metropolis–Hastings, or uniform 1/(d + 1) (regular graphs)"
    )
    retransmit_s: float = Field(
        0.5, gt=0, description="largest retransmission timeout (the timeout adapts to the measured round trip)"
    )
    give_up_s: float = Field(10.0, gt=0, description="a neighbour silent this long is left out of the round")


class SynchronousAlgorithm(Algorithm):
    """A synchronous iteration run through the P1 synchronizer.

    Subclasses say what round k sends (`round_messages`) and how round k's messages turn the state into round
    k + 1's (`update`). This base class freezes the neighbour set and the mixing weights per round, handles
    retransmission, acknowledgement, de-duplication, jumps and churn, and numbers the rounds.
    """

    owns_local_update: ClassVar[bool] = True
    kinds: ClassVar[tuple[str, ...]] = ("state",)

    def __init__(self, params: AlgoParams, node_id: str) -> None:
        super().__init__(params, node_id)
        assert isinstance(params, SyncParams)
        self.sp: SyncParams = params
        self.sync = RoundSync(node_id, retransmit_s=params.retransmit_s, give_up_s=params.give_up_s)
        self.frozen_view = NeighbourView(node_id, {})
        self.jumps = 0

    # ----------------------------------------------------------------------------------- subclass hooks
    @abc.abstractmethod
    def round_messages(self, x: torch.Tensor, round_: int, to: Sequence[str]) -> dict[str, Payload]:
        """Round `round_`'s message to each of `to` (payload.round must be `round_`)."""

    @abc.abstractmethod
    def update(
        self, x: torch.Tensor, received: dict[str, Payload], weights: dict[str, float], oracle: Oracle
    ) -> torch.Tensor:
        """x_{k+1} from x_k and the round-k messages; `weights` holds w_ij for the neighbours that delivered
        (the self weight is 1 − their sum)."""

    def on_jump(self, x: torch.Tensor, from_round: int, to_round: int) -> None:
        """The node skipped rounds (it restarted or was cut off); reset per-round state that depends on them."""

    # ------------------------------------------------------------------------------------------ plumbing
    def _open(self, round_: int, x: torch.Tensor, now: float, view: NeighbourView) -> None:
        self.frozen_view = view
        self.sync.open(round_, self.round_messages(x, round_, sorted(view.degrees)), now)

    def start(self, x: torch.Tensor, now: float, view: NeighbourView) -> None:
        self.open_round(x, None, now, view)

    def ready(self, now: float, view: NeighbourView) -> bool:
        return self.sync.complete(now)

    def mixing_weights(self, senders: Sequence[str]) -> dict[str, float]:
        """w_ij over the frozen round's neighbours, restricted to those whose message arrived."""
        v = self.frozen_view
        all_w = WEIGHT_RULES[self.sp.weights](v.self_degree, v.degrees)
        return {j: all_w[j] for j in senders}

    def open_round(self, x: torch.Tensor, oracle: Oracle | None, now: float, view: NeighbourView) -> None:
        """Open round `self.iteration` with state `x`. Algorithms whose round message needs the oracle (a
        gradient: CHOCO's compressed half-step) override this and `start`; the round then opens in `advance`,
        which has the oracle (`oracle` is None only when called from `start`)."""
        self._open(self.iteration, x, now, view)

    def advance(self, x: torch.Tensor, oracle: Oracle, now: float, view: NeighbourView) -> torch.Tensor:
        target = self.sync.jump_to
        if target is not None:
            self.jumps += 1
            self.on_jump(x, self.iteration, target)
            self.iteration = target
            self.open_round(x, oracle, now, view)
            return x
        if self.sync.round < 0:  # round 0 was left to the first advance (see `open_round`)
            self.open_round(x, oracle, now, view)
            return x
        received = self.sync.take()
        weights = self.mixing_weights(list(received))
        self.last_report = MixReport(tuple(received), (), 1.0 - sum(weights.values()))
        x_new = self.update(x, received, weights, oracle)
        self.iteration += 1
        self.open_round(x_new, oracle, now, view)
        return x_new

    def sends(self, now: float) -> list[Send]:
        return self.sync.due(now)

    def neighbours_waiting(self) -> bool:
        return self.sync.ahead()

    def on_ack(self, to: str, key: tuple[int, ...], now: float) -> None:
        self.sync.ack(to, key, now)

    def on_message(self, msg: InMessage, now: float) -> bool:
        if msg.payload.kind not in self.kinds:
            return False
        return self.sync.receive(msg.sender, msg.payload)

    def forget(self, node_id: str) -> None:
        self.sync.forget(node_id)

    def metrics(self) -> dict[str, float]:
        s = self.sync
        return {
            "round": s.round,
            "gave_up": s.gave_up,
            "duplicates": s.duplicates,
            "stale": s.stale,
            "jumps": self.jumps,
            "unacked": s.unacked(),
            "retransmissions": s.retransmissions,
            "rto_s": s.timeout_s,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state.get("iteration", 0))
