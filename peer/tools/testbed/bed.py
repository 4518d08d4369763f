"""The `Testbed` class (lifecycle: up, load from its state file, down, detach) and `cleanup` of orphaned ones."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

from peer.tools.testbed.common import DEFAULT_PORT, DEFAULT_STATE_DIR, PREFIX_RE, TestbedError
from peer.tools.testbed.daemons import DaemonsMixin
from peer.tools.testbed.netns import _ip, _require_root, list_netns
from peer.tools.testbed.network import NetworkMixin
from peer.tools.testbed.process import _Daemon, _proc_start_time
from peer.tools.testbed.status import StatusMixin


class Testbed(NetworkMixin, DaemonsMixin, StatusMixin):
    """n hosts in network namespaces on a virtual switch, each able to run one `peer run` daemon."""

    __test__ = False  # not a pytest test class

    # -- state file -------------------------------------------------------------------------------------
    @classmethod
    def load(cls, name: str, state_dir: str | Path = DEFAULT_STATE_DIR) -> Testbed:
        """The testbed that another process created and left running (the CLI's subcommands)."""
        path = Path(state_dir) / f"{name}.json"
        try:
            st = json.loads(path.read_text())
        except FileNotFoundError:
            raise TestbedError(f"no testbed {name!r} (no {path}); create it with `up --name {name}`") from None
        except (OSError, ValueError) as exc:
            raise TestbedError(f"cannot read {path}: {exc}") from None
        tb = cls(
            st["name"],
            st["n"],
            st["workdir"],
            st.get("base_config") or {},
            st.get("python") or sys.executable,
            state_dir=state_dir,
            port=st.get("port", DEFAULT_PORT),
            host_overrides={int(k): v for k, v in (st.get("host_overrides") or {}).items()},
            detached=True,  # whatever it was, daemons started from here must outlive this process
            subnets=int(st.get("subnets", 1)),
        )
        prefix = st.get("prefix", "")
        if not PREFIX_RE.match(prefix):
            raise TestbedError(f"{path}: bad prefix {prefix!r}")
        tb.prefix = prefix
        tb.state_detached = bool(st.get("detached"))
        tb.placement = {int(k): int(v) for k, v in (st.get("placement") or {}).items()}
        tb.cut_hosts = set(st.get("cut") or [])
        tb.bridges = set(st.get("bridges") or [0, 1])
        if st.get("owner_pid"):
            tb._owner = (int(st["owner_pid"]), st.get("owner_start"))
        for key, d in (st.get("daemons") or {}).items():
            dm = _Daemon(int(d["pid"]), d.get("start_time"), Path(d["out"]), Path(d["log"]))
            dm.ready_line = d.get("ready")
            tb._daemons[int(key)] = dm
        tb._is_up = True
        return tb

    # -- lifecycle --------------------------------------------------------------------------------------
    def up(self) -> None:
        """Create the switch and the n hosts. Writes the state file first, so that `cleanup` can remove a
        half-built testbed after a crash."""
        _require_root()
        if self._is_up:
            raise TestbedError(f"testbed {self.name!r} is already up")
        if self.state_path.exists():
            try:
                other = Testbed.load(self.name, self.state_path.parent)
            except TestbedError:
                other = None
            if other is not None and (other.state_detached or other.owner_alive()):
                raise TestbedError(
                    f"testbed {self.name!r} already exists ({self.state_path}); take it down first: "
                    f"scripts/testbed down --name {self.name}"
                )
            if other is not None:
                other.down()  # a leftover of a crashed owner
        self.workdir.mkdir(parents=True, exist_ok=True)
        me = os.getpid()
        self._owner = (me, _proc_start_time(me))
        self._is_up = True
        atexit.register(self._atexit)
        try:
            self._claim_prefix()
            self._build_network()
        except BaseException:
            self.down()
            raise
        self.save()

    # -- teardown ---------------------------------------------------------------------------------------
    def own_namespaces(self) -> list[str]:
        if not PREFIX_RE.match(self.prefix):
            return []
        return [ns for ns in list_netns() if ns.startswith(self.prefix)]

    def down(self, grace_s: float = 5.0) -> None:
        """Stop every daemon (SIGTERM, then SIGKILL after `grace_s`), kill whatever else still runs in this
        testbed's namespaces, delete them and the state file. Idempotent; safe after a crash."""
        for probe in list(self._probes.values()):
            probe.close()
        self._probes.clear()
        daemons = list(self._daemons.values())
        for d in daemons:
            d.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for d in daemons:
            try:
                d.wait(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                d.signal(signal.SIGKILL)
                with contextlib.suppress(TimeoutError):
                    d.wait(10.0)
            d.close()
        namespaces = self.own_namespaces()
        # Anything else inside our namespaces was started by us too (status clients, a crashed run's
        # daemons): end it by pid before the namespaces go.
        for ns in namespaces:
            for pid_text in _ip("netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_text), signal.SIGKILL)
        for ns in namespaces:
            deadline = time.monotonic() + 10.0
            while _ip("netns", "pids", ns, check=False).stdout.split() and time.monotonic() < deadline:
                time.sleep(0.02)  # SIGKILLed processes leave the namespace asynchronously
        for ns in sorted(namespaces, key=lambda s: s.endswith("br")):  # hosts first, then the switch
            _ip("netns", "del", ns, check=False)
        left = self.own_namespaces()
        if left:
            raise TestbedError(f"could not delete namespaces {left}")
        if self._is_up or self.state_path.exists():
            with contextlib.suppress(FileNotFoundError, ValueError):
                st = json.loads(self.state_path.read_text())
                if st.get("prefix") == self.prefix:  # never remove another testbed's file of the same name
                    self.state_path.unlink()
        self._daemons.clear()
        self._is_up = False
        atexit.unregister(self._atexit)

    def _atexit(self) -> None:
        if self._is_up and not self.state_detached:
            with contextlib.suppress(Exception):
                self.down(grace_s=2.0)

    def detach(self) -> None:
        """Leave the testbed running after this process exits (the CLI's `up`)."""
        self.detached = self.state_detached = True
        self._owner = None
        atexit.unregister(self._atexit)
        self.save()

    def __enter__(self) -> Testbed:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


def cleanup(state_dir: str | Path = DEFAULT_STATE_DIR, *, include_detached: bool = False) -> list[str]:
    """Tear down every testbed whose state file names an owner process that is gone (and, with
    `include_detached`, also detached ones that no longer run any daemon). Returns their names."""
    done: list[str] = []
    directory = Path(state_dir)
    if not directory.is_dir():
        return done
    for path in sorted(directory.glob("*.json")):
        try:
            tb = Testbed.load(path.stem, directory)
        except TestbedError as exc:
            print(f"testbed: skipping {path}: {exc}", file=sys.stderr)
            continue
        if tb.state_detached:
            if not include_detached or any(d.alive() for d in tb._daemons.values()):
                continue
        elif tb.owner_alive():
            continue
        tb.down(grace_s=2.0)
        done.append(tb.name)
    return done
