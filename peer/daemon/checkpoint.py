"""Atomic checkpoints in `state_dir`: temp file, fsync, rename, fsync the directory.

Checkpoints hold tensors, numbers and strings only and are read with `torch.load(weights_only=True)`, which
refuses arbitrary pickled objects. Only the daemon's own files are read here; nothing from the network is.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from peer.errors import CheckpointError

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` so that `path` holds either the old or the new content, never a torn mix."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    # The rename is durable only once the directory entry is on disk.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(state_dir: str | Path, state: dict[str, Any]) -> Path:
    """Serialize `state` and write it atomically. Raises CheckpointError (the old checkpoint is kept)."""
    path = Path(state_dir) / CHECKPOINT_NAME
    buf = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, **state}, buf)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
    except OSError as exc:
        raise CheckpointError(
            f"cannot write checkpoint {path}: {exc.strerror or exc}; the previous checkpoint is kept"
        ) from exc
    return path


def load(state_dir: str | Path) -> dict[str, Any] | None:
    """The checkpoint in `state_dir`, or None if there is none. A corrupt file raises CheckpointError."""
    path = Path(state_dir) / CHECKPOINT_NAME
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a torn or foreign file; all mean "corrupt"
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: {str(exc)[:200]}); "
            "refusing to start fresh over it. Move it away, or run with --reset to discard it"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has an unknown format; run with --reset to discard it")
    return state


def discard(state_dir: str | Path) -> Path | None:
    """Move an existing checkpoint aside (`--reset`); nothing is deleted, so nothing is lost by mistake."""
    path = Path(state_dir) / CHECKPOINT_NAME
    if not path.exists():
        return None
    n = 0
    while (aside := path.with_name(f"{CHECKPOINT_NAME}.discarded.{n}")).exists():
        n += 1
    os.replace(path, aside)
    return aside


class Checkpointer:
    """Writes the training thread's checkpoint states from the event loop, off the loop (torch.save and fsync
    run in a thread). A failed write (a full disk) keeps the previous checkpoint and is logged once."""

    def __init__(
        self,
        state_dir: Path,
        header: dict[str, Any],
        warn_once: Callable[[tuple[str, ...], str], None],
        wall_clock: Callable[[], float],
    ) -> None:
        self.state_dir = state_dir
        self.header = header  # node_id, fingerprint, algorithm_name: checked again when the state is loaded
        self.warn_once = warn_once
        self.wall_clock = wall_clock
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def state(self, worker_state: dict[str, Any]) -> dict[str, Any]:
        return {**self.header, "saved_unix_s": self.wall_clock(), **worker_state}

    async def drain(self) -> None:
        while True:
            await self.save(await self.queue.get())

    async def save(self, state: dict[str, Any]) -> None:
        try:
            await asyncio.to_thread(save, self.state_dir, state)
        except CheckpointError as exc:
            # A full disk must not kill training: keep the old checkpoint and try again next interval.
            self.warn_once(("checkpoint",), str(exc))
