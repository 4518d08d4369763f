"""The `testbed` command line (`python -m peer.tools.testbed`, scripts/testbed): one subcommand per operation."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from peer.tools.testbed.bed import Testbed, cleanup
from peer.tools.testbed.common import DEFAULT_STATE_DIR, TestbedError, deep_merge, parse_sets


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
