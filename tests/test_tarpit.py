"""The tarpit (peer.core.tarpit): refusals to a connection that keeps being refused are held before they are
answered, so that a client looping on refused calls slows down instead of costing the daemon CPU, while a legit
peer's pushes and a status request from the same host go on as before. Bookkeeping first, then a real daemon
on loopback with a real legit peer."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import grpc
import pytest

from peer.core.tarpit import HOLD_OVERHEAD_BYTES, Tarpit, TarpitSettings
from peer.daemon.node import Node
from peer.net.server import GossipServicer
from peer.tools.status import fetch_status
from tests.helpers import fast_config, start_nodes, stop_nodes, unique, until

SERVICE = "/peer.v1.GossipService/"
GARBAGE = b"\xff\xff\xff\xff\x0f"  # not a protobuf message of any type


def test_free_refusals_per_connection_then_held_until_released() -> None:
    pit = Tarpit(TarpitSettings(delay_s=2.0, free_refusals=3, free_refusals_per_source=100, window_s=60.0))
    assert [pit.hold("c1", "h", 0, 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert pit.hold("c1", "h", 100, 0.0) == 2.0
    assert (pit.held, pit.held_bytes, pit.total_held) == (1, HOLD_OVERHEAD_BYTES + 100, 1)
    assert pit.hold("c2", "h", 0, 0.0) == 0.0, "another connection of the same host has its own free refusals"
    pit.release("c1", 100)
    assert (pit.held, pit.held_bytes, pit.connections_held()) == (0, 0, 0)
    assert pit.hold("c1", "h", 0, 20.0) == 0.0, "one free refusal comes back every window_s / free_refusals"
    assert pit.hold("c1", "h", 0, 20.0) == 2.0


def test_a_host_that_opens_connection_after_connection_is_held_too() -> None:
    pit = Tarpit(TarpitSettings(free_refusals=10, free_refusals_per_source=5))
    answers = [pit.hold(f"conn-{i}", "h", 0, 0.0) for i in range(8)]
    assert answers == [0.0] * 5 + [2.0] * 3
    assert pit.hold("conn-x", "other-host", 0, 0.0) == 0.0


def test_holds_are_bounded_per_connection_in_number_and_in_bytes() -> None:
    s = TarpitSettings(free_refusals=1, free_refusals_per_source=1, max_held=5, max_held_per_connection=2)
    pit = Tarpit(s)
    pit.hold("a", "h", 0, 0.0)  # the free one
    assert [pit.hold("a", "h", 0, 0.0) for _ in range(3)] == [2.0, 2.0, 0.0], "per connection"
    assert [pit.hold(f"b{i}", "h", 0, 0.0) for i in range(4)] == [2.0, 2.0, 2.0, 0.0], "in total"
    small = Tarpit(TarpitSettings(free_refusals=1, free_refusals_per_source=1, max_held_bytes=3 * HOLD_OVERHEAD_BYTES))
    small.hold("a", "h", 0, 0.0)
    assert small.hold("a", "h", HOLD_OVERHEAD_BYTES, 0.0) == 2.0
    assert small.hold("b", "h", HOLD_OVERHEAD_BYTES, 0.0) == 0.0, "in bytes"
    off = Tarpit(TarpitSettings(delay_s=0, free_refusals=1))
    assert [off.hold("a", "h", 0, 0.0) for _ in range(5)] == [0.0] * 5, "delay_s 0: never held"


def test_holds_end_together_on_a_grid_so_that_held_calls_cost_few_loop_wake_ups() -> None:
    pit = Tarpit(TarpitSettings(delay_s=2.0, free_refusals=1, free_refusals_per_source=100, release_grid_s=0.25))
    pit.hold("c", "h", 0, 0.0)  # the free one
    arrivals = [0.01, 0.1, 0.13, 0.2499, 0.25]
    ends = [t + pit.hold("c", "h", 0, t) for t in arrivals]
    assert ends[:4] == pytest.approx([2.25] * 4) and ends[4] == pytest.approx(2.25)
    assert all(2.0 <= e - t <= 2.25 + 1e-9 for e, t in zip(ends, arrivals, strict=True)), (
        "held delay_s, at most a grid more"
    )
    exact = Tarpit(TarpitSettings(delay_s=2.0, free_refusals=1, release_grid_s=0))
    exact.hold("c", "h", 0, 0.0)
    assert exact.hold("c", "h", 0, 0.13) == 2.0


def test_remembered_keys_are_bounded() -> None:
    pit = Tarpit(TarpitSettings(max_keys=16))
    for i in range(1000):
        pit.hold(f"conn-{i}", f"host-{i}", 0, float(i))
    assert len(pit._by_connection) <= 16 and len(pit._by_source) <= 16


HOLD_S = 60.0  # far longer than the test: a held call still held at the end was held all along
FREE = 3


@pytest.mark.timeout(120)
async def test_a_looping_abuser_is_held_while_a_legit_peer_pushes_and_status_answers(tmp_path: Path) -> None:
    victim = Node(
        fast_config(
            tmp_path,
            unique("victim"),
            train={"epochs": 1000},
            gossip={"tarpit_delay_s": HOLD_S, "tarpit_free_refusals": FREE},
        ),
        stdout=io.StringIO(),
    )
    tasks = await start_nodes([victim])
    legit = Node(
        fast_config(tmp_path, unique("legit"), train={"epochs": 1000}, discovery={"static_peers": [victim.address]}),
        stdout=io.StringIO(),
    )
    tasks += await start_nodes([legit])
    assert victim._server is not None
    servicer: GossipServicer = victim._server.servicer
    # Its own connection (gRPC shares one between channels of a process with the same options).
    abuser = grpc.aio.insecure_channel(victim.address, options=[("grpc.use_local_subchannel_pool", 1)])
    answered = 0

    async def abuse() -> None:
        """A client that loops on an undecodable request and awaits each answer, as a script would."""
        nonlocal answered
        while True:
            try:
                await abuser.unary_unary(SERVICE + "GetStatus")(GARBAGE, timeout=2 * HOLD_S)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
            answered += 1

    try:
        await until([victim], lambda: victim.core.neighbours() == [legit.cfg.node_id], 30, "victim to admit legit")
        loop = asyncio.create_task(abuse())
        await until([victim], lambda: servicer.tarpit.held == 1, 30, "the abuser's refusal to be held")
        assert answered == FREE, "the free refusals were answered at once, the next one is held"
        received = victim.counters.snapshot()["messages_received"]
        await until(
            [victim],
            lambda: victim.counters.snapshot()["messages_received"] >= received + 5,
            30,
            "legit's pushes to land while the abuser waits",
        )
        status = await fetch_status(victim.address)  # `peer status` from the same host, another connection
        assert status["node_id"] == victim.cfg.node_id
        assert answered == FREE and servicer.tarpit.held == 1 and not loop.done(), (
            "the abuser sent one request in all that time"
        )
        assert servicer.tarpit.total_held == 1
        assert victim.counters.rejected["undecodable"] == FREE + 1
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await abuser.close()
        await until([victim], lambda: servicer.tarpit.held == 0, 30, "the hold to end with the abuser's call")
        assert servicer.tarpit.held_bytes == 0
    finally:
        await abuser.close()
        await stop_nodes([victim, legit], tasks)
