"""The fast status client: a long-lived probe subprocess inside a namespace that answers GetStatus requests."""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
from typing import Any

from peer.tools.testbed.common import TestbedError
from peer.tools.testbed.process import _pdeathsig

# A status client that runs inside a namespace and answers one request per stdin line. It imports only
# `peer.tools.status` (no torch): `peer status` imports torch (via peer.config), ~1.5 s per call, too slow for polling.
_PROBE_SRC = r"""
import json, sys
from peer.net.tls import TlsFiles
from peer.tools.status import probe_status
print(json.dumps({"ok": True, "probe": "ready"}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    tls = TlsFiles(**req["tls"]) if req.get("tls") else None
    print(json.dumps(probe_status(req["address"], req["timeout"], tls)), flush=True)
"""


class _Probe:
    """One long-lived status client inside one namespace; requests are serialized by a lock."""

    def __init__(self, ns: str, python: str, env: dict[str, str]) -> None:
        self.lock = threading.Lock()
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *_pdeathsig(), python, "-c", _PROBE_SRC],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self._read()  # the "ready" line: imports done

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise TestbedError(f"status probe exited ({self.proc.poll()})")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def query(self, address: str, timeout_s: float, tls: dict[str, str] | None = None) -> dict[str, Any]:
        with self.lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"address": address, "timeout": timeout_s, "tls": tls}) + "\n")
            self.proc.stdin.flush()
            return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
