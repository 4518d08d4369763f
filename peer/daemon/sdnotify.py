"""systemd's notify protocol (`Type=notify`): READY=1, STOPPING=1, WATCHDOG=1 and STATUS= as datagrams.

sd_notify(3) is one AF_UNIX SOCK_DGRAM datagram to the socket named by `$NOTIFY_SOCKET`; a name starting with
`@` is in the abstract namespace (a leading NUL byte). The CLI reads the environment (`Notifier.from_env`);
without `NOTIFY_SOCKET` every call is a no-op, so the daemon runs the same outside systemd. The watchdog task
pings at half of `$WATCHDOG_USEC` from the event loop itself, so a blocked loop stops the pings and systemd
restarts the service.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends notify datagrams to `socket_path` (None: nothing is sent)."""

    def __init__(self, socket_path: str | None = None, watchdog_usec: int | None = None) -> None:
        self.socket_path = socket_path or None
        self.watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._warned = False

    @classmethod
    def from_env(cls, env: Mapping[str, str], pid: int | None = None) -> Notifier:
        """`NOTIFY_SOCKET`, and `WATCHDOG_USEC` when `WATCHDOG_PID` is unset or names this process."""
        pid = os.getpid() if pid is None else pid
        usec: int | None = None
        wd_pid = env.get("WATCHDOG_PID", "")
        if env.get("WATCHDOG_USEC", "").isdigit() and (not wd_pid or wd_pid == str(pid)):
            usec = int(env["WATCHDOG_USEC"])
        return cls(env.get("NOTIFY_SOCKET"), usec)

    @property
    def enabled(self) -> bool:
        return self.socket_path is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1: half the watchdog timeout, as sd_watchdog_enabled(3) advises."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    def notify(self, *states: str) -> bool:
        """Send `states` (e.g. "READY=1", "STATUS=serving") in one datagram; False when not sent. A failure
        is logged once (the service manager went away; the daemon carries on)."""
        if self.socket_path is None or not states:
            return False
        address = self.socket_path
        if address.startswith("@"):
            address = "\0" + address[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(address)
                sock.sendall("\n".join(states).encode())
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify the service manager at %s: %s", self.socket_path, exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=shutting down")

    async def watchdog(self, stopped: asyncio.Event) -> None:
        """Ping WATCHDOG=1 every half timeout until `stopped` is set (a task of the daemon's TaskGroup)."""
        interval = self.watchdog_interval_s
        if interval is None or not self.enabled:
            return
        while not stopped.is_set():
            self.notify("WATCHDOG=1")
            try:
                await asyncio.wait_for(stopped.wait(), timeout=interval)
            except TimeoutError:
                pass
