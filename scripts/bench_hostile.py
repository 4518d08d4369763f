#!/usr/bin/env python3
"""Benchmark: one `peer run` daemon with N hostile clients against the same daemon with none, side by side.

Each mode starts a fresh daemon (default config, logreg on digits, mDNS off, one torch thread) as a child process
and measures its training steps/s from its own metrics.jsonl (no RPC to it, so the measurement adds no load) and
its peak RSS (VmHWM). In the hostile mode, N clients (each with its own channel and its own TCP connection, as N
attackers on N machines would have; `--shared-connection`: one TCP connection for all, which is what gRPC does by
default for channels of one process with the same options, and what this benchmark measured before) loop over:
Hellos with made-up ids and unreachable addresses, Hellos claiming the victim's own node id (the one-message kill
switch of issue 16), undecodable bytes on every RPC, GetStatus, FetchState with a 100 KB node id, and Push
streams that send a valid header and then stall.

It also measures, each on a fresh daemon with the default config:
    table_after_1000_hellos     peer-table size after 1,000 hostile Hellos (made-up ids, unreachable addresses)
    log_bytes_1000_undecodable  bytes the daemon wrote to stderr for 1,000 undecodable requests
    stalled_open_after_30s      of 100 Push streams that stalled after their header, how many are open 30 s later

Usage:
    .venv/bin/python scripts/bench_hostile.py --clients 200 --json bench-results/hostile.json
    .venv/bin/python scripts/bench_hostile.py --quick          # shorter phases, for a smoke run

Writes the markdown table next to the JSON (hostile.md). The attackers run in this process, on the same machine
as the daemon. On a machine with 2 or more CPUs the daemon is pinned to CPU 0 and this process (the attackers) to
the others, in both modes: in a real attack the clients run elsewhere, so what the ratio should measure is what
serving them costs the daemon itself, not what the attackers' own Python costs a shared core (unpinned, with the
attackers taking about a core of a 2-core machine, the ratio was 0.47). `--no-pin` measures the shared case.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peer import PROTOCOL_VERSION  # noqa: E402
from peer.errors import SendError  # noqa: E402
from peer.net.encoder import encode  # noqa: E402
from peer.net.rpc_errors import guarded  # noqa: E402
from peer.net.wire import Envelope, Payload  # noqa: E402
from peer.tools.results import write_results  # noqa: E402
from peer.tools.revision import git_revision  # noqa: E402
from peer.v1 import gossip_pb2, gossip_pb2_grpc  # noqa: E402

SERVICE = "/peer.v1.GossipService/"
GARBAGE = b"\xff\xff\xff\xff\x0f"
# gRPC shares one connection between the channels of a process that have the same target and options; a local
# subchannel pool gives a channel its own.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


class Daemon:
    """A `peer run` child process with its stderr in a file."""

    def __init__(self, work: Path, name: str, cpus: set[int] | None = None) -> None:
        self.dir = work / name
        self.dir.mkdir(parents=True, exist_ok=True)
        tree = {
            "node_id": "victim",
            "state_dir": str(self.dir / "state"),
            "listen": "127.0.0.1:0",
            "discovery": {"mdns": False},
            "model": {"name": "logreg"},
            "train": {"epochs": 100000, "torch_threads": 1, "device": "cpu"},
            "metrics": {"interval_s": 0.5},
        }
        cfg = self.dir / "peer.yaml"
        cfg.write_text(yaml.safe_dump(tree), encoding="utf-8")
        self.stderr_path = self.dir / "stderr.log"
        self._err = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "peer", "run", "--config", str(cfg)],
            stdout=subprocess.PIPE,
            stderr=self._err,
            env=env,
            cwd=ROOT,
            text=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"daemon did not start; see {self.stderr_path}")
        ready = json.loads(line)
        self.address: str = ready["address"]
        self.metrics = self.dir / "state" / "metrics.jsonl"

    def step(self) -> tuple[float, int]:
        """(time, step) of the newest metrics record."""
        lines = self.metrics.read_text(encoding="utf-8").splitlines()
        for line in reversed(lines):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            return float(rec["time"]), int(rec["step"])
        return time.time(), 0

    def cpu_s(self) -> tuple[float, float]:
        """CPU seconds used so far by the daemon's main thread (its event loop: gRPC handlers) and by the whole
        process. Unlike steps/s, the loop's CPU per wall second barely moves when other work shares the machine."""
        tick = os.sysconf("SC_CLK_TCK")

        def used(stat: Path) -> float:
            fields = stat.read_text().rpartition(")")[2].split()
            return (int(fields[11]) + int(fields[12])) / tick  # utime, stime

        pid = self.proc.pid
        return used(Path(f"/proc/{pid}/task/{pid}/stat")), used(Path(f"/proc/{pid}/stat"))

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stderr_bytes(self) -> int:
        return self.stderr_path.stat().st_size

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._err.close()


async def attempt(what: str, call: Any) -> str:
    """Run one call; its status code name ("OK" when it succeeded)."""
    try:
        await guarded(what, call)
    except SendError as exc:
        return exc.code
    return "OK"


def hostile_hello(i: int, victim_fp: str, claim: bool) -> gossip_pb2.HelloRequest:
    return gossip_pb2.HelloRequest(
        node_id="victim" if claim else f"fake-{i}",
        protocol_version=PROTOCOL_VERSION,
        schema_fingerprint=victim_fp,
        algorithm="cdl",
        degree=1,
        address=f"127.0.0.1:{1 + i % 1000}",
        incarnation=1,
    )


def stalled_push(header: gossip_pb2.PushHeader) -> AsyncIterator[gossip_pb2.PushRequest]:
    async def gen() -> AsyncIterator[gossip_pb2.PushRequest]:
        yield gossip_pb2.PushRequest(header=header)
        await asyncio.Event().wait()

    return gen()


async def victim_facts(address: str) -> tuple[str, gossip_pb2.PushHeader]:
    async with grpc.aio.insecure_channel(address) as ch:
        status = await guarded(
            "status", lambda: gossip_pb2_grpc.GossipServiceStub(ch).GetStatus(gossip_pb2.GetStatusRequest(), timeout=5)
        )
    fp = status.schema_fingerprint
    # A valid header for the default model (logreg on digits: 650 parameters); its chunks never follow.
    env = Envelope("staller", fp, status.algorithm, 1, 1, "127.0.0.1:1", 1)
    header, _ = encode(env, Payload("state", {"params": torch.zeros(650)}, seq=1, step=1), chunk_bytes=1 << 16)
    return fp, header


async def hostile_client(
    k: int,
    address: str,
    fp: str,
    header: gossip_pb2.PushHeader,
    rate: float,
    stop: asyncio.Event,
    codes: dict[str, int],
    shared: bool,
) -> None:
    rng = random.Random(k)
    async with grpc.aio.insecure_channel(address, options=None if shared else OWN_CONNECTION) as ch:
        stub = gossip_pb2_grpc.GossipServiceStub(ch)
        i = k * 100000
        while not stop.is_set():
            i += 1
            kind = rng.randrange(7)
            if kind in (0, 1):
                request = hostile_hello(i, fp, claim=kind == 1)
                call: Any = lambda r=request: stub.Hello(r, timeout=5)  # noqa: E731
            elif kind == 2:
                method = rng.choice(["Hello", "GetStatus"])
                call = lambda m=method: ch.unary_unary(SERVICE + m)(GARBAGE, timeout=5)  # noqa: E731
            elif kind == 3:
                call = lambda: stub.GetStatus(gossip_pb2.GetStatusRequest(), timeout=5)  # noqa: E731
            elif kind == 4:

                async def fetch() -> None:
                    async for _ in stub.FetchState(gossip_pb2.FetchStateRequest(node_id="x" * 100_000), timeout=5):
                        pass

                call = fetch
            elif kind == 5:
                call = lambda: ch.stream_unary(SERVICE + "Push")(iter([GARBAGE]), timeout=5)  # noqa: E731
            else:
                # A stalled stream: the server closes it at its idle limit; the attacker then starts another.
                call = lambda: stub.Push(stalled_push(header), timeout=60)  # type: ignore[arg-type]  # noqa: E731
            code = await attempt("hostile", call)
            codes[code] = codes.get(code, 0) + 1
            if rate > 0:
                await asyncio.sleep(rng.expovariate(rate))


async def measure_phase(d: Daemon, seconds: float) -> dict[str, float]:
    t0, s0 = d.step()
    (loop0, all0), w0 = d.cpu_s(), time.monotonic()
    await asyncio.sleep(seconds)
    t1, s1 = d.step()
    (loop1, all1), w1 = d.cpu_s(), time.monotonic()
    return {
        "steps_per_s": (s1 - s0) / max(t1 - t0, 1e-9),
        "seconds": t1 - t0,
        "loop_cpu_share": (loop1 - loop0) / (w1 - w0),  # of one core: the event loop's thread
        "process_cpu_share": (all1 - all0) / (w1 - w0),
    }


async def run_mode(work: Path, name: str, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    d = Daemon(work, name, args.daemon_cpus)
    try:
        await asyncio.sleep(args.warmup_s)
        codes: dict[str, int] = {}
        stop = asyncio.Event()
        tasks = []
        if clients:
            fp, header = await victim_facts(d.address)
            tasks = [
                asyncio.create_task(
                    hostile_client(k, d.address, fp, header, args.rate_per_client, stop, codes, args.shared_connection)
                )
                for k in range(clients)
            ]
            await asyncio.sleep(2.0)  # let the attack ramp up
        answered = sum(codes.values())
        phase = await measure_phase(d, args.duration_s)
        answered = sum(codes.values()) - answered
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        alive = d.proc.poll() is None
        return {
            "mode": name,
            "clients": clients,
            **phase,
            "peak_rss_mb": d.peak_rss_mb(),
            "alive": alive,
            "codes": codes,
            # Hostile calls answered per second while steps/s was measured: what serving them cost the daemon.
            "answered_per_s": answered / max(phase["seconds"], 1e-9),
            "stderr_bytes": d.stderr_bytes(),
        }
    finally:
        d.stop()


async def figures(work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    d = Daemon(work, "figures")
    try:
        fp, header = await victim_facts(d.address)
        async with grpc.aio.insecure_channel(d.address) as ch:
            stub = gossip_pb2_grpc.GossipServiceStub(ch)
            # 1,000 hostile Hellos, 100 at a time.
            for b in range(10):
                await asyncio.gather(
                    *(
                        attempt("hello", lambda r=r: stub.Hello(r, timeout=5))  # type: ignore[misc]
                        for r in [hostile_hello(b * 100 + i, fp, claim=False) for i in range(100)]
                    )
                )
            await asyncio.sleep(7.0)  # the admission dials to unreachable addresses fail within rpc_timeout_s (5 s)
            status = await guarded("status", lambda: stub.GetStatus(gossip_pb2.GetStatusRequest(), timeout=5))
            out["table_after_1000_hellos"] = len(status.neighbours)
            # 1,000 undecodable requests over every RPC.
            before = d.stderr_bytes()
            for _ in range(10):
                calls = []
                for i in range(100):
                    m = ["Hello", "GetStatus", "Push", "FetchState"][i % 4]
                    if m == "Push":
                        calls.append(
                            attempt("u", lambda: ch.stream_unary(SERVICE + "Push")(iter([GARBAGE]), timeout=5))
                        )
                    elif m == "FetchState":

                        async def fetch() -> None:
                            async for _ in ch.unary_stream(SERVICE + "FetchState")(GARBAGE, timeout=5):
                                pass

                        calls.append(attempt("u", fetch))
                    else:
                        calls.append(attempt("u", lambda m=m: ch.unary_unary(SERVICE + m)(GARBAGE, timeout=5)))
                await asyncio.gather(*calls)
            await asyncio.sleep(0.5)
            out["log_bytes_1000_undecodable"] = d.stderr_bytes() - before
        # 100 stalled streams, each on its own connection; how many are still open 30 s later.
        channels = [grpc.aio.insecure_channel(d.address, options=OWN_CONNECTION) for _ in range(100)]
        calls = [
            asyncio.create_task(
                attempt(
                    "stall", lambda c=c: gossip_pb2_grpc.GossipServiceStub(c).Push(stalled_push(header), timeout=120)
                )
            )
            for c in channels
        ]
        await asyncio.sleep(30.0)
        out["stalled_open_after_30s"] = sum(1 for c in calls if not c.done())
        out["stalled_codes"] = {}
        for c in calls:
            if c.done():
                out["stalled_codes"][c.result()] = out["stalled_codes"].get(c.result(), 0) + 1
            c.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        for c in channels:
            await c.close()
        out["daemon_alive"] = d.proc.poll() is None
    finally:
        d.stop()
    return out


def markdown(result: dict[str, Any]) -> str:
    u, h = result["unloaded"], result["hostile"]
    f = result.get("figures")
    ratio = h["steps_per_s"] / u["steps_per_s"] if u["steps_per_s"] else float("nan")
    pairs = result.get("pairs", [])
    repeats = (
        f"Ratios of the {len(pairs)} pairs (unloaded, then hostile, each on a fresh daemon): "
        + ", ".join(f"{p['ratio']:.2f}" for p in pairs)
        + "; per daemon CPU-second: "
        + ", ".join(f"{p['ratio_per_cpu']:.2f}" for p in pairs)
        + "; the table shows the pair with the median steps/s ratio."
        if len(pairs) > 1
        else ""
    )
    lines = [
        "# Hostile clients (issue 16)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['cpus']} CPUs; the attackers run in the benchmark process on the same machine; "
        f"{result['pinning']}; TCP connections: {result['connections']}.  ",
        f"Revision: {result['revision']}",
        "",
        "| mode | clients | steps/s | event loop CPU (cores) | daemon CPU (cores) | peak RSS (MB) | daemon alive |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {m['mode']} | {m['clients']} | {m['steps_per_s']:.0f} | {m.get('loop_cpu_share', float('nan')):.2f} "
            f"| {m.get('process_cpu_share', float('nan')):.2f} | {m['peak_rss_mb']:.0f} | {m['alive']} |"
            for m in (u, h)
        ),
        "",
        f"steps/s under attack / unloaded: **{ratio:.2f}** (goal >= 0.9); steps per CPU-second the daemon got, "
        f"under attack / unloaded (median): **{result.get('ratio_per_cpu', float('nan')):.2f}** (the same ratio "
        "where nothing else shares the daemon's core; steadier where something does)",
        "",
        *([repeats, ""] if repeats else []),
        f"Answers the hostile clients got: {json.dumps(h['codes'], sort_keys=True)}; "
        f"{h.get('answered_per_s', float('nan')):.0f} hostile calls answered per second while steps/s was measured",
        "",
    ]
    if f is None:
        return "\n".join(lines)
    lines += [
        "| figure (default config, fresh daemon) | value |",
        "|---|---|",
        f"| peer-table size after 1,000 hostile Hellos | {f['table_after_1000_hellos']} |",
        f"| stderr bytes for 1,000 undecodable requests | {f['log_bytes_1000_undecodable']} |",
        f"| of 100 stalled Push streams, open 30 s after stalling | {f['stalled_open_after_30s']} |",
        f"| how the stalled streams ended | {json.dumps(f['stalled_codes'], sort_keys=True)} |",
        "",
    ]
    return "\n".join(lines)


def per_cpu(u: dict[str, Any], h: dict[str, Any]) -> dict[str, float]:
    """Steps per CPU-second the daemon got, hostile over unloaded. On a machine that other work shares, the daemon
    gets less of its core at some moments than at others, and steps/s follows; steps per CPU-second it got does
    not, while what serving the attackers costs it still counts. With the daemon alone on its core (the pinned
    case on an otherwise idle machine) this equals the steps/s ratio."""
    su = u["steps_per_s"] / max(u["process_cpu_share"], 1e-9)
    sh = h["steps_per_s"] / max(h["process_cpu_share"], 1e-9)
    return {"ratio_per_cpu": sh / su}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    # Attackers abandon their stalled request generators mid-await; asyncio then reports that aclose() raced them.
    loop = asyncio.get_running_loop()
    default = loop.default_exception_handler
    loop.set_exception_handler(
        lambda lp, ctx: (
            None if "asynchronous generator is already running" in str(ctx.get("exception")) else default(ctx)
        )
    )
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "command": "python scripts/bench_hostile.py " + shlex.join(sys.argv[1:]),
        "cpus": os.cpu_count(),
        "revision": git_revision(ROOT),
        "rate_per_client": args.rate_per_client,
        "connections": "one, shared by all clients" if args.shared_connection else "one per client",
        "pinning": (
            f"daemon pinned to CPU(s) {sorted(args.daemon_cpus)}, attackers to the rest"
            if args.daemon_cpus
            else "no CPU pinning: the attackers share the daemon's CPUs"
        ),
    }
    # On a shared machine, steps/s drifts with other load: pairs close in time, and the median pair.
    pairs = []
    for _ in range(args.repeats):
        u = await run_mode(work, "unloaded", 0, args)
        h = await run_mode(work, "hostile", args.clients, args)
        pairs.append({"unloaded": u, "hostile": h, "ratio": h["steps_per_s"] / u["steps_per_s"], **per_cpu(u, h)})
    median = sorted(pairs, key=lambda p: p["ratio"])[len(pairs) // 2]
    result["unloaded"], result["hostile"], result["ratio"] = median["unloaded"], median["hostile"], median["ratio"]
    result["ratio_per_cpu"] = sorted(p["ratio_per_cpu"] for p in pairs)[len(pairs) // 2]
    if args.repeats > 1:
        result["pairs"] = pairs
    if not args.no_figures:
        result["figures"] = await figures(work)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--rate-per-client", type=float, default=5.0, help="requests/s per client (0: as fast as possible)")
    p.add_argument("--duration-s", type=float, default=20.0)
    p.add_argument("--warmup-s", type=float, default=5.0)
    p.add_argument("--json", default=str(ROOT / "bench-results" / "hostile.json"))
    p.add_argument("--work", default="/tmp/bench-hostile")
    p.add_argument("--quick", action="store_true", help="8 s phases")
    p.add_argument("--no-pin", action="store_true", help="let the attackers share the daemon's CPUs")
    p.add_argument("--shared-connection", action="store_true", help="all clients on one TCP connection")
    p.add_argument("--repeats", type=int, default=1, help="pairs of phases; the median ratio is reported")
    p.add_argument("--no-figures", action="store_true", help="skip the table, log and stalled-stream figures")
    args = p.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    args.daemon_cpus = None
    if not args.no_pin and len(cpus) >= 2:
        args.daemon_cpus = {cpus[0]}
        os.sched_setaffinity(0, set(cpus[1:]))
    if args.quick:
        args.duration_s, args.warmup_s = 8.0, 3.0
    result = asyncio.run(main_async(args))
    write_results(args.json, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
