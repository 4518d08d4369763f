"""A change signal for the event loop: waiters re-check their condition whenever the daemon reports a change,
instead of polling on a timer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Changes:
    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None

    @property
    def waiting(self) -> bool:
        """Whether anyone waits now. Read from another thread it may be stale: a waiter that starts right after
        the read misses that one notification and is woken by the next."""
        return self._future is not None

    def notify(self) -> None:
        """Wake every waiter (on the loop thread)."""
        if self._future is not None and not self._future.done():
            self._future.set_result(None)
        self._future = None

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Return once `predicate()` holds, checked now and after every `notify`; TimeoutError naming `what`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
            if self._future is None:
                self._future = loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._future), remaining)
            except TimeoutError:
                continue

    async def changed(self) -> None:
        """Return at the next `notify`."""
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._future)
