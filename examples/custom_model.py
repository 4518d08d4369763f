"""A user's own model and data for peer: a small CNN with BatchNorm, a data factory, and an image-folder maker.

Used by the examples and the tests as `examples.custom_model:bn_cnn` and `examples.custom_model:digits_data`
(run peer from the repository root, or put this directory's parent on PYTHONPATH).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset


def bn_cnn(input_shape: tuple[int, ...], num_classes: int, width: int = 16) -> nn.Module:
    """Conv-BatchNorm-ReLU twice, global average pooling, a linear head. `input_shape` is (c, h, w)."""
    channels = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * width, num_classes),
    )


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn, never downloads

    bunch = load_digits()
    return (np.asarray(bunch.data, np.float32) / 16.0).reshape(-1, 1, 8, 8), np.asarray(bunch.target, np.int64)


def digits_data(
    partition_index: int = 0, num_partitions: int = 1, test_fraction: float = 0.2, seed: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) from scikit-learn's digits: a fixed shuffled split, then this peer's 1/num_partitions of
    the training part (the test part is shared)."""
    x, y = _digits()
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    mine = np.array_split(train, num_partitions)[partition_index]
    return (
        TensorDataset(torch.from_numpy(x[mine]), torch.from_numpy(y[mine])),
        TensorDataset(torch.from_numpy(x[test]), torch.from_numpy(y[test])),
    )


def make_image_folder(root: str | Path, per_class: int = 40, size: int = 16) -> Path:
    """Write digits as grey PNG images in the ImageFolder layout, root/<digit>/<n>.png, upscaled to `size`."""
    from PIL import Image

    root = Path(root)
    x, y = _digits()
    counts: dict[int, int] = {}
    for img, label in zip(x, y, strict=True):
        if counts.get(int(label), 0) >= per_class:
            continue
        n = counts[int(label)] = counts.get(int(label), 0) + 1
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        pixels = (img[0] * 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").resize((size, size)).save(root / str(label) / f"{n:04d}.png")
    return root


def write_shard(directory: str | Path, name: str, x: np.ndarray, y: np.ndarray) -> Path:
    """Write one .npz shard atomically (a temporary name, then a rename), as a robot adding data should."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{name}.tmp"
    with open(tmp, "wb") as fh:
        np.savez(fh, x=x, y=y)
    final = directory / name
    tmp.replace(final)
    return final
