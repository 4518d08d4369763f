"""Datasets for `peer`: the built-in ones (digits, mnist1d), user `.npz` files, and the deterministic
partitioners (iid, label shards, Dirichlet) that give each peer its slice of the training set.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
import zipfile
from dataclasses import dataclass

import numpy as np

from peer.errors import ConfigError, DataError, UnknownNameError

log = logging.getLogger(__name__)

DATASET_NAMES = ("digits", "mnist1d")
PARTITION_FORMS = ("iid", "shards:K (integer K >= 1)", "dirichlet:ALPHA (float ALPHA > 0)")

# Distinct stream tags so the train/test split and the partitioning never share random numbers,
# even when both are driven by the same user seed.
_SPLIT_STREAM = 0x5E11
_PARTITION_STREAM = 0x9A27
_DIRICHLET_REDRAWS = 100


@dataclass(frozen=True)
class Dataset:
    """A classification dataset with a fixed train/test split. x is float32, y is int64."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    input_shape: tuple[int, ...]
    num_classes: int


def _rng(stream: int, seed: int) -> np.random.Generator:
    # SeedSequence needs non-negative entropy; masking keeps negative config seeds usable and distinct.
    return np.random.default_rng([stream, seed & 0xFFFF_FFFF_FFFF_FFFF])


def load_dataset(name: str | None, path: str | None = None, *, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """Load a built-in dataset by `name` or a user `.npz` file by `path` (exactly one of the two).

    The test split depends only on the data and `seed`, so every peer with the same seed evaluates on
    the same held-out set.
    """
    if (name is None) == (path is None):
        raise ConfigError("give exactly one of a dataset name or a data file path", field="data.dataset")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"must be in (0, 1), got {test_fraction}", field="data.test_fraction")
    if path is not None:
        return _load_npz(path, seed=seed, test_fraction=test_fraction)
    assert name is not None
    if name == "digits":
        return _load_digits(seed, test_fraction)
    if name == "mnist1d":
        return _load_mnist1d(seed, test_fraction)
    raise UnknownNameError("dataset", name, DATASET_NAMES, field="data.dataset")


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) index arrays holding out about `test_fraction` of every class."""
    rng = _rng(_SPLIT_STREAM, seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        # A class with a single sample stays in train: it cannot be both learned and tested.
        n_test = min(round(len(idx) * test_fraction), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _load_digits(seed: int, test_fraction: float) -> Dataset:
    from sklearn.datasets import load_digits  # bundled with scikit-learn, never downloads

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    tr, te = stratified_split(y, test_fraction, seed)
    return Dataset("digits", x[tr], y[tr], x[te], y[te], (1, 8, 8), 10)


def _load_mnist1d(seed: int, test_fraction: float) -> Dataset:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed & 0xFFFF_FFFF  # np.random.seed accepts 32-bit seeds only
    args.train_split = 1.0 - test_fraction
    # make_dataset reseeds the global numpy and stdlib RNGs; restore both so callers are unaffected.
    np_state = np.random.get_state()
    py_state = random.getstate()
    t0 = time.perf_counter()
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    log.debug("generated mnist1d (seed %d) in %.2f s", seed, time.perf_counter() - t0)

    def prep(x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float32).reshape(len(x), 1, -1)

    length = int(args.final_seq_length)
    return Dataset(
        "mnist1d",
        prep(raw["x"]),
        np.asarray(raw["y"], dtype=np.int64),
        prep(raw["x_test"]),
        np.asarray(raw["y_test"], dtype=np.int64),
        (1, length),
        10,
    )


# ---------------------------------------------------------------------------------------------- npz files


def _check_x(path: str, key: str, x: np.ndarray) -> np.ndarray:
    if x.dtype.kind not in "iuf":
        raise DataError(f"{path}: array {key!r} must be numeric, got dtype {x.dtype}")
    if x.ndim < 2 or x.ndim > 4:
        raise DataError(
            f"{path}: array {key!r} must have shape (n, d), (n, c, l), (n, h, w) or (n, c, h, w); got {x.shape}"
        )
    if len(x) == 0:
        raise DataError(f"{path}: array {key!r} is empty")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{path}: array {key!r} contains NaN or Inf (or values too large for float32)")
    return x


def _check_y(path: str, key: str, y: np.ndarray) -> np.ndarray:
    if y.ndim != 1:
        raise DataError(f"{path}: array {key!r} must be 1-D labels, got shape {y.shape}")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or not np.array_equal(y, np.round(y)):
            raise DataError(f"{path}: array {key!r} must hold integer class labels, got non-integer floats")
    elif y.dtype.kind not in "iu":
        raise DataError(f"{path}: array {key!r} must hold integer class labels, got dtype {y.dtype}")
    if len(y) and y.min() < 0:
        raise DataError(f"{path}: array {key!r} has negative labels (min {y.min()}); labels must be >= 0")
    return y.astype(np.int64)


def _shape_inputs(path: str, x: np.ndarray) -> np.ndarray:
    # 3-D data is ambiguous: few leading channels read as (n, c, l) signals, otherwise (n, h, w) images.
    if x.ndim == 3 and x.shape[1] > 4:
        log.info("%s: reading x of shape %s as (n, h, w) images with one channel", path, x.shape)
        return x[:, None, :, :]
    return x


def _load_npz(path: str, *, seed: int, test_fraction: float) -> Dataset:
    if not os.path.isfile(path):
        raise DataError(f"{path}: data file not found")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: not an .npz archive (a single .npy array?); save with np.savez(x=..., y=...)")
    with archive:
        keys = set(archive.files)
        for key in ("x", "y"):
            if key not in keys:
                raise DataError(f"{path}: missing array {key!r} (found: {', '.join(sorted(keys)) or 'none'})")
        if ("x_test" in keys) != ("y_test" in keys):
            raise DataError(f"{path}: 'x_test' and 'y_test' must be given together")
        arrays: dict[str, np.ndarray] = {}
        for key in ("x", "y", "x_test", "y_test"):
            if key not in keys:
                continue
            try:
                arrays[key] = np.asarray(archive[key])
            except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
                # allow_pickle=False rejects object arrays here; a corrupt member fails here too.
                raise DataError(f"{path}: cannot read array {key!r} ({exc})") from None

    x = _check_x(path, "x", arrays["x"])
    y = _check_y(path, "y", arrays["y"])
    if len(x) != len(y):
        raise DataError(f"{path}: len(x) = {len(x)} but len(y) = {len(y)}")
    x = _shape_inputs(path, x)
    if "x_test" in arrays:
        x_test = _shape_inputs(path, _check_x(path, "x_test", arrays["x_test"]))
        y_test = _check_y(path, "y_test", arrays["y_test"])
        if len(x_test) != len(y_test):
            raise DataError(f"{path}: len(x_test) = {len(x_test)} but len(y_test) = {len(y_test)}")
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(f"{path}: x_test samples have shape {x_test.shape[1:]} but x samples have {x.shape[1:]}")
    else:
        tr, te = stratified_split(y, test_fraction, seed)
        if len(te) == 0:
            raise DataError(f"{path}: too few samples per class to hold out a test set; add x_test/y_test")
        x, y, x_test, y_test = x[tr], y[tr], x[te], y[te]
    if len(np.unique(y)) < 2:
        raise DataError(f"{path}: the training labels hold fewer than 2 classes")
    num_classes = int(max(y.max(), y_test.max())) + 1
    name = f"npz:{os.path.basename(path)}"
    return Dataset(name, x, y, x_test, y_test, tuple(int(s) for s in x.shape[1:]), num_classes)


# ------------------------------------------------------------------------------------------- partitions


def parse_partition(spec: str) -> tuple[str, float | int | None]:
    """Parse "iid", "shards:K" or "dirichlet:ALPHA" into (kind, parameter)."""

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{why} in {spec!r}; valid forms: {', '.join(PARTITION_FORMS)}", field="data.partition")

    text = spec.strip().lower() if isinstance(spec, str) else ""
    kind, _, arg = text.partition(":")
    if kind == "iid" and not arg:
        return "iid", None
    if kind == "shards":
        try:
            k = int(arg)
        except ValueError:
            raise bad("shards needs an integer count") from None
        if k < 1:
            raise bad("shards needs K >= 1")
        return "shards", k
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            raise bad("dirichlet needs a float concentration") from None
        if not (math.isfinite(alpha) and alpha > 0):
            raise bad("dirichlet needs a finite ALPHA > 0")
        return "dirichlet", alpha
    raise bad("unknown partition")


def _check_num_partitions(num_partitions: int) -> None:
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) or num_partitions < 1:
        raise ConfigError(f"must be an integer >= 1, got {num_partitions!r}", field="data.num_partitions")


def partition_indices(labels: np.ndarray, spec: str, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Split range(len(labels)) into `num_partitions` disjoint, covering, non-empty sorted index arrays.

    Deterministic in (labels, spec, num_partitions, seed): every process computes the same partitions.
    """
    kind, arg = parse_partition(spec)
    _check_num_partitions(num_partitions)
    labels = np.asarray(labels)
    n = len(labels)
    if n < num_partitions:
        raise DataError(f"cannot split {n} training samples into {num_partitions} non-empty partitions")
    rng = _rng(_PARTITION_STREAM, seed)
    if kind == "iid":
        parts = np.array_split(rng.permutation(n), num_partitions)
    elif kind == "shards":
        assert isinstance(arg, int)
        parts = _shards(labels, arg, num_partitions, rng)
    else:
        assert isinstance(arg, float)
        parts = _dirichlet(labels, arg, num_partitions, rng)
    return [np.sort(p).astype(np.int64) for p in parts]


def _shards(labels: np.ndarray, k: int, num_partitions: int, rng: np.random.Generator) -> list[np.ndarray]:
    num_shards = num_partitions * k
    if len(labels) < num_shards:
        raise DataError(f"cannot cut {len(labels)} samples into {num_shards} shards ({num_partitions} x {k})")
    # Shuffle first so the stable sort breaks label ties randomly (but reproducibly).
    perm = rng.permutation(len(labels))
    order = perm[np.argsort(labels[perm], kind="stable")]
    shards = np.array_split(order, num_shards)
    dealt = rng.permutation(num_shards)
    return [np.concatenate([shards[s] for s in dealt[p * k : (p + 1) * k]]) for p in range(num_partitions)]


def _dirichlet_draw(labels: np.ndarray, alpha: float, num_partitions: int, rng: np.random.Generator) -> list[list[int]]:
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        props = rng.dirichlet(np.full(num_partitions, alpha))
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
        for p, chunk in enumerate(np.split(idx, cuts)):
            parts[p].extend(chunk.tolist())
    return parts


def _dirichlet(labels: np.ndarray, alpha: float, num_partitions: int, rng: np.random.Generator) -> list[np.ndarray]:
    parts: list[list[int]] = []
    for _ in range(_DIRICHLET_REDRAWS):
        parts = _dirichlet_draw(labels, alpha, num_partitions, rng)
        if all(parts):
            break
    else:
        # Very small alpha with many partitions: give each empty partition one sample from the largest.
        moved = 0
        for p in range(num_partitions):
            if not parts[p]:
                donor = max(range(num_partitions), key=lambda q: len(parts[q]))
                parts[p].append(parts[donor].pop())
                moved += 1
        log.warning(
            "dirichlet:%g left %d partition(s) empty after %d draws; moved one sample to each",
            alpha,
            moved,
            _DIRICHLET_REDRAWS,
        )
    return [np.asarray(p, dtype=np.int64) for p in parts]


def local_partition(
    ds: Dataset, spec: str, num_partitions: int, index: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """This peer's (x, y) training slice: partition `index` of `num_partitions`."""
    _check_num_partitions(num_partitions)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_partitions:
        raise ConfigError(f"must be an integer in [0, {num_partitions}), got {index!r}", field="data.partition_index")
    idx = partition_indices(ds.y_train, spec, num_partitions, seed)[index]
    return ds.x_train[idx], ds.y_train[idx]


def partition_summary(labels: np.ndarray, parts: list[np.ndarray]) -> list[dict[int, int]]:
    """Label histogram {label: count} of each partition, for logs."""
    labels = np.asarray(labels)
    out: list[dict[int, int]] = []
    for p in parts:
        values, counts = np.unique(labels[p], return_counts=True)
        out.append({int(v): int(c) for v, c in zip(values, counts, strict=True)})
    return out
