#!/usr/bin/env python3
"""Compare every consensus algorithm on the same data, partition, topology and seed.

Runs `python -m peer demo --algorithm NAME --json ...` once per algorithm (and seed), one after another on this
machine, with everything else identical: the dataset, the partition, the topology, the number of peers, the
epochs and the seed. Each run is a real cluster of `peer run` processes gossiping over gRPC on loopback.

Writes OUT/algorithms.md (one results table) and OUT/algorithms.json (the raw figures), and keeps each run's
demo output under OUT/algorithms-runs/. Columns:

    accuracy        mean and min test accuracy over the peers (held-out split of the dataset)
    vs centralized  mean accuracy minus the centralized reference (one model on all data; for dssfn the
                    centralized SSFN with the exact layer solver)
    consensus       mean relative distance of the peers' models to their average at the end
    bytes sent      all peers together, whole run
    wall            training wall time (first step to the last peer done), and the whole demo

The accuracy goal for the SGD family (every algorithm but dssfn and none) is centralized − 3 points; the table
marks each row. Nothing here is asserted: it is measured.

Usage:
    .venv/bin/python scripts/compare_algorithms.py                       # every algorithm, seed 0
    .venv/bin/python scripts/compare_algorithms.py --algorithms dpsgd dmsgd --seeds 0 1
    .venv/bin/python scripts/compare_algorithms.py --faults drop=0.2     # the same under 20% message loss
    .venv/bin/python scripts/compare_algorithms.py --quick               # 20 epochs, a smoke run
    .venv/bin/python scripts/compare_algorithms.py --grid [--quick]      # the held-out grid (scripts/bench_grid.py)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GOAL_POINTS = 3.0
NOT_SGD = {"dssfn", "none"}


def all_algorithms() -> list[str]:
    sys.path.insert(0, str(ROOT))
    from peer.algorithms import REGISTRY

    return sorted(REGISTRY)


def run_one(args: argparse.Namespace, algorithm: str, seed: int, runs_dir: Path) -> dict[str, Any]:
    tag = f"{algorithm}-seed{seed}" + ("-faults" if args.faults else "")
    json_path = runs_dir / f"{tag}.json"
    out_dir = runs_dir / tag
    cmd = [
        sys.executable,
        "-m",
        "peer",
        "demo",
        "--algorithm",
        algorithm,
        "--seed",
        str(seed),
        "--peers",
        str(args.peers),
        "--topology",
        args.topology,
        "--dataset",
        args.dataset,
        "--partition",
        args.partition,
        "--json",
        str(json_path),
        "--out",
        str(out_dir),
    ]
    if args.epochs is not None:
        cmd += ["--epochs", str(args.epochs)]
    if args.faults:
        cmd += ["--faults", args.faults]
    shown = "peer demo " + shlex.join(cmd[4:]).replace(str(runs_dir) + "/", "RUNS/")
    print(f"== {algorithm} (seed {seed}): {shown}", flush=True)
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True)
    wall = time.monotonic() - started
    (runs_dir / f"{tag}.log").write_text(proc.stdout + proc.stderr)
    row: dict[str, Any] = {"algorithm": algorithm, "seed": seed, "command": shown, "exit_code": proc.returncode}
    if proc.returncode != 0 or not json_path.exists():
        row["error"] = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        print(f"   FAILED (exit {proc.returncode}); log in {runs_dir / (tag + '.log')}", flush=True)
        return row
    summary = json.loads(json_path.read_text())
    row.update(
        {
            "provenance": summary.get("provenance", ""),
            "mean_accuracy": summary["mean_accuracy"],
            "min_accuracy": summary["min_accuracy"],
            "centralized_accuracy": summary["centralized_accuracy"],
            "local_only_accuracy": summary.get("local_only_accuracy"),
            "consensus_distance": summary["consensus_distance"],
            "bytes_sent": summary["bytes_sent"],
            "send_failures": summary.get("send_failures", 0),
            "training_wall_s": summary["training_wall_s"],
            "demo_wall_s": wall,
            "epochs": summary.get("epochs"),
            "hyperparameters": summary.get("hyperparameters"),
            "layer_errors_vs_centralized": summary.get("layer_errors_vs_centralized"),
        }
    )
    print(
        f"   mean {row['mean_accuracy']:.2%} (centralized {row['centralized_accuracy']:.2%}), "
        f"consensus {row['consensus_distance']:.1e}, {row['bytes_sent'] / 1e6:.0f} MB, "
        f"training {row['training_wall_s']:.1f} s",
        flush=True,
    )
    return row


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "# Algorithm comparison",
        "",
        f"{args.peers} peers, {args.topology}, {args.dataset} `{args.partition}`, "
        f"{'default' if args.epochs is None else args.epochs} epochs, faults: `{args.faults or 'none'}`. "
        "Every run is a real `peer demo` cluster (one `peer run` process per peer, gRPC on loopback), "
        f"run one after another on one machine. Goal for the SGD family: mean ≥ centralized − {GOAL_POINTS:g} points.",
        "",
        "| algorithm | seed | provenance | mean acc | min acc | vs centralized | goal | consensus | bytes sent | "
        "training wall | demo wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['algorithm']} | {r['seed']} | run failed (exit {r['exit_code']}) | | | | | | | | |")
            continue
        diff = (r["mean_accuracy"] - r["centralized_accuracy"]) * 100
        goal = "n/a" if r["algorithm"] in NOT_SGD else ("met" if diff >= -GOAL_POINTS else "MISSED")
        if r["algorithm"] == "dssfn":
            goal = "met" if abs(diff) <= 0.5 else "MISSED"  # centralized equivalence: within 0.5 points
        lines.append(
            f"| {r['algorithm']} | {r['seed']} | {r['provenance']} | {r['mean_accuracy']:.2%} | "
            f"{r['min_accuracy']:.2%} | {diff:+.2f} pts (centralized {r['centralized_accuracy']:.2%}) | {goal} | "
            f"{r['consensus_distance']:.1e} | {r['bytes_sent'] / 1e6:.1f} MB | {r['training_wall_s']:.1f} s | "
            f"{r['demo_wall_s']:.0f} s |"
        )
    if len({r["seed"] for r in rows}) > 1:
        lines += ["", "Mean over seeds:", "", "| algorithm | mean acc | vs centralized |", "|---|---|---|"]
        for name in dict.fromkeys(r["algorithm"] for r in rows):
            ok = [r for r in rows if r["algorithm"] == name and "error" not in r]
            if ok:
                acc = statistics.mean(r["mean_accuracy"] for r in ok)
                cen = statistics.mean(r["centralized_accuracy"] for r in ok)
                lines.append(f"| {name} | {acc:.2%} | {(acc - cen) * 100:+.2f} pts |")
    for r in rows:
        errs = r.get("layer_errors_vs_centralized")
        if errs:
            shown = ", ".join(f"{e:.2e}" for e in errs)
            lines += [
                "",
                f"{r['algorithm']} (seed {r['seed']}): per-layer relative Frobenius error of the peers' output "
                f"matrices against centralized SSFN with the exact solver (worst peer): {shown}.",
            ]
    lines += ["", "Reproduce one row: the command column of `algorithms.json`, run from the repository root.", ""]
    return "\n".join(lines)


def main() -> int:
    if "--grid" in sys.argv[1:]:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_grid

        return bench_grid.main([a for a in sys.argv[1:] if a != "--grid"])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", nargs="+", help="default: every registered algorithm")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--topology", default="ring")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--partition", default="shards:2")
    parser.add_argument("--epochs", type=float, default=None, help="default: the demo's default")
    parser.add_argument("--faults", default="", help="as `peer demo --faults`, applied to every run")
    parser.add_argument("--quick", action="store_true", help="20 epochs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    args = parser.parse_args()
    if args.quick and args.epochs is None:
        args.epochs = 20.0
    algorithms = args.algorithms or all_algorithms()
    runs_dir = args.out / "algorithms-runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    rows = [run_one(args, a, s, runs_dir) for s in args.seeds for a in algorithms]
    stem = "algorithms" + ("-faults" if args.faults else "")
    (args.out / f"{stem}.json").write_text(
        json.dumps({"settings": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=2, default=str) + "\n"
    )
    (args.out / f"{stem}.md").write_text(markdown(rows, args))
    print(f"wrote {args.out / (stem + '.md')} and {args.out / (stem + '.json')}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
