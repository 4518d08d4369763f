"""Testbed methods that read the daemons' status: `peer status` in a namespace, and the fast probe clients."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from peer.tools.testbed.base import BedBase
from peer.tools.testbed.common import TestbedError
from peer.tools.testbed.probe import _Probe


class StatusMixin(BedBase):
    """`status`, `status_text` and `quick_status` of a `Testbed`'s hosts."""

    # -- status -----------------------------------------------------------------------------------------
    def status(self, i: int, via: int | None = None, timeout_s: float = 5.0) -> dict[str, Any]:
        """`peer status <address of i> --json`, run inside host `via`'s namespace (default: i's own, which
        works even while i is cut off)."""
        proc = self._peer_status(i, via, timeout_s, "--json")
        if proc.returncode != 0:
            raise TestbedError(f"peer status h{i} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def status_text(self, i: int, via: int | None = None, timeout_s: float = 5.0) -> str:
        """`peer status` as a table (or why it failed)."""
        proc = self._peer_status(i, via, timeout_s)
        return proc.stdout if proc.returncode == 0 else f"(peer status failed: {proc.stderr.strip()[-500:]})\n"

    def _peer_status(self, i: int, via: int | None, timeout_s: float, *extra: str) -> subprocess.CompletedProcess[str]:
        ns = self.host_ns(i if via is None else via)
        tls = self.tls_files(self.PROBE_ID)
        cmd = ["ip", "netns", "exec", ns, self.python, "-m", "peer", "status", self.address(i), *extra]
        cmd += ["--ca", tls["ca_file"], "--cert", tls["cert_file"], "--key", tls["key_file"]]
        return subprocess.run(
            [*cmd, "--timeout", str(timeout_s)],
            capture_output=True,
            text=True,
            env=self._env(),
            timeout=timeout_s + 60,
        )

    def _probe(self, ns: str) -> _Probe:
        with self._probe_lock:
            probe = self._probes.get(ns)
            if probe is not None and probe.proc.poll() is None:
                return probe
        fresh = _Probe(ns, self.python, self._env())  # ~0.1 s of imports: outside the lock
        with self._probe_lock:
            old = self._probes.get(ns)
            if old is not None and old.proc.poll() is None:
                fresh.close()
                return old
            self._probes[ns] = fresh
            return fresh

    def warm_status_clients(self) -> None:
        """Start the `quick_status` clients of every host now, so that the first poll is fast too."""
        with ThreadPoolExecutor(max_workers=min(16, self.n)) as pool:
            list(pool.map(self._probe, [self.host_ns(i) for i in range(self.n)]))

    def quick_status(self, i: int, via: int | None = None, timeout_s: float = 2.0) -> dict[str, Any]:
        """The same dict as `status`, from a long-lived client in the namespace (milliseconds, not seconds:
        for polling). Raises TestbedError when the daemon does not answer."""
        probe = self._probe(self.host_ns(i if via is None else via))
        reply = probe.query(self.address(i), timeout_s, self.tls_files(self.PROBE_ID))
        if not reply.get("ok"):
            raise TestbedError(f"status of h{i} (via h{i if via is None else via}): {reply.get('error')}")
        status: dict[str, Any] = reply["status"]
        return status
