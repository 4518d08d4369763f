"""Finding daemons without being told their address: ready files on this host (`state_dir/ready.json`, looked for
in `.`, `./*/`, `./state/` and `./state/*/`) and mDNS on the LAN. Used by `peer ls`, and by `peer status` and
`peer health` when no address is given (they say which daemon they picked).
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peer.daemon import readyfile
from peer.errors import PeerError, SendError
from peer.net.tls import TlsFiles
from peer.tools.status import fetch_status, waiting_text

DEFAULT_ROOTS = (Path("."), Path("state"))


@dataclass
class Daemon:
    node_id: str
    address: str
    source: str  # "state/robot-7/ready.json" or "mdns"
    status: dict[str, Any] | None = None
    error: str = ""


def local_daemons(roots: tuple[Path, ...] = DEFAULT_ROOTS) -> list[Daemon]:
    return [Daemon(r.node_id, r.address, str(r.path)) for r in readyfile.find(list(roots))]


async def mdns_daemons(timeout_s: float) -> list[Daemon]:
    from peer.net.browse import browse  # zeroconf: imported only when asked

    try:
        found = await browse(timeout_s)
    except OSError:
        found = await browse(timeout_s, ["127.0.0.1"])  # an interface without multicast: loopback at least
    return [Daemon(a.node_id, a.address, f"mdns (cluster {a.txt.get('cluster', '?')})") for a in found]


def pick(address: str | None, *, mdns_timeout_s: float = 1.5) -> str:
    """`address` when given (HOST:PORT, or a state dir whose ready.json names it); else the first daemon (by node
    id) with a ready file here, else one mDNS sees. Says on stderr which one it picked. Raises PeerError when there
    is none."""
    if address and Path(address).is_dir():  # a state dir: the daemon that serves from it
        ready = readyfile.read(Path(address) / readyfile.READY_NAME)
        if ready is None:
            raise PeerError(f"{address} holds no {readyfile.READY_NAME} of a running daemon (not started yet?)")
        return ready.address
    if address:
        return address
    found = local_daemons() or asyncio.run(mdns_daemons(mdns_timeout_s))
    if not found:
        raise PeerError(
            "no address given and no daemon found: none has a ready.json under ./, ./*/, ./state/ or ./state/*/ "
            f"and mDNS saw none within {mdns_timeout_s:g} s; give HOST:PORT (the `address` of its ready line)"
        )
    chosen = found[0]
    others = f"; {len(found) - 1} more (`peer ls` lists them)" if len(found) > 1 else ""
    print(f"peer: using {chosen.node_id} at {chosen.address} (from {chosen.source}){others}", file=sys.stderr)
    return chosen.address


async def list_daemons(timeout_s: float, tls: TlsFiles | None, *, mdns: bool = True) -> list[Daemon]:
    """Local ready files plus what mDNS sees (one row per address), each asked for its status."""
    daemons = {d.address: d for d in local_daemons()}
    if mdns:
        for d in await mdns_daemons(timeout_s):
            daemons.setdefault(d.address, d)

    async def ask(d: Daemon) -> None:
        try:
            d.status = await fetch_status(d.address, timeout_s=max(1.0, timeout_s), tls=tls)
        except (SendError, PeerError) as exc:
            d.error = str(exc)

    await asyncio.gather(*(ask(d) for d in daemons.values()))
    return sorted(daemons.values(), key=lambda d: (d.node_id, d.address))


def format_list(daemons: list[Daemon]) -> str:
    if not daemons:
        return "no daemons found (no ready.json here, none announced over mDNS)"
    lines = [f"{'node':<20} {'address':<22} {'step':>7} {'epoch':>6} {'nbrs':>4}  state  [source]"]
    for d in daemons:
        s = d.status
        if s is None:
            lines.append(f"{d.node_id:<20} {d.address:<22} {'-':>7} {'-':>6} {'-':>4}  unreachable  [{d.source}]")
            continue
        alive = sum(1 for n in s.get("neighbours", []) if n.get("state") == "alive")
        lines.append(
            f"{s['node_id']:<20} {d.address:<22} {int(s['step']):>7} {float(s['epoch']):>6.2f} {alive:>4}  "
            f"{waiting_text(s)}  [{d.source}]"
        )
    return "\n".join(lines)
