#!/usr/bin/env python3
"""Benchmark: push time and peak memory as the model and the neighbourhood grow (issue 11, part 6).

Real daemon processes on loopback (the children of scripts/bench_transport.py): one sender pushes a float32 state
of each size to one receiver, then a 16 MiB state to 1, 2 and 4 receivers at once (one push task per neighbour,
the same encoded frames for all, as the daemon's pusher does). Each run: a fresh set of processes, one untimed
warm-up push, then `--pushes` timed pushes, median. Peak RSS is each process's `ru_maxrss`: at ready (the daemon
with its model, before any push) and at the end; the difference, in units of the state size, is how many extra
copies of the model the push path held at its peak.

Usage:
    .venv/bin/python scripts/bench_scaling.py --json bench-results/scaling.json
    .venv/bin/python scripts/bench_scaling.py --sizes-mib 1 16 --neighbours 1 2 --json /tmp/s.json   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_transport import ROOT, spawn

from peer.tools.results import write_results
from peer.tools.revision import git_revision


def one_run(mib: float, neighbours: int, pushes: int) -> dict[str, Any]:
    ids = ["rx"] if neighbours == 1 else [f"rx{i}" for i in range(neighbours)]
    rxs = [spawn("--child", "serve-peer", "--mib", str(mib), "--node-id", i) for i in ids]
    try:
        ready = []
        for rx in rxs:
            assert rx.stdout is not None
            ready.append(json.loads(rx.stdout.readline()))
        addresses = ",".join(r["address"] for r in ready)
        tx = spawn("--child", "send-peer", "--mib", str(mib), "--address", addresses, "--pushes", str(pushes))
        out, _ = tx.communicate(timeout=900)
        if tx.returncode != 0:
            raise RuntimeError(f"sender failed with exit code {tx.returncode}")
        sent = json.loads(out.strip().splitlines()[-1])
    finally:
        for rx in rxs:
            if rx.stdin is not None:
                rx.stdin.close()
    peaks = []
    for rx, r in zip(rxs, ready, strict=True):
        assert rx.stdout is not None
        last = json.loads(rx.stdout.readline())
        rx.wait(timeout=60)
        peaks.append((r["peak_rss_mib_ready"], last["peak_rss_mib"]))
    state_mib = sent["bytes"] / 2**20
    rx_extra = max(end - start for start, end in peaks)
    tx_extra = sent["peak_rss_mib"] - sent["peak_rss_mib_ready"]
    wall = statistics.median(sent["walls"])
    return {
        "state_mib": state_mib,
        "neighbours": neighbours,
        "push_s": wall,
        "gb_per_s_total": neighbours * sent["bytes"] / wall / 1e9,
        "encode_s": sent["encode_s"],
        "sender_rss_ready_mib": sent["peak_rss_mib_ready"],
        "sender_rss_peak_mib": sent["peak_rss_mib"],
        "sender_extra_copies": tx_extra / state_mib,
        "receiver_rss_ready_mib": max(p[0] for p in peaks),
        "receiver_rss_peak_mib": max(p[1] for p in peaks),
        "receiver_extra_copies": rx_extra / state_mib,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mib", type=float, nargs="+", default=[1, 4, 16, 64, 128, 256])
    p.add_argument("--neighbours", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--neighbours-mib", type=float, default=16)
    p.add_argument("--pushes", type=int, default=3)
    p.add_argument("--json", default=str(ROOT / "bench-results" / "scaling.json"))
    args = p.parse_args()
    by_size = []
    for mib in args.sizes_mib:
        by_size.append(one_run(mib, 1, args.pushes))
        print(f"{mib:g} MiB, 1 neighbour: {by_size[-1]['push_s']:.3f} s", flush=True)
    by_degree = []
    for k in args.neighbours:
        by_degree.append(one_run(args.neighbours_mib, k, args.pushes))
        print(f"{args.neighbours_mib:g} MiB, {k} neighbours: {by_degree[-1]['push_s']:.3f} s", flush=True)
    result = {
        "command": "python scripts/bench_scaling.py " + shlex.join(sys.argv[1:]),
        "cpus": os.cpu_count(),
        "revision": git_revision(ROOT),
        "pushes": args.pushes,
        "by_size": by_size,
        "by_neighbours": by_degree,
    }
    write_results(args.json, result, markdown(result))
    return 0


def _table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| state | neighbours | push s | GB/s (all links) | encode s | sender RSS ready / peak MiB | extra copies | "
        "receiver RSS ready / peak MiB | extra copies |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['state_mib']:g} MiB | {r['neighbours']} | {r['push_s']:.3f} | {r['gb_per_s_total']:.2f} | "
            f"{r['encode_s']:.3f} | {r['sender_rss_ready_mib']:.0f} / {r['sender_rss_peak_mib']:.0f} | "
            f"{r['sender_extra_copies']:.1f} | {r['receiver_rss_ready_mib']:.0f} / {r['receiver_rss_peak_mib']:.0f} | "
            f"{r['receiver_extra_copies']:.1f} |"
        )
    return lines


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Push time and memory against model size and neighbour count (issue 11, part 6)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['cpus']} CPUs; one process per daemon on loopback, plaintext.  ",
        f"Revision: {result['revision']}",
        "",
        f"Median of {result['pushes']} timed pushes after a warm-up; a push ends when every receiver answered (after "
        "its checks and decoding). Extra copies = (peak RSS - RSS at ready) / state size: the memory the push path "
        "added at its peak, in model copies (the sender's includes the encoded snapshot it pushes).",
        "",
        "## Model size (one neighbour)",
        "",
        *_table(result["by_size"]),
        "",
        "## Neighbour count",
        "",
        *_table(result["by_neighbours"]),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
