"""The `peer` command line: argv becomes a config; logging, signals and exit codes are set up here."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from importlib import resources
from typing import Any

from peer import __version__
from peer.errors import CheckpointError, ConfigError, DataError, PeerError, StartupError

EXIT_CODES: dict[type[PeerError], int] = {ConfigError: 2, DataError: 2, CheckpointError: 3, StartupError: 4}

# The daemon's training thread and its event loop share the GIL, and a paced peer waits for the loop to hand it
# each fresh neighbour state. With CPython's default 5 ms switch interval a busy thread keeps the GIL for up to
# 5 ms before the other may run: longer than a small model's step (2 to 4 ms). So a waiting training thread
# lost up to 5 ms per fresh state, and a training thread that stepped freely starved the loop, which then took in
# no state that would clear a neighbour's "late" mark: one demo peer ran 166 steps in 0.5 s and finished at
# epoch 20 while the others were at 14 (87.2% against 95.8% at 0.5 ms; cdl's step rate with its default pacing
# 55 -> 145 to 218 steps/s, `none` unchanged: scripts/bench_overhead.py, 2 peers, mlp, 2 loaded cores).
DAEMON_SWITCH_INTERVAL_S = 0.0005


def _exit_code(exc: PeerError) -> int:
    for cls, code in EXIT_CODES.items():
        if isinstance(exc, cls):
            return code
    return 1


def _first_peer_error(exc: BaseException) -> PeerError | None:
    if isinstance(exc, PeerError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _first_peer_error(sub)
            if found is not None:
                return found
    return None


def cmd_run(args: argparse.Namespace) -> int:
    from peer import config, logs
    from peer.net.interfaces import check_ports_free

    cfg = config.load(args.config, args.set)
    sys.setswitchinterval(DAEMON_SWITCH_INTERVAL_S)  # the daemon's process only, never a library user's
    check_ports_free({"listen": cfg.listen, "metrics.listen": cfg.metrics.listen})  # before torch even loads
    from peer.daemon.node import Node
    from peer.daemon.sdnotify import Notifier

    logs.setup(cfg.log.level, cfg.log.json_lines, journald=logs.stderr_is_journal(os.environ.get("JOURNAL_STREAM")))
    notifier = Notifier.from_env(os.environ)

    async def main() -> None:
        node = Node(cfg, reset=args.reset, notifier=notifier)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, node.request_stop)
        await node.run()

    asyncio.run(main())
    return 0


def cmd_init_config(args: argparse.Namespace) -> int:
    sys.stdout.write(resources.files("peer").joinpath("default_config.yaml").read_text(encoding="utf-8"))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from peer.tools.evaluate import evaluate_state_dir

    result = evaluate_state_dir(args.state_dir)
    if args.json:
        print(json.dumps(result))
    else:
        score = (
            f"test accuracy {100 * result['accuracy']:.2f}% (loss {result['loss']:.4f}, "
            if result["accuracy"] is not None
            else f"test loss {result['loss']:.4f} ("
        )
        print(
            f"{result['node_id']}: {score}step {result['step']}, {result['dataset']}, {result['test_samples']} "
            f"test samples)"
        )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from peer.tools.locate import pick
    from peer.tools.status import fetch_status, format_status

    address = pick(args.address)
    if args.watch:
        return _watch([address], args, neighbours=True)
    status = asyncio.run(fetch_status(address, timeout_s=args.timeout, tls=_tls_files(args)))
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from peer.tools.locate import format_list, list_daemons

    daemons = asyncio.run(list_daemons(args.timeout, _tls_files(args), mdns=not args.no_mdns))
    if args.json:
        rows = [{"node_id": d.node_id, "address": d.address, "source": d.source, "status": d.status} for d in daemons]
        print(json.dumps(rows, indent=2))
    else:
        print(format_list(daemons))
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    return _watch(args.addresses, args, neighbours=False)


def _watch(addresses: list[str], args: argparse.Namespace, *, neighbours: bool) -> int:
    from peer.tools.watch import watch

    tls = _tls_files(args)
    kwargs = {"interval_s": args.interval, "count": args.count, "timeout_s": args.timeout, "json_lines": args.json}
    asyncio.run(watch(addresses, neighbours=neighbours, tls=tls, **kwargs))
    return 0


def _watch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    p.add_argument("--count", type=int, default=0, help="stop after this many refreshes (default 0: until Ctrl-C)")


def cmd_report(args: argparse.Namespace) -> int:
    from peer.tools.report import write_report

    summary = write_report(args.state_dirs, args.out, evaluate=not args.no_eval)
    for peer in summary["peers"]:
        acc = peer["accuracy"]
        accuracy = f", test accuracy {100 * acc:.2f}%" if acc is not None else ""
        print(f"{peer['node_id']}: step {peer['step']}, loss {peer['loss']}{accuracy}")
    print(f"consensus distance: {summary['consensus_distance']}")
    print(f"wrote {', '.join(summary['files'])} and summary.json to {args.out}")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from peer.tools.locate import pick
    from peer.tools.status import check_health

    if args.address and args.addr and args.address != args.addr:
        raise ConfigError("give the address once (ADDRESS or --addr)", source="command line")
    deadline = time.monotonic() + args.wait
    while True:  # --wait: retry until the daemon serves (its ready file may not exist yet)
        try:
            address = pick(args.address or args.addr, mdns_timeout_s=0.5 if args.wait else 1.5)
            ok, text = asyncio.run(check_health(address, timeout_s=args.timeout, tls=_tls_files(args)))
        except PeerError as exc:
            ok, text = False, f"peer: {exc}"
        if ok or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    print(text)
    return 0 if ok else 1


def cmd_certs(args: argparse.Namespace) -> int:
    from peer.tools import certs

    if args.action == "init":
        path = certs.init_ca(args.dir, days=args.days or 3650, force=args.force)
        print(f"cluster CA written: {path} and {path.with_suffix('.key')} (keep the key secret; it signs members)")
    else:
        cert, key = certs.issue(args.dir, args.node_id, days=args.days or 365, ips=args.ip)
        print(f"certificate for {args.node_id}: {cert}, key {key} (0600)")
        keys = f"security.ca_file={args.dir}/ca.pem --set security.cert_file={cert} --set security.key_file={key}"
        print(f"  --set {keys}")
    return 0


def _tls_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ca", help="cluster CA certificate (a daemon with mutual TLS needs --ca, --cert and --key)")
    p.add_argument("--cert", help="a certificate issued by the cluster CA (`peer certs issue`)")
    p.add_argument("--key", help="its private key")


def _tls_files(args: argparse.Namespace) -> Any:
    from peer.net.tls import TlsFiles

    given = [args.ca, args.cert, args.key]
    if not any(given):
        return None
    if not all(given):
        raise ConfigError("give all of --ca, --cert and --key, or none", source="command line")
    return TlsFiles(args.ca, args.cert, args.key)


def cmd_demo(args: argparse.Namespace) -> int:
    from peer.tools.demo import run_demo

    return run_demo(args)


def cmd_simulate(args: argparse.Namespace) -> int:
    from peer.tools.simulate import run_simulate

    return run_simulate(args)


EXIT_CODES_HELP = """exit codes:
  0    success (`peer health`: the daemon is serving)
  1    any other failure: a daemon that cannot be reached, `peer health` not serving, no daemon found
  2    invalid config or data: the message names the file and the field (e.g. data.path)
  3    checkpoint problem: missing, corrupt or another node's (`peer run --reset` moves it aside)
  4    start-up problem: port in use, duplicate node id on the network, unusable interface
  130  interrupted (Ctrl-C)

without an address, `peer status` and `peer health` use a daemon of this host (its state_dir/ready.json
under ./, ./*/, ./state/ or ./state/*/), else one that mDNS finds, and say which; `peer ls` lists them all."""

ADDRESS_HELP = (
    "the daemon's gRPC HOST:PORT (its ready line's `address`), or its state dir (which holds ready.json); "
    "default: one found on this host"
)


def _address_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("address", nargs="?", metavar="ADDRESS", help=ADDRESS_HELP)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="peer",
        description="Decentralized deep-learning daemon.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"peer {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run one daemon")
    r.add_argument("--config", "-c", help="YAML config file (see `peer init-config`)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    r.add_argument("--reset", action="store_true", help="discard (move aside) an existing checkpoint")
    r.set_defaults(fn=cmd_run)

    d = sub.add_parser("demo", help="run N daemons on this machine and compare with centralized training")
    from peer.tools.demo import add_arguments

    add_arguments(d)
    d.set_defaults(fn=cmd_demo)

    sim = sub.add_parser(
        "simulate", help="simulate hundreds of peers (real algorithm and wire code), locally or on Ray"
    )
    from peer.tools.simulate_args import add_arguments as add_simulate_arguments

    add_simulate_arguments(sim)
    sim.set_defaults(fn=cmd_simulate)

    e = sub.add_parser("eval", help="test accuracy of a checkpoint")
    e.add_argument(
        "--state-dir", required=True, metavar="DIR", help="a daemon's state_dir (checkpoint.pt and config.yaml)"
    )
    e.add_argument("--json", action="store_true", help="print the result as one JSON object")
    e.set_defaults(fn=cmd_eval)

    s = sub.add_parser("status", help="show a running daemon's state and what it is waiting for")
    _address_argument(s)
    s.add_argument("--json", action="store_true", help="JSON (with --watch: one JSON object per line and refresh)")
    s.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)")
    s.add_argument("--watch", action="store_true", help="refresh: the daemon and each neighbour's step, loss, bytes/s")
    _watch_arguments(s)
    _tls_arguments(s)
    s.set_defaults(fn=cmd_status)

    t = sub.add_parser("top", help="live view of several daemons, one row each")
    t.add_argument("addresses", nargs="+", metavar="HOST:PORT", help="the daemons' gRPC addresses")
    t.add_argument("--json", action="store_true", help="one JSON object per line and refresh")
    t.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each answer (default 2)")
    _watch_arguments(t)
    _tls_arguments(t)
    t.set_defaults(fn=cmd_top)

    rp = sub.add_parser("report", help="plot loss, bytes, consensus distance and accuracy of any run (PNG)")
    rp.add_argument("state_dirs", nargs="+", metavar="STATE_DIR", help="the state_dir of each daemon of the run")
    rp.add_argument("--out", required=True, metavar="DIR", help="where to write the PNG plots and summary.json")
    rp.add_argument("--no-eval", action="store_true", help="skip the test-set evaluation (no accuracy)")
    rp.set_defaults(fn=cmd_report)

    h = sub.add_parser("health", help="gRPC health check (exit 0 when serving); for container health checks")
    _address_argument(h)
    h.add_argument("--addr", metavar="HOST:PORT", help="the same as ADDRESS (kept for existing health checks)")
    h.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)")
    h.add_argument(
        "--wait", type=float, default=0.0, metavar="S", help="retry for up to S seconds until serving (default 0)"
    )
    _tls_arguments(h)
    h.set_defaults(fn=cmd_health)

    ls = sub.add_parser("ls", help="list the daemons on this host (ready files) and on the LAN (mDNS), with state")
    ls.add_argument("--timeout", type=float, default=2.0, help="seconds to browse mDNS and to wait for each status")
    ls.add_argument("--no-mdns", action="store_true", help="only this host's ready files, no mDNS browse")
    ls.add_argument("--json", action="store_true", help="one JSON list: node id, address, source and status")
    _tls_arguments(ls)
    ls.set_defaults(fn=cmd_ls)

    c = sub.add_parser("certs", help="mutual TLS: create a cluster CA, issue node certificates")
    csub = c.add_subparsers(dest="action", required=True)
    ci = csub.add_parser("init", help="create DIR/ca.pem and DIR/ca.key")
    ci.add_argument("dir", metavar="DIR", help="directory for the CA (created if missing)")
    ci.add_argument("--force", action="store_true", help="replace an existing CA (every node needs new certificates)")
    ci.add_argument("--days", type=int, default=0, help="validity (default 3650)")
    cs = csub.add_parser("issue", help="write DIR/NODE_ID.pem and DIR/NODE_ID.key, signed by DIR's CA")
    cs.add_argument("dir", metavar="DIR", help="the CA's directory (`peer certs init DIR`)")
    cs.add_argument("node_id", metavar="NODE_ID", help="the node id the certificate names (the daemon's node_id)")
    cs.add_argument("--days", type=int, default=0, help="validity (default 365)")
    cs.add_argument("--ip", action="append", default=[], help="also name this IP address (repeatable)")
    c.set_defaults(fn=cmd_certs)

    i = sub.add_parser("init-config", help="print an annotated default config")
    i.set_defaults(fn=cmd_init_config)
    return p


def main(argv: list[str] | None = None) -> int:
    # Before anything imports grpc: gRPC core's own stderr lines (`E1205 ... add_port.cc:83] ...`) never reach the
    # user; every error is reported once, as `peer: error: ...`. GRPC_VERBOSITY=debug still shows them.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    args = build_parser().parse_args(argv)
    # Plugins ("package.module:function") resolve from the working directory too, as `python -m` would.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        code: Any = args.fn(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `peer status | head -1`, `| grep -q`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush does not raise again
        return 0
    except BaseException as exc:  # the top-level supervisor: report our errors clearly, re-raise the rest
        err = _first_peer_error(exc)
        if err is None:
            raise
        print(f"peer: error: {err}", file=sys.stderr)
        return _exit_code(err)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
