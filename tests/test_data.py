"""Tests for peer.learn.data: built-in datasets, user .npz files, partitioners."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from peer.errors import ConfigError, DataError, UnknownNameError
from peer.learn.data import (
    DATASET_NAMES,
    Dataset,
    load_dataset,
    local_partition,
    parse_partition,
    partition_indices,
    partition_summary,
)

SPECS = ("iid", "shards:2", "dirichlet:0.5")


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="module")
def mnist1d() -> Dataset:
    return load_dataset("mnist1d", seed=0)


# ------------------------------------------------------------------------------------------ built-ins


def test_digits_shapes(digits: Dataset) -> None:
    assert digits.input_shape == (1, 8, 8)
    assert digits.num_classes == 10
    assert digits.x_train.dtype == np.float32 and digits.y_train.dtype == np.int64
    assert digits.x_train.shape[1:] == (1, 8, 8) and digits.x_test.shape[1:] == (1, 8, 8)
    assert len(digits.x_train) + len(digits.x_test) == 1797
    assert 0.18 < len(digits.x_test) / 1797 < 0.22
    assert digits.x_train.min() >= 0.0 and digits.x_train.max() <= 1.0
    # Stratified: every class is in the test set.
    assert set(np.unique(digits.y_test)) == set(range(10))


def test_digits_test_split_is_shared(digits: Dataset) -> None:
    again = load_dataset("digits", seed=0)
    np.testing.assert_array_equal(again.x_test, digits.x_test)
    np.testing.assert_array_equal(again.y_test, digits.y_test)
    other = load_dataset("digits", seed=1)
    assert not np.array_equal(other.y_test, digits.y_test)


def test_mnist1d_shapes(mnist1d: Dataset) -> None:
    assert mnist1d.input_shape == (1, 40)
    assert mnist1d.num_classes == 10
    assert mnist1d.x_train.shape == (4000, 1, 40) and mnist1d.x_test.shape == (1000, 1, 40)
    assert mnist1d.x_train.dtype == np.float32 and mnist1d.y_test.dtype == np.int64


def test_mnist1d_deterministic_and_global_rng_untouched(mnist1d: Dataset) -> None:
    np.random.seed(1234)
    random.seed(1234)
    again = load_dataset("mnist1d", seed=0)
    # The global streams continue exactly as if nothing had drawn from (or reseeded) them.
    np.testing.assert_array_equal(np.random.random(3), np.random.RandomState(1234).random_sample(3))
    assert random.random() == random.Random(1234).random()
    np.testing.assert_array_equal(again.x_test, mnist1d.x_test)
    np.testing.assert_array_equal(again.y_test, mnist1d.y_test)


def test_unknown_dataset_lists_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        load_dataset("cifar")
    assert info.value.field == "data.dataset"
    for name in DATASET_NAMES:
        assert name in str(info.value)


def test_name_xor_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_dataset(None)
    with pytest.raises(ConfigError):
        load_dataset("digits", str(tmp_path / "a.npz"))


# ---------------------------------------------------------------------------------------------- npz


def _save(tmp_path: Path, name: str = "d.npz", **arrays: np.ndarray) -> str:
    path = tmp_path / name
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return str(path)


def _xy(n: int = 60, d: int = 5, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, d)), np.arange(n) % classes


def test_npz_round_trip(tmp_path: Path) -> None:
    x, y = _xy()
    path = _save(tmp_path, x=x, y=y)
    ds = load_dataset(None, path, seed=3)
    assert ds.input_shape == (5,)
    assert ds.num_classes == 3
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert len(ds.x_train) + len(ds.x_test) == 60 and len(ds.x_test) == 12
    # Every original row ends up in exactly one split, unchanged.
    rows = {tuple(r) for r in np.concatenate([ds.x_train, ds.x_test])}
    assert rows == {tuple(r) for r in x.astype(np.float32)}
    again = load_dataset(None, path, seed=3)
    np.testing.assert_array_equal(again.x_test, ds.x_test)


def test_npz_explicit_test_split_and_shapes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    path = _save(
        tmp_path,
        x=rng.random((20, 9, 9)),
        y=np.arange(20) % 4,
        x_test=rng.random((6, 9, 9)),
        y_test=np.array([0, 1, 2, 3, 4, 0]),
    )
    ds = load_dataset(None, path)
    assert ds.input_shape == (1, 9, 9) and ds.x_test.shape == (6, 1, 9, 9)
    assert ds.num_classes == 5  # max label over train and test, plus one
    signals = _save(tmp_path, "s.npz", x=rng.random((10, 2, 30)), y=np.arange(10) % 2)
    assert load_dataset(None, signals).input_shape == (2, 30)
    images = _save(tmp_path, "i.npz", x=rng.random((10, 3, 4, 4)), y=(np.arange(10) % 2).astype(float))
    assert load_dataset(None, images).input_shape == (3, 4, 4)


def _bad_cases(tmp_path: Path) -> list[tuple[str, str]]:
    x, y = _xy()
    not_npz = tmp_path / "junk.npz"
    not_npz.write_bytes(b"this is not a zip file")
    npy = tmp_path / "single.npy"
    np.save(npy, x)
    x_nan = x.copy()
    x_nan[3, 2] = np.nan
    return [
        (str(tmp_path / "missing.npz"), "not found"),
        (str(not_npz), "npz"),
        (str(npy), "npz"),
        (_save(tmp_path, "nox.npz", y=y), "missing array 'x'"),
        (_save(tmp_path, "noy.npz", x=x), "missing array 'y'"),
        (_save(tmp_path, "len.npz", x=x, y=y[:-1]), "len(x)"),
        (_save(tmp_path, "fy.npz", x=x, y=y + 0.5), "integer"),
        (_save(tmp_path, "sy.npz", x=x, y=np.array(["a"] * 60)), "integer"),
        (_save(tmp_path, "neg.npz", x=x, y=y - 1), "negative"),
        (_save(tmp_path, "sx.npz", x=np.array([["a"]] * 60), y=y), "numeric"),
        (
            _save(tmp_path, "obj.npz", x=np.array([[1], ["a"]], dtype=object), y=y[:2]),
            "cannot read array 'x'",
        ),
        (_save(tmp_path, "nan.npz", x=x_nan, y=y), "NaN"),
        (_save(tmp_path, "inf.npz", x=np.where(x > 2, np.inf, x), y=y), "NaN or Inf"),
        (_save(tmp_path, "one.npz", x=x, y=np.zeros(60, dtype=int)), "fewer than 2 classes"),
        (_save(tmp_path, "dim.npz", x=x[:, 0], y=y), "shape"),
        (_save(tmp_path, "half.npz", x=x, y=y, x_test=x), "together"),
    ]


def test_npz_bad_files(tmp_path: Path) -> None:
    for path, needle in _bad_cases(tmp_path):
        with pytest.raises(DataError) as info:
            load_dataset(None, path)
        message = str(info.value)
        assert path in message, message
        assert needle in message, (path, message)


# ------------------------------------------------------------------------------------------ partitions


def test_parse_partition() -> None:
    assert parse_partition("iid") == ("iid", None)
    assert parse_partition("shards:3") == ("shards", 3)
    assert parse_partition(" Dirichlet:0.1 ") == ("dirichlet", 0.1)
    for bad in (
        "",
        "iid:2",
        "shards",
        "shards:0",
        "shards:1.5",
        "dirichlet:0",
        "dirichlet:-1",
        "dirichlet:nan",
        "dirichlet:x",
        "random",
    ):
        with pytest.raises(ConfigError) as info:
            parse_partition(bad)
        assert info.value.field == "data.partition"
        assert "shards:K" in str(info.value) and "dirichlet:ALPHA" in str(info.value)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("num_partitions", [1, 4, 7])
def test_partitions_disjoint_cover_nonempty(digits: Dataset, spec: str, num_partitions: int) -> None:
    parts = partition_indices(digits.y_train, spec, num_partitions, seed=5)
    assert len(parts) == num_partitions
    assert all(len(p) > 0 for p in parts)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(digits.y_train)
    np.testing.assert_array_equal(np.sort(allidx), np.arange(len(digits.y_train)))


@pytest.mark.parametrize("spec", SPECS)
def test_partitions_deterministic(digits: Dataset, spec: str) -> None:
    a = partition_indices(digits.y_train, spec, 4, seed=11)
    b = partition_indices(digits.y_train, spec, 4, seed=11)
    c = partition_indices(digits.y_train, spec, 4, seed=12)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


def test_iid_is_balanced(digits: Dataset) -> None:
    sizes = [len(p) for p in partition_indices(digits.y_train, "iid", 4, seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_shards_are_label_skewed(digits: Dataset) -> None:
    # Digits has ~144 samples per class. With 10 partitions a shard (~72) spans <= 2 labels, so a
    # partition holds <= 4; with 4 partitions a shard (~180) spans <= 3 labels but mostly 1-2.
    for hist in partition_summary(digits.y_train, partition_indices(digits.y_train, "shards:2", 10, seed=0)):
        assert len(hist) <= 4
    for hist in partition_summary(digits.y_train, partition_indices(digits.y_train, "shards:2", 4, seed=0)):
        assert len(hist) <= 6
        major = [c for c in hist.values() if c >= 0.05 * sum(hist.values())]
        assert len(major) <= 4


def test_dirichlet_extreme_alpha_still_nonempty() -> None:
    labels = np.repeat(np.arange(3), 4)  # 12 samples, many partitions, near-one-hot proportions
    parts = partition_indices(labels, "dirichlet:0.001", 10, seed=0)
    assert all(len(p) > 0 for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(12))


def test_too_few_samples() -> None:
    with pytest.raises(DataError):
        partition_indices(np.arange(3), "iid", 4, seed=0)
    with pytest.raises(DataError):
        partition_indices(np.arange(5), "shards:2", 3, seed=0)


def test_local_partition_validation(digits: Dataset) -> None:
    x, y = local_partition(digits, "iid", 4, 2, seed=0)
    idx = partition_indices(digits.y_train, "iid", 4, seed=0)[2]
    np.testing.assert_array_equal(y, digits.y_train[idx])
    assert x.shape == (len(idx), 1, 8, 8)
    for index in (-1, 4):
        with pytest.raises(ConfigError) as info:
            local_partition(digits, "iid", 4, index, seed=0)
        assert info.value.field == "data.partition_index"
    with pytest.raises(ConfigError) as info:
        local_partition(digits, "iid", 0, 0, seed=0)
    assert info.value.field == "data.num_partitions"


def test_partition_summary() -> None:
    labels = np.array([0, 0, 1, 2, 2, 2])
    assert partition_summary(labels, [np.array([0, 2]), np.array([1, 3, 4, 5])]) == [
        {0: 1, 1: 1},
        {0: 1, 2: 3},
    ]
