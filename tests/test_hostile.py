"""A real daemon on loopback against hostile clients over real gRPC: the one-message kill switch, a flood of
made-up Hellos, undecodable bytes on every RPC, stalled and surplus Push streams, and oversized fields. The daemon
keeps serving and training, its table stays bounded, its log stays quiet, and no answer echoes unbounded input."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import torch

from peer import PROTOCOL_VERSION
from peer.daemon.node import Node
from peer.net.encoder import encode
from peer.net.wire import Envelope, Payload
from peer.v1 import gossip_pb2, gossip_pb2_grpc
from tests.helpers import fast_config, start_nodes, stop_nodes, unique, until

pytestmark = pytest.mark.timeout(90)

IDLE_S = 0.5  # gossip.stream_idle_s here; the default is 10 s
PER_PEER = 4  # gossip.max_streams_per_peer here
SERVICE = "/peer.v1.GossipService/"
GARBAGE = b"\xff\xff\xff\xff\x0f"  # not a protobuf message of any type


@pytest.fixture
async def victim(tmp_path: Path) -> AsyncIterator[Node]:
    cfg = fast_config(
        tmp_path,
        unique("victim"),
        train={"epochs": 1000},  # keeps training for the whole test
        gossip={
            "stream_idle_s": IDLE_S,
            "max_streams_per_peer": PER_PEER,
            "max_streams": 2 * PER_PEER,
            # Refusals are held briefly here, so that 1,000 of them take seconds; test_tarpit.py proves the hold.
            "tarpit_delay_s": 0.1,
        },
    )
    node = Node(cfg, stdout=io.StringIO())
    tasks = await start_nodes([node])
    try:
        yield node
    finally:
        await stop_nodes([node], tasks, return_exceptions=True)


def hello(node: Node, node_id: str, address: str, incarnation: int = 1) -> gossip_pb2.HelloRequest:
    return gossip_pb2.HelloRequest(
        node_id=node_id,
        protocol_version=PROTOCOL_VERSION,
        schema_fingerprint=node.fingerprint,
        algorithm=node.algorithm.name,
        degree=1,
        address=address,
        incarnation=incarnation,
    )


async def code_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def still_serving_and_training(node: Node, stub: gossip_pb2_grpc.GossipServiceStub) -> None:
    status = await stub.GetStatus(gossip_pb2.GetStatusRequest(), timeout=5)
    assert status.node_id == node.cfg.node_id
    step = node.trainer.step_count
    await until([node], lambda: node.trainer.step_count > step, 10, "training to go on")


async def test_a_hello_claiming_our_id_from_a_dead_address_leaves_the_daemon_serving(victim: Node) -> None:
    """The issue's reproduction: our id, incarnation 1, our fingerprint, and 127.0.0.1:1 (nothing listens)."""
    async with grpc.aio.insecure_channel(victim.address) as ch:
        stub = gossip_pb2_grpc.GossipServiceStub(ch)
        for _ in range(3):
            resp = await stub.Hello(hello(victim, victim.cfg.node_id, "127.0.0.1:1"), timeout=5)
            assert not resp.accepted and resp.reason.startswith("duplicate node id")
        rejected = victim.counters.rejected
        await until([victim], lambda: rejected.get("duplicate_unverified", 0) >= 1, 10, "the claim to be refused")
        await still_serving_and_training(victim, stub)
    assert victim._fatal is None and not victim._stop.is_set()
    assert victim.cfg.node_id not in victim.core.peers


async def test_a_thousand_hostile_hellos_leave_the_table_bounded(victim: Node) -> None:
    async with grpc.aio.insecure_channel(victim.address) as ch:
        stub = gossip_pb2_grpc.GossipServiceStub(ch)
        codes: dict[grpc.StatusCode, int] = {}
        for batch in range(10):
            calls = [
                code_of(stub.Hello(hello(victim, f"fake-{batch}-{i}", f"127.0.0.1:{1 + i}"), timeout=5))
                for i in range(100)
            ]
            for code in await asyncio.gather(*calls):
                codes[code] = codes.get(code, 0) + 1
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        assert codes.get(grpc.StatusCode.RESOURCE_EXHAUSTED, 0) > 0, "the per-source rate limit must bite"
        core = victim.core
        await until([victim], lambda: not core.hellos_in_flight, 20, "every admission dial to fail")
        assert len(core.peers) == 0, "an unreachable address never joins"
        assert len(core.hello_limiter) <= core.settings.admission.max_sources
        assert victim.counters.rejected["hello_rate"] > 0
        await still_serving_and_training(victim, stub)


async def test_undecodable_bytes_get_invalid_argument_on_every_rpc_and_a_quiet_log(
    victim: Node, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with grpc.aio.insecure_channel(victim.address) as ch:

        async def one(i: int) -> grpc.StatusCode:
            kind = i % 4
            if kind == 0:
                return await code_of(ch.unary_unary(SERVICE + "Hello")(GARBAGE, timeout=5))
            if kind == 1:
                return await code_of(ch.unary_unary(SERVICE + "GetStatus")(GARBAGE, timeout=5))
            if kind == 2:
                return await code_of(ch.stream_unary(SERVICE + "Push")(iter([GARBAGE]), timeout=5))
            call = ch.unary_stream(SERVICE + "FetchState")(GARBAGE, timeout=5)
            try:
                async for _ in call:
                    pass
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        caplog.clear()
        codes: list[grpc.StatusCode] = []
        for batch in range(10):
            codes += await asyncio.gather(*(one(batch * 100 + i) for i in range(100)))
        # Push streams are bounded per source: surplus ones are refused before they are read.
        assert set(codes) <= {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}, set(codes)
        assert codes.count(grpc.StatusCode.INVALID_ARGUMENT) >= 750
        stub = gossip_pb2_grpc.GossipServiceStub(ch)
        await still_serving_and_training(victim, stub)
    records = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert not any(r.exc_info for r in caplog.records), "never a traceback for refused input"
    text = "\n".join(r.getMessage() for r in records)
    assert "does not parse" in text
    assert len(text) < 5_000, f"{len(text)} bytes of log for 1,000 undecodable requests:\n{text[:2000]}"
    assert victim.counters.rejected["undecodable"] >= 750


async def test_stalled_streams_are_closed_and_surplus_streams_refused(victim: Node) -> None:
    env = Envelope("staller", victim.fingerprint, victim.algorithm.name, 1, 1, "127.0.0.1:1", 1)
    payload = Payload("state", {"params": torch.zeros(victim.built.num_params)}, seq=1, step=1)
    header, _ = encode(env, payload, chunk_bytes=1000)  # a valid header; its chunks never follow
    sent = [asyncio.Event() for _ in range(PER_PEER)]

    def stalled(i: int) -> AsyncIterator[gossip_pb2.PushRequest]:
        async def gen() -> AsyncIterator[gossip_pb2.PushRequest]:
            yield gossip_pb2.PushRequest(header=header)
            sent[i].set()
            await asyncio.Event().wait()  # then nothing, ever

        return gen()

    servicer = victim._server.servicer  # type: ignore[union-attr]
    async with grpc.aio.insecure_channel(victim.address) as ch:
        stub = gossip_pb2_grpc.GossipServiceStub(ch)
        calls = [stub.Push(stalled(i), timeout=30) for i in range(PER_PEER)]  # type: ignore[arg-type]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in sent)), 10)
        await until([victim], lambda: servicer.streams.total == PER_PEER, 10, "the stalled streams to open")
        surplus = await code_of(stub.Push(stalled(0), timeout=30))  # type: ignore[arg-type]
        assert surplus == grpc.StatusCode.RESOURCE_EXHAUSTED
        loop = asyncio.get_running_loop()
        began = loop.time()
        codes = await asyncio.wait_for(asyncio.gather(*(code_of(c) for c in calls)), 10)
        # Closed by the server's idle limit, long before the clients' own 30 s deadlines.
        assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * PER_PEER
        assert loop.time() - began < 5
        assert servicer.streams.total == 0 and not servicer.streams.open
        assert victim.counters.rejected.get("push_deadline_exceeded", 0) >= PER_PEER
        await still_serving_and_training(victim, stub)


async def test_huge_fields_get_their_own_status_and_a_bounded_detail(victim: Node) -> None:
    huge = "x" * 100_000
    async with grpc.aio.insecure_channel(victim.address) as ch:
        stub = gossip_pb2_grpc.GossipServiceStub(ch)
        fetch = stub.FetchState(gossip_pb2.FetchStateRequest(node_id=huge, schema_fingerprint=huge), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in fetch:
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(info.value.details() or "") <= 200
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Hello(hello(victim, huge, huge), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(info.value.details() or "") <= 200
        resp = await stub.Hello(
            gossip_pb2.HelloRequest(node_id="odd", protocol_version=huge, schema_fingerprint=huge), timeout=5
        )
        assert not resp.accepted and len(resp.reason) <= 400
        header = gossip_pb2.PushHeader(sender_id=huge, schema_fingerprint=huge, total_bytes=8)
        code = await code_of(stub.Push(iter([gossip_pb2.PushRequest(header=header)]), timeout=5))  # type: ignore[arg-type]
        assert code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)
        await still_serving_and_training(victim, stub)
