"""`state_dir/ready.json`: where a serving daemon can be reached, for `peer status`, `peer health` and `peer ls`
on the same host. Written once the daemon serves, removed at a clean exit; a file whose process is gone (kill -9)
is stale and ignored by readers. Imports nothing heavy, so the status tools stay fast.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

READY_NAME = "ready.json"


@dataclass(frozen=True)
class ReadyFile:
    node_id: str
    address: str
    pid: int
    path: Path
    metrics_address: str = ""


def write(state_dir: Path, node_id: str, address: str, pid: int, metrics_address: str = "") -> Path:
    """Atomically write `state_dir/ready.json` (temp file, rename)."""
    path = state_dir / READY_NAME
    state_dir.mkdir(parents=True, exist_ok=True)
    data = {"node_id": node_id, "address": address, "pid": pid, "metrics_address": metrics_address}
    tmp = path.with_name(f".{READY_NAME}.tmp-{pid}")
    tmp.write_text(json.dumps(data) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def remove(state_dir: Path, pid: int) -> None:
    """Remove our ready file (only if it is still ours: a later daemon on the same state dir may own it)."""
    found = read(state_dir / READY_NAME)
    if found is not None and found.pid == pid:
        with contextlib.suppress(OSError):
            found.path.unlink()


def read(path: Path) -> ReadyFile | None:
    """The ready file at `path`, or None when it is missing, unreadable, or its process has exited."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        metrics = str(data.get("metrics_address") or "")
        ready = ReadyFile(str(data["node_id"]), str(data["address"]), int(data["pid"]), path, metrics)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return ready if _alive(ready.pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def find(roots: list[Path]) -> list[ReadyFile]:
    """Live daemons whose ready files are in `root` or `root/*/` for each root, sorted by node id, no repeats."""
    seen: dict[Path, ReadyFile] = {}
    for root in roots:
        for path in [root / READY_NAME, *sorted(root.glob(f"*/{READY_NAME}"))]:
            if (found := read(path)) is not None:
                seen.setdefault(path.resolve(), found)
    return sorted(seen.values(), key=lambda r: (r.node_id, r.address))
