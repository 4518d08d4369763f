#!/usr/bin/env python3
"""Benchmark: bytes on the wire and accuracy of `gossip.compression` against uncompressed gossip, per algorithm.

Each cell is one `peer demo` run (4 real daemons on loopback, mDNS and gRPC, digits shards:2, mlp, the demo's
defaults unless --epochs says otherwise) with `--set gossip.compression=SPEC`, once per seed of --seeds (the seed
picks the data split, the test set, the model's initialisation and the minibatches); `none` runs in the same
invocation for every algorithm and seed. Reported per run: total bytes pushed by all peers (`bytes_sent`, what the
Push streams carried, key frames included), the ratio against `none`, the peers' mean and minimum test accuracy,
and the accuracy lost against `none` of the same seed, in points. Per cell, over the seeds: the mean points lost
with their range and standard deviation. Goal: >= 4x fewer bytes at <= 0.5 points lost (the mean).

Total bytes also depend on how many pushes a run makes, and that varies from run to run: mix-mode algorithms push
the latest state whenever the previous push to a neighbour has finished, and keep pushing until the peers agree
after training. So the goal is judged on **bytes per push** (total bytes / pushes accepted by neighbours, from
each peer's metrics.jsonl; key frames included), and total bytes are shown beside it.

Usage:
    .venv/bin/python scripts/bench_compression.py --seeds 0,1,2 --json bench-results/compression.json
    .venv/bin/python scripts/bench_compression.py --algorithms cdl --compressions none,int8 --epochs 10  # smoke

Writes the markdown tables next to the JSON (compression.md), after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peer.tools.results import write_results  # noqa: E402
from peer.tools.revision import git_revision  # noqa: E402

ALGORITHMS = ("cdl", "dpsgd", "local_sgd", "dmsgd", "dmsgd_async")
COMPRESSIONS = ("none", "fp16", "bf16", "int8", "int4", "topk")
GOAL_RATIO = 4.0
GOAL_POINTS = 0.5


def run_demo(algorithm: str, compression: str, seed: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    name = f"{algorithm}-{compression.replace(':', '_')}-{seed}"
    out, run_dir = work / f"{name}.json", work / name
    cmd = [sys.executable, "-m", "peer", "demo", "--algorithm", algorithm, "--json", str(out), "--seed", str(seed)]
    cmd += ["--out", str(run_dir)]
    cmd += ["--set", f"gossip.compression={compression}"]
    if args.epochs is not None:
        cmd += ["--epochs", str(args.epochs)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout_s)
    wall = time.monotonic() - started
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stdout + proc.stderr)[-2000:]
        return {
            "algorithm": algorithm,
            "compression": compression,
            "seed": seed,
            "error": f"exit {proc.returncode}: {tail}",
        }
    d = json.loads(out.read_text())
    # A neighbour that "left" while training went on means the peers trained apart for a while (under load, or a
    # goodbye from another demo's peer of the same id): such a run measures that, not the compression.
    departures = 0
    for log in run_dir.glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if "training done" in line:
                break
            departures += "left (" in line
    pushes = 0
    for metrics in run_dir.rglob("metrics.jsonl"):
        lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
        pushes += int(json.loads(lines[-1]).get("messages_sent") or 0) if lines else 0
    return {
        "algorithm": algorithm,
        "compression": compression,
        "seed": seed,
        "bytes_sent": d["bytes_sent"],
        "pushes": pushes,
        "bytes_per_push": round(d["bytes_sent"] / max(1, pushes)),
        "mean_accuracy": d["mean_accuracy"],
        "min_accuracy": d["min_accuracy"],
        "consensus_distance": d["consensus_distance"],
        "send_failures": d["send_failures"],
        "neighbour_departures": departures,
        "training_wall_s": d["training_wall_s"],
        "wall_s": round(wall, 1),
        "command": shlex.join(["python", *cmd[1:6], *cmd[8:10], *cmd[12:]]),
    }


def compare(rows: list[dict[str, Any]]) -> None:
    """Per run: `bytes_ratio`, `bytes_per_push_ratio` and `points_lost` against the `none` run of the same
    algorithm and seed (a paired difference: the seed also picks the data split and the test set)."""
    base = {(r["algorithm"], r["seed"]): r for r in rows if r["compression"] == "none" and "error" not in r}
    for r in rows:
        b = base.get((r["algorithm"], r["seed"]))
        if b is None or "error" in r:
            continue
        r["bytes_ratio"] = round(b["bytes_sent"] / max(1, r["bytes_sent"]), 2)
        r["bytes_per_push_ratio"] = round(b["bytes_per_push"] / max(1, r["bytes_per_push"]), 2)
        r["points_lost"] = round(100 * (b["mean_accuracy"] - r["mean_accuracy"]), 2)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (algorithm, compression) over the seeds: mean and spread of the paired points lost, mean
    accuracy and its spread, bytes per push against none; `meets_goal` judges the means."""
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if "points_lost" in r:
            cells.setdefault((r["algorithm"], r["compression"]), []).append(r)
    out = []
    for (algorithm, compression), runs in cells.items():
        lost = [r["points_lost"] for r in runs]
        acc = [100 * r["mean_accuracy"] for r in runs]
        ratio = statistics.mean(r["bytes_per_push_ratio"] for r in runs)
        mean_lost = statistics.mean(lost)
        out.append({
            "algorithm": algorithm,
            "compression": compression,
            "seeds": [r["seed"] for r in runs],
            "bytes_per_push": round(statistics.mean(r["bytes_per_push"] for r in runs)),
            "bytes_per_push_ratio": round(ratio, 2),
            "bytes_ratio": round(statistics.mean(r["bytes_ratio"] for r in runs), 2),
            "mean_accuracy": round(statistics.mean(acc), 2),
            "accuracy_range": [round(min(acc), 2), round(max(acc), 2)],
            "points_lost_mean": round(mean_lost, 2),
            "points_lost_range": [round(min(lost), 2), round(max(lost), 2)],
            "points_lost_sd": round(statistics.stdev(lost), 2) if len(lost) > 1 else None,
            "meets_goal": compression != "none" and ratio >= GOAL_RATIO and mean_lost <= GOAL_POINTS,
        })  # fmt: skip
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """Per run, every seed."""
    lines = [
        "| algorithm | compression | seed | MB sent | pushes | KB per push | fewer bytes per push "
        "| fewer bytes in all | mean acc. | min acc. | points lost | neighbours lost in training |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['algorithm']} | {r['compression']} | {r['seed']} | failed: {r['error'][:80]!r} |||||||")
            continue
        lines.append(
            f"| {r['algorithm']} | {r['compression']} | {r['seed']} | {r['bytes_sent'] / 1e6:.1f} | {r['pushes']} "
            f"| {r['bytes_per_push'] / 1e3:.1f} | {r.get('bytes_per_push_ratio', 0):.2f}x "
            f"| {r.get('bytes_ratio', 0):.2f}x "
            f"| {100 * r['mean_accuracy']:.2f}% | {100 * r['min_accuracy']:.2f}% | {r.get('points_lost', 0):+.2f} "
            f"| {r['neighbour_departures']} |"
        )
    return "\n".join(lines)


def summary_table(cells: list[dict[str, Any]]) -> str:
    """Per algorithm and compression, over the seeds."""
    lines = [
        "| algorithm | compression | seeds | KB per push | fewer bytes per push | mean acc. (range) "
        "| points lost: mean (range, sd) | goal |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for c in cells:
        goal = "" if c["compression"] == "none" else ("yes" if c["meets_goal"] else "no")
        lo, hi = c["accuracy_range"]
        llo, lhi = c["points_lost_range"]
        sd = "" if c["points_lost_sd"] is None else f", sd {c['points_lost_sd']:.2f}"
        lines.append(
            f"| {c['algorithm']} | {c['compression']} | {len(c['seeds'])} | {c['bytes_per_push'] / 1e3:.1f} "
            f"| {c['bytes_per_push_ratio']:.2f}x | {c['mean_accuracy']:.2f}% ({lo:.2f}-{hi:.2f}) "
            f"| {c['points_lost_mean']:+.2f} ({llo:+.2f} to {lhi:+.2f}{sd}) | {goal} |"
        )
    return "\n".join(lines)


def report(rows: list[dict[str, Any]], args: argparse.Namespace, seeds: list[int]) -> None:
    compare(rows)
    cells = summarize(rows)
    cmd = "python scripts/bench_compression.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    revision = git_revision(ROOT)
    md = (
        f"# gossip.compression: bytes and accuracy against none\n\n`{cmd}` at {revision}.\n\n"
        f"Over seeds {', '.join(map(str, seeds))} (points lost: paired with `none` of the same seed; positive = "
        f"worse than uncompressed):\n\n{summary_table(cells)}\n\nEvery run:\n\n{table(rows)}\n"
    )
    if args.json is None:
        print(md)
        return
    result = {
        "revision": revision,
        "machine": f"{os.cpu_count()} CPUs",
        "goal": {"bytes_ratio_min": GOAL_RATIO, "points_lost_max": GOAL_POINTS},
        "epochs": args.epochs,
        "seeds": seeds,
        "summary": cells,
        "rows": rows,
    }
    write_results(args.json, result, md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algorithms", default="cdl,dpsgd", help=f"comma-separated, of {', '.join(ALGORITHMS)}")
    ap.add_argument("--compressions", default=",".join(COMPRESSIONS), help="comma-separated gossip.compression")
    ap.add_argument("--epochs", type=float, default=None, help="demo epochs (default: the demo's)")
    ap.add_argument("--seeds", default="0", help="comma-separated demo seeds; every cell runs once per seed")
    ap.add_argument("--timeout-s", type=float, default=600)
    ap.add_argument("--json", type=Path, default=None, help="write results here (and the tables next to it as .md)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    compressions = [c.strip() for c in args.compressions.split(",")]
    if "none" not in compressions:
        compressions.insert(0, "none")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-compression-") as tmp:
        # Seed-major, so that a run cut short still holds whole seeds of every cell; the results are rewritten
        # after every run.
        for seed in seeds:
            for algorithm in [a.strip() for a in args.algorithms.split(",")]:
                for compression in compressions:
                    row = run_demo(algorithm, compression, seed, args, Path(tmp))
                    rows.append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "command"}), flush=True)
                    if args.json is not None:
                        report(rows, args, seeds)
    report(rows, args, seeds)


if __name__ == "__main__":
    main()
