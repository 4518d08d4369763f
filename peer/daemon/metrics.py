"""Counters the daemon keeps, and the JSON-lines file `state_dir/metrics.jsonl` they are appended to."""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# Upper bounds (seconds) of the push-duration histogram: loopback pushes take milliseconds, slow links seconds.
PUSH_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Histogram:
    """A fixed-bucket histogram (counts per bucket, the last for +Inf) with the sum of observed values."""

    bounds: tuple[float, ...] = PUSH_BUCKETS_S
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        i = next((k for k, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        self.counts[i] += 1
        self.total += value

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= bound) for every bucket, +Inf last, as Prometheus exposes them."""
        out, running = [], 0
        for bound, n in zip([*self.bounds, math.inf], self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


@dataclass
class Counters:
    """Monotonic counters and the latest training figures. Updated from the loop and the training thread."""

    step: int = 0
    epoch: float = 0.0
    seq: int = 0
    loss: float = float("nan")
    rounds: int = 0
    mixes: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    send_failures: int = 0
    send_retries: int = 0
    rejected_messages: int = 0
    tarpit_held: int = 0  # refusals the server's tarpit held before answering (peer.core.tarpit)
    dropped_stale: int = 0
    catchups: int = 0
    evictions: int = 0
    readmissions: int = 0
    training_done: bool = False
    training_s: float = 0.0  # wall time from the first local step of this run to the last one
    # The live evaluation (peer.daemon.evaluator): the step it scored, accuracy (NaN unless classification), loss.
    eval_step: int = -1
    eval_accuracy: float = float("nan")
    eval_loss: float = float("nan")
    eval_samples: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # refused remote input, by reason
    # Push durations by outcome ("ok", "error"); for the Prometheus endpoint only, not in metrics.jsonl.
    push_seconds: dict[str, Histogram] = field(default_factory=dict, repr=False, compare=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        with self.lock:
            for name, value in deltas.items():
                setattr(self, name, getattr(self, name) + value)

    def reject(self, reason: str) -> None:
        with self.lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def observe_push(self, outcome: str, seconds: float) -> None:
        with self.lock:
            self.push_seconds.setdefault(outcome, Histogram()).observe(seconds)

    def push_histograms(self) -> dict[str, tuple[list[tuple[float, int]], float]]:
        """Per outcome: the cumulative buckets and the sum of push durations."""
        with self.lock:
            return {k: (h.cumulative(), h.total) for k, h in self.push_seconds.items()}

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("lock", "push_seconds")}
            out["rejected"] = dict(self.rejected)
            return out

    def restore(self, saved: dict[str, Any]) -> None:
        for name in ("step", "epoch", "seq", "rounds", "mixes", "bytes_sent", "bytes_received"):
            if name in saved:
                setattr(self, name, type(getattr(self, name))(saved[name]))


def metrics_record(
    event: str, node_id: str, started: float, neighbours: list[str], counters: Counters, extra: dict[str, Any]
) -> dict[str, Any]:
    """One line of metrics.jsonl: the counters, the neighbours, and what the faults and the algorithm add."""
    return {
        "event": event,
        "node_id": node_id,
        "time": time.time(),
        "elapsed_s": time.monotonic() - started,
        "neighbours": neighbours,
        **counters.snapshot(),
        **extra,
    }


class MetricsLog:
    """Appends one JSON object per line; each line is flushed so that a crash loses at most one record."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        line = json.dumps(clean, separators=(",", ":"), default=str)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def read(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a metrics file (a torn last line from a crash is skipped)."""
    out: list[dict[str, Any]] = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def extra_metrics(faults: Any, shards: Any, algorithm: Any, pacer: Any) -> dict[str, Any]:
    """The parts of a metrics record beyond the counters: injected faults, data shards, the algorithm's own
    counters (prefixed `algo_`) and the pacing figures."""
    extra: dict[str, Any] = {f"faults_{k}": v for k, v in faults.counters.items()} if faults.enabled else {}
    if shards is not None:
        extra.update(shards_loaded=len(shards.files), shards_trained=shards.num_trained, train_samples=len(shards))
    try:
        extra.update({f"algo_{k}": v for k, v in algorithm.metrics().items()})
        extra.update(pacer.metrics())
    except RuntimeError:  # a dict resized by the training thread mid-read: next time
        pass
    return extra
