"""Data that is read as it is trained on: an image folder (torchvision's ImageFolder layout, read with PIL), a
directory of `.npz` shards that may grow while the daemon runs, and the minibatch stream over any map-style
torch Dataset (a DataLoader with a seeded order, worker processes, pinned memory on CUDA).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from peer.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolder(TorchDataset[tuple[torch.Tensor, int]]):
    """`root/<class name>/<image file>`, classes in sorted order as torchvision's ImageFolder numbers them.

    Images are decoded with PIL, converted to `mode` ("L" grey or "RGB"), resized to `size` (the first image's
    size by default) and scaled to [0, 1] as float32 (c, h, w) tensors.
    """

    def __init__(self, root: str | Path, *, size: tuple[int, int] | None = None, mode: str | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{root}: image folder not found")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if len(self.classes) < 2:
            raise DataError(f"{root}: need at least 2 class subdirectories, found {len(self.classes)}")
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            for f in sorted((self.root / name).rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    self.samples.append((f, label))
        if not self.samples:
            raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) under the class subdirectories")
        self.targets = np.asarray([label for _, label in self.samples], dtype=np.int64)
        self.num_classes = len(self.classes)
        first = self._open(self.samples[0][0])
        self.mode = mode or ("L" if first.mode in ("L", "1", "I", "I;16", "F") else "RGB")
        self.size = size or first.size

    def _open(self, path: Path) -> Any:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                img.load()
                return img
        except (OSError, UnidentifiedImageError) as exc:
            raise DataError(f"{path}: cannot read image ({exc})") from None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        img = self._open(path).convert(self.mode)
        if img.size != self.size:
            img = img.resize(self.size)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arr = arr[None, :, :] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(arr)), label


def _read_shard(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: np.asarray(archive[k]) for k in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz shard ({exc})") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"{path}: missing array {key!r}")
    if len(arrays["x"]) != len(arrays["y"]) or len(arrays["x"]) == 0:
        raise DataError(f"{path}: x and y must be non-empty and of equal length")
    return arrays


class ShardsDataset(TorchDataset[tuple[torch.Tensor, torch.Tensor]]):
    """Every `*.npz` file in a directory (arrays x and y, optionally x_test and y_test), in name order.

    `refresh()` loads files that appeared since the last call (write a shard under another name and rename it
    into place, so a half-written file is never read). Samples keep their indices as the set grows, so the
    trainer's sampler only ever gains indices. Thread-safe: the training thread refreshes and reads, the
    daemon reads the counters.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise DataError(f"{directory}: shards directory not found")
        self._lock = threading.Lock()
        self.files: list[str] = []
        self._x: list[torch.Tensor] = []
        self._y: list[torch.Tensor] = []
        self._ends: list[int] = []  # cumulative sample counts, one per shard
        self._trained: set[int] = set()  # shards with at least one sample trained on
        self.x_test: list[np.ndarray] = []
        self.y_test: list[np.ndarray] = []
        self.refresh()
        if not self.files:
            raise DataError(f"{directory}: no .npz shards yet (put at least one there before starting)")

    def refresh(self) -> list[str]:
        """Load new shards; returns their names (logged by the caller)."""
        known = set(self.files)
        new = sorted(
            e.name
            for e in os.scandir(self.directory)
            if e.is_file() and e.name.endswith(".npz") and e.name not in known
        )
        for name in new:
            arrays = _read_shard(self.directory / name)
            x = torch.as_tensor(arrays["x"], dtype=torch.float32)
            if self._x and x.shape[1:] != self._x[0].shape[1:]:
                raise DataError(
                    f"{self.directory / name}: samples of shape {tuple(x.shape[1:])}, earlier shards "
                    f"have {tuple(self._x[0].shape[1:])}"
                )
            with self._lock:
                self._x.append(x)
                self._y.append(torch.as_tensor(arrays["y"]))
                self._ends.append((self._ends[-1] if self._ends else 0) + len(x))
                self.files.append(name)
                if "x_test" in arrays and "y_test" in arrays:
                    self.x_test.append(arrays["x_test"].astype(np.float32))
                    self.y_test.append(arrays["y_test"])
        return new

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def shard_of(self, index: int) -> int:
        return int(np.searchsorted(self._ends, index, side="right"))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            s = self.shard_of(index)
            start = self._ends[s - 1] if s else 0
            return self._x[s][index - start], self._y[s][index - start]

    def mark_trained(self, indices: torch.Tensor) -> None:
        ends = torch.as_tensor(self._ends)
        shards = torch.searchsorted(ends, indices.cpu(), right=True)
        self._trained.update(int(s) for s in torch.unique(shards))

    @property
    def num_trained(self) -> int:
        """Shards from which at least one sample has been trained on."""
        return len(self._trained)

    @property
    def num_classes(self) -> int:
        return int(max(int(y.max()) for y in self._y)) + 1

    def test_arrays(self) -> tuple[np.ndarray, np.ndarray] | None:
        if not self.x_test:
            return None
        return np.concatenate(self.x_test), np.concatenate(self.y_test)


class _IndexedDataset(TorchDataset[tuple[Any, Any, int]]):
    """Yields (x, y, index), so the stream knows which samples (and which shards) it trained on."""

    def __init__(self, inner: TorchDataset[Any]) -> None:
        self.inner = inner

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        x, y = self.inner[index]
        return x, y, index

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]


class BatchStream:
    """Endless minibatches from a map-style dataset, an epoch at a time.

    Each epoch's order is a permutation from a private generator (reproducible, and resumable from
    `state_dict`); a DataLoader reads the samples with `num_workers` processes and pins host memory when the
    device is CUDA, so the copy to the device can overlap compute. A `ShardsDataset` is refreshed at every epoch
    start, so shards added while the daemon runs join the next epoch.
    """

    def __init__(
        self, ds: TorchDataset[Any], *, batch_size: int, num_workers: int, device: torch.device, seed: int
    ) -> None:
        self.ds = ds
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.device = device
        self.gen = torch.Generator(device="cpu")
        self.gen.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
        self._it: Iterator[Any] | None = None
        self._left = 0  # batches left in this epoch
        self.epoch = 0
        self.new_shards: list[str] = []  # names loaded at the last epoch start (the trainer logs them)

    @property
    def n(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.n / self.batch_size))

    @property
    def fraction_done(self) -> float:
        return 1.0 - self._left / self.steps_per_epoch if self._it is not None else 0.0

    def _start_epoch(self) -> None:
        if isinstance(self.ds, ShardsDataset):
            self.new_shards = self.ds.refresh()
        order = torch.randperm(self.n, generator=self.gen).tolist()
        loader = DataLoader(
            _IndexedDataset(self.ds),
            batch_size=self.batch_size,
            sampler=order,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        self._it = iter(loader)
        self._left = len(loader)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(x, y, epoch_finished) on the device."""
        if self._it is None:
            self._start_epoch()
        assert self._it is not None
        x, y, idx = next(self._it)
        self._left -= 1
        finished = self._left <= 0
        if finished:
            self._it = None
            self.epoch += 1
        if isinstance(self.ds, ShardsDataset):
            self.ds.mark_trained(idx)
        blocking = self.device.type != "cuda"
        x = torch.as_tensor(x).to(self.device, dtype=torch.float32, non_blocking=not blocking)
        return x, torch.as_tensor(y).to(self.device, non_blocking=not blocking), finished

    def state_dict(self) -> dict[str, Any]:
        # Resuming restarts the interrupted epoch with a fresh order (the data may have grown meanwhile).
        return {"rng_state": self.gen.get_state(), "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["rng_state"])
        self.epoch = int(state["epoch"])
        self._it = None
