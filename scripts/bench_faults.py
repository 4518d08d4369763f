#!/usr/bin/env python3
"""Benchmark: `peer demo` under injected faults, side by side with a fault-free baseline.

Runs `python -m peer demo --json ...` once per variant and seed, one after another on this machine with the same
seed, and writes a markdown table and the raw figures:

    baseline    the default demo (4 peers, ring, cdl, digits shards:2)
    lossy       --faults drop=0.3,flap=peer-0:peer-1:2:2   (30% of pushes lost, one link flapping ~2 s up / 2 s down)
    straggler   --faults straggler=peer-1:4                 (peer-1 trains 4x slower)

Figures (goals in brackets; measured, never asserted):
    lossy:     mean test accuracy and its difference to the baseline's           [within 2 points]
               injected fault counts (random drops, outage drops)
    straggler: max training time of the OTHER peers / the baseline's max training time   [<= 1.25]
               the straggler's own training time, accuracies

Usage:
    .venv/bin/python scripts/bench_faults.py                      # seed 0, default epochs
    .venv/bin/python scripts/bench_faults.py --seeds 0 1 --out bench-results
    .venv/bin/python scripts/bench_faults.py --quick              # fewer epochs, for a smoke run

Writes OUT/faults.md and OUT/faults.json (default OUT: bench-results), and keeps each run's demo output (logs,
JSON) under OUT/faults-runs/. Every row of the table carries the exact command that reproduces it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peer.tools.revision import git_revision  # noqa: E402

STRAGGLER_ID = "peer-1"
STRAGGLER_FACTOR = 4.0
LOSSY_GOAL_POINTS = 2.0
STRAGGLER_GOAL_RATIO = 1.25
QUICK_EPOCHS = 20.0


@dataclass(frozen=True)
class Variant:
    name: str
    faults: str
    what: str


VARIANTS = (
    Variant("baseline", "", "no injected faults"),
    Variant("lossy", "drop=0.3,flap=peer-0:peer-1:2:2", "30% drops + link peer-0/peer-1 flapping 2 s up / 2 s down"),
    Variant(
        "straggler",
        f"straggler={STRAGGLER_ID}:{STRAGGLER_FACTOR:g}",
        f"{STRAGGLER_ID} trains {STRAGGLER_FACTOR:g}x slower",
    ),
)


def _display_python() -> str:
    """The interpreter as the reader would type it: relative to the repository when it lives there."""
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(ROOT))
    except ValueError:
        return str(exe)


def demo_argv(variant: Variant, seed: int, json_path: Path, args: argparse.Namespace) -> list[str]:
    argv = ["-m", "peer", "demo", "--seed", str(seed), "--json", str(json_path), "--timeout-s", str(args.timeout_s)]
    if args.epochs is not None:
        argv += ["--epochs", f"{args.epochs:g}"]
    if args.peers is not None:
        argv += ["--peers", str(args.peers)]
    if variant.faults:
        argv += ["--faults", variant.faults]
    for item in args.set:
        argv += ["--set", item]
    return argv


def run_variant(variant: Variant, seed: int, runs_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run one demo; returns its JSON summary plus `command`, `bench_wall_s` and `returncode`."""
    tag = f"{variant.name}-seed{seed}"
    json_path = runs_dir / f"{tag}.json"
    log_path = runs_dir / f"{tag}.log"
    json_path.unlink(missing_ok=True)
    argv = demo_argv(variant, seed, json_path, args)
    shown = shlex.join([_display_python(), *argv])
    print(f"\n== {tag}: {shown}", flush=True)
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.run([sys.executable, *argv], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.monotonic() - started
    result: dict[str, Any] = {}
    if json_path.exists():
        result = json.loads(json_path.read_text(encoding="utf-8"))
    ok = proc.returncode == 0 and bool(result)
    print(f"   {'done' if ok else 'FAILED'} in {wall:.0f} s (exit {proc.returncode}); log {log_path}", flush=True)
    if not ok:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        print("\n".join("   | " + line for line in tail), file=sys.stderr)
    return {**result, "variant": variant.name, "command": shown, "returncode": proc.returncode, "bench_wall_s": wall}


# --------------------------------------------------------------------------------------------- figures
def _peer_index(node_id: str) -> int:
    return int(node_id.rsplit("-", 1)[1])


def figures(run: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, Any]:
    """The derived figures of one run (relative ones against the baseline of the same seed)."""
    out: dict[str, Any] = {"ok": run.get("returncode") == 0 and "mean_accuracy" in run}
    if not out["ok"]:
        return out
    times = [float(t) for t in run.get("per_peer_training_s") or []]
    out.update(
        mean_accuracy=run["mean_accuracy"],
        min_accuracy=run["min_accuracy"],
        centralized_accuracy=run["centralized_accuracy"],
        local_only_accuracy=run["local_only_accuracy"],
        consensus_distance=run["consensus_distance"],
        max_training_s=max(times) if times else None,
        injected_faults=run.get("injected_faults") or {},
        send_failures=run.get("send_failures"),
    )
    base_ok = baseline is not None and baseline.get("returncode") == 0 and "mean_accuracy" in baseline
    if base_ok:
        assert baseline is not None
        out["delta_points"] = 100.0 * (run["mean_accuracy"] - baseline["mean_accuracy"])
    if run["variant"] == "straggler" and times:
        s = _peer_index(STRAGGLER_ID)
        others = [t for i, t in enumerate(times) if i != s]
        out["straggler_training_s"] = times[s] if s < len(times) else None
        out["others_max_training_s"] = max(others) if others else None
        out["straggler_accuracy"] = run["per_peer_accuracy"][s] if s < len(run["per_peer_accuracy"]) else None
        others_acc = [a for i, a in enumerate(run["per_peer_accuracy"]) if i != s]
        out["others_mean_accuracy"] = statistics.fmean(others_acc) if others_acc else None
        base_times = [float(t) for t in (baseline or {}).get("per_peer_training_s") or []]
        if base_ok and base_times and max(base_times) > 0 and others:
            out["baseline_max_training_s"] = max(base_times)
            out["others_time_ratio"] = max(others) / max(base_times)
    if run["variant"] == "lossy" and "delta_points" in out:
        out["goal_met"] = abs(out["delta_points"]) <= LOSSY_GOAL_POINTS
    if run["variant"] == "straggler" and "others_time_ratio" in out:
        out["goal_met"] = out["others_time_ratio"] <= STRAGGLER_GOAL_RATIO
    return out


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):.2f}%"


def _s(v: Any) -> str:
    return "-" if v is None else f"{float(v):.1f} s"


def _goal(f: dict[str, Any]) -> str:
    if "goal_met" not in f:
        return "-"
    return "yes" if f["goal_met"] else "**no**"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# peer demo under injected faults",
        "",
        f"{meta['when']} on {meta['host']} ({meta['cpus']} CPUs), git {meta['git']}, "
        f"seeds {', '.join(map(str, meta['seeds']))}"
        + (f", {meta['epochs']:g} epochs" if meta["epochs"] is not None else ", default epochs")
        + ". Each variant ran alone, one after another, with the same seed.",
        "",
        "Goals: lossy mean accuracy within "
        f"{LOSSY_GOAL_POINTS:g} points of the baseline; with a {STRAGGLER_FACTOR:g}x straggler, the other peers' "
        f"max training time at most {STRAGGLER_GOAL_RATIO:g}x the baseline's max.",
        "",
        "| variant | seed | mean acc | min acc | centralized | Δ vs baseline | drops / outage drops "
        "| max training (others) | ratio vs baseline | straggler training | goal met |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = r["figures"]
        if not f["ok"]:
            lines.append(f"| {r['variant']} | {r['seed']} | FAILED (exit {r['returncode']}) | | | | | | | | |")
            continue
        inj = f["injected_faults"]
        drops = f"{inj.get('faults_dropped', 0)} / {inj.get('faults_outage_dropped', 0)}"
        delta = "-" if r["variant"] == "baseline" or "delta_points" not in f else f"{f['delta_points']:+.2f} pts"
        others = f.get("others_max_training_s", f.get("max_training_s"))
        ratio = f"{f['others_time_ratio']:.2f}" if "others_time_ratio" in f else "-"
        lines.append(
            f"| {r['variant']} | {r['seed']} | {_pct(f['mean_accuracy'])} | {_pct(f['min_accuracy'])} "
            f"| {_pct(f['centralized_accuracy'])} | {delta} | {drops} | {_s(others)} | {ratio} "
            f"| {_s(f.get('straggler_training_s'))} | {_goal(f)} |"
        )
    straggler = [r for r in rows if r["variant"] == "straggler" and r["figures"]["ok"]]
    if straggler:
        lines += ["", "Straggler runs, accuracy of the straggler vs the others:", ""]
        for r in straggler:
            f = r["figures"]
            lines.append(
                f"- seed {r['seed']}: {STRAGGLER_ID} {_pct(f.get('straggler_accuracy'))}, "
                f"others (mean) {_pct(f.get('others_mean_accuracy'))}"
            )
    lines += ["", "Commands (run from the repository root):", ""]
    for r in rows:
        lines.append(f"- {r['variant']}, seed {r['seed']}: `{r['command']}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--out", default="bench-results", help="output folder (default bench-results)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds to repeat every variant with (default 0)")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_EPOCHS:g} epochs instead of the demo's default")
    p.add_argument("--epochs", type=float, default=None, help="local epochs per peer (default: the demo's)")
    p.add_argument("--peers", type=int, default=None, help="number of peers (default: the demo's, 4)")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=[v.name for v in VARIANTS],
        default=[v.name for v in VARIANTS],
        help="which variants to run (the baseline is needed for the relative figures)",
    )
    p.add_argument("--timeout-s", type=float, default=600.0, help="per-demo time bound (default 600)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to every demo")
    args = p.parse_args(argv)
    if args.quick and args.epochs is None:
        args.epochs = QUICK_EPOCHS

    out = Path(args.out)
    runs_dir = out / "faults-runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    chosen = [v for v in VARIANTS if v.name in args.variants]
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    revision = git_revision(ROOT)
    for seed in args.seeds:
        baseline: dict[str, Any] | None = None
        for variant in chosen:
            run = run_variant(variant, seed, runs_dir, args)
            if variant.name == "baseline":
                baseline = run
            rows.append(
                {
                    "variant": variant.name,
                    "faults": variant.faults,
                    "seed": seed,
                    "command": run["command"],
                    "returncode": run["returncode"],
                    "bench_wall_s": run["bench_wall_s"],
                    "figures": figures(run, baseline),
                    "summary": {k: v for k, v in run.items() if k not in ("command", "returncode", "bench_wall_s")},
                }
            )

    meta = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": os.uname().nodename,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "git": revision,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "peers": args.peers,
        "overrides": args.set,
        "wall_s": time.monotonic() - started,
        "goals": {"lossy_within_points": LOSSY_GOAL_POINTS, "straggler_time_ratio_max": STRAGGLER_GOAL_RATIO},
    }
    table = markdown(rows, meta)
    (out / "faults.md").write_text(table, encoding="utf-8")
    (out / "faults.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=2) + "\n", encoding="utf-8")
    print()
    print(table)
    print(f"wrote {out / 'faults.md'} and {out / 'faults.json'} ({meta['wall_s']:.0f} s in all)")
    return 0 if all(r["figures"]["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
