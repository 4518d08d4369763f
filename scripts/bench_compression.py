#!/usr/bin/env python3
"""Benchmark: bytes on the wire and accuracy of `gossip.compression` against uncompressed gossip, per algorithm.

Each cell is one `peer demo` run (4 real daemons on loopback, mDNS and gRPC, digits shards:2, mlp, the demo's
defaults unless --epochs or --seed say otherwise) with `--set gossip.compression=SPEC`; `none` is run in the same
invocation for every algorithm. Reported per cell: total bytes pushed by all peers (`bytes_sent`, what the Push
streams carried, key frames included), the ratio against `none`, the peers' mean and minimum test accuracy, and
the accuracy lost against `none` in points. Goal: >= 4x fewer bytes at <= 0.5 points lost.

Total bytes also depend on how many pushes a run makes, and that varies from run to run: mix-mode algorithms push
the latest state whenever the previous push to a neighbour has finished, and keep pushing until the peers agree
after training. So the goal is judged on **bytes per push** (total bytes / pushes accepted by neighbours, from
each peer's metrics.jsonl; key frames included), and total bytes are shown beside it.

Usage:
    .venv/bin/python scripts/bench_compression.py --json bench-results/compression.json
    .venv/bin/python scripts/bench_compression.py --algorithms cdl --compressions none,int8 --epochs 10  # smoke

Writes the markdown table next to the JSON (compression.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peer.tools.revision import git_revision  # noqa: E402

ALGORITHMS = ("cdl", "dpsgd", "local_sgd", "dmsgd", "dmsgd_async")
COMPRESSIONS = ("none", "fp16", "bf16", "int8", "topk")
GOAL_RATIO = 4.0
GOAL_POINTS = 0.5


def run_demo(algorithm: str, compression: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    name = f"{algorithm}-{compression.replace(':', '_')}"
    out, run_dir = work / f"{name}.json", work / name
    cmd = [sys.executable, "-m", "peer", "demo", "--algorithm", algorithm, "--json", str(out), "--seed", str(args.seed)]
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
        return {"algorithm": algorithm, "compression": compression, "error": f"exit {proc.returncode}: {tail}"}
    d = json.loads(out.read_text())
    pushes = 0
    for metrics in run_dir.rglob("metrics.jsonl"):
        lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
        pushes += int(json.loads(lines[-1]).get("messages_sent") or 0) if lines else 0
    return {
        "algorithm": algorithm,
        "compression": compression,
        "bytes_sent": d["bytes_sent"],
        "pushes": pushes,
        "bytes_per_push": round(d["bytes_sent"] / max(1, pushes)),
        "mean_accuracy": d["mean_accuracy"],
        "min_accuracy": d["min_accuracy"],
        "consensus_distance": d["consensus_distance"],
        "send_failures": d["send_failures"],
        "training_wall_s": d["training_wall_s"],
        "wall_s": round(wall, 1),
        "command": shlex.join(["python", *cmd[1:5], *cmd[7:9], *cmd[11:]]),
    }


def compare(rows: list[dict[str, Any]]) -> None:
    """Add `bytes_ratio` (none's bytes / these bytes) and `points_lost` against the algorithm's `none` row."""
    base = {r["algorithm"]: r for r in rows if r["compression"] == "none" and "error" not in r}
    for r in rows:
        b = base.get(r["algorithm"])
        if b is None or "error" in r:
            continue
        r["bytes_ratio"] = round(b["bytes_sent"] / max(1, r["bytes_sent"]), 2)
        r["bytes_per_push_ratio"] = round(b["bytes_per_push"] / max(1, r["bytes_per_push"]), 2)
        r["points_lost"] = round(100 * (b["mean_accuracy"] - r["mean_accuracy"]), 2)
        good = r["bytes_per_push_ratio"] >= GOAL_RATIO and r["points_lost"] <= GOAL_POINTS
        r["meets_goal"] = r["compression"] != "none" and good


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| algorithm | compression | MB sent | pushes | KB per push | fewer bytes per push | fewer bytes in all "
        "| mean acc. | min acc. | points lost | goal |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['algorithm']} | {r['compression']} | failed: {r['error'][:80]!r} ||||||||")
            continue
        goal = "" if r["compression"] == "none" else ("yes" if r.get("meets_goal") else "no")
        lines.append(
            f"| {r['algorithm']} | {r['compression']} | {r['bytes_sent'] / 1e6:.1f} | {r['pushes']} "
            f"| {r['bytes_per_push'] / 1e3:.1f} | {r.get('bytes_per_push_ratio', 0):.2f}x "
            f"| {r.get('bytes_ratio', 0):.2f}x "
            f"| {100 * r['mean_accuracy']:.2f}% | {100 * r['min_accuracy']:.2f}% | {r.get('points_lost', 0):+.2f} "
            f"| {goal} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algorithms", default="cdl,dpsgd", help=f"comma-separated, of {', '.join(ALGORITHMS)}")
    ap.add_argument("--compressions", default=",".join(COMPRESSIONS), help="comma-separated gossip.compression")
    ap.add_argument("--epochs", type=float, default=None, help="demo epochs (default: the demo's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout-s", type=float, default=600)
    ap.add_argument("--json", type=Path, default=None, help="write results here (and the table next to it as .md)")
    args = ap.parse_args()
    compressions = [c.strip() for c in args.compressions.split(",")]
    if "none" not in compressions:
        compressions.insert(0, "none")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-compression-") as tmp:
        for algorithm in [a.strip() for a in args.algorithms.split(",")]:
            for compression in compressions:
                row = run_demo(algorithm, compression, args, Path(tmp))
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "command"}), flush=True)
    compare(rows)
    md = table(rows)
    print(md)
    if args.json is not None:
        result = {
            "revision": git_revision(ROOT),
            "machine": f"{os.cpu_count()} CPUs",
            "goal": {"bytes_ratio_min": GOAL_RATIO, "points_lost_max": GOAL_POINTS},
            "epochs": args.epochs,
            "seed": args.seed,
            "rows": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        cmd = "python scripts/bench_compression.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        header = f"# gossip.compression: bytes and accuracy against none\n\n`{cmd}` at {result['revision']}.\n\n"
        args.json.with_suffix(".md").write_text(header + md + "\n")


if __name__ == "__main__":
    main()
