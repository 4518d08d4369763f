"""Logging setup: human-readable or JSON lines on stderr; every record carries the node id."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, ClassVar


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


class JournalFormatter(logging.Formatter):
    """For stderr connected to journald: a `<N>` syslog priority prefix (journald stores it as PRIORITY, so
    `journalctl -p warning` works) and no timestamp (journald adds its own)."""

    PRIORITY: ClassVar[dict[str, int]] = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}

    def __init__(self) -> None:
        super().__init__("[%(node_id)s] %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{self.PRIORITY.get(record.levelname, 6)}>"
        # Each line of a multi-line message (a traceback) is its own journal entry: prefix them all.
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def stderr_is_journal(journal_stream: str | None) -> bool:
    """True when `$JOURNAL_STREAM` ("DEV:INODE", set by systemd) names our stderr, as sd_journal_stream_fd(3)
    advises: a child whose stderr was redirected elsewhere inherits the variable but not the journal."""
    if not journal_stream:
        return False
    dev, _, inode = journal_stream.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return f"{st.st_dev}:{st.st_ino}" == f"{dev}:{inode}"


def setup(level: str = "info", json_lines: bool = False, *, journald: bool = False) -> None:
    """Configure the root logger once per process (the CLI calls it; tests rely on pytest's capture)."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC core's own stderr chatter
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_NodeIdDefault())
    if json_lines:
        handler.setFormatter(JsonFormatter())
    elif journald:
        handler.setFormatter(JournalFormatter())
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
