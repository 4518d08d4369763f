"""The small commands, run as a user runs them: init-config, eval, status, health."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from peer import config
from peer.daemon.node import Node
from tests.helpers import fast_config, unique


def _peer(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "peer", *args], capture_output=True, text=True, timeout=timeout_s)


def test_init_config_prints_a_valid_annotated_config() -> None:
    out = _peer("init-config")
    assert out.returncode == 0
    assert "# peer daemon configuration" in out.stdout
    raw = yaml.safe_load(out.stdout)
    cfg = config.validate(raw, source="init-config")
    assert cfg.algorithm.name == "cdl"


@pytest.mark.timeout(120)
async def test_eval_status_and_health_against_a_running_daemon(tmp_path: Path) -> None:
    cfg = fast_config(tmp_path, unique("cli"), train={"epochs": 3}, metrics={"eval_interval_s": 0.2})
    node = Node(cfg, stdout=io.StringIO())
    task = asyncio.create_task(node.run())
    try:
        await asyncio.wait_for(node.ready.wait(), 60)
        await asyncio.wait_for(node.trained.wait(), 60)
        # The live evaluation scores the final model (alone, it no longer changes after training).
        await node.wait_for(lambda: node.counters.eval_step == node.trainer.step_count, 30, "the live evaluation")
        status = await asyncio.to_thread(_peer, "status", node.address, "--json")
        assert status.returncode == 0, status.stderr
        data = json.loads(status.stdout)
        assert data["node_id"] == node.cfg.node_id and int(data["step"]) == node.trainer.step_count
        assert data["training_done"] is True
        live = data["info"]
        assert int(live["eval.step"]) == node.trainer.step_count and int(live["eval.samples"]) == len(
            node.built.dataset.test
        )  # type: ignore[arg-type]
        human = await asyncio.to_thread(_peer, "status", node.address)
        assert node.cfg.node_id in human.stdout and "(no peers known yet)" in human.stdout
        assert f"accuracy {float(live['eval.accuracy']):.2%}" in human.stdout
        assert f"on {live['eval.samples']} test samples, at step {node.trainer.step_count}" in human.stdout
        health = await asyncio.to_thread(_peer, "health", "--addr", node.address)
        assert health.returncode == 0 and "SERVING" in health.stdout
    finally:
        node.request_stop()
        await asyncio.wait_for(task, 30)
    result = await asyncio.to_thread(_peer, "eval", "--state-dir", str(node.state_dir), "--json")
    assert result.returncode == 0, result.stderr
    ev = json.loads(result.stdout)
    assert ev["node_id"] == node.cfg.node_id and ev["step"] == node.trainer.step_count
    assert 0.8 < ev["accuracy"] <= 1.0  # logreg on iid digits after 3 epochs
    # What the daemon reported live is what `peer eval` computes from the checkpoint of the same model.
    assert float(live["eval.accuracy"]) == pytest.approx(ev["accuracy"], abs=1e-12)
    assert float(live["eval.loss"]) == pytest.approx(ev["loss"], rel=1e-5)


def test_status_of_nothing_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = _peer("status", f"127.0.0.1:{port}", "--timeout", "2")
    assert out.returncode == 1
    assert f"status of 127.0.0.1:{port}: UNAVAILABLE" in out.stderr
    health = _peer("health", "--addr", f"127.0.0.1:{port}", "--timeout", "2")
    assert health.returncode == 1


def test_eval_of_an_empty_directory_is_a_clear_error(tmp_path: Path) -> None:
    out = _peer("eval", "--state-dir", str(tmp_path))
    assert out.returncode == 3 and "no config.yaml" in out.stderr
