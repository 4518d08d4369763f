"""The CLI traps a new user fell into (issue 17), one test each: what happens now instead.

state_dir following node_id and YAML errors naming the file are in tests/test_config.py.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from google.protobuf.json_format import MessageToDict

from peer import cli
from peer.daemon import readyfile
from peer.daemon.node import Node
from peer.tools import demo
from peer.tools.status import format_status, waiting_text
from tests.helpers import fast_config, unique, wait_until

ROOT = Path(__file__).resolve().parents[1]


def _peer(*args: str, cwd: Path | None = None, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "peer", *args], capture_output=True, text=True, timeout=timeout_s, cwd=cwd, env=env
    )


def _actions(parser: argparse.ArgumentParser, path: str = "peer") -> list[tuple[str, argparse.Action]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _actions(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction | argparse._VersionAction):
            out.append((path, action))
    return out


def test_every_option_has_help_text() -> None:
    """Trap: `eval --state-dir` and `status --json` had no help text. Every argument of every command has one."""
    missing = [f"{path} {a.option_strings or a.dest}" for path, a in _actions(cli.build_parser()) if not a.help]
    assert not missing, f"arguments without help: {missing}"


def test_help_lists_the_exit_codes() -> None:
    """Trap: exit codes were only in README prose. `peer --help` lists every code the CLI returns."""
    text = cli.build_parser().format_help()
    assert "exit codes:" in text
    for code in {0, 1, 130, *cli.EXIT_CODES.values()}:
        assert f"\n  {code} " in text, code


def test_status_and_health_take_the_address_the_same_way() -> None:
    """Trap: `status ADDR` but `health --addr ADDR`. Both take ADDRESS; health keeps --addr as an alias."""
    parser = cli.build_parser()
    assert parser.parse_args(["status", "h:1"]).address == "h:1"
    assert parser.parse_args(["health", "h:1"]).address == "h:1"
    assert parser.parse_args(["health", "--addr", "h:1"]).addr == "h:1"
    assert parser.parse_args(["status"]).address is None and parser.parse_args(["health"]).address is None


@pytest.mark.timeout(120)
async def test_status_health_and_ls_find_the_daemon_of_this_host(tmp_path: Path) -> None:
    """Trap: the port is 0 by default and nothing said where the daemon listens. A serving daemon writes
    state_dir/ready.json; `peer status` and `peer health` without an address use it and say so; `peer ls` lists it
    from the ready file, and from mDNS when run elsewhere. The ready file is gone after a clean stop."""
    node_id = unique("trap")
    cfg = fast_config(
        tmp_path,
        node_id,
        state_dir=str(tmp_path / "state" / node_id),
        discovery={"mdns": True, "cluster": unique("c")},
        train={"epochs": 1},
    )
    node = Node(cfg, stdout=io.StringIO())
    task = asyncio.create_task(node.run())
    try:
        await asyncio.wait_for(node.ready.wait(), 60)
        ready = tmp_path / "state" / node_id / "ready.json"
        data = json.loads(ready.read_text())
        assert data["address"] == node.address and data["node_id"] == node_id and data["pid"] == os.getpid()

        status = await asyncio.to_thread(_peer, "status", cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        assert f"using {node_id} at {node.address} (from state/{node_id}/ready.json)" in status.stderr
        assert node_id in status.stdout and "state     " in status.stdout

        for args in (["health"], ["health", node.address], ["health", "--addr", node.address]):
            health = await asyncio.to_thread(_peer, *args, cwd=tmp_path)
            assert health.returncode == 0 and "SERVING" in health.stdout, (args, health.stderr)

        listed = await asyncio.to_thread(_peer, "ls", "--no-mdns", "--json", cwd=tmp_path)
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)
        assert [r["node_id"] for r in rows] == [node_id] and rows[0]["status"]["node_id"] == node_id

        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        seen = await asyncio.to_thread(_peer, "ls", "--timeout", "1.5", cwd=elsewhere)
        assert seen.returncode == 0, seen.stderr
        line = next(x for x in seen.stdout.splitlines() if x.startswith(node_id))
        assert node.address in line and "[mdns" in line
    finally:
        node.request_stop()
        await asyncio.wait_for(task, 30)
    assert not (tmp_path / "state" / node_id / "ready.json").exists()
    nothing = await asyncio.to_thread(_peer, "status", "--timeout", "1", cwd=tmp_path / "elsewhere")
    assert nothing.returncode in (0, 1)  # 0 only if another test's daemon on this host answers over mDNS


def test_a_stale_ready_file_is_ignored(tmp_path: Path) -> None:
    """A daemon killed with SIGKILL leaves its ready file; its process is gone, so readers skip it."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    readyfile.write(tmp_path / "state" / "gone", "gone", "127.0.0.1:1", dead.pid)
    readyfile.write(tmp_path / "state" / "live", "live", "127.0.0.1:2", os.getpid())
    assert [r.node_id for r in readyfile.find([tmp_path, tmp_path / "state"])] == ["live"]


@pytest.mark.timeout(60)
async def test_status_says_what_a_lone_daemon_waits_for(tmp_path: Path) -> None:
    """Trap: a lone peer showed `step 0, loss nan` with no hint. Status now says it waits for neighbours."""
    cfg = fast_config(
        tmp_path,
        unique("lone"),
        discovery={"mdns": False, "static_peers": ["127.0.0.1:9"]},
        train={"wait_for_neighbors_s": 30},
    )
    node = Node(cfg, stdout=io.StringIO())
    task = asyncio.create_task(node.run())
    try:
        await asyncio.wait_for(node.ready.wait(), 60)
        await wait_until(lambda: node.worker.waiting_for == "neighbours", 10, "the worker to wait for neighbours")
        status = MessageToDict(
            node.handlers.status(), preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        text = format_status(status)
        assert "waiting for neighbours" in text and "train.wait_for_neighbors_s" in text
        assert "loss - (no step yet)" in text and "nan" not in text
    finally:
        node.request_stop()
        await asyncio.wait_for(task, 30)


def test_waiting_text_covers_catch_up_and_done() -> None:
    base = {"step": "0", "neighbours": [], "info": {"waiting_for": "catch-up"}}
    assert "waiting for catch-up" in waiting_text(base)
    done = {"step": "90", "training_done": True, "neighbours": [], "info": {"waiting_for": ""}}
    assert waiting_text(done).startswith("training done")
    alive = [{"state": "alive"}, {"state": "evicted"}]
    assert (
        waiting_text({"step": "5", "neighbours": alive, "info": {"waiting_for": ""}}) == "training with 1 neighbour(s)"
    )


def test_port_in_use_is_found_before_loading_and_without_grpc_lines(tmp_path: Path) -> None:
    """Trap: a raw `E1205 ... add_port.cc:83]` line, after 2 s of data and model loading. Now the port is
    checked first with a plain socket: one clean line, exit 4, nothing loaded."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        t0 = time.monotonic()
        out = _peer("run", "--set", "node_id=busy", "--set", f"listen=127.0.0.1:{port}", cwd=tmp_path)
        took = time.monotonic() - t0
    assert out.returncode == 4, out.stderr
    assert out.stderr.strip() == f"peer: error: listen: cannot listen on 127.0.0.1:{port}: the port is in use"
    assert "add_port" not in out.stderr and not (tmp_path / "state" / "busy").exists()
    assert took < 30


def test_missing_data_file_names_data_path(tmp_path: Path) -> None:
    """Trap: `nope.npz: data file not found` did not say which key. Data errors now name it."""
    out = _peer("run", "--set", "node_id=a", "--set", "data.path=nope.npz", cwd=tmp_path)
    assert out.returncode == 2
    assert "peer: error: data.path: nope.npz: data file not found" in out.stderr, out.stderr


def test_demo_table_lists_injected_faults_and_counts() -> None:
    """Trap: the fault demo's table did not say which faults were injected, or how many messages they hit."""
    summary = {
        "algorithm": "cdl", "peers": 2, "dataset": "digits", "partition": "shards:2", "topology": "ring",
        "model": "mlp", "epochs": 30.0, "seed": 0, "centralized_accuracy": 0.975, "local_only_accuracy": 0.4,
        "per_peer_accuracy": [0.96, 0.95], "mean_accuracy": 0.955, "min_accuracy": 0.95,
        "consensus_distance": 1e-7, "bytes_sent": 3_000_000, "send_failures": 0, "training_wall_s": 20.0,
        "wall_s": 40.0, "faults": "drop=0.3,flap=peer-0:peer-1:2:2",
        "injected_faults": {"faults_dropped": 120, "faults_outage_dropped": 45, "faults_delayed": 0},
    }  # fmt: skip
    text = demo.format_table(summary)
    assert "fault drop" in text and "0.3" in text and "fault flap" in text and "peer-0:peer-1:2:2" in text
    assert "120 dropped, 45 lost in outages, 0 delayed" in text
    assert re.search(r"faults injected\s+none", demo.format_table({**summary, "faults": ""}))


def test_demo_without_out_keeps_its_plot(tmp_path: Path) -> None:
    """Trap: without --out the plot was deleted with the temporary run dir. Now plot.png and summary.json stay
    (their paths are printed); the bulky per-peer files go."""
    run = tmp_path / "peer-demo-x"
    (run / "peer-0" / "snapshots").mkdir(parents=True)
    for name in ("plot.png", "summary.json", "peer-0.log", "peer-0.yaml"):
        (run / name).write_text("x")
    demo.tidy_temporary_run_dir(run)
    assert sorted(p.name for p in run.iterdir()) == ["plot.png", "summary.json"]
    empty = tmp_path / "failed"
    (empty / "peer-0").mkdir(parents=True)
    demo.tidy_temporary_run_dir(empty)
    assert not empty.exists()
