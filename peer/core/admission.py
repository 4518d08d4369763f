"""Admission under hostile input: per-source rate limits, bounded claim verification, stream slots, and refusal
logs that stay quiet under attack. Pure bookkeeping: every method takes `now` (monotonic seconds).

Each structure holds a bounded number of keys, so an attacker who varies its claims (node ids, addresses) costs
bounded memory; when a structure is full the least recently used key is dropped, which can only make that key
start afresh (a new burst, one more log line), never grow memory.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

# Longest piece of remote input echoed in a status detail or a log line.
MAX_ECHO_CHARS = 200


def clip(text: object, limit: int = MAX_ECHO_CHARS) -> str:
    """`text` as a string of at most `limit` characters (a marker says how much was cut)."""
    s = str(text)
    if len(s) <= limit:
        return s
    return f"{s[: max(0, limit - 30)]}... [{len(s)} chars]"


_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def valid_node_id(node_id: str) -> bool:
    """A node id as `node_id` in the config allows: 1 to 63 letters, digits, `_`, `.`, `-`."""
    return _NODE_ID.fullmatch(node_id) is not None


def source_of(transport_peer: str) -> str:
    """The host part of gRPC's `context.peer()` ("ipv4:1.2.3.4:5678" -> "1.2.3.4"): what rate limits count by.
    A caller picks its node id and its port freely, but not its address."""
    kind, _, rest = transport_peer.partition(":")
    if kind == "ipv6":
        host = rest.rpartition(":")[0].strip("[]") or rest
    elif kind == "ipv4":
        host = rest.rpartition(":")[0] or rest
    else:
        host = transport_peer
    return clip(host, 64)


@dataclass(frozen=True)
class AdmissionSettings:
    """Limits on what remote input may cost us (derived from `membership.*` and `log.*`)."""

    max_peers: int = 256  # records in the peer table, evicted ones included
    max_pending: int = 64  # verification Hellos (joins and duplicate-id checks) in flight at once
    pending_ttl_s: float = 30.0  # a verification never reported back is forgotten after this
    hello_rate_per_s: float = 50.0  # Hellos per source host per second, on average ...
    hello_burst: int = 100  # ... with bursts of this many
    dial_rate_per_s: float = 10.0  # Hellos that make us dial (a join, a claim on our id) per source host ...
    dial_burst: int = 64  # ... with bursts of this many
    max_sources: int = 1024  # source hosts remembered by the rate limiter
    log_interval_s: float = 60.0  # a refused input is logged once per source and reason per interval


class RateLimiter:
    """A token bucket per key (a source host), holding at most `max_keys` buckets."""

    def __init__(self, rate_per_s: float, burst: int, max_keys: int) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def allow(self, key: str, now: float) -> bool:
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)
        ok = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return ok

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass
class _Entry:
    first: float
    count: int  # refusals since the last line


class RefusalLog:
    """Decides which refusals are logged: the first per key (source, reason) in each interval, then one line
    with the count when the interval is over; at most `max_lines` lines per interval over all keys."""

    def __init__(self, interval_s: float, *, max_keys: int = 1024, max_lines: int = 20) -> None:
        self.interval_s = interval_s
        self.max_keys = max_keys
        self.max_lines = max_lines
        self._keys: OrderedDict[tuple[str, ...], _Entry] = OrderedDict()
        self._window = float("-inf")
        self._lines = 0
        self.suppressed = 0  # refusals not logged because the per-interval line budget was spent

    def should_log(self, key: tuple[str, ...], now: float) -> int:
        """0: stay quiet; n >= 1: log one line now, standing for n refusals (this one included)."""
        if now - self._window >= self.interval_s:
            self._window, self._lines = now, 0
        entry = self._keys.pop(key, None)
        if entry is not None and now - entry.first < self.interval_s:
            entry.count += 1
            self._keys[key] = entry
            return 0
        count = entry.count + 1 if entry is not None else 1
        self._keys[key] = _Entry(now, 0)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
        if self._lines >= self.max_lines:
            self.suppressed += 1
            return 0
        self._lines += 1
        return count


class StreamSlots:
    """Open Push streams, per source host and in total; a stream beyond either limit is refused."""

    def __init__(self, max_total: int, max_per_source: int) -> None:
        self.max_total = max_total
        self.max_per_source = max_per_source
        self.open: dict[str, int] = {}
        self.total = 0

    def acquire(self, source: str) -> str:
        """ "" when a slot was taken (release it later), else why not."""
        if self.total >= self.max_total:
            return f"too many open push streams ({self.total})"
        n = self.open.get(source, 0)
        if n >= self.max_per_source:
            return f"too many open push streams from {source} ({n})"
        self.open[source] = n + 1
        self.total += 1
        return ""

    def release(self, source: str) -> None:
        n = self.open.get(source, 0)
        if n <= 1:
            self.open.pop(source, None)
        else:
            self.open[source] = n - 1
        self.total = max(0, self.total - 1)


def stream_deadline_s(total_bytes: int, base_s: float, min_bandwidth_bytes_per_s: float) -> float:
    """The longest a Push of `total_bytes` may take: the same bound the sender's own deadline uses."""
    return base_s + max(0, total_bytes) / min_bandwidth_bytes_per_s
