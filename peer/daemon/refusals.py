"""Refused remote input, counted by reason and logged quietly: one line per source and reason per interval,
with the count of refusals it stands for; never a traceback, never more than a bounded echo of the input."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from peer.core.admission import RefusalLog, clip
from peer.daemon.metrics import Counters


class Refusals:
    def __init__(
        self,
        counters: Counters,
        log: logging.LoggerAdapter[logging.Logger],
        interval_s: float,
        notify: Callable[[], None] = lambda: None,
    ) -> None:
        self.counters = counters
        self.log = log
        self.policy = RefusalLog(interval_s)
        self.notify = notify  # the daemon's change signal: tests wait on refusals without polling

    def refuse(
        self, reason: str, source: str, message: str, *, now: float | None = None, level: int = logging.WARNING
    ) -> None:
        """Count one refusal; log it unless this source was refused for this reason within the interval."""
        self.counters.reject(reason)
        self.notify()
        n = self.policy.should_log((clip(source, 80), reason), time.monotonic() if now is None else now)
        if n == 0:
            return
        more = f" ({n} such refusals since the last report)" if n > 1 else ""
        self.log.log(level, "%s [%s]%s", clip(message), reason, more)
