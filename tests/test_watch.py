"""`peer status --watch` and `peer top` against two real gossiping daemons: neighbours' state, step, loss and
bytes/s; colours only on a terminal; JSON lines for machines; an unreachable daemon is shown, not fatal."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

from rich.console import Console

from peer.cli import build_parser
from peer.daemon.node import Node
from peer.tools.watch import watch
from tests.helpers import fast_config, start_nodes, stop_nodes, unique, until

ANSI = "\x1b["


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    if terminal:
        return Console(file=out, width=200, force_terminal=True, color_system="standard"), out
    return Console(file=out, width=200), out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_watch_and_top(tmp_path: Path) -> None:
    a = Node(fast_config(tmp_path, unique("a"), **{"train.epochs": 50}), stdout=io.StringIO())
    tasks = await start_nodes([a])
    b = Node(
        fast_config(tmp_path, unique("b"), **{"train.epochs": 50, "discovery.static_peers": [a.address]}),
        stdout=io.StringIO(),
    )
    tasks += await start_nodes([b])
    nodes = [a, b]
    try:
        await until(
            nodes,
            lambda: a.core.neighbours() == [b.cfg.node_id] and b.counters.messages_sent > 0,
            60,
            "a and b to gossip",
        )
        console, out = _console(terminal=False)
        await watch([a.address], neighbours=True, count=2, interval_s=0.3, console=console)
        text = out.getvalue()
        assert ANSI not in text
        assert a.cfg.node_id in text and b.cfg.node_id in text and b.address in text
        assert "alive" in text and "s ago" in text and "B/s" in text

        console, out = _console(terminal=True)
        await watch([a.address], neighbours=True, count=1, console=console)
        assert ANSI in out.getvalue()  # the state column is coloured on a terminal

        dead = f"127.0.0.1:{_free_port()}"
        console, out = _console(terminal=False)
        await watch([a.address, b.address, dead], neighbours=False, count=2, interval_s=0.3, console=console)
        text = out.getvalue()
        assert a.cfg.node_id in text and b.cfg.node_id in text and "1/1" in text
        assert "unreachable" in text and dead in text and ANSI not in text

        console, out = _console(terminal=False)
        await watch([a.address, b.address], neighbours=False, count=2, interval_s=0.3, json_lines=True, console=console)
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        assert len(lines) == 2
        first, second = lines
        assert [d["status"]["node_id"] for d in second["daemons"]] == [a.cfg.node_id, b.cfg.node_id]
        assert first["daemons"][0]["bytes_sent_per_s"] is None  # no rate before a second answer
        assert second["daemons"][1]["bytes_sent_per_s"] >= 0
    finally:
        await stop_nodes(nodes, tasks)


def test_cli_arguments() -> None:
    args = build_parser().parse_args(["top", "h:1", "h:2", "--count", "3", "--interval", "0.5"])
    assert args.addresses == ["h:1", "h:2"] and args.count == 3 and args.interval == 0.5
    args = build_parser().parse_args(["status", "h:1", "--watch", "--ca", "c", "--cert", "d", "--key", "k"])
    assert args.watch and args.ca == "c" and not args.json
