"""`peer report STATE_DIR... --out DIR`: PNG plots and a summary of any run, from what its daemons left behind.

Reads each state_dir's `metrics.jsonl` (loss, bytes, the algorithm's figures) and, when present, its config copy,
checkpoint and parameter snapshots. Writes `loss.png`, `bytes.png`, `consensus.png`, `accuracy.png` and
`summary.json`. Consensus distance is the true one (mean ‖θ_i − θ̄‖ / ‖θ̄‖ across the given peers) where every
peer kept snapshots (`metrics.snapshot_interval_s` > 0), else each peer's local estimate
(`algo_neighbour_distance`, cdl). Accuracy is over time from snapshots, else of each final checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peer import config as config_mod
from peer.config import PeerConfig
from peer.daemon.metrics import read as read_metrics
from peer.errors import ConfigError, DataError, PeerError


@dataclass
class PeerRun:
    state_dir: Path
    node_id: str
    records: list[dict[str, Any]]
    cfg: PeerConfig | None = None
    notes: list[str] = field(default_factory=list)


def load_runs(state_dirs: list[str | Path]) -> list[PeerRun]:
    """Each state_dir's metrics and config copy; DataError naming a directory that holds neither."""
    runs = []
    for d in map(Path, state_dirs):
        records = [r for r in read_metrics(d / "metrics.jsonl") if isinstance(r.get("time"), (int, float))]
        cfg = None
        if (d / "config.yaml").exists():
            try:
                cfg = config_mod.load(d / "config.yaml").model_copy(update={"state_dir": str(d)})
            except ConfigError:
                cfg = None
        if not records and cfg is None:
            raise DataError(f"{d} holds neither metrics.jsonl nor config.yaml: is it a peer state_dir?")
        node_id = cfg.node_id if cfg is not None else str(records[0].get("node_id", d.name))
        runs.append(PeerRun(d, node_id, records, cfg))
    return runs


def _series(run: PeerRun, key: str, t0: float) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in run.records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(float(r["time"]) - t0)
            ys.append(float(v))
    return xs, ys


def _rate(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    """Per-second rate of a cumulative counter (a restart that resets it gives no negative rate)."""
    out_x, out_y = [], []
    for (x0, y0), (x1, y1) in zip(zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=True), strict=False):
        if x1 > x0:
            out_x.append(x1)
            out_y.append(max(0.0, (y1 - y0) / (x1 - x0)))
    return out_x, out_y


def _snapshot_curves(runs: list[PeerRun]) -> dict[str, list[float]] | None:
    from peer.tools.demo_eval import list_snapshots, snapshot_curves

    cfgs = [r.cfg for r in runs]
    if not runs or any(c is None for c in cfgs) or not all(list_snapshots(r.state_dir) for r in runs):
        return None
    curves = snapshot_curves([c for c in cfgs if c is not None])
    return curves if curves["time_s"] else None


def _final_accuracy(run: PeerRun) -> float | None:
    from peer.tools.evaluate import evaluate_state_dir

    try:
        return float(evaluate_state_dir(run.state_dir)["accuracy"])
    except (PeerError, OSError, ValueError) as exc:
        run.notes.append(f"no accuracy: {exc}")
        return None


def write_report(state_dirs: list[str | Path], out: str | Path, *, evaluate: bool = True) -> dict[str, Any]:
    """Write the plots and `summary.json` into `out`; returns the summary."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(state_dirs)
    times = [float(r["time"]) for run in runs for r in run.records]
    t0 = min(times) if times else 0.0
    curves = _snapshot_curves(runs) if evaluate else None
    snap_t0 = _first_snapshot_s(runs)
    offset = (snap_t0 - t0) if snap_t0 is not None else 0.0
    files: list[str] = []

    def save(fig: Any, name: str, title: str) -> None:
        fig.suptitle(title)
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)

    fig, ax = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
    for run in runs:
        ax.plot(*_series(run, "loss", t0), lw=1.2, label=run.node_id)
    ax.set(xlabel="time (s)", ylabel="training loss (latest step)")
    _finish(ax, runs)
    save(fig, "loss.png", "training loss")

    fig, (ax_total, ax_rate) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for run in runs:
        xs, ys = _series(run, "bytes_sent", t0)
        ax_total.plot(xs, [y / 1e6 for y in ys], lw=1.2, label=run.node_id)
        rx, ry = _rate(xs, ys)
        ax_rate.plot(rx, [y / 1e3 for y in ry], lw=1.0, label=run.node_id)
    ax_total.set(xlabel="time (s)", ylabel="MB sent (cumulative)")
    ax_rate.set(xlabel="time (s)", ylabel="kB/s sent")
    _finish(ax_total, runs)
    _finish(ax_rate, runs)
    save(fig, "bytes.png", "bytes sent to neighbours")

    fig, ax = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
    consensus = "none"
    if curves is not None:
        pts = [(t + offset, d) for t, d in zip(curves["time_s"], curves["consensus_distance"], strict=True) if d > 0]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=2, color="C1", label="across peers (snapshots)")
        consensus = "snapshots"
    else:
        for run in runs:
            xs, ys = _series(run, "algo_neighbour_distance", t0)
            if xs:
                ax.plot(xs, ys, lw=1.0, label=f"{run.node_id} (to its neighbours)")
                consensus = "local estimate"
    ax.set(xlabel="time (s)", ylabel="‖θᵢ − θ̄‖ / ‖θ̄‖")
    if consensus != "none":
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no snapshots and no neighbour_distance in the metrics", ha="center", transform=ax.transAxes)
    _finish(ax, runs)
    save(fig, "consensus.png", f"consensus distance ({consensus})")

    final = {run.node_id: _final_accuracy(run) for run in runs} if evaluate else {}
    fig, ax = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
    if curves is not None:
        t = [x + offset for x in curves["time_s"]]
        ax.plot(t, [100 * a for a in curves["mean_accuracy"]], lw=2, color="C0", label="peers (mean)")
        ax.plot(t, [100 * a for a in curves["min_accuracy"]], lw=1, ls=":", color="C0", label="peers (min)")
        ax.set(xlabel="time (s)", ylabel="test accuracy (%)", ylim=(0, 100))
    else:
        known = {k: v for k, v in final.items() if v is not None}
        ax.bar(list(known), [100 * v for v in known.values()], color="C0")
        ax.set(ylabel="test accuracy of the final checkpoint (%)", ylim=(0, 100))
    ax.grid(alpha=0.3)
    if curves is not None:
        ax.legend(fontsize=8)
    save(fig, "accuracy.png", "test accuracy")

    summary = {
        "peers": [_peer_summary(run, final.get(run.node_id)) for run in runs],
        "consensus_distance": consensus,
        "final_consensus_distance": curves["consensus_distance"][-1] if curves else None,
        "files": files,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _first_snapshot_s(runs: list[PeerRun]) -> float | None:
    from peer.tools.demo_eval import list_snapshots

    first = [s.unix_ms for r in runs for s in list_snapshots(r.state_dir)[:1]]
    return min(first) / 1000.0 if first else None


def _finish(ax: Any, runs: list[PeerRun]) -> None:
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0] and len(runs) <= 12:
        ax.legend(fontsize=8)


def _peer_summary(run: PeerRun, accuracy: float | None) -> dict[str, Any]:
    last = run.records[-1] if run.records else {}
    return {
        "node_id": run.node_id,
        "state_dir": str(run.state_dir),
        "records": len(run.records),
        "step": last.get("step"),
        "loss": last.get("loss"),
        "bytes_sent": last.get("bytes_sent"),
        "bytes_received": last.get("bytes_received"),
        "accuracy": accuracy,
        "notes": run.notes,
    }
