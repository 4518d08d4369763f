#!/usr/bin/env python3
"""A held-out grid: every algorithm against the tuned centralized reference, off the demo's tuned point.

Cells are datasets (digits, mnist1d) x models (mlp, cnn) x peers (4, 8, 16) x topologies (ring, exponential) x
partitions (shards:2, dirichlet:0.1) x faults (none, drop=0.3, one straggler 4x). Each cell runs `peer demo`
once per algorithm with the daemon's own defaults (nothing tuned per cell), one run after another on this
machine. The reference of a cell is the demo's tuned centralized model (a learning-rate sweep chosen on a
validation split of the training data; `peer.learn.reference`); a reference that diverged or fell below
local-only training is shown as such and no difference is computed against it.

Writes OUT/grid.md (a table of accuracy minus reference, in points, per cell and algorithm, with the command of
every cell), OUT/grid.json (raw figures) and OUT/grid.png (a heatmap of the same), and keeps each run under
OUT/grid-runs/. Runs whose JSON already exists are reused, so an interrupted grid resumes where it stopped.
Nothing is asserted: it is measured. Goal: cdl and at least four more SGD-family algorithms within 2 points of
the reference in every cell up to 8 peers.

Usage:
    .venv/bin/python scripts/bench_grid.py --quick          # the reduced grid (7 cells), committed results
    .venv/bin/python scripts/bench_grid.py                  # the full grid (144 cells; hours on 2 cores)
    .venv/bin/python scripts/compare_algorithms.py --grid   # the same, from the comparison script
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GOAL_POINTS = 2.0
DEFAULT_ALGORITHMS = ("cdl", "dpsgd", "dmsgd", "local_sgd", "sgp", "choco")
FAULTS = {"none": "", "drop": "drop=0.3", "straggler": "straggler=peer-1:4"}


@dataclass(frozen=True)
class Cell:
    dataset: str
    model: str
    peers: int
    topology: str
    partition: str
    faults: str  # a key of FAULTS

    @property
    def tag(self) -> str:
        part = self.partition.replace(":", "")
        return f"{self.dataset}-{self.model}-{self.peers}p-{self.topology}-{part}-{self.faults}"

    def demo_args(self, algorithm: str, seed: int) -> list[str]:
        args = ["--algorithm", algorithm, "--seed", str(seed), "--peers", str(self.peers)]
        args += ["--topology", self.topology, "--dataset", self.dataset, "--model", self.model]
        args += ["--partition", self.partition]
        if FAULTS[self.faults]:
            args += ["--faults", FAULTS[self.faults]]
        return args


def full_grid() -> list[Cell]:
    return [
        Cell(*values)
        for values in itertools.product(
            ("digits", "mnist1d"), ("mlp", "cnn"), (4, 8, 16), ("ring", "exponential"),
            ("shards:2", "dirichlet:0.1"), tuple(FAULTS),
        )
    ]  # fmt: skip


def quick_grid() -> list[Cell]:
    """Off the demo's point in one direction at a time: more peers, another partition, faults, another dataset."""
    return [
        Cell("digits", "mlp", 4, "ring", "shards:2", "none"),
        Cell("digits", "mlp", 8, "ring", "shards:2", "none"),
        Cell("digits", "mlp", 4, "ring", "dirichlet:0.1", "none"),
        Cell("digits", "mlp", 8, "exponential", "dirichlet:0.1", "none"),
        Cell("digits", "mlp", 4, "ring", "shards:2", "drop"),
        Cell("digits", "mlp", 4, "ring", "shards:2", "straggler"),
        Cell("mnist1d", "mlp", 4, "ring", "shards:2", "none"),
    ]


def run(cell: Cell, algorithm: str, seed: int, runs: Path, timeout_s: float) -> dict[str, Any]:
    tag = f"{cell.tag}-{algorithm}-seed{seed}"
    out = runs / f"{tag}.json"
    cmd = [sys.executable, "-m", "peer", "demo", *cell.demo_args(algorithm, seed), "--json", str(out)]
    cmd += ["--timeout-s", str(timeout_s)]
    shown = "peer demo " + shlex.join(cell.demo_args(algorithm, seed))
    row: dict[str, Any] = {"cell": asdict(cell), "algorithm": algorithm, "seed": seed, "command": shown}
    if not out.exists():
        print(f"== {cell.tag} {algorithm}: {shown}", flush=True)
        started = time.monotonic()
        proc = subprocess.run(
            cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True
        )
        (runs / f"{tag}.log").write_text(proc.stdout + proc.stderr)
        row["wall_s"] = time.monotonic() - started
        if proc.returncode != 0 or not out.exists():
            row["error"] = f"exit {proc.returncode}, log {runs / (tag + '.log')}"
            print(f"   FAILED: {row['error']}", flush=True)
            return row
    s = json.loads(out.read_text())
    row.update(
        {
            "mean_accuracy": s["mean_accuracy"],
            "min_accuracy": s["min_accuracy"],
            "reference": s["centralized_accuracy"],
            "reference_lr": s.get("centralized_lr"),
            "reference_status": s.get("centralized_status", "ok"),
            "published": s.get("published_accuracy"),
            "local_only": s.get("local_only_accuracy"),
            "training_wall_s": s["training_wall_s"],
            "bytes_sent": s["bytes_sent"],
        }
    )
    if row["reference_status"] == "ok":
        row["points"] = 100 * (row["mean_accuracy"] - row["reference"])
    print(f"   {algorithm}: {row['mean_accuracy']:.2%} vs reference {row['reference']:.2%}", flush=True)
    return row


def markdown(rows: list[dict[str, Any]], algorithms: list[str], cells: list[Cell], settings: str) -> str:
    by = {(Cell(**r["cell"]), r["algorithm"]): r for r in rows}
    head = "| cell | reference | " + " | ".join(algorithms) + " | within 2 pts |"
    lines = [
        "# Held-out grid: accuracy minus the tuned centralized reference (points)",
        "",
        settings,
        "",
        head,
        "|" + "---|" * (len(algorithms) + 3),
    ]
    for cell in cells:
        ref = next((r for (c, _), r in by.items() if c == cell and "reference" in r), None)
        if ref is None:
            continue
        ref_text = (
            f"{ref['reference']:.2%} (lr {ref['reference_lr']:g})" if ref["reference_lr"] else f"{ref['reference']:.2%}"
        )
        if ref["reference_status"] != "ok":
            ref_text += f" **{ref['reference_status']}**"
        if ref.get("published") is not None:
            ref_text += f", published {ref['published']:.0%}"
        cols, met = [], 0
        for a in algorithms:
            r = by.get((cell, a))
            if r is None or "error" in r:
                cols.append("failed" if r else "")
            elif "points" not in r:
                cols.append(f"{r['mean_accuracy']:.2%}")
            else:
                met += r["points"] >= -GOAL_POINTS
                cols.append(f"{r['points']:+.1f}" + ("" if r["points"] >= -GOAL_POINTS else " ✗"))
        lines.append(f"| {cell.tag} | {ref_text} | " + " | ".join(cols) + f" | {met}/{len(algorithms)} |")
    lines += ["", "Commands (run from the repository root; add `--json PATH` to keep the figures):", ""]
    for cell in cells:
        lines.append(f"- {cell.tag}: `.venv/bin/{cell_command(cell)}`")
    return "\n".join(lines) + "\n"


def cell_command(cell: Cell) -> str:
    return "peer demo " + shlex.join(cell.demo_args("ALGORITHM", 0))


def heatmap(rows: list[dict[str, Any]], algorithms: list[str], cells: list[Cell], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    by = {(Cell(**r["cell"]), r["algorithm"]): r.get("points", np.nan) for r in rows}
    data = np.array([[by.get((c, a), np.nan) for a in algorithms] for c in cells], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 * len(algorithms) + 4, 0.45 * len(cells) + 1.5))
    im = ax.imshow(np.clip(data, -10, 2), cmap="RdYlGn", vmin=-10, vmax=2, aspect="auto")
    ax.set_xticks(range(len(algorithms)), algorithms)
    ax.set_yticks(range(len(cells)), [c.tag for c in cells])
    for i, j in itertools.product(range(len(cells)), range(len(algorithms))):
        if np.isfinite(data[i, j]):
            ax.text(j, i, f"{data[i, j]:+.1f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy minus tuned centralized reference (points)")
    ax.set_title("peer demo with default settings vs the tuned centralized reference")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the reduced grid (7 cells)")
    parser.add_argument("--algorithms", nargs="+", default=list(DEFAULT_ALGORITHMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-peers", type=int, default=None, help="skip cells with more peers")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    args = parser.parse_args(argv)
    cells = quick_grid() if args.quick else full_grid()
    if args.max_peers:
        cells = [c for c in cells if c.peers <= args.max_peers]
    runs = args.out / "grid-runs"
    runs.mkdir(parents=True, exist_ok=True)
    rows = [run(c, a, args.seed, runs, args.timeout_s) for c in cells for a in args.algorithms]
    settings = (
        f"{'Quick' if args.quick else 'Full'} grid, seed {args.seed}, the demo's default epochs, every setting the "
        f"daemon's default; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} CPUs. "
        f"✗ marks a miss of the {GOAL_POINTS:g}-point goal."
    )
    (args.out / "grid.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    (args.out / "grid.md").write_text(markdown(rows, args.algorithms, cells, settings))
    heatmap(rows, args.algorithms, cells, args.out / "grid.png")
    print(f"wrote {args.out / 'grid.md'}, grid.json and grid.png")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
