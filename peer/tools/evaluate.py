"""`peer eval`: rebuild a peer's model from its state_dir (config copy + checkpoint) and test it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peer import config as config_mod
from peer.daemon import checkpoint
from peer.errors import CheckpointError
from peer.learn.models import model_from_config
from peer.learn.plugins import is_classification, resolve_loss
from peer.learn.sources import evaluate_dataset, load_task_data


def evaluate_state_dir(state_dir: str | Path) -> dict[str, Any]:
    state_dir = Path(state_dir)
    cfg_path = state_dir / "config.yaml"
    if not cfg_path.exists():
        raise CheckpointError(f"{state_dir} holds no config.yaml: is it a peer state_dir?")
    cfg = config_mod.load(cfg_path)
    state = checkpoint.load(state_dir)
    if state is None:
        raise CheckpointError(f"{state_dir} holds no checkpoint yet")
    ds = load_task_data(cfg.data)
    if ds.test is None:
        raise CheckpointError(f"the data of {state_dir} ({ds.name}) has no test set to evaluate on")
    model = model_from_config(cfg.model, ds.input_shape, ds.num_classes)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as exc:
        what = cfg.model.factory or cfg.model.name
        raise CheckpointError(f"checkpoint in {state_dir} does not match model {what}: {exc}") from exc
    classification = is_classification(cfg.train.loss)
    acc, loss = evaluate_dataset(model, ds.test, loss_fn=resolve_loss(cfg.train.loss), classification=classification)
    return {
        "node_id": cfg.node_id,
        "task": "classification" if classification else "regression",
        "accuracy": acc if classification else None,
        "loss": loss,
        "step": int(state.get("counters", {}).get("step", 0)),
        "dataset": ds.name,
        "test_samples": len(ds.test),  # type: ignore[arg-type]
    }
