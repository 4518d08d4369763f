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
from peer.errors import CheckpointError, ConfigError
from peer.learn.data import partition_summary
from peer.learn.models import model_from_config, num_exchanged, schema_fingerprint
from peer.learn.plugins import call_plugin, is_classification, resolve_loss
from peer.learn.sources import TaskData, load_task_data
from peer.learn.streams import BatchStream
from peer.learn.training import LocalTrainer, select_device


@dataclass
class Built:
    dataset: TaskData
    trainer: LocalTrainer
    algorithm: Algorithm
    fingerprint: str
    num_params: int  # length of the exchanged flat vector (parameters, plus float buffers if the algorithm mixes them)
    device: torch.device
    state_saved_unix_s: float | None  # when the resumed checkpoint was written; None for a fresh start


def build(
    cfg: PeerConfig,
    *,
    reset: bool,
    counters: Counters,
    log: logging.LoggerAdapter[logging.Logger],
    model: torch.nn.Module | None = None,
    data: TaskData | None = None,
    external: bool = False,
) -> Built:
    """Everything the daemon needs; `model` and `data` come from the library API (`peer.Node(model=...)`),
    otherwise from the config's factories or built-ins. `external` (`peer.Gossip`): the caller trains `model`
    in its own loop, so no data is loaded; the trainer only moves the model in and out of flat vectors, counts
    steps and checkpoints."""
    state_dir = Path(cfg.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    if external:
        if model is None:
            raise ConfigError("peer.Gossip needs the model it mixes", field="model")
        data = TaskData("caller's own loop", (1,), 2, np.zeros((1, 1), np.float32), np.zeros(1, np.int64), None, None)
    ds = data if data is not None else load_task_data(cfg.data)
    y = ds.y
    log.info(
        "data %s, partition %s [%d/%d]: %d samples%s",
        ds.name,
        cfg.data.partition,
        cfg.data.partition_index,
        cfg.data.num_partitions,
        ds.num_train,
        f", labels {partition_summary(y, [np.arange(len(y))])[0]}" if y is not None and len(y) else "",
    )
    device = select_device(cfg.train.device)
    if model is None:
        model = model_from_config(cfg.model, ds.input_shape, ds.num_classes)
    model = model.to(device)
    torch.set_num_threads(intra_op_threads(cfg.train.torch_threads, model, device))
    algorithm = create(cfg.algorithm, cfg.node_id)
    t = cfg.train
    if not external:
        _check_forward(cfg, model, ds, device)
    stream = None
    if ds.train is not None:
        stream = BatchStream(
            ds.train,
            batch_size=t.batch_size,
            num_workers=t.num_workers,
            device=device,
            seed=t.seed + 1000 * cfg.data.partition_index,
        )
    trainer = LocalTrainer(
        model,
        ds.x,
        ds.y,
        batch_size=t.batch_size,
        lr=t.lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        optimizer=t.optimizer,
        device=device,
        seed=t.seed + 1000 * cfg.data.partition_index,
        stream=stream,
        loss_fn=resolve_loss(t.loss),
        amp=t.amp,
        exchange_buffers=algorithm.mixes_buffers,
    )
    algorithm.bind_data(int(np.prod(ds.input_shape)), ds.num_classes)
    buffers = algorithm.mixes_buffers
    built = Built(
        ds,
        trainer,
        algorithm,
        schema_fingerprint(model, buffers=buffers),
        num_exchanged(model, buffers=buffers),
        device,
        None,
    )
    if reset and (aside := checkpoint.discard(state_dir)) is not None:
        log.warning("--reset: previous checkpoint moved to %s", aside)
    state = checkpoint.load(state_dir)
    if state is not None:
        _restore(cfg, built, state, counters)
        log.info("resumed from checkpoint %s at step %d", state_dir / checkpoint.CHECKPOINT_NAME, trainer.step_count)
    atomic_write_bytes(state_dir / "config.yaml", config_mod.dump(cfg).encode())
    log.info(
        "model %s (%d exchanged values, schema %s) on %s; algorithm %s [%s]",
        cfg.model.factory or cfg.model.name,
        built.num_params,
        built.fingerprint,
        device,
        algorithm.name,
        algorithm.provenance,
    )
    return built


def _check_forward(cfg: PeerConfig, model: torch.nn.Module, ds: TaskData, device: torch.device) -> None:
    """One forward pass and loss on two samples, so a model that does not fit the data (or a loss that does not
    fit the model) fails at start-up with the config fields named, not in the training thread."""
    if ds.x is not None and ds.y is not None:
        xb = torch.as_tensor(ds.x[:2], dtype=torch.float32)
        yb = torch.as_tensor(ds.y[:2])
    else:
        assert ds.train is not None
        pairs = [ds.train[i] for i in range(min(2, ds.num_train))]
        xb = torch.stack([torch.as_tensor(p[0], dtype=torch.float32) for p in pairs])
        yb = torch.stack([torch.as_tensor(p[1]) for p in pairs])
    what = cfg.model.factory or f"model {cfg.model.name}"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = call_plugin(model, what, "model.factory", xb.to(device))
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise ConfigError(
            f"{what} returned {type(out).__name__} from forward(); expected a tensor", field="model.factory"
        )
    if is_classification(cfg.train.loss) and (out.dim() != 2 or out.shape[1] != ds.num_classes):
        raise ConfigError(
            f"{what} outputs shape {tuple(out.shape)} for a batch of inputs {tuple(xb.shape)}; cross_entropy needs "
            f"(batch, {ds.num_classes}) for the {ds.num_classes} classes of {ds.name}",
            field="model.factory",
        )
    call_plugin(resolve_loss(cfg.train.loss), cfg.train.loss, "train.loss", out.float(), yb.to(device))


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
