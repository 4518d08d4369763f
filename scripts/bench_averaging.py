#!/usr/bin/env python3
"""Benchmark: 4 peers reach the exact average of a 16 MiB float32 state; peer against hivemind 1.1.12.

**peer.** Four processes on loopback, each with peer's real gRPC server (`peer.net.server.start_server`: the Push
servicer, stream limits, the assembler's checks — sha256, manifest, finiteness — and decoding) and real client
(`peer.net.client.Client`, payloads encoded by `peer.net.encoder.encode`). An averaging step is a reduce-scatter
then an all-gather over Push streams, the same exchange hivemind's all-reduce makes: the state is cut in 4
parts; peer i pushes part j to peer j; peer j adds the 4 copies of its part in sender order and divides by 4;
then pushes its averaged part to the 3 others. Every peer ends with the same bits, which the parent checks
against its own sum in the same order (an exact average, not an approximation). Timed per step: from the moment
the parent releases all peers (their fresh states already in memory) to the moment the last peer holds the whole
average, encoding, hashing, transport, checks, decoding and the adds included. No training, no mDNS, no Hello:
only the averaging.

**hivemind.** `hivemind==1.1.12` (and torch) installed by this script into its own virtualenv (`.bench-venv/` in
the repository, ignored by git; `--venv` to choose another), then `scripts/_hivemind_averaging.py` run in it:
four processes, each a DHT and a `DecentralizedAverager` (target and minimum group size 4) over the same state
size; timed per step from the same kind of release to the last peer's `step()` return (matchmaking included: it
is part of every hivemind step). If hivemind cannot be installed or fails to run, its side is skipped with the
reason, and peer's figures are still written.

Reported: the median seconds per step of each, and `ratio_vs_hivemind` = peer's median / hivemind's (goal
<= 0.5).

Usage:
    .venv/bin/python scripts/bench_averaging.py --json bench-results/averaging.json
    .venv/bin/python scripts/bench_averaging.py --steps 3 --no-hivemind          # peer only, a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HIVEMIND = "hivemind==1.1.12"
GOAL = 0.5
CHUNK_BYTES = 4 << 20  # gossip.chunk_bytes at its maximum: a 4 MiB part is one stream message


# ------------------------------------------------------------------------------------------------ peer side
def make_state(peer: int, step: int, numel: int) -> Any:
    import torch

    return torch.randn(numel, generator=torch.Generator().manual_seed(1000 * step + peer))


def exact_average(states: list[Any], n: int) -> Any:
    """The average as every peer computes it: part by part, the copies added in sender order, then / n."""
    import torch

    parts = []
    for chunks in zip(*(s.chunk(n) for s in states), strict=True):
        acc = chunks[0].clone()
        for c in chunks[1:]:
            acc += c
        parts.append(acc / n)
    return torch.cat(parts)


def peer_process(index: int, n: int, numel: int, steps: int, conn: Any) -> None:
    asyncio.run(_peer_main(index, n, numel, steps, conn))


async def _peer_main(index: int, n: int, numel: int, steps: int, conn: Any) -> None:
    import hashlib

    import torch

    from peer.algorithms.base import Payload
    from peer.config import GossipConfig
    from peer.net.assembler import Received, ReceiveLimits
    from peer.net.client import Client
    from peer.net.encoder import encode, iter_requests
    from peer.net.server import start_server
    from peer.net.wire import Envelope
    from peer.v1 import gossip_pb2

    torch.set_num_threads(1)
    loop = asyncio.get_running_loop()
    inbox: dict[tuple[int, int], dict[int, torch.Tensor]] = {}
    arrived = asyncio.Event()
    cfg = GossipConfig(max_message_bytes=numel * 4 + (1 << 20), chunk_bytes=CHUNK_BYTES)

    class Handlers:
        def hello(self, request: Any, peer: str, identity: str | None) -> Any:
            return gossip_pb2.HelloResponse(accepted=True)

        def receive_limits(self) -> ReceiveLimits:
            return ReceiveLimits(
                max_payload_bytes=cfg.max_message_bytes,
                max_chunk_bytes=cfg.chunk_bytes,
                expected_fingerprint="bench",
                expected_algorithm="allreduce",
            )

        async def deliver(self, received: Received, peer: str, identity: str | None) -> None:
            p = received.payload
            sender = int(received.envelope.sender_id.removeprefix("p"))
            inbox.setdefault((p.round, int(p.scalars["phase"])), {})[sender] = p.tensors["params"]
            arrived.set()

        def rejected(self, sender: str, error: Exception, peer: str) -> None:
            print(f"peer {index}: rejected a push from {sender}: {error}", file=sys.stderr)

        def status(self) -> Any:
            return gossip_pb2.GetStatusResponse()

        async def fetch_state(self, request: Any, identity: str | None) -> Any:
            raise NotImplementedError

        def refused(self, reason: str, peer: str, message: str) -> None:
            print(f"peer {index}: refused {reason}: {message}", file=sys.stderr)

    server = await start_server("127.0.0.1:0", cfg, Handlers())  # type: ignore[arg-type]
    client = Client(cfg)
    conn.send(server.port)
    ports: list[int] = await loop.run_in_executor(None, conn.recv)
    env = Envelope(f"p{index}", "bench", "allreduce", 1, n - 1, f"127.0.0.1:{ports[index]}", 0)

    async def push_to(j: int, tensor: torch.Tensor, step: int, phase: int, encoded: Any = None) -> None:
        payload = Payload("state", {"params": tensor}, seq=2 * step + phase, round=step, scalars={"phase": phase})
        header, chunks = encoded or await asyncio.to_thread(encode, env, payload, chunk_bytes=cfg.chunk_bytes)
        await client.push(f"127.0.0.1:{ports[j]}", iter_requests(header, chunks), header.total_bytes, f"p{j}")

    async def collect(step: int, phase: int) -> dict[int, torch.Tensor]:
        while len(inbox.get((step, phase), {})) < n - 1:
            arrived.clear()
            await arrived.wait()
        return inbox.pop((step, phase))

    for step in range(steps):
        x = make_state(index, step, numel)
        parts = x.chunk(n)
        await loop.run_in_executor(None, conn.recv)  # released by the parent
        started = time.monotonic()
        # Reduce-scatter: my copy of part j to its owner j.
        await asyncio.gather(*(push_to(j, parts[j], step, 1) for j in range(n) if j != index))
        marks = [time.monotonic()]
        got = await collect(step, 1)
        marks.append(time.monotonic())
        got[index] = parts[index]

        def reduce(got: dict[int, torch.Tensor] = got) -> torch.Tensor:
            acc = got[0].clone()
            for k in range(1, n):
                acc += got[k]
            return acc / n

        mine = await asyncio.to_thread(reduce)
        marks.append(time.monotonic())
        # All-gather: my averaged part to everyone (encoded once).
        payload = Payload("state", {"params": mine}, seq=2 * step + 2, round=step, scalars={"phase": 2})
        encoded = await asyncio.to_thread(encode, env, payload, chunk_bytes=cfg.chunk_bytes)
        await asyncio.gather(*(push_to(j, mine, step, 2, encoded) for j in range(n) if j != index))
        marks.append(time.monotonic())
        averaged = await collect(step, 2)
        averaged[index] = mine
        result = torch.cat([averaged[k] for k in range(n)])
        finished = time.monotonic()
        digest = hashlib.sha256(result.numpy().tobytes()).hexdigest()
        conn.send((started, finished, digest, [m - started for m in marks]))
    await client.close()
    await server.stop(1.0)


def run_peer(n: int, numel: int, steps: int) -> dict[str, Any]:
    import hashlib

    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(n)]
    procs = [ctx.Process(target=peer_process, args=(i, n, numel, steps, pipes[i][1])) for i in range(n)]
    for p in procs:
        p.start()
    try:
        ports = [pipes[i][0].recv() for i in range(n)]
        for i in range(n):
            pipes[i][0].send(ports)
        times, exact, marks = [], True, []
        for step in range(steps):
            expected = exact_average([make_state(i, step, numel) for i in range(n)], n)
            want = hashlib.sha256(expected.numpy().tobytes()).hexdigest()
            for i in range(n):
                pipes[i][0].send("go")
            reports = [pipes[i][0].recv() for i in range(n)]
            times.append(max(r[1] for r in reports) - min(r[0] for r in reports))
            exact &= all(r[2] == want for r in reports)
            if step > 0:
                marks += [r[3] for r in reports]
            print(f"peer      step {step}: {times[-1]:.3f} s, exact average on all {n}: {exact}", flush=True)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    names = ("scatter_pushes_done", "scatter_received", "reduced", "gather_pushes_done")
    profile = {k: round(statistics.median(m[i] for m in marks), 4) for i, k in enumerate(names)} if marks else {}
    return {
        "step_s": times,
        "median_s": statistics.median(times[1:] or times),
        "exact": exact,
        # Seconds from the release to each point of a peer's step: medians over peers and steps (step 0 excluded).
        "profile_s": profile,
    }


# ------------------------------------------------------------------------------------------- hivemind side
def hivemind_python(venv: Path) -> tuple[Path | None, str]:
    """The virtualenv's python with hivemind importable, installing it if needed; (None, why) if impossible."""
    py = venv / "bin" / "python"
    check = [str(py), "-c", "import hivemind, torch; print(hivemind.__version__)"]
    if py.exists() and subprocess.run(check, capture_output=True, text=True).stdout.strip() == "1.1.12":
        return py, ""
    print(f"installing {HIVEMIND} into {venv} (once) ...", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
        torch_pin = f"torch=={__import__('torch').__version__.split('+')[0]}"
        proc = subprocess.run(
            [str(py), "-m", "pip", "install", "-q", HIVEMIND, torch_pin], capture_output=True, text=True, timeout=1800
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"cannot create the virtualenv: {exc}"
    if proc.returncode != 0:
        return None, f"pip install {HIVEMIND} failed: {(proc.stderr or proc.stdout)[-600:]}"
    ok = subprocess.run(check, capture_output=True, text=True)
    if ok.returncode != 0:
        return None, f"hivemind installed but does not import: {ok.stderr[-600:]}"
    return py, ""


def run_hivemind(py: Path, n: int, numel: int, steps: int, timeout_s: float) -> dict[str, Any]:
    script = ROOT / "scripts" / "_hivemind_averaging.py"
    cmd = [str(py), str(script), "--peers", str(n), "--numel", str(numel), "--steps", str(steps)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"skipped": f"hivemind did not finish {steps} steps in {timeout_s:.0f} s"}
    for line in proc.stderr.splitlines():
        if line.startswith("hivemind  step"):
            print(line, flush=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"skipped": f"hivemind run failed (exit {proc.returncode}): {proc.stderr[-800:]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--mib", type=float, default=16.0, help="state size in MiB of float32 (default 16)")
    ap.add_argument("--steps", type=int, default=8, help="averaging steps per side; the first is not in the median")
    ap.add_argument("--venv", type=Path, default=ROOT / ".bench-venv", help="hivemind's virtualenv")
    ap.add_argument("--no-hivemind", action="store_true", help="measure peer only")
    ap.add_argument("--hivemind-timeout-s", type=float, default=600)
    ap.add_argument("--json", type=Path, default=None, help="write results here (and the table next to it as .md)")
    args = ap.parse_args()
    numel = int(args.mib * (1 << 20)) // 4
    numel -= numel % args.peers

    peer = run_peer(args.peers, numel, args.steps)
    if args.no_hivemind:
        hm: dict[str, Any] = {"skipped": "--no-hivemind"}
    else:
        py, why = hivemind_python(args.venv)
        hm = run_hivemind(py, args.peers, numel, args.steps, args.hivemind_timeout_s) if py else {"skipped": why}
    if "skipped" in hm:
        print(f"hivemind skipped: {hm['skipped']}", file=sys.stderr)
    ratio = peer["median_s"] / hm["median_s"] if "median_s" in hm else None
    rows = [
        "| side | median s/step | steps (s) | exact average |",
        "|---|---:|---|---|",
        f"| peer (real gRPC Push, reduce-scatter + all-gather) | {peer['median_s']:.3f} "
        f"| {', '.join(f'{t:.2f}' for t in peer['step_s'])} | {peer['exact']} |",
    ]
    if "median_s" in hm:
        rows.append(
            f"| hivemind 1.1.12 DecentralizedAverager | {hm['median_s']:.3f} "
            f"| {', '.join(f'{t:.2f}' for t in hm['step_s'])} | max error {hm.get('max_abs_error', float('nan')):.1e} |"
        )
    else:
        rows.append(f"| hivemind 1.1.12 | skipped: {hm['skipped'][:200]} | | |")
    prof = ", ".join(f"{k} {v:.3f}" for k, v in peer["profile_s"].items())
    rows.append(f"\npeer's step, median seconds from the release: {prof}, all done {peer['median_s']:.3f}.")
    verdict = f"ratio_vs_hivemind = {ratio:.2f} (goal <= {GOAL})" if ratio is not None else "ratio_vs_hivemind: n/a"
    md = "\n".join(rows) + f"\n\n{verdict}\n"
    print(md)
    if args.json is not None:
        from peer.tools.revision import git_revision

        result = {
            "revision": git_revision(ROOT),
            "machine": f"{os.cpu_count()} CPUs",
            "peers": args.peers,
            "state_bytes": numel * 4,
            "steps": args.steps,
            "peer": peer,
            "hivemind": hm,
            "ratio_vs_hivemind": ratio,
            "goal": GOAL,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        cmd = "python scripts/bench_averaging.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        title = f"# Averaging: {args.peers} peers, {numel * 4 / (1 << 20):.0f} MiB float32, exact average\n\n"
        args.json.with_suffix(".md").write_text(f"{title}`{cmd}` at {result['revision']}.\n\n{md}")


if __name__ == "__main__":
    main()
