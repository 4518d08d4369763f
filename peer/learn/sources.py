"""Where a peer's data comes from (a built-in dataset, an .npz file, a user `data.factory`, an image folder, a
shards directory), made into one `TaskData`, and evaluation by task (accuracy for classification, else loss).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset
from torch.utils.data import Dataset as TorchDataset

from peer.config import DATA_SOURCES, DataConfig
from peer.errors import ConfigError, DataError
from peer.learn.data import load_dataset, local_partition, partition_indices, stratified_split
from peer.learn.plugins import call_data_factory, call_plugin, first_sample
from peer.learn.streams import ImageFolder, ShardsDataset

log = logging.getLogger(__name__)


@dataclass
class TaskData:
    """This peer's training data and the shared test set.

    In-memory data (built-in datasets, .npz files) has `x`/`y` arrays and `train` None; streamed data has `train`.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int  # the model's output width (classes, or regression targets)
    x: np.ndarray | None
    y: np.ndarray | None
    train: TorchDataset[Any] | None
    test: TorchDataset[Any] | None
    x_test: np.ndarray | None = None  # the test set as arrays, for in-memory data
    y_test: np.ndarray | None = None

    @property
    def shards(self) -> ShardsDataset | None:
        return self.train if isinstance(self.train, ShardsDataset) else None

    @property
    def num_train(self) -> int:
        return len(self.y) if self.y is not None else len(self.train)  # type: ignore[arg-type]


def load_task_data(data: DataConfig) -> TaskData:
    """Load what `data` names. The built-in and .npz data are partitioned here; a factory partitions itself.
    A DataError names the key that chose the source (`data.path: x.npz: data file not found`)."""
    try:
        return _load(data)
    except DataError as exc:
        key = next((k for k in DATA_SOURCES[1:] if getattr(data, k) is not None), "dataset")
        if str(exc).startswith("data."):
            raise
        raise DataError(f"data.{key}: {exc}") from None


def _load(data: DataConfig) -> TaskData:
    if data.factory is not None:
        return _from_factory(data)
    if data.image_folder is not None:
        folder = ImageFolder(data.image_folder)
        tr, te = stratified_split(folder.targets, data.test_fraction, data.seed)
        if data.num_partitions > 1:
            tr = tr[
                partition_indices(folder.targets[tr], data.partition, data.num_partitions, data.seed)[
                    data.partition_index
                ]
            ]
        x0, _ = folder[0]
        return TaskData(
            f"images:{data.image_folder}",
            tuple(x0.shape),
            folder.num_classes,
            None,
            None,
            Subset(folder, tr.tolist()),
            Subset(folder, te.tolist()) if len(te) else None,
        )
    if data.shards_dir is not None:
        shards = ShardsDataset(data.shards_dir)
        x0, _ = shards[0]
        test_arrays = shards.test_arrays()
        test = TensorDataset(torch.as_tensor(test_arrays[0]), torch.as_tensor(test_arrays[1])) if test_arrays else None
        return TaskData(f"shards:{data.shards_dir}", tuple(x0.shape), shards.num_classes, None, None, shards, test)
    ds = load_dataset(data.dataset, data.path, seed=data.seed, test_fraction=data.test_fraction)
    x, y = local_partition(ds, data.partition, data.num_partitions, data.partition_index, data.seed)
    test = TensorDataset(torch.as_tensor(ds.x_test), torch.as_tensor(ds.y_test))
    return TaskData(ds.name, ds.input_shape, ds.num_classes, x, y, None, test, ds.x_test, ds.y_test)


def _from_factory(data: DataConfig) -> TaskData:
    spec = data.factory
    assert spec is not None
    train, test = call_data_factory(
        spec, data.kwargs, partition_index=data.partition_index, num_partitions=data.num_partitions
    )
    return task_data_from(train, test, spec, "data.factory")


def task_data_from(train: TorchDataset[Any], test: TorchDataset[Any] | None, what: str, field: str) -> TaskData:
    """Streamed TaskData over user datasets of (x, y); `what` and `field` name the source in errors."""
    x0, y0 = first_sample(train, what, field)
    if test is not None:
        tx, _ = first_sample(test, what, field)
        if tx.shape != x0.shape:
            raise ConfigError(
                f"{what}: test samples have shape {tuple(tx.shape)}, train samples {tuple(x0.shape)}", field=field
            )
    return TaskData(what, tuple(x0.shape), _output_width(train, y0, what), None, None, train, test)


def _output_width(ds: TorchDataset[Any], y0: torch.Tensor, spec: str) -> int:
    """Classes (from `num_classes`, `classes`, `targets` or a scan of the labels), or the target width."""
    if y0.is_floating_point() and y0.numel() >= 1 and (y0.dim() > 0 or not float(y0).is_integer()):
        return int(y0.numel())
    if isinstance(getattr(ds, "num_classes", None), int):
        return int(ds.num_classes)  # type: ignore[attr-defined]
    if hasattr(ds, "classes"):
        return len(ds.classes)
    if hasattr(ds, "targets"):
        return int(torch.as_tensor(np.asarray(ds.targets)).max()) + 1
    labels = call_plugin(lambda: [int(ds[i][1]) for i in range(len(ds))], spec, "data.factory")  # type: ignore[arg-type]
    return max(labels) + 1


def evaluate_dataset(
    model: nn.Module,
    ds: TorchDataset[Any],
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    classification: bool = True,
    device: torch.device | None = None,
    batch_size: int = 512,
) -> tuple[float, float]:
    """(accuracy, mean loss) over a dataset, in eval mode; accuracy is NaN unless `classification`."""
    loss_fn = loss_fn or nn.functional.cross_entropy
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    total, correct, n = 0.0, 0, 0
    try:
        with torch.no_grad():
            for xb, yb in DataLoader(ds, batch_size=batch_size):
                xb = torch.as_tensor(xb).to(device, torch.float32)
                yb = torch.as_tensor(yb).to(device)
                out = model(xb).float()
                total += float(loss_fn(out, yb)) * len(xb)
                if classification:
                    correct += int((out.argmax(dim=1) == yb).sum())
                n += len(xb)
    finally:
        model.train(was_training)
    if n == 0:
        raise DataError("cannot evaluate on an empty test set")
    return (correct / n if classification else math.nan), total / n
