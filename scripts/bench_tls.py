#!/usr/bin/env python3
"""Benchmark: Push throughput of a realistic state between two daemons on loopback, mutual TLS against plaintext.

Two in-process daemons (library API, `external=True`: no training thread competes) share a model of 4,194,304
float32 parameters (a bias-free 2048×2048 linear layer: a 16 MiB state). The sender pushes pre-encoded states
(1 MiB chunks, the default; a new sequence number each) to the receiver through its real client, one Push at a
time; the receiver runs its real checks (digest, manifest, decoding, finiteness) and hands each state to its
algorithm. Modes alternate (plaintext, mTLS, plaintext, ...) on fresh pairs of daemons, in the same run, and the
median over repeats is reported.

Usage:
    .venv/bin/python scripts/bench_tls.py --json bench-results/tls.json
    .venv/bin/python scripts/bench_tls.py --pushes 4 --repeats 1     # a smoke run

Writes the markdown table next to the JSON (tls.md).
"""

from __future__ import annotations

import argparse
import asyncio
import io
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

from peer import config  # noqa: E402
from peer.algorithms.base import Payload  # noqa: E402
from peer.daemon.node import Node  # noqa: E402
from peer.net.encoder import encode, iter_requests  # noqa: E402
from peer.tools import certs  # noqa: E402
from peer.tools.results import write_results  # noqa: E402
from peer.tools.revision import git_revision  # noqa: E402

WIDTH = 2048  # WIDTH² float32 parameters = 16 MiB


def node_config(work: Path, node_id: str, tls: dict[str, str] | None, static: list[str]) -> config.PeerConfig:
    raw: dict[str, Any] = {
        "node_id": node_id,
        "state_dir": str(work / node_id),
        "listen": "127.0.0.1:0",
        "discovery": {"mdns": False, "static_peers": static},
        "train": {"torch_threads": 1},
        "checkpoint": {"interval_s": 3600},
    }
    if tls is not None:
        raw["security"] = tls
    return config.validate(raw, source="bench_tls")


async def one_mode(work: Path, mtls: bool, pushes: int) -> dict[str, Any]:
    """Start a receiver and a sender, push `pushes` 16 MiB states, return MB/s."""
    tls = certs.make_cluster(work / "pki", ["rx", "tx"]) if mtls else {"rx": None, "tx": None}
    model = torch.nn.Linear(WIDTH, WIDTH, bias=False)
    rx = Node(node_config(work, "rx", tls["rx"], []), model=model, external=True, stdout=io.StringIO())
    rx_task = asyncio.create_task(rx.run())
    await rx.ready.wait()
    tx = Node(node_config(work, "tx", tls["tx"], [rx.address]), model=model, external=True, stdout=io.StringIO())
    tx_task = asyncio.create_task(tx.run())
    await tx.ready.wait()
    try:
        await rx.wait_for(lambda: "tx" in rx.core.peers and "rx" in tx.core.peers, 30, "the two daemons to meet")
        n = rx.built.num_params
        x = torch.randn(n)
        env = tx._envelope()
        chunk = tx.cfg.gossip.chunk_bytes
        base_seq = 10**6  # above whatever the daemons pushed on their own
        encoded = [
            await asyncio.to_thread(encode, env, Payload("state", {"params": x}, seq=base_seq + i), chunk_bytes=chunk)
            for i in range(pushes + 1)
        ]
        total = int(encoded[0][0].total_bytes)
        received_before = rx.counters.messages_received
        # One warm-up push (connection, handshake, first allocation), then the timed ones.
        header, chunks = encoded[0]
        await tx.client.push(rx.address, iter_requests(header, chunks), total, "rx")
        started = time.perf_counter()
        for header, chunks in encoded[1:]:
            await tx.client.push(rx.address, iter_requests(header, chunks), total, "rx")
        wall = time.perf_counter() - started
        delivered = rx.counters.messages_received - received_before
    finally:
        for node in (tx, rx):
            node.request_stop()
        await asyncio.gather(tx_task, rx_task)
    return {
        "mtls": mtls,
        "pushes": pushes,
        "state_bytes": total,
        "wall_s": wall,
        "mb_per_s": pushes * total / wall / 1e6,
        "delivered": delivered,
    }


def markdown(result: dict[str, Any]) -> str:
    p, m = result["plaintext_mb_per_s"], result["mtls_mb_per_s"]
    lines = [
        "# Push throughput: mutual TLS against plaintext (issue 9)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['cpus']} CPUs; both daemons in one process on loopback.  ",
        f"Revision: {result['revision']}",
        "",
        f"State: {result['state_bytes'] / 2**20:.0f} MiB (float32), 1 MiB chunks, {result['pushes']} timed pushes per "
        f"run, {result['repeats']} runs per mode (alternating), median.",
        "",
        "| mode | MB/s (median) | runs |",
        "|---|---|---|",
        f"| plaintext | {p:.0f} | {', '.join(f'{r:.0f}' for r in result['plaintext_runs'])} |",
        f"| mutual TLS | {m:.0f} | {', '.join(f'{r:.0f}' for r in result['mtls_runs'])} |",
        "",
        f"mTLS / plaintext: **{result['ratio']:.2f}**",
        "",
    ]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for _ in range(args.repeats):
        for mtls in (False, True):
            with tempfile.TemporaryDirectory() as d:
                r = await one_mode(Path(d), mtls, args.pushes)
            assert r["delivered"] == args.pushes + 1, r  # every push reached the receiver's algorithm
            runs[mtls].append(r)
            print(f"{'mtls' if mtls else 'plaintext'}: {r['mb_per_s']:.0f} MB/s", flush=True)
    plain = statistics.median(r["mb_per_s"] for r in runs[False])
    mtls_ = statistics.median(r["mb_per_s"] for r in runs[True])
    return {
        "command": "python scripts/bench_tls.py " + shlex.join(sys.argv[1:]),
        "cpus": os.cpu_count(),
        "revision": git_revision(ROOT),
        "pushes": args.pushes,
        "repeats": args.repeats,
        "state_bytes": runs[False][0]["state_bytes"],
        "plaintext_runs": [r["mb_per_s"] for r in runs[False]],
        "mtls_runs": [r["mb_per_s"] for r in runs[True]],
        "plaintext_mb_per_s": plain,
        "mtls_mb_per_s": mtls_,
        "ratio": mtls_ / plain,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pushes", type=int, default=10, help="timed pushes per run (default 10)")
    p.add_argument("--repeats", type=int, default=3, help="runs per mode (default 3)")
    p.add_argument("--json", default=str(ROOT / "bench-results" / "tls.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("GRPC_VERBOSITY", "error")
    logging.basicConfig(level=logging.ERROR)
    result = asyncio.run(main_async(args))
    write_results(args.json, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
