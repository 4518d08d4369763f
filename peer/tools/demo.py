"""`peer demo`: run N daemons on this machine over real gRPC and mDNS, then compare them with references.

The demo launches `peer run` processes on 127.0.0.1 (each with its own state_dir and a data partition), shows
their progress from the metrics files, stops them once every peer finished its epochs (plus a few seconds of
consensus-only rounds), and compares the peers' test accuracy with two references trained in this process on
the same data, model and hyperparameters: *centralized* (all partitions together) and *local-only* (every
partition alone). It draws accuracy and consensus distance over time (plot.png) and prints the plot's path; with
`--out DIR` it keeps every file of the run there, else only plot.png and summary.json stay in the temporary run dir.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
from peer.tools.demo_config import (  # noqa: F401 - re-exported for the CLI and tests
    CHECKPOINT_DEFAULTS,
    DEFAULT_EPOCHS,
    DEFAULT_PEERS,
    DEFAULT_TIMEOUT_S,
    METRICS_DEFAULTS,
    PROTECTED_KEYS,
    add_arguments,
    build_configs,
    faults_for_peer,
    new_cluster_name,
    peer_config,
)
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

SETTLE_S = 2.0  # consensus-only rounds after every peer finished training
STOP_TIMEOUT_S = 20.0  # SIGTERM -> exit (the node waits up to 5 s for in-flight pushes)


class _TerminatedError(Exception):
    """SIGTERM to the demo process: unwind so the peers are stopped."""


# ---------------------------------------------------------------------------------------------------- report
def format_table(summary: dict[str, Any]) -> str:
    def pct(v: float) -> str:
        return f"{100 * v:6.2f}%"

    status = summary.get("centralized_status", "ok")
    lr = summary.get("centralized_lr")
    tuned = f"  (lr {lr:g}, tuned on validation)" if lr else ""
    note = "" if status == "ok" else f"  ** {status}: not a reference **"
    central = pct(summary["centralized_accuracy"]) + tuned + note
    rows: list[tuple[str, str]] = [("centralized (all data, one model)", central)]
    if summary.get("published_accuracy") is not None:
        rows.append(("published (same model and data)", pct(summary["published_accuracy"])))
    rows.append(("local-only (mean over partitions)", pct(summary["local_only_accuracy"])))
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
    rows += _fault_rows(summary)
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


FAULT_COUNTS = {"faults_dropped": "dropped", "faults_outage_dropped": "lost in outages", "faults_delayed": "delayed"}


def _fault_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """Which faults were injected (`--faults`, one row per kind) and how many messages each hit, all peers."""
    spec = str(summary.get("faults") or "")
    if not spec:
        return [("faults injected", "none")]
    rows = [(f"fault {item.partition('=')[0]}", item.partition("=")[2]) for item in spec.split(",") if item]
    counts = summary.get("injected_faults", {})
    hit = ", ".join(f"{counts.get(k, 0)} {word}" for k, word in FAULT_COUNTS.items())
    return [*rows, ("messages hit by faults", hit)]


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


KEPT_WITHOUT_OUT = frozenset({"plot.png", "summary.json"})
STATE_NAMES = frozenset({"checkpoint.pt", "metrics.jsonl", "config.yaml", "snapshots", "ready.json"})


def _clear_state_dir(path: Path) -> None:
    """Remove a previous demo's state_dir; refuse to touch a folder that holds anything else."""
    if not path.exists():
        return
    foreign = {"?"} if not path.is_dir() else {p.name for p in path.iterdir()}
    foreign = {n for n in foreign if n not in STATE_NAMES and not n.startswith((".", "checkpoint.pt"))}
    if foreign:
        raise DemoError(f"{path} exists and is not a peer state_dir from an earlier demo; choose another --out")
    shutil.rmtree(path)


def tidy_temporary_run_dir(work_dir: Path) -> None:
    """Without --out, the run dir keeps only plot.png and summary.json (their paths were printed); a run that
    wrote neither leaves nothing behind."""
    for child in work_dir.iterdir() if work_dir.is_dir() else []:
        if child.name in KEPT_WITHOUT_OUT:
            continue
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        work_dir.rmdir()  # only when empty


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
            tidy_temporary_run_dir(work_dir)


def _labels(cfg: Any) -> tuple[str, str]:
    """What the peers train on, as the config names it (a --set factory or path replaces the built-in name)."""
    d = cfg.data
    data = d.dataset or d.path or d.factory or d.image_folder or d.shards_dir
    return str(data), str(cfg.model.factory or cfg.model.name)


def _run(args: argparse.Namespace, work_dir: Path, procs: list[PeerProc], t_start: float, deadline: float) -> int:
    import numpy as np

    from peer.algorithms import REGISTRY
    from peer.learn.training import select_device

    configs = build_configs(args, work_dir)
    cfgs = [c for _, c in configs]
    data_label, model_label = _labels(cfgs[0])
    print(
        f"peer demo: {args.peers} peers ({args.algorithm}, {args.topology}) on {data_label} {args.partition}, "
        f"{model_label}, {args.epochs:g} epochs; files in {work_dir}{'' if args.out else ' (temporary)'}",
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
        "dataset": data_label,
        "partition": args.partition,
        "topology": args.topology,
        "model": model_label,
        "epochs": args.epochs,
        "seed": args.seed,
        # The tuned centralized reference (peer.learn.reference); "centralized_status" says whether it is one.
        "centralized_accuracy": central.accuracy,
        "centralized_lr": central.lr,
        "centralized_status": central.status,
        "centralized_validation": central.as_dict()["validation"],
        "published_accuracy": central.published,
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
        # How often pacing held a peer until fresh neighbour state arrived (0 when steps never outran gossip).
        "pace_waits": sum(int((r or {}).get("pace_waits") or 0) for r in last),
        "provenance": REGISTRY[args.algorithm].provenance,
        "overrides": list(args.set or []),
        "hyperparameters": cfgs[0].train.model_dump(mode="json"),
    }
    if time.monotonic() > deadline:
        raise TimeoutError("while evaluating")
    t_mark = time.monotonic()
    # The plot is kept without --out too, in the temporary run dir (its path is printed).
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
    (work_dir / "summary.json").write_text(text + "\n", encoding="utf-8")
    if "plot" in summary:
        print(f"plot: {summary['plot']}")
    print(f"summary: {work_dir / 'summary.json'}")
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    if bad:
        print(f"peer demo: {len(bad)} peer(s) did not exit cleanly: {bad}", file=sys.stderr)
        return 1
    return 0
