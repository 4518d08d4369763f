"""The Prometheus endpoint: two real daemons gossip, one serves /metrics on port 0; the exposition parses with
prometheus-client's parser, follows the naming rules, and passes `promtool check metrics` where installed."""

from __future__ import annotations

import asyncio
import io
import json
import math
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from peer.daemon.exporter import PeerCollector
from peer.daemon.metrics import Counters, Histogram
from peer.daemon.node import Node
from peer.errors import StartupError
from tests.helpers import fast_config, start_nodes, stop_nodes, unique, until


def _scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return resp.read().decode()


def test_histogram_buckets_are_cumulative() -> None:
    h = Histogram(bounds=(0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.cumulative() == [(0.1, 2), (1.0, 3), (float("inf"), 4)]
    assert h.total == pytest.approx(3.65)


def _mixed_in_latest_record(node: Node) -> bool:
    """The exporter serves the newest metrics record: wait for one written after a mixing round."""
    if not node.metrics.path.exists():
        return False
    lines = node.metrics.path.read_text(encoding="utf-8").splitlines()
    try:
        distance = json.loads(lines[-1]).get("algo_neighbour_distance") if lines else None
    except json.JSONDecodeError:  # a record being written
        return False
    return isinstance(distance, (int, float)) and math.isfinite(distance)


async def test_metrics_endpoint(tmp_path: Path) -> None:
    cluster = unique("prom")
    a = Node(
        fast_config(
            tmp_path,
            unique("a"),
            **{"metrics.listen": "127.0.0.1:0", "train.epochs": 50, "discovery.cluster": cluster},
        ),
        stdout=io.StringIO(),
    )
    tasks = await start_nodes([a])
    b = Node(
        fast_config(tmp_path, unique("b"), **{"train.epochs": 50, "discovery.static_peers": [a.address]}),
        stdout=io.StringIO(),
    )
    tasks += await start_nodes([b])
    nodes = [a, b]
    try:
        assert a.metrics_address.startswith("127.0.0.1:") and not a.metrics_address.endswith(":0")
        ready = a.stdout.getvalue()  # type: ignore[attr-defined]
        assert f'"metrics_address": "{a.metrics_address}"' in ready
        assert not b.metrics_address and "metrics_address" not in b.stdout.getvalue()  # type: ignore[attr-defined]
        await until(
            nodes,
            lambda: a.counters.messages_sent >= 3 and a.counters.mixes >= 3 and len(a.core.neighbours()) == 1,
            60,
            "a to push to and mix with b",
        )
        await until(nodes, lambda: _mixed_in_latest_record(a), 30, "a metrics record written after a mix")
        text = await asyncio.to_thread(_scrape, a.metrics_address)
    finally:
        await stop_nodes(nodes, tasks)

    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in [
        ("peer_bytes_sent", "counter"),
        ("peer_steps", "counter"),
        ("peer_rejected_messages", "counter"),
        ("peer_push_duration_seconds", "histogram"),
        ("peer_neighbors", "gauge"),
        ("peer_train_loss", "gauge"),
        ("peer_eval_accuracy", "gauge"),
        ("peer_consensus_distance", "gauge"),
        ("peer_pace_waits", "counter"),
    ]:
        assert name in families, f"{name} missing from:\n{text}"
        assert families[name].type == kind, (name, families[name].type)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("peer_bytes_sent_total", ())] > 0
    assert samples[("peer_steps_total", ())] > 0
    assert samples[("peer_neighbors", (("state", "alive"),))] == 1
    assert samples[("peer_neighbors", (("state", "evicted"),))] == 0
    assert samples[("peer_push_duration_seconds_count", (("outcome", "ok"),))] >= 3
    assert samples[("peer_push_duration_seconds_bucket", (("le", "+Inf"), ("outcome", "ok")))] >= 3
    assert 0 <= samples[("peer_consensus_distance", ())] < 10
    assert "# TYPE peer_bytes_sent_total counter" in text

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus); the parser checks passed")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_metrics_port_in_use_is_a_startup_error(tmp_path: Path) -> None:
    a = Node(fast_config(tmp_path, unique("a"), **{"metrics.listen": "127.0.0.1:0"}), stdout=io.StringIO())
    tasks = await start_nodes([a])
    try:
        b = Node(fast_config(tmp_path, unique("b"), **{"metrics.listen": a.metrics_address}), stdout=io.StringIO())
        with pytest.raises(StartupError, match=r"metrics\.listen"):
            await asyncio.wait_for(b.run(), 60)
    finally:
        await stop_nodes([a], tasks)


def _exposed_names() -> set[str]:
    """Every sample name the collector exposes, with a record as the loop publishes it."""
    counters = Counters(step=5, bytes_sent=10, loss=0.5)
    counters.reject("undecodable")
    counters.observe_push("ok", 0.01)
    collector = PeerCollector("n1", "cdl", counters, started=0.0)
    record = {"neighbours": ["n2"], "algo_neighbour_distance": 0.1, "pace_waits": 1, "pace_wait_s": 0.5}
    collector.publish({**record, "pace_missed_deadlines": 0, "pace_gap_s": 0.1, "pace_steps_per_s": 9.0}, {"alive": 1})
    return {s.name for family in collector.collect() for s in family.samples}


def test_grafana_dashboard_queries_exposed_metrics() -> None:
    root = Path(__file__).resolve().parents[1]
    dashboard = json.loads((root / "deploy" / "grafana" / "peer-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs and dashboard["uid"] == "peer-fleet"
    used = {m for e in exprs for m in re.findall(r"\bpeer_[a-z_]+", e)}
    exposed = _exposed_names()
    assert used <= exposed, f"the dashboard queries metrics the daemon does not expose: {sorted(used - exposed)}"
    for name in ("peer_bytes_sent_total", "peer_train_loss", "peer_consensus_distance", "peer_neighbors"):
        assert name in used, name
    promtool = shutil.which("promtool")
    if promtool is not None:
        cfg = root / "deploy" / "prometheus" / "prometheus.yml"
        result = subprocess.run([promtool, "check", "config", str(cfg)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr
