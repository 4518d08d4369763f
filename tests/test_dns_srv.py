"""DNS SRV discovery against a real DNS server on loopback: a small UDP responder written here with dnspython's
message module (SRV answers with and without A records in the additional section, NXDOMAIN for the rest), asked
by the daemon's real resolver."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from helpers import fast_config, start_nodes, stop_nodes, unique, until

from peer import config
from peer.daemon.node import Node
from peer.errors import ConfigError
from peer.net.addresses import Candidate
from peer.net.dns import SrvDiscovery, SrvResolver


class Zone(asyncio.DatagramProtocol):
    """Answers SRV and A queries from `srv` (name -> [(port, target)]) and `a` (target -> [ip]); `glue` names
    the SRV names whose answers carry the targets' A records in the additional section."""

    def __init__(self) -> None:
        self.srv: dict[str, list[tuple[int, str]]] = {}
        self.a: dict[str, list[str]] = {}
        self.glue: set[str] = set()
        self.queries: list[tuple[str, str]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        q = query.question[0]
        name, kind = q.name.to_text(), dns.rdatatype.to_text(q.rdtype)
        self.queries.append((name, kind))
        reply = dns.message.make_response(query)
        if kind == "SRV" and name in self.srv:
            records = [f"0 10 {port} {target}" for port, target in self.srv[name]]
            reply.answer.append(dns.rrset.from_text_list(q.name, 5, "IN", "SRV", records))
            if name in self.glue:
                for _, target in self.srv[name]:
                    reply.additional.append(dns.rrset.from_text_list(target, 5, "IN", "A", self.a[target]))
        elif kind == "A" and name in self.a:
            reply.answer.append(dns.rrset.from_text_list(q.name, 5, "IN", "A", self.a[name]))
        elif name not in self.a:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        assert self.transport is not None
        self.transport.sendto(reply.to_wire(), addr)


@pytest.fixture
async def zone() -> AsyncIterator[tuple[Zone, str]]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(Zone, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    try:
        yield protocol, f"127.0.0.1:{port}"
    finally:
        transport.close()


async def test_srv_targets_resolve_with_and_without_glue(zone: tuple[Zone, str]) -> None:
    z, server = zone
    z.srv["_gossip._tcp.peer.test."] = [(5001, "p0.peer.test."), (5002, "p1.peer.test.")]
    z.srv["_plain._tcp.peer.test."] = [(5003, "p2.peer.test."), (5004, ".")]
    z.a = {"p0.peer.test.": ["127.0.0.10"], "p1.peer.test.": ["127.0.0.11"], "p2.peer.test.": ["127.0.0.12"]}
    z.glue = {"_gossip._tcp.peer.test."}
    resolver = SrvResolver([server], timeout_s=2.0)
    found = await resolver.resolve("_gossip._tcp.peer.test")
    assert [c.address for c in found] == ["127.0.0.10:5001", "127.0.0.11:5002"]
    assert all(c.source == "dns" and c.node_id is None for c in found)
    assert ("p0.peer.test.", "A") not in z.queries  # the additional section sufficed
    assert [c.address for c in await resolver.resolve("_plain._tcp.peer.test.")] == ["127.0.0.12:5003"]
    assert ("p2.peer.test.", "A") in z.queries


async def test_a_name_that_does_not_resolve_is_reported_and_tried_again(zone: tuple[Zone, str]) -> None:
    z, server = zone
    proposed: list[Candidate] = []
    errors: list[tuple[str, str]] = []
    srv = SrvDiscovery(
        ["_gossip._tcp.missing.test"], 0.01, SrvResolver([server], 2.0), proposed.append, lambda *e: errors.append(e)
    )
    assert await srv.resolve_once() == [] and "NXDOMAIN" in errors[0][1]
    # The Service appears (a pod became ready): the next round finds it.
    z.srv["_gossip._tcp.missing.test."] = [(6000, "p.missing.test.")]
    z.a["p.missing.test."] = ["127.0.0.20"]
    assert [c.address for c in await srv.resolve_once()] == ["127.0.0.20:6000"] and len(proposed) == 1


def test_dns_config_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"discovery\.dns_nameservers"):
        config.validate({"node_id": "a", "discovery": {"dns_nameservers": ["dns.example:53"]}}, source="t")
    with pytest.raises(ConfigError, match=r"discovery\.dns_srv"):
        config.validate({"node_id": "a", "discovery": {"dns_srv": ["a..b"]}}, source="t")
    cfg = config.validate({"node_id": "a", "discovery": {"mdns": False, "dns_srv": ["_g._tcp.x"]}}, source="t")
    assert cfg.discovery.finds_peers


async def test_daemons_find_each_other_through_a_srv_name(zone: tuple[Zone, str], tmp_path: Path) -> None:
    """Like a StatefulSet behind a headless Service: the SRV name lists every daemon, itself included."""
    z, server = zone
    name = f"_gossip._tcp.{unique('svc')}.test."
    ids = [unique("dns") for _ in range(2)]
    dns_keys = {"discovery.dns_srv": [name], "discovery.dns_nameservers": [server], "discovery.dns_interval_s": 0.2}
    nodes = [Node(fast_config(tmp_path, i, **dns_keys, **{"train.epochs": 50})) for i in ids]
    tasks = await start_nodes(nodes)
    try:
        z.srv[name] = [(int(n.address.rpartition(":")[2]), f"{n.cfg.node_id}.test.") for n in nodes]
        z.a.update({f"{n.cfg.node_id}.test.": ["127.0.0.1"] for n in nodes})
        await until(nodes, lambda: all(len(n.core.members()) == 1 for n in nodes), 20, "each daemon to admit the other")
        assert nodes[0].core.members() == [ids[1]] and nodes[1].core.members() == [ids[0]]
    finally:
        await stop_nodes(nodes, tasks)
