"""Tests for peer.learn.models (zoo, fingerprint, flat views) and peer.learn.training (trainer, evaluation)."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from peer.errors import CheckpointError, ConfigError, UnknownNameError
from peer.learn.data import Dataset, load_dataset, local_partition
from peer.learn.models import (
    MODEL_NAMES,
    build_model,
    flatten_params,
    load_flat_params,
    num_params,
    schema_fingerprint,
)
from peer.learn.training import LocalTrainer, evaluate, select_device, train_reference

CPU = torch.device("cpu")
SHAPES = [(1, 8, 8), (1, 40), (7,), (3, 5, 6), (2, 1, 1), (1,)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny models: intra-op threads only add overhead, and on a loaded machine they can stall for seconds.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", seed=0)


# ---------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_every_shape(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(name, shape, 10, seed=0)
    out = model(torch.zeros((3, *shape)))
    assert out.shape == (3, 10)
    if shape in ((1, 8, 8), (1, 40)):
        assert num_params(model) < 100_000
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_unknown_model_lists_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        build_model("resnet", (1, 8, 8), 10, seed=0)
    assert info.value.field == "model.name"
    for name in MODEL_NAMES:
        assert name in str(info.value)
    with pytest.raises(ConfigError):
        build_model("cnn", (1, 2, 3, 4), 10, seed=0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_init_depends_on_seed_only(name: str) -> None:
    torch.manual_seed(1)
    before = torch.random.get_rng_state()
    a = flatten_params(build_model(name, (1, 40), 10, seed=7))
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
    torch.manual_seed(999)
    b = flatten_params(build_model(name, (1, 40), 10, seed=7))
    c = flatten_params(build_model(name, (1, 40), 10, seed=8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_fingerprint() -> None:
    prints = {name: schema_fingerprint(build_model(name, (1, 8, 8), 10, seed=0)) for name in MODEL_NAMES}
    assert len(set(prints.values())) == len(MODEL_NAMES)
    assert all(len(p) == 16 and int(p, 16) >= 0 for p in prints.values())
    assert schema_fingerprint(build_model("mlp", (1, 8, 8), 10, seed=5)) == prints["mlp"]
    assert schema_fingerprint(build_model("mlp", (1, 8, 8), 9, seed=0)) != prints["mlp"]
    assert schema_fingerprint(build_model("mlp", (1, 40), 10, seed=0)) != prints["mlp"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_flat_round_trip(name: str) -> None:
    model = build_model(name, (1, 8, 8), 10, seed=0)
    flat = flatten_params(model)
    assert flat.dtype == torch.float32 and flat.dim() == 1 and flat.numel() == num_params(model)
    flat_copy = flat.clone()
    next(model.parameters()).data.add_(1.0)  # the flat view is a copy, not an alias
    assert torch.equal(flat, flat_copy)
    load_flat_params(model, flat)
    assert torch.equal(flatten_params(model), flat)
    other = build_model(name, (1, 8, 8), 10, seed=1)
    load_flat_params(other, flat)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(other(x), model(x))
    with pytest.raises(ValueError):
        load_flat_params(model, flat[:-1])
    with pytest.raises(ValueError):
        load_flat_params(model, torch.zeros(flat.numel() + 1))


# --------------------------------------------------------------------------------------------- devices


def test_select_device() -> None:
    assert select_device("cpu") == CPU
    assert select_device("auto").type in ("cpu", "cuda", "mps")
    for bad in ("tpu", "cuda:x", "cuda:99"):
        with pytest.raises(ConfigError) as info:
            select_device(bad)
        assert info.value.field == "train.device"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError):
            select_device("cuda")


# --------------------------------------------------------------------------------------------- trainer


def _trainer(
    ds: Dataset,
    x: np.ndarray,
    y: np.ndarray,
    *,
    optimizer: str = "sgd",
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 0.05,
) -> LocalTrainer:
    model = build_model("mlp", ds.input_shape, ds.num_classes, seed=0)
    return LocalTrainer(
        model,
        x,
        y,
        batch_size=batch_size,
        lr=lr,
        momentum=0.9,
        weight_decay=1e-4,
        optimizer=optimizer,
        device=CPU,
        seed=seed,
    )


def test_mlp_on_digits_reaches_90_percent(digits: Dataset) -> None:
    trainer = _trainer(digits, digits.x_train, digits.y_train)
    assert trainer.steps_per_epoch == math.ceil(len(digits.x_train) / 32)
    before, _ = evaluate(trainer.model, digits.x_test, digits.y_test)
    for _ in range(20 * trainer.steps_per_epoch):
        loss = trainer.step()
    assert math.isfinite(loss)
    assert trainer.epoch == 20 and trainer.step_count == 20 * trainer.steps_per_epoch
    acc, test_loss = evaluate(trainer.model, digits.x_test, digits.y_test)
    assert acc > 0.9 > before
    assert test_loss < 0.5
    assert trainer.model.training  # evaluate restores the mode


def test_epoch_visits_every_sample_once(digits: Dataset) -> None:
    n = 130
    x = np.zeros((n, 1, 8, 8), dtype=np.float32)
    x[:, 0, 0, 0] = np.arange(n)  # tag each sample with its index so batches reveal the order
    y = np.arange(n) % 10
    trainer = _trainer(digits, x, y, batch_size=50)
    orders = []
    for _ in range(2):
        seen: list[int] = []
        for _ in range(trainer.steps_per_epoch):
            xb, _ = trainer._next_batch()
            seen.extend(int(v) for v in xb[:, 0, 0, 0])
        assert sorted(seen) == list(range(n))
        orders.append(seen)
    assert orders[0] != orders[1]  # reshuffled each epoch
    assert trainer.epoch == 2 and trainer.epoch_progress == 2.0 and trainer.step_count == 6


def _save_load(state: dict) -> dict:  # type: ignore[type-arg]
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # type: ignore[no-any-return]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("stop_at", [7, 12])  # mid-epoch and exactly at an epoch boundary
def test_resume_is_deterministic(digits: Dataset, optimizer: str, stop_at: int) -> None:
    x, y = local_partition(digits, "dirichlet:1.0", 4, 1, seed=0)
    x, y = x[:70], y[:70]  # 70 samples, batch 6 -> 12 steps per epoch
    lr = 0.01 if optimizer == "adam" else 0.05
    a = _trainer(digits, x, y, optimizer=optimizer, batch_size=6, lr=lr)
    for _ in range(stop_at):
        a.step()
    a.set_lr(lr / 2)
    state = _save_load(a.state_dict())
    flat = a.get_flat()
    progress = a.epoch_progress

    b = _trainer(digits, x, y, optimizer=optimizer, seed=123, batch_size=6, lr=lr)  # other data-order seed
    b.load_state_dict(state)
    b.set_flat(flat)
    assert b.step_count == a.step_count and b.epoch == a.epoch and b.epoch_progress == progress
    assert b.lr == lr / 2
    for _ in range(20):
        assert a.step() == b.step()
    assert torch.equal(a.get_flat(), b.get_flat())


def test_load_state_rejects_mismatch(digits: Dataset) -> None:
    a = _trainer(digits, digits.x_train[:40], digits.y_train[:40])
    a.step()
    b = _trainer(digits, digits.x_train[:50], digits.y_train[:50])
    with pytest.raises(CheckpointError):
        b.load_state_dict(a.state_dict())
    c = _trainer(digits, digits.x_train[:40], digits.y_train[:40], optimizer="adam")
    with pytest.raises(CheckpointError):
        c.load_state_dict(a.state_dict())
    with pytest.raises(CheckpointError):
        a.load_state_dict({})


def test_gradient_does_not_step(digits: Dataset) -> None:
    trainer = _trainer(digits, digits.x_train[:64], digits.y_train[:64])
    before = trainer.get_flat()
    loss, grad = trainer.gradient()
    assert math.isfinite(loss) and grad.shape == before.shape and grad.abs().sum() > 0
    assert torch.equal(trainer.get_flat(), before)
    assert trainer.step_count == 1


def test_bad_trainer_config(digits: Dataset) -> None:
    with pytest.raises(UnknownNameError):
        _trainer(digits, digits.x_train, digits.y_train, optimizer="rmsprop")
    with pytest.raises(ConfigError):
        _trainer(digits, digits.x_train, digits.y_train, batch_size=0)


def test_train_reference_and_evaluate_mode(digits: Dataset) -> None:
    model = train_reference(
        digits.x_train,
        digits.y_train,
        model_name="logreg",
        input_shape=digits.input_shape,
        num_classes=10,
        epochs=3,
        batch_size=64,
        lr=0.1,
        momentum=0.9,
        weight_decay=0.0,
        optimizer="sgd",
        seed=0,
        device=CPU,
    )
    model.eval()
    acc, loss = evaluate(model, digits.x_test, digits.y_test, batch_size=100)
    assert acc > 0.85 and loss > 0
    assert not model.training  # the previous mode is restored, whatever it was
