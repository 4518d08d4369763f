"""dSSFN (spec §2): decentralized SSFN, trained layer by layer with consensus ADMM, run through P1.

Every worker holds its own rows of the data and trains the same network as centralized SSFN (`peer.algorithms.ssfn`):
the random matrices R_l come from a shared seed, and each layer's convex problem
min_O Σ_m ‖T_m − Y_{l,m} Oᵀ‖² s.t. ‖O‖_F ≤ ε (layer 0: ridge) is solved by consensus ADMM whose only
communication is the average of S_m = O_m − Λ_m, computed by B gossip rounds with Metropolis–Hastings weights.

Pattern P1 (spec §1.4, §2(c)) by default: each gossip round is one synchronizer round. The round number is a global
counter over (layer l, ADMM iteration k, gossip round b), which also travel in `Payload.scalars`, so a lossy,
reordering network reproduces the synchronous algorithm bit for bit. A message is S_m, Q × n_l values (n_0 = P).

[reconstructed] (spec v1), beyond the spec's equations:

* **choice of μ.** Consensus ADMM converges fast only if the penalty 1/μ matches the curvature the constraint
  adds. Layer 0 (ridge): μ = κ·M/λ, so that the Z-step shrinks S̄ by 1/(1 + κ). Ball layers start from
  `mu` and, at the iterations `mu_adapt_iters`, set μ ← κ·μ/c with c = ‖S̄‖/ε − 1: at the fixed point
  S̄ = (1 + λ*μ/M)·Z, so c estimates λ*μ/M and the update targets the same shrink κ (M cancels). c comes from
  the network average, μ is rounded to a 2^(1/4) grid so every worker picks the same value, and the scaled dual
  is rescaled (Λ ← Λ·μ_new/μ_old), which leaves the ADMM fixed point unchanged. The best fixed μ differs by
  layer and scales with the data (λ* grows with the sample count), so no single default fits; this rule needs
  neither the sample count nor M, and reaches 1e-5..3e-4 per layer on digits in K = 120 iterations;
* **averaging** `"tracking"` (an option; `"gossip"`, the spec's step 3, is the default): instead of averaging
  S_m afresh every iteration, each worker feeds the increment S_m^k − S_m^{k−1} into a running estimate s_m and
  gossips that. Doubly-stochastic mixing keeps Σ_m s_m = Σ_m S_m^k exactly, and the increments vanish as ADMM
  converges, so the gossip error does not floor the result: B = 2–3 on a 4-ring, or B = 10 on a 10-ring (where
  plain gossip would need B ≈ 100), match the centralized solution as closely as exact averaging;
* **stopping rule** (`tol` > 0): the local change max(‖Z − Z_prev‖, ‖O − Z‖)/‖Z‖ of iteration k is max-gossiped
  during iteration k + 1 and the layer stops when the maximum is below `tol`. A maximum is exact, so with
  B ≥ the graph's diameter every worker takes the same decision and the rounds stay in lockstep. With the
  default `tol` = 0 every layer runs exactly K iterations;
* **averaging `"pushsum"`** (P3, spec §2(c); an option): no barrier. Each `advance` is one push-sum step of the
  current ADMM iteration (l, k): emit running sums of (S_m, weight 1) to every neighbour with the uniform split
  1/(d + 1) (`pushsum.RunningSums`, a fresh instance per iteration, tagged `round = l·K + k` and `scalars` layer,
  iter, mu), and apply what arrives for the same tag as it arrives. The (B+1)-th step takes S ← s/w, finishes the
  iteration (Z-step, dual step) and makes the next iteration's first push. Payloads of a later tag wait (the
  latest per sender); payloads of a finished tag are dropped. `ready` holds once a neighbour's payload arrived
  since the last push, a neighbour moved on to a later tag, or `pushsum_wait_s` passed: one neighbour suffices,
  so a straggler does not slow the others. A worker that sees a later tag ends its own iteration at once
  (`hurried`: fewer push-sum steps for it). Messages are unkeyed latest-wins sends, Q·n_l + 1 values: a lost
  one is made good by the next of the same tag; one still in flight when the receiver closes the iteration is
  lost mass, so s/w is a convex combination of the S_m rather than their average. **The result is therefore
  approximate** unless B is large next to the delays (measured on digits, 4-ring: 3e-5 per layer without loss
  and 6e-4 with 20% drop at B = 10, P1 gossip 3e-5; two daemons at B = 3 disagree by 3%, at B = 10 by 1e-6);
  P1 (`"gossip"`, the default) stays the exact option. μ must be the same on every worker (a per-worker μ moves
  the ADMM fixed point), and agreement is eventual, not per iteration: the adaptation runs as above from each
  worker's own estimate of S̄ (quantized), every payload carries the sender's μ of that iteration, and a worker
  that saw a larger one adopts it at the iteration's end (`mu_merged`); payloads of one tag all carry that
  iteration's μ, so the max never mixes μ from before and after an adaptation. The stopping rule is refused
  (`tol` > 0): workers could stop a layer at different k with nothing to bring them back in step. A restart
  from a checkpoint starts the current iteration's push-sum afresh (the running sums are not saved);
* **M**, the number of workers, enters the ridge Z-step and μ_0: `num_workers`, else `len(view.members)`.
  It must be the same on every worker (the daemon's membership must be complete when training starts);
* a node that jumps rounds (it restarted, or was cut off and given up on) continues from its current iterate at
  the new (l, k, b); layers it skipped entirely get O = [U_Q, 0], which reproduces the previous layer's output.

Messages travel as float64 by default: they are small (Q·n_l values, 17.6 KB for Q = 10, n = 220), and with
exact averaging a layer then matches the exact solver to 1e-12 (test 2 needs 1e-6). With `wire_dtype="float32"` (the
spec's §2(b)) the default K and B give the same per-layer errors on digits, since ADMM and gossip dominate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from peer.algorithms import ssfn
from peer.algorithms.base import AlgoParams, InMessage, Manifest, MixReport, NeighbourView, Oracle, Payload, Send
from peer.algorithms.dssfn_admm import DssfnParams, Worker, restore_worker
from peer.algorithms.pushsum import WEIGHT, RunningSums
from peer.algorithms.sync import SynchronousAlgorithm
from peer.errors import ConfigError


class PushSumWindow:
    """P3 averaging of S for one worker (`averaging="pushsum"`): one `RunningSums` instance per ADMM iteration.

    The instance of iteration (l, k) is tagged `round = l·K + k`. Payloads of the current tag are applied as they
    arrive, payloads of an earlier tag are dropped (that iteration is over here), payloads of a later tag are
    buffered, the latest per sender only (a running sum supersedes its predecessors), and applied when this worker
    opens that tag. `steps` counts this worker's emits in the current tag; `fresh` the payloads applied since
    its last emit (what `Dssfn.ready` waits for).
    """

    def __init__(self, wire_dtype: torch.dtype) -> None:
        self.wire_dtype = wire_dtype
        self.tag = -1  # nothing opened yet: every payload is buffered
        self.sums: RunningSums | None = None
        self.steps = 0
        self.fresh = 0
        self.mu_seen = 0.0  # the largest μ carried by a payload applied in this tag
        self.future: dict[int, dict[str, tuple[int, Payload]]] = {}  # tag -> sender -> (incarnation, payload)
        self.dropped_past = 0
        self.mismatched = 0

    def open(self, tag: int, s: torch.Tensor) -> None:
        """Start tag `tag` with mass (S_m, 1) and apply what was buffered for it."""
        self.tag = tag
        self.sums = RunningSums({"s": s}, 1.0, kind="push_sum", wire_dtype=self.wire_dtype)
        self.steps = self.fresh = 0
        self.mu_seen = 0.0
        waiting = self.future.pop(tag, {})
        self.dropped_past += sum(len(box) for t, box in self.future.items() if t < tag)
        self.future = {t: box for t, box in self.future.items() if t > tag}
        for sender in sorted(waiting):
            incarnation, payload = waiting[sender]
            self._apply(sender, payload, incarnation)

    def behind(self) -> bool:
        """A neighbour already pushes a later iteration: this one will get no more mass from it."""
        return any(t > self.tag for t in self.future)

    def receive(self, msg: InMessage) -> bool:
        tag = msg.payload.round
        if tag < self.tag:
            self.dropped_past += 1
            return False
        if tag > self.tag or self.sums is None:
            box = self.future.setdefault(tag, {})
            old = box.get(msg.sender)
            if old is not None and (old[0], old[1].seq) >= (msg.incarnation, msg.payload.seq):
                return False
            box[msg.sender] = (msg.incarnation, msg.payload)
            return True
        return self._apply(msg.sender, msg.payload, msg.incarnation)

    def _apply(self, sender: str, payload: Payload, incarnation: int) -> bool:
        sums = self.sums
        assert sums is not None
        s = payload.tensors.get("s")
        if s is None or s.shape != sums.values["s"].shape:
            self.mismatched += 1  # another layer's shape under this tag: a peer with another configuration
            return False
        if not sums.receive(sender, payload, incarnation=incarnation):
            return False
        self.fresh += 1
        self.mu_seen = max(self.mu_seen, payload.scalars.get("mu", 0.0))
        return True

    def emit(self, out: Sequence[str], scalars: Mapping[str, float]) -> dict[str, Payload]:
        assert self.sums is not None
        payloads = self.sums.emit(out, round_=self.tag, scalars=scalars)
        self.steps += 1
        self.fresh = 0
        return payloads

    def estimate(self) -> torch.Tensor:
        """s / w: a convex combination of the workers' S_m (their average when no mass was lost)."""
        assert self.sums is not None
        return self.sums.estimate("s")

    def forget(self, node_id: str) -> None:
        if self.sums is not None:
            self.sums.forget(node_id)
        for box in self.future.values():
            box.pop(node_id, None)


class Dssfn(SynchronousAlgorithm):
    """dSSFN through the P1 synchronizer, or P3 push-sum with `averaging="pushsum"`; `advance` ignores the gradient
    oracle and reads `oracle.local_data()`."""

    name: ClassVar[str] = "dssfn"
    params_type: ClassVar[type[AlgoParams]] = DssfnParams
    provenance: ClassVar[str] = "reconstructed (spec v1)"
    trains_own_model: ClassVar[bool] = True
    kinds: ClassVar[tuple[str, ...]] = ("admm",)

    def __init__(self, params: AlgoParams, node_id: str) -> None:
        super().__init__(params, node_id)
        assert isinstance(params, DssfnParams)
        self.p: DssfnParams = params
        self.worker: Worker | None = None
        self.input_dim = params.input_dim
        self._restored: dict[str, Any] | None = None
        self._ahead: dict[int, tuple[int, int, int]] = {}  # round -> (l, k, b) of messages from later rounds
        # averaging="pushsum" (P3) only:
        self.ps = PushSumWindow(self.wire_dtype)
        self.outbox: list[Send] = []
        self.last_step_at = -math.inf
        self.hurried = 0  # iterations this worker ended early because a neighbour had moved on

    @property
    def wire_dtype(self) -> torch.dtype:
        return torch.float64 if self.p.wire_dtype == "float64" else torch.float32

    # ------------------------------------------------------------------------------------------- set-up
    @property
    def pushsum(self) -> bool:
        return self.p.averaging == "pushsum"

    def start(self, x: torch.Tensor, now: float, view: NeighbourView) -> None:
        # Round 0 needs S_m, hence the local data, which only `advance` can ask the oracle for.
        self.frozen_view = view

    def bind_data(self, input_dim: int, num_classes: int) -> None:
        if num_classes != self.p.num_classes:
            raise ConfigError(
                f"is {self.p.num_classes} but the dataset has {num_classes} classes", field="algorithm.num_classes"
            )
        self.input_dim = input_dim

    def _num_workers(self, view: NeighbourView) -> int:
        if self.p.num_workers:
            return self.p.num_workers
        if view.members:
            return len(view.members)
        if not view.degrees:
            return 1
        raise ValueError("dssfn needs the number of workers: set algorithm.num_workers")

    def _init(self, oracle: Oracle, view: NeighbourView) -> None:
        x, labels = oracle.local_data()
        self.input_dim = int(x[0].numel()) if len(x) else self.input_dim
        m = self._num_workers(view)
        if self.p.tol > 0 and self.p.gossip_rounds < m - 1:
            # Otherwise the max-gossiped change may not reach every worker and they would stop at different k.
            raise ValueError(f"tol > 0 needs gossip_rounds >= num_workers - 1 = {m - 1} (a bound on the diameter)")
        w = Worker(self.p, x, labels, m)
        if self._restored is not None:
            restore_worker(w, self._restored)
            self._restored = None
        self.worker = w

    def ready(self, now: float, view: NeighbourView) -> bool:
        if not self.pushsum:
            return super().ready(now, view)
        w, ps = self.worker, self.ps
        if w is None:
            return True
        if w.done:
            return False
        # Progress means new mass to mix (or to finish with): some neighbour's payload, or a later iteration's. No
        # barrier: one neighbour suffices, and after `pushsum_wait_s` of silence the step is taken anyway.
        return not view.degrees or ps.fresh > 0 or ps.behind() or now - self.last_step_at >= self.p.pushsum_wait_s

    def advance(self, x: torch.Tensor, oracle: Oracle, now: float, view: NeighbourView) -> torch.Tensor:
        if self.pushsum:
            return self._push_sum_step(x, oracle, now, view)
        return super().advance(x, oracle, now, view)

    def open_round(self, x: torch.Tensor, oracle: Oracle | None, now: float, view: NeighbourView) -> None:
        # Round 0 needs S_m, hence the local data: `start` leaves it to the first advance, which has the oracle.
        if self.worker is None:
            assert oracle is not None
            self._init(oracle, view)
        self._open(self.iteration, x, now, view)

    def _push_sum_step(self, x: torch.Tensor, oracle: Oracle, now: float, view: NeighbourView) -> torch.Tensor:
        """One push-sum step of the current ADMM iteration; the (B+1)-th step first ends the iteration with s / w."""
        ps = self.ps
        self.last_step_at = now
        if self.worker is None:
            self._init(oracle, view)
        elif ps.steps >= self.p.gossip_rounds or ps.behind():
            if ps.steps < self.p.gossip_rounds:
                self.hurried += 1
            self.worker.finish_iteration(ps.estimate(), ps.mu_seen)
        w = self.worker
        assert w is not None
        if w.done:
            self.outbox = []
            return x
        tag = w.layer * self.p.admm_iters + w.k
        if tag != ps.tag:
            ps.open(tag, w.s)
        out = sorted(view.degrees)
        payloads = ps.emit(out, {"layer": float(w.layer), "iter": float(w.k), "mu": w.mu})
        self.outbox = [Send(j, payloads[j]) for j in out]  # unkeyed, latest wins: running sums need no ACKs
        self.iteration += 1
        self.last_report = MixReport(tuple(out), (), 1.0 / (len(out) + 1))
        return x

    def sends(self, now: float) -> list[Send]:
        if not self.pushsum:
            return super().sends(now)
        out, self.outbox = self.outbox, []
        return out

    # ------------------------------------------------------------------------------------------- rounds
    def round_messages(self, x: torch.Tensor, round_: int, to: Sequence[str]) -> dict[str, Payload]:
        assert self.worker is not None
        s, metric = self.worker.message()
        layer, k, b = self.worker.position()
        scalars = {"layer": float(layer), "iter": float(k), "gossip": float(b)}
        if math.isfinite(metric):
            scalars["change"] = metric
        payload = Payload(
            "admm", {"s": s.to(self.wire_dtype, copy=True)}, seq=round_ + 1, round=round_, scalars=scalars
        )
        return {j: payload for j in to}

    def update(
        self, x: torch.Tensor, received: dict[str, Payload], weights: dict[str, float], oracle: Oracle
    ) -> torch.Tensor:
        w = self.worker
        assert w is not None
        here = w.position()
        got: dict[str, tuple[torch.Tensor, float]] = {}
        for j, pl in received.items():
            if _position(pl) != here and not w.done:
                w.mismatched += 1
                continue
            got[j] = (pl.tensors["s"], pl.scalars.get("change", math.inf))
        w.gossip(got, weights)
        return x

    def on_message(self, msg: InMessage, now: float) -> bool:
        if self.pushsum:
            if msg.payload.kind != "push_sum" or (self.worker is not None and self.worker.done):
                return False
            return self.ps.receive(msg)
        r = msg.payload.round
        if msg.payload.kind == "admm" and r > self.sync.round + 1:
            self._ahead[r] = _position(msg.payload)
        return super().on_message(msg, now)

    def forget(self, node_id: str) -> None:
        if not self.pushsum:
            super().forget(node_id)
            return
        self.ps.forget(node_id)
        self.outbox = [s for s in self.outbox if s.to != node_id]

    def on_jump(self, x: torch.Tensor, from_round: int, to_round: int) -> None:
        target = self._ahead.get(to_round)
        self._ahead = {r: pos for r, pos in self._ahead.items() if r > to_round}
        if self.worker is not None and target is not None:
            self.worker.jump(*target)

    # ------------------------------------------------------------------------------------------ results
    def finished(self) -> bool:
        return self.worker is not None and self.worker.done

    def result_state(self) -> dict[str, torch.Tensor]:
        if self.worker is None or not self.worker.outputs:
            return {}
        return ssfn.model_state(self.worker.model())

    def expected_by_kind(self, num_params: int) -> Mapping[str, Manifest | list[Manifest]] | None:
        if not self.input_dim:
            return None  # P unknown until the data is loaded: accept any shape (the fingerprint still binds)
        q, dtype = self.p.num_classes, self.p.wire_dtype
        widths = [self.input_dim] + ([self.p.nodes] if self.p.num_layers > 0 and self.p.nodes != self.input_dim else [])
        if self.pushsum:
            return {"push_sum": [{"s": ((q, n), dtype), WEIGHT: ((1,), dtype)} for n in widths]}
        return {"admm": [{"s": ((q, n), dtype)} for n in widths]}

    def metrics(self) -> dict[str, float]:
        w = self.worker
        if self.pushsum:
            ps = self.ps
            out = {
                "round": float(self.iteration),
                "hurried": float(self.hurried),
                "dropped_past": float(ps.dropped_past),
                "mismatched": float(ps.mismatched),
                "weight": ps.sums.weight if ps.sums is not None else 1.0,
            }
            if w is not None:
                out.update(layer=float(w.layer), admm_iter=float(w.k), mu=w.mu, mu_merged=float(w.mu_merged))
            return out
        out = {"round": float(self.iteration), "gave_up": float(self.sync.gave_up), "jumps": float(self.jumps)}
        if w is not None:
            out.update(layer=float(w.layer), admm_iter=float(w.k), mu=w.mu, mismatched=float(w.mismatched))
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        w = self.worker
        if w is not None:
            state["worker"] = {
                "pos": [w.layer, w.k, w.b, int(w.done)],
                "outputs": [o.clone() for o in w.outputs],
                "mus": list(w.mus),
                "mu": w.mu,
                "z": w.z.clone(),
                "lam": w.lam.clone(),
                "s": w.s.clone(),
                "s_local": w.s_local.clone(),
                "o": w.o.clone(),
                "metric": [w.metric, w.metric_max],
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._restored = state.get("worker")
        self.worker = None  # rebuilt (features recomputed from the data) at the next `advance`
        # pushsum: the running sums are not saved (they would be stale); the current iteration's window restarts.
        self.ps = PushSumWindow(self.wire_dtype)
        self.outbox = []


def _position(payload: Payload) -> tuple[int, int, int]:
    sc = payload.scalars
    return int(sc.get("layer", -1)), int(sc.get("iter", -1)), int(sc.get("gossip", -1))
