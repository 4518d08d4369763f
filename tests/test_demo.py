"""`peer demo` end to end, as a user runs it: real processes, mDNS on loopback, gRPC, references, JSON, plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REQUIRED_KEYS = {
    "algorithm",
    "peers",
    "dataset",
    "partition",
    "topology",
    "centralized_accuracy",
    "local_only_accuracy",
    "mean_accuracy",
    "min_accuracy",
    "consensus_distance",
    "bytes_sent",
    "send_failures",
    "wall_s",
}


@pytest.mark.timeout(240)
def test_small_demo_runs_end_to_end(tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    result_path = tmp_path / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "peer",
            "demo",
            "--peers",
            "3",
            "--epochs",
            "8",
            "--model",
            "logreg",
            "--json",
            str(result_path),
            "--out",
            str(out_dir),
            "--timeout-s",
            "200",
        ],
        capture_output=True,
        text=True,
        timeout=230,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert set(result) >= REQUIRED_KEYS
    assert result["peers"] == 3 and result["algorithm"] == "cdl" and result["partition"] == "shards:2"
    assert result["send_failures"] == 0 and result["bytes_sent"] > 0
    # Even a short run must beat isolated training by a wide margin and reach consensus.
    assert result["mean_accuracy"] > result["local_only_accuracy"] + 0.25, result
    assert result["consensus_distance"] < 1e-3
    assert "centralized" in proc.stdout and "decentralized mean" in proc.stdout
    assert (out_dir / "plot.png").stat().st_size > 10_000
    for i in range(3):
        # Every peer ran with mutual TLS, on the run's throwaway CA.
        assert "mutual TLS: certificate" in (out_dir / f"peer-{i}.log").read_text()
    assert (out_dir / "pki" / "ca.pem").exists()
