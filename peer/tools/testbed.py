"""A multi-host testbed on one Linux machine: `peer run` daemons in network namespaces on a virtual LAN.

Layout (all of it inside namespaces this testbed creates; the host's own interfaces are never touched):

    <prefix>br        the "switch": bridges br0 (everyone) and br1.. (partitions); no address
    <prefix>h<i>      host i: lo, and eth0 = 198.18.0.(i+1)/24 (RFC 2544 benchmarking range), a veth whose
                      other end, <prefix>b<i>, is a port of a bridge in <prefix>br

`<prefix>` is `pt<4 hex>-`, chosen per testbed, so concurrent testbeds never collide and teardown deletes only
its own namespaces. Faults: `cut(i)` / `restore(i)` take host i's switch port down / up; `partition(groups)`
puts each group on its own bridge, `heal()` puts everyone back on br0; `kill(i)` is SIGKILL.

Library use (the netns tests):

    tb = Testbed("t1", 4, workdir, {"model": {"name": "logreg"}})
    tb.up()
    try:
        for i in range(4): tb.start(i)
        lines = [tb.ready(i) for i in range(4)]
        tb.cut(1); ...; tb.restore(1)
        print(tb.status(0)["neighbours"])
    finally:
        tb.down()

Command line (state kept in /run/peer-testbed/<name>.json, so each subcommand is a separate invocation):

    scripts/testbed up --name demo -n 4 --set model.name=logreg --set train.epochs=50
    scripts/testbed status --name demo           # every peer's `peer status` table (--json for JSON)
    scripts/testbed cut 1 --name demo; scripts/testbed restore 1 --name demo
    scripts/testbed partition 0,1 2,3 --name demo; scripts/testbed heal --name demo
    scripts/testbed kill 2 --name demo; scripts/testbed restart 2 --name demo
    scripts/testbed down --name demo
    scripts/testbed cleanup                      # namespaces of testbeds whose owner process died

Everything needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import ipaddress
import json
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

DEFAULT_STATE_DIR = Path("/run/peer-testbed")
SUBNET = ipaddress.IPv4Network("198.18.0.0/24")  # inside 198.18.0.0/15; host i is .(i + 1)
MAX_HOSTS = 200
DEFAULT_PORT = 50051
HOST_IF = "eth0"
PREFIX_RE = re.compile(r"^pt[0-9a-f]{4}-$")
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "grpc_proxy")


class TestbedError(RuntimeError):
    """A testbed operation failed (not root, `ip` failed, a daemon did not start, ...)."""

    __test__ = False  # not a pytest test class


# -------------------------------------------------------------------------------------------------- helpers
def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A new dict: `over` merged into `base`, nested dicts merged key by key."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_sets(items: Iterable[str]) -> dict[str, Any]:
    """`["a.b=1", "c=[x]"]` -> `{"a": {"b": 1}, "c": ["x"]}` (values parsed as YAML, as `peer run --set`)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise TestbedError(f"--set expects KEY=VALUE, got {item!r}")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(text)
    return out


def host_ip(i: int) -> str:
    return str(SUBNET.network_address + i + 1)


def _proc_start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot), or None if there is no such live process.
    A pid together with its start time names one process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _alive(pid: int | None, start_time: int | None) -> bool:
    if not pid:
        return False
    now = _proc_start_time(pid)
    return now is not None and (start_time is None or now == start_time)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise TestbedError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc


def list_netns() -> list[str]:
    proc = _ip("netns", "list", check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be used here (None when they can): not root, no `ip`, no netns."""
    if os.geteuid() != 0:
        return "needs root (network namespaces need CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    name = f"pt{secrets.token_hex(2)}-probe"
    proc = _ip("netns", "add", name, check=False)
    if proc.returncode != 0:
        return f"`ip netns add` failed: {proc.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


def _require_root() -> None:
    if os.geteuid() != 0:
        raise TestbedError("must be run as root (network namespaces need CAP_NET_ADMIN and CAP_SYS_ADMIN)")
    if shutil.which("ip") is None:
        raise TestbedError("the `ip` command (iproute2) is not installed")


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


# A status client that runs inside a namespace and answers one request per stdin line. It imports only
# `peer.tools.status` (no torch): `peer status` imports torch (via peer.config), ~1.5 s per call, too slow for polling.
_PROBE_SRC = r"""
import json, sys
from peer.tools.status import probe_status
print(json.dumps({"ok": True, "probe": "ready"}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    print(json.dumps(probe_status(req["address"], req["timeout"])), flush=True)
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

    def query(self, address: str, timeout_s: float) -> dict[str, Any]:
        with self.lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"address": address, "timeout": timeout_s}) + "\n")
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


def _pdeathsig() -> list[str]:
    """`setpriv --pdeathsig KILL`: the child dies with the process that started it (owned testbeds)."""
    return ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []


class _Daemon:
    """One `peer run` process. With a pipe (owned testbeds) a reader thread queues its stdout lines; detached
    ones write stdout to a file and are known by pid and start time only."""

    def __init__(
        self,
        pid: int,
        start_time: int | None,
        out_path: Path,
        log_path: Path,
        popen: subprocess.Popen[str] | None = None,
    ) -> None:
        self.piped = popen is not None and popen.stdout is not None
        self.pid = pid
        self.start_time = start_time
        self.out_path = out_path
        self.log_path = log_path
        self.popen = popen
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.ready_line: dict[str, Any] | None = None
        self.ready_at: float | None = None  # time.monotonic() when the ready line arrived
        self._file_offset = 0
        if self.piped:
            threading.Thread(target=self._pump, name=f"testbed-stdout-{pid}", daemon=True).start()

    def _pump(self) -> None:
        assert self.popen is not None and self.popen.stdout is not None
        with open(self.out_path, "a") as copy_to:
            for line in self.popen.stdout:
                if self.ready_at is None and '"ready"' in line:
                    self.ready_at = time.monotonic()
                copy_to.write(line)
                copy_to.flush()
                self.lines.put(line)
        self.lines.put(None)

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return _alive(self.pid, self.start_time)

    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen is not None else None

    def signal(self, sig: int) -> None:
        if self.popen is not None:
            if self.popen.poll() is None:
                self.popen.send_signal(sig)
        elif _alive(self.pid, self.start_time):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait(self, timeout_s: float) -> int | None:
        """The exit code (None for a detached process, whose parent is gone); TimeoutError if still running."""
        if self.popen is not None:
            try:
                return self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"pid {self.pid} still running after {timeout_s} s") from None
        deadline = time.monotonic() + timeout_s
        while _alive(self.pid, self.start_time):
            if time.monotonic() > deadline:
                raise TimeoutError(f"pid {self.pid} still running after {timeout_s} s")
            time.sleep(0.02)  # another process's exit: nothing to wait on but /proc
        return None

    def next_line(self, timeout_s: float) -> str | None:
        """The next stdout line; None at EOF (the process exited). TimeoutError when none came in time."""
        if self.piped:
            try:
                return self.lines.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError from None
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(OSError), open(self.out_path) as f:
                f.seek(self._file_offset)
                line = f.readline()
                if line.endswith("\n"):
                    self._file_offset = f.tell()
                    if self.ready_at is None and '"ready"' in line:
                        self.ready_at = time.monotonic()
                    return line
            if not self.alive():
                return None
            if time.monotonic() > deadline:
                raise TimeoutError
            time.sleep(0.05)  # a file written by a process we no longer hold a pipe to

    def close(self) -> None:
        if self.popen is not None and self.popen.stdout is not None and self.popen.poll() is not None:
            with contextlib.suppress(OSError):
                self.popen.stdout.close()


# -------------------------------------------------------------------------------------------------- testbed
class Testbed:
    """n hosts in network namespaces on a virtual switch, each able to run one `peer run` daemon."""

    __test__ = False  # not a pytest test class

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
    ) -> None:
        """`base_config` is merged into every host's config; `host_overrides[i]` into host i's only.
        `detached=True` starts daemons in their own session with stdout to a file, so that they outlive this
        process (the CLI); otherwise they die with it and their stdout is piped."""
        if not NAME_RE.match(name):
            raise TestbedError(f"testbed name {name!r}: use 1..64 letters, digits, '.', '_', '-'")
        if not 1 <= n <= MAX_HOSTS:
            raise TestbedError(f"n must be in 1..{MAX_HOSTS}, got {n}")
        self.name = name
        self.n = n
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

    def address(self, i: int) -> str:
        return f"{host_ip(i)}:{self.port}"

    def node_id(self, i: int) -> str:
        return f"h{i}"

    def state_path_of(self, i: int) -> Path:
        return self.workdir / f"h{i}"

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

    @property
    def is_up(self) -> bool:
        """True between a successful `up()` (or `load`) and `down()`."""
        return self._is_up

    def owner_alive(self) -> bool:
        return self._owner is not None and _alive(self._owner[0], self._owner[1])

    # -- network ----------------------------------------------------------------------------------------
    def _choose_prefix(self) -> str:
        taken = {ns[:7] for ns in list_netns()}
        state_dir = self.state_path.parent
        if state_dir.is_dir():
            for f in state_dir.glob("*.json"):
                with contextlib.suppress(OSError, ValueError):
                    taken.add(json.loads(f.read_text()).get("prefix", ""))
        for _ in range(1000):
            prefix = f"pt{secrets.token_hex(2)}-"
            if prefix not in taken:
                return prefix
        raise TestbedError("no free namespace prefix")

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

    def _claim_prefix(self) -> None:
        """Pick a prefix and create its switch namespace: `ip netns add` fails if it exists, so a prefix
        that another testbed picked at the same moment is never shared (nor deleted by our teardown)."""
        for _ in range(20):
            self.prefix = self._choose_prefix()
            self.save()  # before creating anything, so that `cleanup` finds it after a crash
            proc = _ip("netns", "add", self.bridge_ns, check=False)
            if proc.returncode == 0:
                return
            self.prefix = ""
            self.save()
            if "exists" not in proc.stderr:
                raise TestbedError(f"`ip netns add` failed: {proc.stderr.strip()}")
        raise TestbedError("no free namespace prefix")

    def _build_network(self) -> None:
        br = self.bridge_ns
        _ip("-n", br, "link", "set", "lo", "up")
        for k in (0, 1):
            self._add_bridge(k)
        for i in range(self.n):
            ns = self.host_ns(i)
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            # Created inside the host namespace, the other end moved straight into the bridge namespace:
            # no interface ever exists in the initial namespace.
            _ip("-n", ns, "link", "add", HOST_IF, "type", "veth", "peer", "name", self.port_name(i), "netns", br)
            _ip("-n", br, "link", "set", self.port_name(i), "master", "br0")
            _ip("-n", br, "link", "set", self.port_name(i), "up")
            _ip("-n", ns, "addr", "add", f"{host_ip(i)}/{SUBNET.prefixlen}", "dev", HOST_IF)
            _ip("-n", ns, "link", "set", HOST_IF, "up")
            # mDNS sends to 224.0.0.251; zeroconf sets IP_MULTICAST_IF, but a route makes any other multicast
            # sender in the namespace work too.
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", HOST_IF)
            self.placement[i] = 0

    def _add_bridge(self, k: int) -> None:
        if k in self.bridges:
            return
        br = self.bridge_ns
        # No STP (ports forward at once) and no multicast snooping (mDNS floods like on a dumb switch).
        _ip("-n", br, "link", "add", f"br{k}", "type", "bridge", "stp_state", "0", "mcast_snooping", "0")
        _ip("-n", br, "link", "set", f"br{k}", "up")
        self.bridges.add(k)

    def cut(self, i: int) -> None:
        """Take host i's switch port down: its packets go nowhere (connections time out, not refused)."""
        self._check_index(i)
        _ip("-n", self.bridge_ns, "link", "set", self.port_name(i), "down")
        self.cut_hosts.add(i)
        self.save()

    def restore(self, i: int) -> None:
        self._check_index(i)
        _ip("-n", self.bridge_ns, "link", "set", self.port_name(i), "up")
        self.cut_hosts.discard(i)
        self.save()

    def partition(self, groups: Sequence[Sequence[int]]) -> None:
        """Put group g on bridge br<g>: hosts talk only within their group. Hosts in no group join group 0."""
        seen: set[int] = set()
        for group in groups:
            for i in group:
                self._check_index(i)
                if i in seen:
                    raise TestbedError(f"host {i} is in two groups")
                seen.add(i)
        target = dict.fromkeys(range(self.n), 0)
        for g, group in enumerate(groups):
            for i in group:
                target[i] = g
        self._place(target)

    def heal(self) -> None:
        """Everyone back on br0 (cut links stay cut; `restore` them)."""
        self._place(dict.fromkeys(range(self.n), 0))

    def _place(self, target: dict[int, int]) -> None:
        for i, g in sorted(target.items()):
            if self.placement.get(i) == g:
                continue
            self._add_bridge(g)
            _ip("-n", self.bridge_ns, "link", "set", self.port_name(i), "master", f"br{g}")
            self.placement[i] = g
        self.save()

    # -- daemons ----------------------------------------------------------------------------------------
    def host_config(self, i: int) -> dict[str, Any]:
        """Host i's `peer run` config: identity and discovery, then base_config, then host_overrides[i]."""
        self._check_index(i)
        cfg = deep_merge(
            {"discovery": {"mdns": True, "static_peers": []}, "train": {"device": "cpu"}}, self.base_config
        )
        cfg = deep_merge(
            cfg,
            {
                "node_id": self.node_id(i),
                "listen": self.address(i),
                "state_dir": str(self.state_path_of(i)),
                "discovery": {"interfaces": [host_ip(i)]},
            },
        )
        num = int(cfg.get("data", {}).get("num_partitions", 1) or 1)
        cfg = deep_merge(cfg, {"data": {"partition_index": i % num}})
        return deep_merge(cfg, self.host_overrides.get(i, {}))

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
        env["PYTHONUNBUFFERED"] = "1"
        return env

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
        cmd = ["ip", "netns", "exec", ns, self.python, "-m", "peer", "status", self.address(i), *extra]
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
        reply = probe.query(self.address(i), timeout_s)
        if not reply.get("ok"):
            raise TestbedError(f"status of h{i} (via h{i if via is None else via}): {reply.get('error')}")
        status: dict[str, Any] = reply["status"]
        return status

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


# ------------------------------------------------------------------------------------------------------- CLI
def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _teardown_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise like Ctrl-C, so that `finally` blocks tear down."""
    old = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _cmd_up(args: argparse.Namespace) -> int:
    base: dict[str, Any] = {}
    if args.config:
        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(loaded, dict):
            raise TestbedError(f"{args.config}: expected a mapping")
        base = loaded
    base = deep_merge(base, parse_sets(args.set))
    workdir = Path(args.workdir or f"/tmp/peer-testbed/{args.name}")
    tb = Testbed(args.name, args.n, workdir, base, args.python, state_dir=args.state_dir, detached=True)
    ok = False
    with _teardown_on_signals():
        try:
            tb.up()
            for i in range(args.n):
                tb.start(i)
            for i in range(args.n):
                print(json.dumps(tb.ready(i, timeout_s=args.timeout)), flush=True)
            ok = True
        finally:
            if not ok and tb.is_up:
                print(f"testbed: up failed; tearing {args.name} down (logs in {workdir})", file=sys.stderr)
                tb.down(grace_s=2.0)
    tb.detach()
    print(f"testbed {args.name}: {args.n} hosts up (namespaces {tb.prefix}*, logs in {workdir})", file=sys.stderr)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    tb = Testbed.load(args.name, args.state_dir)
    hosts = [args.index] if args.index is not None else list(range(tb.n))
    for i in hosts:
        tb._check_index(i)

    def one(i: int) -> Any:
        if not tb.running(i):
            return {"error": "not running"} if args.json else "(not running)\n"
        if args.json:
            try:
                return tb.status(i, timeout_s=args.timeout)
            except TestbedError as exc:
                return {"error": str(exc)}
        return tb.status_text(i, timeout_s=args.timeout)

    with ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
        results = dict(zip(hosts, pool.map(one, hosts), strict=True))
    if args.json:
        print(json.dumps(results[hosts[0]] if args.index is not None else {f"h{i}": r for i, r in results.items()}))
    else:
        for i in hosts:
            flags = [f"bridge br{tb.placement.get(i, 0)}"] + (["CUT"] if i in tb.cut_hosts else [])
            print(f"== h{i} {tb.address(i)} in {tb.host_ns(i)} ({', '.join(flags)}) ==")
            print(results[i].rstrip("\n"))
            print()
    return 0


def _cmd_simple(args: argparse.Namespace) -> int:
    tb = Testbed.load(args.name, args.state_dir)
    cmd = args.command
    if cmd == "cut":
        tb.cut(args.index)
    elif cmd == "restore":
        tb.restore(args.index)
    elif cmd == "heal":
        tb.heal()
    elif cmd == "partition":
        groups = [[int(x) for x in g.split(",") if x.strip()] for g in args.groups]
        tb.partition(groups)
    elif cmd == "kill":
        tb.kill(args.index)
    elif cmd == "stop":
        tb.stop(args.index)
    elif cmd in ("restart", "start"):
        if cmd == "restart":
            tb.restart(args.index)
        else:
            tb.start(args.index)
        print(json.dumps(tb.ready(args.index, timeout_s=args.timeout)), flush=True)
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    try:
        tb = Testbed.load(args.name, args.state_dir)
    except TestbedError as exc:
        print(f"testbed: {exc}; nothing to do", file=sys.stderr)
        return 0
    tb.down()
    print(f"testbed {args.name}: down (logs kept in {tb.workdir})", file=sys.stderr)
    return 0


def _cmd_cleanup(args: argparse.Namespace) -> int:
    names = cleanup(args.state_dir, include_detached=args.all)
    print(f"testbed: removed {', '.join(names)}" if names else "testbed: nothing to clean up", file=sys.stderr)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    directory = Path(args.state_dir)
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            tb = Testbed.load(path.stem, directory)
        except TestbedError:
            continue
        running = sum(d.alive() for d in tb._daemons.values())
        owner = (
            "detached"
            if tb.state_detached
            else f"owner pid {tb._owner[0] if tb._owner else '?'}" + ("" if tb.owner_alive() else " (dead)")
        )
        print(f"{tb.name:<24} {tb.prefix:<8} {tb.n} hosts, {running} running, {owner}, {tb.workdir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", default="default", help="testbed name (default: default)")
    common.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR), help=argparse.SUPPRESS)
    p = argparse.ArgumentParser(
        prog="testbed",
        description="Run `peer` daemons in Linux network namespaces on a virtual LAN (198.18.0.0/24). Root only.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", parents=[common], help="create the namespaces and start every daemon")
    up.add_argument("-n", type=int, default=4, help="number of hosts (default 4)")
    up.add_argument("--config", help="base YAML config merged into every host's config")
    up.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    up.add_argument("--workdir", help="configs, logs and state dirs (default /tmp/peer-testbed/NAME)")
    up.add_argument("--python", default=sys.executable, help="python that runs `-m peer` (default: this one)")
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each ready line")
    up.set_defaults(fn=_cmd_up)

    for name, text in (
        ("cut", "take host I's link down"),
        ("restore", "bring host I's link back up"),
        ("kill", "SIGKILL host I's daemon"),
        ("stop", "SIGTERM host I's daemon and wait for it"),
        ("start", "start host I's daemon (after stop or kill)"),
        ("restart", "stop (if running) and start host I's daemon"),
    ):
        s = sub.add_parser(name, parents=[common], help=text)
        s.add_argument("index", type=int, metavar="I")
        if name in ("start", "restart"):
            s.add_argument("--timeout", type=float, default=120.0)
        s.set_defaults(fn=_cmd_simple)
    s = sub.add_parser("partition", parents=[common], help="split the LAN: `partition 0,1 2,3`")
    s.add_argument("groups", nargs="+", metavar="I,J,...")
    s.set_defaults(fn=_cmd_simple)
    s = sub.add_parser("heal", parents=[common], help="undo partition (everyone back on one bridge)")
    s.set_defaults(fn=_cmd_simple)

    s = sub.add_parser("status", parents=[common], help="`peer status` of every host (or host I)")
    s.add_argument("index", type=int, nargs="?", metavar="I")
    s.add_argument("--json", action="store_true")
    s.add_argument("--timeout", type=float, default=5.0)
    s.set_defaults(fn=_cmd_status)

    s = sub.add_parser("down", parents=[common], help="stop every daemon and delete the namespaces")
    s.set_defaults(fn=_cmd_down)
    s = sub.add_parser("cleanup", parents=[common], help="remove testbeds whose owner process died")
    s.add_argument("--all", action="store_true", help="also detached testbeds that run no daemon any more")
    s.set_defaults(fn=_cmd_cleanup)
    s = sub.add_parser("list", parents=[common], help="list testbeds")
    s.set_defaults(fn=_cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("testbed: error: must be run as root (network namespaces need CAP_NET_ADMIN)", file=sys.stderr)
        return 1
    try:
        code: int = args.fn(args)
    except TestbedError as exc:
        print(f"testbed: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
