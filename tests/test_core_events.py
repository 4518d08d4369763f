"""The protocol core driven alone, through its inputs, with `now` as an argument: no sockets, threads or clocks."""

from __future__ import annotations

import random

from peer.core.backoff import BreakerPolicy
from peer.core.catchup import CatchUpSettings
from peer.core.events import (
    CandidateFound,
    CandidateGone,
    CatchUpDone,
    CloseChannel,
    Deliver,
    Effect,
    Fatal,
    FetchDone,
    Forget,
    HelloAnswered,
    HelloFailed,
    HelloReceived,
    Log,
    PeerInfo,
    Progress,
    Reply,
    RequestCheckpoint,
    SayHello,
    SendFailed,
    SendOk,
    StartCatchUp,
    Started,
    StateReceived,
    Tick,
    ViewChanged,
    WriteMetrics,
)
from peer.core.gossip import GossipCore
from peer.core.peers import LivenessPolicy
from peer.core.settings import DUPLICATE_PREFIX, CoreSettings, Identity

PROTO = "peer.v1"
FP = "fp0"
ME = Identity("b", PROTO, FP, "cdl", incarnation=100)


def core(**kw: object) -> GossipCore:
    settings = CoreSettings(
        identity=ME,
        breaker=BreakerPolicy(threshold=2, base_s=1.0, cap_s=4.0),
        liveness=LivenessPolicy(heartbeat_interval_s=2.0, evict_after=3, probe_evicted_max_s=10.0),
        **kw,  # type: ignore[arg-type]
    )
    return GossipCore(settings, random.Random(0))


def started(c: GossipCore, now: float = 0.0, *, saved: float | None = None, epoch: float = 0.0) -> list[Effect]:
    return c.handle(Started(now, 1e9 + now, "127.0.0.1:5000", Progress(0, epoch, False), saved))


def info(node_id: str, *, incarnation: int = 1, degree: int = 2, epoch: float = 0.0, **kw: object) -> PeerInfo:
    fields: dict[str, object] = {
        "protocol_version": PROTO,
        "schema_fingerprint": FP,
        "algorithm": "cdl",
        "address": f"10.0.0.{ord(node_id[0])}:7000",
    }
    fields.update(kw)
    return PeerInfo(node_id=node_id, degree=degree, incarnation=incarnation, epoch=epoch, **fields)  # type: ignore[arg-type]


def push(sender: str, incarnation: int, now: float, *, address: str = "", identity: str | None = None) -> StateReceived:
    return StateReceived(sender, incarnation, 2, address or f"10.0.0.{ord(sender[0])}:7000", "", now, identity)


def of(effects: list[Effect], kind: type) -> list:  # type: ignore[type-arg]
    return [e for e in effects if isinstance(e, kind)]


def answer(c: GossipCore, out: list[Effect], now: float, *, incarnation: int = 1) -> list[Effect]:
    """Answer the core's join Hellos as the peers they were meant for (admission needs our own Hello answered)."""
    effects: list[Effect] = []
    for hello in of(out, SayHello):
        assert hello.purpose == "join" and hello.node_id is not None
        peer = info(hello.node_id, incarnation=incarnation, address=hello.address)
        effects += c.handle(HelloAnswered(hello.address, "join", peer, True, "", now))
    return effects


def test_a_received_state_from_unknown_departed_old_and_fresh_senders() -> None:
    c = core()
    started(c)
    # Unknown sender: delivered (the codec checked it; algorithms mix members only), but it joins only once its
    # address answers our own Hello.
    out = c.handle(push("a", 1, 1.0))
    assert of(out, Deliver) == [Deliver("a", 1, 2, 1.0)]
    assert c.neighbours() == [] and of(out, SayHello) == [SayHello("10.0.0.97:7000", "join", 5.0, "a")]
    assert of(out, Reply) == [Reply(True)]
    out = answer(c, out, 1.1)
    assert c.neighbours() == ["a"] and of(out, ViewChanged)
    # Same incarnation again: heard from, no new view.
    out = c.handle(push("a", 1, 2.0))
    assert of(out, Deliver) and not of(out, ViewChanged) and c.peers["a"].last_seen == 2.0
    # It says goodbye on mDNS: it leaves, and its cached state is forgotten.
    # Another cluster's "a" (a second demo on this host) says goodbye from its own address: ours stays.
    out = c.handle(CandidateGone("a", 2.5, "10.0.0.200:7000"))
    assert out == [] and c.neighbours() == ["a"]
    out = c.handle(CandidateGone("a", 3.0, "10.0.0.97:7000"))
    assert Forget("a") in out and c.neighbours() == []
    # A push of that departed incarnation still in flight is accepted on the wire but never delivered or re-added.
    out = c.handle(push("a", 1, 3.1))
    assert not of(out, Deliver) and "a" not in c.peers and of(out, Reply)[0].accepted
    # A fresh incarnation is welcome again (once it answers).
    out = c.handle(push("a", 2, 4.0))
    assert of(out, Deliver) and "a" not in c.peers
    answer(c, out, 4.1, incarnation=2)
    assert c.peers["a"].incarnation == 2
    # An old incarnation after a restart: the restarted peer is recognised, its old state is forgotten.
    c.handle(push("a", 3, 5.0, address="10.0.0.97:7001"))
    assert c.peers["a"].incarnation == 3
    out = c.handle(push("a", 4, 6.0, address="10.0.0.97:7002"))
    assert Forget("a") in out and CloseChannel("10.0.0.97:7001") in out
    assert any("restarted" in e.message for e in of(out, Log))


def test_a_push_that_contradicts_the_certificate_changes_nothing() -> None:
    c = core()
    started(c)
    out = c.handle(push("a", 1, 1.0, identity="mallory"))
    assert out == [of(out, Reply)[0]] and of(out, Reply)[0].status == "PERMISSION_DENIED"
    assert "a" not in c.peers
    out = c.handle(HelloReceived(info("a"), "ipv4:10.0.0.97:4000", 1.0, identity="mallory"))
    assert of(out, Reply)[0].status == "PERMISSION_DENIED" and "a" not in c.peers
    out = c.handle(push("a", 1, 2.0, identity="a"))
    assert of(out, Deliver) and of(out, SayHello)


def test_stale_peer_catch_up_decision() -> None:
    c = core(catchup=CatchUpSettings(max_state_age_s=60, max_epochs_behind=2.0, wait_s=10))
    # A fresh start (no checkpoint) is old: it waits for its neighbours' progress before training.
    assert not of(started(c, 0.0), CatchUpDone)
    out = c.handle(HelloAnswered("10.0.0.99:7000", "join", info("c", epoch=7.0), True, "", 0.5))
    assert of(out, StartCatchUp) == [StartCatchUp("c", "10.0.0.99:7000", 0, 7.0)]
    # One download at a time: a answering meanwhile decides nothing.
    out = c.handle(HelloAnswered("10.0.0.97:7000", "join", info("a", epoch=0.5), True, "", 0.6))
    assert not of(out, StartCatchUp) and not of(out, CatchUpDone)
    # The download fails: c's progress is forgotten until it reports again; a alone is not ahead: wait.
    out = c.handle(FetchDone("c", False, 1.0))
    assert not of(out, StartCatchUp) and not of(out, CatchUpDone)
    out = c.handle(HelloAnswered("10.0.0.99:7000", "heartbeat", info("c", epoch=7.2), True, "", 2.0, node_id="c"))
    assert of(out, StartCatchUp) == [StartCatchUp("c", "10.0.0.99:7000", 0, 7.2)]
    assert of(c.handle(FetchDone("c", True, 2.5)), CatchUpDone)
    # Done: later answers start nothing (our state is no longer old, and nobody is far ahead).
    out = c.handle(HelloAnswered("10.0.0.99:7000", "heartbeat", info("c", epoch=8.0), True, "", 4.0, node_id="c"))
    assert not of(out, StartCatchUp)


def test_catch_up_from_a_neighbour_far_ahead_and_timeout() -> None:
    c = core(catchup=CatchUpSettings(max_state_age_s=60, max_epochs_behind=2.0, wait_s=10))
    # A fresh checkpoint (saved a moment ago): only a neighbour more than 2 epochs ahead is worth fetching.
    started(c, 0.0, saved=1e9, epoch=5.0)
    out = c.handle(HelloAnswered("10.0.0.97:7000", "join", info("a", epoch=6.0), True, "", 0.1))
    assert of(out, CatchUpDone) == [CatchUpDone("no neighbour is ahead")]
    # Mid-run, a neighbour 3 epochs ahead makes a straggler catch up at the next progress check.
    c.handle(HelloAnswered("10.0.0.97:7000", "heartbeat", info("a", epoch=9.0), True, "", 1.9, node_id="a"))
    out = c.handle(Tick(2.0, 1e9 + 2.0, Progress(10, 5.5, False)))
    assert of(out, StartCatchUp) == [StartCatchUp("a", "10.0.0.97:7000", 0, 9.0)]
    out = c.handle(FetchDone("a", True, 2.5))
    assert of(out, CatchUpDone)

    lone = core(catchup=CatchUpSettings(wait_s=10))
    assert not of(started(lone, 0.0), CatchUpDone)
    assert not of(lone.handle(Tick(9.9, 1e9, Progress())), CatchUpDone)
    assert lone.next_deadline(9.9) <= 10.0
    out = lone.handle(Tick(10.0, 1e9, Progress()))
    assert of(out, CatchUpDone) and any("no neighbour ahead" in e.message for e in of(out, Log))


def test_mid_run_catch_up_only_behind_most_neighbours() -> None:
    c = core(catchup=CatchUpSettings(max_state_age_s=60, max_epochs_behind=2.0, wait_s=10))
    started(c, 0.0, saved=1e9, epoch=5.0)
    c.handle(HelloAnswered("10.0.0.97:7000", "join", info("a", epoch=5.0), True, "", 0.1))
    c.handle(HelloAnswered("10.0.0.100:7000", "join", info("d", epoch=5.0), True, "", 0.1))
    assert set(c.table.neighbours()) == {"a", "d"}
    # a raced ahead (uneven compute shares) while d trains at our pace: we train on with d.
    c.handle(HelloAnswered("10.0.0.97:7000", "heartbeat", info("a", epoch=9.0), True, "", 1.9, node_id="a"))
    c.handle(HelloAnswered("10.0.0.100:7000", "heartbeat", info("d", epoch=5.6), True, "", 1.9, node_id="d"))
    assert not of(c.handle(Tick(2.0, 1e9 + 2.0, Progress(10, 5.5, False))), StartCatchUp)
    # Behind both: we are the straggler, and take the most advanced model.
    c.handle(HelloAnswered("10.0.0.100:7000", "heartbeat", info("d", epoch=8.0), True, "", 3.9, node_id="d"))
    out = c.handle(Tick(4.0, 1e9 + 4.0, Progress(12, 5.6, False)))
    assert of(out, StartCatchUp) == [StartCatchUp("a", "10.0.0.97:7000", 0, 9.0)]


def test_no_catch_up_without_discovery_or_for_step_mode_mid_run() -> None:
    c = core(catchup=CatchUpSettings(can_fetch=False))
    assert of(started(c), CatchUpDone)
    s = core(catchup=CatchUpSettings(mid_run=False, max_epochs_behind=1.0), static_peers=())
    started(s, 0.0, saved=1e9)
    s.handle(HelloAnswered("10.0.0.97:7000", "join", info("a", epoch=0.0), True, "", 0.1))
    s.handle(HelloAnswered("10.0.0.97:7000", "heartbeat", info("a", epoch=9.0), True, "", 1.0, node_id="a"))
    assert not of(s.handle(Tick(2.0, 1e9, Progress(0, 0.0, False))), StartCatchUp)


def test_hello_in_admits_compatible_peers_and_refuses_others() -> None:
    c = core()
    started(c)
    out = c.handle(HelloReceived(info("a", address="0.0.0.0:7000"), "ipv4:10.1.2.3:4000", 1.0))
    assert of(out, Reply) == [Reply(True)] and "a" not in c.peers
    # An unspecified advertised host: dial the caller's IP; the peer joins when that answers.
    assert of(out, SayHello) == [SayHello("10.1.2.3:7000", "join", 5.0, "a")]
    answer(c, out, 1.1)
    assert c.peers["a"].address == "10.1.2.3:7000"
    out = c.handle(HelloReceived(info("x", schema_fingerprint="other"), "ipv4:10.1.2.4:4000", 1.0))
    assert not of(out, Reply)[0].accepted and "schema fingerprint" in of(out, Reply)[0].reason
    assert "x" not in c.peers


def test_duplicate_node_id_the_later_daemon_gives_way() -> None:
    c = core()
    started(c)
    # A Hello claiming our id is answered with a refusal and checked by dialling the claimed address; only a
    # daemon with our id and another incarnation answering there counts.
    older = c.handle(HelloReceived(info("b", incarnation=50), "ipv4:10.0.0.5:4000", 1.0))
    assert of(older, Reply)[0].reason.startswith(DUPLICATE_PREFIX) and not of(older, Fatal)
    assert of(older, SayHello) == [SayHello("10.0.0.98:7000", "verify", 5.0, "b")]
    confirmed = c.handle(HelloAnswered("10.0.0.98:7000", "verify", info("b", incarnation=50), False, "dup", 1.5))
    assert of(confirmed, Fatal)
    newer = c.handle(HelloReceived(info("b", incarnation=500), "ipv4:10.0.0.5:4000", 1.0))
    newer += c.handle(HelloAnswered("10.0.0.98:7000", "verify", info("b", incarnation=500), False, "dup", 1.5))
    assert not of(newer, Fatal) and of(newer, Log)
    answer = HelloAnswered("10.0.0.5:7000", "join", info("b", incarnation=50), False, f"{DUPLICATE_PREFIX} 'b'", 2.0)
    assert of(c.handle(answer), Fatal)


def test_candidates_are_greeted_once_and_other_clusters_ignored() -> None:
    c = core(cluster="lab")
    started(c)
    out = c.handle(CandidateFound("10.0.0.97:7000", "a", "mdns", 0.1, cluster="lab"))
    assert of(out, SayHello) == [SayHello("10.0.0.97:7000", "join", 5.0, "a")]
    assert not c.handle(CandidateFound("10.0.0.97:7000", "a", "mdns", 0.2, cluster="lab"))  # in flight
    out = c.handle(CandidateFound("10.0.0.98:7000", "z", "mdns", 0.2, cluster="other"))
    assert not of(out, SayHello) and "cluster" in of(out, Log)[0].message
    assert not c.handle(CandidateFound("127.0.0.1:5000", "b", "mdns", 0.2, cluster="lab"))  # ourselves
    c.handle(HelloFailed("10.0.0.97:7000", "join", "UNAVAILABLE", "down", 0.3, "a"))
    assert of(c.handle(CandidateFound("10.0.0.97:7000", "a", "mdns", 0.4, cluster="lab")), SayHello)


def test_static_peers_are_redialled_until_they_answer() -> None:
    c = core(static_peers=("10.0.0.9:7000",), hello_retry_s=2.0)
    assert of(started(c, 0.0), SayHello) == [SayHello("10.0.0.9:7000", "join", 5.0, None)]
    c.handle(HelloFailed("10.0.0.9:7000", "join", "UNAVAILABLE", "down", 0.5))
    assert not of(c.handle(Tick(1.0, 1e9, Progress())), SayHello)
    assert of(c.handle(Tick(2.0, 1e9, Progress())), SayHello)
    c.handle(HelloAnswered("10.0.0.9:7000", "join", info("s", address="10.0.0.9:7000"), True, "", 2.1))
    assert not of(c.handle(Tick(4.1, 1e9, Progress())), SayHello) or all(
        e.purpose == "heartbeat" for e in of(c.handle(Tick(4.2, 1e9, Progress())), SayHello)
    )


def test_heartbeats_evict_after_misses_and_readmit_on_answer() -> None:
    c = core()
    started(c)
    answer(c, c.handle(push("a", 1, 0.0)), 0.0)
    probes = of(c.handle(Tick(2.0, 1e9, Progress())), SayHello)
    assert probes == [SayHello("10.0.0.97:7000", "heartbeat", 2.0, "a")]
    assert not of(c.handle(Tick(2.1, 1e9, Progress())), SayHello)  # one probe in flight at a time
    now = 2.0
    for miss in range(3):
        out = c.handle(HelloFailed("10.0.0.97:7000", "heartbeat", "DEADLINE_EXCEEDED", "", now, "a"))
        if miss < 2:
            now += 2.0
            assert of(c.handle(Tick(now, 1e9, Progress())), SayHello)
    assert Forget("a") in out and c.neighbours() == [] and c.evictions == 1
    assert c.state_of("a", now) == "evicted"
    out = c.handle(push("a", 1, now + 1))
    assert c.neighbours() == ["a"] and c.readmissions == 1 and of(out, ViewChanged)


def test_send_outcomes_drive_the_breaker_and_warnings() -> None:
    c = core(topology="full")
    started(c)
    answer(c, c.handle(push("a", 1, 0.0)), 0.0)
    assert c.sends_due(0.0, 1) == ["a"]
    c.handle(SendFailed("a", "UNAVAILABLE", 0.1, detail="push to a: UNAVAILABLE"))
    out = c.handle(SendFailed("a", "UNAVAILABLE", 0.2, detail="push to a: UNAVAILABLE"))
    assert of(out, Log)[0].key == ("send", "a") and "skipping a" in of(out, Log)[0].message
    assert not c.may_send("a", 0.3) and c.sends_due(0.3, 1) == []
    assert c.next_deadline(0.3) <= c.peers["a"].breaker.open_until
    c.handle(SendOk("a", 1, 5.0))
    assert c.may_send("a", 5.0) and c.sends_due(5.0, 1) == []


def test_timers_ask_for_checkpoints_and_metrics() -> None:
    c = core(checkpoint_interval_s=10.0, metrics_interval_s=1.0)
    started(c, 0.0)
    assert c.next_deadline(0.0) == 1.0
    out = c.handle(Tick(1.0, 1e9, Progress()))
    assert of(out, WriteMetrics) and not of(out, RequestCheckpoint)
    out = c.handle(Tick(10.0, 1e9, Progress()))
    assert of(out, RequestCheckpoint)


def test_a_time_varying_topology_changes_graph_on_the_shared_clock() -> None:
    c = core(topology="one-peer-exponential", topology_period_s=1.0)
    started(c, 0.0)
    for n in "acdefgh":
        answer(c, c.handle(push(n, 1, 0.0)), 0.0)
    first = c.neighbours()
    wall = 1e9 + 0.5
    c.handle(Tick(0.5, wall, Progress()))
    assert c.next_deadline(0.5) <= 1.0  # the next graph starts at the next whole second of the wall clock
    out = c.handle(Tick(1.0, wall + 0.5, Progress()))
    assert c.neighbours() != first and of(out, ViewChanged)


def test_a_live_peer_reachable_by_two_addresses_keeps_one_channel() -> None:
    """Compose's start-up rejects: a static peer known by its service name ("peer1:7000") that advertises its IP.
    Its own Hellos (and mDNS) confirm the IP, the static re-dial confirms the name. Each switch of the record's
    address closed the channel in use, cancelling the pushes in flight on it, which the receiver then logged as
    truncated streams. A live member with the same incarnation keeps the address in use; the other one that
    answered as it is remembered, so neither is dialled again."""
    c = core(static_peers=("peer1:7000",), hello_retry_s=2.0)
    started(c, 0.0)
    ip = "10.0.0.9:7000"
    peer1 = info("s", address=ip)
    out = c.handle(HelloAnswered("peer1:7000", "join", peer1, True, "", 0.1))
    assert c.peers["s"].address == "peer1:7000" and of(out, ViewChanged)
    closed: list[Effect] = []
    dialled: list[SayHello] = []
    now = 0.1
    for _ in range(5):
        now += 1.0
        # Its heartbeat reaches us from its IP; we confirm that address with our own Hello.
        out = c.handle(HelloReceived(peer1, "ipv4:10.0.0.9:41000", now))
        for hello in of(out, SayHello):
            out += c.handle(HelloAnswered(hello.address, hello.purpose, peer1, True, "", now, node_id=hello.node_id))
        # mDNS announces it at its IP.
        out += c.handle(CandidateFound(ip, "s", "mdns", now))
        for hello in of(out, SayHello):
            out += c.handle(HelloAnswered(hello.address, hello.purpose, peer1, True, "", now, node_id=hello.node_id))
        now += 1.0
        # The static re-dial timer.
        tick = c.handle(Tick(now, 1e9 + now, Progress()))
        for hello in of(tick, SayHello):
            if hello.purpose == "join":
                dialled.append(hello)
            tick += c.handle(HelloAnswered(hello.address, hello.purpose, peer1, True, "", now, node_id=hello.node_id))
        closed += of(out + tick, CloseChannel)
    assert closed == [], closed
    assert c.peers["s"].address == "peer1:7000"
    assert dialled == [], "a static address that answers as a live member is not re-dialled"
    assert c.neighbours() == ["s"] and c.state_of("s", now) == "alive"
    # A restart (new incarnation) at the other address moves the peer there, and the old channel closes.
    out = c.handle(HelloAnswered(ip, "join", info("s", address=ip, incarnation=2), True, "", now + 1))
    assert c.peers["s"].address == ip and CloseChannel("peer1:7000") in out
