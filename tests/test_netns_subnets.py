"""A fleet over two subnets: two bridges joined by a router namespace (unicast is forwarded, multicast is not, so
each subnet's mDNS sees only its own half), and one static seed address on the other side. Peer exchange must
give every daemon every other as a member. Prints the discovery time. Root only; skipped elsewhere."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from peer.tools.testbed import Testbed, TestbedError, cleanup, netns_unavailable
from tests.helpers import unique

# About 75 s on a loaded 2-core machine (four daemons start): run with `scripts/test --slow`. The same scenario over
# protocol cores in memory stays in CI (tests/test_peer_exchange.py).
pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(150)]

N = 4  # h0, h1 on 198.18.0.0/24; h2, h3 on 198.18.1.0/24
BASE: dict[str, Any] = {
    "model": {"name": "logreg"},
    "data": {"dataset": "digits", "partition": "shards:2", "num_partitions": N},
    "train": {"epochs": 1000, "torch_threads": 1, "round_interval_s": 0.05},
    "membership": {"heartbeat_interval_s": 0.5},
}
DISCOVERY_BUDGET_S = 10.0


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def alive_members(status: dict[str, Any]) -> set[str]:
    return {n["node_id"] for n in status["neighbours"] if n["state"] == "alive"}


def test_two_subnets_one_seed_every_member_finds_every_member(tmp_path: Path) -> None:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(f"network namespaces unavailable: {reason}")
    cleanup()
    seed = {0: {"discovery": {"static_peers": [f"198.18.1.{N // 2 + 1}:50051"]}}}  # h0 knows h2's address
    tb = Testbed(unique("sn"), N, tmp_path / "tb", BASE, host_overrides=seed, subnets=2)
    assert [tb.address(i) for i in range(N)] == [f"198.18.{int(i >= N // 2)}.{i + 1}:50051" for i in range(N)]
    assert tb.address(N // 2) == seed[0]["discovery"]["static_peers"][0]
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        tb.up()
        for i in range(N):
            tb.start(i)
        tb.warm_status_clients()
        for i in range(N):
            tb.ready(i, timeout_s=90)
        ready_at = [t for t in (tb.ready_at(i) for i in range(N)) if t is not None]
        everyone = {tb.node_id(i) for i in range(N)}
        full: dict[int, float] = {}
        deadline = time.monotonic() + 60
        while len(full) < N:
            for i in range(N):
                try:
                    if i not in full and alive_members(tb.quick_status(i)) == everyone - {tb.node_id(i)}:
                        full[i] = time.monotonic()
                except TestbedError:
                    pass  # not answering yet
            if time.monotonic() > deadline:
                views = {i: sorted(alive_members(tb.quick_status(i))) for i in range(N)}
                raise AssertionError(f"no full view within 60 s: {views}")
            time.sleep(0.05)
        elapsed = max(full.values()) - max(ready_at)
        print(
            f"\nnetns two subnets, one seed: all {N - 1} others in every view {elapsed:.2f} s after the last ready line"
        )
        assert elapsed <= DISCOVERY_BUDGET_S
        # The far side was reached through the router: h1 (subnet A, no seed) gossips with h3 (subnet B).
        assert tb.quick_status(1)["neighbours"] and tb.node_id(N - 1) in alive_members(tb.quick_status(1))
    finally:
        try:
            tb.down()
        finally:
            signal.signal(signal.SIGTERM, previous)
        assert not tb.own_namespaces()
