"""A testbed's identity and bookkeeping, which every part of `Testbed` uses: its parameters, host names and
addresses, the state file's contents, the environment of its child processes."""

from __future__ import annotations

import copy
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

from peer.tools.testbed.common import (
    _PROXY_VARS,
    DEFAULT_PORT,
    DEFAULT_STATE_DIR,
    MAX_HOSTS,
    NAME_RE,
    TestbedError,
    _atomic_write,
    host_ip,
)
from peer.tools.testbed.probe import _Probe
from peer.tools.testbed.process import _alive, _Daemon


class BedBase:
    """The state a `Testbed` keeps and the names it derives from it (the mixins and `Testbed` build on this)."""

    def __init__(
        self,
        name: str,
        n: int,
        workdir: str | Path,
        base_config: dict[str, Any] | None = None,
        python: str = sys.executable,
        *,
        state_dir: str | Path = DEFAULT_STATE_DIR,
        port: int = DEFAULT_PORT,
        host_overrides: dict[int, dict[str, Any]] | None = None,
        detached: bool = False,
        subnets: int = 1,
    ) -> None:
        """`base_config` is merged into every host's config; `host_overrides[i]` into host i's only.
        `subnets=2`: the first half of the hosts on 198.18.0.0/24 (bridge br0), the rest on 198.18.1.0/24 (br1),
        joined by a router namespace; multicast (mDNS) stays within each subnet.
        `detached=True` starts daemons in their own session with stdout to a file, so that they outlive this
        process (the CLI); otherwise they die with it and their stdout is piped."""
        if not NAME_RE.match(name):
            raise TestbedError(f"testbed name {name!r}: use 1..64 letters, digits, '.', '_', '-'")
        if not 1 <= n <= MAX_HOSTS:
            raise TestbedError(f"n must be in 1..{MAX_HOSTS}, got {n}")
        if subnets not in (1, 2):
            raise TestbedError(f"subnets must be 1 or 2, got {subnets}")
        self.name = name
        self.n = n
        self.subnets = subnets
        self.workdir = Path(workdir).resolve()
        self.base_config = copy.deepcopy(base_config or {})
        self.python = python
        self.state_path = Path(state_dir) / f"{name}.json"
        self.port = port
        self.host_overrides = {int(k): v for k, v in (host_overrides or {}).items()}
        self.detached = detached  # how daemons are started from this process
        self.state_detached = False  # the state file's flag, set by detach(): no owner; only `down` removes it
        self.prefix = ""
        self.placement: dict[int, int] = {}  # host -> bridge number
        self.cut_hosts: set[int] = set()
        self.bridges: set[int] = set()
        self._daemons: dict[int, _Daemon] = {}
        self._probes: dict[str, _Probe] = {}
        self._probe_lock = threading.Lock()
        self._owner: tuple[int, int | None] | None = None
        self._is_up = False

    # -- names ------------------------------------------------------------------------------------------
    @property
    def bridge_ns(self) -> str:
        return f"{self.prefix}br"

    def host_ns(self, i: int) -> str:
        self._check_index(i)
        return f"{self.prefix}h{i}"

    def port_name(self, i: int) -> str:
        """Host i's switch port (the bridge end of its veth), inside the bridge namespace."""
        return f"{self.prefix}b{i}"

    @property
    def router_ns(self) -> str:
        return f"{self.prefix}rt"

    def subnet_of(self, i: int) -> int:
        """0, or 1 for the second half of the hosts when the testbed has two routed subnets."""
        return 1 if self.subnets == 2 and i >= (self.n + 1) // 2 else 0

    def ip(self, i: int) -> str:
        return host_ip(i, self.subnet_of(i))

    def address(self, i: int) -> str:
        return f"{self.ip(i)}:{self.port}"

    def node_id(self, i: int) -> str:
        return f"h{i}"

    def state_path_of(self, i: int) -> Path:
        return self.workdir / f"h{i}"

    # -- certificates: a throwaway cluster CA per testbed (daemons run with mutual TLS) ---------------------
    PROBE_ID = "testbed-probe"

    @property
    def pki_dir(self) -> Path:
        return self.workdir / "pki"

    def tls_files(self, node_id: str) -> dict[str, str]:
        """`security` keys for `node_id` (a host's node id, or PROBE_ID); makes the CA and certificates once."""
        from peer.tools.certs import make_cluster

        if not (self.pki_dir / f"{self.PROBE_ID}.pem").exists():
            make_cluster(self.pki_dir, [self.node_id(i) for i in range(self.n)] + [self.PROBE_ID])
        d = self.pki_dir
        ca = str(d / "ca.pem")
        return {"ca_file": ca, "cert_file": str(d / f"{node_id}.pem"), "key_file": str(d / f"{node_id}.key")}

    def log_path(self, i: int) -> Path:
        return self.workdir / f"h{i}.log"

    def _check_index(self, i: int) -> None:
        if not 0 <= i < self.n:
            raise TestbedError(f"no host {i}: this testbed has hosts 0..{self.n - 1}")

    # -- state file -------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "prefix": self.prefix,
            "n": self.n,
            "subnets": self.subnets,
            "workdir": str(self.workdir),
            "python": self.python,
            "port": self.port,
            "base_config": self.base_config,
            "host_overrides": {str(k): v for k, v in self.host_overrides.items()},
            "owner_pid": self._owner[0] if self._owner else None,
            "owner_start": self._owner[1] if self._owner else None,
            "detached": self.state_detached,
            "placement": {str(k): v for k, v in self.placement.items()},
            "cut": sorted(self.cut_hosts),
            "bridges": sorted(self.bridges),
            "daemons": {
                str(i): {
                    "pid": d.pid,
                    "start_time": d.start_time,
                    "ready": d.ready_line,
                    "out": str(d.out_path),
                    "log": str(d.log_path),
                }
                for i, d in self._daemons.items()
            },
        }

    def save(self) -> None:
        _atomic_write(self.state_path, json.dumps(self._state(), indent=2) + "\n")

    @property
    def is_up(self) -> bool:
        """True between a successful `up()` (or `load`) and `down()`."""
        return self._is_up

    def owner_alive(self) -> bool:
        return self._owner is not None and _alive(self._owner[0], self._owner[1])

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
        env["PYTHONUNBUFFERED"] = "1"
        return env
