"""Testbed methods that control the hosts' `peer run` daemons: config, start, ready line, stop, kill, restart."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from typing import Any

import yaml

from peer.tools.testbed.base import BedBase
from peer.tools.testbed.common import TestbedError, _atomic_write, _tail, deep_merge
from peer.tools.testbed.process import _Daemon, _pdeathsig, _proc_start_time


class DaemonsMixin(BedBase):
    """One `peer run` daemon per host of a `Testbed`."""

    # -- daemons ----------------------------------------------------------------------------------------
    def host_config(self, i: int) -> dict[str, Any]:
        """Host i's `peer run` config: the plain defaults plus its identity, address, state_dir and certificate
        (mDNS follows `listen`), then base_config, then host_overrides[i]."""
        self._check_index(i)
        cfg = deep_merge({"security": self.tls_files(self.node_id(i))}, self.base_config)
        cfg = deep_merge(
            cfg,
            {
                "node_id": self.node_id(i),
                "listen": self.address(i),
                "state_dir": str(self.state_path_of(i)),
            },
        )
        num = int(cfg.get("data", {}).get("num_partitions", 1) or 1)
        cfg = deep_merge(cfg, {"data": {"partition_index": i % num}})
        return deep_merge(cfg, self.host_overrides.get(i, {}))

    def start(self, i: int) -> None:
        """Start host i's daemon (returns at once; `ready(i)` waits for its ready line)."""
        self._check_index(i)
        if not self._is_up:
            raise TestbedError("the testbed is not up")
        old = self._daemons.get(i)
        if old is not None and old.alive():
            raise TestbedError(f"h{i} is already running (pid {old.pid})")
        cfg_path = self.workdir / f"h{i}.yaml"
        _atomic_write(cfg_path, yaml.safe_dump(self.host_config(i), sort_keys=False))
        log_path, out_path = self.log_path(i), self.workdir / f"h{i}.out"
        with open(log_path, "a") as log:
            log.write(f"--- testbed {self.name}: starting h{i} in {self.host_ns(i)} at {time.ctime()} ---\n")
        cmd = [self.python, "-m", "peer", "run", "--config", str(cfg_path)]
        popen: subprocess.Popen[str] | None
        with open(log_path, "a") as log:
            if self.detached:
                with open(out_path, "w") as out:
                    popen = subprocess.Popen(
                        ["ip", "netns", "exec", self.host_ns(i), *cmd],
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=log,
                        cwd=self.workdir,
                        env=self._env(),
                        start_new_session=True,
                        text=True,
                    )
            else:
                out_path.write_text("")
                popen = subprocess.Popen(
                    ["ip", "netns", "exec", self.host_ns(i), *_pdeathsig(), *cmd],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    cwd=self.workdir,
                    env=self._env(),
                    text=True,
                )
        # `ip netns exec` and setpriv exec the daemon: the pid is the daemon's.
        daemon = _Daemon(popen.pid, _proc_start_time(popen.pid), out_path, log_path, popen)
        if old is not None:
            old.close()
        self._daemons[i] = daemon
        self.save()

    def _daemon(self, i: int) -> _Daemon:
        self._check_index(i)
        d = self._daemons.get(i)
        if d is None:
            raise TestbedError(f"h{i} was never started")
        return d

    def running(self, i: int) -> bool:
        d = self._daemons.get(i)
        return d is not None and d.alive()

    def pid(self, i: int) -> int:
        return self._daemon(i).pid

    def ready(self, i: int, timeout_s: float = 60.0) -> dict[str, Any]:
        """Host i's ready line (parsed); waits for it. Raises TestbedError with the log's tail if the daemon
        exits or prints nothing in time."""
        d = self._daemon(i)
        if d.ready_line is not None:
            return d.ready_line
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = d.next_line(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise TestbedError(
                    f"h{i}: no ready line within {timeout_s} s; log {d.log_path}:\n{_tail(d.log_path)}"
                ) from None
            if line is None:
                rc = d.wait(5.0) if d.popen is not None else None
                raise TestbedError(f"h{i} exited ({rc}) before it was ready; log {d.log_path}:\n{_tail(d.log_path)}")
            with contextlib.suppress(ValueError):
                msg = json.loads(line)
                if isinstance(msg, dict) and msg.get("event") == "ready":
                    d.ready_line = msg
                    if d.ready_at is None:
                        d.ready_at = time.monotonic()
                    self.save()
                    return msg

    def ready_at(self, i: int) -> float | None:
        """time.monotonic() when host i's current daemon printed its ready line (None if not yet)."""
        return self._daemon(i).ready_at

    def stop(self, i: int, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int | None:
        """Signal host i's daemon and wait for it to exit; returns its exit code (None when this process did
        not start it, e.g. a CLI subcommand). SIGKILLs it if it outlives `timeout_s`, and raises."""
        d = self._daemon(i)
        d.signal(sig)
        try:
            rc = d.wait(timeout_s)
        except TimeoutError:
            d.signal(signal.SIGKILL)
            d.wait(10.0)
            raise TestbedError(f"h{i} did not exit within {timeout_s} s of signal {sig}; killed it") from None
        d.close()
        self.save()
        return rc

    def kill(self, i: int) -> int | None:
        return self.stop(i, signal.SIGKILL)

    def restart(self, i: int, timeout_s: float = 30.0) -> None:
        """Stop host i's daemon if it runs (SIGTERM), then start it again with the same state_dir."""
        d = self._daemons.get(i)
        if d is not None and d.alive():
            self.stop(i, timeout_s=timeout_s)
        self.start(i)
