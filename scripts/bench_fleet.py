#!/usr/bin/env python3
"""Four `peer run` daemons as a user deploys them, against the tuned centralized reference.

Each daemon gets only what a user must give it: `node_id`, `listen`, `state_dir` and its share of a non-IID split
(`data.partition: shards:2`, `data.num_partitions`, `data.partition_index`). Everything else is the package
default: discovery (mDNS on the listen address's interface), algorithm (cdl), model, epochs, learning rate,
pacing, gossip. The script starts them as separate processes on 127.0.0.1, waits until every one reports
`training_done`, stops them with SIGTERM, and evaluates every peer's checkpoint on the test split beside the
tuned centralized reference (`peer.learn.reference`: a learning-rate sweep chosen on a validation split, the
same epochs over all the data) and local-only training.

Usage:
    .venv/bin/python scripts/bench_fleet.py [--peers 4] [--seed 0] [--json PATH] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peer import config as config_mod  # noqa: E402
from peer.learn.training import select_device  # noqa: E402
from peer.tools.demo_eval import evaluate_peers, reference_accuracies  # noqa: E402
from peer.tools.launcher import start_peer, stop_all, wait_ready, watch  # noqa: E402


def user_config(i: int, n: int, work: Path, seed: int, extra: list[str]) -> dict[str, Any]:
    data: dict[str, Any] = {"partition": "shards:2", "num_partitions": n, "partition_index": i}
    if seed:
        data["seed"] = seed
    cfg: dict[str, Any] = {
        "node_id": f"fleet-{i}",
        "listen": "127.0.0.1:0",
        "state_dir": str(work / f"fleet-{i}"),
        "data": data,
    }
    for item in extra:  # what-if runs: --set train.lr=0.2 (the figures quoted in the README use none)
        key, _, raw = item.partition("=")
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return cfg


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="data split seed (0 = the default, not set)")
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--out", type=Path, help="keep configs, logs and state dirs here (default: a temp dir)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a default (what-if runs only)"
    )
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="peer-fleet-"))
    work.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(args.peers):
        path = work / f"fleet-{i}.yaml"
        path.write_text(yaml.safe_dump(user_config(i, args.peers, work, args.seed, args.set)))
        paths.append(path)
    cfgs = [config_mod.load(p) for p in paths]
    procs = [
        start_peer(i, c.node_id, p, Path(c.state_dir), work / f"{c.node_id}.log")
        for i, (p, c) in enumerate(zip(paths, cfgs, strict=True))
    ]
    deadline = time.monotonic() + args.timeout_s
    try:
        wait_ready(procs, deadline)
        training_s = watch(procs, cfgs[0].train.epochs, deadline)
    finally:
        codes = stop_all(procs, 30.0)
    device = select_device("cpu")
    accs, dist = evaluate_peers(cfgs, device)
    central, local = reference_accuracies(cfgs, device)
    result = {
        "peers": args.peers,
        "given_keys": sorted(user_config(0, args.peers, work, args.seed, [])),
        "overrides": args.set,
        "defaults": {"algorithm": cfgs[0].algorithm.name, "epochs": cfgs[0].train.epochs, "lr": cfgs[0].train.lr},
        "per_peer_accuracy": accs,
        "mean_accuracy": sum(accs) / len(accs),
        "consensus_distance": dist,
        "reference": central.as_dict(),
        "local_only_accuracy": sum(local) / len(local),
        "training_wall_s": training_s,
        "exit_codes": codes,
    }
    print(
        f"{args.peers} `peer run` daemons with defaults{' + ' + ' '.join(args.set) if args.set else ''} "
        f"({cfgs[0].algorithm.name}, {cfgs[0].train.epochs:g} epochs, shards:2 digits): "
        f"mean {result['mean_accuracy']:.2%} (min {min(accs):.2%}), tuned centralized reference "
        f"{central.accuracy:.2%} (lr {central.lr:g}, {central.status}), "
        f"local-only {result['local_only_accuracy']:.2%}, "
        f"training {training_s:.1f} s; state in {work}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
