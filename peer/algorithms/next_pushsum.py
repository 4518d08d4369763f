"""NEXT with push-sum (`next_pushsum`, pattern P3): z and the gradient tracker as push-sum mass, no barrier.

The local step, the step sizes and the tracker epochs are shared with `next`; see peer/algorithms/next.py."""

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
    Payload,
    Send,
    payload_floats,
)
from peer.algorithms.next import LocalStep, NextCommon, num_agents, refuse_gauss_newton_in_daemon
from peer.algorithms.pushsum import WEIGHT, RunningSums
from peer.algorithms.sgp import WIRE_DTYPES


class NextPushsumParams(NextCommon):
    name: Literal["next_pushsum"] = "next_pushsum"
    wire_dtype: Literal["float64", "float32"] = Field(
        "float64", description="dtype of the running sums on the wire; float32 halves the bytes but loses precision"
    )
    min_weight: float = Field(
        0.5, ge=0.0, description="iterate only while the push-sum weight is at least this (or after max_wait_s)"
    )
    max_wait_s: float = Field(1.0, gt=0, description="longest wait for incoming mass before iterating anyway")
    resend_s: float = Field(0.05, gt=0, description="while waiting, re-send the latest running sums this often")


class NextPushsum(Algorithm):
    """NEXT with P3 running-sum push-sum on z and on the tracker (no barrier); see peer.algorithms.next."""

    name: ClassVar[str] = "next_pushsum"
    params_type: ClassVar[type[AlgoParams]] = NextPushsumParams
    provenance: ClassVar[str] = "reconstructed (spec v1)"
    default_max_steps_without_merge: ClassVar[int] = 1
    owns_local_update: ClassVar[bool] = True

    def __init__(self, params: AlgoParams, node_id: str) -> None:
        super().__init__(params, node_id)
        assert isinstance(params, NextPushsumParams)
        self.p: NextPushsumParams = params
        self.local = LocalStep(params, node_id)
        self.sums: RunningSums | None = None
        self.g: torch.Tensor | None = None  # ∇g_i at the last advance (float64); the tracker mass includes it
        self.epoch = 0
        self.restarts = 0
        self.outbox: list[Send] = []
        self._members: frozenset[str] = frozenset()
        self._last_payloads: dict[str, Payload] = {}
        self._last_advance = -math.inf
        self._last_send = -math.inf
        self.waits = 0  # times `ready` held an iteration back for incoming mass
        self.resends = 0

    def bind_data(self, input_dim: int, num_classes: int) -> None:
        refuse_gauss_newton_in_daemon(self.p.surrogate)

    def ready(self, now: float, view: NeighbourView) -> bool:
        """Iterate while the weight is healthy. The tracker estimate is Y/φ: a node that pushed its mass away and
        heard nothing back (a late start, lost messages) has φ ≪ 1, which multiplies every tracked gradient
        change by 1/φ — under 20% message loss that blew the daemon's MLP up. Waiting for incoming mass keeps the
        invariants exact; `max_wait_s` keeps a node whose neighbours are gone from waiting forever."""
        if self.sums is None or not view.degrees or self.sums.weight >= self.p.min_weight:
            return True
        if now - self._last_advance >= self.p.max_wait_s:
            return True
        self.waits += 1
        return False

    def start(self, x: torch.Tensor, now: float, view: NeighbourView) -> None:
        if self.sums is None:
            x64 = x.detach().to(torch.float64)
            self.sums = RunningSums(
                {"params": x64, "tracker": torch.zeros_like(x64)}, wire_dtype=WIRE_DTYPES[self.p.wire_dtype]
            )
        self._members = view.members

    def _new_epoch(self, epoch: int) -> None:
        """Enter `epoch`: a fresh push-sum instance with Z = z (φ = 1) and Y = the latest gradient (see module)."""
        self._last_payloads = {}  # sums of the old instance must not be repeated
        assert self.sums is not None
        self.epoch = epoch
        z = self.sums.estimate("params")
        g = self.g if self.g is not None else torch.zeros_like(z)
        self.sums.restart({"params": z, "tracker": g}, 1.0)
        self.restarts += 1

    @property
    def y(self) -> torch.Tensor:
        """The de-biased tracker Y / φ."""
        assert self.sums is not None
        return self.sums.estimate("tracker")

    def advance(self, x: torch.Tensor, oracle: Oracle, now: float, view: NeighbourView) -> torch.Tensor:
        sums = self.sums
        assert sums is not None, "start() was not called"
        if view.members and self._members and view.members != self._members:
            self._new_epoch(self.epoch + 1)
        self._members = view.members or self._members
        w = sums.estimate("params")
        g, jac = self.local.gradient(w.to(x.dtype), oracle)
        g = g.to(torch.float64)
        sums.add_mass("tracker", g if self.g is None else g - self.g)
        self.g = g
        jac64 = None if jac is None else jac.to(torch.float64)
        z = self.local(w, sums.estimate("tracker"), jac64, num_agents(view, self.p.num_agents), oracle)
        sums.set("params", z)
        out = sorted(view.degrees)
        payloads = sums.emit(out, step=self.iteration, scalars={"epoch": float(self.epoch)})
        for pl in payloads.values():
            assert payload_floats(pl) == 2 * z.numel() + 1
        self.outbox = [Send(j, payloads[j]) for j in out]  # latest wins
        self._last_payloads = dict(payloads)
        self._last_advance = now
        self.iteration += 1
        self.last_report = MixReport(tuple(out), (), 1.0 / (len(out) + 1))
        return z.to(x.dtype)

    def sends(self, now: float) -> list[Send]:
        out, self.outbox = self.outbox, []
        if out:
            self._last_send = now
        elif (
            self._last_payloads
            and now - self._last_send >= self.p.resend_s
            and now - self._last_advance >= self.p.resend_s
        ):
            # Not iterating (waiting for mass): repeat the latest running sums. Receivers ignore a copy they
            # already applied (same sequence number), so this only recovers messages that were lost.
            out = [Send(j, pl) for j, pl in sorted(self._last_payloads.items())]
            self._last_send = now
            self.resends += 1
        return out

    def on_message(self, msg: InMessage, now: float) -> bool:
        if msg.payload.kind != "push_sum" or self.sums is None:
            return False
        ep = int(msg.payload.scalars.get("epoch", 0))
        if ep < self.epoch:
            return False  # mass of an abandoned epoch; the sender joins ours when it hears from us
        if ep > self.epoch:
            self._new_epoch(ep)
        return self.sums.receive(msg.sender, msg.payload, incarnation=msg.incarnation)

    def forget(self, node_id: str) -> None:
        if self.sums is not None:
            self.sums.forget(node_id)
            self._new_epoch(self.epoch + 1)
        self.outbox = [s for s in self.outbox if s.to != node_id]

    def metrics(self) -> dict[str, float]:
        s = self.sums
        extra = {"weight": s.weight, "ignored": s.ignored, "resynced": s.resynced} if s is not None else {}
        return {"epoch": self.epoch, "restarts": self.restarts, "waits": self.waits, "resends": self.resends, **extra}

    def expected_by_kind(self, num_params: int) -> dict[str, Manifest]:
        dt = self.p.wire_dtype
        return {"push_sum": {"params": ((num_params,), dt), "tracker": ((num_params,), dt), WEIGHT: ((1,), dt)}}

    def state_dict(self) -> dict[str, Any]:
        sums = self.sums.state_dict() if self.sums is not None else {}
        return {"iteration": self.iteration, "alpha": self.local.alpha, "epoch": self.epoch, "sums": sums}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state.get("iteration", 0))
        self.local.alpha = float(state.get("alpha", self.p.alpha0))
        if state.get("sums"):
            self.sums = RunningSums({}, wire_dtype=WIRE_DTYPES[self.p.wire_dtype])
            self.sums.load_state_dict(state["sums"])
            # The tracker mass is stale after a restart: a new epoch makes every node restart its tracker.
            self._new_epoch(int(state.get("epoch", 0)) + 1)
