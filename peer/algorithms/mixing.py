"""Mixing weights shared by the consensus algorithms (Metropolis–Hastings, uniform)."""

from __future__ import annotations

from collections.abc import Mapping


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
