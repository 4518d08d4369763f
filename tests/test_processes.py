"""Real `peer run` processes: SIGKILL a peer, restart it, and check that it resumed from its checkpoint."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from peer.daemon import checkpoint
from peer.daemon.metrics import read as read_metrics
from tests.helpers import PeerProcess, unique


def _wait(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)  # polling another process's files: there is no event to wait on


def _write_config(tmp_path: Path, node_id: str, static_peers: list[str]) -> Path:
    cfg = {
        "node_id": node_id,
        "state_dir": str(tmp_path / node_id),
        "listen": "127.0.0.1:0",
        "discovery": {"mdns": False, "static_peers": static_peers, "hello_retry_s": 0.5},
        "data": {
            "dataset": "digits",
            "partition": "shards:2",
            "num_partitions": 2,
            "partition_index": int(node_id.endswith("b")),
        },
        "model": {"name": "logreg"},
        "train": {"epochs": 400, "torch_threads": 1, "round_interval_s": 0.02},
        "gossip": {"interval_s": 0.02, "rpc_timeout_s": 2.0, "breaker_threshold": 2, "backoff_cap_s": 1.0},
        "checkpoint": {"interval_s": 0.3},
        "metrics": {"interval_s": 0.2},
    }
    path = tmp_path / f"{node_id}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _checkpoint_step(state_dir: Path) -> int:
    try:
        state = checkpoint.load(state_dir)
    except Exception:
        return -1
    return -1 if state is None else int(state["counters"]["step"])


@pytest.mark.timeout(150)
def test_sigkill_restart_resumes_from_checkpoint(tmp_path: Path) -> None:
    base = unique("p")
    a_cfg = _write_config(tmp_path, f"{base}-a", [])
    a = PeerProcess(a_cfg, tmp_path / "a.log")
    b: PeerProcess | None = None
    try:
        a_ready = a.ready()
        b_cfg = _write_config(tmp_path, f"{base}-b", [a_ready["address"]])
        b = PeerProcess(b_cfg, tmp_path / "b1.log")
        b_ready = b.ready()
        assert b_ready["step"] == 0
        b_dir = tmp_path / f"{base}-b"
        _wait(lambda: _checkpoint_step(b_dir) > 30, 60, "b's first checkpoints")

        b.stop(signal.SIGKILL)  # no goodbye, no final checkpoint
        saved = _checkpoint_step(b_dir)
        assert saved > 30

        b = PeerProcess(b_cfg, tmp_path / "b2.log")
        b_ready2 = b.ready()
        # Resumed: the step counter continues from the checkpoint, and a new incarnation is announced.
        assert b_ready2["step"] == saved
        assert b_ready2["incarnation"] != b_ready["incarnation"]
        assert "resumed from checkpoint" in (tmp_path / "b2.log").read_text()
        _wait(
            lambda: any(r["step"] > saved + 20 for r in read_metrics(b_dir / "metrics.jsonl")[-3:]),
            60,
            "b to train on after the restart",
        )
        # a recognised the restart (new incarnation at a new address) and pushes to b's new address.
        a_log = tmp_path / "a.log"
        _wait(lambda: "restarted" in a_log.read_text(), 30, "a to see b's restart")
        import asyncio

        from peer.tools.status import fetch_status

        status = asyncio.run(fetch_status(a_ready["address"]))
        nb = {n["node_id"]: n for n in status["neighbours"]}
        assert nb[f"{base}-b"]["address"] == b_ready2["address"]
        assert nb[f"{base}-b"]["state"] == "alive"
    finally:
        codes = [a.stop()]
        if b is not None:
            codes.append(b.stop())
    assert codes == [0, 0], "graceful SIGTERM must exit 0"
    for d in (tmp_path / f"{base}-a", tmp_path / f"{base}-b"):
        records = read_metrics(d / "metrics.jsonl")
        assert records[-1]["event"] == "stopped"
        assert _checkpoint_step(d) == records[-1]["step"]  # final checkpoint written on SIGTERM
