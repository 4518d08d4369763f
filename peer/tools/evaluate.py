"""`peer eval`: rebuild a peer's model from its state_dir (config copy + checkpoint) and test it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peer import config as config_mod
from peer.daemon import checkpoint
from peer.errors import CheckpointError
from peer.learn.data import load_dataset
from peer.learn.models import build_model
from peer.learn.training import evaluate


def evaluate_state_dir(state_dir: str | Path) -> dict[str, Any]:
    state_dir = Path(state_dir)
    cfg_path = state_dir / "config.yaml"
    if not cfg_path.exists():
        raise CheckpointError(f"{state_dir} holds no config.yaml: is it a peer state_dir?")
    cfg = config_mod.load(cfg_path)
    state = checkpoint.load(state_dir)
    if state is None:
        raise CheckpointError(f"{state_dir} holds no checkpoint yet")
    ds = load_dataset(cfg.data.dataset, cfg.data.path, seed=cfg.data.seed, test_fraction=cfg.data.test_fraction)
    model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, seed=cfg.model.seed)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint in {state_dir} does not match model {cfg.model.name}: {exc}") from exc
    acc, loss = evaluate(model, ds.x_test, ds.y_test)
    return {
        "node_id": cfg.node_id,
        "accuracy": acc,
        "loss": loss,
        "step": int(state.get("counters", {}).get("step", 0)),
        "dataset": ds.name,
        "test_samples": len(ds.y_test),
    }
