"""The demo's measurements: consensus distance, snapshots over time, references and per-peer accuracy."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peer.tools.launcher import DemoError

if TYPE_CHECKING:
    import numpy as np

    from peer.learn.reference import Reference

SNAPSHOT_BIN_S = 1.0


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


# ------------------------------------------------------------------------------------------------ evaluation
def train_reference(
    x: np.ndarray, y: np.ndarray, cfg: Any, input_shape: tuple[int, ...], num_classes: int, *, seed: int, device: Any
) -> Any:
    """Train like a peer without neighbours: same model init, optimizer, batch size, epochs and lr schedule."""
    from peer.learn import training

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
        model_factory=cfg.model.factory,
        model_kwargs=cfg.model.kwargs,
    )


@dataclass(frozen=True)
class TaskArrays:
    """The demo's data as arrays: each peer's training slice and the shared test set. Plugin data (data.factory,
    image folders, shards) is read into memory once here: the demo's references train on the same samples."""

    input_shape: tuple[int, ...]
    num_classes: int
    parts: list[tuple[np.ndarray, np.ndarray]]
    x_test: np.ndarray
    y_test: np.ndarray


def _materialize(ds: Any) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    xs, ys = [], []
    for xb, yb in DataLoader(ds, batch_size=1024):
        xs.append(torch.as_tensor(xb, dtype=torch.float32).numpy())
        ys.append(torch.as_tensor(yb).numpy())
    return np.concatenate(xs), np.concatenate(ys)


def task_arrays(cfgs: Sequence[Any]) -> TaskArrays:
    """Every peer's training slice and the test set, from the same source the daemons load (factories too)."""
    from peer.learn.data import load_dataset, local_partition
    from peer.learn.sources import load_task_data

    c0 = cfgs[0]
    if c0.data.dataset is not None or c0.data.path is not None:
        ds = load_dataset(c0.data.dataset, c0.data.path, seed=c0.data.seed, test_fraction=c0.data.test_fraction)
        parts = [
            local_partition(ds, c.data.partition, c.data.num_partitions, c.data.partition_index, c.data.seed)
            for c in cfgs
        ]
        return TaskArrays(ds.input_shape, ds.num_classes, parts, ds.x_test, ds.y_test)
    datas = [load_task_data(c.data) for c in cfgs]
    if datas[0].test is None:
        raise DemoError(f"{datas[0].name} has no test set: the demo measures test accuracy")
    x_test, y_test = _materialize(datas[0].test)
    parts = [(d.x, d.y) if d.x is not None and d.y is not None else _materialize(d.train) for d in datas]
    return TaskArrays(datas[0].input_shape, datas[0].num_classes, parts, x_test, y_test)


def _model(cfg: Any, task: TaskArrays) -> Any:
    from peer.learn.models import model_from_config

    return model_from_config(cfg.model, task.input_shape, task.num_classes)


def _mixes_buffers(cfg: Any) -> bool:
    from peer.algorithms import REGISTRY

    return not REGISTRY[cfg.algorithm.name].owns_local_update  # Algorithm.mixes_buffers


def evaluate_peers(cfgs: Sequence[Any], device: Any) -> tuple[list[float], float]:
    """Test accuracy of every peer's final checkpoint and the consensus distance between them."""
    from peer.daemon import checkpoint
    from peer.learn.models import flatten_params
    from peer.learn.training import evaluate

    ds = task_arrays(cfgs)
    accs, flats = [], []
    for cfg in cfgs:
        state = checkpoint.load(cfg.state_dir)
        if state is None:
            raise DemoError(f"{cfg.node_id} wrote no checkpoint in {cfg.state_dir}")
        if _trains_own_model(cfg):
            acc, flat = _own_model_accuracy(cfg, state, ds)
            accs.append(acc)
            flats.append(flat)
            continue
        model = _model(cfg, ds)
        model.load_state_dict(state["model"])
        accs.append(evaluate(model.to(device), ds.x_test, ds.y_test)[0])
        flats.append(flatten_params(model, buffers=_mixes_buffers(cfg)).numpy())
    return accs, consensus_distance(flats)


def _trains_own_model(cfg: Any) -> bool:
    from peer.algorithms import REGISTRY

    return REGISTRY[cfg.algorithm.name].trains_own_model


def _ssfn_accuracy(model: Any, x: Any, y: Any) -> float:
    import numpy as np
    import torch

    from peer.algorithms import ssfn

    scores = ssfn.predict(model, torch.as_tensor(np.asarray(x), dtype=torch.float64))
    return float((scores.argmax(1).numpy() == np.asarray(y)).mean())


def _own_model_accuracy(cfg: Any, state: dict[str, Any], ds: Any) -> tuple[float, Any]:
    """Test accuracy and flat parameters of an algorithm that trains its own model (dSSFN: an SSFN)."""
    import numpy as np

    from peer.algorithms import ssfn

    result = state.get("result")
    if not result:
        raise DemoError(f"{cfg.node_id}'s checkpoint holds no trained {cfg.algorithm.name} model")
    model = ssfn.model_from_state(result, cfg.algorithm.ssfn_config())
    flat = np.concatenate([o.reshape(-1).numpy() for o in model.outputs])
    return _ssfn_accuracy(model, ds.x_test, ds.y_test), flat


def ssfn_layer_errors(cfgs: Sequence[Any]) -> list[float]:
    """Per layer l, max over peers of ‖O_l(peer) − O_l(centralized)‖_F / ‖O_l(centralized)‖_F, where the
    centralized SSFN is trained on the union of the peers' partitions with the exact layer solver."""
    import numpy as np
    import torch

    from peer.algorithms import ssfn
    from peer.daemon import checkpoint
    from peer.learn.data import load_dataset, local_partition

    c0 = cfgs[0]
    ds = load_dataset(c0.data.dataset, c0.data.path, seed=c0.data.seed, test_fraction=c0.data.test_fraction)
    parts = [
        local_partition(ds, c.data.partition, c.data.num_partitions, c.data.partition_index, c.data.seed) for c in cfgs
    ]
    x_all = torch.as_tensor(np.concatenate([p[0] for p in parts]), dtype=torch.float64)
    y_all = torch.as_tensor(np.concatenate([p[1] for p in parts]))
    scfg = c0.algorithm.ssfn_config()
    central = ssfn.train_centralized(x_all, y_all, c0.algorithm.num_classes, scfg)
    worst = [0.0] * len(central.outputs)
    for cfg in cfgs:
        state = checkpoint.load(cfg.state_dir)
        if state is None or not state.get("result"):
            raise DemoError(f"{cfg.node_id} wrote no trained model")
        model = ssfn.model_from_state(state["result"], scfg)
        for layer, (o, oc) in enumerate(zip(model.outputs, central.outputs, strict=True)):
            err = float(torch.linalg.matrix_norm(o - oc) / torch.linalg.matrix_norm(oc))
            worst[layer] = max(worst[layer], err)
    return worst


def reference_accuracies(cfgs: Sequence[Any], device: Any) -> tuple[Reference, list[float]]:
    """(centralized reference, local-only accuracy of each partition). The centralized model is trained with its
    own tuned learning rate (`peer.learn.reference`); local-only models with the peers' own settings. For dSSFN
    the references are SSFN trained with the exact layer solver: centralized equivalence is that algorithm's
    claim (no tuning: the solver has no learning rate)."""
    import numpy as np

    from peer.learn.reference import PUBLISHED, Reference, tuned_reference
    from peer.learn.training import evaluate

    c0 = cfgs[0]
    ds = task_arrays(cfgs)
    parts = ds.parts
    x_all = np.concatenate([p[0] for p in parts])
    y_all = np.concatenate([p[1] for p in parts])
    if _trains_own_model(c0):
        import torch

        from peer.algorithms import ssfn

        scfg = c0.algorithm.ssfn_config()
        q = c0.algorithm.num_classes

        def fit(x: Any, y: Any) -> Any:
            return ssfn.train_centralized(torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y), q, scfg)

        central_ssfn = _ssfn_accuracy(fit(x_all, y_all), ds.x_test, ds.y_test)
        return Reference(central_ssfn, 0.0, "ok"), [_ssfn_accuracy(fit(x, y), ds.x_test, ds.y_test) for x, y in parts]
    local = []
    for cfg, (x, y) in zip(cfgs, parts, strict=True):
        # The peer's own minibatch seed, as in peer.daemon.node.
        seed = cfg.train.seed + 1000 * cfg.data.partition_index
        model = train_reference(x, y, cfg, ds.input_shape, ds.num_classes, seed=seed, device=device)
        local.append(evaluate(model, ds.x_test, ds.y_test)[0])
    t = c0.train
    recipe = {
        "model_name": c0.model.name,
        "input_shape": ds.input_shape,
        "epochs": t.epochs,
        "batch_size": t.batch_size,
        "momentum": t.momentum,
        "weight_decay": t.weight_decay,
        "optimizer": t.optimizer,
        "lr_schedule": t.lr_schedule,
        "model_seed": c0.model.seed,
        "model_factory": c0.model.factory,
        "model_kwargs": c0.model.kwargs,
    }
    central = tuned_reference(
        x_all,
        y_all,
        ds.x_test,
        ds.y_test,
        recipe=recipe,
        num_classes=ds.num_classes,
        seed=t.seed,
        device=device,
        local_only=float(np.mean(local)),
        published=PUBLISHED.get((c0.data.dataset, c0.model.name)) if c0.model.factory is None else None,
    )
    return central, local


def snapshot_curves(cfgs: Sequence[Any], bin_s: float = SNAPSHOT_BIN_S) -> dict[str, list[float]]:
    """Mean / min test accuracy and consensus distance over time, from the peers' parameter snapshots."""
    import numpy as np
    import torch

    from peer.learn.models import load_flat_params
    from peer.learn.training import evaluate

    c0 = cfgs[0]
    ds = task_arrays(cfgs)
    model = _model(c0, ds)
    buffers = _mixes_buffers(c0)
    per_peer = {c.node_id: list_snapshots(Path(c.state_dir)) for c in cfgs}
    out: dict[str, list[float]] = {"time_s": [], "mean_accuracy": [], "min_accuracy": [], "consensus_distance": []}
    xt = torch.as_tensor(ds.x_test)
    yt = torch.as_tensor(ds.y_test)
    for t, snaps in bin_snapshots(per_peer, bin_s):
        flats, accs = [], []
        try:
            for c in cfgs:
                flat = np.load(snaps[c.node_id].path)
                load_flat_params(model, torch.from_numpy(flat), buffers=buffers)
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
    from peer.daemon.metrics import read

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
