"""dSSFN's per-worker numerics (spec §2(a)), without any network: the parameters, one worker's consensus-ADMM
layer solver (`Worker`), and `run_lockstep`, the synchronous algorithm on an exact in-memory network.

`peer.algorithms.dssfn` runs `Worker` through the P1 synchronizer (or push-sum); see its docstring for the
algorithm, the μ rule and the choices made.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from peer.algorithms import ssfn
from peer.algorithms.dpsgd import mix
from peer.algorithms.ssfn import DTYPE, SsfnConfig
from peer.algorithms.sync import SyncParams


class DssfnParams(SyncParams):
    name: Literal["dssfn"] = "dssfn"
    num_classes: int = Field(10, ge=2, description="Q, the number of classes (the same on every peer)")
    num_layers: int = Field(3, ge=0, description="L, layers with random nodes after layer 0")
    nodes: int = Field(220, ge=2, description="n, nodes per layer l >= 1 (at least 2Q)")
    alpha: float = Field(1.0, ge=1.0, description="ε = alpha·sqrt(2Q), the bound on ‖O_l‖_F")
    lam: float = Field(100.0, gt=0, description="λ, the ridge weight of layer 0")
    layer0: Literal["ridge", "ball"] = Field("ridge", description="layer 0 as ridge (public SSFN) or ε-ball")
    admm_iters: int = Field(200, ge=1, description="K, ADMM iterations per layer (the maximum when tol > 0)")
    gossip_rounds: int = Field(10, ge=1, description="B, gossip averaging rounds per ADMM iteration")
    mu: float = Field(1.0, gt=0, description="initial ADMM μ (penalty 1/μ) of the ε-ball layers")
    shrink: float = Field(0.07, gt=0, description="κ: μ is set so that the Z-step shrinks S̄ by 1/(1 + κ)")
    mu_adapt_iters: list[int] = Field(
        default_factory=lambda: [10, 30], description="ADMM iterations after which μ is re-estimated (ball)"
    )
    tol: float = Field(0.0, ge=0, description="stop a layer when the max relative change is below (0: fixed K)")
    seed: int = Field(0, description="seed of the random matrices R_l (the same on every peer)")
    num_workers: int = Field(0, ge=0, description="M; 0 takes the number of cluster members from the view")
    input_dim: int = Field(0, ge=0, description="P, for message shape checks before the data is loaded (0: unset)")
    wire_dtype: Literal["float64", "float32"] = Field("float64", description="dtype of S on the wire")
    averaging: Literal["gossip", "tracking", "pushsum"] = Field(
        "gossip",
        description="average S afresh every iteration (spec, P1), track it across iterations (P1), or run B "
        "push-sum steps per iteration without a barrier (P3, approximate)",
    )
    pushsum_wait_s: float = Field(
        0.2, gt=0, description="pushsum: take the next push-sum step after this long even if nothing new arrived"
    )

    @model_validator(mode="after")
    def _pushsum_has_no_stopping_rule(self) -> DssfnParams:
        if self.averaging == "pushsum" and self.tol > 0:
            # Workers could stop a layer at different iterations, and nothing would bring them back in step.
            raise ValueError("tol > 0 (the stopping rule) needs a P1 averaging; averaging=pushsum runs K iterations")
        return self

    def ssfn_config(self) -> SsfnConfig:
        return SsfnConfig(
            num_layers=self.num_layers,
            nodes=self.nodes,
            alpha=self.alpha,
            lam=self.lam,
            layer0=self.layer0,
            mu=self.mu,
            admm_iters=self.admm_iters,
            gossip_rounds=self.gossip_rounds,
            seed=self.seed,
        )


def quantize_mu(mu: float) -> float:
    """Round μ to the grid 2^(i/4): workers whose estimates agree to rounding error pick the same μ."""
    return float(2.0 ** (round(4.0 * math.log2(mu)) / 4.0))


class Worker:
    """One worker's dSSFN numerics, without messaging: the P1 algorithm and `run_lockstep` both drive it.

    Protocol: `message()` is what this worker sends in the current gossip round; `gossip(received, weights)`
    mixes the neighbours' messages of that round and, after the B-th round of an ADMM iteration, finishes the
    iteration (and the layer, after K iterations or the stopping rule).
    """

    def __init__(self, p: DssfnParams, x: torch.Tensor, labels: torch.Tensor, num_workers: int) -> None:
        self.p = p
        self.cfg = p.ssfn_config()
        self.cfg.check(p.num_classes)
        self.eps = self.cfg.eps(p.num_classes)
        self.wire = torch.float64 if p.wire_dtype == "float64" else torch.float32
        self.x = x.to(DTYPE).reshape(len(x), -1)  # local inputs [J_m, P]
        self.t = ssfn.one_hot(labels, p.num_classes)  # one-hot targets [J_m, Q]
        self.num_workers = num_workers
        self.layer = self.k = self.b = 0
        self.done = False
        self.outputs: list[torch.Tensor] = []  # O_0, O_1, ...: the final Z_m of every finished layer
        self.mus: list[float] = []  # the final μ of every finished layer
        self.mismatched = 0  # received messages of another shape or (l, k, b): lockstep was broken
        self.skipped_layers = 0
        self.mu_merged = 0  # pushsum: iterations that ended by adopting a neighbour's larger μ
        self.metric = math.inf  # this worker's relative change in the previous ADMM iteration
        self.metric_max = math.inf  # its max over the neighbourhood, gossiped during the current iteration
        self.y = self.x  # the current layer's features [J_m, n_l]
        self.g = self.bt = self.inv = self.z = self.lam = self.o = self.s = torch.zeros(0, dtype=DTYPE)
        self.s_local = self.s  # tracking: the local S_m whose increments were fed into the tracker `s`
        self.mu = p.mu
        self._begin_layer()

    # ------------------------------------------------------------------------------------------ layers
    @property
    def ridge(self) -> bool:
        return self.layer == 0 and self.cfg.layer0 == "ridge"

    def _next_features(self) -> None:
        """Y for the (new) current layer from the previous layer's features and output."""
        self.y = ssfn.next_features(self.cfg, self.layer, self.y, self.outputs[-1])

    def _begin_layer(self) -> None:
        self.g = self.y.T @ self.y
        self.bt = self.t.T @ self.y
        self._set_mu(self.p.shrink * self.num_workers / self.cfg.lam if self.ridge else self.cfg.mu)
        self.z = torch.zeros_like(self.bt)
        self.lam = torch.zeros_like(self.bt)
        self.s = self.s_local = torch.zeros_like(self.bt)
        self.k = self.b = 0
        self.metric = self.metric_max = math.inf
        self._local_step()

    def _set_mu(self, mu: float) -> None:
        self.mu = mu
        eye = torch.eye(self.g.shape[0], dtype=DTYPE)
        self.inv = torch.cholesky_inverse(torch.linalg.cholesky(self.g + eye / mu))

    def _local_step(self) -> None:
        self.o = (self.bt + (self.z + self.lam) / self.mu) @ self.inv
        s_new = self.o - self.lam
        if self.p.averaging == "tracking":
            # Dynamic average consensus: Σ_m s_m = Σ_m S_m stays exact, and the gossip only has to remove the
            # disagreement left over plus this iteration's increments, which vanish as ADMM converges.
            self.s = self.s + (s_new - self.s_local)
            self.s_local = s_new
        else:
            self.s = s_new

    def _finish_layer(self) -> None:
        self.outputs.append(self.z)
        self.mus.append(self.mu)
        self.layer += 1
        if self.layer > self.cfg.num_layers:
            self.done = True
            self.s = self.z  # what the closing round carries
            return
        self._next_features()
        self._begin_layer()

    # ------------------------------------------------------------------------------------------ rounds
    def position(self) -> tuple[int, int, int]:
        return self.layer, self.k, self.b

    def message(self) -> tuple[torch.Tensor, float]:
        """(S_m, the stopping-rule maximum so far) for the current gossip round."""
        return self.s, self.metric_max

    def gossip(self, received: Mapping[str, tuple[torch.Tensor, float]], weights: Mapping[str, float]) -> None:
        """One gossip round: S_m ← Σ_j h_mj S_j (j = m included); after B rounds, the rest of the iteration."""
        if self.done:
            return
        ok = {j: v for j, v in received.items() if v[0].shape == self.s.shape}
        self.mismatched += len(received) - len(ok)
        self.s = mix(self.s.clone(), {j: s.to(DTYPE) for j, (s, _) in ok.items()}, {j: weights[j] for j in ok})
        for _, m in ok.values():
            self.metric_max = max(self.metric_max, m)
        self.b += 1
        if self.b == self.cfg.gossip_rounds:
            self.b = 0
            self._end_iteration()

    def finish_iteration(self, s_avg: torch.Tensor, mu_seen: float) -> None:
        """P3: `s_avg`, the push-sum estimate of the average of S, ends the current ADMM iteration. `mu_seen` is
        the largest μ the neighbours used in this iteration; a worker behind it adopts it (see the module)."""
        if self.done:
            return
        self.s = s_avg.to(DTYPE)
        self._end_iteration(mu_seen)

    def _end_iteration(self, mu_seen: float = 0.0) -> None:
        z_prev = self.z
        if self.ridge:
            m = self.num_workers
            self.z = self.s * (m / (m + self.cfg.lam * self.mu))
        else:
            self.z = ssfn.project_ball(self.s, self.eps)
        self.lam = self.lam + self.z - self.o
        self.k += 1
        if not self.ridge and mu_seen > self.mu:
            # Before the adaptation: both sides of the max are the μ of the iteration just finished.
            self._change_mu(mu_seen)
            self.mu_merged += 1
        if not self.ridge and self.k in self.p.mu_adapt_iters:
            self._adapt_mu()
        decided_stop = self._stop_rule()
        znorm = max(float(torch.linalg.matrix_norm(self.z)), torch.finfo(DTYPE).tiny)
        change = max(float(torch.linalg.matrix_norm(self.z - z_prev)), float(torch.linalg.matrix_norm(self.o - self.z)))
        self.metric = self.metric_max = change / znorm
        if decided_stop or self.k >= self.cfg.admm_iters:
            self._finish_layer()
        else:
            self._local_step()

    def _stop_rule(self) -> bool:
        # metric_max is the neighbourhood maximum of the previous iteration's change: identical on every worker
        # when B ≥ the diameter, so all workers stop the layer at the same iteration.
        warm = self.k > max(self.p.mu_adapt_iters, default=0) + 1
        return self.p.tol > 0 and warm and self.metric_max < self.p.tol

    def _adapt_mu(self) -> None:
        c = float(torch.linalg.matrix_norm(self.s)) / self.eps - 1.0
        if c <= 0:
            return  # the constraint is not active (yet): nothing to calibrate against
        self._change_mu(quantize_mu(min(max(self.p.shrink * self.mu / c, self.mu / 1e3), self.mu * 1e3)))

    def _change_mu(self, new: float) -> None:
        if new != self.mu:
            self.lam = self.lam * (new / self.mu)  # Λ is μ times the dual variable
            self._set_mu(new)

    def jump(self, layer: int, k: int, b: int) -> None:
        """Continue at (layer, k, b) from the current iterate; layers skipped entirely get O = [U_Q, 0]."""
        if self.done or (layer, k, b) <= self.position():
            return
        if layer > self.layer:
            q = self.p.num_classes
            identity = torch.cat([ssfn.u_q(q), torch.zeros(q, self.cfg.nodes - 2 * q, dtype=DTYPE)], 1)
            out = self.z
            while self.layer < layer:
                self.outputs.append(out)
                self.mus.append(self.mu)
                self.layer += 1
                if self.layer > self.cfg.num_layers:
                    self.done = True
                    self.s = self.outputs[-1]
                    return
                self._next_features()
                if self.layer < layer:
                    out = identity
                    self.skipped_layers += 1
            self._begin_layer()
        self.k, self.b = k, b

    # ------------------------------------------------------------------------------------------ results
    def model(self) -> ssfn.SsfnModel:
        return ssfn.SsfnModel(self.cfg, self.p.num_classes, self.x.shape[1], list(self.outputs))


def run_lockstep(
    workers: Mapping[str, Worker], weights: Mapping[str, Mapping[str, float]], max_rounds: int | None = None
) -> int:
    """The synchronous algorithm without a network: every round, every worker mixes its neighbours' messages.

    `weights[i]` holds h_ij for i's neighbours j (as `mixing.mixing_matrix` builds it; a self entry is ignored).
    Bit-identical to the P1 algorithm on a network that delivers everything. Runs until every worker is done
    (or `max_rounds`) and returns the number of rounds.
    """
    rounds = 0
    while not all(w.done for w in workers.values()) and (max_rounds is None or rounds < max_rounds):
        msgs = {i: (s.to(w.wire), m) for i, w in workers.items() for s, m in [w.message()]}
        for i, w in workers.items():
            row = {j: weights[i][j] for j in sorted(weights[i]) if j != i}
            w.gossip({j: msgs[j] for j in row}, row)
        rounds += 1
    return rounds


def restore_worker(w: Worker, st: Mapping[str, Any]) -> None:
    layer, k, b, done = (int(v) for v in st["pos"])
    w.outputs, w.mus = [], []
    for o, mu in zip(st["outputs"], st["mus"], strict=True):
        w.outputs.append(o.to(DTYPE))
        w.mus.append(float(mu))
        w.layer = len(w.outputs)
        if w.layer <= w.cfg.num_layers:
            w._next_features()
    if done:
        w.done, w.s = True, w.outputs[-1]
        return
    w.g, w.bt = w.y.T @ w.y, w.t.T @ w.y
    w._set_mu(float(st["mu"]))
    w.z, w.lam, w.s, w.s_local, w.o = (st[key].to(DTYPE) for key in ("z", "lam", "s", "s_local", "o"))
    w.layer, w.k, w.b = layer, k, b
    w.metric, w.metric_max = (float(v) for v in st["metric"])
