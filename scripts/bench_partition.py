#!/usr/bin/env python3
"""Benchmark: how long the consensus distance takes to return to its pre-partition level after a 2/2 split heals.

Runs 4 `peer run` daemons in 4 network namespaces (peer.tools.testbed; needs root), lets them train, partitions the
virtual LAN into {h0, h1} and {h2, h3} for --partition-s seconds, heals it, and measures the consensus distance
(mean over peers of ‖θ_i − θ̄‖ / ‖θ̄‖) over time from the daemons' parameter snapshots.

    sudo .venv/bin/python scripts/bench_partition.py [--partition-s 15] [--out bench-results]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from peer.tools.demo_eval import bin_snapshots, consensus_distance, list_snapshots
from peer.tools.testbed import Testbed, netns_unavailable

N = 4
CONFIG = {
    "model": {"name": "mlp"},
    "data": {"dataset": "digits", "partition": "shards:2", "num_partitions": N},
    "train": {
        "epochs": 400,
        "lr": 0.05,
        "torch_threads": 1,
        "round_interval_s": 0.03,
        "device": "cpu",
        "lr_schedule": "constant",
        "wait_for_neighbors_s": 20,
    },
    "gossip": {"interval_s": 0.005, "rpc_timeout_s": 1.0, "backoff_cap_s": 1.0},
    "membership": {"heartbeat_interval_s": 0.5, "probe_evicted_max_s": 2.0},
    "metrics": {"interval_s": 0.5, "snapshot_interval_s": 0.25},
    "checkpoint": {"interval_s": 5},
}


def distance_curve(tb: Testbed, bin_s: float) -> list[tuple[float, float]]:
    """(unix time, consensus distance) for every time bin in which every peer wrote a snapshot."""
    per_peer = {f"h{i}": list_snapshots(tb.state_path_of(i)) for i in range(N)}
    origin = min(s.unix_ms for snaps in per_peer.values() for s in snaps) / 1000.0
    out = []
    for offset, snaps in bin_snapshots(per_peer, bin_s=bin_s):
        out.append((origin + offset, consensus_distance([np.load(s.path) for s in snaps.values()])))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--partition-s", type=float, default=15.0)
    p.add_argument("--warmup-s", type=float, default=15.0)
    p.add_argument("--after-s", type=float, default=20.0)
    p.add_argument("--out", default="bench-results")
    args = p.parse_args()
    reason = netns_unavailable()
    if reason:
        print(f"bench_partition: {reason}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="peer-bench-partition-"))
    tb = Testbed(f"bp{int(time.time()) % 100000}", N, work, CONFIG)
    tb.up()
    try:
        for i in range(N):
            tb.start(i)
        for i in range(N):
            tb.ready(i, timeout_s=90)
        time.sleep(args.warmup_s)  # a benchmark, not a test: it runs for fixed wall-clock phases
        t_split = time.time()
        tb.partition([[0, 1], [2, 3]])
        time.sleep(args.partition_s)
        t_heal = time.time()
        tb.heal()
        time.sleep(args.after_s)
        curve = distance_curve(tb, bin_s=0.5)
    finally:
        tb.down()

    def window(a: float, b: float) -> list[float]:
        return [d for t, d in curve if a <= t < b]

    before = float(np.median(window(t_split - 8.0, t_split)))
    during = float(np.max(window(t_split, t_heal + 0.5)))
    recovered_at = next((t for t, d in curve if t > t_heal and d <= 1.1 * before), None)
    result = {
        "pre_partition_distance": before,
        "max_distance_during_partition": during,
        "partition_s": args.partition_s,
        "recovery_s": None if recovered_at is None else recovered_at - t_heal,
        "curve": [(round(t - t_split, 2), d) for t, d in curve],
        "command": "sudo .venv/bin/python scripts/bench_partition.py " + " ".join(sys.argv[1:]),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "partition.json").write_text(json.dumps(result, indent=1))
    rec = "never" if result["recovery_s"] is None else f"{result['recovery_s']:.1f} s"
    print(
        f"consensus distance before the split {before:.2e}, peak while split {during:.2e}; back to within 10% of "
        f"the pre-split level {rec} after healing a {args.partition_s:g} s 2/2 partition"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
