"""Shared by the benchmark scripts: run a few `peer run` daemons on loopback and read their step rates.

Each daemon is a real process (`peer.tools.launcher`), found by the others over mDNS on 127.0.0.1 under a cluster
name of its own run. The step rate of a peer is measured from its `metrics.jsonl` (one record every
`metrics.interval_s`): steps between its first record with a step and its last record before `training_done`,
over the time between them, so start-up, the wait for neighbours and shut-down are not counted.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peer import config as config_mod  # noqa: E402
from peer.tools.launcher import start_peer, stop_all, wait_ready, watch  # noqa: E402


def peer_config(i: int, n: int, work: Path, cluster: str, overrides: dict[str, Any]) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "node_id": f"p{i}",
        "listen": "127.0.0.1:0",
        "state_dir": str(work / f"p{i}"),
        "discovery": {"cluster": cluster},
        "data": {"num_partitions": n, "partition_index": i},
        "train": {"torch_threads": 1},
        "metrics": {"interval_s": 0.1},  # a few records even when `none` trains 30 epochs in under a second
        "checkpoint": {"interval_s": 3600},
    }
    _merge(cfg, overrides)
    return cfg


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def run_fleet(work: Path, per_peer: list[dict[str, Any]], timeout_s: float = 600.0) -> list[list[dict[str, Any]]]:
    """Start one daemon per entry of `per_peer` (config overrides), wait until all finish training, stop them;
    returns each peer's metrics records."""
    n = len(per_peer)
    cluster = f"bench-{uuid.uuid4().hex[:8]}"
    paths = []
    for i, extra in enumerate(per_peer):
        path = work / f"p{i}.yaml"
        path.write_text(yaml.safe_dump(peer_config(i, n, work, cluster, extra)))
        paths.append(path)
    cfgs = [config_mod.load(p) for p in paths]
    procs = [
        start_peer(i, c.node_id, p, Path(c.state_dir), work / f"{c.node_id}.log")
        for i, (p, c) in enumerate(zip(paths, cfgs, strict=True))
    ]
    deadline = time.monotonic() + timeout_s
    try:
        wait_ready(procs, deadline)
        watch(procs, cfgs[0].train.epochs, deadline)
    finally:
        stop_all(procs, 30.0, quiet=True)
    return [read_metrics(Path(c.state_dir) / "metrics.jsonl") for c in cfgs]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def step_rate(records: list[dict[str, Any]], skip_fraction: float = 0.0) -> tuple[float, int, float]:
    """(steps per second, steps counted, seconds): from the first record with a step to the first that shows the
    final step count (at most one `metrics.interval_s` late).

    `skip_fraction`: start counting at the first record past that fraction of the final step count instead. A peer
    that starts after its neighbours adopts the state of one ahead and its step count jumps forward with it; on a
    short run that jump alone can double the measured rate."""
    training = [r for r in records if int(r.get("step", 0)) > 0]
    if not training:
        raise RuntimeError("no metrics record shows a training step")
    final = max(int(r["step"]) for r in training)
    last = next(r for r in training if int(r["step"]) == final)
    first = next(r for r in training if int(r["step"]) >= skip_fraction * final)
    steps = final - int(first["step"])
    seconds = float(last["elapsed_s"]) - float(first["elapsed_s"])
    if steps <= 0 or seconds <= 0:
        raise RuntimeError("too few metrics records to measure a step rate; train longer")
    return steps / seconds, steps, seconds
