"""Pacing with real daemons: when local steps are ~10x faster than the network mixes, the bound on steps since
the last merge keeps the consensus model as good as a run whose steps are slow enough for gossip to keep up.

The issue's property is "within 1 point". One point is about one binomial standard error of an accuracy near 96%
on the 360 test digits (sqrt(0.96 * 0.04 / 360) = 1.0 point), and two asynchronous runs differ by about as much
from timing alone, so a single pair of runs cannot resolve it without failing by chance (CI once saw 94.99% against
96.10%). Both are `--slow` (two or six full demos): one pair allowing 3 points, which still catches the failure
this guards against (steps outrunning gossip: local training followed by averaging, 49% before pacing), and the
property itself on the mean gap over three seeds. CI keeps the two-daemon lost-message test at the end."""

from __future__ import annotations

import io
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from peer.daemon.node import Node
from tests.helpers import fast_config, start_nodes, stop_nodes, unique, until

# Every push waits 10 ms in the fault layer; an MLP step on digits takes about 1 ms here, so the fast run steps
# about 10x faster than it mixes. The slow run slows every step 10x (faults.slowdown), so gossip keeps up.
DELAY = "delay=const:0.01"
COMMON = ["--peers", "4", "--epochs", "30", "--timeout-s", "200"]


def demo(tmp_path: Path, name: str, seed: int, *extra: str) -> dict[str, Any]:
    out = tmp_path / f"{name}-{seed}.json"
    cmd = [sys.executable, "-m", "peer", "demo", *COMMON, "--seed", str(seed), "--faults", DELAY, "--json", str(out)]
    proc = subprocess.run(
        [*cmd, *extra],
        capture_output=True,
        text=True,
        timeout=230,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def gap_points(tmp_path: Path, seed: int) -> float:
    """Accuracy of the slow-step run minus that of the fast-step run, in points."""
    fast = demo(tmp_path, "fast", seed)
    slow = demo(tmp_path, "slow", seed, "--set", "faults.slowdown=10")
    # The figures the issue asks for (seen with -s).
    print(
        f"\npacing, seed {seed}: fast steps {fast['mean_accuracy']:.2%}, 10x slowed steps {slow['mean_accuracy']:.2%}"
    )
    assert fast["injected_faults"]["faults_delayed"] > 0
    # Pacing did the work: the fast peers were held for fresh neighbour state.
    assert fast["pace_waits"] > 0, fast
    return 100 * (slow["mean_accuracy"] - fast["mean_accuracy"])


@pytest.mark.slow  # two full demos (~2 min); CI keeps the lost-message pacing test below and tests/test_demo.py
@pytest.mark.timeout(480)
def test_steps_ten_times_faster_than_mixing_cost_no_more_than_run_to_run_noise(tmp_path: Path) -> None:
    gap = gap_points(tmp_path, seed=0)
    assert gap <= 3.0, f"fast steps lost {gap:.2f} points against slowed steps"


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_steps_ten_times_faster_than_mixing_cost_at_most_one_point_on_average(tmp_path: Path) -> None:
    gaps = [gap_points(tmp_path, seed) for seed in (0, 1, 2)]
    print(f"\npacing gaps (points, slow minus fast): {[round(g, 2) for g in gaps]}")
    assert statistics.mean(gaps) <= 1.0, gaps


@pytest.mark.timeout(90)
async def test_a_lost_message_does_not_stall_two_waiting_peers(tmp_path: Path) -> None:
    """Both peers drop 30% of their pushes silently. Until a peer has seen a neighbour step, it waits for it up to
    `train.wait_for_neighbors_s` (30 s); before, a lost first message left both ends waiting that long for each
    other (30% drops and a flapping link: 43.7% in the demo). A peer held by pacing now sends its state again
    every 0.1 s, so a lost message costs about that."""
    base = unique("lost")
    common: dict[str, Any] = {
        "catchup": {"enabled": False},
        "train": {"epochs": 50, "steps_per_round": 1, "wait_for_neighbors_s": 30.0},
    }
    a = Node(
        fast_config(tmp_path, f"{base}-a", faults={"drop_probability": 0.3, "seed": 1}, **common), stdout=io.StringIO()
    )
    tasks = await start_nodes([a])
    b = Node(
        fast_config(
            tmp_path,
            f"{base}-b",
            faults={"drop_probability": 0.3, "seed": 2},
            discovery={"static_peers": [a.address]},
            **common,
        ),
        stdout=io.StringIO(),
    )
    tasks += await start_nodes([b])
    try:
        await until([a, b], lambda: min(a.trainer.step_count, b.trainer.step_count) >= 60, 25, "60 steps each")
        assert a.faults.counters["dropped"] + b.faults.counters["dropped"] > 5  # messages were lost
        assert a.worker.pacer.waits > 0 and b.worker.pacer.waits > 0
        waited = a.worker.pacer.wait_s_total + b.worker.pacer.wait_s_total
        assert waited < 15.0, f"the peers waited {waited:.1f} s in all for each other"
    finally:
        await stop_nodes([a, b], tasks, return_exceptions=True)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("algorithm", ["cdl", "dpsgd"])  # mix mode; round-synchronous (idle rounds, zero gradient)
async def test_a_peer_with_half_the_data_finishes_with_its_neighbour(tmp_path: Path, algorithm: str) -> None:
    """train.finish_together with two real daemons: b holds half of a's data, so half its steps per run. Without
    the rule b finishes when a is halfway, and a trains alone on its own data for the second half; with it b's
    steps spread over a's whole run (b mixes without stepping while it is ahead), and they finish together."""
    base = unique(f"together-{algorithm}")
    algo = {"name": algorithm}
    train = {"epochs": 6, "steps_per_round": 1, "round_interval_s": 0.0, "wait_for_neighbors_s": 30.0}
    a = Node(
        fast_config(tmp_path, f"{base}-a", catchup={"enabled": False}, train=train, algorithm=algo),
        stdout=io.StringIO(),
    )
    tasks = await start_nodes([a])
    b = Node(
        fast_config(
            tmp_path,
            f"{base}-b",
            catchup={"enabled": False},
            train=train,
            algorithm=algo,
            data={"num_partitions": 2, "partition_index": 1},
            discovery={"static_peers": [a.address]},
        ),
        stdout=io.StringIO(),
    )
    tasks += await start_nodes([b])
    try:
        assert b.worker.total_steps * 1.5 < a.worker.total_steps
        done = (a.counters, b.counters)
        await until([a, b], lambda: any(c.training_done for c in done), 60, "a peer to finish training")
        fractions = [n.trainer.step_count / n.worker.total_steps for n in (a, b)]
        assert min(fractions) > 0.9, f"one peer finished when the other was at {min(fractions):.0%} of its run"
        print(
            fractions,
            a.worker.pacer.metrics(),
            a.worker.pacer.idle_turns,
            b.worker.pacer.metrics(),
            b.worker.pacer.idle_turns,
            a.counters.training_s,
        )
        # Which rule held whom depends on timing (b idles when ahead; a, stretched for b's coarser steps, waits
        # when it leads), so only the outcome is asserted; with the rule off this fails (79% cdl, 58% dpsgd).
        assert "pace_idle_s" in a.worker.pacer.metrics()
    finally:
        await stop_nodes([a, b], tasks, return_exceptions=True)


@pytest.mark.timeout(90)
async def test_digest_peers_move_together_though_a_token_comes_from_one_neighbour(tmp_path: Path) -> None:
    """DIGEST's fresh state is a token from whichever neighbour the walk came from. Pacing once waited for every
    neighbour, so at each deadline a peer marked the others late and ran free: in the demo one peer finished while
    the others were at 10% to 25% of their runs (53% accuracy). Pooled, a token from any neighbour is fresh state
    and its holder always steps: three peers, each with two neighbours, stay within a few token visits."""
    base = unique("digest-pool")
    common: dict[str, Any] = {
        "catchup": {"enabled": False},
        "algorithm": {"name": "digest"},
        "train": {"epochs": 16, "steps_per_round": 1, "round_interval_s": 0.0, "wait_for_neighbors_s": 30.0},
    }
    # mDNS on (though nobody else announces): a peer with no way to find anyone starts training alone at once, and
    # this one waits for the three members its data split implies, which it learns from the others' Hellos.
    first = Node(
        fast_config(tmp_path, f"{base}-0", data={"num_partitions": 3}, discovery={"mdns": True}, **common),
        stdout=io.StringIO(),
    )
    tasks = await start_nodes([first])
    nodes = [first]
    for i in (1, 2):
        peer = Node(
            fast_config(
                tmp_path,
                f"{base}-{i}",
                data={"num_partitions": 3, "partition_index": i},
                discovery={"static_peers": [n.address for n in nodes]},
                **common,
            ),
            stdout=io.StringIO(),
        )
        tasks += await start_nodes([peer])
        nodes.append(peer)
    try:
        await until(nodes, lambda: all(len(n.core.neighbours()) == 2 for n in nodes), 20, "a full mesh of three")
        await until(nodes, lambda: any(n.counters.training_done for n in nodes), 60, "a peer to finish training")
        fractions = [n.trainer.step_count / n.worker.total_steps for n in nodes]
        # Measured: 0.73 or more with pooling (0.73 under the parallel suite), 0.07 without.
        assert min(fractions) > 0.5, f"one peer finished when another was at {min(fractions):.0%} of its run"
        # Pacing held the peers for the walk; not necessarily each one (a peer the token visits often need not wait).
        assert sum(n.worker.pacer.waits for n in nodes) > 0
    finally:
        await stop_nodes(nodes, tasks, return_exceptions=True)
