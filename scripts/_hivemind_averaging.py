"""hivemind's side of scripts/bench_averaging.py, run with the python of the virtualenv that script made.

N processes, each a hivemind DHT (the first is the others' initial peer) and a DecentralizedAverager over one
float32 tensor of NUMEL elements, target and minimum group size N. Per step, the parent releases all processes
at once (their fresh states already written); each calls `averager.step()`; the step's time runs from the release
to the last return. Prints per-step lines on stderr and one JSON line on stdout. Imports nothing from peer.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
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
        with averager.get_tensors() as tensors:
            result = tensors[0].clone()
        conn.send((started, finished, group is not None and len(group) == n, result))
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
    times, errors, full = [], [], True
    for step in range(args.steps):
        import torch

        expected = torch.stack([make_state(i, step, numel) for i in range(n)]).double().mean(0)
        for i in range(n):
            pipes[i][0].send("go")
        reports = [pipes[i][0].recv() for i in range(n)]
        times.append(max(r[1] for r in reports) - min(r[0] for r in reports))
        full &= all(r[2] for r in reports)
        err = max(float((r[3].double() - expected).abs().max()) for r in reports)
        errors.append(err)
        print(f"hivemind  step {step}: {times[-1]:.3f} s, full group: {full}, max error {err:.1e}", file=sys.stderr)
    for p in procs:
        p.join(timeout=30)
    out = {
        "step_s": times,
        "median_s": statistics.median(times[1:] or times),
        "full_groups": full,
        "max_abs_error": max(errors),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
