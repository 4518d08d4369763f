"""One set of defaults: `peer demo` sets only what makes it a demo (peers, data, epochs, seed, snapshots), never
a training, gossip, membership or algorithm value that `peer run` would not get by default."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from peer.algorithms import REGISTRY
from peer.config import CatchupConfig, GossipConfig, MembershipConfig, TrainConfig
from peer.tools.demo_config import add_arguments, peer_config

# What makes a run a demo: how long it trains and with which seed (both are `peer demo` arguments).
DEMO_KEYS = {"train.epochs", "train.seed"}
SECTIONS = {
    "train": TrainConfig(),
    "gossip": GossipConfig(),
    "membership": MembershipConfig(),
    "catchup": CatchupConfig(),
}


def demo_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def differences(raw: dict[str, Any], algorithm: str) -> list[str]:
    out = []
    for section, defaults in SECTIONS.items():
        for key, value in raw.get(section, {}).items():
            if f"{section}.{key}" not in DEMO_KEYS and getattr(defaults, key) != value:
                out.append(f"{section}.{key}={value!r} (default {getattr(defaults, key)!r})")
    params = REGISTRY[algorithm].params_type(name=algorithm)
    for key, value in raw.get("algorithm", {}).items():
        if key != "name" and getattr(params, key) != value:
            out.append(f"algorithm.{key}={value!r} (default {getattr(params, key)!r})")
    return out


@pytest.mark.parametrize("algorithm", sorted(REGISTRY))
@pytest.mark.parametrize("peers", [1, 4])
def test_the_demo_gives_no_key_a_value_the_daemon_does_not(algorithm: str, peers: int, tmp_path: Path) -> None:
    args = demo_args("--algorithm", algorithm, "--peers", str(peers), "--faults", "drop=0.1")
    for i in range(peers):
        raw = peer_config(args, i, tmp_path)
        assert not differences(raw, algorithm), f"peer-{i} of the {algorithm} demo: {differences(raw, algorithm)}"


def test_the_check_catches_a_private_setting(tmp_path: Path) -> None:
    raw = peer_config(demo_args("--set", "train.lr=0.2", "--set", "gossip.interval_s=0.005"), 0, tmp_path)
    assert sorted(d.split("=")[0] for d in differences(raw, "cdl")) == ["gossip.interval_s", "train.lr"]
