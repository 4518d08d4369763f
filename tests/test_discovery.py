"""Discovery: real zeroconf on 127.0.0.1 (no traffic leaves loopback), plus the pure parsing helpers."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import pytest
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from peer.errors import ConfigError, StartupError
from peer.net.addresses import Candidate, StaticPeers, parse_address
from peer.net.interfaces import resolve_interfaces
from peer.net.mdns import SERVICE_TYPE, MdnsDiscovery

LOOPBACK = "127.0.0.1"
PROTO = "peer.v1"


@dataclass
class Probe:
    """Records what one MdnsDiscovery proposed and removed, with events to wait on."""

    candidates: dict[str, Candidate] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on_candidate(self, c: Candidate) -> None:
        assert c.node_id is not None
        self.candidates[c.node_id] = c
        self.changed.set()

    def on_removed(self, node_id: str, address: str) -> None:
        self.removed.append(node_id)
        self.changed.set()

    async def wait_until(self, pred: Callable[[], bool], within_s: float) -> None:
        async with asyncio.timeout(within_s):
            while not pred():
                self.changed.clear()
                await self.changed.wait()


class Node:
    def __init__(self, node_id: str, port: int, schema: str, cluster: str | None = None) -> None:
        self.node_id = node_id
        self.port = port
        self.probe = Probe()
        self.disc = MdnsDiscovery(
            node_id=node_id,
            port=port,
            advertise_ip=LOOPBACK,
            interfaces=[LOOPBACK],
            protocol_version=PROTO,
            schema_fingerprint=schema,
            on_candidate=self.probe.on_candidate,
            on_removed=self.probe.on_removed,
            extra_txt={"cluster": cluster} if cluster else None,
        )


def uid(prefix: str) -> str:
    # Unique per run so parallel test runs on the same host never collide on names or schemas.
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@asynccontextmanager
async def running(nodes: list[Node]) -> AsyncIterator[None]:
    """Start every node (concurrently), run their browsers in a TaskGroup, and close them all on exit."""
    async with AsyncExitStack() as stack:
        for n in nodes:
            stack.push_async_callback(n.disc.close)
        await asyncio.gather(*(n.disc.start() for n in nodes))
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(n.disc.run()) for n in nodes]
            try:
                yield
            finally:
                for t in tasks:
                    t.cancel()


def make_nodes(k: int, schema: str, first_port: int = 41000) -> list[Node]:
    # Ports are only advertised, never bound, so fixed values are safe here.
    return [Node(uid(f"n{i}"), first_port + i, schema) for i in range(k)]


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_three_peers_find_each_other() -> None:
    schema = uid("schema")
    nodes = make_nodes(3, schema)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with running(nodes):
        for n in nodes:
            others = {m.node_id for m in nodes if m is not n}
            await n.probe.wait_until(lambda n=n, others=others: others <= n.probe.candidates.keys(), 10)
        elapsed = loop.time() - t0
        for n in nodes:
            assert n.node_id not in n.probe.candidates
            assert set(n.probe.candidates) == {m.node_id for m in nodes if m is not n}
            for m in nodes:
                if m is n:
                    continue
                c = n.probe.candidates[m.node_id]
                assert c == Candidate(
                    node_id=m.node_id,
                    address=f"{LOOPBACK}:{m.port}",
                    source="mdns",
                    protocol_version=PROTO,
                    schema_fingerprint=schema,
                    txt={"node_id": m.node_id, "proto": PROTO, "schema": schema, "port": str(m.port)},
                )
    logging.getLogger(__name__).info("all three peers saw each other after %.2f s", elapsed)


class _IgnoreLines(logging.Handler):
    """Sets an asyncio event per reporting node once it logs 'ignoring peer <bad>' (called in the loop)."""

    def __init__(self, bad: str, reporters: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.bad = bad
        self.seen = {r: asyncio.Event() for r in reporters}

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        node = getattr(record, "node_id", None)
        if msg.startswith(f"ignoring peer {self.bad} ") and node in self.seen:
            self.seen[node].set()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_incompatible_schema_is_not_proposed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="peer.net.mdns")
    schema = uid("schema")
    good = make_nodes(3, schema)
    bad = Node(uid("bad"), 41099, uid("other-schema"))
    handler = _IgnoreLines(bad.node_id, [n.node_id for n in good])
    logging.getLogger("peer.net.mdns").addHandler(handler)
    try:
        async with running([*good, bad]):
            for n in good:
                others = {m.node_id for m in good if m is not n}
                await n.probe.wait_until(lambda n=n, others=others: others <= n.probe.candidates.keys(), 10)
            # The bad node's registration has completed (start() returned) and each good node resolved it and
            # decided: that decision is the ignore line, logged exactly where a candidate would be proposed.
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in handler.seen.values())), 10)
            for n in good:
                assert bad.node_id not in n.probe.candidates
            # The bad node, in turn, proposes none of the good ones.
            assert not bad.probe.candidates
    finally:
        logging.getLogger("peer.net.mdns").removeHandler(handler)

    for n in good:
        lines = [
            r
            for r in caplog.records
            if getattr(r, "node_id", None) == n.node_id and r.getMessage().startswith(f"ignoring peer {bad.node_id} ")
        ]
        assert len(lines) == 1, [r.getMessage() for r in lines]
        msg = lines[0].getMessage()
        assert f"at {LOOPBACK}:{bad.port}" in msg
        assert f"schema fingerprint {bad.disc.schema_fingerprint} != ours {schema} (different model?)" in msg


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_raw_browser_sees_incompatible_peer_that_is_never_proposed() -> None:
    """Same property checked from outside: a plain zeroconf browser sees the bad service, the peers don't."""
    good = make_nodes(2, uid("schema"))
    bad = Node(uid("bad"), 41098, uid("other-schema"))
    seen_bad = asyncio.Event()

    def handler(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if name == f"{bad.node_id}.{SERVICE_TYPE}" and state_change is ServiceStateChange.Added:
            seen_bad.set()

    raw = AsyncZeroconf(interfaces=[LOOPBACK], ip_version=IPVersion.V4Only)
    try:
        browser = AsyncServiceBrowser(raw.zeroconf, [SERVICE_TYPE], handlers=[handler])
        async with running([*good, bad]):
            await asyncio.wait_for(seen_bad.wait(), 10)
            for n in good:
                other = next(m for m in good if m is not n)
                await n.probe.wait_until(lambda n=n, other=other: other.node_id in n.probe.candidates, 10)
            # Both good nodes had a full resolve round after the bad one was visible on the wire.
            info = await raw.async_get_service_info(SERVICE_TYPE, f"{bad.node_id}.{SERVICE_TYPE}", 3000)
            assert info is not None
            assert info.decoded_properties["schema"] == bad.disc.schema_fingerprint
            for n in good:
                assert bad.node_id not in n.probe.candidates
        await browser.async_cancel()
    finally:
        await raw.async_close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_clean_close_reports_removed() -> None:
    nodes = make_nodes(3, uid("schema"))
    leaver, stayers = nodes[0], nodes[1:]
    async with running(nodes):
        for n in stayers:
            await n.probe.wait_until(lambda n=n: leaver.node_id in n.probe.candidates, 10)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await leaver.disc.close()
        for n in stayers:
            await n.probe.wait_until(lambda n=n: leaver.node_id in n.probe.removed, 5)
        took = loop.time() - t0
        for n in stayers:
            assert n.probe.removed == [leaver.node_id]
        await leaver.disc.close()  # idempotent
    logging.getLogger(__name__).info("Removed seen %.2f s after close", took)


@pytest.mark.asyncio
@pytest.mark.timeout(30)
@pytest.mark.parametrize("bystanders", [0, 3])
async def test_duplicate_node_id_fails_startup(bystanders: int) -> None:
    # With bystanders, several responders share port 5353 on this host, so zeroconf's own probe (answered by
    # unicast, delivered to one socket only) misses the conflict: this case needs the multicast lookup.
    schema = uid("schema")
    first = Node(uid("dup"), 41200, schema)
    others = make_nodes(bystanders, schema, first_port=41210)
    second = Node(first.node_id, 41201, schema)
    try:
        await asyncio.gather(first.disc.start(), *(o.disc.start() for o in others))
        with pytest.raises(StartupError, match=f"node_id '{first.node_id}'"):
            await second.disc.start()
        await second.disc.close()  # safe after a failed start, and idempotent
    finally:
        for n in [first, *others]:
            await n.disc.close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_the_same_node_id_in_two_clusters_is_not_a_duplicate() -> None:
    """Two demos on one host each have a peer-0: the instance name says node_id@cluster, and each cluster's
    peer-0 is proposed to the other under its own node id (the Hello then refuses the other cluster)."""
    schema = uid("schema")
    node_id = uid("peer")
    a = Node(node_id, 41300, schema, cluster=uid("c1"))
    b = Node(node_id, 41301, schema, cluster=uid("c2"))
    dup = Node(node_id, 41302, schema, cluster=a.disc.cluster)
    async with running([a, b]):
        await a.probe.wait_until(lambda: node_id in a.probe.candidates, 10)
        assert a.probe.candidates[node_id].address == f"{LOOPBACK}:41301"
        assert a.disc.instance_name == f"{node_id}@{a.disc.cluster}.{SERVICE_TYPE}"
        with pytest.raises(StartupError, match=f"node_id '{node_id}' in cluster '{a.disc.cluster}'"):
            await dup.disc.start()
        await dup.disc.close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_restart_after_crash_is_not_a_duplicate() -> None:
    """A peer that vanished without a goodbye leaves its records in other caches; they must not block it."""
    schema = uid("schema")
    (watcher,) = make_nodes(1, schema)
    node_id = uid("crashy")
    crashed = AsyncZeroconf(interfaces=[LOOPBACK], ip_version=IPVersion.V4Only)
    async with running([watcher]):
        info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{node_id}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(LOOPBACK)],
            port=41400,
            properties={"node_id": node_id, "proto": PROTO, "schema": schema, "port": "41400"},
            server=f"{node_id}.local.",
        )
        await (await crashed.async_register_service(info))
        await watcher.probe.wait_until(lambda: node_id in watcher.probe.candidates, 10)
        # "Crash": drop the service without goodbye packets, then close the sockets.
        crashed.zeroconf.registry.async_remove(info)
        await crashed.async_close()

        restarted = Node(node_id, 41401, schema)
        try:
            await restarted.disc.start()
            await watcher.probe.wait_until(lambda: watcher.probe.candidates[node_id].address == f"{LOOPBACK}:41401", 10)
        finally:
            await restarted.disc.close()
        assert watcher.probe.removed in ([], [node_id])  # the goodbye from the clean close may already be in


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_late_joiner_finds_settled_peers() -> None:
    """Peers that finished announcing are found by browsing alone (multicast answers reach every socket)."""
    schema = uid("schema")
    early = make_nodes(2, schema)
    late = Node(uid("late"), 41500, schema)
    async with running(early):
        await early[0].probe.wait_until(lambda: early[1].node_id in early[0].probe.candidates, 10)
        async with running([late]):
            await late.probe.wait_until(lambda: {e.node_id for e in early} <= late.probe.candidates.keys(), 10)
            for e in early:
                await e.probe.wait_until(lambda e=e: late.node_id in e.probe.candidates, 10)


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_update_txt_reannounces() -> None:
    a, b = make_nodes(2, uid("schema"))
    async with running([a, b]):
        await b.probe.wait_until(lambda: a.node_id in b.probe.candidates, 10)
        await a.disc.update_txt({"degree": "3"})
        await b.probe.wait_until(lambda: b.probe.candidates[a.node_id].txt.get("degree") == "3", 10)
        with pytest.raises(ValueError, match="reserved"):
            await a.disc.update_txt({"schema": "x"})


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_start_with_bad_interface_is_config_error() -> None:
    n = MdnsDiscovery(
        node_id=uid("x"),
        port=41300,
        advertise_ip=LOOPBACK,
        interfaces=["no-such-if0"],
        protocol_version=PROTO,
        schema_fingerprint="s",
        on_candidate=lambda c: None,
        on_removed=lambda n, a: None,
    )
    with pytest.raises(ConfigError, match="unknown interface 'no-such-if0'"):
        await n.start()
    await n.close()


# -- pure helpers --------------------------------------------------------------------------------------------


def test_resolve_interfaces() -> None:
    assert resolve_interfaces(["lo"]) == [LOOPBACK]
    assert resolve_interfaces([LOOPBACK, "lo"]) == [LOOPBACK]
    with pytest.raises(ConfigError) as err:
        resolve_interfaces(["nope0"])
    assert err.value.field == "discovery.interfaces"
    assert "nope0" in str(err.value)
    assert "lo (127.0.0.1" in str(err.value)
    for bad in (["::1"], ["203.0.113.77"], []):
        with pytest.raises(ConfigError, match=re.escape("lo (127.0.0.1")):
            resolve_interfaces(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:50051", ("127.0.0.1", 50051)),
        ("node-a.local:1", ("node-a.local", 1)),
        ("seed_1:65535", ("seed_1", 65535)),
        ("[::1]:50051", ("::1", 50051)),
        ("[fe80::1]:7", ("fe80::1", 7)),
    ],
)
def test_parse_address_ok(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text, field="discovery.static_peers") == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "host",
        ":50051",
        "host:",
        "host:0",
        "host:65536",
        "host:-1",
        "host:5x",
        "::1:50051",
        "[::1]50051",
        "[nothex]:1",
        "[::1:1",
        " host:1",
        "http://host:1",
        "ho st:1",
    ],
)
def test_parse_address_bad(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_address(text, field="discovery.static_peers")
    assert err.value.field == "discovery.static_peers"
    assert str(err.value).startswith("discovery.static_peers: ")


def test_parse_address_port_zero_only_for_listen() -> None:
    assert parse_address("127.0.0.1:0", field="listen") == ("127.0.0.1", 0)
    assert parse_address("0.0.0.0:0", field="grpc.listen") == ("0.0.0.0", 0)
    with pytest.raises(ConfigError, match=re.escape("outside 1..65535")):
        parse_address("127.0.0.1:0", field="discovery.static_peers")


def test_static_peers() -> None:
    got: list[Candidate] = []
    sp = StaticPeers(["127.0.0.1:5000", "[::1]:5001", "seed:5002"], got.append)
    expected = [
        Candidate(node_id=None, address="127.0.0.1:5000", source="static"),
        Candidate(node_id=None, address="[::1]:5001", source="static"),
        Candidate(node_id=None, address="seed:5002", source="static"),
    ]
    assert sp.candidates() == expected
    assert not got
    sp.propose()
    assert got == expected
    assert len({*expected}) == 3  # hashable
    assert StaticPeers([], got.append).candidates() == []
    with pytest.raises(ConfigError, match=r"entry 1: .*'nope'") as err:
        StaticPeers(["a:1", "nope"], got.append)
    assert err.value.field == "discovery.static_peers"
    with pytest.raises(ConfigError, match="listed twice"):
        StaticPeers(["a:1", "a:1"], got.append)
