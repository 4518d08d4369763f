"""Blocking start-up of a daemon: data, model, trainer, algorithm and the resumed checkpoint, in one place.

Runs in a thread before the daemon serves (`Node.run`); everything it returns is ready for the training thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peer import config as config_mod
from peer.algorithms import Algorithm, create
from peer.config import PeerConfig
from peer.daemon import checkpoint
from peer.daemon.checkpoint import atomic_write_bytes
from peer.daemon.metrics import Counters
from peer.errors import CheckpointError
from peer.learn.data import Dataset, load_dataset, local_partition, partition_summary
from peer.learn.models import build_model, num_params, schema_fingerprint
from peer.learn.training import LocalTrainer, select_device


@dataclass
class Built:
    dataset: Dataset
    trainer: LocalTrainer
    algorithm: Algorithm
    fingerprint: str
    num_params: int
    device: torch.device
    state_saved_unix_s: float | None  # when the resumed checkpoint was written; None for a fresh start


def build(cfg: PeerConfig, *, reset: bool, counters: Counters, log: logging.LoggerAdapter[logging.Logger]) -> Built:
    state_dir = Path(cfg.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(cfg.data.dataset, cfg.data.path, seed=cfg.data.seed, test_fraction=cfg.data.test_fraction)
    x, y = local_partition(ds, cfg.data.partition, cfg.data.num_partitions, cfg.data.partition_index, cfg.data.seed)
    log.info(
        "data %s, partition %s [%d/%d]: %d samples, labels %s",
        ds.name,
        cfg.data.partition,
        cfg.data.partition_index,
        cfg.data.num_partitions,
        len(y),
        partition_summary(y, [np.arange(len(y))])[0] if len(y) else {},
    )
    device = select_device(cfg.train.device)
    model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, seed=cfg.model.seed).to(device)
    torch.set_num_threads(intra_op_threads(cfg.train.torch_threads, model, device))
    t = cfg.train
    trainer = LocalTrainer(
        model,
        x,
        y,
        batch_size=t.batch_size,
        lr=t.lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        optimizer=t.optimizer,
        device=device,
        seed=t.seed + 1000 * cfg.data.partition_index,
    )
    algorithm = create(cfg.algorithm, cfg.node_id)
    algorithm.bind_data(int(np.prod(ds.input_shape)), ds.num_classes)
    built = Built(ds, trainer, algorithm, schema_fingerprint(model), num_params(model), device, None)
    if reset and (aside := checkpoint.discard(state_dir)) is not None:
        log.warning("--reset: previous checkpoint moved to %s", aside)
    state = checkpoint.load(state_dir)
    if state is not None:
        _restore(cfg, built, state, counters)
        log.info("resumed from checkpoint %s at step %d", state_dir / checkpoint.CHECKPOINT_NAME, trainer.step_count)
    atomic_write_bytes(state_dir / "config.yaml", config_mod.dump(cfg).encode())
    log.info(
        "model %s (%d parameters, schema %s) on %s; algorithm %s [%s]",
        cfg.model.name,
        built.num_params,
        built.fingerprint,
        device,
        algorithm.name,
        algorithm.provenance,
    )
    return built


def _restore(cfg: PeerConfig, built: Built, state: dict[str, Any], counters: Counters) -> None:
    path = Path(cfg.state_dir) / checkpoint.CHECKPOINT_NAME
    for key, mine in (
        ("node_id", cfg.node_id),
        ("fingerprint", built.fingerprint),
        ("algorithm_name", built.algorithm.name),
    ):
        if state.get(key) != mine:
            raise CheckpointError(
                f"checkpoint {path} was written with {key}={state.get(key)!r} but this config has {mine!r}; "
                "use another state_dir, or --reset to discard the checkpoint"
            )
    try:
        built.trainer.model.load_state_dict(state["model"])
        built.trainer.load_state_dict(state["trainer"])
        built.algorithm.load_state_dict(state["algorithm"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} does not match this model: {exc}") from exc
    counters.restore(state.get("counters", {}))
    built.state_saved_unix_s = float(state.get("saved_unix_s", 0.0))


# Below this many parameters, intra-op parallelism costs more than it saves (thread wake-ups dwarf the tiny
# matrix products), and several daemons on one host would fight over the cores.
SMALL_MODEL_PARAMS = 1_000_000


def intra_op_threads(configured: int, model: torch.nn.Module, device: torch.device) -> int:
    """`train.torch_threads`, where 0 (auto) is 1 thread for a small model on the CPU, else torch's default."""
    if configured:
        return configured
    params = sum(p.numel() for p in model.parameters())
    if device.type == "cpu" and params < SMALL_MODEL_PARAMS:
        return 1
    return torch.get_num_threads()
