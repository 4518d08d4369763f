"""`peer simulate`: hundreds of peers running the real algorithm, oracle and wire code, on one machine or on Ray.

The peers live in groups (`peer.tools.sim_peers`), several per Ray actor or all in this process
(`peer.tools.sim_backends`), and run in ticks of virtual time. Training runs `train.epochs` local epochs as the
daemon does, after which the peers only mix; the run stops once the relative disagreement falls to `--tol` (or
`--max-rounds` mixing rounds have passed). The rate at which the disagreement shrank in the mixing-only phase is
compared with the spectral-gap prediction: λ, the second-largest eigenvalue modulus of the mixing matrix W of the
topology. The in-memory simulator (`peer.algorithms.sim`) stays the harness of the unit tests.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from peer import algorithms, config
from peer.algorithms.mixing import WEIGHT_RULES, mixing_matrix, second_largest_eigenvalue_modulus
from peer.config import PeerConfig
from peer.core.topology import graph, is_time_varying, parse_topology
from peer.errors import ConfigError, SimulationStalledError
from peer.tools.revision import git_revision
from peer.tools.sim_backends import import_ray, make_backend
from peer.tools.sim_faults import plan_faults
from peer.tools.sim_measure import RoundTracker, measured_rate, predicted_rounds
from peer.tools.sim_peers import GroupFinal, GroupSetup, PeerPlan

# What makes a run a simulation: a small model, heterogeneous shards, a synchronous algorithm whose mixing is
# exactly W (so the spectral-gap prediction applies), and a constant step so that training ends visibly apart.
SIM_DEFAULTS = {
    "node_id": "sim",
    "algorithm.name": "dpsgd",
    "model.name": "logreg",
    "data.partition": "shards:2",
    "train.epochs": "10",
    "train.lr_schedule": "constant",
}
PROGRESS_EVERY_S = 10.0


def build_config(args: argparse.Namespace, topology: str) -> PeerConfig:
    seeds = {"data.seed", "model.seed", "train.seed", "membership.topology_seed"}
    defaults = {**SIM_DEFAULTS, **dict.fromkeys(seeds, str(args.seed)), "topology": topology}
    cfg = config.load(None, [f"{k}={v}" for k, v in defaults.items()] + list(args.set))
    algo = algorithms.create(cfg.algorithm, "check")
    if not algo.owns_local_update or algo.trains_own_model:
        raise ConfigError(
            f"{algo.name} cannot be simulated: peer simulate runs step-mode algorithms that train the model's "
            "parameters (dpsgd, dmsgd, dmsgd_async, local_sgd, next, next_pushsum, sgp, choco, digest)",
            field="algorithm.name",
        )
    if is_time_varying(parse_topology(cfg.topology)):
        raise ConfigError("peer simulate runs static topologies (ring, full, exponential, random-regular:K)")
    return cfg


def training_ticks(cfg: PeerConfig, n: int) -> int:
    """The most local steps any peer takes (the daemon's total_steps), to place churn within training."""
    from peer.learn.data import load_dataset, partition_indices

    ds = load_dataset(cfg.data.dataset, cfg.data.path, seed=cfg.data.seed, test_fraction=cfg.data.test_fraction)
    parts = partition_indices(ds.y_train, cfg.data.partition, n, cfg.data.seed)
    bs = cfg.train.batch_size
    return max(max(1, math.ceil(cfg.train.epochs * math.ceil(len(p) / bs))) for p in parts)


def simulate_one(args: argparse.Namespace, topology: str) -> dict[str, Any]:
    n, tick_s = args.peers, args.tick_ms / 1000.0
    if n < 2 or args.actors < 1:
        raise ConfigError("--peers must be >= 2 and --actors >= 1", source="command line")
    cfg = build_config(args, topology)
    ids = [f"peer-{i}" for i in range(n)]
    adj = graph(parse_topology(cfg.topology), ids, seed=cfg.membership.topology_seed)
    rule = getattr(cfg.algorithm, "weights", "metropolis")
    w = mixing_matrix({i: sorted(adj[i]) for i in ids}, rule if rule in WEIGHT_RULES else "metropolis")
    slem = second_largest_eigenvalue_modulus(w)
    faults = plan_faults(args.faults, ids, seed=args.seed, tick_s=tick_s, training_ticks=training_ticks(cfg, n))
    order = sorted(ids)
    actors = min(args.actors, n)
    chunks = [order[g * n // actors : (g + 1) * n // actors] for g in range(actors)]
    group_of = {node: g for g, chunk in enumerate(chunks) for node in chunk}
    setups = [
        GroupSetup(
            cfg,
            tuple(
                PeerPlan(
                    node,
                    ids.index(node),
                    {j: len(adj[j]) for j in sorted(adj[node])},
                    faults.faults[node],
                    faults.away.get(node),
                )
                for node in chunk
            ),
            group_of,
            actors,
            tick_s,
        )
        for chunk in chunks
    ]
    start = time.perf_counter()
    ray_options = {"address": args.address, "num_cpus": args.num_cpus, "object_store_bytes": args.object_store_mb << 20}
    backend = make_backend(args.backend, setups, **ray_options)
    try:
        setup_s = time.perf_counter() - start
        give_up_ticks = float(getattr(cfg.algorithm, "give_up_s", 10.0)) / tick_s
        run = _run(backend, args, tick_s, stall_ticks=max(10_000, math.ceil(4 * give_up_ticks)))
        finals = backend.finish()
        mean_accuracy = backend.evaluate(run.pop("mean"))
    finally:
        backend.close()
    counters: dict[str, float] = {}
    for f in finals:
        for k, v in {**f.counters, **f.algo_metrics}.items():
            counters[k] = counters.get(k, 0) + v
    accuracies = [a for f in finals for a in f.accuracies]
    rounds = run["rounds_total"]
    return {
        "backend": args.backend,
        "peers": n,
        "actors": actors,
        "topology": cfg.topology,
        "degree_mean": sum(len(v) for v in adj.values()) / n,
        "algorithm": algorithms.create(cfg.algorithm, "check").name,
        "model": cfg.model.name,
        "dataset": cfg.data.dataset,
        "partition": cfg.data.partition,
        "epochs": cfg.train.epochs,
        "faults": args.faults,
        "tol": args.tol,
        "slem_predicted": slem,
        "predicted_rounds": predicted_rounds(slem, run["disagreement_after_training"], args.tol),
        **run,
        "setup_s": setup_s,
        "accuracy_mean_peer": sum(accuracies) / len(accuracies),
        "accuracy_min_peer": min(accuracies),
        "accuracy_of_average": mean_accuracy,
        "bytes_sent": int(counters.get("bytes", 0)),
        "bytes_per_peer_round": counters.get("bytes", 0) / max(1, n * rounds),
        "counters": {k: int(v) for k, v in sorted(counters.items())},
        "memory_per_peer_bytes": memory_per_peer(finals),
        "process_rss_bytes": sorted({f.pid: f.rss_bytes for f in finals}.values()),
    }


def memory_per_peer(finals: list[GroupFinal]) -> float:
    """What the peers cost: per process, its growth from just before its first group built peers to the end of
    the run, summed over processes and divided by the peers."""
    grown: dict[int, tuple[int, int]] = {}
    for f in finals:
        before, end = grown.get(f.pid, (f.rss_before_bytes, f.rss_bytes))
        grown[f.pid] = (min(before, f.rss_before_bytes), max(end, f.rss_bytes))
    return sum(end - before for before, end in grown.values()) / sum(f.peers for f in finals)


def _run(backend: Any, args: argparse.Namespace, tick_s: float, *, stall_ticks: int) -> dict[str, Any]:
    """Tick until consensus after training, or `--max-rounds` mixing rounds; the round-by-round figures.
    A network where no round completes for `stall_ticks` ticks is reported as an error, not waited on forever."""
    tracker = RoundTracker()
    begin = last_note = time.perf_counter()
    trained_at: tuple[int, float, int, float] | None = None  # round, disagreement, tick, wall
    phase: list[float] = []
    last = None
    done = None
    tick = last_tick = 0
    while done is None:
        reports = backend.step(tick)
        for rep in reports:
            tracker.add(rep.rounds)
        for rd in tracker.final(min(rep.min_iteration for rep in reports)):
            last, last_tick = rd, tick
            if trained_at is None and rd.trained:
                trained_at = (rd.k, rd.disagreement, tick, time.perf_counter() - begin)
            if trained_at is not None:
                phase.append(rd.disagreement)
                if rd.disagreement <= args.tol or rd.k - trained_at[0] >= args.max_rounds:
                    done = rd
                    break
        if time.perf_counter() - last_note > PROGRESS_EVERY_S and last is not None:
            last_note = time.perf_counter()
            print(f"  tick {tick}: round {last.k}, disagreement {last.disagreement:.3g}", file=sys.stderr)
        tick += 1
        if tick - last_tick > stall_ticks:
            where = f"round {last.k}" if last is not None else "round 0"
            raise SimulationStalledError(f"no round completed in {stall_ticks} ticks (stuck after {where})")
    wall = time.perf_counter() - begin
    assert trained_at is not None and last is not None
    return {
        "reached": done.disagreement <= args.tol,
        "rounds_training": trained_at[0],
        "disagreement_after_training": trained_at[1],
        "rounds_to_consensus": done.k - trained_at[0],
        "rounds_total": done.k,
        "rate_measured": measured_rate(phase),
        "disagreement_final": done.disagreement,
        "ticks": tick,
        "virtual_s": tick * tick_s,
        "virtual_s_to_consensus": (tick - trained_at[2]) * tick_s,
        "wall_s": wall,
        "wall_s_training": trained_at[3],
        "wall_s_to_consensus": wall - trained_at[3],
        "mean": done.mean,
    }


def _mib(b: float) -> str:
    return f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 1024:.1f} KiB"


def format_run(r: dict[str, Any]) -> str:
    rate = f"{r['rate_measured']:.4f}" if r["rate_measured"] is not None else "n/a (already there)"
    reached = "reached" if r["reached"] else f"NOT reached in {r['rounds_to_consensus']} rounds"
    c = r["counters"]
    rows = [
        (f"consensus (tol {r['tol']:g})", f"{reached}: {r['rounds_to_consensus']} rounds after training"),
        ("  predicted from λ", f"{r['predicted_rounds']} rounds from {r['disagreement_after_training']:.3g}"),
        ("rate per round", f"measured {rate}, predicted λ = {r['slem_predicted']:.4f}"),
        ("training", f"{r['rounds_training']} rounds, {r['wall_s_training']:.1f} s"),
        ("time to consensus", f"{r['wall_s_to_consensus']:.1f} s wall ({r['virtual_s_to_consensus']:.2f} s virtual)"),
        ("wall time", f"{r['wall_s']:.1f} s run + {r['setup_s']:.1f} s setup, {r['ticks']} ticks"),
        (
            "accuracy",
            f"average model {100 * r['accuracy_of_average']:.2f}%, peers mean "
            f"{100 * r['accuracy_mean_peer']:.2f}% min {100 * r['accuracy_min_peer']:.2f}%",
        ),
        (
            "bytes sent",
            f"{_mib(r['bytes_sent'])} ({r['bytes_per_peer_round']:.0f} per peer and round), "
            f"{c.get('messages', 0)} messages, {c.get('retransmissions', 0)} retransmissions",
        ),
        (
            "faults",
            f"{r['faults'] or 'none'}: {c.get('dropped', 0)} dropped, {c.get('outage_dropped', 0)} in outages, "
            f"{c.get('delayed', 0)} delayed, {c.get('lost_away', 0)} lost to churn, {c.get('gave_up', 0)} gave up",
        ),
        ("memory per peer", f"{_mib(r['memory_per_peer_bytes'])} (process RSS growth / peers)"),
    ]
    head = (
        f"{r['algorithm']} on {r['dataset']} ({r['partition']}), {r['peers']} peers in {r['actors']} "
        f"{'Ray actors' if r['backend'] == 'ray' else 'groups'}, {r['topology']} (mean degree {r['degree_mean']:.1f}), "
        f"{r['model']}, {r['epochs']:g} epochs"
    )
    width = max(len(k) for k, _ in rows)
    return "\n".join([head, "-" * len(head), *(f"{k.ljust(width)}  {v}" for k, v in rows)])


def format_comparison(runs: list[dict[str, Any]]) -> str:
    lines = [
        "topology           λ (predicted)  rate (measured)  rounds predicted  rounds measured  accuracy",
    ]
    for r in runs:
        rate = f"{r['rate_measured']:.4f}" if r["rate_measured"] is not None else "n/a"
        measured = str(r["rounds_to_consensus"]) + ("" if r["reached"] else " (cap)")
        lines.append(
            f"{r['topology']:<18} {r['slem_predicted']:<14.4f} {rate:<16} {r['predicted_rounds']!s:<17} "
            f"{measured:<16} {100 * r['accuracy_of_average']:.2f}%"
        )
    return "\n".join(lines)


def run_simulate(args: argparse.Namespace) -> int:
    if args.backend == "ray":
        import_ray(loopback=not args.address)  # before any work: a missing extra is one line and exit 2
    topologies = [t.strip() for t in args.topology.split(",") if t.strip()]
    runs = []
    for topology in topologies:
        run = simulate_one(args, topology)
        print(format_run(run), flush=True)
        runs.append(run)
    if len(runs) > 1:
        print()
        print(format_comparison(runs))
    if args.json:
        root = Path(__file__).resolve().parents[2]
        out = {"command": " ".join(["peer", *sys.argv[1:]]), "revision": git_revision(root), "runs": runs}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0
