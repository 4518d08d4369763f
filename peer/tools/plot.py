"""The demo's figure: test accuracy and consensus distance over time (matplotlib, Agg, imported lazily)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def write_plot(
    path: str | Path,
    curves: Mapping[str, Sequence[float]],
    summary: Mapping[str, Any],
    *,
    done_at_s: float | None = None,
) -> Path:
    """Draw `curves` (time_s, mean_accuracy, min_accuracy, consensus_distance) into a two-panel PNG at `path`.

    `summary` supplies the title and the reference lines (centralized_accuracy, local_only_accuracy);
    `done_at_s` marks when the last peer finished its epochs (consensus-only rounds follow).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    t = list(curves.get("time_s", []))
    fig, (ax_acc, ax_cd) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    try:
        if t:
            ax_acc.plot(t, [100 * a for a in curves["mean_accuracy"]], color="C0", lw=2, label="peers (mean)")
            ax_acc.plot(t, [100 * a for a in curves["min_accuracy"]], color="C0", lw=1, ls=":", label="peers (min)")
        for key, label, color in (
            ("centralized_accuracy", "centralized", "C2"),
            ("local_only_accuracy", "local-only (mean)", "C3"),
        ):
            value = summary.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                ax_acc.axhline(100 * value, color=color, ls="--", lw=1.2, label=f"{label} {100 * value:.1f}%")
        ax_acc.set_xlabel("time (s)")
        ax_acc.set_ylabel("test accuracy (%)")
        ax_acc.set_ylim(0, 100)
        ax_acc.grid(alpha=0.3)
        ax_acc.set_title("test accuracy")

        dist = [
            (x, d) for x, d in zip(t, curves.get("consensus_distance", []), strict=False) if math.isfinite(d) and d > 0
        ]
        if dist:
            ax_cd.plot([x for x, _ in dist], [d for _, d in dist], color="C1", lw=2)
            ax_cd.set_yscale("log")
        ax_cd.set_xlabel("time (s)")
        ax_cd.set_ylabel("mean ‖θᵢ − θ̄‖ / ‖θ̄‖")
        ax_cd.grid(alpha=0.3, which="both")
        ax_cd.set_title("consensus distance")

        if done_at_s is not None and math.isfinite(done_at_s):
            for ax in (ax_acc, ax_cd):
                ax.axvline(done_at_s, color="grey", ls="-.", lw=1, label="training done")
        ax_acc.legend(loc="lower right", fontsize=8)
        if done_at_s is not None:
            ax_cd.legend(loc="upper right", fontsize=8)

        title = (
            f"{summary.get('algorithm', '?')}: {summary.get('peers', '?')} peers, {summary.get('topology', '?')}, "
            f"{summary.get('dataset', '?')} {summary.get('partition', '')}, {summary.get('model', '?')}, "
            f"seed {summary.get('seed', '?')}"
        )
        fig.suptitle(title)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path
