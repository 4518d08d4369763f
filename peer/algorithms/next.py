"""NEXT for neural networks (Scardapane & Di Lorenzo 2017; spec §5): SCA local steps plus gradient tracking.

Reconstructed (spec v1). Agent i minimizes U(w) = Σ_i g_i(w) + r(w) (a sum over the I agents). Iteration n:

1. local SCA step  w̃_i = argmin_w g̃_i(w; w_i) + π̃_i^T (w − w_i) + r(w), with π̃_i = I·y_i − ∇g_i(w_i);
2. z_i = w_i + α[n] (w̃_i − w_i), with α[n] = α[n−1] (1 − ε α[n−1]);
3. w_i ← Σ_j c_ij z_j;   4. y_i ← Σ_j c_ij y_j + ∇g_i(w_i^new) − ∇g_i(w_i^old)   (y_i[0] = ∇g_i(w_i[0])).

Surrogates (`surrogate`): "linear" (S1, linearization plus (τ/2)||w − w_i||², closed forms for r = λ||w||² and
λ||w||₁, any loss) and "gauss_newton" (S2, squared loss g_i = ||r_i(w)||², needs an oracle with
`residuals_and_jacobian`, see `GaussNewtonOracle`). In both, ∇g_i + π̃_i = I·y_i, so the local step only needs the
tracker: S1 gives w̃ = w − I·y/τ (prox of r), S2 solves (2JᵀJ + (τ+2λ)·1) (w − w̃) = I·y + 2λw. The multi-core
local step splits w into `blocks` contiguous blocks solved in a thread pool (S2 then drops the off-diagonal
Jacobian blocks; S1 is separable, so it equals the serial step exactly), optionally on a random `block_fraction`.

Step sizes (`step`): "next" is the paper's rule, τ = `tau`, α[0] = `alpha0`, diminishing with `epsilon`.
"lr" (the daemon default, an engineering choice, reconstructed) sets α = 1 and τ = I / `oracle.lr()`, so that
with r = 0 the step is w̃ = w − lr·y: an SGD step of the configured learning rate along the tracked average
gradient y ≈ (1/I) Σ ∇g_i — for minibatch gradients of mean losses this is gradient tracking (DIGing) with the
centralized learning rate. The number of agents I comes from `view.members` when the shell knows the membership,
else from `num_agents`, else (last resort) 1 + the node's degree, which is right only on complete graphs.

Two network patterns: `next` (pattern P1, faithful) runs the synchronous iteration through the round synchronizer,
sending z and y (2P floats per neighbour per round). `next_pushsum` (P3, no barrier, a SONATA / Push-DIGing style
variant) keeps z and the tracker as push-sum mass sharing one weight φ, with y = Y/φ and Y ← Y + Δ∇g_i, so the
mass invariant Σ_i Y_i + (in flight) = Σ_i ∇g_i survives loss; 2P + 1 values per out-neighbour.

Tracker restarts (spec §5(c)). The invariant Σ_i y_i = Σ_i ∇g_i(w_i) breaks when mixing stops being doubly
stochastic or mass is lost: a neighbour departs (`forget`), the membership changes, a P1 round goes without a
frozen member's message (given up on) or takes one in again after leaving it out, or a node jumps rounds. The
node that sees it starts a new tracker *epoch* and restarts y_i ← ∇g_i(w_i) (its latest gradient); every message
carries its epoch, and a node that hears a higher epoch restarts too. (A dead neighbour that stays excluded round
after round costs one restart: the remaining nodes mix symmetrically among themselves.) Tracker mixing only
combines same-epoch values (P1: an edge whose two round messages carry different epochs is skipped on both sides,
which keeps the symmetric mixing sum-preserving). In `next_pushsum` an epoch is a fresh push-sum instance: Z = z
with weight φ = 1, Y = ∇g_i, every running sum restarted, and payloads of older epochs discarded; the weights
must restart too, because I·(Y_i/φ_i) estimates Σ_j ∇g_j only while the network's weight mass Σ φ equals I, and
a departure takes weight mass with it. Every node enters an epoch by a restart, so the invariant holds exactly
among the nodes of an epoch, and network-wide once the epoch has reached everyone. A restart costs a short
transient; a time-varying topology on a fixed membership does not trigger one.
"""

from __future__ import annotations

import concurrent.futures
import math
import random
import zlib
from collections.abc import Sequence
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from pydantic import Field, model_validator

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
from peer.algorithms.dpsgd import mix
from peer.algorithms.pushsum import WEIGHT, RunningSums
from peer.algorithms.sgp import WIRE_DTYPES
from peer.algorithms.sync import SynchronousAlgorithm, SyncParams
from peer.errors import ConfigError


@runtime_checkable
class GaussNewtonOracle(Protocol):
    """An oracle for the S2 surrogate: g_i(w) = ||r(w)||² with residuals r = f(w; x_m) − d_m."""

    def residuals_and_jacobian(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(r [m], J [m, P]) at x, J = ∂r/∂w."""
        ...


class NextCommon(AlgoParams):
    """The parameters `next` and `next_pushsum` share."""

    surrogate: Literal["linear", "gauss_newton"] = Field(
        "linear", description="S1 linearization (any loss) or S2 Gauss–Newton (squared loss, needs residuals)"
    )
    regularizer: Literal["none", "l2", "l1"] = Field("none", description="r(w): none, λ||w||₂² or λ||w||₁")
    lam: float = Field(0.0, ge=0.0, description="regularization weight λ")
    step: Literal["next", "lr"] = Field(
        "lr", description="'next': τ and the diminishing α rule; 'lr': α = 1, τ = I / lr (an SGD step of size lr)"
    )
    tau: float = Field(1.0, gt=0.0, description="proximal weight τ_i of the surrogate (step 'next'); ~ I·L_i")
    alpha0: float = Field(0.1, gt=0.0, le=1.0, description="α[0] of the diminishing step rule (step 'next')")
    epsilon: float = Field(0.01, gt=0.0, lt=1.0, description="ε in α[n] = α[n−1](1 − ε α[n−1]) (step 'next')")
    num_agents: int = Field(0, ge=0, description="I when the membership is unknown (0: 1 + degree)")
    blocks: int = Field(1, ge=1, description="contiguous parameter blocks of the local step")
    parallel_workers: int = Field(1, ge=1, description="threads solving blocks concurrently (1: serial)")
    block_fraction: float = Field(1.0, gt=0.0, le=1.0, description="share of blocks updated per iteration (random)")
    seed: int = Field(0, description="seed of the random block selection (mixed with the node id)")

    @model_validator(mode="after")
    def _check(self) -> NextCommon:
        if self.surrogate == "gauss_newton" and self.regularizer == "l1":
            raise ValueError("surrogate 'gauss_newton' supports regularizer 'none' or 'l2', not 'l1'")
        return self


class NextParams(SyncParams, NextCommon):
    name: Literal["next"] = "next"


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


def soft(u: torch.Tensor, kappa: float) -> torch.Tensor:
    """Soft thresholding sign(u)·max(|u| − κ, 0), the prox of κ||·||₁."""
    return torch.sign(u) * torch.clamp(u.abs() - kappa, min=0.0)


def num_agents(view: NeighbourView, configured: int) -> int:
    """I: the membership size when known, else the configured value, else 1 + degree (see module)."""
    if view.members:
        return len(view.members)
    return configured or 1 + view.self_degree


class LocalStep:
    """The SCA local step and the step-size rule of one agent, shared by `next` and `next_pushsum`."""

    def __init__(self, p: NextCommon, node_id: str) -> None:
        self.p = p
        self.alpha = p.alpha0
        self.rng = random.Random(p.seed * 1_000_003 + zlib.crc32(node_id.encode()))
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def gradient(self, w: torch.Tensor, oracle: Oracle) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(∇g_i(w), J or None): S2 takes the gradient 2Jᵀr from the residuals, S1 asks the oracle."""
        if self.p.surrogate == "linear":
            return oracle.gradient(w)[1].clone(), None  # clone: an oracle may reuse its buffer
        if not isinstance(oracle, GaussNewtonOracle):
            raise ConfigError(
                "the Gauss–Newton surrogate needs an oracle with residuals_and_jacobian (a squared loss); "
                "use surrogate 'linear'",
                field="algorithm.surrogate",
            )
        r, jac = oracle.residuals_and_jacobian(w)
        return 2.0 * (jac.T @ r), jac

    def step_sizes(self, oracle: Oracle, agents: int) -> tuple[float, float]:
        """(τ, α) for this iteration; advances the diminishing rule. τ = inf means: no step (lr = 0)."""
        if self.p.step == "lr":
            lr = oracle.lr()
            return (agents / lr if lr > 0 else math.inf), 1.0
        alpha = self.alpha
        self.alpha = alpha * (1.0 - self.p.epsilon * alpha)
        return self.p.tau, alpha

    def __call__(
        self, w: torch.Tensor, y: torch.Tensor, jac: torch.Tensor | None, agents: int, oracle: Oracle
    ) -> torch.Tensor:
        """z = w + α (w̃ − w) for this iteration."""
        tau, alpha = self.step_sizes(oracle, agents)
        if math.isinf(tau):
            return w.clone()
        w_tilde = self.solve(w, y, jac, agents, tau)
        return w + alpha * (w_tilde - w)

    def solve(
        self, w: torch.Tensor, y: torch.Tensor, jac: torch.Tensor | None, agents: int, tau: float
    ) -> torch.Tensor:
        """w̃, block by block (all blocks, or a random `block_fraction` of them; the others keep w̃ = w)."""
        bounds = block_bounds(w.numel(), self.p.blocks)
        chosen = list(range(len(bounds)))
        if self.p.block_fraction < 1.0:
            k = max(1, math.ceil(self.p.block_fraction * len(bounds)))
            chosen = sorted(self.rng.sample(chosen, k))
        out = w.clone()

        def one(b: int) -> None:
            lo, hi = bounds[b]
            out[lo:hi] = self._solve_block(w[lo:hi], y[lo:hi], None if jac is None else jac[:, lo:hi], agents, tau)

        if self.p.parallel_workers > 1 and len(chosen) > 1:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.p.parallel_workers, "next-block")
            list(self._pool.map(one, chosen))  # list(): re-raise a worker's exception here
        else:
            for b in chosen:
                one(b)
        return out

    def _solve_block(
        self, w: torch.Tensor, y: torch.Tensor, jac: torch.Tensor | None, agents: int, tau: float
    ) -> torch.Tensor:
        lam = self.p.lam if self.p.regularizer != "none" else 0.0
        if jac is not None:  # S2: (2JᵀJ + c·1) d = I·y + 2λw, c = τ + 2λ; Woodbury when J is wide
            c = tau + 2.0 * lam
            rhs = agents * y + 2.0 * lam * w
            m, n = jac.shape
            if m < n:
                small = 0.5 * c * torch.eye(m, dtype=w.dtype) + jac @ jac.T
                d = (rhs - jac.T @ torch.linalg.solve(small, jac @ rhs)) / c
            else:
                d = torch.linalg.solve(2.0 * jac.T @ jac + c * torch.eye(n, dtype=w.dtype), rhs)
            return w - d
        if self.p.regularizer == "l2":
            return (tau * w - agents * y) / (tau + 2.0 * lam)
        u = w - (agents / tau) * y
        return soft(u, lam / tau) if self.p.regularizer == "l1" else u


def block_bounds(n: int, blocks: int) -> list[tuple[int, int]]:
    """`blocks` contiguous [lo, hi) ranges covering 0..n, sizes differing by at most one (no empty ones)."""
    b = max(1, min(blocks, n))
    edges = [round(k * n / b) for k in range(b + 1)]
    return [(edges[k], edges[k + 1]) for k in range(b)]


def refuse_gauss_newton_in_daemon(surrogate: str) -> None:
    """The daemon's models are classifiers trained with cross-entropy: S2 needs a squared loss and Jacobians."""
    if surrogate == "gauss_newton":
        raise ConfigError(
            "'gauss_newton' needs a squared loss with residuals and Jacobians; the daemon's classifiers use "
            "cross-entropy, so use 'linear' (the S2 surrogate is available to library users through "
            "GaussNewtonOracle)",
            field="algorithm.surrogate",
        )


# ---------------------------------------------------------------------------------------------------------
class Next(SynchronousAlgorithm):
    """NEXT on the P1 synchronizer: round n sends (z_i[n], y_i[n]); its update gives w[n+1], y[n+1], z[n+1]."""

    name: ClassVar[str] = "next"
    params_type: ClassVar[type[AlgoParams]] = NextParams
    provenance: ClassVar[str] = "reconstructed (spec v1)"
    kinds: ClassVar[tuple[str, ...]] = ("tracker",)

    def __init__(self, params: AlgoParams, node_id: str) -> None:
        super().__init__(params, node_id)
        assert isinstance(params, NextParams)
        self.p: NextParams = params
        self.local = LocalStep(params, node_id)
        # w_i[n], y_i[n], ∇g_i(w_i[n]) and z_i[n] of the current round n (None before the first advance).
        self.w: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.g: torch.Tensor | None = None
        self.z: torch.Tensor | None = None
        self.epoch = 0  # tracker epoch (see module)
        self.sent_epoch = 0  # the epoch this round's message carries
        self.restarts = 0
        self._members: frozenset[str] = frozenset()
        self._missing: set[str] = set()  # frozen members whose message the last round went without

    def bind_data(self, input_dim: int, num_classes: int) -> None:
        refuse_gauss_newton_in_daemon(self.p.surrogate)

    def _init(self, x: torch.Tensor, oracle: Oracle, view: NeighbourView) -> None:
        """y = ∇g_i(w), z from a local step: the paper's initialization, and a restart after a jump."""
        self.w = x.clone()
        self.g, jac = self.local.gradient(self.w, oracle)
        self.y = self.g.clone()
        self.z = self.local(self.w, self.y, jac, num_agents(view, self.p.num_agents), oracle)

    def start(self, x: torch.Tensor, now: float, view: NeighbourView) -> None:
        # Round 0's message needs y[0] = ∇g_i(w[0]), so round 0 opens in the first advance, which has the oracle.
        self._members = view.members

    def ready(self, now: float, view: NeighbourView) -> bool:
        return self.sync.round < 0 or super().ready(now, view)

    def advance(self, x: torch.Tensor, oracle: Oracle, now: float, view: NeighbourView) -> torch.Tensor:
        if self.sync.round < 0:
            self._init(x, oracle, view)
            self._open(self.iteration, x, now, view)
            return x
        if self.sync.jump_to is not None:  # the others went on without us: restart here and everywhere
            self._init(x, oracle, view)
            self._missing = set()
            self.epoch += 1
            self.restarts += 1
            return super().advance(x, oracle, now, view)
        if view.members and self._members and view.members != self._members:
            self.epoch += 1
        self._members = view.members or self._members
        return super().advance(x, oracle, now, view)

    def round_messages(self, x: torch.Tensor, round_: int, to: Sequence[str]) -> dict[str, Payload]:
        assert self.z is not None and self.y is not None
        self.sent_epoch = self.epoch
        payload = Payload(
            "tracker",
            {"params": self.z.clone(), "tracker": self.y.clone()},
            seq=round_ + 1,
            round=round_,
            scalars={"epoch": float(self.epoch)},
        )
        assert payload_floats(payload) == 2 * self.z.numel()
        return {j: payload for j in to}

    def update(
        self, x: torch.Tensor, received: dict[str, Payload], weights: dict[str, float], oracle: Oracle
    ) -> torch.Tensor:
        assert self.z is not None and self.y is not None and self.g is not None
        w_new = mix(self.z, {j: p.tensors["params"] for j, p in received.items()}, weights)
        g_new, jac = self.local.gradient(w_new, oracle)
        epochs = {j: int(p.scalars.get("epoch", 0)) for j, p in received.items()}
        # A member left out of the round (given up on, or forgotten) may still have used our message, and one that
        # is back may have used ours while we ignored its: either way the mixing was not symmetric, so restart.
        missing = set(self.frozen_view.degrees) - set(received)
        if missing - self._missing or self._missing & set(received):
            self.epoch += 1
        self._missing = missing
        self.epoch = max([self.epoch, *epochs.values()])
        if self.epoch > self.sent_epoch:
            y_new = g_new.clone()
            self.restarts += 1
        else:
            same = {j: c for j, c in weights.items() if epochs[j] == self.sent_epoch}
            y_new = mix(self.y, {j: received[j].tensors["tracker"] for j in same}, same)
            y_new.add_(g_new).sub_(self.g)
        self.w, self.g, self.y = w_new, g_new, y_new
        self.z = self.local(w_new, y_new, jac, num_agents(self.frozen_view, self.p.num_agents), oracle)
        return w_new.clone()

    def forget(self, node_id: str) -> None:
        super().forget(node_id)
        self.epoch += 1

    def metrics(self) -> dict[str, float]:
        return {**super().metrics(), "epoch": self.epoch, "restarts": self.restarts}

    def expected_by_kind(self, num_params: int) -> dict[str, Manifest]:
        return {"tracker": {"params": ((num_params,), "float32"), "tracker": ((num_params,), "float32")}}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "alpha": self.local.alpha, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.local.alpha = float(state.get("alpha", self.p.alpha0))
        # The first advance re-initializes the tracker locally; a new epoch makes every node restart with it.
        self.epoch = int(state.get("epoch", 0)) + 1


# ---------------------------------------------------------------------------------------------------------
class NextPushsum(Algorithm):
    """NEXT with P3 running-sum push-sum on z and on the tracker (no barrier); see the module docstring."""

    name: ClassVar[str] = "next_pushsum"
    params_type: ClassVar[type[AlgoParams]] = NextPushsumParams
    provenance: ClassVar[str] = "reconstructed (spec v1)"
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
