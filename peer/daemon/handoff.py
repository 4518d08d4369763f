"""Latest-value handoff from the training thread to the event loop.

The training thread publishes a payload after every round, which on a small model is thousands of times a second.
Scheduling a loop callback for each one (`call_soon_threadsafe`: a self-pipe write, a loop wake-up and the GIL
passed back and forth) took a fifth of a core on the loop and as much again from training, for payloads the
pusher then discarded unsent, because it only ever sends the newest (latest wins). Here the thread stores the
newest value and schedules a callback only when the consumer wants one (`want`: the pusher has a link free to
send on) and none is pending; otherwise the consumer `take`s the newest value when it next looks (a push
finished, its retry poll). The loop always gets the newest value and pays once per use, not once per round.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class LatestHandoff(Generic[T]):
    """`put(value)` from any thread; `deliver(value)` runs on the loop with the newest value put since the last
    delivery or `take` (values put in between are superseded, never delivered), but only while the consumer
    wants values (`want(True)`, the default)."""

    def __init__(self, loop: Callable[[], asyncio.AbstractEventLoop], deliver: Callable[[T], None]) -> None:
        self._loop = loop
        self._deliver = deliver
        self._lock = threading.Lock()
        self._value: T | None = None
        self._scheduled = False
        self._wanted = True
        self.puts = 0  # values put (read by tests and metrics)
        self.deliveries = 0  # callbacks the loop ran

    def put(self, value: T) -> None:
        with self._lock:
            self.puts += 1
            self._value = value
            if self._scheduled or not self._wanted:
                return
            self._scheduled = True
        self._loop().call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            value, self._value = self._value, None
            self._scheduled = False
            self.deliveries += 1
        if value is not None:
            self._deliver(value)

    def take(self) -> T | None:
        """The newest value not yet delivered or taken (on the loop), or None."""
        with self._lock:
            value, self._value = self._value, None
        return value

    def want(self, wanted: bool) -> bool:
        """Whether `put` should wake the loop from now on (on the loop). Returns True if a value is waiting
        already, which the consumer should `take` rather than wait for."""
        with self._lock:
            self._wanted = wanted
            return self._value is not None
