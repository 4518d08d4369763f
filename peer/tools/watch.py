"""`peer status --watch` and `peer top`: live views of running daemons, refreshed from `GetStatus`.

`status --watch ADDR` shows one daemon and each neighbour in its peer table: state and last seen from that
daemon, step, loss and bytes/s from the neighbour's own status (asked directly; "-" when it cannot be reached).
`top ADDR...` shows one row per daemon. Rates are differences between two refreshes. rich draws the tables:
colours only on a terminal (and never with NO_COLOR); elsewhere each refresh is printed as plain text. `--json`
prints one JSON object per refresh instead, for machines.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from peer.errors import PeerError
from peer.net.tls import TlsFiles
from peer.tools.status import fetch_status

STATE_STYLE = {"alive": "green", "suspect": "yellow", "backoff": "magenta", "evicted": "red"}


@dataclass
class Probe:
    """One daemon's answer at one refresh: its status dict (as `peer status --json`) or the error."""

    address: str
    at: float  # monotonic
    status: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class Rates:
    """Bytes/s per daemon from the difference between its last two answers."""

    _last: dict[str, tuple[float, int, int]] = field(default_factory=dict)

    def update(self, probe: Probe) -> tuple[float | None, float | None]:
        if probe.status is None:
            return None, None
        sent, received = int(probe.status.get("bytes_sent", 0)), int(probe.status.get("bytes_received", 0))
        key = str(probe.status.get("node_id", probe.address))
        prev = self._last.get(key)
        self._last[key] = (probe.at, sent, received)
        if prev is None or probe.at <= prev[0]:
            return None, None
        dt = probe.at - prev[0]
        return max(0.0, (sent - prev[1]) / dt), max(0.0, (received - prev[2]) / dt)


async def probe(address: str, timeout_s: float, tls: TlsFiles | None) -> Probe:
    try:
        status = await fetch_status(address, timeout_s=timeout_s, tls=tls)
    except PeerError as exc:
        return Probe(address, time.monotonic(), error=str(exc))
    return Probe(address, time.monotonic(), status=status)


def _bytes_per_s(rate: float | None) -> str:
    if rate is None:
        return "-"
    for unit in ("B/s", "kB/s", "MB/s"):
        if rate < 1000:
            return f"{rate:.0f} {unit}" if unit == "B/s" else f"{rate:.1f} {unit}"
        rate /= 1000
    return f"{rate:.1f} GB/s"


def _age(ms: Any, wall: float) -> str:
    if not ms or int(ms) == 0:
        return "never"
    return f"{max(0.0, wall - int(ms) / 1000):.1f}s ago"


def _loss(s: dict[str, Any]) -> str:
    loss = float(s.get("loss", float("nan")))
    return "-" if loss != loss else f"{loss:.4f}"


def _alive(s: dict[str, Any]) -> str:
    rows = s.get("neighbours", [])
    return f"{sum(1 for n in rows if n.get('state') == 'alive')}/{len(rows)}"


def top_table(probes: Sequence[Probe], rates: Sequence[tuple[float | None, float | None]]) -> Table:
    """One row per daemon (`peer top`)."""
    table = Table(title="peer top", title_justify="left", expand=False)
    for name, justify in [
        ("node", "left"),
        ("address", "left"),
        ("algorithm", "left"),
        ("step", "right"),
        ("epoch", "right"),
        ("loss", "right"),
        ("sent/s", "right"),
        ("recv/s", "right"),
        ("alive", "right"),
        ("rejected", "right"),
        ("uptime", "right"),
    ]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    errors = []
    for p, (sent, received) in zip(probes, rates, strict=True):
        s = p.status
        if s is None:
            table.add_row("?", p.address, Text("unreachable", style="red"), *[""] * 8)
            errors.append(f"{p.address}: {p.error}")
            continue
        done = " (done)" if s.get("training_done") else ""
        table.add_row(
            str(s["node_id"]),
            str(s["address"]),
            str(s["algorithm"]),
            str(s["step"]),
            f"{float(s['epoch']):.2f}{done}",
            _loss(s),
            _bytes_per_s(sent),
            _bytes_per_s(received),
            _alive(s),
            str(s.get("rejected_messages", 0)),
            f"{float(s.get('uptime_s', 0)):.0f}s",
        )
    if errors:
        table.caption = Text("\n".join(errors), style="red")
        table.caption_justify = "left"
    return table


def status_view(
    main: Probe, rate: tuple[float | None, float | None], neighbours: dict[str, Probe], rates: Rates
) -> Group:
    """One daemon and each peer in its table (`peer status --watch`)."""
    s = main.status
    if s is None:
        return Group(Text(f"{main.address}: unreachable: {main.error}", style="red"))
    head = Text.assemble(
        (str(s["node_id"]), "bold"),
        f" at {s['address']} ({s['algorithm']})  step {s['step']}, epoch {float(s['epoch']):.2f}, loss {_loss(s)}",
        " (done)" if s.get("training_done") else "",
        f"  sent {_bytes_per_s(rate[0])}, received {_bytes_per_s(rate[1])}, rejected {s.get('rejected_messages', 0)}",
    )
    table = Table(expand=False)
    for name in ("peer", "address", "state", "step", "loss", "sent/s", "last seen", "failures"):
        table.add_column(name, justify="left" if name in ("peer", "address", "state") else "right")
    wall = time.time()
    for n in s.get("neighbours", []):
        other = neighbours.get(n["node_id"])
        o = other.status if other is not None else None
        sent = rates.update(other)[0] if other is not None else None
        state = str(n["state"])
        table.add_row(
            str(n["node_id"]),
            str(n["address"]),
            Text(state, style=STATE_STYLE.get(state, "")),
            str(o["step"]) if o else "-",
            _loss(o) if o else "-",
            _bytes_per_s(sent),
            _age(n.get("last_seen_unix_ms"), wall),
            str(n.get("failures", 0)),
        )
    if not s.get("neighbours"):
        table.add_row("(no peers known yet)", *[""] * 7)
    return Group(head, table)


async def watch(
    addresses: Sequence[str],
    *,
    neighbours: bool,
    interval_s: float = 1.0,
    count: int = 0,
    timeout_s: float = 2.0,
    tls: TlsFiles | None = None,
    json_lines: bool = False,
    console: Console | None = None,
) -> None:
    """Refresh every `interval_s` (`count` times, 0 = until interrupted). `neighbours`: the status view of
    `addresses[0]` with its neighbours asked too; else the top view of every address."""
    if console is None:
        console = Console(highlight=False)
        if not console.is_terminal:
            console = Console(highlight=False, width=max(console.width, 160))  # a pipe or a file: no wrapping at 80
    rates = Rates()
    live: Live | None = None
    if console.is_terminal and not json_lines:
        live = Live(console=console, auto_refresh=False, transient=False)
        live.start()
    try:
        n = 0
        while count <= 0 or n < count:
            if n:
                await asyncio.sleep(interval_s)
            n += 1
            probes = list(await asyncio.gather(*(probe(a, timeout_s, tls) for a in addresses)))
            near: dict[str, Probe] = {}
            if neighbours and probes[0].status is not None:
                rows = probes[0].status.get("neighbours", [])
                answers = await asyncio.gather(*(probe(r["address"], timeout_s, tls) for r in rows))
                near = {r["node_id"]: p for r, p in zip(rows, answers, strict=True)}
            own = [rates.update(p) for p in probes]
            if json_lines:
                console.file.write(json.dumps(_json(probes, own, near)) + "\n")
                console.file.flush()
                continue
            view: Table | Group = status_view(probes[0], own[0], near, rates) if neighbours else top_table(probes, own)
            if live is not None:
                live.update(view, refresh=True)
            else:
                console.print(view)
    finally:
        if live is not None:
            live.stop()


def _json(
    probes: Sequence[Probe], rates: Sequence[tuple[float | None, float | None]], near: dict[str, Probe]
) -> dict[str, Any]:
    return {
        "time": time.time(),
        "daemons": [
            {
                "address": p.address,
                "ok": p.status is not None,
                "error": p.error,
                "bytes_sent_per_s": r[0],
                "bytes_received_per_s": r[1],
                "status": p.status,
            }
            for p, r in zip(probes, rates, strict=True)
        ],
        "neighbours": {k: {"ok": p.status is not None, "error": p.error, "status": p.status} for k, p in near.items()},
    }
