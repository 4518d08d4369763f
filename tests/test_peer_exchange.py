"""Peer exchange: members learn their members' members through Hello, within bounds, and a named peer joins only
once its address answers our own Hello. The core alone (with `now` as an argument), a fleet of cores over an
in-memory network split in two subnets, and real daemons over gRPC on loopback."""

from __future__ import annotations

import io
import random
from pathlib import Path

from helpers import fast_config, start_nodes, stop_nodes, unique, until

from peer.core.admission import AdmissionSettings
from peer.core.events import (
    CandidateFound,
    Effect,
    HelloAnswered,
    HelloFailed,
    HelloReceived,
    KnownPeer,
    PeerInfo,
    Progress,
    Refused,
    SayHello,
    Started,
    Tick,
)
from peer.core.exchange import ExchangeSettings, PeerExchange, plausible_address
from peer.core.gossip import GossipCore
from peer.core.peers import PeerTable
from peer.core.settings import CoreSettings, Identity
from peer.daemon.node import Node
from peer.tools import certs

PROTO, FP = "peer.v1", "fp0"


def core(node_id: str, **kw: object) -> GossipCore:
    return GossipCore(CoreSettings(identity=Identity(node_id, PROTO, FP, "cdl", 100), **kw), random.Random(0))  # type: ignore[arg-type]


def info(node_id: str, address: str, known: tuple[KnownPeer, ...] = (), incarnation: int = 1) -> PeerInfo:
    return PeerInfo(node_id, PROTO, FP, "cdl", 1, address, incarnation, known_peers=known)


def start(c: GossipCore, address: str, now: float = 0.0) -> list[Effect]:
    return c.handle(Started(now, 1e9 + now, address, Progress()))


def hellos(out: list[Effect]) -> list[SayHello]:
    return [e for e in out if isinstance(e, SayHello)]


def addr(i: int) -> str:
    return f"198.18.0.{i}:7000"


# ------------------------------------------------------------------------------------------- the bookkeeping
def test_offer_is_a_bounded_window_that_rotates_over_the_members() -> None:
    table = PeerTable("me", "ring")
    for i in range(10):
        table.peer_up(f"p{i}", addr(i), 2, 1, 0.0)
    ex = PeerExchange(ExchangeSettings(max_per_hello=4))
    offers = [ex.offer(table) for _ in range(3)]
    assert all(len(o) == 4 for o in offers)
    named = {k.node_id for o in offers for k in o}
    assert len(named) == 10  # three Hellos name all ten members
    assert offers[0][0] == KnownPeer("p0", addr(0))
    table.heartbeat_failed("p1", 1.0)
    for _ in range(3):
        table.heartbeat_failed("p1", 1.0)  # evicted: no longer named
    assert all(k.node_id != "p1" for _ in range(5) for k in ex.offer(table))
    assert PeerExchange(ExchangeSettings(enabled=False)).offer(table) == ()


def test_learn_skips_ourselves_members_bad_entries_and_repeats_and_stays_bounded() -> None:
    table = PeerTable("me", "ring")
    table.peer_up("m", addr(1), 2, 1, 0.0)
    ex = PeerExchange(ExchangeSettings(max_per_hello=5, max_known=3, retry_s=10.0))
    entries = [
        KnownPeer("me", addr(9)),  # ourselves
        KnownPeer("x", "198.18.0.99:7000"),  # our own address
        KnownPeer("m", addr(1)),  # a member
        KnownPeer("bad id!", addr(2)),
        KnownPeer("y", "no-port"),
        KnownPeer("z", addr(3)),  # beyond max_per_hello: never read
    ]
    assert ex.learn(entries, table, "198.18.0.99:7000", 1.0) == []
    new = [KnownPeer(f"n{i}", addr(10 + i)) for i in range(5)]
    assert ex.learn(new, table, "", 1.0) == new
    assert len(ex) == 3  # bounded: the least recently dialled are forgotten
    assert ex.learn(new[3:], table, "", 5.0) == []  # named again too soon
    assert ex.learn(new[3:], table, "", 11.0) == new[3:]  # a learnt address that never answered is retried later
    assert ex.learned == 7
    assert not plausible_address("h:0") and not plausible_address("h :1") and plausible_address("[::1]:5")


# ------------------------------------------------------------------------------------------------- the core
def test_a_named_peer_joins_only_once_its_own_address_answers() -> None:
    a = core("a")
    start(a, addr(1))
    # b answers our Hello (a static seed) and names c and d.
    out = a.handle(
        HelloAnswered(
            addr(2), "join", info("b", addr(2), (KnownPeer("c", addr(3)), KnownPeer("d", addr(4)))), True, "", 1.0
        )
    )
    assert a.members() == ["b"]
    assert [(h.address, h.purpose, h.node_id) for h in hellos(out)] == [(addr(3), "join", "c"), (addr(4), "join", "d")]
    # c answers as c: admitted. At d's address someone else answers with a certificate for another name: not d.
    a.handle(HelloAnswered(addr(3), "join", info("c", addr(3)), True, "", 1.1, node_id="c", identity="c"))
    a.handle(HelloAnswered(addr(4), "join", info("d", addr(4)), True, "", 1.1, node_id="d", identity="mallory"))
    assert a.members() == ["b", "c"]
    # A dead address named again and again is not dialled at every Hello.
    a.handle(HelloFailed(addr(4), "join", "UNAVAILABLE", "", 1.2, "d"))
    again = info("b", addr(2), (KnownPeer("d", addr(4)),))
    assert not hellos(a.handle(HelloAnswered(addr(2), "heartbeat", again, True, "", 2.0, node_id="b")))


def test_only_members_speak_for_others() -> None:
    a = core("a")
    start(a, addr(1))
    named = (KnownPeer("c", addr(3)),)
    # A stranger's Hello: we dial the stranger back (admission), not the peers it names.
    out = a.handle(HelloReceived(info("s", addr(9), named), "ipv4:198.18.0.9:4000", 1.0))
    assert [h.address for h in hellos(out)] == [addr(9)]
    # A member greeting from the address we confirmed: its list counts.
    a.handle(HelloAnswered(addr(2), "join", info("b", addr(2)), True, "", 1.0))
    out = a.handle(HelloReceived(info("b", addr(2), named), "ipv4:198.18.0.2:4000", 2.0))
    assert [h.address for h in hellos(out)] == [addr(3)]
    # Peer exchange off: nothing is learnt, nothing is named.
    off = core("a", exchange=ExchangeSettings(enabled=False))
    start(off, addr(1))
    assert not hellos(off.handle(HelloAnswered(addr(2), "join", info("b", addr(2), named), True, "", 1.0)))
    assert off.offer() == ()


def test_join_hellos_from_exchange_stay_within_the_admission_limit() -> None:
    a = core("a", admission=AdmissionSettings(max_pending=3), exchange=ExchangeSettings(max_per_hello=16))
    start(a, addr(1))
    named = tuple(KnownPeer(f"n{i}", addr(10 + i)) for i in range(16))
    out = a.handle(HelloAnswered(addr(2), "join", info("b", addr(2), named), True, "", 1.0))
    assert len(hellos(out)) == 3 and sum(isinstance(e, Refused) for e in out) == 13


def test_a_dns_or_static_candidate_already_answering_is_not_dialled_again() -> None:
    a = core("a")
    start(a, addr(1))
    a.handle(HelloAnswered(addr(2), "join", info("b", addr(2)), True, "", 1.0))
    assert not hellos(a.handle(CandidateFound(addr(2), None, "dns", 2.0)))
    assert hellos(a.handle(CandidateFound(addr(3), None, "dns", 2.0)))


def run_fleet(cores: dict[str, GossipCore], reach: set[tuple[str, str]], until_s: float) -> float | None:
    """Deliver every SayHello in memory (answers from the core at that address, if `reach` allows the pair) and
    tick each core every 0.5 s; returns when every core has every other as a member (or None)."""
    address = {n: addr(i + 1) for i, n in enumerate(sorted(cores))}
    at = {v: k for k, v in address.items()}
    queue: list[tuple[str, SayHello]] = []
    for n, c in cores.items():
        queue += [(n, h) for h in hellos(start(c, address[n]))]
    now = 0.0
    while now < until_s:
        while queue:
            src, h = queue.pop(0)
            dst = at.get(h.address)
            c = cores[src]
            if dst is None or (src, dst) not in reach:
                out = c.handle(HelloFailed(h.address, h.purpose, "UNAVAILABLE", "", now, h.node_id))
            else:
                callee = cores[dst]
                me = callee.settings.identity
                caller = f"ipv4:{address[src].rpartition(':')[0]}:40000"
                back = callee.handle(HelloReceived(info(src, address[src], c.offer()), caller, now))
                queue += [(dst, e) for e in hellos(back)]  # the callee dials a stranger back (admission)
                answer = info(me.node_id, address[dst], callee.offer())
                out = c.handle(HelloAnswered(h.address, h.purpose, answer, True, "", now, h.node_id))
            queue += [(src, e) for e in hellos(out)]
        if all(len(c.members()) == len(cores) - 1 for c in cores.values()):
            return now
        now += 0.5
        for n, c in cores.items():
            queue += [(n, h) for h in hellos(c.handle(Tick(now, 1e9 + now, Progress())))]
    return None


def test_two_subnets_and_one_seed_every_core_finds_every_core() -> None:
    """Subnet A (a0..a4) and subnet B (b0..b4): within a subnet everyone knows everyone's address (mDNS);
    across, only a0 has b0 as a static seed. Routing works both ways (a router), discovery does not."""
    names = [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)]
    reach = {(x, y) for x in names for y in names if x != y}
    address = {n: addr(i + 1) for i, n in enumerate(sorted(names))}
    cores = {}
    for n in names:
        same = [address[m] for m in names if m[0] == n[0] and m != n]
        seeds = (*same, address["b0"]) if n == "a0" else tuple(same)
        cores[n] = core(n, static_peers=seeds)
    t = run_fleet(cores, reach, until_s=30.0)
    assert t is not None, {n: c.members() for n, c in cores.items()}
    assert t <= 2 * 2.0  # within two heartbeat intervals (in-memory calls take no time)
    # Without peer exchange the other subnet stays out of reach (but a0 and b0).
    off = {
        n: core(n, static_peers=cores[n].settings.static_peers, exchange=ExchangeSettings(enabled=False)) for n in names
    }
    assert run_fleet(off, reach, until_s=10.0) is None
    assert "a1" not in off["b1"].members()


# ------------------------------------------------------------------------------------------- real daemons
def tls(d: Path, node_id: str) -> dict[str, str]:
    return {"ca_file": str(d / "ca.pem"), "cert_file": str(d / f"{node_id}.pem"), "key_file": str(d / f"{node_id}.key")}


async def test_daemons_learn_each_other_from_a_common_seed_over_mutual_tls(tmp_path: Path) -> None:
    """a and c know only b (a static seed); over real gRPC with mutual TLS, b's Hellos name each to the other,
    and each dials the other expecting the certificate of the node id b named."""
    cluster = unique("px")
    ids = [f"{cluster}-{s}" for s in "abc"]
    certs.make_cluster(tmp_path / "pki", ids)
    common = {"membership.heartbeat_interval_s": 0.3, "train.epochs": 50}
    b = Node(fast_config(tmp_path, ids[1], security=tls(tmp_path / "pki", ids[1]), **common), stdout=io.StringIO())
    tasks = await start_nodes([b])
    seed = {"discovery.static_peers": [b.address], **common}
    a, c = (
        Node(fast_config(tmp_path, i, security=tls(tmp_path / "pki", i), **seed), stdout=io.StringIO())
        for i in (ids[0], ids[2])
    )
    tasks += await start_nodes([a, c])
    nodes = [a, b, c]
    try:
        await until(nodes, lambda: all(len(n.core.members()) == 2 for n in nodes), 20, "a full view on every peer")
        assert ids[2] in a.core.members() and ids[0] in c.core.members()
        assert a.core.exchange.learned + c.core.exchange.learned >= 1
    finally:
        await stop_nodes(nodes, tasks)
