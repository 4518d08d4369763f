#!/usr/bin/env python3
"""Benchmark: one peer 4x slower, peer against a synchronous all-reduce (issue 11, part 4).

Two systems train the same model on the same data split (`--peers` ways), for the same number of epochs, with the
same batch size, one torch thread per process, all on loopback. The default workload is the `cnn` on mnist1d with
batches of 512, chosen so that a step is mostly compute: with the package default `mlp` (17 k parameters, batches of
32) a gloo step is mostly the all-reduce's latency and the scheduler, so a 4x slower compute barely shows (1.16x in
an earlier run) and the comparison says nothing. `--model` and `--batch-size` change it for both systems.

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

from peer.tools.launcher import DemoError
from peer.tools.results import write_results
from peer.tools.revision import git_revision

SLOWDOWN = 4.0
# Steps/s of a peer are counted from a quarter of its run on: start-up jumps (a late peer adopting the state of one
# ahead, step count included) are left out.
SKIP_FRACTION = 0.25


# -------------------------------------------------------------------------------------------------------- peer
def workload(dataset: str, model: str, batch_size: int) -> dict[str, Any]:
    """The config overrides that both systems train with."""
    return {"data": {"dataset": dataset}, "model": {"name": model}, "train": {"batch_size": batch_size}}


def peer_rates(peers: int, epochs: float, slow: bool, extra: dict[str, Any], work: dict[str, Any]) -> list[float]:
    """Steps/s of every peer but the straggler (the last one)."""
    per_peer = []
    for i in range(peers):
        cfg: dict[str, Any] = {
            "data": dict(work["data"]),
            "model": dict(work["model"]),
            "train": {"epochs": epochs, **work["train"], **extra.get("train", {})},
        }
        if slow and i == peers - 1:
            cfg["faults"] = {"slowdown": SLOWDOWN}
        per_peer.append(cfg)
    with tempfile.TemporaryDirectory(prefix="peer-stragglers-") as d:
        records = run_fleet(Path(d), per_peer)
    return [step_rate(r, skip_fraction=SKIP_FRACTION)[0] for r in records[:-1]]


def peer_fleet_rates(peers: int, epochs: float, slow: bool, extra: dict[str, Any], work: dict[str, Any]) -> list[float]:
    """`peer_rates`, tried again once if a daemon is not ready in time (a start-up that outlasts the launcher's
    ready timeout on a heavily loaded machine says nothing about stragglers)."""
    try:
        return peer_rates(peers, epochs, slow, extra, work)
    except DemoError as exc:
        print(f"start-up failed, trying once more: {str(exc).splitlines()[0]}", flush=True)
        return peer_rates(peers, epochs, slow, extra, work)


# -------------------------------------------------------------------------------------------------------- gloo
def gloo_worker(rank: int, world: int, port: int, epochs: float, slowdown: float, work: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist

    from peer import config as config_mod
    from peer.learn.data import load_dataset, local_partition
    from peer.learn.models import build_model

    torch.set_num_threads(1)
    cfg = config_mod.validate({"node_id": "g", **work}, source="bench_stragglers")
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
    compute_s = reduce_s = 0.0  # forward + backward, and the all-reduce call (its waits for the others included)
    for step in range(total):
        i = step % steps_per_epoch
        if i == 0 and step:
            order = torch.randperm(len(x), generator=g)
        idx = order[i * t.batch_size : (i + 1) * t.batch_size]
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
        loss.backward()
        t1 = time.perf_counter()
        compute_s += t1 - t0
        if rank == world - 1 and slowdown > 1:
            time.sleep((slowdown - 1) * (t1 - t0))
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        t2 = time.perf_counter()
        dist.all_reduce(flat)
        reduce_s += time.perf_counter() - t2
        flat /= world
        pos = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[pos : pos + n].view_as(p))
            pos += n
        opt.step()
    wall = time.perf_counter() - started
    dist.destroy_process_group()
    out = {"rank": rank, "steps": total, "steps_per_s": total / wall, "compute_s": compute_s, "allreduce_s": reduce_s}
    print(json.dumps(out), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gloo_rates(peers: int, epochs: float, slow: bool, work: dict[str, Any]) -> list[float]:
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
                "--dataset",
                work["data"]["dataset"],
                "--model",
                work["model"]["name"],
                "--batch-size",
                str(work["train"]["batch_size"]),
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
    reports = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    for r in reports[:-1]:
        # How much of a fast rank's time is its own compute: what a slower compute can stretch.
        GLOO_COMPUTE_SHARE[slow].append(r["compute_s"] * r["steps_per_s"] / r["steps"])
    return [r["steps_per_s"] for r in reports[:-1]]


GLOO_COMPUTE_SHARE: dict[bool, list[float]] = {False: [], True: []}


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
    p.add_argument("--dataset", default="mnist1d", help="built-in dataset for both systems (default mnist1d)")
    p.add_argument("--model", default="cnn", help="model for both systems (default cnn: a step is mostly compute)")
    p.add_argument("--batch-size", type=int, default=512, help="batch size for both systems (default 512)")
    p.add_argument("--json", default=str(ROOT / "bench-results" / "stragglers.json"))
    p.add_argument("--gloo-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--gloo-world", type=int, help=argparse.SUPPRESS)
    p.add_argument("--gloo-port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--gloo-slowdown", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    work = workload(args.dataset, args.model, args.batch_size)
    if args.gloo_rank is not None:
        gloo_worker(args.gloo_rank, args.gloo_world, args.gloo_port, args.epochs, args.gloo_slowdown, work)
        return 0
    runs: dict[str, dict[bool, list[float]]] = {s: {False: [], True: []} for s in SYSTEMS}
    errors: list[str] = []
    for _ in range(args.repeats):
        for name, spec in SYSTEMS.items():
            for slow in (False, True):
                try:
                    if spec.get("gloo"):
                        rates = gloo_rates(args.peers, args.epochs, slow, work)
                    else:
                        rates = peer_fleet_rates(args.peers, args.epochs, slow, spec, work)
                except (RuntimeError, DemoError) as exc:  # e.g. a run too short to measure: reported, not fatal
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
        "dataset": args.dataset,
        "model": args.model,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "straggler_slowdown": SLOWDOWN,
        "goal": "peer slowdown <= 1.1 while gloo slows about 4x",
        "rows": rows,
        # Share of a fast gloo rank's wall time spent in its own forward and backward (the rest: the all-reduce,
        # waits for the others included): fault-free and with the straggler.
        "gloo_compute_share": {
            "fault_free": statistics.median(GLOO_COMPUTE_SHARE[False]) if GLOO_COMPUTE_SHARE[False] else None,
            "straggler": statistics.median(GLOO_COMPUTE_SHARE[True]) if GLOO_COMPUTE_SHARE[True] else None,
        },
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
        f"Model `{result['model']}` on `{result['dataset']}` split {result['peers']} ways, batches of "
        f"{result['batch_size']}, {result['epochs']:g} epochs; the last process is the straggler "
        f"(x{result['straggler_slowdown']:g} per step: after each step it sleeps (x - 1) times that step's compute "
        "time, the same code on both sides). Steps/s: median over the other processes.",
        "",
        "| system | fault-free steps/s | with straggler steps/s | slowdown |",
        "|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['system']} | {r['fault_free_steps_per_s']:.1f} | {r['straggler_steps_per_s']:.1f} | "
            f"**{r['slowdown']:.2f}x** |"
        )
    share = result["gloo_compute_share"]
    if share["fault_free"] is not None and share["straggler"] is not None:
        lines += [
            "",
            f"A fast gloo rank spends {share['fault_free']:.0%} of its time in its own forward and backward "
            f"fault-free, {share['straggler']:.0%} with the straggler (the rest is the all-reduce, waits included).",
        ]
    lines += ["", f"Goal: {result['goal']}.", ""]
    lines += [f"Not measured: {e}" for e in result["errors"]]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
