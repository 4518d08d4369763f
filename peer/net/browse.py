"""A one-shot mDNS browse for `peer ls` and `peer status` without an address: which daemons announce
`_peer._tcp.local.` on this host's interfaces right now. Unlike `peer.net.mdns` it registers nothing.

mDNS is not a liveness signal (a crashed daemon's records linger in caches), so callers confirm each answer
with a GetStatus call before they call it running.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field

from zeroconf import DNSQuestionType, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from peer.net.interfaces import _available_interfaces, _is_up
from peer.net.mdns import SERVICE_TYPE


@dataclass(frozen=True)
class Announced:
    node_id: str
    address: str
    txt: dict[str, str] = field(default_factory=dict)


def local_ipv4() -> list[str]:
    """Every IPv4 address of an interface that is up, loopback first (daemons on 127.0.0.1 announce there)."""
    ips = [ip for name, addrs in _available_interfaces().items() if _is_up(name) for ip in addrs]
    return sorted(dict.fromkeys(ips), key=lambda ip: (not ipaddress.ip_address(ip).is_loopback, ip))


async def browse(timeout_s: float, interfaces: list[str] | None = None) -> list[Announced]:
    """Browse for `timeout_s` seconds, then resolve what was seen (within the same budget); sorted by node id."""
    names: set[str] = set()

    def seen(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Removed:
            names.add(name)

    aiozc = AsyncZeroconf(interfaces=interfaces or local_ipv4(), ip_version=IPVersion.V4Only)
    try:
        browser = AsyncServiceBrowser(aiozc.zeroconf, [SERVICE_TYPE], handlers=[seen], question_type=DNSQuestionType.QM)
        await asyncio.sleep(timeout_s)
        await browser.async_cancel()
        infos = [AsyncServiceInfo(SERVICE_TYPE, n) for n in sorted(names) if n.endswith("." + SERVICE_TYPE)]
        wait_ms = int(max(500.0, timeout_s * 1000))
        found = await asyncio.gather(*(i.async_request(aiozc.zeroconf, wait_ms) for i in infos))
    finally:
        await aiozc.async_close()
    out = []
    for info, ok in zip(infos, found, strict=True):
        ipv4 = info.parsed_scoped_addresses(IPVersion.V4Only)
        if not ok or not ipv4 or not info.port:
            continue
        txt = {k: v for k, v in info.decoded_properties.items() if v is not None}
        node_id = txt.get("node_id") or info.name[: -len(SERVICE_TYPE) - 1]  # the instance may say node_id@cluster
        out.append(Announced(node_id, f"{ipv4[0]}:{info.port}", txt))
    return sorted(out, key=lambda a: (a.node_id, a.address))
