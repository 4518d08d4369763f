"""Shared test helpers: fast configs, condition waits (no fixed sleeps), and consensus measures."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from peer import config
from peer.config import PeerConfig
from peer.daemon.node import Node

# (where, status name) -> cases, filled by the property-based suites; tests/conftest.py prints it at the end.
FUZZ_STATUSES: Counter[tuple[str, str]] = Counter()


def unique(prefix: str) -> str:
    """Node ids and cluster names unique per test run, so concurrent runs on one loopback never mix."""
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def fast_config(tmp_path: Path, node_id: str, **sections: Any) -> PeerConfig:
    """A config that trains a small model quickly; `sections` override whole keys (dotted names allowed)."""
    raw: dict[str, Any] = {
        "node_id": node_id,
        "state_dir": str(tmp_path / node_id),
        "listen": "127.0.0.1:0",
        "discovery": {"mdns": False, "interfaces": ["127.0.0.1"]},
        "data": {"dataset": "digits", "partition": "iid", "num_partitions": 1, "partition_index": 0},
        "model": {"name": "logreg"},
        "train": {
            "epochs": 2,
            "torch_threads": 1,
            "steps_per_round": 2,
            "round_interval_s": 0.02,
            "wait_for_neighbors_s": 0,
        },
        "gossip": {"interval_s": 0.01, "rpc_timeout_s": 2.0},
        "metrics": {"interval_s": 0.2},
        "checkpoint": {"interval_s": 0.5},
    }
    for key, value in sections.items():
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]].update(value)
        else:
            node[parts[-1]] = value
    return config.validate(raw, source="test")


async def until(nodes: list[Node], predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Wait until `predicate()` holds, re-checked whenever one of the in-process `nodes` reports a change (its
    view, training progress, metrics), with a deadline and a clear failure message."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        waits = [asyncio.ensure_future(n.changes.changed()) for n in nodes]
        _, pending = await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        for w in pending:
            w.cancel()


async def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    """Wait for a condition that has no event of its own (another process's state), with a deadline and a
    clear failure message. In-process daemons signal their changes: use `until` for them."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(poll_s)


def consensus_distance(vectors: list[torch.Tensor]) -> float:
    """Mean over peers of ‖θ_i − θ̄‖ / ‖θ̄‖."""
    stacked = torch.stack([v.double() for v in vectors])
    mean = stacked.mean(0)
    return float(((stacked - mean).norm(dim=1) / mean.norm()).mean())


async def start_nodes(nodes: list[Node], timeout_s: float = 60) -> list[asyncio.Task[None]]:
    """Run in-process daemons until every one is ready; a daemon that dies during start-up raises its error."""
    tasks = [asyncio.create_task(n.run()) for n in nodes]
    ready = asyncio.ensure_future(asyncio.gather(*(n.ready.wait() for n in nodes)))
    done, _ = await asyncio.wait([ready, *tasks], timeout=timeout_s, return_when="FIRST_COMPLETED")
    for t in tasks:
        if t in done:
            t.result()
    assert all(n.ready.is_set() for n in nodes), "daemons did not become ready"
    return tasks


async def stop_nodes(nodes: list[Node], tasks: list[asyncio.Task[None]], *, return_exceptions: bool = False) -> None:
    """Graceful stop of in-process daemons, bounded in time."""
    for n in nodes:
        n.request_stop()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=return_exceptions), timeout=30)


class PeerProcess:
    """A real `peer run` child process: stdout lines arrive on a queue (no blocking reads), stderr goes to a log."""

    def __init__(self, config_path: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "peer", "run", "--config", str(config_path)],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})},
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def _no_ready_line(self) -> AssertionError:
        return AssertionError(f"no ready line; log:\n{self.log_path.read_text()[-3000:]}")

    def ready(self, timeout_s: float = 60) -> dict[str, Any]:
        """The parsed ready line (blocking, for synchronous tests)."""
        try:
            return dict(json.loads(self.lines.get(timeout=timeout_s)))
        except queue.Empty:
            raise self._no_ready_line() from None

    async def aready(self, timeout_s: float = 60) -> dict[str, Any]:
        """The parsed ready line, without blocking the event loop (for tests that also run in-process daemons)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return dict(json.loads(self.lines.get_nowait()))
            except queue.Empty:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise self._no_ready_line()
            await asyncio.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log.close()


# ------------------------------------------------------------------------------ plugins that fail on purpose
# Named in configs as "tests.helpers:<function>" by the plugin tests.


def raising_model(input_shape: tuple[int, ...], num_classes: int) -> torch.nn.Module:
    raise RuntimeError("no weights for this robot")


def not_a_module(input_shape: tuple[int, ...], num_classes: int) -> str:
    return "a model"


def wrong_width_model(input_shape: tuple[int, ...], num_classes: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(int(torch.tensor(input_shape).prod()), num_classes + 1)
    )


def raising_data() -> Any:
    raise OSError("camera offline")


def list_data() -> Any:
    return [1, 2, 3]


def non_scalar_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return output.sum(dim=1)
