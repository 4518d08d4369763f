"""`peer report` on the state dirs of a real two-daemon run: with snapshots (accuracy and consensus distance
over time) and without (the daemons' local consensus estimate and each final checkpoint's accuracy)."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
from pathlib import Path

import pytest

from peer.cli import main
from peer.daemon.node import Node
from peer.errors import DataError
from peer.tools.report import write_report
from tests.helpers import fast_config, start_nodes, stop_nodes, unique, until

PNG = b"\x89PNG\r\n\x1a\n"
FILES = ("loss.png", "bytes.png", "consensus.png", "accuracy.png")


async def test_report_of_a_real_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    snap = {"train.epochs": 50, "metrics.snapshot_interval_s": 0.2}
    a = Node(fast_config(run, unique("a"), **snap), stdout=io.StringIO())
    tasks = await start_nodes([a])
    b = Node(fast_config(run, unique("b"), **snap, **{"discovery.static_peers": [a.address]}), stdout=io.StringIO())
    tasks += await start_nodes([b])
    nodes = [a, b]
    try:
        await until(
            nodes,
            lambda: (
                all(n.counters.mixes >= 5 and len(list((n.state_dir / "snapshots").glob("*.npy"))) >= 3 for n in nodes)
                and all(sum(1 for _ in n.metrics.path.open()) >= 4 for n in nodes)
            ),
            90,
            "mixes, snapshots and metrics records on both peers",
        )
    finally:
        await stop_nodes(nodes, tasks)
    dirs = [str(n.state_dir) for n in nodes]

    out = tmp_path / "report"
    code = await asyncio.to_thread(main, ["report", *dirs, "--out", str(out)])
    assert code == 0
    for name in FILES:
        assert (out / name).read_bytes().startswith(PNG), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["consensus_distance"] == "snapshots"
    assert summary["final_consensus_distance"] is not None
    peers = {p["node_id"]: p for p in summary["peers"]}
    assert set(peers) == {a.cfg.node_id, b.cfg.node_id}
    for p in peers.values():
        assert p["step"] > 0 and p["bytes_sent"] > 0 and 0.0 < p["accuracy"] <= 1.0

    # The same run without snapshots (a daemon that never kept any), from copied state dirs.
    bare = []
    for d in dirs:
        copy = tmp_path / "bare" / Path(d).name
        shutil.copytree(d, copy, ignore=shutil.ignore_patterns("snapshots"))
        bare.append(copy)
    summary = await asyncio.to_thread(write_report, bare, tmp_path / "report2")
    assert summary["consensus_distance"] == "local estimate"  # cdl's algo_neighbour_distance in metrics.jsonl
    assert all(p["accuracy"] is not None for p in summary["peers"])
    for name in FILES:
        assert (tmp_path / "report2" / name).read_bytes().startswith(PNG), name


def test_report_refuses_a_directory_that_is_not_a_state_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"metrics\.jsonl"):
        write_report([tmp_path], tmp_path / "out")
