"""Stochastic Gradient Push (Assran, Loizou, Ballas, Rabbat, ICML 2019; spec §7), on P3 running-sum push-sum.

Node i holds push-sum mass (x_i, w_i), with x_i = w_i = ... = the initial model and weight 1. One iteration:

1. x_i ← x_i − γ w_i m_i with m_i ← μ m_i + ∇F_i(z_i; ξ) (`momentum` μ, 0.9 by default as in the paper's
   experiments; 0 is the plain rule), z_i = x_i / w_i the de-biased model and γ = `oracle.lr()`. The factor
   w_i (`step_scale: weight`, the default) is this project's choice: it makes the step on z exactly γ∇F whatever
   the weight, where the published rule (`step_scale: none`) takes γ∇F / w_i, which explodes when a node's weight
   collapses (it pushed mass and heard nothing back: a late start or lost messages). Both agree when w_i = 1;
2. one push-sum mixing of (x_i, w_i): keep a 1/(k+1) share, push a share to each of the k out-peers heard from
   lately, and send the silent ones (`silent_iterations`) their running sum again without a new share
   (`peer.algorithms.pushsum.RunningSums`); what the neighbours pushed is applied as it arrives (`on_message`).
   Pushing shares over a dead link parked the network's mass in flight: at hundreds of iterations per second
   the weights beside a flapping link fell to 1e-16 and the model to NaN (with momentum 0.9). A node whose
   weight is below `weight_floor` pushes no new share at all until mass comes back: one that iterates while its
   neighbours are held or descheduled gives its weight away geometrically, and a fault-free 8-peer ring dipped
   to 7e-4 between two metrics samples;
3. z_i = x_i / w_i, the model `advance` returns (the one the daemon evaluates and checkpoints).

Asynchronous (pattern P3): no barrier, `ready` is always true, and messages are unkeyed latest-wins sends, because
a lost one is recovered by the next (running sums). Out-peers are every current neighbour, or with `one_peer` one
neighbour per iteration, cycling through them in sorted order (the paper's one-peer exponential-graph schedule
on whatever graph the daemon has). Each message carries P + 1 values (the model's running sum and the weight's),
float64 by default (see `pushsum` for why). A departed neighbour's in-flight mass is lost, which only perturbs
the average SGP optimizes around.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from peer.algorithms.base import (
    AlgoParams,
    Algorithm,
    InMessage,
    Manifest,
    MixReport,
    NeighbourView,
    Oracle,
    Send,
)
from peer.algorithms.pushsum import WEIGHT, RunningSums

WIRE_DTYPES = {"float64": torch.float64, "float32": torch.float32}


class SgpParams(AlgoParams):
    name: Literal["sgp"] = "sgp"
    one_peer: bool = Field(False, description="push to one neighbour per iteration (cycling) instead of all")
    wire_dtype: Literal["float64", "float32"] = Field(
        "float64", description="dtype of the running sums on the wire; float32 halves the bytes but loses precision"
    )
    momentum: float = Field(
        0.9,
        ge=0.0,
        lt=1.0,
        description="local heavy-ball momentum on the gradient, as in the paper's experiments (0 is the plain rule, "
        "3 to 24 points below the reference in the grid's cells; bench-results/grid.md)",
    )
    silent_iterations: int = Field(
        8,
        ge=1,
        description="a neighbour not heard from for this many of its iterations (counted in ours, at its measured "
        "pace) gets no new mass, only its running sum again, until it is heard from: shares pushed over a dead link "
        "are parked in flight, and at hundreds of iterations per second the weights beside a cut link fell to 1e-16",
    )
    weight_floor: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="a node whose push-sum weight is below this keeps its mass (its out-peers get their running sums "
        "again, no new share) until its in-neighbours' pushes lift it: a node that iterates while its neighbours "
        "are held gives away (d/(d+1))^k of its weight in k iterations, and near 1e-13 x/w has no precision left",
    )
    resend_s: float = Field(
        0.1,
        gt=0,
        description="while not iterating (held by pacing), send the latest running sums again this often, with "
        "nothing new in them: neighbours see this node alive and held rather than silent, and a lost message is "
        "recovered",
    )
    step_scale: Literal["weight", "none"] = Field(
        "weight",
        description="weight: x ← x − γ·w·∇F(z), so z moves by γ∇F(z) whatever w is; none: the published x ← x − γ∇F(z)",
    )


class Sgp(Algorithm):
    name: ClassVar[str] = "sgp"
    params_type: ClassVar[type[AlgoParams]] = SgpParams
    provenance: ClassVar[str] = "standard"
    default_max_steps_without_merge: ClassVar[int] = 1
    owns_local_update: ClassVar[bool] = True

    def __init__(self, params: AlgoParams, node_id: str) -> None:
        super().__init__(params, node_id)
        assert isinstance(params, SgpParams)
        self.p: SgpParams = params
        self.sums: RunningSums | None = None
        self.outbox: list[Send] = []
        self.buf: torch.Tensor | None = None  # heavy-ball buffer, local (never pushed: it is not mass)
        # Per neighbour, in our iterations: when it was first an out-peer, when we last heard from it, and how many
        # of ours pass per iteration of its own (moving average, from the iteration its messages carry).
        self._since: dict[str, int] = {}
        self._heard: dict[str, tuple[int, int]] = {}  # (our iteration, its iteration)
        self._pace: dict[str, float] = {}
        self._last_out: list[str] = []
        self._last_advance = self._last_send = -math.inf

    def start(self, x: torch.Tensor, now: float, view: NeighbourView) -> None:
        if self.sums is None:  # a checkpoint restore already set the mass
            self.sums = RunningSums({"params": x}, kind="push_sum", wire_dtype=WIRE_DTYPES[self.p.wire_dtype])

    def out_peers(self, view: NeighbourView) -> list[str]:
        nbrs = sorted(view.degrees)
        if self.p.one_peer and nbrs:
            return [nbrs[self.iteration % len(nbrs)]]
        return nbrs

    def advance(self, x: torch.Tensor, oracle: Oracle, now: float, view: NeighbourView) -> torch.Tensor:
        sums = self.sums
        assert sums is not None, "start() was not called"
        _, g = oracle.gradient(sums.estimate("params").to(x.dtype))
        # The published step moves z = x/w by γ∇F/w. A node that pushed mass but heard nothing back for a few
        # iterations (a late start, lost messages) has w ≪ 1, and that step blew the daemon's MLP up under 20%
        # message loss. Scaling by w keeps the de-biased step at γ∇F; with w ≈ 1 (steady state) they agree.
        scale = sums.weight if self.p.step_scale == "weight" else 1.0
        g = g.to(torch.float64)
        if self.p.momentum > 0:
            self.buf = g.clone() if self.buf is None else self.buf.mul_(self.p.momentum).add_(g)
            g = self.buf
        sums.add_mass("params", g * (-oracle.lr() * scale))
        out = self.out_peers(view)
        # Below the floor every out-peer is treated as silent: keeping all of one's mass is still a column of a
        # column-stochastic matrix (self-weight 1), so push-sum stays exact and the weight stays bounded below.
        keep = out if sums.weight < self.p.weight_floor else self.silent(out)
        payloads = sums.emit(out, step=self.iteration, resend_only=keep)
        # Latest wins: a payload not yet sent is superseded by the newer running sum.
        self.outbox = [Send(j, payloads[j]) for j in out]
        self._last_out, self._last_advance = out, now
        self.iteration += 1
        self.last_report = MixReport(tuple(out), (), 1.0 / (len(out) + 1))
        return sums.estimate("params").to(x.dtype)

    def silent(self, out: list[str]) -> list[str]:
        """Out-peers not heard from for `silent_iterations` of their own iterations: their link (or they) may be
        down, so they get their running sum again and no new share. False alarms cost only a little mixing (no mass
        is lost either way); a dead link costs the mass of `silent_iterations` shares instead of all of it."""
        k = self.iteration
        out_silent = []
        for j in out:
            since = self._since.setdefault(j, k)
            last = self._heard[j][0] if j in self._heard else since
            if k - last > self.p.silent_iterations * max(1.0, self._pace.get(j, 1.0)):
                out_silent.append(j)
        return out_silent

    def sends(self, now: float) -> list[Send]:
        out, self.outbox = self.outbox, []
        if out:
            self._last_send = now
        elif (
            self.sums is not None
            and self._last_out
            and min(now - self._last_send, now - self._last_advance) >= (self.p.resend_s)
        ):
            # Held (pacing, finish_together): without this a waiting node is silent, its neighbours cannot tell it
            # from a dead one, mark it late and run ahead alone (a lossy demo: one peer at epoch 47 of 60 while two
            # were at 6, 47.6%). The same step as our last iteration tells them we are held; a fresh sequence
            # number makes them apply it (a zero delta unless the last one was lost).
            payloads = self.sums.emit(self._last_out, step=self.iteration - 1, resend_only=self._last_out)
            out = [Send(j, payloads[j]) for j in self._last_out]
            self._last_send = now
        for s in out:
            assert sum(t.numel() for t in s.payload.tensors.values()) == s.payload.tensors["params"].numel() + 1
        return out

    def on_message(self, msg: InMessage, now: float) -> bool:
        if msg.payload.kind != "push_sum" or self.sums is None:
            return False
        if not self.sums.receive(msg.sender, msg.payload, incarnation=msg.incarnation):
            return False
        theirs, prev = msg.payload.step, self._heard.get(msg.sender)
        if prev is not None and theirs > prev[1]:
            ours_per_theirs = (self.iteration - prev[0]) / (theirs - prev[1])
            old = self._pace.get(msg.sender)
            self._pace[msg.sender] = ours_per_theirs if old is None else 0.8 * old + 0.2 * ours_per_theirs
        self._heard[msg.sender] = (self.iteration, theirs)
        return True

    def forget(self, node_id: str) -> None:
        if self.sums is not None:
            self.sums.forget(node_id)
        self.outbox = [s for s in self.outbox if s.to != node_id]
        self._last_out = [j for j in self._last_out if j != node_id]
        for d in (self._since, self._heard, self._pace):
            d.pop(node_id, None)

    def metrics(self) -> dict[str, float]:
        s = self.sums
        return {"weight": s.weight, "ignored": s.ignored, "resynced": s.resynced} if s is not None else {}

    def expected_by_kind(self, num_params: int) -> dict[str, Manifest]:
        dt = self.p.wire_dtype
        return {"push_sum": {"params": ((num_params,), dt), WEIGHT: ((1,), dt)}}

    def state_dict(self) -> dict[str, Any]:
        sums = self.sums.state_dict() if self.sums is not None else {}
        state: dict[str, Any] = {"iteration": self.iteration, "sums": sums}
        if self.buf is not None:
            state["momentum_buffer"] = self.buf.clone()  # a restart would otherwise lose the heavy-ball direction
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state.get("iteration", 0))
        buf = state.get("momentum_buffer")
        self.buf = buf.to(torch.float64).clone() if isinstance(buf, torch.Tensor) else None
        if state.get("sums"):
            self.sums = RunningSums({}, kind="push_sum", wire_dtype=WIRE_DTYPES[self.p.wire_dtype])
            self.sums.load_state_dict(state["sums"])
