"""hivemind's side of scripts/bench_averaging.py, run with the python of the virtualenv that script made.

N processes, each a hivemind DHT (the first is the others' initial peer) and a DecentralizedAverager over one
float32 tensor of NUMEL elements, target and minimum group size N. Driven step by step, so that the parent can
interleave hivemind's steps with peer's (both see the same background load): after the setup it prints `ready`,
then for each line `step` on stdin the parent here releases all processes at once (their fresh states already
written); each calls `averager.step()`; the step's time runs from the release to the last return, and one JSON
line goes to stdout. End of stdin ends the run. Imports nothing from peer.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from typing import Any


def make_state(peer: int, step: int, numel: int) -> Any:
    import torch

    return torch.randn(numel, generator=torch.Generator().manual_seed(1000 * step + peer))


def worker(index: int, n: int, numel: int, steps: int, conn: Any) -> None:
    import hivemind
    import torch

    torch.set_num_threads(1)
    initial = conn.recv()
    dht = hivemind.DHT(start=True, initial_peers=initial, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    if index == 0:
        conn.send([str(a) for a in dht.get_visible_maddrs()])
    tensor = torch.zeros(numel)
    averager = hivemind.averaging.DecentralizedAverager(
        averaged_tensors=[tensor],
        dht=dht,
        prefix="bench_averaging",
        target_group_size=n,
        min_group_size=n,
        min_matchmaking_time=1.0,
        request_timeout=0.5,
        start=True,
    )
    conn.send("ready")
    for step in range(steps):
        with averager.get_tensors() as tensors:
            tensors[0].copy_(make_state(index, step, numel))
        conn.recv()  # released
        started = time.monotonic()
        group = averager.step(timeout=120)
        finished = time.monotonic()
        conn.send((started, finished, group is not None and len(group) == n))
        conn.recv()  # the check runs once every process has finished (no CPU taken from a step being timed)
        with averager.get_tensors() as tensors:
            conn.send(tensors[0].clone())
    averager.shutdown()
    dht.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--numel", type=int, required=True)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    n, numel = args.peers, args.numel
    ctx = mp.get_context("fork")  # hivemind starts its own processes by fork
    pipes = [ctx.Pipe() for _ in range(n)]
    procs = [ctx.Process(target=worker, args=(i, n, numel, args.steps, pipes[i][1])) for i in range(n)]
    for p in procs:
        p.start()
    pipes[0][0].send([])
    maddrs = pipes[0][0].recv()
    for i in range(1, n):
        pipes[i][0].send(maddrs)
    for i in range(n):
        assert pipes[i][0].recv() == "ready"
    print("ready", flush=True)
    import torch

    for step in range(args.steps):
        if sys.stdin.readline().strip() != "step":
            break
        expected = torch.stack([make_state(i, step, numel) for i in range(n)]).double().mean(0)
        for i in range(n):
            pipes[i][0].send("go")
        reports = [pipes[i][0].recv() for i in range(n)]
        took = max(r[1] for r in reports) - min(r[0] for r in reports)
        full = all(r[2] for r in reports)
        for i in range(n):
            pipes[i][0].send("check")
        err = max(float((pipes[i][0].recv().double() - expected).abs().max()) for i in range(n))
        print(json.dumps({"step_s": took, "full_group": full, "max_abs_error": err}), flush=True)
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()


if __name__ == "__main__":
    main()
