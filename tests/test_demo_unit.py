"""Unit tests of the pure parts of `peer demo`: consensus distance, snapshot binning, per-peer configs."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest

from peer import config as config_mod
from peer.errors import ConfigError
from peer.net.tls import TlsFiles, load_material
from peer.tools import demo, launcher


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(list(argv))


# ------------------------------------------------------------------------------------------ consensus distance
def test_consensus_distance_identical_vectors_is_zero() -> None:
    v = np.array([1.0, -2.0, 3.0], dtype=np.float32)
    assert demo.consensus_distance([v, v.copy(), v.copy()]) == 0.0


def test_consensus_distance_known_value() -> None:
    # mean (1, 0); deviations (±1, 0) have norm 1 each; ‖mean‖ = 1.
    a = np.array([0.0, 0.0])
    b = np.array([2.0, 0.0])
    assert demo.consensus_distance([a, b]) == pytest.approx(1.0)
    # mean (0, 2); deviations (3, 0) and (-3, 0): mean norm 3, divided by 2.
    assert demo.consensus_distance([np.array([3.0, 2.0]), np.array([-3.0, 2.0])]) == pytest.approx(1.5)


def test_consensus_distance_mixed_norms() -> None:
    vs = [np.array([1.0, 1.0]), np.array([1.0, 3.0]), np.array([4.0, 2.0])]
    mean = np.mean(vs, axis=0)
    expected = np.mean([np.linalg.norm(v - mean) for v in vs]) / np.linalg.norm(mean)
    assert demo.consensus_distance(vs) == pytest.approx(expected)


def test_consensus_distance_is_scale_invariant_and_flattens() -> None:
    rng = np.random.default_rng(0)
    vs = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(4)]
    d = demo.consensus_distance(vs)
    assert d > 0
    assert demo.consensus_distance([10 * v for v in vs]) == pytest.approx(d, rel=1e-6)


def test_consensus_distance_zero_mean() -> None:
    assert demo.consensus_distance([np.zeros(3), np.zeros(3)]) == 0.0
    assert math.isinf(demo.consensus_distance([np.array([1.0]), np.array([-1.0])]))
    with pytest.raises(ValueError):
        demo.consensus_distance([])


# ------------------------------------------------------------------------------------------- snapshot binning
def _snap(ms: int, step: int = 0) -> demo.Snapshot:
    return demo.Snapshot(ms, step, Path(f"{ms:015d}_{step:09d}.npy"))


def test_parse_snapshot_name() -> None:
    s = demo.parse_snapshot_name(Path("/x/snapshots/001700000000123_000000042.npy"))
    assert s is not None and (s.unix_ms, s.step) == (1700000000123, 42)
    assert demo.parse_snapshot_name(Path(".001700000000123_000000042.npy.tmp")) is None
    assert demo.parse_snapshot_name(Path(".001700000000123_000000042.npy")) is None
    assert demo.parse_snapshot_name(Path("001700000000123_000000042.txt")) is None
    assert demo.parse_snapshot_name(Path("notes.npy")) is None


def test_list_snapshots_sorted_and_skips_temporaries(tmp_path: Path) -> None:
    snaps = tmp_path / "snapshots"
    snaps.mkdir()
    for ms in (3000, 1000, 2000):
        np.save(snaps / f"{ms:015d}_{ms // 100:09d}.npy", np.zeros(2, dtype=np.float32))
    (snaps / f".{4000:015d}_{40:09d}.npy.tmp").write_bytes(b"")
    assert [s.unix_ms for s in demo.list_snapshots(tmp_path)] == [1000, 2000, 3000]
    assert demo.list_snapshots(tmp_path / "missing") == []


def test_bin_snapshots_keeps_complete_bins_and_latest_per_peer() -> None:
    t0 = 1_700_000_000_000
    per_peer = {
        "a": [_snap(t0 + 0), _snap(t0 + 400), _snap(t0 + 1200), _snap(t0 + 3100)],
        "b": [_snap(t0 + 100), _snap(t0 + 1900), _snap(t0 + 2500)],
    }
    bins = demo.bin_snapshots(per_peer, bin_s=1.0)
    # bin 0: both (a's latest is +400); bin 1: both; bin 2: only b; bin 3: only a.
    assert [t for t, _ in bins] == [0.0, 1.0]
    assert bins[0][1]["a"].unix_ms == t0 + 400
    assert bins[0][1]["b"].unix_ms == t0 + 100
    assert bins[1][1]["a"].unix_ms == t0 + 1200
    assert bins[1][1]["b"].unix_ms == t0 + 1900


def test_bin_snapshots_relative_to_earliest_and_bin_width() -> None:
    t0 = 5_000
    per_peer = {"a": [_snap(t0 + 600), _snap(t0 + 1600)], "b": [_snap(t0 + 500), _snap(t0 + 1000)]}
    # Relative to the earliest (t0 + 500): a at 0.1 s and 1.1 s, b at 0 s and 0.5 s.
    assert [t for t, _ in demo.bin_snapshots(per_peer, bin_s=1.0)] == [0.0]
    bins = demo.bin_snapshots(per_peer, bin_s=0.5)
    assert [t for t, _ in bins] == [0.0]
    assert [t for t, _ in demo.bin_snapshots(per_peer, bin_s=2.0)] == [0.0]


def test_bin_snapshots_empty_inputs() -> None:
    assert demo.bin_snapshots({}) == []
    assert demo.bin_snapshots({"a": [], "b": []}) == []
    assert demo.bin_snapshots({"a": [_snap(1000)], "b": []}) == []
    with pytest.raises(ValueError):
        demo.bin_snapshots({"a": [_snap(1)]}, bin_s=0)


# --------------------------------------------------------------------------------------------- peer configs
def test_peer_config_defaults_validate(tmp_path: Path) -> None:
    args = _args()
    cfgs = [config_mod.validate(demo.peer_config(args, i, tmp_path), source="test") for i in range(args.peers)]
    assert [c.node_id for c in cfgs] == [f"peer-{i}" for i in range(args.peers)]
    assert len({c.state_dir for c in cfgs}) == args.peers
    for i, c in enumerate(cfgs):
        assert c.listen == "127.0.0.1:0"
        assert c.discovery.mdns is True
        assert c.discovery.interfaces == ["127.0.0.1"]
        assert c.discovery.static_peers == []
        assert c.data.num_partitions == args.peers and c.data.partition_index == i
        assert c.data.dataset == "digits" and c.data.partition == "shards:2"
        assert c.algorithm.name == "cdl" and c.topology == "ring" and c.model.name == "mlp"
        assert c.metrics.snapshot_interval_s > 0
        assert c.train.wait_for_neighbors_s > 0
        assert Path(c.state_dir).parent == tmp_path
    # Same seeds everywhere: identical initial models and the same data split.
    assert len({(c.data.seed, c.model.seed, c.train.seed) for c in cfgs}) == 1


def test_peer_config_options_and_overrides(tmp_path: Path) -> None:
    args = _args(
        "--peers", "3", "--algorithm", "none", "--topology", "full", "--dataset", "mnist1d", "--partition", "iid",
        "--model", "logreg", "--epochs", "2.5", "--seed", "7",
        "--set", "train.lr=0.01", "--set", "gossip.rpc_timeout_s=9", "--set", "log.level=debug",
    )  # fmt: skip
    c = config_mod.validate(demo.peer_config(args, 2, tmp_path), source="test")
    assert c.node_id == "peer-2" and c.data.partition_index == 2 and c.data.num_partitions == 3
    assert c.algorithm.name == "none" and c.topology == "full"
    assert (c.data.dataset, c.data.partition, c.model.name) == ("mnist1d", "iid", "logreg")
    assert c.train.epochs == 2.5 and c.train.lr == 0.01
    assert (c.data.seed, c.model.seed, c.train.seed) == (7, 7, 7)
    assert c.gossip.rpc_timeout_s == 9 and c.log.level == "debug"


@pytest.mark.parametrize(
    "key", ["node_id", "state_dir", "listen", "data.partition_index", "data.num_partitions", "security.ca_file"]
)
def test_peer_config_refuses_overrides_of_per_peer_keys(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError):
        demo.peer_config(_args("--set", f"{key}=1"), 0, tmp_path)


def test_peer_config_bad_override_is_a_config_error(tmp_path: Path) -> None:
    raw = demo.peer_config(_args("--set", "train.no_such_field=1"), 0, tmp_path)
    with pytest.raises(ConfigError, match="no_such_field"):
        config_mod.validate(raw, source="test")


def test_build_configs_writes_loadable_yaml(tmp_path: Path) -> None:
    args = _args("--peers", "2")
    written = demo.build_configs(args, tmp_path)
    assert [p.name for p, _ in written] == ["peer-0.yaml", "peer-1.yaml"]
    for path, cfg in written:
        assert config_mod.load(path) == cfg  # `peer run --config path` sees the same config
        # Mutual TLS with the run's throwaway CA, whose certificate names the peer.
        assert cfg.security.tls and Path(cfg.security.ca_file) == tmp_path / "pki" / "ca.pem"
        files = TlsFiles(cfg.security.ca_file, cfg.security.cert_file, cfg.security.key_file)
        assert load_material(files, node_id=cfg.node_id).node_ids == (cfg.node_id,)
    # One cluster name for the run's peers, and a new one per run: concurrent demos ignore each other.
    clusters = {cfg.discovery.cluster for _, cfg in written}
    assert len(clusters) == 1
    again = demo.build_configs(args, tmp_path / "again")
    assert {cfg.discovery.cluster for _, cfg in again}.isdisjoint(clusters)
    pinned = demo.build_configs(_args("--peers", "2", "--set", "discovery.cluster=lab"), tmp_path / "pinned")
    assert {cfg.discovery.cluster for _, cfg in pinned} == {"lab"}


# ------------------------------------------------------------------------------------------------- progress
def test_last_metrics_reads_last_complete_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    assert launcher.last_metrics(path) is None
    lines = [json.dumps({"step": i}) for i in range(3)]
    path.write_text("\n".join(lines) + '\n{"step": 3, "tor', encoding="utf-8")
    assert launcher.last_metrics(path) == {"step": 2}


def test_progress_line_and_foreign_neighbours() -> None:
    recs = [
        {"epoch": 12.34, "training_done": False, "neighbours": ["peer-1", "peer-2"], "bytes_sent": 2_000_000},
        {"epoch": 30.0, "training_done": True, "neighbours": ["peer-0", "stranger"], "bytes_sent": 1_400_000},
        None,
    ]
    line = launcher.progress_line(recs, ["peer-0", "peer-1", "peer-2"], 30)
    assert "training" in line and "peer-0 12.3/30" in line and "peer-1 done" in line and "peer-2 -" in line
    assert "neighbours 2/2/-" in line and "3.4 MB" in line
    assert launcher.foreign_neighbours(recs, ["peer-0", "peer-1", "peer-2"]) == {"stranger"}


def test_format_table_prints_percent() -> None:
    summary = {
        "algorithm": "cdl", "peers": 2, "dataset": "digits", "partition": "shards:2", "topology": "ring",
        "model": "mlp", "epochs": 30.0, "seed": 0, "centralized_accuracy": 0.975, "local_only_accuracy": 0.4,
        "per_peer_accuracy": [0.96, 0.95], "mean_accuracy": 0.955, "min_accuracy": 0.95,
        "consensus_distance": 1e-7, "bytes_sent": 3_000_000, "send_failures": 0, "training_wall_s": 20.0,
        "wall_s": 40.0,
    }  # fmt: skip
    text = demo.format_table(summary)
    assert "97.50%" in text and "40.00%" in text and "95.50%" in text and "peer-1" in text


def test_single_peer_does_not_look_for_neighbours(tmp_path: Path) -> None:
    """A demo of one turns discovery off; the daemon then waits for no one (peer.daemon.node)."""
    c = config_mod.validate(demo.peer_config(_args("--peers", "1"), 0, tmp_path), source="test")
    assert c.discovery.mdns is False and c.discovery.static_peers == []


def test_clear_state_dir_removes_only_demo_state(tmp_path: Path) -> None:
    old = tmp_path / "peer-0"
    (old / "snapshots").mkdir(parents=True)
    for name in ("checkpoint.pt", "metrics.jsonl", "config.yaml", ".checkpoint.pt.tmp-1", "checkpoint.pt.discarded.0"):
        (old / name).write_text("x")
    demo._clear_state_dir(old)
    assert not old.exists()
    demo._clear_state_dir(tmp_path / "missing")  # nothing to do
    other = tmp_path / "peer-1"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(demo.DemoError):
        demo._clear_state_dir(other)
    assert (other / "thesis.tex").exists()
    (tmp_path / "peer-2").write_text("a file")
    with pytest.raises(demo.DemoError):
        demo._clear_state_dir(tmp_path / "peer-2")


@pytest.mark.parametrize("argv", [["--dataset", "cifar"], ["--partition", "bogus:3"], ["--model", "resnet"]])
def test_build_configs_rejects_bad_names_early(tmp_path: Path, argv: list[str]) -> None:
    with pytest.raises(ConfigError):
        demo.build_configs(_args(*argv), tmp_path)
