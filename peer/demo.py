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
import ctypes
import json
import math
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from peer.errors import ConfigError, PeerError

if TYPE_CHECKING:  # numpy and torch are imported where used: every `peer` command imports this module
    import numpy as np

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

READY_TIMEOUT_S = 60.0
SETTLE_S = 2.0  # consensus-only rounds after every peer finished training
STOP_TIMEOUT_S = 20.0  # SIGTERM -> exit (the node waits up to 5 s for in-flight pushes)
SNAPSHOT_BIN_S = 1.0
# Keys the demo owns for each peer; `--set` may not change them.
PROTECTED_KEYS = frozenset(
    {"node_id", "state_dir", "listen", "data.num_partitions", "data.partition_index", "discovery.static_peers"}
)


class DemoError(PeerError):
    """The demo could not complete (a peer failed, timed out, or its results are missing)."""


class _TerminatedError(Exception):
    """SIGTERM to the demo process: unwind so the peers are stopped."""


# ------------------------------------------------------------------------------------------------ arguments
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peers", type=int, default=DEFAULT_PEERS, help="number of daemons (default 4)")
    parser.add_argument("--algorithm", default="cdl", help="consensus algorithm: cdl | none (default cdl)")
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
    for key, value in parse_overrides(list(args.set or [])):
        if key in PROTECTED_KEYS or any(key.startswith(p + ".") for p in PROTECTED_KEYS):
            raise ConfigError(f"the demo sets {key} for each peer itself", source="--set", field=key)
        _set_dotted(raw, key, value)
    return raw


def build_configs(args: argparse.Namespace, work_dir: Path, cluster: str | None = None) -> list[tuple[Path, Any]]:
    """Validate and write every peer's config (one new cluster name for all); returns (path, PeerConfig) each."""
    from peer.config import dump, validate
    from peer.data import DATASET_NAMES, parse_partition
    from peer.models import MODEL_NAMES

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


# ---------------------------------------------------------------------------------------------- pure maths
def consensus_distance(vectors: Sequence[np.ndarray]) -> float:
    """Mean over peers of ‖θ_i − θ̄‖ / ‖θ̄‖ (0 for identical vectors; inf if θ̄ = 0 while they differ)."""
    import numpy as np

    if not vectors:
        raise ValueError("no parameter vectors")
    stack = np.stack([np.asarray(v, dtype=np.float64).reshape(-1) for v in vectors])
    mean = stack.mean(axis=0)
    spread = float(np.linalg.norm(stack - mean, axis=1).mean())
    norm = float(np.linalg.norm(mean))
    if norm == 0.0:
        return 0.0 if spread == 0.0 else math.inf
    return spread / norm


@dataclass(frozen=True)
class Snapshot:
    unix_ms: int
    step: int
    path: Path


def parse_snapshot_name(path: Path) -> Snapshot | None:
    """`<unix_ms:015d>_<step:09d>.npy`, or None for anything else (temporary files included)."""
    if path.suffix != ".npy" or path.name.startswith("."):
        return None
    ms, sep, step = path.stem.partition("_")
    if not sep or not ms.isdigit() or not step.isdigit():
        return None
    return Snapshot(int(ms), int(step), path)


def list_snapshots(state_dir: Path) -> list[Snapshot]:
    snap_dir = state_dir / "snapshots"
    if not snap_dir.is_dir():
        return []
    found = (parse_snapshot_name(p) for p in snap_dir.iterdir())
    return sorted((s for s in found if s is not None), key=lambda s: s.unix_ms)


def bin_snapshots(
    per_peer: Mapping[str, Sequence[Snapshot]], bin_s: float = SNAPSHOT_BIN_S
) -> list[tuple[float, dict[str, Snapshot]]]:
    """Group snapshots into `bin_s` bins relative to the earliest one; keep the bins where every peer has one.

    Returns (bin start in seconds, {peer: its latest snapshot in the bin}) in time order.
    """
    if bin_s <= 0:
        raise ValueError("bin_s must be > 0")
    all_ms = [s.unix_ms for snaps in per_peer.values() for s in snaps]
    if not per_peer or not all_ms:
        return []
    t0 = min(all_ms)
    bins: dict[int, dict[str, Snapshot]] = {}
    for peer_id, snaps in per_peer.items():
        for s in snaps:
            b = int((s.unix_ms - t0) / 1000.0 // bin_s)
            cur = bins.setdefault(b, {}).get(peer_id)
            if cur is None or s.unix_ms >= cur.unix_ms:
                bins[b][peer_id] = s
    return [(b * bin_s, bins[b]) for b in sorted(bins) if len(bins[b]) == len(per_peer)]


# ------------------------------------------------------------------------------------------------ processes
_PR_SET_PDEATHSIG = 1


def _pdeathsig_hook() -> Any:
    """Linux: a pre-exec hook so that a peer gets SIGTERM if the demo dies without cleaning up (SIGKILL).

    libc is loaded here, in the parent, so that the child only makes one plain call between fork and exec.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:  # pragma: no cover - runs in the child
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))

    return hook


@dataclass
class PeerProc:
    index: int
    node_id: str
    config_path: Path
    state_dir: Path
    log_path: Path
    proc: subprocess.Popen[str]
    log_file: IO[bytes]
    ready: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    address: str = ""
    reader: threading.Thread | None = None

    def read_stdout(self) -> None:
        assert self.proc.stdout is not None
        announced = False
        for line in self.proc.stdout:
            if announced:
                continue  # keep draining so the pipe never fills
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict) and msg.get("event") == "ready":
                announced = True
                self.ready.put(msg)

    def log_tail(self, lines: int = 25) -> str:
        with contextlib.suppress(OSError):
            self.log_file.flush()
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        tail = text.splitlines()[-lines:]
        return "\n".join("    " + t for t in tail) if tail else "    (empty log)"


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Tiny models on a shared CPU: one intra-op thread per peer avoids N processes fighting over every core.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def start_peer(
    index: int, node_id: str, config_path: Path, state_dir: Path, log_path: Path, *, read: bool = True
) -> PeerProc:
    """Launch `peer run`; its stdout is read by a thread (started here, or later by `start_reader`)."""
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed in stop_all
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "peer", "run", "--config", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            env=_child_env(),
            start_new_session=True,  # Ctrl-C reaches the demo only; it stops the peers itself
            preexec_fn=_pdeathsig_hook(),
        )
    except BaseException:
        log_file.close()
        raise
    p = PeerProc(index, node_id, config_path, state_dir, log_path, proc, log_file)
    if read:
        start_reader(p)
    return p


def start_reader(p: PeerProc) -> None:
    p.reader = threading.Thread(target=p.read_stdout, name=f"demo-stdout-{p.node_id}", daemon=True)
    p.reader.start()


def stop_all(procs: Sequence[PeerProc], timeout_s: float, *, quiet: bool = False) -> dict[str, int | None]:
    """SIGTERM every live peer, wait up to `timeout_s`, then SIGKILL (with a warning). Returns exit codes."""
    for p in procs:
        if p.proc.poll() is None:
            with contextlib.suppress(OSError):
                p.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    codes: dict[str, int | None] = {}
    for p in procs:
        try:
            codes[p.node_id] = p.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            if not quiet:
                print(f"warning: {p.node_id} did not exit {timeout_s:g} s after SIGTERM; killing it", file=sys.stderr)
            with contextlib.suppress(OSError):
                p.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.proc.wait(timeout=5.0)
            codes[p.node_id] = None
    for p in procs:
        if p.reader is not None:
            p.reader.join(timeout=2.0)
        with contextlib.suppress(OSError):
            p.log_file.close()
        if p.proc.stdout is not None:
            with contextlib.suppress(OSError):
                p.proc.stdout.close()
    return codes


def _check_alive(procs: Sequence[PeerProc], what: str) -> None:
    for p in procs:
        code = p.proc.poll()
        if code is not None:
            raise DemoError(f"{p.node_id} exited with code {code} {what}; last lines of {p.log_path}:\n{p.log_tail()}")


def wait_ready(procs: Sequence[PeerProc], deadline: float) -> None:
    ready_by = min(deadline, time.monotonic() + READY_TIMEOUT_S)
    pending = list(procs)
    while pending:
        for p in list(pending):
            try:
                msg = p.ready.get_nowait()
            except queue.Empty:
                continue
            p.address = str(msg.get("address", ""))
            pending.remove(p)
        if not pending:
            break
        _check_alive(procs, "before it was ready")
        if time.monotonic() > ready_by:
            names = ", ".join(p.node_id for p in pending)
            tails = "\n".join(f"  {p.node_id} ({p.log_path}):\n{p.log_tail(10)}" for p in pending)
            if ready_by >= deadline:
                raise TimeoutError(f"--timeout-s expired while waiting for {names} to start\n{tails}")
            raise DemoError(f"{names} did not report ready within {READY_TIMEOUT_S:g} s\n{tails}")
        time.sleep(0.05)


# -------------------------------------------------------------------------------------------------- progress
def last_metrics(path: Path) -> dict[str, Any] | None:
    """The last complete JSON line of a metrics file (reads only its tail)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            data = fh.read()
    except OSError:
        return None
    for line in reversed(data.splitlines()):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            return rec
    return None


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def progress_line(records: Sequence[dict[str, Any] | None], node_ids: Sequence[str], epochs: float) -> str:
    parts, nbrs, sent = [], [], 0
    for node_id, rec in zip(node_ids, records, strict=True):
        if rec is None:
            parts.append(f"{node_id} -")
            nbrs.append("-")
            continue
        ep = float(rec.get("epoch") or 0.0)
        parts.append(f"{node_id} {'done' if rec.get('training_done') else f'{ep:.1f}/{epochs:g}'}")
        nbrs.append(str(len(rec.get("neighbours") or [])))
        sent += int(rec.get("bytes_sent") or 0)
    phase = "consensus" if all(r is not None and r.get("training_done") for r in records) else "training"
    return f"{phase}  {'  '.join(parts)}  neighbours {'/'.join(nbrs)}  sent {_mb(sent)}"


def foreign_neighbours(records: Sequence[dict[str, Any] | None], node_ids: Sequence[str]) -> set[str]:
    """Neighbours in the metrics that are not this demo's peers (another daemon on the same mDNS link)."""
    ours = set(node_ids)
    return {str(j) for r in records if r for j in (r.get("neighbours") or []) if str(j) not in ours}


def watch(procs: Sequence[PeerProc], epochs: float, deadline: float, foreign: set[str] | None = None) -> float:
    """Show progress until every peer reports training_done; returns the training wall time.

    Neighbours that are not this demo's peers are added to `foreign` (and reported once).
    """
    tty = sys.stdout.isatty()
    node_ids = [p.node_id for p in procs]
    started = time.monotonic()
    last_plain = -math.inf
    width = 0
    try:
        while True:
            _check_alive(procs, "during training")
            records = [last_metrics(p.state_dir / "metrics.jsonl") for p in procs]
            strangers = foreign_neighbours(records, node_ids) - (foreign or set())
            if strangers and foreign is not None:
                foreign |= strangers
                names = ", ".join(sorted(strangers))
                print(
                    f"\nwarning: peers outside this demo joined the network over mDNS: {names}; the results mix in "
                    "their models",
                    file=sys.stderr,
                )
            done = all(r is not None and r.get("training_done") for r in records)
            line = progress_line(records, node_ids, epochs)
            now = time.monotonic()
            if tty:
                # One line, cut to the terminal width so that "\r" can overwrite it.
                shown = line[: max(20, shutil.get_terminal_size().columns - 1)]
                sys.stdout.write("\r" + shown.ljust(width))
                sys.stdout.flush()
                width = max(width, len(shown))
            elif now - last_plain >= 5.0 or done:
                print(line, flush=True)
                last_plain = now
            if done:
                return now - started
            if now > deadline:
                raise TimeoutError(f"--timeout-s expired during training; last progress: {line}")
            time.sleep(0.5)
    finally:
        if tty:
            sys.stdout.write("\n")
            sys.stdout.flush()


# ------------------------------------------------------------------------------------------------ evaluation
def train_reference(
    x: np.ndarray, y: np.ndarray, cfg: Any, input_shape: tuple[int, ...], num_classes: int, *, seed: int, device: Any
) -> Any:
    """Train like a peer without neighbours: same model init, optimizer, batch size, epochs and lr schedule."""
    from peer import training

    t = cfg.train
    return training.train_reference(
        x,
        y,
        model_name=cfg.model.name,
        input_shape=input_shape,
        num_classes=num_classes,
        epochs=t.epochs,
        batch_size=t.batch_size,
        lr=t.lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        optimizer=t.optimizer,
        seed=seed,
        device=device,
        lr_schedule=t.lr_schedule,
        model_seed=cfg.model.seed,
    )


def evaluate_peers(cfgs: Sequence[Any], device: Any) -> tuple[list[float], float]:
    """Test accuracy of every peer's final checkpoint and the consensus distance between them."""
    from peer import checkpoint
    from peer.data import load_dataset
    from peer.models import build_model, flatten_params
    from peer.training import evaluate

    c0 = cfgs[0]
    ds = load_dataset(c0.data.dataset, c0.data.path, seed=c0.data.seed, test_fraction=c0.data.test_fraction)
    accs, flats = [], []
    for cfg in cfgs:
        state = checkpoint.load(cfg.state_dir)
        if state is None:
            raise DemoError(f"{cfg.node_id} wrote no checkpoint in {cfg.state_dir}")
        model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, seed=cfg.model.seed)
        model.load_state_dict(state["model"])
        accs.append(evaluate(model.to(device), ds.x_test, ds.y_test)[0])
        flats.append(flatten_params(model).numpy())
    return accs, consensus_distance(flats)


def reference_accuracies(cfgs: Sequence[Any], device: Any) -> tuple[float, list[float]]:
    """(centralized accuracy, local-only accuracy of each partition)."""
    import numpy as np

    from peer.data import load_dataset, local_partition
    from peer.training import evaluate

    c0 = cfgs[0]
    ds = load_dataset(c0.data.dataset, c0.data.path, seed=c0.data.seed, test_fraction=c0.data.test_fraction)
    parts = [
        local_partition(ds, c.data.partition, c.data.num_partitions, c.data.partition_index, c.data.seed) for c in cfgs
    ]
    x_all = np.concatenate([p[0] for p in parts])
    y_all = np.concatenate([p[1] for p in parts])
    central = train_reference(x_all, y_all, c0, ds.input_shape, ds.num_classes, seed=c0.train.seed, device=device)
    central_acc = evaluate(central, ds.x_test, ds.y_test)[0]
    local = []
    for cfg, (x, y) in zip(cfgs, parts, strict=True):
        # The peer's own minibatch seed, as in peer.node.
        seed = cfg.train.seed + 1000 * cfg.data.partition_index
        model = train_reference(x, y, cfg, ds.input_shape, ds.num_classes, seed=seed, device=device)
        local.append(evaluate(model, ds.x_test, ds.y_test)[0])
    return central_acc, local


def snapshot_curves(cfgs: Sequence[Any], bin_s: float = SNAPSHOT_BIN_S) -> dict[str, list[float]]:
    """Mean / min test accuracy and consensus distance over time, from the peers' parameter snapshots."""
    import numpy as np
    import torch

    from peer.data import load_dataset
    from peer.models import build_model, load_flat_params
    from peer.training import evaluate

    c0 = cfgs[0]
    ds = load_dataset(c0.data.dataset, c0.data.path, seed=c0.data.seed, test_fraction=c0.data.test_fraction)
    model = build_model(c0.model.name, ds.input_shape, ds.num_classes, seed=c0.model.seed)
    per_peer = {c.node_id: list_snapshots(Path(c.state_dir)) for c in cfgs}
    out: dict[str, list[float]] = {"time_s": [], "mean_accuracy": [], "min_accuracy": [], "consensus_distance": []}
    xt = torch.as_tensor(ds.x_test)
    yt = torch.as_tensor(ds.y_test)
    for t, snaps in bin_snapshots(per_peer, bin_s):
        flats, accs = [], []
        try:
            for c in cfgs:
                flat = np.load(snaps[c.node_id].path)
                load_flat_params(model, torch.from_numpy(flat))
                accs.append(evaluate(model, xt, yt)[0])
                flats.append(flat)
        except (OSError, ValueError):
            continue  # a torn or foreign file: skip the bin
        out["time_s"].append(t)
        out["mean_accuracy"].append(float(np.mean(accs)))
        out["min_accuracy"].append(float(np.min(accs)))
        out["consensus_distance"].append(consensus_distance(flats))
    return out


def training_done_offset(cfgs: Sequence[Any]) -> float | None:
    """Seconds from the earliest snapshot until the last peer reported training_done (for the plot)."""
    from peer.metrics import read

    first_snap = [s.unix_ms for c in cfgs for s in list_snapshots(Path(c.state_dir))[:1]]
    done_times = []
    for c in cfgs:
        t = next((r["time"] for r in read(Path(c.state_dir) / "metrics.jsonl") if r.get("training_done")), None)
        if t is None:
            return None
        done_times.append(float(t))
    if not first_snap or not done_times:
        return None
    return max(done_times) - min(first_snap) / 1000.0


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
        ("bytes sent (all peers)", _mb(summary["bytes_sent"])),
        ("send failures", str(summary["send_failures"])),
        ("training wall time", f"{summary['training_wall_s']:.1f} s"),
        ("demo wall time", f"{summary['wall_s']:.1f} s"),
    ]
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
    from peer.training import select_device

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
        _check_alive(procs, "after training")
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
    phases["references_s"] = time.monotonic() - t_mark
    from peer.metrics import read

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
            from peer.plot import write_plot

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
