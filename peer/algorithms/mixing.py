"""Mixing weights shared by the consensus algorithms (Metropolis–Hastings, uniform)."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def metropolis_hastings(self_degree: int, neighbour_degrees: Mapping[str, int]) -> dict[str, float]:
    """w_ij = 1 / (1 + max(d_i, d_j)) for each neighbour j. The self weight is 1 − Σ w_ij.

    Doubly stochastic on any undirected graph when every node uses its true degree, because w_ij = w_ji.
    """
    weights: dict[str, float] = {}
    for j, d_j in neighbour_degrees.items():
        weights[j] = 1.0 / (1.0 + max(self_degree, max(d_j, 1)))
    return weights


def uniform(self_degree: int, neighbour_degrees: Mapping[str, int]) -> dict[str, float]:
    """w_ij = 1 / (d_i + 1): the "circular graph of degree d" weights. Doubly stochastic on regular graphs."""
    return {j: 1.0 / (self_degree + 1.0) for j in neighbour_degrees}


WEIGHT_RULES = {"metropolis": metropolis_hastings, "uniform": uniform}


def mixing_matrix(adjacency: Mapping[str, list[str]], rule: str = "metropolis") -> dict[str, dict[str, float]]:
    """The full matrix W as nested dicts, for tests and simulations (row i = what node i computes locally)."""
    fn = WEIGHT_RULES[rule]
    rows: dict[str, dict[str, float]] = {}
    for i, nbrs in adjacency.items():
        row = fn(len(nbrs), {j: len(adjacency[j]) for j in nbrs})
        row[i] = 1.0 - sum(row.values())
        rows[i] = row
    return rows


def second_largest_eigenvalue_modulus(rows: Mapping[str, Mapping[str, float]]) -> float:
    """λ = max(|λ_2|, |λ_n|) of a symmetric, doubly stochastic mixing matrix W (as `mixing_matrix` returns it).

    The spectral-gap prediction of gossip averaging: x ← W x shrinks the disagreement ‖x − x̄1‖ by at most λ per
    round, and asymptotically by exactly λ, so about log(1/tol) / (1 − λ) rounds reach a relative tolerance tol.
    """
    ids = sorted(rows)
    if len(ids) < 2:
        return 0.0
    index = {node: i for i, node in enumerate(ids)}
    w = torch.zeros(len(ids), len(ids), dtype=torch.float64)
    for i, row in rows.items():
        for j, value in row.items():
            w[index[i], index[j]] = value
    moduli = torch.linalg.eigvalsh((w + w.T) / 2).abs().sort(descending=True).values
    return float(moduli[1])
