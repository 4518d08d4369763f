"""The simulation harness of the SGD-family tests (test_dmsgd, test_dmsgd_async, test_dpsgd, test_local_sgd):
float64 least-squares problems, per-node oracles and step schedules, a recorder of every iterate, `simulate`, the
centralized heavy-ball reference and an InMessage builder."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from peer.algorithms.base import Algorithm, InMessage, Payload
from peer.algorithms.sim import FunctionOracle, Links, Simulation

F64 = torch.float64
Problem = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]


def lsq(
    ids: Sequence[str],
    d: int = 4,
    m: int = 10,
    seed: int = 0,
    spread: float = 0.5,
    cond: float = 1.0,
    common_a: bool = False,
    common_b: bool = False,
) -> Problem:
    """f_j(x) = ½‖A_j x − b_j‖², b_j generated around its own solution (heterogeneous), and x* of Σ_j f_j."""
    gen = torch.Generator().manual_seed(seed)
    x_true = torch.randn(d, generator=gen, dtype=F64)
    scale = torch.logspace(0, -0.5 * math.log10(cond), d, dtype=F64)  # κ(AᵀA) ≈ cond
    a0 = torch.randn(m, d, generator=gen, dtype=F64) * scale
    a = {i: a0 if common_a else torch.randn(m, d, generator=gen, dtype=F64) * scale for i in ids}
    b0 = a0 @ x_true
    b = {i: b0 if common_b else a[i] @ (x_true + spread * torch.randn(d, generator=gen, dtype=F64)) for i in ids}
    h = sum(a[i].T @ a[i] for i in ids)
    c = sum(a[i].T @ b[i] for i in ids)
    assert isinstance(h, torch.Tensor) and isinstance(c, torch.Tensor)
    return a, b, torch.linalg.solve(h, c)


def grad(prob: Problem, i: str, x: torch.Tensor) -> torch.Tensor:
    a, b, _ = prob
    return a[i].T @ (a[i] @ x - b[i])


def oracles(prob: Problem, lr: Callable[[int], float]) -> dict[str, FunctionOracle]:
    def make(i: str) -> FunctionOracle:
        # A stateful schedule counts one node's queries: every node gets its own.
        fn = Schedule(lr.alpha0) if isinstance(lr, Schedule) else lr
        return FunctionOracle(lambda x: (0.0, grad(prob, i, x)), lr_fn=fn)

    return {i: make(i) for i in prob[0]}


def initial(ids: Sequence[str], d: int = 4, seed: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {i: torch.randn(d, generator=gen, dtype=F64) for i in ids}


class Recorder:
    """after_advance hook: every node's x_k (and v_k where the algorithm has one) for k = 0, 1, ..."""

    def __init__(self, x0: dict[str, torch.Tensor]) -> None:
        self.x = {i: [x.clone()] for i, x in x0.items()}
        self.v = {i: [torch.zeros_like(x)] for i, x in x0.items()}

    def __call__(self, sim: Simulation, i: str) -> None:
        self.x[i].append(sim.x[i].clone())
        v = getattr(sim.algorithms[i], "v", None)
        self.v[i].append(v.clone() if isinstance(v, torch.Tensor) else torch.zeros_like(sim.x[i]))

    def mean(self, which: str, k: int) -> torch.Tensor:
        series = self.x if which == "x" else self.v
        return torch.stack([s[k] for s in series.values()]).mean(0)


def simulate(
    make: Callable[[str], Algorithm],
    adj: dict[str, list[str]],
    prob: Problem,
    iterations: int,
    *,
    lr: Callable[[int], float] = lambda k: 0.02,
    links: Links | None = None,
    x0: dict[str, torch.Tensor] | None = None,
    speeds: dict[str, float] | None = None,
    seed: int = 1,
    time_s: float | None = None,
) -> tuple[Simulation, Recorder]:
    """Run until every node completed `iterations`, or (P2: nodes never wait, so a finished fast node would
    leave the slow ones training alone) for `time_s` virtual seconds."""
    x0 = x0 if x0 is not None else initial(sorted(adj), d=prob[2].numel())
    rec = Recorder(x0)
    sim = Simulation(
        {i: make(i) for i in adj},
        {i: x.clone() for i, x in x0.items()},
        oracles(prob, lr),
        adj,
        links=links or Links(),
        seed=seed,
        speeds=speeds or {},
        after_advance=rec,
    )
    if time_s is None:
        sim.run(iterations=iterations)
    else:
        sim.run(max_time_s=time_s)
    return sim, rec


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


class Schedule:
    """α_k = α0 / (k + 1)^0.75, k counting this oracle's lr() queries (one per iteration)."""

    def __init__(self, alpha0: float) -> None:
        self.alpha0 = alpha0
        self.k = 0

    def __call__(self, _calls: int) -> float:
        self.k += 1
        return self.alpha0 / self.k**0.75


def heavy_ball(g: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, beta: float, alpha: float, k: int):
    xs, x, v = [x0.clone()], x0.clone(), torch.zeros_like(x0)
    for _ in range(k):
        v = beta * v - alpha * g(x)
        x = x + v
        xs.append(x)
    return xs


def _msg(sender: str, payload: Payload, now: float = 0.0, degree: int = 2) -> InMessage:
    return InMessage(sender, 1, degree, payload, now)
