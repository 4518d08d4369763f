"""Atomic checkpoints: round trip, a failed write keeps the old file, corrupt files are refused, --reset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peer.daemon import checkpoint
from peer.errors import CheckpointError


def test_round_trip_and_overwrite(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, {"model": {"w": torch.ones(3)}, "counters": {"step": 5}})
    checkpoint.save(tmp_path, {"model": {"w": torch.zeros(3)}, "counters": {"step": 6}})
    state = checkpoint.load(tmp_path)
    assert state is not None and state["counters"]["step"] == 6 and torch.equal(state["model"]["w"], torch.zeros(3))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind
    assert checkpoint.load(tmp_path / "empty") is None


def test_failed_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, {"counters": {"step": 1}})
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(CheckpointError, match="previous checkpoint is kept"):
        checkpoint.save(blocker / "sub", {"counters": {"step": 2}})
    state = checkpoint.load(tmp_path)
    assert state is not None and state["counters"]["step"] == 1


def test_failed_rename_removes_the_temp_file(tmp_path: Path) -> None:
    # The target name is a non-empty directory, so the final rename fails after the temp file was written.
    (tmp_path / checkpoint.CHECKPOINT_NAME).mkdir()
    (tmp_path / checkpoint.CHECKPOINT_NAME / "x").write_text("x")
    with pytest.raises(CheckpointError):
        checkpoint.save(tmp_path, {"counters": {"step": 2}})
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.CHECKPOINT_NAME]


@pytest.mark.parametrize("content", [b"", b"garbage", b"PK\x03\x04truncated zip"])
def test_corrupt_checkpoint_is_refused_not_replaced(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / checkpoint.CHECKPOINT_NAME
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="--reset"):
        checkpoint.load(tmp_path)
    assert path.read_bytes() == content


def test_pickled_objects_are_never_loaded(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    torch.save({"format": 1, "x": Evil()}, tmp_path / checkpoint.CHECKPOINT_NAME)
    with pytest.raises(CheckpointError):
        checkpoint.load(tmp_path)


def test_discard_moves_aside_without_deleting(tmp_path: Path) -> None:
    path = tmp_path / checkpoint.CHECKPOINT_NAME
    path.write_bytes(b"old")
    first = checkpoint.discard(tmp_path)
    path.write_bytes(b"older")
    second = checkpoint.discard(tmp_path)
    assert first is not None and second is not None and first != second
    assert first.read_bytes() == b"old" and second.read_bytes() == b"older"
    assert checkpoint.discard(tmp_path) is None
