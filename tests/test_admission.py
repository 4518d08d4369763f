"""Admission under hostile input, in the pure core: no remote claim stops the daemon, the peer table and every
per-source structure stay bounded, and refusals are logged quietly. `now` is an argument: no sockets or clocks."""

from __future__ import annotations

import random

from peer.core.admission import (
    AdmissionSettings,
    RateLimiter,
    RefusalLog,
    StreamSlots,
    clip,
    source_of,
    stream_deadline_s,
    valid_node_id,
)
from peer.core.events import (
    Effect,
    Fatal,
    HelloAnswered,
    HelloFailed,
    HelloReceived,
    PeerInfo,
    Progress,
    Refused,
    Reply,
    SayHello,
    Started,
    Tick,
)
from peer.core.gossip import GossipCore
from peer.core.peers import LivenessPolicy
from peer.core.settings import DUPLICATE_PREFIX, CoreSettings, Identity

ME = Identity("victim", "peer.v1", "fp0", "cdl", incarnation=1_000)


def core(**admission: object) -> GossipCore:
    settings = CoreSettings(
        identity=ME,
        topology="full",
        liveness=LivenessPolicy(heartbeat_interval_s=2.0, evict_after=1, probe_evicted_max_s=10.0),
        admission=AdmissionSettings(**admission),  # type: ignore[arg-type]
    )
    c = GossipCore(settings, random.Random(0))
    c.handle(Started(0.0, 1e9, "127.0.0.1:5000", Progress()))
    return c


def info(node_id: str, address: str, *, incarnation: int = 1) -> PeerInfo:
    return PeerInfo(node_id, "peer.v1", "fp0", "cdl", 1, address, incarnation)


def of(effects: list[Effect], kind: type) -> list:  # type: ignore[type-arg]
    return [e for e in effects if isinstance(e, kind)]


# ------------------------------------------------------------------------------------- the kill switch
def test_a_hello_claiming_our_id_from_an_address_that_does_not_answer_changes_nothing() -> None:
    """The issue's reproduction: our node id, incarnation 1, our fingerprint, and an address that never answers."""
    c = core()
    claim = HelloReceived(info("victim", "127.0.0.1:1"), "ipv4:127.0.0.1:40000", 1.0)
    out = c.handle(claim)
    assert not of(out, Fatal)
    assert of(out, Reply)[0].reason.startswith(DUPLICATE_PREFIX)  # a real twin learns of us
    assert of(out, SayHello) == [SayHello("127.0.0.1:1", "verify", 5.0, "victim")]
    assert not of(c.handle(claim), SayHello), "one check per address at a time"
    out = c.handle(HelloFailed("127.0.0.1:1", "verify", "UNAVAILABLE", "connection refused", 1.2))
    assert not of(out, Fatal)
    assert [r.reason for r in of(out, Refused)] == ["duplicate_unverified"]
    assert not c.peers and not c.verifying


def test_a_claim_answered_by_someone_else_or_by_ourselves_is_refused() -> None:
    c = core()
    c.handle(HelloReceived(info("victim", "10.0.0.9:7000"), "ipv4:10.0.0.9:4000", 1.0))
    out = c.handle(HelloAnswered("10.0.0.9:7000", "verify", info("other", "10.0.0.9:7000"), True, "", 1.1))
    assert not of(out, Fatal) and of(out, Refused)
    # A claim that points at our own address, or carries our own incarnation, is no twin at all.
    out = c.handle(HelloReceived(info("victim", "127.0.0.1:5000"), "ipv4:127.0.0.1:4000", 1.2))
    assert not of(out, Fatal) and not of(out, SayHello) and of(out, Refused)
    out = c.handle(HelloReceived(info("victim", "10.0.0.9:7000", incarnation=ME.incarnation), "ipv4:1.2.3.4:1", 1.3))
    assert of(out, Reply) == [Reply(True)] and not of(out, SayHello)


def test_a_duplicate_refusal_from_a_daemon_with_another_id_is_not_a_duplicate() -> None:
    c = core()
    c.handle(HelloReceived(info("a", "10.0.0.1:7000"), "ipv4:10.0.0.1:4000", 1.0))
    answer = HelloAnswered("10.0.0.1:7000", "join", info("a", "10.0.0.1:7000"), False, f"{DUPLICATE_PREFIX} 'x'", 1.1)
    assert not of(c.handle(answer), Fatal)


def test_a_verified_twin_that_started_first_stops_us() -> None:
    c = core()
    c.handle(HelloReceived(info("victim", "10.0.0.9:7000", incarnation=5), "ipv4:10.0.0.9:4000", 1.0))
    out = c.handle(
        HelloAnswered("10.0.0.9:7000", "verify", info("victim", "10.0.0.9:7000", incarnation=5), False, "", 1.1)
    )
    assert of(out, Fatal) and "already uses node_id" in of(out, Fatal)[0].message


# --------------------------------------------------------------------------------- admission and bounds
def test_a_thousand_hostile_hellos_leave_the_table_empty_and_every_structure_bounded() -> None:
    c = core(max_pending=64, hello_rate_per_s=50.0, hello_burst=100, dial_burst=100)
    dials: list[SayHello] = []
    refused: dict[str, int] = {}
    for i in range(1000):
        out = c.handle(
            HelloReceived(info(f"fake-{i}", f"10.9.{i // 250}.{i % 250}:1"), "ipv4:6.6.6.6:1", 1.0 + i * 1e-3)
        )
        dials += of(out, SayHello)
        for r in of(out, Refused):
            refused[r.reason] = refused.get(r.reason, 0) + 1
        assert len(c.hellos_in_flight) + len(c.verifying) <= 64
    assert not c.peers, "no Hello alone makes a member"
    assert len(dials) == 64 and refused["hello_rate"] >= 850 and refused["pending_full"] >= 1
    for d in dials:
        c.handle(HelloFailed(d.address, "join", "UNAVAILABLE", "refused", 3.0))
    assert not c.peers and not c.hellos_in_flight and not c.catchup.progress


def test_hellos_that_would_make_us_dial_have_their_own_smaller_budget_and_members_do_not_spend_it() -> None:
    c = core(dial_rate_per_s=10.0, dial_burst=5, hello_rate_per_s=1000.0, hello_burst=1000)
    src = "ipv4:6.6.6.6:1"
    outs = [c.handle(HelloReceived(info(f"fake-{i}", f"10.9.0.{i}:1"), src, 1.0)) for i in range(8)]
    assert sum(len(of(o, SayHello)) for o in outs) == 5
    refused = [r for o in outs for r in of(o, Refused)]
    assert [r.reason for r in refused] == ["dial_rate"] * 3
    assert all(of(o, Reply)[0].status == "RESOURCE_EXHAUSTED" for o in outs[5:])
    # A claim on our own id costs a dial too (the check of the claim), so it draws on the same budget.
    out = c.handle(HelloReceived(info("victim", "10.9.0.99:1", incarnation=7), src, 1.0))
    assert not of(out, SayHello) and of(out, Refused)[0].reason == "dial_rate"
    # Another source host has its own budget; the budget refills at its rate.
    assert of(c.handle(HelloReceived(info("other", "10.8.0.1:1"), "ipv4:7.7.7.7:1", 1.0)), SayHello)
    assert of(c.handle(HelloReceived(info("fake-9", "10.9.0.9:1"), src, 1.2)), SayHello)
    # A member greeting from the address we confirmed is not a dial: it never spends the budget.
    c.handle(HelloAnswered("10.8.0.1:1", "join", info("other", "10.8.0.1:1"), True, "", 1.3))
    assert "other" in c.peers
    for k in range(50):
        out = c.handle(HelloReceived(info("other", "10.8.0.1:1"), "ipv4:7.7.7.7:1", 1.3 + k * 1e-4))
        assert of(out, Reply)[0].accepted and not of(out, Refused)


def test_unconfirmed_hellos_expire() -> None:
    c = core(pending_ttl_s=30.0)
    c.handle(HelloReceived(info("a", "10.0.0.1:7000"), "ipv4:10.0.0.1:4000", 1.0))
    assert "10.0.0.1:7000" in c.hellos_in_flight
    c.handle(Tick(20.0, 1e9, Progress()))
    assert c.hellos_in_flight
    c.handle(Tick(31.5, 1e9, Progress()))
    assert not c.hellos_in_flight


def test_the_table_is_bounded_and_an_evicted_record_gives_way() -> None:
    c = core(max_peers=3)

    def admit(node_id: str, address: str, now: float) -> list[Effect]:
        c.handle(HelloReceived(info(node_id, address), f"ipv4:{address}", now))
        return c.handle(HelloAnswered(address, "join", info(node_id, address), True, "", now))

    for n in range(3):
        admit(f"p{n}", f"10.0.0.{n}:7000", 1.0)
    out = admit("p3", "10.0.0.3:7000", 1.0)
    assert sorted(c.peers) == ["p0", "p1", "p2"] and [r.reason for r in of(out, Refused)] == ["table_full"]
    c.handle(HelloFailed("10.0.0.1:7000", "heartbeat", "UNAVAILABLE", "", 3.0, "p1"))  # evict_after=1
    assert c.peers["p1"].evicted
    admit("p3", "10.0.0.3:7000", 4.0)
    assert sorted(c.peers) == ["p0", "p2", "p3"]


def test_a_member_greeting_again_from_its_confirmed_address_stays_a_member() -> None:
    c = core()
    c.handle(HelloReceived(info("a", "10.0.0.1:7000"), "ipv4:10.0.0.1:4000", 1.0))
    c.handle(HelloAnswered("10.0.0.1:7000", "join", info("a", "10.0.0.1:7000"), True, "", 1.1))
    out = c.handle(HelloReceived(info("a", "10.0.0.1:7000"), "ipv4:10.0.0.1:4000", 5.0))
    assert of(out, Reply) == [Reply(True)] and not of(out, SayHello) and c.peers["a"].last_seen == 5.0
    # The same id from another address must prove itself there first.
    out = c.handle(HelloReceived(info("a", "10.0.0.66:7000"), "ipv4:10.0.0.66:4000", 6.0))
    assert of(out, SayHello) and c.peers["a"].address == "10.0.0.1:7000"


# ------------------------------------------------------------------------------------------- the pieces
def test_rate_limiter_bursts_refills_and_stays_bounded() -> None:
    r = RateLimiter(rate_per_s=2.0, burst=3, max_keys=10)
    assert [r.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert r.allow("b", 0.0)  # per key
    assert not r.allow("a", 0.2) and r.allow("a", 0.5)
    for i in range(100):
        r.allow(f"k{i}", 1.0)
    assert len(r) == 10


def test_refusal_log_once_per_key_per_interval_with_a_count_and_a_line_budget() -> None:
    log = RefusalLog(interval_s=60.0, max_keys=100, max_lines=5)
    assert log.should_log(("a", "undecodable"), 0.0) == 1
    assert [log.should_log(("a", "undecodable"), t) for t in (1.0, 2.0, 3.0)] == [0, 0, 0]
    assert log.should_log(("a", "hello_rate"), 3.0) == 1  # another reason is another line
    assert log.should_log(("a", "undecodable"), 61.0) == 4  # one line standing for 4 refusals
    lines = sum(1 for i in range(1000) if log.should_log((f"src{i}", "undecodable"), 62.0))
    assert lines <= 5 and log.suppressed >= 995 and len(log._keys) <= 100


def test_stream_slots_per_source_and_in_total() -> None:
    slots = StreamSlots(max_total=3, max_per_source=2)
    assert slots.acquire("a") == "" and slots.acquire("a") == ""
    assert "from a" in slots.acquire("a")
    assert slots.acquire("b") == "" and "too many" in slots.acquire("c")
    slots.release("a")
    assert slots.acquire("c") == ""
    for s in ("a", "b", "c"):
        slots.release(s)
    assert slots.total == 0 and not slots.open


def test_echo_is_clipped_and_sources_are_hosts() -> None:
    assert len(clip("x" * 100_000)) <= 200 and clip("short") == "short"
    assert source_of("ipv4:10.1.2.3:4567") == "10.1.2.3"
    assert source_of("ipv6:[::1]:4567") == "::1"
    assert valid_node_id("peer-1") and not valid_node_id("") and not valid_node_id("x" * 64)
    assert not valid_node_id("a b") and not valid_node_id("x" * 100_000)
    assert stream_deadline_s(2_000_000, 5.0, 1e6) == 7.0
