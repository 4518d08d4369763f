#!/usr/bin/env python3
"""Benchmark: `peer simulate` at 64 and 256 peers, and the consensus rate of three topologies against λ.

Every row is one `peer simulate` run (the exact command is in the table): D-PSGD on digits (label shards), a
logistic-regression model, 100 local epochs (one minibatch per epoch at these partition sizes, so 100 training
rounds), then mixing only until the relative disagreement is 1e-4 or the round cap. The measured contraction per
round of the mixing-only phase is set beside λ, the second-largest eigenvalue modulus of the topology's
Metropolis–Hastings matrix.

Usage (Ray must be importable: pip install 'peer[ray]'):
    python scripts/bench_simulate.py --json bench-results/simulate.json
    python scripts/bench_simulate.py --backend local --quick        # a smoke run without Ray

Writes the markdown table next to the JSON (simulate.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peer.cli import build_parser  # noqa: E402
from peer.tools.revision import git_revision  # noqa: E402
from peer.tools.simulate import simulate_one  # noqa: E402

COMMON = ["--set", "train.epochs=100", "--actors", "4", "--num-cpus", "2", "--object-store-mb", "256"]
CASES: list[tuple[int, str, list[str]]] = [
    (64, "exponential", []),
    (64, "random-regular:4", []),
    (64, "ring", []),
    (64, "exponential", ["--faults", "drop=0.1,stragglers=0.1:3,churn=0.05:0.5", "--set", "algorithm.give_up_s=0.2"]),
    (256, "exponential", []),
    (256, "random-regular:4", []),
    (256, "ring", ["--max-rounds", "400"]),
]


def _mib(b: float) -> str:
    return f"{b / 2**20:.1f} MiB"


def markdown(out: dict[str, Any]) -> str:
    lines = [
        "# peer simulate: 64 and 256 peers on Ray (issue 13)",
        "",
        f"Command: `{out['command']}`  ",
        f"Machine: {out['cpus']} CPUs, backend {out['backend']} ({out['actors']} actors, several peers each).  ",
        f"Revision: {out['revision']}  ",
        "Load average (1 min) around the runs: "
        + ", ".join(f"{a:.1f}→{b:.1f}" for a, b in (r.get("load_average_1min", (0, 0)) for r in out["runs"])),
        "",
        "Each row is the `peer simulate` command below it. D-PSGD (P1 rounds, retransmitted until acknowledged), "
        "digits in label shards (`shards:2`), logistic regression, 100 local epochs = 100 training rounds, then "
        "mixing only until the relative RMS disagreement reaches 1e-4 (or the round cap). Every message between "
        "peers is encoded by the daemon's encoder and checked by its assembler. λ: the second-largest eigenvalue "
        "modulus of the Metropolis–Hastings matrix; 'predicted' rounds = log(1e-4 / d₀) / log λ from the "
        "disagreement d₀ at the end of training.",
        "",
        "| peers | topology | faults | λ | rate measured | rounds to consensus (predicted) | training s | "
        "consensus s | setup s | accuracy (average model / peer min) | bytes sent (per peer and round) | "
        "memory per peer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["runs"]:
        rate = f"{r['rate_measured']:.4f}" if r["rate_measured"] is not None else "n/a"
        rounds = f"{r['rounds_to_consensus']}{'' if r['reached'] else ' (cap, not reached)'} ({r['predicted_rounds']})"
        lines.append(
            f"| {r['peers']} | {r['topology']} | {r['faults'] or 'none'} | {r['slem_predicted']:.4f} | {rate} | "
            f"{rounds} | {r['wall_s_training']:.1f} | {r['wall_s_to_consensus']:.1f} | {r['setup_s']:.1f} | "
            f"{100 * r['accuracy_of_average']:.1f}% / {100 * r['accuracy_min_peer']:.1f}% | "
            f"{_mib(r['bytes_sent'])} ({r['bytes_per_peer_round']:.0f} B) | "
            f"{r['memory_per_peer_bytes'] / 1024:.0f} KiB |"
        )
    lines += ["", "Commands:", ""]
    lines += [f"- `{r['command']}`" for r in out["runs"]]
    lines += ["", "Fault counters of the faulty run(s):", ""]
    for r in out["runs"]:
        if r["faults"]:
            lines.append(f"- {r['peers']} peers, `{r['faults']}`: {json.dumps(r['counters'])}")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="ray", choices=("ray", "local"))
    p.add_argument("--quick", action="store_true", help="only the first case, with 16 peers and 5 epochs")
    p.add_argument("--only", type=int, help="only the cases with this many peers")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    cases = [(16, "exponential", ["--set", "train.epochs=5"])] if args.quick else CASES
    runs = []
    for peers, topology, extra in cases:
        if args.only and peers != args.only:
            continue
        argv = ["simulate", "--backend", args.backend, "--peers", str(peers), "--topology", topology, *COMMON, *extra]
        load_before = os.getloadavg()[0]
        run = simulate_one(build_parser().parse_args(argv), topology)
        run["command"] = shlex.join(["peer", *argv])
        run["load_average_1min"] = [load_before, os.getloadavg()[0]]
        print(json.dumps({k: v for k, v in run.items() if k not in ("counters", "process_rss_bytes")}), flush=True)
        runs.append(run)
    out = {
        "command": shlex.join(["python", "scripts/bench_simulate.py", *sys.argv[1:]]),
        "revision": git_revision(ROOT),
        "cpus": os.cpu_count(),
        "backend": args.backend,
        "actors": 4,
        "runs": runs,
    }
    text = markdown(out)
    print(text)
    if args.json:
        path = Path(args.json)
        path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        path.with_suffix(".md").write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
