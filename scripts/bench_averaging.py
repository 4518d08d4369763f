#!/usr/bin/env python3
"""Benchmark: 4 peers reach the exact average of a 16 MiB float32 state; peer against hivemind 1.1.12.

**peer.** Four processes on loopback, each with peer's real gRPC server (`peer.net.server.start_server`: the Push
servicer, stream limits, the assembler's checks — digest, manifest, finiteness — and decoding) and real client
(`peer.net.client.Client`, payloads encoded by `peer.net.encoder.encode_frames`, the daemon's own sending path:
one copy of the data into serialized stream messages, encoded once for all receivers). An averaging step is a
reduce-scatter then an all-gather over Push streams, the same exchange hivemind's all-reduce makes: the state is
cut in 4 parts; peer i pushes part j to peer j; peer j adds the 4 copies of its part in sender order and divides by 4;
then pushes its averaged part to the 3 others. Every peer ends with the same bits, which the parent checks
against its own sum in the same order (an exact average, not an approximation). Timed per step: from the moment
the parent releases all peers (their fresh states already in memory) to the moment the last peer holds the whole
average, encoding, hashing, transport, checks, decoding and the adds included. No training, no mDNS, no Hello:
only the averaging. The bit-for-bit check (a SHA-256 of each peer's result) runs after every peer has finished, so
that it takes no CPU from a step still being timed; hivemind's result goes to its parent the same way.

**hivemind.** `hivemind==1.1.12` (and torch) installed by this script into its own virtualenv (`.bench-venv/` in
the repository, ignored by git; `--venv` to choose another), then `scripts/_hivemind_averaging.py` run in it:
four processes, each a DHT and a `DecentralizedAverager` (target and minimum group size 4) over the same state
size; timed per step from the same kind of release to the last peer's `step()` return (matchmaking included: it
is part of every hivemind step). If hivemind cannot be installed or fails to run, its side is skipped with the
reason, and peer's figures are still written.

**Side by side.** Both sides' processes are alive for the whole run and their steps are interleaved, the first
side alternating (peer, hivemind, hivemind, peer, ...): on a shared machine whose load moves by 2x within minutes,
a run of one side after the other measured the load as much as the software.

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
import queue
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peer.tools.results import write_results  # noqa: E402
from peer.tools.revision import git_revision  # noqa: E402

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
    import resource

    import torch

    from peer.algorithms.base import Payload
    from peer.config import GossipConfig
    from peer.net.assembler import Received, ReceiveLimits
    from peer.net.client import Client
    from peer.net.encoder import encode_frames
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

        def held(self, peer: str) -> None:
            pass

    server = await start_server("127.0.0.1:0", cfg, Handlers())  # type: ignore[arg-type]
    client = Client(cfg)
    conn.send(server.port)
    ports: list[int] = await loop.run_in_executor(None, conn.recv)
    env = Envelope(f"p{index}", "bench", "allreduce", 1, n - 1, f"127.0.0.1:{ports[index]}", 0)

    async def push_to(j: int, tensor: torch.Tensor, step: int, phase: int, encoded: Any = None) -> None:
        payload = Payload("state", {"params": tensor}, seq=2 * step + phase, round=step, scalars={"phase": phase})
        header, frames = encoded or await asyncio.to_thread(encode_frames, env, payload, chunk_bytes=cfg.chunk_bytes)
        await client.push(f"127.0.0.1:{ports[j]}", frames, header.total_bytes, f"p{j}")

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
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
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
        encoded = await asyncio.to_thread(encode_frames, env, payload, chunk_bytes=cfg.chunk_bytes)
        await asyncio.gather(*(push_to(j, mine, step, 2, encoded) for j in range(n) if j != index))
        marks.append(time.monotonic())
        averaged = await collect(step, 2)
        averaged[index] = mine
        result = torch.cat([averaged[k] for k in range(n)])
        finished = time.monotonic()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
        conn.send((started, finished, [m - started for m in marks], cpu))
        # The check runs once every peer has finished, so that it takes no CPU from a step still being timed.
        await loop.run_in_executor(None, conn.recv)
        conn.send(hashlib.sha256(result.numpy().tobytes()).hexdigest())
    await client.close()
    await server.stop(1.0)


class PeerSide:
    """The four peer processes, alive for the whole run; `step` times one averaging step."""

    def __init__(self, n: int, numel: int, steps: int) -> None:
        self.n, self.numel = n, numel
        ctx = mp.get_context("spawn")
        self.pipes = [ctx.Pipe() for _ in range(n)]
        self.procs = [ctx.Process(target=peer_process, args=(i, n, numel, steps, self.pipes[i][1])) for i in range(n)]
        for p in self.procs:
            p.start()
        ports = [self.pipes[i][0].recv() for i in range(n)]
        for i in range(n):
            self.pipes[i][0].send(ports)
        self.times: list[float] = []
        self.exact = True
        self.marks: list[list[float]] = []
        self.cpu: list[float] = []

    def step(self, step: int) -> None:
        import hashlib

        n = self.n
        expected = exact_average([make_state(i, step, self.numel) for i in range(n)], n)
        want = hashlib.sha256(expected.numpy().tobytes()).hexdigest()
        for i in range(n):
            self.pipes[i][0].send("go")
        reports = [self.pipes[i][0].recv() for i in range(n)]
        self.times.append(max(r[1] for r in reports) - min(r[0] for r in reports))
        for i in range(n):
            self.pipes[i][0].send("check")
        exact = all(self.pipes[i][0].recv() == want for i in range(n))
        self.exact &= exact
        if step > 0:
            self.marks += [r[2] for r in reports]
            self.cpu += [r[3] for r in reports]
        print(f"peer      step {step}: {self.times[-1]:.3f} s, exact average on all {n}: {exact}", flush=True)

    def close(self) -> None:
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()

    def result(self) -> dict[str, Any]:
        names = ("scatter_pushes_done", "scatter_received", "reduced", "gather_pushes_done")
        marks = self.marks
        profile = {k: round(statistics.median(m[i] for m in marks), 4) for i, k in enumerate(names)} if marks else {}
        return {
            "step_s": self.times,
            "median_s": statistics.median(self.times[1:] or self.times),
            "exact": self.exact,
            # Seconds from the release to each point of a peer's step: medians over peers and steps (step 0 out).
            "profile_s": profile,
            # CPU seconds (user + system, all threads) one peer process spends in a step: median.
            "cpu_s_per_peer": round(statistics.median(self.cpu), 4) if self.cpu else None,
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


class HivemindSide:
    """scripts/_hivemind_averaging.py in hivemind's virtualenv, driven one step at a time over its stdin."""

    def __init__(self, py: Path, n: int, numel: int, steps: int, timeout_s: float) -> None:
        script = ROOT / "scripts" / "_hivemind_averaging.py"
        cmd = [str(py), str(script), "--peers", str(n), "--numel", str(numel), "--steps", str(steps)]
        self.timeout_s = timeout_s
        # A file, not a pipe: hivemind logs a lot, and nobody would read a pipe until the end. Closed in close().
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.times: list[float] = []
        self.errors: list[float] = []
        self.full = True
        self.skipped = ""
        if self._line() != "ready":
            self._fail("hivemind did not start")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def _line(self) -> str | None:
        try:
            return self.lines.get(timeout=self.timeout_s)
        except queue.Empty:
            return None

    def _fail(self, why: str) -> None:
        self.stderr.seek(0)
        tail = self.stderr.read()[-800:]
        self.skipped = f"{why} (exit {self.proc.poll()}): {tail}"
        self.proc.kill()

    def step(self, step: int) -> None:
        if self.skipped:
            return
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write("step\n")
            self.proc.stdin.flush()
        except OSError:
            pass
        line = self._line()
        if not line or not line.startswith("{"):
            self._fail(f"hivemind step {step} failed or took over {self.timeout_s:.0f} s")
            return
        r = json.loads(line)
        self.times.append(r["step_s"])
        self.errors.append(r["max_abs_error"])
        self.full &= r["full_group"]
        print(
            f"hivemind  step {step}: {r['step_s']:.3f} s, full group: {r['full_group']}, "
            f"max error {r['max_abs_error']:.1e}",
            flush=True,
        )

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.stderr.close()

    def result(self) -> dict[str, Any]:
        if self.skipped:
            return {"skipped": self.skipped}
        return {
            "step_s": self.times,
            "median_s": statistics.median(self.times[1:] or self.times),
            "full_groups": self.full,
            "max_abs_error": max(self.errors),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--mib", type=float, default=16.0, help="state size in MiB of float32 (default 16)")
    ap.add_argument("--steps", type=int, default=8, help="averaging steps per side; the first is not in the median")
    ap.add_argument("--venv", type=Path, default=ROOT / ".bench-venv", help="hivemind's virtualenv")
    ap.add_argument("--no-hivemind", action="store_true", help="measure peer only")
    ap.add_argument("--hivemind-timeout-s", type=float, default=300, help="longest wait for one hivemind step")
    ap.add_argument("--json", type=Path, default=None, help="write results here (and the table next to it as .md)")
    args = ap.parse_args()
    numel = int(args.mib * (1 << 20)) // 4
    numel -= numel % args.peers

    hm_side: HivemindSide | None = None
    why = "--no-hivemind"
    if not args.no_hivemind:
        py, why = hivemind_python(args.venv)
        if py is not None:
            hm_side = HivemindSide(py, args.peers, numel, args.steps, args.hivemind_timeout_s)
    load_before = os.getloadavg()[0]
    peer_side = PeerSide(args.peers, numel, args.steps)
    try:
        for step in range(args.steps):
            # Interleaved, the first side alternating: both sides see the same background load.
            sides: list[Any] = [peer_side] if hm_side is None else [peer_side, hm_side]
            for side in sides if step % 2 == 0 else sides[::-1]:
                side.step(step)
    finally:
        peer_side.close()
        if hm_side is not None:
            hm_side.close()
    load_after = os.getloadavg()[0]
    peer = peer_side.result()
    hm = hm_side.result() if hm_side is not None else {"skipped": why}
    if "skipped" in hm:
        print(f"hivemind skipped: {hm['skipped']}", file=sys.stderr)
    ratio = peer["median_s"] / hm["median_s"] if "median_s" in hm else None
    result = {
        "command": "python scripts/bench_averaging.py " + shlex.join(sys.argv[1:]),
        "revision": git_revision(ROOT),
        "machine": f"{os.cpu_count()} CPUs",
        "load_average_1min": [round(load_before, 1), round(load_after, 1)],
        "peers": args.peers,
        "state_bytes": numel * 4,
        "steps": args.steps,
        "peer": peer,
        "hivemind": hm,
        "ratio_vs_hivemind": ratio,
        "goal": GOAL,
    }
    md = markdown(result)
    if args.json is not None:
        write_results(args.json, result, md)
    else:
        print(md)


def markdown(result: dict[str, Any]) -> str:
    peer, hm, ratio = result["peer"], result["hivemind"], result["ratio_vs_hivemind"]
    lines = [
        f"# Averaging: {result['peers']} peers, {result['state_bytes'] / (1 << 20):.0f} MiB float32, exact average",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}, 1-minute load average {result['load_average_1min'][0]} at the start, "
        f"{result['load_average_1min'][1]} at the end.  ",
        f"Revision: {result['revision']}",
        "",
        "Both sides alive at once, their steps interleaved (the first side alternating); median over steps, the "
        "first left out.",
        "",
        "| side | median s/step | steps (s) | exact average |",
        "|---|---:|---|---|",
        f"| peer (real gRPC Push, reduce-scatter + all-gather) | {peer['median_s']:.3f} "
        f"| {', '.join(f'{t:.2f}' for t in peer['step_s'])} | {peer['exact']} |",
    ]
    if "median_s" in hm:
        lines.append(
            f"| hivemind 1.1.12 DecentralizedAverager | {hm['median_s']:.3f} "
            f"| {', '.join(f'{t:.2f}' for t in hm['step_s'])} | max error {hm['max_abs_error']:.1e} |"
        )
    else:
        lines.append(f"| hivemind 1.1.12 | skipped: {hm['skipped'][:200]} | | |")
    prof = ", ".join(f"{k} {v:.3f}" for k, v in peer["profile_s"].items())
    lines += [
        "",
        f"peer's step, median seconds from the release: {prof}, all done {peer['median_s']:.3f}; "
        f"CPU seconds per peer process per step (user + system): {peer['cpu_s_per_peer']}.",
        "",
    ]
    verdict = f"ratio_vs_hivemind = **{ratio:.2f}** (goal <= {GOAL})" if ratio is not None else "ratio: n/a"
    return "\n".join(lines) + f"\n{verdict}\n"


if __name__ == "__main__":
    main()
