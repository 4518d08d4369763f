"""User plugins named "package.module:function" in the config: import, call and check them, turning every failure
into a ConfigError that names the config field and the function (never a bare traceback).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset as TorchDataset

from peer.errors import ConfigError

log = logging.getLogger(__name__)

LOSS_NAMES = ("cross_entropy", "mse")


def load_callable(spec: str, field: str) -> Callable[..., Any]:
    """Resolve "package.module:function" (dotted attributes allowed after the colon)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"expected 'package.module:function', got {spec!r}", field=field)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # an import runs arbitrary user code: report whatever it raised
        raise ConfigError(
            f"cannot import module {module_name!r} for {spec}: {type(exc).__name__}: {exc}", field=field
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"module {module_name!r} has no attribute {attr!r} ({spec})", field=field) from None
    if not callable(obj):
        raise ConfigError(f"{spec} is not callable (got {type(obj).__name__})", field=field)
    return obj  # type: ignore[no-any-return]


def call_plugin(fn: Callable[..., Any], spec: str, field: str, *args: Any, **kwargs: Any) -> Any:
    """Call a user function; anything it raises becomes a ConfigError naming `field` and `spec`."""
    try:
        return fn(*args, **kwargs)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{spec} raised {type(exc).__name__}: {exc}", field=field) from exc


def build_user_model(
    spec: str, kwargs: dict[str, Any], input_shape: tuple[int, ...], num_classes: int, *, seed: int
) -> nn.Module:
    """`fn(input_shape, num_classes, **kwargs)` under a private RNG seeded with `seed`: every peer with the same
    seed builds the same initial weights, and the caller's global RNG is left untouched."""
    fn = load_callable(spec, "model.factory")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
        model = call_plugin(fn, spec, "model.factory", tuple(input_shape), num_classes, **kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec} must return a torch.nn.Module, got {type(model).__name__}", field="model.factory")
    floats = [n for n, t in model.state_dict().items() if t.is_floating_point() and t.dtype != torch.float32]
    if floats:
        log.info("%s: casting %s to float32 (the wire carries float32)", spec, ", ".join(floats[:3]))
        model = model.to(torch.float32)
    return model


def call_data_factory(
    spec: str, kwargs: dict[str, Any], *, partition_index: int, num_partitions: int
) -> tuple[TorchDataset[Any], TorchDataset[Any] | None]:
    """`fn(**kwargs)` returning (train, test); `partition_index` and `num_partitions` are passed only to a function
    that declares them (or **kwargs)."""
    fn = load_callable(spec, "data.factory")
    extra: dict[str, Any] = {}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for name, value in (("partition_index", partition_index), ("num_partitions", num_partitions)):
        if (var_kw or name in params) and name not in kwargs:
            extra[name] = value
    out = call_plugin(fn, spec, "data.factory", **kwargs, **extra)
    if not isinstance(out, tuple) or len(out) != 2:
        raise ConfigError(f"{spec} must return a (train, test) tuple, got {type(out).__name__}", field="data.factory")
    train, test = out
    for what, ds in (("train", train), ("test", test)):
        if ds is None and what == "test":
            continue
        if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
            raise ConfigError(
                f"{spec} returned a {what} set of type {type(ds).__name__}; expected a map-style "
                "torch.utils.data.Dataset (with __getitem__ and __len__)",
                field="data.factory",
            )
        if len(ds) == 0:
            raise ConfigError(f"{spec} returned an empty {what} set", field="data.factory")
    return train, test


def first_sample(ds: TorchDataset[Any], spec: str, field: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample 0 as (x, y) tensors, checking the (x, y) form."""
    item = call_plugin(lambda: ds[0], spec, field)
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ConfigError(f"{spec}: samples must be (x, y) pairs, got {type(item).__name__}", field=field)
    x, y = (torch.as_tensor(v) for v in item)
    return x, y


def resolve_loss(spec: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`train.loss`: cross_entropy, mse, or a "package.module:function" taking (output, target)."""
    if spec == "cross_entropy":
        return nn.functional.cross_entropy
    if spec == "mse":
        return mse_loss
    fn = load_callable(spec, "train.loss")

    def user_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        value = call_plugin(fn, spec, "train.loss", output, target)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ConfigError(f"{spec} must return a scalar tensor, got {type(value).__name__}", field="train.loss")
        return value.reshape(())

    return user_loss


def mse_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error; integer class targets against (n, k) outputs are one-hot encoded first."""
    if not target.is_floating_point() and output.dim() == 2 and target.dim() == 1:
        target = nn.functional.one_hot(target, output.shape[1])
    return nn.functional.mse_loss(output, target.to(output.dtype).reshape(output.shape))


def is_classification(loss: str) -> bool:
    """Accuracy is reported for cross-entropy training; otherwise the loss is the score."""
    return loss == "cross_entropy"
