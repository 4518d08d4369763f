"""Model snapshots for the demo's convergence plots: the flat model as `.npy`, at most once per interval."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch


class Snapshots:
    """Writes `<ms since epoch>_<step>.npy` files atomically (a reader never sees a partial file)."""

    def __init__(self, directory: Path | None, interval_s: float) -> None:
        self.directory = directory
        self.interval_s = interval_s
        self._last = -math.inf

    def maybe(self, x: torch.Tensor, step: int) -> None:
        if self.directory is None or self.interval_s <= 0:
            return
        now = time.time()
        if now - self._last < self.interval_s:
            return
        self._last = now
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{int(now * 1000):015d}_{step:09d}.npy"
        tmp = self.directory / f".{name}.tmp"
        with open(tmp, "wb") as fh:
            np.save(fh, x.numpy())
        tmp.replace(self.directory / name)
