"""The model zoo (logreg, mlp, cnn, or a user factory) built with seed-only initialisation, the schema
fingerprint peers compare before exchanging parameters, and flat views of what the consensus algorithms mix.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any

import torch
from torch import nn

from peer.errors import ConfigError, UnknownNameError
from peer.learn.plugins import build_user_model

log = logging.getLogger(__name__)

MODEL_NAMES = ("logreg", "mlp", "cnn")

_CNN_HIDDEN = 64
# Cap on the spatial size fed to the CNN head, so the head stays small on large user inputs.
_CNN_MAX_POOLED = 16
_CNN_MAX_POOLED_2D = 4


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    seed: int,
    factory: str | None = None,
    kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Build model `name` (or the user's `factory`, "package.module:function") for inputs of `input_shape`
    (without the batch axis) and `num_classes` outputs.

    The initial weights depend only on `seed`: peers with the same seed start from identical weights,
    and the global torch RNG is left untouched.
    """
    if factory is not None:
        return build_user_model(factory, dict(kwargs or {}), tuple(int(s) for s in input_shape), num_classes, seed=seed)
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ConfigError(f"invalid input shape {input_shape!r}", field="model.name")
    if num_classes < 2:
        raise ConfigError(f"need at least 2 classes, got {num_classes}", field="model.name")
    if name not in MODEL_NAMES:
        raise UnknownNameError("model", name, MODEL_NAMES, field="model.name")
    # Default layer init draws from the global RNG; fork it so building a model never perturbs it,
    # then overwrite every parameter from a private generator so init depends on `seed` alone.
    with torch.random.fork_rng(devices=[]):
        if name == "logreg":
            model: nn.Module = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), num_classes))
        elif name == "mlp":
            model = _mlp(math.prod(shape), num_classes)
        else:
            model = _cnn(shape, num_classes)
    _reset_parameters(model, seed)
    model = model.to(torch.float32)
    log.debug("built %s for %s -> %d classes: %d parameters", name, shape, num_classes, num_params(model))
    return model


def _mlp(d: int, num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(d, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def _cnn(shape: tuple[int, ...], num_classes: int) -> nn.Module:
    layers: list[nn.Module] = []
    if len(shape) == 1:
        layers.append(nn.Unflatten(1, (1, shape[0])))
        shape = (1, shape[0])
    if len(shape) == 2:
        channels, length = shape
        for c_in, c_out in ((channels, 16), (16, 32)):
            layers += [nn.Conv1d(c_in, c_out, kernel_size=5, padding=2), nn.ReLU()]
            if length >= 2:
                layers.append(nn.MaxPool1d(2))
                length //= 2
        length = min(length, _CNN_MAX_POOLED)
        layers.append(nn.AdaptiveAvgPool1d(length))
        features = 32 * length
    elif len(shape) == 3:
        channels, h, w = shape
        for c_in, c_out in ((channels, 16), (16, 32)):
            # Padding 1 keeps 8x8 digits at full size through the conv; pooling halves only dims >= 2.
            layers += [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.ReLU()]
            kh, kw = (2 if h >= 2 else 1), (2 if w >= 2 else 1)
            if kh > 1 or kw > 1:
                layers.append(nn.MaxPool2d((kh, kw)))
                h, w = h // kh, w // kw
        h, w = min(h, _CNN_MAX_POOLED_2D), min(w, _CNN_MAX_POOLED_2D)
        layers.append(nn.AdaptiveAvgPool2d((h, w)))
        features = 32 * h * w
    else:
        raise ConfigError(f"cnn supports input shapes (d,), (c, l) and (c, h, w); got {shape}", field="model.name")
    layers += [nn.Flatten(), nn.Linear(features, _CNN_HIDDEN), nn.ReLU(), nn.Linear(_CNN_HIDDEN, num_classes)]
    return nn.Sequential(*layers)


def _reset_parameters(model: nn.Module, seed: int) -> None:
    # Same distributions as torch's defaults for Linear/Conv (kaiming-uniform weights, fan-in biases),
    # but drawn from a private generator in a fixed module order.
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=gen)
                if module.bias is not None:
                    fan_in = module.weight[0].numel()
                    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                    nn.init.uniform_(module.bias, -bound, bound, generator=gen)
            elif any(True for _ in module.parameters(recurse=False)):
                raise TypeError(f"no seeded initialiser for {type(module).__name__}")


def exchanged_tensors(model: nn.Module, *, buffers: bool) -> list[tuple[str, torch.Tensor]]:
    """What peers exchange, in a fixed order: every parameter (`named_parameters` order), then, when `buffers`,
    every floating-point buffer (BatchNorm running mean and variance...). Integer buffers (`num_batches_tracked`)
    are never exchanged: they count local steps and stay local."""
    out: list[tuple[str, torch.Tensor]] = [(name, p) for name, p in model.named_parameters()]
    if buffers:
        out += [(name, b) for name, b in model.named_buffers() if b.is_floating_point()]
    return out


def schema_fingerprint(model: nn.Module, *, buffers: bool = False) -> str:
    """First 16 hex chars of sha256 over the sorted "name:shape:dtype" of every exchanged tensor (see
    `exchanged_tensors`) and, when buffers are kept local, of every buffer as well (marked local), so peers
    that disagree on what is mixed refuse each other."""
    entries = [
        f"{key}:{'x'.join(str(s) for s in t.shape)}:{t.dtype}" for key, t in exchanged_tensors(model, buffers=buffers)
    ]
    if not buffers:
        entries += [f"local:{key}:{'x'.join(str(s) for s in b.shape)}" for key, b in model.named_buffers()]
    return hashlib.sha256("\n".join(sorted(entries)).encode()).hexdigest()[:16]


def num_params(model: nn.Module) -> int:
    """Number of scalar parameters."""
    return sum(p.numel() for p in model.parameters())


def num_exchanged(model: nn.Module, *, buffers: bool = False) -> int:
    """Length of the flat vector `flatten_params(model, buffers=...)`."""
    return sum(t.numel() for _, t in exchanged_tensors(model, buffers=buffers))


def flatten_params(model: nn.Module, *, buffers: bool = False, device: torch.device | None = None) -> torch.Tensor:
    """A 1-D float32 copy of the exchanged tensors (see `exchanged_tensors`), on `device` (default: the CPU)."""
    target = device if device is not None else torch.device("cpu")
    parts = [
        t.detach().reshape(-1).to(device=target, dtype=torch.float32)
        for _, t in exchanged_tensors(model, buffers=buffers)
    ]
    if not parts:
        return torch.zeros(0, dtype=torch.float32, device=target)
    return torch.cat(parts)  # cat always allocates, so the result never aliases the parameters


def load_flat_params(model: nn.Module, flat: torch.Tensor, *, buffers: bool = False) -> None:
    """Copy a flat vector (as made by `flatten_params` with the same `buffers`) into the model in place."""
    tensors = [t for _, t in exchanged_tensors(model, buffers=buffers)]
    expected = sum(t.numel() for t in tensors)
    if flat.numel() != expected:
        raise ValueError(f"flat parameter vector has {flat.numel()} elements, model has {expected}")
    if tensors:
        # One transfer for the whole vector rather than one per tensor when the model is on a GPU.
        flat = flat.detach().reshape(-1).to(device=tensors[0].device)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].reshape(t.shape))
            offset += n


def model_from_config(model_cfg: Any, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The model a `model:` config section describes (built-in name or user factory), with its seed."""
    return build_model(
        model_cfg.name,
        input_shape,
        num_classes,
        seed=model_cfg.seed,
        factory=model_cfg.factory,
        kwargs=model_cfg.kwargs,
    )
