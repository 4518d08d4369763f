"""What the NEXT tests share (test_next.py, test_next_pushsum.py): the least-squares problems, the error
measure, the simulation runner and a departure scenario."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from peer.algorithms.next import Next
from peer.algorithms.next_pushsum import NextPushsum
from peer.algorithms.sim import FunctionOracle, Links, Simulation, ring

AGENTS = 8  # I, the number of agents
F64 = torch.float64


# ------------------------------------------------------------------------------------------------ problems
@dataclass
class LeastSquares:
    """g_i(w) = ||A_i w − b_i||², heterogeneous across agents."""

    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]

    @staticmethod
    def make(ids: Sequence[str], d: int = 6, m: int = 10, seed: int = 0, sparse: bool = False) -> LeastSquares:
        gen = torch.Generator().manual_seed(seed)
        w_true = torch.randn(d, generator=gen, dtype=F64)
        if sparse:
            w_true[d // 2 :] = 0.0
        a, b = {}, {}
        for k, i in enumerate(ids):
            a[i] = torch.randn(m, d, generator=gen, dtype=F64) * (1 + 0.3 * k)
            b[i] = a[i] @ w_true + 0.5 * torch.randn(m, generator=gen, dtype=F64) + (0.0 if sparse else 0.5 * k)
        return LeastSquares(a, b)

    def grad(self, i: str, w: torch.Tensor) -> torch.Tensor:
        return 2.0 * self.a[i].T @ (self.a[i] @ w - self.b[i])

    def lipschitz(self, i: str) -> float:
        return 2.0 * float(torch.linalg.matrix_norm(self.a[i], 2)) ** 2

    def ridge_optimum(self, lam: float, ids: Sequence[str] | None = None) -> torch.Tensor:
        ids = list(ids or self.a)
        d = self.a[ids[0]].shape[1]
        h = sum(2.0 * self.a[i].T @ self.a[i] for i in ids) + 2.0 * lam * torch.eye(d, dtype=F64)
        return torch.linalg.solve(h, sum(2.0 * self.a[i].T @ self.b[i] for i in ids))  # type: ignore[arg-type]

    def oracle(self, i: str, lr: float = 0.01) -> FunctionOracle:
        return FunctionOracle(lambda w: (0.0, self.grad(i, w)), lr_fn=lambda k: lr)


def rel_err(xs: dict[str, torch.Tensor], w_star: torch.Tensor, ids: Sequence[str] | None = None) -> float:
    ids = list(ids or xs)
    return max(float(torch.linalg.vector_norm(xs[i] - w_star)) for i in ids) / float(w_star.norm())


def run(
    algos: dict[str, Next] | dict[str, NextPushsum],
    oracles: dict[str, FunctionOracle],
    adj: object,
    iterations: int,
    drop: float = 0.0,
    hook: Callable[[Simulation, str], None] | None = None,
    d: int = 6,
    seed: int = 1,
) -> Simulation:
    x0 = {i: torch.zeros(d, dtype=F64) for i in algos}
    sim = Simulation(
        dict(algos), x0, oracles, adj, links=Links(drop=drop, duplicate=0.05), seed=seed, after_advance=hook
    )  # type: ignore[arg-type]
    return sim.run(iterations=iterations)


# ----------------------------------------------------------------------------------- churn: tracker restart
def departure(ids: list[str], at_iteration: int) -> tuple[Callable[[str, int], list[str]], Callable[..., None]]:
    """n7 leaves a ring when the first node completes `at_iteration`: the shells of n0, n6 (and n7) forget the
    link, the membership drops n7, and from then on views show a 7-ring plus a lonely n7."""
    before, after = ring(len(ids)), {**ring(len(ids) - 1), ids[-1]: []}
    left = [False]

    def adjacency(node: str, iteration: int) -> list[str]:
        return after[node] if left[0] else before[node]

    def hook(sim: Simulation, node: str) -> None:
        if not left[0] and sim.algorithms[node].iteration == at_iteration:
            left[0] = True
            sim.members = frozenset(ids[:-1])
            for a, b in (("n0", "n7"), ("n6", "n7"), ("n7", "n0"), ("n7", "n6")):
                sim.algorithms[a].forget(b)

    return adjacency, hook
