"""grpc.aio server and client for `peer.v1.GossipService`. The one place where gRPC errors are mapped.

Server: Hello, Push (client-streaming, validated by `peer.net.assembler.Assembler`), GetStatus, plus grpc.health.v1.
Client: one long-lived channel per neighbour address, a deadline on every call, keepalive and message limits
derived from the same `GossipConfig` as the server's so that both sides agree.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from peer.config import GossipConfig
from peer.errors import PayloadError, StartupError
from peer.net.assembler import Assembler, Received, ReceiveLimits
from peer.net.rpc_errors import NO_PROXY, SERVICE_NAME, map_rpc_error
from peer.v1 import gossip_pb2, gossip_pb2_grpc

log = logging.getLogger(__name__)
_ENVELOPE_SLACK = 1 << 20  # room for the header's manifest on top of one chunk


def channel_options(cfg: GossipConfig) -> list[tuple[str, int | str]]:
    """Client options. Keepalive pings must not come faster than the server allows (see server_options)."""
    max_msg = cfg.chunk_bytes + _ENVELOPE_SLACK
    return [
        ("grpc.keepalive_time_ms", int(cfg.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(cfg.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_receive_message_length", max(max_msg, 8 << 20)),
        ("grpc.max_send_message_length", max(max_msg, 8 << 20)),
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.min_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", int(cfg.reconnect_backoff_max_s * 1000)),
        # Retries are ours (per-neighbour backoff and breaker); core retries would multiply them.
        ("grpc.enable_retries", 0),
        NO_PROXY,
    ]


def server_options(cfg: GossipConfig) -> list[tuple[str, int | str]]:
    """Server options. min_ping_interval <= the client's keepalive_time, or clients get "Too many pings"."""
    max_msg = cfg.chunk_bytes + _ENVELOPE_SLACK
    keepalive_ms = int(cfg.keepalive_time_s * 1000)
    return [
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", int(cfg.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", min(keepalive_ms, 20000)),
        ("grpc.max_receive_message_length", max(max_msg, 8 << 20)),
        ("grpc.max_send_message_length", max(max_msg, 8 << 20)),
        # Off: with SO_REUSEPORT two daemons silently share a port; we want "port in use" to be an error.
        ("grpc.so_reuseport", 0),
    ]


class Handlers(Protocol):
    """What the daemon provides to the servicer. Each method is quick and never blocks the loop."""

    def hello(self, request: gossip_pb2.HelloRequest, peer: str) -> gossip_pb2.HelloResponse: ...
    def receive_limits(self) -> ReceiveLimits: ...
    def deliver(self, received: Received, peer: str) -> None: ...
    def rejected(self, sender: str, error: PayloadError, peer: str) -> None: ...
    def status(self) -> gossip_pb2.GetStatusResponse: ...
    async def fetch_state(self, request: gossip_pb2.FetchStateRequest) -> tuple[gossip_pb2.PushHeader, list[bytes]]: ...


class GossipServicer(gossip_pb2_grpc.GossipServiceServicer):
    def __init__(self, handlers: Handlers) -> None:
        self.handlers = handlers

    async def Hello(  # noqa: N802 - gRPC method name
        self, request: gossip_pb2.HelloRequest, context: grpc.aio.ServicerContext
    ) -> gossip_pb2.HelloResponse:
        return self.handlers.hello(request, context.peer())

    async def GetStatus(  # noqa: N802
        self, request: gossip_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> gossip_pb2.GetStatusResponse:
        return self.handlers.status()

    async def FetchState(  # noqa: N802
        self, request: gossip_pb2.FetchStateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gossip_pb2.FetchStateResponse]:
        try:
            header, chunks = await self.handlers.fetch_state(request)
        except PayloadError as exc:
            await context.abort(grpc.StatusCode[exc.status], str(exc))
        yield gossip_pb2.FetchStateResponse(header=header)
        for i, data in enumerate(chunks):
            yield gossip_pb2.FetchStateResponse(chunk=gossip_pb2.Chunk(index=i, data=data))

    async def Push(  # noqa: N802
        self, request_iterator: AsyncIterator[gossip_pb2.PushRequest], context: grpc.aio.ServicerContext
    ) -> gossip_pb2.PushResponse:
        limits = self.handlers.receive_limits()
        asm = Assembler(limits, peer=context.peer())
        sender = "?"
        try:
            async for req in request_iterator:
                body = req.WhichOneof("body")
                if body == "header":
                    sender = req.header.sender_id or "?"
                    asm.on_header(req.header)
                elif body == "chunk":
                    asm.on_chunk(req.chunk)
                else:
                    asm.on_chunk(gossip_pb2.Chunk())  # an empty message is a framing error; let codec say so
            # Hashing is incremental; decoding and the finiteness check touch every byte: off the loop when big.
            if asm.total_bytes > (1 << 20):
                received = await asyncio.to_thread(asm.finish)
            else:
                received = asm.finish()
        except PayloadError as exc:
            self.handlers.rejected(sender, exc, context.peer())
            await context.abort(grpc.StatusCode[exc.status], str(exc))
        self.handlers.deliver(received, context.peer())
        return gossip_pb2.PushResponse(accepted=True, bytes_received=received.nbytes)


@dataclass
class Server:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int

    async def stop(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def start_server(listen: str, cfg: GossipConfig, handlers: Handlers) -> Server:
    """Bind and start. A port in use or a bad address raises StartupError naming the address."""
    server = grpc.aio.server(options=server_options(cfg))
    gossip_pb2_grpc.add_GossipServiceServicer_to_server(GossipServicer(handlers), server)
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    host, _, port_text = listen.rpartition(":")
    # gRPC binds every address a name resolves to and succeeds if any one binds: "localhost:P" with 127.0.0.1:P
    # taken would quietly listen on [::1]:P alone, beside the other daemon. Bind the IPv4 loopback only.
    bind = f"127.0.0.1:{port_text}" if host == "localhost" else listen
    try:
        port = server.add_insecure_port(bind)
    except RuntimeError as exc:
        raise StartupError(
            f"cannot listen on {listen}: the port is in use or the address is not on this host ({exc})"
        ) from None
    if port == 0:
        raise StartupError(f"cannot listen on {listen}: the port is in use or the address is not on this host")
    await server.start()
    await hs.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await hs.set("", health_pb2.HealthCheckResponse.SERVING)
    return Server(server, hs, port)


class Client:
    """Outgoing calls. One channel per address, closed when the peer leaves or moves."""

    def __init__(self, cfg: GossipConfig) -> None:
        self.cfg = cfg
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> gossip_pb2_grpc.GossipServiceStub:
        ch = self._channels.get(address)
        if ch is None:
            ch = grpc.aio.insecure_channel(address, options=channel_options(self.cfg))
            self._channels[address] = ch
        return gossip_pb2_grpc.GossipServiceStub(ch)

    async def _call(self, what: str, fn: Callable[[], Any]) -> object:
        try:
            return await cast(Awaitable[object], fn())
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, what) from None

    async def hello(
        self, address: str, request: gossip_pb2.HelloRequest, *, timeout_s: float | None = None
    ) -> gossip_pb2.HelloResponse:
        stub = self._stub(address)
        timeout = timeout_s if timeout_s is not None else self.cfg.rpc_timeout_s
        result = await self._call(f"hello to {address}", lambda: stub.Hello(request, timeout=timeout))
        assert isinstance(result, gossip_pb2.HelloResponse)
        return result

    async def status(self, address: str) -> gossip_pb2.GetStatusResponse:
        stub = self._stub(address)
        result = await self._call(
            f"status of {address}",
            lambda: stub.GetStatus(gossip_pb2.GetStatusRequest(), timeout=self.cfg.rpc_timeout_s),
        )
        assert isinstance(result, gossip_pb2.GetStatusResponse)
        return result

    def push_timeout(self, total_bytes: int) -> float:
        """Base deadline plus the time the payload takes at the slowest bandwidth we accept."""
        return self.cfg.rpc_timeout_s + total_bytes / self.cfg.min_bandwidth_bytes_per_s

    async def push(
        self, address: str, requests: Iterable[gossip_pb2.PushRequest], total_bytes: int, peer_id: str
    ) -> gossip_pb2.PushResponse:
        stub = self._stub(address)

        async def gen() -> AsyncIterator[gossip_pb2.PushRequest]:
            for r in requests:
                yield r

        result = await self._call(
            f"push to {peer_id} at {address}",
            # wait_for_ready rides out short link flaps; the deadline still bounds the whole exchange.
            lambda: stub.Push(gen(), timeout=self.push_timeout(total_bytes), wait_for_ready=True),  # type: ignore[arg-type]
        )
        assert isinstance(result, gossip_pb2.PushResponse)
        return result

    async def fetch_state(
        self, address: str, request: gossip_pb2.FetchStateRequest, limits: ReceiveLimits, *, timeout_s: float
    ) -> Received:
        """Download and validate a peer's current model (catch-up). PayloadError if it fails validation."""
        stub = self._stub(address)
        asm = Assembler(limits, peer=address)
        try:
            stream = cast(AsyncIterator[gossip_pb2.FetchStateResponse], stub.FetchState(request, timeout=timeout_s))
            async for msg in stream:
                body = msg.WhichOneof("body")
                if body == "header":
                    asm.on_header(msg.header)
                else:
                    asm.on_chunk(msg.chunk)  # an empty message is a framing error; the codec says so
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, f"fetch state from {address}") from None
        if asm.total_bytes > (1 << 20):
            return await asyncio.to_thread(asm.finish)
        return asm.finish()

    async def forget(self, address: str) -> None:
        ch = self._channels.pop(address, None)
        if ch is not None:
            await ch.close()

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            await ch.close()
