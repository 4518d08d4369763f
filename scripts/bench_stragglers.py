#!/usr/bin/env python3
"""Benchmark: one peer 4x slower, peer against a synchronous all-reduce (issue 11, part 4).

Two systems train the same model (`mlp`, the package default) on the same digits split (`--peers` ways), for the
same number of epochs, one torch thread per process, all on loopback:

- **peer**: `--peers` real `peer run` daemons (scripts/_fleet.py), the last one with `faults.slowdown: 4` (each of
  its training steps takes 4x as long), once with the package defaults (cdl, whose pacing waits for neighbours
  that fall behind, up to `train.pace_max_wait_s`) and once with `train.max_steps_without_merge: 0` (never wait);
  each also without the straggler.
- **gloo**: `--peers` processes in a `torch.distributed` gloo group on 127.0.0.1, each step forward, backward,
  one all-reduce of the flattened gradients, SGD step (the same optimizer settings as the daemons), the last rank
  sleeping `(slowdown - 1) x` its compute time per step, exactly as `faults.slowdown` does.

Reported: the other peers' steps/s, and the slowdown = fault-free rate / straggler rate for each system.

Usage:
    .venv/bin/python scripts/bench_stragglers.py --json bench-results/stragglers.json
    .venv/bin/python scripts/bench_stragglers.py --epochs 1 --json /tmp/s.json    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fleet import ROOT, run_fleet, step_rate

from peer.tools.results import write_results
from peer.tools.revision import git_revision

SLOWDOWN = 4.0


# -------------------------------------------------------------------------------------------------------- peer
def peer_rates(peers: int, epochs: float, slow: bool, extra: dict[str, Any]) -> list[float]:
    """Steps/s of every peer but the straggler (the last one)."""
    per_peer = []
    for i in range(peers):
        cfg: dict[str, Any] = {"train": {"epochs": epochs, **extra.get("train", {})}}
        if slow and i == peers - 1:
            cfg["faults"] = {"slowdown": SLOWDOWN}
        per_peer.append(cfg)
    with tempfile.TemporaryDirectory(prefix="peer-stragglers-") as d:
        records = run_fleet(Path(d), per_peer)
    return [step_rate(r)[0] for r in records[:-1]]


# -------------------------------------------------------------------------------------------------------- gloo
def gloo_worker(rank: int, world: int, port: int, epochs: float, slowdown: float) -> None:
    import torch
    import torch.distributed as dist

    from peer import config as config_mod
    from peer.learn.data import load_dataset, local_partition
    from peer.learn.models import build_model

    torch.set_num_threads(1)
    cfg = config_mod.validate({"node_id": "g"}, source="bench_stragglers")
    ds = load_dataset(cfg.data.dataset, seed=cfg.data.seed, test_fraction=cfg.data.test_fraction)
    x, y = local_partition(ds, cfg.data.partition, world, rank, cfg.data.seed)
    model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, seed=cfg.model.seed)
    t = cfg.train
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(t.seed + rank)
    steps_per_epoch = -(-len(x) // t.batch_size)
    total = int(epochs * steps_per_epoch)
    params = list(model.parameters())
    dist.barrier()
    started = time.perf_counter()
    order = torch.randperm(len(x), generator=g)
    for step in range(total):
        i = step % steps_per_epoch
        if i == 0 and step:
            order = torch.randperm(len(x), generator=g)
        idx = order[i * t.batch_size : (i + 1) * t.batch_size]
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
        loss.backward()
        if rank == world - 1 and slowdown > 1:
            time.sleep((slowdown - 1) * (time.perf_counter() - t0))
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= world
        pos = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[pos : pos + n].view_as(p))
            pos += n
        opt.step()
    wall = time.perf_counter() - started
    dist.destroy_process_group()
    print(json.dumps({"rank": rank, "steps": total, "steps_per_s": total / wall}), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gloo_rates(peers: int, epochs: float, slow: bool) -> list[float]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME="lo")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--gloo-rank",
                str(r),
                "--gloo-world",
                str(peers),
                "--gloo-port",
                str(port),
                "--epochs",
                str(epochs),
                "--gloo-slowdown",
                str(SLOWDOWN if slow else 1.0),
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(peers)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"gloo workers failed: {[p.returncode for p in procs]}")
    rates = [json.loads(o.strip().splitlines()[-1])["steps_per_s"] for o in outs]
    return rates[:-1]


# -------------------------------------------------------------------------------------------------------- main
SYSTEMS: dict[str, dict[str, Any]] = {
    "peer (defaults: cdl, pacing on)": {},
    "peer (cdl, max_steps_without_merge 0)": {"train": {"max_steps_without_merge": 0}},
    "gloo all-reduce": {"gloo": True},
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", type=int, default=3)
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", default=str(ROOT / "bench-results" / "stragglers.json"))
    p.add_argument("--gloo-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--gloo-world", type=int, help=argparse.SUPPRESS)
    p.add_argument("--gloo-port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--gloo-slowdown", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.gloo_rank is not None:
        gloo_worker(args.gloo_rank, args.gloo_world, args.gloo_port, args.epochs, args.gloo_slowdown)
        return 0
    runs: dict[str, dict[bool, list[float]]] = {s: {False: [], True: []} for s in SYSTEMS}
    errors: list[str] = []
    for _ in range(args.repeats):
        for name, spec in SYSTEMS.items():
            for slow in (False, True):
                try:
                    if spec.get("gloo"):
                        rates = gloo_rates(args.peers, args.epochs, slow)
                    else:
                        rates = peer_rates(args.peers, args.epochs, slow, spec)
                except RuntimeError as exc:  # e.g. a run too short to measure: reported, not fatal
                    print(f"{name}: {exc}", flush=True)
                    errors.append(f"{name}: {exc}")
                    continue
                runs[name][slow].extend(rates)
                label = "straggler" if slow else "fault-free"
                print(f"{name}, {label}: " + ", ".join(f"{r:.1f}" for r in rates) + " steps/s", flush=True)
    rows = []
    for name in SYSTEMS:
        if not runs[name][False] or not runs[name][True]:
            continue
        free, slow = statistics.median(runs[name][False]), statistics.median(runs[name][True])
        rows.append(
            {
                "system": name,
                "fault_free_steps_per_s": free,
                "straggler_steps_per_s": slow,
                "slowdown": free / slow,
                "fault_free_runs": runs[name][False],
                "straggler_runs": runs[name][True],
            }
        )
    result = {
        "command": "python scripts/bench_stragglers.py " + shlex.join(sys.argv[1:]),
        "cpus": os.cpu_count(),
        "revision": git_revision(ROOT),
        "peers": args.peers,
        "epochs": args.epochs,
        "repeats": args.repeats,
        "straggler_slowdown": SLOWDOWN,
        "goal": "peer slowdown <= 1.1 while gloo slows about 4x",
        "rows": rows,
        "errors": errors,
    }
    write_results(args.json, result, markdown(result))
    return 0


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# One peer 4x slower: peer against a synchronous gloo all-reduce (issue 11, part 4)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['cpus']} CPUs, {result['peers']} processes per run (one torch thread each), loopback.  ",
        f"Revision: {result['revision']}",
        "",
        f"Model `mlp` on digits split {result['peers']} ways, {result['epochs']:g} epochs; the last process is the "
        f"straggler (x{result['straggler_slowdown']:g} per step). Steps/s: median over the other processes.",
        "",
        "| system | fault-free steps/s | with straggler steps/s | slowdown |",
        "|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['system']} | {r['fault_free_steps_per_s']:.1f} | {r['straggler_steps_per_s']:.1f} | "
            f"**{r['slowdown']:.2f}x** |"
        )
    lines += ["", f"Goal: {result['goal']}.", ""]
    lines += [f"Not measured: {e}" for e in result["errors"]]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
