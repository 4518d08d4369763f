"""Pacing with real daemons: when local steps are ~10x faster than the network mixes, the bound on steps since
the last merge keeps the consensus model as good as a run whose steps are slow enough for gossip to keep up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# Every push waits 10 ms in the fault layer; an MLP step on digits takes about 1 ms here, so the fast run steps
# about 10x faster than it mixes. The slow run slows every step 10x (faults.slowdown), so gossip keeps up.
DELAY = "delay=const:0.01"
COMMON = ["--peers", "4", "--epochs", "30", "--seed", "0", "--timeout-s", "200"]


def demo(tmp_path: Path, name: str, *extra: str) -> dict[str, Any]:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "peer", "demo", *COMMON, "--faults", DELAY, "--json", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=230,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return result


@pytest.mark.timeout(480)
def test_steps_ten_times_faster_than_mixing_cost_at_most_one_point(tmp_path: Path) -> None:
    fast = demo(tmp_path, "fast")
    slow = demo(tmp_path, "slow", "--set", "faults.slowdown=10")
    gap = 100 * (slow["mean_accuracy"] - fast["mean_accuracy"])
    # The figures the issue asks for (seen with -s); the assertion below is the property.
    print(f"\npacing: fast steps {fast['mean_accuracy']:.2%}, 10x slowed steps {slow['mean_accuracy']:.2%}")
    assert gap <= 1.0, f"fast steps {fast['mean_accuracy']:.2%} vs slow steps {slow['mean_accuracy']:.2%}"
    assert fast["injected_faults"]["faults_delayed"] > 0
