#!/usr/bin/env python3
"""Benchmark: Push throughput between two daemon processes on loopback, against raw asyncio TCP (issue 11, part 1).

For each state size (16 and 64 MiB of float32 by default) and each repeat, four fresh processes run at once:

- **peer**: a receiving daemon process (`peer.daemon.node.Node`, `external=True`: no training thread competes)
  and a sending daemon process. The sender encodes each state with the real encoder (`encode_frames`, untimed:
  the daemon encodes once for all neighbours; its time is reported by bench_scaling) and pushes it through its
  real client; the receiver runs every check (manifest, digest, decoding, finiteness) and hands the state to its
  algorithm before it answers, so each timed Push covers the whole path.
- **tcp**: the same two kinds of Python processes (torch imported, one torch thread), an asyncio TCP server and
  client moving the same number of bytes per message (written chunk by chunk, read with `readexactly`), one
  1-byte acknowledgement per message.

The parent lets the two senders push in turn (one push each per turn, order alternating) so that both see the
same background load. ratio_vs_tcp = median over turns of (tcp push time / peer push time).

Usage:
    .venv/bin/python scripts/bench_transport.py --json bench-results/transport.json
    .venv/bin/python scripts/bench_transport.py --sizes-mib 16 --pushes 3 --repeats 1 --json /tmp/t.json  # a smoke run

Writes the markdown table next to the JSON (transport.md). `--profile DIR` writes a cProfile of the receiving
daemon per size (peer mode, first repeat) under DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import logging
import os
import resource
import shlex
import statistics
import subprocess
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

try:
    from peer.net.encoder import encode_frames
except ImportError:  # a revision before issue 11 (to measure it with this same script): PushRequests, not bytes
    from peer.net.encoder import encode, iter_requests

    def encode_frames(*args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
        header, chunks = encode(*args, **kwargs)
        return header, list(iter_requests(header, chunks))


from peer.tools.results import write_results  # noqa: E402
from peer.tools.revision import git_revision  # noqa: E402

MIB = 1 << 20


def node_config(work: Path, node_id: str, static: list[str], max_mib: int) -> config.PeerConfig:
    raw: dict[str, Any] = {
        "node_id": node_id,
        "state_dir": str(work / node_id),
        "listen": "127.0.0.1:0",
        "discovery": {"mdns": False, "static_peers": static},
        "train": {"torch_threads": 1},
        "checkpoint": {"interval_s": 3600},
        "gossip": {"max_message_bytes": max(2 * max_mib * MIB, 64 * MIB)},
    }
    return config.validate(raw, source="bench_transport")


def bench_model(mib: float) -> torch.nn.Module:
    """A bias-free linear layer holding `mib` MiB of float32 (rounded to whole rows of 1024)."""
    rows = max(1, round(mib * MIB / 4 / 1024))
    return torch.nn.Linear(1024, rows, bias=False)


# ----------------------------------------------------------------------------------------------- child processes
def peak_rss_mib() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def serve_peer(mib: float, profile: str | None, node_id: str = "rx") -> None:
    """The receiving daemon: prints its address, then serves until stdin closes, then prints its peak RSS."""
    with tempfile.TemporaryDirectory() as d:
        node = Node(
            node_config(Path(d), node_id, [], int(mib) + 1), model=bench_model(mib), external=True, stdout=io.StringIO()
        )
        task = asyncio.create_task(node.run())
        await node.ready.wait()
        prof = None
        if profile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        say({"address": node.address, "peak_rss_mib_ready": peak_rss_mib()})
        drain = asyncio.create_task(_drain_inbox(node))
        await asyncio.to_thread(sys.stdin.read)  # the parent closes stdin when done
        say({"peak_rss_mib": peak_rss_mib()})
        if prof is not None:
            prof.disable()
            prof.dump_stats(profile)
        drain.cancel()
        node.request_stop()
        await task


async def _drain_inbox(node: Node) -> None:
    """Nobody merges in this benchmark: drop delivered states so memory stays flat (the algorithm's inbox)."""
    while True:
        node.worker.inbox.clear()
        await asyncio.sleep(0.02)


async def send_peer(mib: float, address: str, pushes: int) -> None:
    """Push to one receiver, or to every address of a comma-separated list at once (one task per neighbour, the
    same encoded frames for all, as the daemon's pusher does); each timed wall is until every push was answered."""
    addresses = address.split(",")
    with tempfile.TemporaryDirectory() as d:
        node = Node(
            node_config(Path(d), "tx", addresses, int(mib) + 1),
            model=bench_model(mib),
            external=True,
            stdout=io.StringIO(),
        )
        task = asyncio.create_task(node.run())
        await node.ready.wait()
        try:
            ids = ["rx"] if len(addresses) == 1 else [f"rx{i}" for i in range(len(addresses))]
            await node.wait_for(lambda: all(i in node.core.peers for i in ids), 60, "the receivers to answer Hello")
            n = node.built.num_params
            x = torch.randn(n)  # the state to send: the model's flat parameters in a daemon
            ready_rss = peak_rss_mib()
            env = node._envelope()
            chunk = node.cfg.gossip.chunk_bytes
            base_seq = 10**6
            walls, encodes = [], []
            total = 0
            say({"ready": True})
            for i in range(pushes + 1) if pushes >= 0 else itertools.count():
                if pushes < 0 and not await asyncio.to_thread(sys.stdin.readline):
                    break  # interactive: one push per line from the parent, until it closes stdin
                # Encoded once per state, untimed (the daemon encodes once for all neighbours, off the loop);
                # the time it takes is reported apart.
                payload = Payload("state", {"params": x}, seq=base_seq + i)
                started = time.perf_counter()
                header, frames = await asyncio.to_thread(encode_frames, env, payload, chunk_bytes=chunk)
                encodes.append(time.perf_counter() - started)
                total = int(header.total_bytes)
                started = time.perf_counter()
                resps = await asyncio.gather(
                    *(node.client.push(a, frames, total, j) for a, j in zip(addresses, ids, strict=True))
                )
                wall = time.perf_counter() - started
                assert all(r.accepted and r.bytes_received == total for r in resps), resps
                del frames
                if pushes < 0:
                    say({"wall": wall})
                elif i:
                    walls.append(wall)
            say(
                {
                    "bytes": total,
                    "walls": walls,
                    "encode_s": statistics.median(encodes),
                    "peak_rss_mib_ready": ready_rss,
                    "peak_rss_mib": peak_rss_mib(),
                }
            )
        finally:
            node.request_stop()
            await task


async def serve_tcp(mib: float) -> None:
    total = bench_model(mib).weight.numel() * 4

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readexactly(total)
                writer.write(b"k")
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.CancelledError):  # the sender left, or we are shutting down
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    say({"address": f"127.0.0.1:{port}"})
    await asyncio.to_thread(sys.stdin.read)
    server.close()


async def send_tcp(mib: float, address: str, pushes: int) -> None:
    host, port = address.rsplit(":", 1)
    x = bench_model(mib).weight.detach().reshape(-1)
    data = memoryview(x.numpy()).cast("B")
    total = data.nbytes
    reader, writer = await asyncio.open_connection(host, int(port))
    walls = []
    say({"ready": True})
    for i in range(pushes + 1) if pushes >= 0 else itertools.count():
        if pushes < 0 and not await asyncio.to_thread(sys.stdin.readline):
            break
        started = time.perf_counter()
        for pos in range(0, total, MIB):
            writer.write(data[pos : pos + MIB])
            await writer.drain()
        assert await reader.readexactly(1) == b"k"
        wall = time.perf_counter() - started
        if pushes < 0:
            say({"wall": wall})
        elif i:
            walls.append(wall)
    writer.close()
    await writer.wait_closed()
    say({"bytes": total, "walls": walls})


def child(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    os.environ.setdefault("GRPC_VERBOSITY", "error")
    logging.basicConfig(level=logging.ERROR)
    role = args.child
    if role == "serve-peer":
        asyncio.run(serve_peer(args.mib, args.profile_out, args.node_id))
    elif role == "serve-tcp":
        asyncio.run(serve_tcp(args.mib))
    elif role == "send-peer":
        asyncio.run(send_peer(args.mib, args.address, args.pushes))
    else:
        asyncio.run(send_tcp(args.mib, args.address, args.pushes))
    return 0


# ----------------------------------------------------------------------------------------------------- parent
def spawn(*argv: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def interleaved(mib: float, pushes: int, profile: str | None) -> dict[str, list[float]]:
    """Both modes' processes at once; the parent lets the two senders push in turn (tcp, peer, peer, tcp, ...),
    one push each per turn, so that both see the same background load. Returns the timed walls per mode."""
    procs = []
    senders: dict[str, subprocess.Popen[str]] = {}
    try:
        for mode in ("tcp", "peer"):
            extra = ["--profile-out", profile] if profile and mode == "peer" else []
            rx = spawn("--child", f"serve-{mode}", "--mib", str(mib), *extra)
            procs.append(rx)
            assert rx.stdout is not None
            address = json.loads(rx.stdout.readline())["address"]
            tx = spawn("--child", f"send-{mode}", "--mib", str(mib), "--address", address, "--pushes", "-1")
            procs.append(tx)
            senders[mode] = tx
        for tx in senders.values():
            assert tx.stdout is not None
            assert json.loads(tx.stdout.readline()).get("ready"), "sender did not start"
        walls: dict[str, list[float]] = {"tcp": [], "peer": []}
        for turn in range(pushes + 1):  # turn 0 warms both up
            order = ("tcp", "peer") if turn % 2 else ("peer", "tcp")
            for mode in order:
                tx = senders[mode]
                assert tx.stdin is not None and tx.stdout is not None
                tx.stdin.write("go\n")
                tx.stdin.flush()
                line = tx.stdout.readline()
                if not line:
                    raise RuntimeError(f"{mode} sender exited early (code {tx.wait()})")
                if turn:
                    walls[mode].append(float(json.loads(line)["wall"]))
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
        for p in procs:
            p.wait(timeout=60)
    return walls


def gbps(nbytes: int, walls: list[float]) -> float:
    return nbytes / statistics.median(walls) / 1e9


def main_parent(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    load_before = os.getloadavg()[0]
    for mib in args.sizes_mib:
        runs: dict[str, list[float]] = {"peer": [], "tcp": []}
        pair_ratios: list[float] = []
        nbytes = bench_model(mib).weight.numel() * 4
        for rep in range(args.repeats):
            prof = None
            if args.profile and rep == 0:
                Path(args.profile).mkdir(parents=True, exist_ok=True)
                prof = str(Path(args.profile) / f"rx-{mib:g}mib.prof")
            walls = interleaved(mib, args.pushes, prof)
            for mode in ("tcp", "peer"):
                runs[mode].extend(nbytes / w / 1e9 for w in walls[mode])
            pair_ratios.extend(t / p for p, t in zip(walls["peer"], walls["tcp"], strict=True))
            print(
                f"{mib:g} MiB run {rep + 1}: tcp {gbps(nbytes, walls['tcp']):.3f} GB/s, "
                f"peer {gbps(nbytes, walls['peer']):.3f} GB/s",
                flush=True,
            )
        peer, tcp = statistics.median(runs["peer"]), statistics.median(runs["tcp"])
        rows.append(
            {
                "mib": mib,
                "state_bytes": nbytes,
                "peer_gb_per_s": peer,
                "tcp_gb_per_s": tcp,
                # Headline: the median over turns of (tcp time / peer time), each turn's two pushes side by side.
                "ratio_vs_tcp": statistics.median(pair_ratios),
                "ratio_of_medians": peer / tcp,
                "peer_pushes_gb_per_s": runs["peer"],
                "tcp_pushes_gb_per_s": runs["tcp"],
            }
        )
    return {
        "command": "python scripts/bench_transport.py " + shlex.join(sys.argv[1:]),
        "cpus": os.cpu_count(),
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "revision": git_revision(ROOT),
        "pushes": args.pushes,
        "repeats": args.repeats,
        "goal_ratio_vs_tcp": 0.8,
        "rows": rows,
        "ratio_vs_tcp": min(r["ratio_vs_tcp"] for r in rows),
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Push throughput against raw asyncio TCP (issue 11, part 1)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['cpus']} CPUs, shared (1-minute load average {result['load_average_1min'][0]:.1f} at the "
        f"start, {result['load_average_1min'][1]:.1f} at the end); two processes per mode on loopback, plaintext.  ",
        f"Revision: {result['revision']}",
        "",
        f"{result['repeats']} runs, each with fresh processes for both modes, alive together; the two senders push "
        f"in turn (one push each per turn, order alternating), {result['pushes']} timed turns after a warm-up. "
        "GB/s = 10^9 bytes / median push time over all runs. ratio_vs_tcp = median over turns of (tcp push time / "
        "peer push time), the two pushes of a turn back to back; the ratio of the two medians is shown beside it.",
        "",
        "| state | peer GB/s | raw TCP GB/s | ratio_vs_tcp (median pair ratio) | ratio of the medians |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['mib']:g} MiB | {r['peer_gb_per_s']:.3f} | {r['tcp_gb_per_s']:.3f} | **{r['ratio_vs_tcp']:.2f}** | "
            f"{r['ratio_of_medians']:.2f} |"
        )
    lines += ["", f"Worst ratio: **{result['ratio_vs_tcp']:.2f}** (goal >= {result['goal_ratio_vs_tcp']})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mib", type=float, nargs="+", default=[16, 64])
    p.add_argument("--pushes", type=int, default=8, help="timed turns per run (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="runs per mode and size (default 3)")
    p.add_argument("--json", default=str(ROOT / "bench-results" / "transport.json"))
    p.add_argument("--profile", default=None, help="write a cProfile of the receiving daemon per size here")
    p.add_argument("--child", choices=["serve-peer", "serve-tcp", "send-peer", "send-tcp"], help=argparse.SUPPRESS)
    p.add_argument("--mib", type=float, default=16, help=argparse.SUPPRESS)
    p.add_argument("--address", default="", help=argparse.SUPPRESS)
    p.add_argument("--node-id", default="rx", help=argparse.SUPPRESS)
    p.add_argument("--profile-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    result = main_parent(args)
    write_results(args.json, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
