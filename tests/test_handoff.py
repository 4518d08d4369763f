"""The training thread's handoff of payloads to the event loop (peer.daemon.handoff), with a real loop and a real
thread, and in a real daemon: the loop gets the newest payload, and is not woken once per training round."""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path

import pytest

from peer.daemon.handoff import LatestHandoff
from peer.daemon.node import Node
from tests.helpers import fast_config, unique


async def test_the_loop_gets_the_newest_value_and_far_fewer_callbacks_than_values() -> None:
    got: list[int] = []
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    def deliver(v: int) -> None:
        got.append(v)
        if v == 9_999:
            done.set()

    box: LatestHandoff[int] = LatestHandoff(lambda: loop, deliver)
    producer = threading.Thread(target=lambda: [box.put(i) for i in range(10_000)])
    producer.start()
    await asyncio.to_thread(producer.join)
    await asyncio.wait_for(done.wait(), 10)
    assert got == sorted(got) and len(set(got)) == len(got), "newer values only, each once"
    assert got[-1] == 9_999 and box.puts == 10_000
    assert box.deliveries == len(got) < 10_000


async def test_an_unwanted_value_waits_to_be_taken_and_never_wakes_the_loop() -> None:
    loop = asyncio.get_running_loop()
    got: list[str] = []
    delivered = asyncio.Event()

    def deliver(v: str) -> None:
        got.append(v)
        delivered.set()

    box: LatestHandoff[str] = LatestHandoff(lambda: loop, deliver)
    assert box.want(False) is False
    await asyncio.to_thread(lambda: [box.put(s) for s in ("a", "b", "c")])
    await asyncio.to_thread(lambda: None)  # a callback scheduled by those puts would have run by now
    assert got == [] and box.deliveries == 0
    assert box.want(True) is True, "a value is waiting: take it rather than wait for a callback"
    assert box.take() == "c" and box.take() is None
    await asyncio.to_thread(box.put, "d")
    await asyncio.wait_for(delivered.wait(), 10)
    assert got == ["d"]


@pytest.mark.timeout(120)
async def test_a_daemon_without_neighbours_does_not_wake_its_loop_for_every_round(tmp_path: Path) -> None:
    """Before the handoff, every round scheduled a loop callback: an isolated daemon's loop took a fifth of a core
    and training lost as much (4,100 against 6,200 steps/s in scripts/bench_hostile.py's unloaded daemon)."""
    cfg = fast_config(tmp_path, unique("alone"), train={"epochs": 20, "steps_per_round": 1, "round_interval_s": 0.0})
    node = Node(cfg, stdout=io.StringIO())
    task = asyncio.create_task(node.run())
    try:
        await asyncio.wait_for(node.trained.wait(), 90)
        box = node.pusher.handoff
        assert box.puts >= 100, f"only {box.puts} payloads published"
        assert box.deliveries <= 3, f"{box.deliveries} loop callbacks for {box.puts} payloads with no neighbour"
    finally:
        node.request_stop()
        await asyncio.wait_for(task, 30)


@pytest.mark.timeout(120)
async def test_a_push_that_ends_frees_its_link_so_the_next_payload_wakes_the_loop(tmp_path: Path) -> None:
    """While every link is busy the training thread's payloads do not wake the loop; the end of a push must turn
    that back on. When it did not, a paced peer's next state waited for the pusher's 50 ms retry poll: two peers in
    lockstep waited 12 s instead of 2 to 6 (tests/test_pacing_daemons.py, the lost-message case)."""
    cfg = fast_config(tmp_path, unique("link"), train={"epochs": 0.05})
    node = Node(cfg, stdout=io.StringIO())
    task = asyncio.create_task(node.run())
    try:
        await asyncio.wait_for(node.ready.wait(), 60)
        box = node.pusher.handoff
        box.want(False)  # as while a push is in flight on every link
        node.pusher.in_flight.add("gone")
        await node.pusher.push("gone", 1, (None, [], 0))  # a neighbour that left: the push ends at once
        assert "gone" not in node.pusher.in_flight
        before = box.deliveries
        await asyncio.to_thread(box.put, node.pusher.outbox)  # type: ignore[arg-type]
        await node.wait_for(lambda: box.deliveries > before, 10, "the loop to be woken by the next payload")
    finally:
        node.request_stop()
        await asyncio.wait_for(task, 30)
