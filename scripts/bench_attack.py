#!/usr/bin/env python3
"""Benchmark: one authenticated attacker among 5 real daemons, every attack against every robust rule.

Each cell is one run of `tests.attackers.attacked_cluster`: 5 in-process daemons on loopback with mutual TLS
(certificates of a throwaway CA, so the attacker is a member), a full graph, logreg on digits split iid, 4 local
epochs. The fifth daemon is a `tests.attackers.HostileNode` (test-only: no config key reaches it) that runs the
real algorithm and client but sends every model, momentum or compressed difference as
    sign_flip   −10 × the honest value
    scaled_1e4  1e4 × the honest value
    random      N(0, 10²) noise
Each cell is the mean test accuracy of the 4 honest peers (min in brackets when they differ by more than 0.5
points); "clean" is the run whose fifth daemon is honest.

Usage:
    .venv/bin/python scripts/bench_attack.py --json bench-results/attack.json
    .venv/bin/python scripts/bench_attack.py --algorithms dpsgd --attacks scaled_1e4   # one row

Writes the markdown table next to the JSON (attack.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from peer.tools.results import write_results  # noqa: E402
from peer.tools.revision import git_revision  # noqa: E402
from tests.attackers import ATTACKS, DPSGD, attacked_cluster  # noqa: E402

RULES = ("none", "clip", "trimmed_mean", "median")
# Every algorithm with a robust option; the P1 ones get a short give-up (see tests.attackers.DPSGD).
ALGORITHMS: dict[str, dict[str, Any]] = {
    "dpsgd": DPSGD,
    "dmsgd": {"name": "dmsgd", "give_up_s": 1.0},
    "choco": {"name": "choco", "give_up_s": 1.0},
    "cdl": {"name": "cdl"},
}


async def cell(work: Path, algorithm: dict[str, Any], attack: str | None, rule: str) -> dict[str, Any]:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=work) as d:
        accs = await attacked_cluster(Path(d), attack=attack, algorithm={**algorithm, "robust": rule})
    return {
        "honest_accuracy": accs,
        "mean": statistics.mean(accs),
        "min": min(accs),
        "wall_s": time.monotonic() - started,
    }


def fmt(c: dict[str, Any]) -> str:
    s = f"{100 * c['mean']:.1f}%"
    return s if c["mean"] - c["min"] <= 0.005 else f"{s} ({100 * c['min']:.1f})"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# One authenticated attacker among 5 daemons (issue 9)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['cpus']} CPUs, one torch thread per daemon, all in one process.  ",
        f"Revision: {result['revision']}",
        "",
        "Mean test accuracy of the 4 honest peers (the lowest in brackets when they differ), logreg on digits, "
        "4 epochs, full graph of 5, mutual TLS. One run per cell.",
        "",
    ]
    for name, table in result["algorithms"].items():
        clean = table["clean"]
        lines += [f"## {name}", "", f"Attacker-free run (fifth daemon honest): **{fmt(clean)}**", ""]
        lines += ["| attack | " + " | ".join(RULES) + " |", "|---" * (len(RULES) + 1) + "|"]
        for attack, row in table["attacks"].items():
            lines.append(f"| {attack} | " + " | ".join(fmt(row[r]) for r in RULES) + " |")
        lines.append("")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "command": "python scripts/bench_attack.py " + shlex.join(sys.argv[1:]),
        "cpus": os.cpu_count(),
        "revision": git_revision(ROOT),
        "algorithms": {},
    }
    for name in args.algorithms:
        algorithm = ALGORITHMS[name]
        table: dict[str, Any] = {"clean": await cell(work, algorithm, None, "none"), "attacks": {}}
        print(f"{name} clean: {fmt(table['clean'])}", flush=True)
        for attack in args.attacks:
            row = {}
            for rule in RULES:
                row[rule] = await cell(work, algorithm, attack, rule)
                print(f"{name} {attack} {rule}: {fmt(row[rule])} ({row[rule]['wall_s']:.0f} s)", flush=True)
            table["attacks"][attack] = row
        result["algorithms"][name] = table
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    p.add_argument("--json", default=str(ROOT / "bench-results" / "attack.json"))
    p.add_argument("--work", default="/tmp/bench-attack")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("GRPC_VERBOSITY", "error")
    logging.basicConfig(level=logging.ERROR)  # the victims log every refused (non-finite) push
    result = asyncio.run(main_async(args))
    write_results(args.json, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
