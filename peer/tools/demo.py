"""`peer demo`: run N daemons on this machine over real gRPC and mDNS, then compare them with references.

The demo launches `peer run` processes on 127.0.0.1 (each with its own state_dir and a data partition), shows
their progress from the metrics files, stops them once every peer finished its epochs (plus a few seconds of
consensus-only rounds), and compares the peers' test accuracy with two references trained in this process on
the same data, model and hyperparameters: *centralized* (all partitions together) and *local-only* (every
partition alone). With `--out DIR` it keeps the run's files and draws accuracy and consensus distance over time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peer.errors import ConfigError
from peer.tools.demo_eval import (  # noqa: F401 - re-exported for tests and users
    Snapshot,
    bin_snapshots,
    consensus_distance,
    evaluate_peers,
    list_snapshots,
    parse_snapshot_name,
    reference_accuracies,
    snapshot_curves,
    ssfn_layer_errors,
    train_reference,
    training_done_offset,
)
from peer.tools.launcher import (
    DemoError,
    PeerProc,
    check_alive,
    mb,
    start_peer,
    start_reader,
    stop_all,
    wait_ready,
    watch,
)

if TYPE_CHECKING:  # numpy and torch are imported where used: every `peer` command imports this module
    pass

# Calibrated on a shared 2-core CPU (digits, shards:2, 4 peers, ring, cdl, mlp; seeds 0-4): about 22 s of
# training, 40-50 s in all, decentralized accuracy within 1.4 points of centralized (about 97%) and 55-60
# points above local-only. The ring's gap comes from mixing neighbour copies that are up to a round old, so
# the gossip interval is kept well below the round interval. Anything else: the config defaults, or `--set`.
DEFAULT_PEERS = 4
DEFAULT_EPOCHS = 60.0
DEFAULT_TIMEOUT_S = 300.0
TRAIN_DEFAULTS: dict[str, Any] = {
    "batch_size": 32,
    "lr": 0.2,
    "lr_schedule": "cosine",
    "momentum": 0.9,
    "steps_per_round": 1,
    "round_interval_s": 0.03,
    "wait_for_neighbors_s": 15.0,
    "torch_threads": 1,  # N peers share the CPU; one intra-op thread each is fastest for these tiny models
}
# Push soon after each round so that neighbours mix a copy at most about one round old.
GOSSIP_DEFAULTS: dict[str, Any] = {"interval_s": 0.005}
METRICS_DEFAULTS: dict[str, Any] = {"interval_s": 0.5, "snapshot_interval_s": 0.5}
CHECKPOINT_DEFAULTS: dict[str, Any] = {"interval_s": 5.0}

# Per-algorithm demo settings (dotted keys, applied before `--set`). P1 algorithms are paced by their round
# barrier, so the demo's round pacing (meant to let asynchronous gossip keep up) only slows them down.
ALGORITHM_DEMO_DEFAULTS: dict[str, dict[str, Any]] = {
    "dpsgd": {"train.round_interval_s": 0.0},
    "dmsgd": {"train.round_interval_s": 0.0},
    # Like local_sgd: the momentum-SGD reference is only matched with the same local heavy ball.
    "choco": {"train.round_interval_s": 0.0, "algorithm.momentum": 0.9},
    "next": {"train.round_interval_s": 0.0},
    "dssfn": {"train.round_interval_s": 0.0},
    # Plain local SGD falls ~3.4 points short of the momentum-SGD centralized reference here; with the same
    # local heavy ball as the reference (train.momentum) it matches it.
    "local_sgd": {"train.round_interval_s": 0.0, "algorithm.momentum": 0.9},
}

SETTLE_S = 2.0  # consensus-only rounds after every peer finished training
STOP_TIMEOUT_S = 20.0  # SIGTERM -> exit (the node waits up to 5 s for in-flight pushes)
# Keys the demo owns for each peer; `--set` may not change them.
PROTECTED_KEYS = frozenset(
    {"node_id", "state_dir", "listen", "data.num_partitions", "data.partition_index", "discovery.static_peers"}
)


class _TerminatedError(Exception):
    """SIGTERM to the demo process: unwind so the peers are stopped."""


# ------------------------------------------------------------------------------------------------ arguments
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peers", type=int, default=DEFAULT_PEERS, help="number of daemons (default 4)")
    parser.add_argument(
        "--algorithm", default="cdl", help="consensus algorithm, see `algorithm.name` in the README (default cdl)"
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
        help="keep configs, logs, state dirs, summary.json and plot.png in DIR (default: temp dir)",
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


def peer_config(args: argparse.Namespace, index: int, work_dir: Path, cluster: str = "demo") -> dict[str, Any]:
    """The raw config tree of peer `index` (before validation): demo settings, then `--set` overrides."""
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
        "train": {**TRAIN_DEFAULTS, "epochs": args.epochs, "seed": args.seed},
        "gossip": dict(GOSSIP_DEFAULTS),
        "checkpoint": dict(CHECKPOINT_DEFAULTS),
        "metrics": dict(METRICS_DEFAULTS),
    }
    if n == 1:
        raw["train"]["wait_for_neighbors_s"] = 0.0  # nobody to wait for
    faults = faults_for_peer(getattr(args, "faults", "") or "", f"peer-{index}", n)
    if faults:
        raw["faults"] = {"seed": args.seed, **faults}
    for key, value in ALGORITHM_DEMO_DEFAULTS.get(args.algorithm, {}).items():
        _set_dotted(raw, key, value)
    for key, value in parse_overrides(list(args.set or [])):
        if key in PROTECTED_KEYS or any(key.startswith(p + ".") for p in PROTECTED_KEYS):
            raise ConfigError(f"the demo sets {key} for each peer itself", source="--set", field=key)
        _set_dotted(raw, key, value)
    return raw


def build_configs(args: argparse.Namespace, work_dir: Path, cluster: str | None = None) -> list[tuple[Path, Any]]:
    """Validate and write every peer's config (one new cluster name for all); returns (path, PeerConfig) each."""
    from peer.config import dump, validate
    from peer.learn.data import DATASET_NAMES, parse_partition
    from peer.learn.models import MODEL_NAMES

    cluster = cluster or new_cluster_name()
    work_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(args.peers):
        cfg = validate(peer_config(args, i, work_dir, cluster), source=f"peer-{i} demo config")
        if i == 0:  # fail here, not in N daemons: what the config schema leaves to the node
            if cfg.data.path is None and cfg.data.dataset not in DATASET_NAMES:
                raise ConfigError(
                    f"unknown dataset {cfg.data.dataset!r}; valid names: {', '.join(DATASET_NAMES)}",
                    field="data.dataset",
                )
            parse_partition(cfg.data.partition)
            if cfg.model.name not in MODEL_NAMES:
                raise ConfigError(
                    f"unknown model {cfg.model.name!r}; valid names: {', '.join(MODEL_NAMES)}", field="model.name"
                )
        path = work_dir / f"peer-{i}.yaml"
        path.write_text(dump(cfg), encoding="utf-8")
        out.append((path, cfg))
    return out


# ---------------------------------------------------------------------------------------------------- report
def format_table(summary: dict[str, Any]) -> str:
    def pct(v: float) -> str:
        return f"{100 * v:6.2f}%"

    rows: list[tuple[str, str]] = [
        ("centralized (all data, one model)", pct(summary["centralized_accuracy"])),
        ("local-only (mean over partitions)", pct(summary["local_only_accuracy"])),
    ]
    for i, acc in enumerate(summary["per_peer_accuracy"]):
        rows.append((f"  peer-{i} ({summary['algorithm']})", pct(acc)))
    rows += [
        ("decentralized mean", pct(summary["mean_accuracy"])),
        ("decentralized min", pct(summary["min_accuracy"])),
        ("consensus distance", f"{summary['consensus_distance']:.3g}"),
        ("bytes sent (all peers)", mb(summary["bytes_sent"])),
        ("send failures", str(summary["send_failures"])),
        ("training wall time", f"{summary['training_wall_s']:.1f} s"),
        ("demo wall time", f"{summary['wall_s']:.1f} s"),
    ]
    if "layer_errors_vs_centralized" in summary:
        worst = max(summary["layer_errors_vs_centralized"])
        rows.append(("max layer error vs centralized", f"{worst:.2e} (relative Frobenius, worst peer and layer)"))
    if summary.get("provenance", "standard") != "standard":
        rows.append(("update rule", str(summary["provenance"])))
    head = (
        f"{summary['algorithm']} on {summary['dataset']} ({summary['partition']}), {summary['peers']} peers, "
        f"{summary['topology']}, {summary['model']}, {summary['epochs']:g} epochs, seed {summary['seed']}"
    )
    width = max(len(k) for k, _ in rows)
    return "\n".join([head, "-" * len(head), *(f"{k.ljust(width)}  {v}" for k, v in rows)])


# ------------------------------------------------------------------------------------------------------- run
@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While running, SIGTERM to the demo raises in the main thread so the finally blocks stop the peers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _TerminatedError()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Tiny models train fastest on one thread, and it keeps a busy shared CPU responsive."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _validate_args(args: argparse.Namespace) -> None:
    from peer.algorithms import REGISTRY

    if args.peers < 1:
        raise ConfigError(f"--peers must be >= 1, got {args.peers}", field="peers")
    if args.algorithm not in REGISTRY:
        raise ConfigError(
            f"unknown algorithm {args.algorithm!r}; valid names: {', '.join(REGISTRY)}", field="algorithm"
        )
    if not args.epochs > 0:
        raise ConfigError(f"--epochs must be > 0, got {args.epochs}", field="epochs")
    if not args.timeout_s > 0:
        raise ConfigError(f"--timeout-s must be > 0, got {args.timeout_s}", field="timeout_s")


STATE_NAMES = frozenset({"checkpoint.pt", "metrics.jsonl", "config.yaml", "snapshots"})


def _clear_state_dir(path: Path) -> None:
    """Remove a previous demo's state_dir; refuse to touch a folder that holds anything else."""
    if not path.exists():
        return
    foreign = {"?"} if not path.is_dir() else {p.name for p in path.iterdir()}
    foreign = {n for n in foreign if n not in STATE_NAMES and not n.startswith((".", "checkpoint.pt"))}
    if foreign:
        raise DemoError(f"{path} exists and is not a peer state_dir from an earlier demo; choose another --out")
    shutil.rmtree(path)


def run_demo(args: argparse.Namespace) -> int:
    _validate_args(args)
    t_start = time.monotonic()
    deadline = t_start + args.timeout_s
    if args.out:
        work_dir = Path(args.out)
        work_dir.mkdir(parents=True, exist_ok=True)
        for i in range(args.peers):  # a previous run's checkpoint would make the peers resume, not start afresh
            _clear_state_dir(work_dir / f"peer-{i}")
        keep = True
    else:
        work_dir = Path(tempfile.mkdtemp(prefix="peer-demo-"))
        keep = False
    procs: list[PeerProc] = []
    try:
        with _sigterm_unwinds():
            return _run(args, work_dir, procs, t_start, deadline)
    except TimeoutError as exc:
        print(f"\npeer demo: timed out after {args.timeout_s:g} s (--timeout-s): {exc}", file=sys.stderr)
        return 124
    except (KeyboardInterrupt, _TerminatedError):
        print("\npeer demo: interrupted; stopping the peers", file=sys.stderr)
        return 130
    except DemoError as exc:
        print(f"\npeer demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if procs:
            stop_all(procs, 5.0, quiet=True)  # no-op after a normal run; SIGTERM then SIGKILL otherwise
        if not keep:
            shutil.rmtree(work_dir, ignore_errors=True)


def _run(args: argparse.Namespace, work_dir: Path, procs: list[PeerProc], t_start: float, deadline: float) -> int:
    import numpy as np

    from peer.algorithms import REGISTRY
    from peer.learn.training import select_device

    configs = build_configs(args, work_dir)
    cfgs = [c for _, c in configs]
    print(
        f"peer demo: {args.peers} peers ({args.algorithm}, {args.topology}) on {args.dataset} {args.partition}, "
        f"{args.model}, {args.epochs:g} epochs; files in {work_dir}{'' if args.out else ' (temporary)'}",
        flush=True,
    )
    for path, cfg in configs:
        log_path = work_dir / f"{cfg.node_id}.log"
        # Readers start once every peer is launched: no other thread runs while the pre-exec hooks do.
        procs.append(start_peer(len(procs), cfg.node_id, path, Path(cfg.state_dir), log_path, read=False))
    for p in procs:
        start_reader(p)
    wait_ready(procs, deadline)
    phases = {"startup_s": time.monotonic() - t_start}
    print("ready: " + "  ".join(f"{p.node_id}@{p.address}" for p in procs), flush=True)

    t_mark = time.monotonic()
    foreign: set[str] = set()
    training_wall_s = watch(procs, args.epochs, deadline, foreign)
    phases["training_s"] = time.monotonic() - t_mark
    t_mark = time.monotonic()
    settle_until = time.monotonic() + SETTLE_S
    while time.monotonic() < settle_until:  # consensus-only rounds
        check_alive(procs, "after training")
        time.sleep(0.1)
    codes = stop_all(procs, min(STOP_TIMEOUT_S, max(1.0, deadline - time.monotonic())))
    bad = {k: v for k, v in codes.items() if v != 0}
    for node_id, code in bad.items():
        p = next(p for p in procs if p.node_id == node_id)
        what = "was killed (no exit after SIGTERM)" if code is None else f"exited with code {code}"
        print(f"warning: {node_id} {what}; last lines of {p.log_path}:\n{p.log_tail(15)}", file=sys.stderr)
    if time.monotonic() > deadline:
        raise TimeoutError("while stopping the peers")

    phases["settle_stop_s"] = time.monotonic() - t_mark
    t_mark = time.monotonic()
    device = select_device(cfgs[0].train.device)
    with _one_torch_thread():
        per_peer, dist = evaluate_peers(cfgs, device)
        print("training the references (centralized, local-only) ...", flush=True)
        central, local = reference_accuracies(cfgs, device)
        layer_errors = ssfn_layer_errors(cfgs) if REGISTRY[args.algorithm].trains_own_model else None
    phases["references_s"] = time.monotonic() - t_mark
    from peer.daemon.metrics import read

    last = [next((r for r in reversed(read(Path(c.state_dir) / "metrics.jsonl"))), None) for c in cfgs]
    summary: dict[str, Any] = {
        "algorithm": args.algorithm,
        "peers": args.peers,
        "dataset": args.dataset,
        "partition": args.partition,
        "topology": args.topology,
        "model": args.model,
        "epochs": args.epochs,
        "seed": args.seed,
        "centralized_accuracy": central,
        "local_only_accuracy": float(np.mean(local)),
        "local_only_per_partition": local,
        "mean_accuracy": float(np.mean(per_peer)),
        "min_accuracy": float(np.min(per_peer)),
        "per_peer_accuracy": per_peer,
        "consensus_distance": dist,
        **({"layer_errors_vs_centralized": layer_errors} if layer_errors is not None else {}),
        "bytes_sent": sum(int((r or {}).get("bytes_sent") or 0) for r in last),
        "bytes_received": sum(int((r or {}).get("bytes_received") or 0) for r in last),
        "send_failures": sum(int((r or {}).get("send_failures") or 0) for r in last),
        "exit_codes": codes,
        "foreign_peers": sorted(foreign),
        "training_wall_s": training_wall_s,
        "per_peer_training_s": [float((r or {}).get("training_s") or 0.0) for r in last],
        "faults": getattr(args, "faults", "") or "",
        "injected_faults": {
            k: sum(int((r or {}).get(k) or 0) for r in last)
            for k in ("faults_dropped", "faults_outage_dropped", "faults_delayed")
        },
        "provenance": REGISTRY[args.algorithm].provenance,
        "overrides": list(args.set or []),
        "hyperparameters": cfgs[0].train.model_dump(mode="json"),
    }
    if time.monotonic() > deadline:
        raise TimeoutError("while evaluating")
    t_mark = time.monotonic()
    if args.out:
        try:
            from peer.tools.plot import write_plot

            with _one_torch_thread():
                curves = snapshot_curves(cfgs)
            write_plot(work_dir / "plot.png", curves, summary, done_at_s=training_done_offset(cfgs))
            summary["plot"] = str(work_dir / "plot.png")
        except Exception as exc:  # the plot is a bonus; never lose the results over it
            print(f"warning: could not draw the plot: {type(exc).__name__}: {exc}", file=sys.stderr)
    phases["plot_s"] = time.monotonic() - t_mark
    summary["phases"] = {k: round(v, 2) for k, v in phases.items()}
    summary["wall_s"] = time.monotonic() - t_start
    print()
    print(format_table(summary))
    text = json.dumps(summary, indent=2)
    if args.out:
        (work_dir / "summary.json").write_text(text + "\n", encoding="utf-8")
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    if bad:
        print(f"peer demo: {len(bad)} peer(s) did not exit cleanly: {bad}", file=sys.stderr)
        return 1
    return 0
