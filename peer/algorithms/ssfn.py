"""SSFN, the centralized reference for dSSFN (spec §2(a), §2(f)1): pure float64 numerics, no I/O.

Data layout: **one row per sample** (torch's convention), unlike the spec's column-per-sample X ∈ R^{P×J}.
Inputs are X [J, P], one-hot targets T [J, Q] and layer-l features Y_l [J, n_l]. The layer outputs keep the spec's
orientation, O_l ∈ R^{Q × n_l}, so the estimate is T̂_l = Y_l O_lᵀ, and the spec's Y Yᵀ and T Yᵀ are written
G = Yᵀ Y [n, n] and B = Tᵀ Y [Q, n] here.

Architecture (layer 0, then layers l = 1..L, each with n nodes, n ≥ 2Q):

* layer 0 maps the input: ridge O_0 = argmin ‖T − X O_0ᵀ‖² + λ‖O_0‖² (the public SSFN default, `layer0="ridge"`),
  or the ε-ball problem on Y_0 = X (`layer0="ball"`);
* layer l: Y_l = ReLU([T̂_{l−1} V_Qᵀ, normalize_rows(Y_{l−1} R_lᵀ)]), with R_l ~ Uniform[−1, 1] drawn from
  (seed, l) by a private `torch.Generator`, so every worker builds the same R_l without communicating;
* O_l = argmin ‖T − Y_l Oᵀ‖_F² subject to ‖O‖_F ≤ ε, ε = α·sqrt(2Q), solved exactly (eigendecomposition plus
  bisection on the ridge multiplier λ*) or by the public code's LS-ADMM.

With α ≥ 1, O = [U_Q, 0] is feasible and reproduces T̂_{l−1}, so exact solves never raise the training cost.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Literal

import torch

DTYPE = torch.float64
Layer0 = Literal["ridge", "ball"]


@dataclass(frozen=True)
class SsfnConfig:
    """Hyperparameters shared by every worker (dSSFN derives the same object from its params on each peer).

    The defaults reach about 96% test accuracy on sklearn digits (80/20 split) in under a second. They differ
    from the public SSFN code (α = 2, λ = 1) on purpose: α = 1 and λ = 100 make every layer's problem better
    conditioned, which is what lets dSSFN's consensus ADMM match the exact solution in about 100 iterations.
    """

    num_layers: int = 3  # L: layers with random nodes, after layer 0 (L + 1 output matrices in all)
    nodes: int = 220  # n: nodes per layer l ≥ 1 (2Q of them carry V_Q T̂_{l−1}); must be ≥ 2Q
    alpha: float = 1.0  # ε = α·sqrt(2Q); α ≥ 1 keeps the progression property
    lam: float = 100.0  # layer-0 ridge λ
    layer0: Layer0 = "ridge"
    mu: float = 1.0  # ADMM μ (penalty 1/μ): the centralized LS-ADMM's, and dSSFN's starting value
    admm_iters: int = 120  # K
    gossip_rounds: int = 10  # B (dSSFN only)
    seed: int = 0  # drives R_l

    def __post_init__(self) -> None:
        if self.num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {self.num_layers}")
        if self.alpha < 1.0:
            raise ValueError(f"alpha must be >= 1 (progression property), got {self.alpha}")
        if self.lam <= 0 or self.mu <= 0:
            raise ValueError("lam and mu must be positive")
        if self.admm_iters < 1 or self.gossip_rounds < 1:
            raise ValueError("admm_iters and gossip_rounds must be >= 1")

    def eps(self, num_classes: int) -> float:
        return self.alpha * (2.0 * num_classes) ** 0.5

    def check(self, num_classes: int) -> None:
        if self.num_layers > 0 and self.nodes < 2 * num_classes:
            raise ValueError(f"nodes must be >= 2Q = {2 * num_classes}, got {self.nodes}")


@dataclass
class SsfnModel:
    """The trained network: O_0..O_L plus what regenerates R_1..R_L (the config's seed and sizes)."""

    cfg: SsfnConfig
    num_classes: int
    input_dim: int
    outputs: list[torch.Tensor] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ building blocks
def v_q(q: int) -> torch.Tensor:
    """V_Q = [I_Q; −I_Q] ∈ R^{2Q×Q}."""
    eye = torch.eye(q, dtype=DTYPE)
    return torch.cat([eye, -eye], 0)


def u_q(q: int) -> torch.Tensor:
    """U_Q = [I_Q, −I_Q] ∈ R^{Q×2Q}; U_Q ReLU(V_Q t) = t."""
    eye = torch.eye(q, dtype=DTYPE)
    return torch.cat([eye, -eye], 1)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels.long(), num_classes).to(DTYPE)


def normalize_rows(z: torch.Tensor) -> torch.Tensor:
    """Each sample (row) scaled to unit ℓ2 norm; the spec's per-column `normc`. An all-zero row stays zero."""
    norms = torch.linalg.vector_norm(z, dim=1, keepdim=True)
    return z / norms.clamp_min(torch.finfo(z.dtype).tiny)


def random_matrix(seed: int, layer: int, rows: int, cols: int) -> torch.Tensor:
    """R_layer ~ Uniform[−1, 1]^{rows×cols}, a pure function of (seed, layer): identical on every worker."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"ssfn:{seed}:{layer}".encode()))
    return torch.rand(rows, cols, generator=gen, dtype=DTYPE) * 2.0 - 1.0


def layer_width(cfg: SsfnConfig, layer: int, input_dim: int) -> int:
    """n_l: the input dimension P for layer 0, `cfg.nodes` after it."""
    return input_dim if layer == 0 else cfg.nodes


def next_features(cfg: SsfnConfig, layer: int, y_prev: torch.Tensor, o_prev: torch.Tensor) -> torch.Tensor:
    """Y_layer = ReLU([Y_{l−1} O_{l−1}ᵀ V_Qᵀ, normalize_rows(Y_{l−1} R_lᵀ)]) for layer ≥ 1."""
    q = o_prev.shape[0]
    t_hat = y_prev @ o_prev.T
    r = random_matrix(cfg.seed, layer, cfg.nodes - 2 * q, y_prev.shape[1])
    z = torch.cat([t_hat @ v_q(q).T, normalize_rows(y_prev @ r.T)], 1)
    return torch.relu(z)


def project_ball(a: torch.Tensor, eps: float) -> torch.Tensor:
    """Proj_ε(A) = A · min(1, ε / ‖A‖_F)."""
    norm = float(torch.linalg.matrix_norm(a))
    return a if norm <= eps else a * (eps / norm)


# ------------------------------------------------------------------------------------------------------ solvers
def ridge(g: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin_O ‖T − Y Oᵀ‖² + λ‖O‖² = B (G + λI)^{-1}, from G = YᵀY and B = TᵀY."""
    eye = torch.eye(g.shape[0], dtype=g.dtype)
    return torch.linalg.solve(g + lam * eye, b.T).T


@dataclass(frozen=True)
class ExactSolution:
    o: torch.Tensor
    lam: float  # the multiplier λ*: 0 when the constraint is inactive


def exact_ball_ls(g: torch.Tensor, b: torch.Tensor, eps: float, *, rtol: float = 1e-12) -> ExactSolution:
    """The exact minimizer of ‖T − Y Oᵀ‖_F² subject to ‖O‖_F ≤ ε (spec §2(f)1).

    O(λ) = B (G + λI)^{-1}; λ* = 0 when the (minimum-norm) unconstrained solution is feasible, otherwise the
    unique root of ‖O(λ)‖_F = ε, found by bisection (the norm decreases monotonically in λ).
    """
    s, u = torch.linalg.eigh(g)
    s = s.clamp_min(0.0)
    c = b @ u  # B in G's eigenbasis
    w = (c * c).sum(0)

    def norm(lam: float) -> float:
        return float(torch.sqrt((w / (s + lam) ** 2).sum()))

    keep = s > s.max() * g.shape[0] * torch.finfo(g.dtype).eps
    inv0 = torch.where(keep, 1.0 / torch.where(keep, s, 1.0), 0.0)
    o0 = (c * inv0) @ u.T
    if float(torch.linalg.matrix_norm(o0)) <= eps:
        return ExactSolution(o0, 0.0)
    lo, hi = 0.0, float(torch.sqrt(w.sum())) / eps  # ‖O(hi)‖ ≤ ‖B‖/hi = ε
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if norm(mid) > eps:
            lo = mid
        else:
            hi = mid
        if hi - lo <= rtol * hi:
            break
    lam = 0.5 * (lo + hi)
    return ExactSolution((c / (s + lam)) @ u.T, lam)


def ls_admm(g: torch.Tensor, b: torch.Tensor, eps: float, mu: float, iters: int) -> torch.Tensor:
    """The public SSFN LS-ADMM (centralized): Z = Λ = 0, then O-step, projection, dual step; returns O.

    Λ is minus the usual scaled dual (the public code's sign convention).
    """
    eye = torch.eye(g.shape[0], dtype=g.dtype)
    inv = torch.linalg.inv(g + eye / mu)
    z = torch.zeros_like(b)
    lam = torch.zeros_like(b)
    o = z
    for _ in range(iters):
        o = (b + (z + lam) / mu) @ inv
        z = project_ball(o - lam, eps)
        lam = lam + z - o
    return o


def solve_layer(
    cfg: SsfnConfig, layer: int, y: torch.Tensor, t: torch.Tensor, solver: Literal["exact", "admm"] = "exact"
) -> torch.Tensor:
    """O_layer from the layer's features Y [J, n] and targets T [J, Q] (layer 0: ridge unless `layer0="ball"`)."""
    g = y.T @ y
    b = t.T @ y
    if layer == 0 and cfg.layer0 == "ridge":
        return ridge(g, b, cfg.lam)
    eps = cfg.eps(t.shape[1])
    if solver == "exact":
        return exact_ball_ls(g, b, eps).o
    return ls_admm(g, b, eps, cfg.mu, cfg.admm_iters)


# ------------------------------------------------------------------------------------------------ whole network
def train_centralized(
    x: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    cfg: SsfnConfig,
    solver: Literal["exact", "admm"] = "exact",
) -> SsfnModel:
    """Train SSFN on all the data at once: X [J, P], integer labels [J]."""
    cfg.check(num_classes)
    y = x.to(DTYPE).reshape(len(x), -1)
    t = one_hot(labels, num_classes)
    model = SsfnModel(cfg, num_classes, y.shape[1])
    for layer in range(cfg.num_layers + 1):
        if layer > 0:
            y = next_features(cfg, layer, y, model.outputs[-1])
        model.outputs.append(solve_layer(cfg, layer, y, t, solver))
    return model


def layer_features(model: SsfnModel, x: torch.Tensor) -> list[torch.Tensor]:
    """Y_0 = X, Y_1, ..., Y_L for inputs X [J, P]."""
    ys = [x.to(DTYPE).reshape(len(x), -1)]
    for layer in range(1, len(model.outputs)):
        ys.append(next_features(model.cfg, layer, ys[-1], model.outputs[layer - 1]))
    return ys


def predict(model: SsfnModel, x: torch.Tensor) -> torch.Tensor:
    """Class scores [J, Q] (float64) from the last layer; argmax gives the class."""
    y = layer_features(model, x)[-1]
    return y @ model.outputs[-1].T


def training_costs(model: SsfnModel, x: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """‖T − T̂_l‖_F² for every layer l (non-increasing in l with exact solves and α ≥ 1)."""
    t = one_hot(labels, model.num_classes)
    ys = layer_features(model, x)
    return [float(torch.linalg.matrix_norm(t - y @ o.T) ** 2) for y, o in zip(ys, model.outputs, strict=True)]


def model_state(model: SsfnModel) -> dict[str, torch.Tensor]:
    """Plain tensors only (loadable with `torch.load(weights_only=True)`): O_0..O_L plus the shape metadata."""
    cfg = model.cfg
    state = {f"o{layer}": o.detach().clone() for layer, o in enumerate(model.outputs)}
    state["meta"] = torch.tensor([cfg.seed, model.num_classes, model.input_dim, cfg.nodes, len(model.outputs)])
    return state


def model_from_state(state: dict[str, torch.Tensor], cfg: SsfnConfig) -> SsfnModel:
    """Inverse of `model_state`. `cfg` must be the training config (its seed regenerates R_l)."""
    seed, q, p, nodes, count = (int(v) for v in state["meta"].tolist())
    if seed != cfg.seed or (count > 1 and nodes != cfg.nodes):
        raise ValueError(f"state was trained with seed {seed}, {nodes} nodes; config has {cfg.seed}, {cfg.nodes}")
    outputs = [state[f"o{layer}"].to(DTYPE) for layer in range(count)]
    return SsfnModel(cfg, q, p, outputs)
