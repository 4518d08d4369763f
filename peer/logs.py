"""Logging setup: human-readable or JSON lines on stderr; every record carries the node id."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any


class _NodeIdDefault(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "node_id"):
            record.node_id = "-"
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "node_id": getattr(record, "node_id", "-"),
            "msg": record.getMessage(),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


def setup(level: str = "info", json_lines: bool = False) -> None:
    """Configure the root logger once per process (the CLI calls it; tests rely on pytest's capture)."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC core's own stderr chatter
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_NodeIdDefault())
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        fmt = logging.Formatter("%(asctime)s %(levelname)-7s [%(node_id)s] %(name)s: %(message)s", "%H:%M:%S")
        fmt.converter = time.localtime
        handler.setFormatter(fmt)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("zeroconf", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def node_logger(name: str, node_id: str) -> logging.LoggerAdapter[logging.Logger]:
    """A logger whose records carry `node_id` (several daemons share a process in tests)."""
    return logging.LoggerAdapter(logging.getLogger(name), {"node_id": node_id})


class OnceLogger:
    """Logs a warning the first time a key is seen, then at debug level, so a failing peer can't flood logs."""

    def __init__(self, log: logging.LoggerAdapter[logging.Logger]) -> None:
        self.log = log
        self._seen: set[tuple[str, ...]] = set()

    def warning(self, key: tuple[str, ...], msg: str, *args: object) -> None:
        if key in self._seen:
            self.log.debug(msg, *args)
        else:
            self._seen.add(key)
            self.log.warning(msg, *args)

    def forget(self, key: tuple[str, ...]) -> None:
        """The condition behind `key` cleared (e.g. the peer answers again): warn afresh next time."""
        self._seen.discard(key)
