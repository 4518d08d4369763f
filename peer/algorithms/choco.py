"""CHOCO-SGD (Koloskova, Stich, Jaggi, ICML 2019; spec §7): decentralized SGD with compressed gossip, run on P1.

Node i keeps its iterate x_i, its public copy x̂_i and a replica x̂_j of each neighbour's public copy. Iteration t:

1. x^{t+½} = x^t − η ∇F_i(x^t; ξ)                      (η = `oracle.lr()`)
2. q_i = Q(x^{t+½} − x̂_i), sent to every neighbour     (round t's message, kind "delta": the compressor's tensors)
3. x̂_j += q_j for j ∈ N_i+                              (every holder applies the same decoded q_j)
4. x^{t+1} = x^{t+½} + γ Σ_j w_ij (x̂_j − x̂_i)

The replicas only stay identical if every q_j is applied exactly once, so the algorithm runs on the P1 round
synchronizer (retransmission, de-duplication by (sender, round)): a lossy run equals the lossless one bit for bit.
The sender applies the *decoded* q (what the receivers decode), never the uncompressed difference. Unbiased
compressors (qsgd) are scaled by 1/(1 + ω) first, on both sides, which makes them contractive as CHOCO requires.

Pipelining. Round t's message needs x^{t+½}, hence a gradient, and `start` has no oracle: the first `advance`
only takes the half-step and opens round 0 (it returns x unchanged and completes no iteration); every later
`advance` finishes round t (steps 3–4) and then takes round t+1's half-step and opens it.

Stale replicas (the synchronous algorithm has none). A replica is valid only while every q of its owner has been
applied, so after each round the node keeps exactly the replicas it refreshed with that round's message; a
neighbour that was left out (give-up after `give_up_s`, not in the frozen set, forgotten, or a jump) loses its
replica and is dropped from the mix (an asymmetric, not doubly stochastic, step; the sync's `gave_up` counter
says so). Replicas are re-established with a *reset*: a round message of kind "state" that carries the sender's
full public copy ("hat", before this round's q) along with the compressed q. A node sends a reset to a member

* that flagged `resync` in its previous round's message (sent while it holds no valid replica of us), unless
  our previous message to it was already a reset (its flag predates that reset);
* that is new in the frozen set, or was forgotten (it may have restarted);
* to every member after a discontinuity of its own: a jump, or a restart from a checkpoint (`state_dict` keeps
  only the iteration; the public copy restarts at x and the replicas are rebuilt from resets).

A fresh start (iteration 0) needs no reset: every public copy starts at 0, as in the paper. A reset costs one
uncompressed model for each link it re-establishes.

Robust aggregation (`robust`, see peer.algorithms.robust) acts on the consensus step only: step 4 uses
R(x̂_j) − x̂_i, where R is the rule applied to the round's refreshed replicas around our own public copy x̂_i. The
replicas themselves stay exact (every holder must apply the same q's, or they desynchronise for good), so a
hostile neighbour can make its replica anything, but only a clipped (or trimmed) version of it moves our iterate.

Step size γ (`gamma`): the consensus step, tuned per compressor in the paper. The default 0.2 is for top-k with
k ≈ 10% of P. In our simulations (8-node ring, least squares, P = 50 and P = 2000) top-10% was stable up to
γ = 0.4 and diverged at 0.6; top-1% wanted about 0.05. Lower γ for sparser compressors or if the iterates
oscillate. γ = 1 with `compressor: none` is D-PSGD applied to the half-steps.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator

from peer.algorithms.base import AlgoParams, InMessage, Manifest, MixReport, NeighbourView, Oracle, Payload
from peer.algorithms.compress import COMPRESSOR_SPECS, parse_compressor
from peer.algorithms.robust import robust_received
from peer.algorithms.sync import SynchronousAlgorithm, SyncParams
from peer.errors import CorruptPayloadError


class ChocoParams(SyncParams):
    name: Literal["choco"] = "choco"
    compressor: str = Field(
        "topk:0.1",
        description=f"what the differences q_i travel as: one of {', '.join(COMPRESSOR_SPECS)} (F a fraction, "
        "S a number of levels ≤ 127)",
    )
    gamma: float = Field(0.2, gt=0.0, le=1.0, description="consensus step size γ; lower it for sparser compressors")
    seed: int = Field(0, ge=0, description="seed of the random compressors (randk, qsgd), mixed with the node id")
    momentum: float = Field(
        0.9, ge=0.0, lt=1.0, description="local heavy-ball momentum on the half-step (as dpsgd's `momentum`)"
    )
    robust: Literal["none", "clip", "trimmed_mean", "median"] = Field(
        "none",
        description="robust aggregation of neighbours' public copies in the consensus step (peer.algorithms.robust)",
    )
    trim: float = Field(0.2, ge=0.0, lt=0.5, description="trimmed_mean: share of values dropped at each end")

    @field_validator("compressor")
    @classmethod
    def _known_compressor(cls, v: str) -> str:
        parse_compressor(v)  # raises ValueError naming the valid specs
        return v


class Choco(SynchronousAlgorithm):
    name: ClassVar[str] = "choco"
    params_type: ClassVar[type[AlgoParams]] = ChocoParams
    kinds: ClassVar[tuple[str, ...]] = ("delta", "state")

    def __init__(self, params: AlgoParams, node_id: str) -> None:
        super().__init__(params, node_id)
        assert isinstance(params, ChocoParams)
        self.p: ChocoParams = params
        self.compressor = parse_compressor(params.compressor, seed=zlib.crc32(f"{params.seed}:{node_id}".encode()))
        self.hat_self: torch.Tensor | None = None  # x̂_i
        self.hat: dict[str, torch.Tensor] = {}  # x̂_j, valid replicas only
        self._numel: int | None = None
        self._dtype = torch.float32
        self._half: torch.Tensor | None = None  # x^{t+½} of the open round
        self._buf: torch.Tensor | None = None  # local momentum buffer
        self._q: torch.Tensor | None = None  # the decoded (and scaled) q_i of the open round
        self._wire: dict[str, torch.Tensor] = {}
        self._reset_all = False
        self._force_reset: set[str] = set()
        self._asked: set[str] = set()  # members that flagged resync in the round just finished
        self._reset_sent: set[str] = set()  # members whose message of the open round is a reset
        self._prev_members: frozenset[str] | None = None
        self._decoded: dict[tuple[str, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        # Counters for metrics and tests.
        self.resets_sent = 0
        self.resets_applied = 0
        self.unsynced = 0  # delta messages that could not be applied (no valid replica of the sender)
        self.corrupt = 0

    # ------------------------------------------------------------------------------------------- decoding
    def _scale(self, q: torch.Tensor, numel: int) -> torch.Tensor:
        s = self.compressor.contraction_scale(numel)
        return q if s == 1.0 else q * s

    def _decode(self, payload: Payload) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(the reset's public copy or None, the decoded q). CorruptPayloadError if malformed."""
        assert self._numel is not None
        n, tensors = self._numel, dict(payload.tensors)
        base = None
        if payload.kind == "state":
            hat = tensors.pop("hat", None)
            if hat is None or tuple(hat.shape) != (n,) or not hat.dtype.is_floating_point:
                raise CorruptPayloadError(f"choco reset: 'hat' must be a float vector of {n} elements")
            if not bool(torch.isfinite(hat).all()):
                raise CorruptPayloadError("choco reset: 'hat' holds NaN or Inf")
            base = hat.to(self._dtype)
        q = self.compressor.decompress(tensors, n, self._dtype)
        return base, self._scale(q, n)

    # ------------------------------------------------------------------------------------------ the rounds
    def start(self, x: torch.Tensor, now: float, view: NeighbourView) -> None:
        self._numel, self._dtype = x.numel(), x.dtype
        self.frozen_view = view  # the round opens at the first advance, which has the oracle

    def open_round(self, x: torch.Tensor, oracle: Oracle | None, now: float, view: NeighbourView) -> None:
        """Take the half-step at x, compress its difference to x̂_i, and open round `self.iteration`."""
        self._numel, self._dtype = x.numel(), x.dtype
        if self.hat_self is None:
            if self.iteration == 0 and not self._reset_all:
                self.hat_self = torch.zeros_like(x)
                self.hat = {j: torch.zeros_like(x) for j in view.degrees}
            else:  # restored from a checkpoint: the public copies are rebuilt from resets
                self.hat_self = x.clone()
                self._reset_all = True
        assert oracle is not None, "choco opens its rounds in advance (start leaves round 0 to it)"
        _, g = oracle.gradient(x)
        if self.p.momentum > 0:  # deep-learning CHOCO runs add local momentum (Koloskova et al., ICLR 2020)
            self._buf = g.clone() if self._buf is None else self._buf.mul_(self.p.momentum).add_(g)
            g = self._buf
        self._half = x.add(g, alpha=-oracle.lr())
        self._wire, q = self.compressor.round_trip(self._half - self.hat_self)
        self._q = self._scale(q, x.numel())
        self._open(self.iteration, x, now, view)

    def on_jump(self, x: torch.Tensor, from_round: int, to_round: int) -> None:
        # Rounds were skipped: our replicas missed q's, and our neighbours' replicas of us are behind.
        self.hat = {}
        self._reset_all = True

    def round_messages(self, x: torch.Tensor, round_: int, to: Sequence[str]) -> dict[str, Payload]:
        assert self.hat_self is not None
        members = frozenset(to)
        prev = self._prev_members
        resets = {
            j
            for j in to
            if self._reset_all
            or j in self._force_reset
            or (j in self._asked and j not in self._reset_sent)
            or (prev is not None and j not in prev)
        }
        self._reset_sent, self._prev_members = resets, members
        self._force_reset -= resets
        self._reset_all = False
        self._asked = set()
        self.resets_sent += len(resets)
        delta = Payload("delta", dict(self._wire), seq=round_ + 1, round=round_)
        delta_resync = Payload("delta", dict(self._wire), seq=round_ + 1, round=round_, scalars={"resync": 1.0})
        reset_tensors = {"hat": self.hat_self.clone(), **self._wire} if resets else {}
        out: dict[str, Payload] = {}
        for j in to:
            resync = j not in self.hat
            if j in resets:
                scalars = {"resync": 1.0} if resync else {}
                out[j] = Payload("state", reset_tensors, seq=round_ + 1, round=round_, scalars=scalars)
            else:
                out[j] = delta_resync if resync else delta
        return out

    def update(
        self, x: torch.Tensor, received: dict[str, Payload], weights: dict[str, float], oracle: Oracle
    ) -> torch.Tensor:
        assert self.hat_self is not None and self._half is not None and self._q is not None
        hat_self = self.hat_self + self._q
        fresh: dict[str, torch.Tensor] = {}
        for j in sorted(received):
            p = received[j]
            if p.scalars.get("resync", 0.0):
                self._asked.add(j)
            decoded = self._decoded.pop((j, p.round), None)
            if decoded is None:
                try:
                    decoded = self._decode(p)
                except CorruptPayloadError:
                    self.corrupt += 1
                    continue
            base, q = decoded
            if base is not None:
                self.resets_applied += 1
            elif j in self.hat:
                base = self.hat[j]
            else:
                self.unsynced += 1
                continue
            fresh[j] = base + q
        # A replica that missed this round's q is stale for good: drop it until a reset re-establishes it.
        self.hat_self, self.hat = hat_self, fresh
        round_ = self.sync.round
        self._decoded = {k: v for k, v in self._decoded.items() if k[1] > round_}
        out = self._half.clone()
        # The replicas stay exact; only their contribution to the consensus step is made robust.
        mixed = robust_received(hat_self, fresh, self.p.robust, self.p.trim)
        for j in sorted(fresh):
            out.add_(mixed[j] - hat_self, alpha=self.p.gamma * weights[j])
        used = {j: weights[j] for j in fresh}
        stale = tuple(sorted(set(self.sync.members) - set(used)))
        self.last_report = MixReport(tuple(sorted(used)), stale, 1.0 - sum(used.values()))
        return out

    # ------------------------------------------------------------------------------------------ receiving
    def on_message(self, msg: InMessage, now: float) -> bool:
        p = msg.payload
        if p.kind not in self.kinds:
            return False
        if self._numel is not None and p.round >= max(self.sync.round, 0):
            try:
                decoded = self._decode(p)
            except CorruptPayloadError:
                self.corrupt += 1
                return False
            if not self.sync.receive(msg.sender, p):
                return False
            self._decoded[(msg.sender, p.round)] = decoded
            return True
        return self.sync.receive(msg.sender, p)

    def forget(self, node_id: str) -> None:
        super().forget(node_id)
        self.hat.pop(node_id, None)
        self._force_reset.add(node_id)

    def metrics(self) -> dict[str, float]:
        return {
            **super().metrics(),
            "replicas": len(self.hat),
            "resets_sent": self.resets_sent,
            "resets_applied": self.resets_applied,
            "unsynced": self.unsynced,
            "corrupt": self.corrupt,
        }

    def expected_by_kind(self, num_params: int) -> dict[str, Manifest]:
        manifest = self.compressor.manifest(num_params)
        return {"delta": manifest, "state": {"hat": ((num_params,), "float32"), **manifest}}

    # ------------------------------------------------------------------------------------------ checkpoint
    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.iteration > 0:
            self._reset_all = True
