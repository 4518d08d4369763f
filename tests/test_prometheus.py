"""The Prometheus endpoint: two real daemons gossip, one serves /metrics on port 0; the exposition parses with
prometheus-client's parser, follows the naming rules, and passes `promtool check metrics` where installed."""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from peer.daemon.metrics import Histogram
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
        await until(nodes, lambda: a.counters.step > 0 and a.metrics.path.exists(), 30, "a metrics record")
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
