#!/usr/bin/env python3
"""Benchmark: what gossip costs training (issue 11, part 3). Steps/s of each peer with cdl, dpsgd and choco against
algorithm `none` (local training only, no gossip), same model and data, one peer per core.

Each run starts `--peers` real `peer run` daemons on loopback (mDNS under a cluster name of their own, one torch
thread each), trains `--epochs` epochs of the package defaults (the digits data split in `--peers`, the `mlp`
model unless `--model`), and reads each peer's step rate from its metrics.jsonl while it trained (see
scripts/_fleet.py). Algorithms alternate within each repeat; the ratio is the median rate of an algorithm over
the median rate of `none`, from the same invocation.

Usage:
    .venv/bin/python scripts/bench_overhead.py --json bench-results/overhead.json
    .venv/bin/python scripts/bench_overhead.py --epochs 1 --repeats 1 --json /tmp/o.json     # a smoke run

Writes the markdown table next to the JSON (overhead.md).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fleet import ROOT, run_fleet, step_rate

from peer.tools.results import write_results
from peer.tools.revision import git_revision

ALGORITHMS = ("none", "cdl", "cdl+nowait", "dpsgd", "choco")


def one_run(
    algorithm: str, peers: int, epochs: float, model: str, dataset: str = "digits", batch_size: int | None = None
) -> list[dict[str, Any]]:
    """`name+nowait`: the algorithm with `train.max_steps_without_merge: 0` (never wait for a neighbour);
    `name+msN`: with `train.max_steps_without_merge: N` (a pacing bound other than the algorithm's default)."""
    name, _, variant = algorithm.partition("+")
    train: dict[str, Any] = {"epochs": epochs}
    if variant == "nowait":
        train["max_steps_without_merge"] = 0
    elif variant.startswith("ms") and variant[2:].isdigit():
        train["max_steps_without_merge"] = int(variant[2:])
    elif variant:
        raise SystemExit(f"unknown variant {variant!r} in {algorithm!r}; known: nowait, msN")
    if batch_size is not None:
        train["batch_size"] = batch_size
    extra = {"algorithm": {"name": name}, "train": train, "model": {"name": model}, "data": {"dataset": dataset}}
    with tempfile.TemporaryDirectory(prefix="peer-overhead-") as d:
        records = run_fleet(Path(d), [extra] * peers)
    out = []
    for recs in records:
        rate, steps, seconds = step_rate(recs)
        last = recs[-1]
        out.append(
            {
                "steps_per_s": rate,
                "steps": steps,
                "seconds": seconds,
                "bytes_sent": last.get("bytes_sent", 0),
                "messages_sent": last.get("messages_sent", 0),
            }
        )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=2, help="daemons per run (default 2: one per core here)")
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--model", default="mlp")
    p.add_argument("--dataset", default="digits", help="digits | mnist1d (default digits)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="train.batch_size (default: the package's 32). The default mlp on digits steps in about 0.3 ms, so "
        "any exchange is large next to a step; `--model cnn --dataset mnist1d --batch-size 512` is a step that is "
        "mostly compute, as in scripts/bench_stragglers.py",
    )
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS))
    p.add_argument("--json", default=str(ROOT / "bench-results" / "overhead.json"))
    args = p.parse_args()
    if "none" not in args.algorithms:
        p.error("--algorithms must include none (the baseline)")
    runs: dict[str, list[float]] = {a: [] for a in args.algorithms}
    detail: dict[str, list[list[dict[str, Any]]]] = {a: [] for a in args.algorithms}
    for _ in range(args.repeats):
        for algo in args.algorithms:
            peers = one_run(algo, args.peers, args.epochs, args.model, args.dataset, args.batch_size)
            detail[algo].append(peers)
            runs[algo].extend(x["steps_per_s"] for x in peers)
            print(f"{algo}: " + ", ".join(f"{x['steps_per_s']:.1f}" for x in peers) + " steps/s", flush=True)
    base = statistics.median(runs["none"])
    rows = [
        {
            "algorithm": a,
            "steps_per_s": statistics.median(runs[a]),
            "ratio_vs_none": statistics.median(runs[a]) / base,
            "per_peer_runs": runs[a],
            "mib_sent_per_peer": statistics.median(x["bytes_sent"] for r in detail[a] for x in r) / 2**20,
        }
        for a in args.algorithms
    ]
    result = {
        "command": "python scripts/bench_overhead.py " + shlex.join(sys.argv[1:]),
        "cpus": os.cpu_count(),
        "revision": git_revision(ROOT),
        "peers": args.peers,
        "epochs": args.epochs,
        "repeats": args.repeats,
        "model": args.model,
        "dataset": args.dataset,
        "batch_size": args.batch_size or 32,
        "goal_ratio": 0.95,
        "rows": rows,
        "runs": detail,
    }
    write_results(args.json, result, markdown(result))
    return 0


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Cost of gossip to training (issue 11, part 3)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['cpus']} CPUs, {result['peers']} `peer run` daemons (one torch thread each) on loopback.  ",
        f"Revision: {result['revision']}",
        "",
        f"Model `{result['model']}` on the {result.get('dataset', 'digits')} data split {result['peers']} ways, "
        f"batches of {result.get('batch_size', 32)}, {result['epochs']:g} epochs, "
        f"{result['repeats']} runs per algorithm (alternating); steps/s is the median over peers and runs.",
        "",
        "| algorithm | steps/s | ratio vs none | MiB sent per peer | per-peer rates |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        rates = ", ".join(f"{v:.0f}" for v in r["per_peer_runs"])
        lines.append(
            f"| {r['algorithm']} | {r['steps_per_s']:.1f} | **{r['ratio_vs_none']:.2f}** | "
            f"{r['mib_sent_per_peer']:.1f} | {rates} |"
        )
    lines += ["", f"Goal: ratio >= {result['goal_ratio']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
