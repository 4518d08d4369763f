#!/usr/bin/env python3
"""Ideal lockstep decentralized SGD, in one process: the yardstick for `scripts/bench_fleet.py`.

Every peer takes one minibatch step (SGD with heavy ball, cosine schedule, as the daemon's defaults) on its own
partition, then all peers average with their neighbours at once (uniform weights over self and neighbours;
ring or full graph). No network, no asynchrony, no stragglers: what decentralized training of this model on this
split can reach at the daemon's settings. A daemon run that matches it has lost nothing to its pacing.

Usage:
    .venv/bin/python scripts/lockstep_dpsgd.py [--seed 1] [--lr 0.1] [--momentum 0.9] [--topology ring]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peer.learn.data import load_dataset, local_partition
from peer.learn.models import build_model, flatten_params, load_flat_params


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="data split seed (as data.seed)")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--partition", default="shards:2")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--topology", choices=["ring", "full"], default="ring")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = args.peers
    ds = load_dataset(args.dataset, seed=args.seed)
    parts = [local_partition(ds, args.partition, n, i, args.seed) for i in range(n)]
    models = [build_model(args.model, ds.input_shape, ds.num_classes, seed=0) for _ in range(n)]
    opts = [torch.optim.SGD(m.parameters(), lr=args.lr, momentum=args.momentum) for m in models]
    steps_per_epoch = max(math.ceil(len(y) / args.batch_size) for _, y in parts)
    total = steps_per_epoch * args.epochs
    ring = {i: [(i - 1) % n, (i + 1) % n] if n > 2 else [j for j in range(n) if j != i] for i in range(n)}
    graph = ring if args.topology == "ring" else {i: [j for j in range(n) if j != i] for i in range(n)}
    rng = np.random.default_rng(0)
    orders: list[np.ndarray] = [rng.permutation(len(y)) for _, y in parts]
    for t in range(total):
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * t / total))
        for i, ((x, y), model, opt) in enumerate(zip(parts, models, opts, strict=True)):
            k = t % math.ceil(len(y) / args.batch_size)
            if k == 0:
                orders[i] = rng.permutation(len(y))
            idx = orders[i][k * args.batch_size : (k + 1) * args.batch_size]
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
            loss.backward()
            opt.step()
        flats = [flatten_params(m) for m in models]
        for i, model in enumerate(models):
            load_flat_params(model, (flats[i] + sum(flats[j] for j in graph[i])) / (len(graph[i]) + 1))
    load_flat_params(models[0], sum(flatten_params(m) for m in models) / n)
    with torch.no_grad():
        pred = models[0](torch.from_numpy(ds.x_test)).argmax(1).numpy()
    acc = float((pred == ds.y_test).mean())
    print(
        f"lockstep D-PSGD, {n} peers ({args.topology}), {args.dataset} {args.partition} seed {args.seed}, "
        f"{args.model}, lr {args.lr:g}, momentum {args.momentum:g}, {total} steps: {acc:.2%}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
