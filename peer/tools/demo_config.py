"""`peer demo`'s arguments and the config of each of its peers (what makes a run a demo, and nothing else)."""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path
from typing import Any

from peer.errors import ConfigError

# What makes a run a demo, and nothing else: how many peers, which built-in data, how long, and snapshots for
# the plot. Every training and gossip setting is the daemon's own default (`peer run` gets the same), which
# tests/test_demo_defaults.py checks.
DEFAULT_PEERS = 4
DEFAULT_EPOCHS = 60.0
DEFAULT_TIMEOUT_S = 300.0
METRICS_DEFAULTS: dict[str, Any] = {"interval_s": 0.5, "snapshot_interval_s": 0.5}
CHECKPOINT_DEFAULTS: dict[str, Any] = {"interval_s": 5.0}

# Keys the demo owns for each peer; `--set` may not change them.
PROTECTED_KEYS = frozenset(
    {
        "node_id",
        "state_dir",
        "listen",
        "data.num_partitions",
        "data.partition_index",
        "discovery.static_peers",
        "security",
    }
)
PKI_DIR = "pki"  # the run's throwaway cluster CA and the peers' certificates, inside the demo's directory


# ------------------------------------------------------------------------------------------------ arguments
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peers", type=int, default=DEFAULT_PEERS, help="number of daemons (default 4)")
    parser.add_argument(
        "--algorithm",
        default="cdl",
        help="consensus algorithm, any `algorithm.name` (docs/reference/algorithms.md; default cdl)",
    )
    parser.add_argument("--topology", default="ring", help="ring | full (default ring)")
    parser.add_argument("--dataset", default="digits", help="digits | mnist1d (default digits)")
    parser.add_argument("--partition", default="shards:2", help="iid | shards:K | dirichlet:ALPHA (default shards:2)")
    parser.add_argument("--model", default="mlp", help="logreg | mlp | cnn (default mlp)")
    parser.add_argument(
        "--epochs", type=float, default=DEFAULT_EPOCHS, help=f"local epochs per peer (default {DEFAULT_EPOCHS:g})"
    )
    parser.add_argument("--seed", type=int, default=0, help="data, model and minibatch seed (default 0)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="keep configs, logs, state dirs, summary.json and plot.png in DIR (default: a temporary run dir, "
        "of which only plot.png and summary.json are kept)",
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"overall time bound in seconds (default {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--faults",
        metavar="SPEC",
        default="",
        help="inject faults, comma-separated: drop=P (message loss), delay=DIST (e.g. exp:0.01), "
        "flap=A:B:UP_S:DOWN_S (Gilbert-Elliott outages of link A-B), straggler=ID:FACTOR; "
        "e.g. --faults drop=0.3,flap=peer-0:peer-1:2:2",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every peer (repeatable), e.g. --set train.lr=0.1",
    )


# ------------------------------------------------------------------------------------------------ configs
def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted}: {part} is not a section", source="--set", field=dotted)
        node = child
    node[parts[-1]] = value


def faults_for_peer(spec: str, node_id: str, num_peers: int) -> dict[str, Any]:
    """The `faults:` section of one peer from the demo's --faults SPEC (see `add_arguments`)."""
    out: dict[str, Any] = {}
    ids = {f"peer-{i}" for i in range(num_peers)}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError("expected KEY=VALUE")
            if key == "drop":
                out["drop_probability"] = float(value)
            elif key == "delay":
                out["delay_s"] = value
            elif key == "flap":
                a, b, up, down = value.split(":")
                if not {a, b} <= ids or a == b:
                    raise ValueError(f"flap needs two distinct peers among {', '.join(sorted(ids))}")
                if node_id in (a, b):
                    other = b if node_id == a else a
                    out["outage"] = {"mean_up_s": float(up), "mean_down_s": float(down), "links": [other]}
            elif key == "straggler":
                who, factor = value.split(":")
                if who not in ids:
                    raise ValueError(f"unknown peer {who!r}")
                if who == node_id:
                    out["slowdown"] = float(factor)
            else:
                raise ValueError("valid keys: drop, delay, flap, straggler")
        except ValueError as exc:
            raise ConfigError(f"bad item {item!r}: {exc}", source="--faults") from None
    return out


def new_cluster_name() -> str:
    """A cluster name of this demo run alone, so that other daemons on the machine (another demo, tests) and
    this run's peers ignore each other on mDNS."""
    return f"demo-{os.getpid()}-{secrets.token_hex(3)}"


def peer_config(
    args: argparse.Namespace,
    index: int,
    work_dir: Path,
    cluster: str = "demo",
    security: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The raw config tree of peer `index` (before validation): demo settings, then `--set` overrides.
    `security`: the peer's mutual-TLS files (`build_configs` makes them; without them the peer runs plaintext)."""
    from peer.config import parse_overrides

    n = args.peers
    raw: dict[str, Any] = {
        "node_id": f"peer-{index}",
        "listen": "127.0.0.1:0",
        "state_dir": str(work_dir / f"peer-{index}"),
        "topology": args.topology,
        "discovery": {"mdns": True, "interfaces": ["127.0.0.1"], "static_peers": [], "cluster": cluster},
        "algorithm": {"name": args.algorithm},
        "data": {
            "dataset": args.dataset,
            "partition": args.partition,
            "num_partitions": n,
            "partition_index": index,
            "seed": args.seed,
        },
        "model": {"name": args.model, "seed": args.seed},
        "train": {"epochs": args.epochs, "seed": args.seed},
        "checkpoint": dict(CHECKPOINT_DEFAULTS),
        "metrics": dict(METRICS_DEFAULTS),
    }
    if security is not None:
        raw["security"] = dict(security)
    if n == 1:
        raw["discovery"]["mdns"] = False  # a demo of one: nobody to find (the daemon then waits for no one)
    faults = faults_for_peer(getattr(args, "faults", "") or "", f"peer-{index}", n)
    if faults:
        raw["faults"] = {"seed": args.seed, **faults}
    for key, value in parse_overrides(list(args.set or [])):
        if key in PROTECTED_KEYS or any(key.startswith(p + ".") for p in PROTECTED_KEYS):
            raise ConfigError(f"the demo sets {key} for each peer itself", source="--set", field=key)
        _set_dotted(raw, key, value)
    return raw


def build_configs(args: argparse.Namespace, work_dir: Path, cluster: str | None = None) -> list[tuple[Path, Any]]:
    """Validate and write every peer's config (one new cluster name for all); returns (path, PeerConfig) each.
    The peers run with mutual TLS: a throwaway cluster CA and one certificate per peer in `work_dir/pki`."""
    from peer.config import dump, validate
    from peer.learn.data import DATASET_NAMES, parse_partition
    from peer.learn.models import MODEL_NAMES
    from peer.tools.certs import make_cluster

    cluster = cluster or new_cluster_name()
    work_dir.mkdir(parents=True, exist_ok=True)
    tls = make_cluster(work_dir / PKI_DIR, [f"peer-{i}" for i in range(args.peers)])
    out = []
    for i in range(args.peers):
        raw = peer_config(args, i, work_dir, cluster, tls[f"peer-{i}"])
        cfg = validate(raw, source=f"peer-{i} demo config")
        if i == 0:  # fail here, not in N daemons: what the config schema leaves to the node
            if cfg.data.dataset is not None and cfg.data.dataset not in DATASET_NAMES:
                raise ConfigError(
                    f"unknown dataset {cfg.data.dataset!r}; valid names: {', '.join(DATASET_NAMES)}",
                    field="data.dataset",
                )
            parse_partition(cfg.data.partition)
            if cfg.model.factory is None and cfg.model.name not in MODEL_NAMES:
                raise ConfigError(
                    f"unknown model {cfg.model.name!r}; valid names: {', '.join(MODEL_NAMES)}", field="model.name"
                )
        path = work_dir / f"peer-{i}.yaml"
        path.write_text(dump(cfg), encoding="utf-8")
        out.append((path, cfg))
    return out
