"""grpc.aio server for `peer.v1.GossipService`, and the options both ends of a gossip channel use.

Serves Hello, Push (client-streaming, validated by `peer.net.assembler.Assembler`), GetStatus and FetchState,
plus grpc.health.v1. Keepalive and message limits derive from `GossipConfig`, the same as the client's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from peer.config import GossipConfig
from peer.errors import PayloadError, StartupError
from peer.net.assembler import Assembler, Received, ReceiveLimits
from peer.net.rpc_errors import NO_PROXY, SERVICE_NAME
from peer.net.tls import Credentials, identity_of
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
    """What the daemon provides to the servicer. Each method is quick and never blocks the loop.

    `identity` is the caller's node id from its verified client certificate (None without TLS): a claimed node id
    that contradicts it is refused with PERMISSION_DENIED (IdentityError).
    """

    def hello(
        self, request: gossip_pb2.HelloRequest, peer: str, identity: str | None
    ) -> gossip_pb2.HelloResponse | PayloadError: ...
    def receive_limits(self) -> ReceiveLimits: ...
    def deliver(self, received: Received, peer: str, identity: str | None) -> None: ...
    def rejected(self, sender: str, error: PayloadError, peer: str) -> None: ...
    def status(self) -> gossip_pb2.GetStatusResponse: ...
    async def fetch_state(
        self, request: gossip_pb2.FetchStateRequest, identity: str | None
    ) -> tuple[gossip_pb2.PushHeader, list[bytes]]: ...


class GossipServicer(gossip_pb2_grpc.GossipServiceServicer):
    def __init__(self, handlers: Handlers) -> None:
        self.handlers = handlers

    async def Hello(  # noqa: N802 - gRPC method name
        self, request: gossip_pb2.HelloRequest, context: grpc.aio.ServicerContext
    ) -> gossip_pb2.HelloResponse:
        answer = self.handlers.hello(request, context.peer(), identity_of(context))
        if isinstance(answer, PayloadError):
            await context.abort(grpc.StatusCode[answer.status], str(answer))
        assert isinstance(answer, gossip_pb2.HelloResponse)
        return answer

    async def GetStatus(  # noqa: N802
        self, request: gossip_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> gossip_pb2.GetStatusResponse:
        return self.handlers.status()

    async def FetchState(  # noqa: N802
        self, request: gossip_pb2.FetchStateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gossip_pb2.FetchStateResponse]:
        try:
            header, chunks = await self.handlers.fetch_state(request, identity_of(context))
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
                    asm.on_chunk(gossip_pb2.Chunk())  # an empty message is a framing error; let the assembler say so
            # Hashing is incremental; decoding and the finiteness check touch every byte: off the loop when big.
            if asm.total_bytes > (1 << 20):
                received = await asyncio.to_thread(asm.finish)
            else:
                received = asm.finish()
            self.handlers.deliver(received, context.peer(), identity_of(context))
        except PayloadError as exc:
            self.handlers.rejected(sender, exc, context.peer())
            await context.abort(grpc.StatusCode[exc.status], str(exc))
        return gossip_pb2.PushResponse(accepted=True, bytes_received=received.nbytes)


@dataclass
class Server:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int

    async def stop(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def start_server(
    listen: str, cfg: GossipConfig, handlers: Handlers, credentials: Credentials | None = None
) -> Server:
    """Bind and start (mutual TLS with `credentials`, else plaintext). A port in use or a bad address raises
    StartupError naming the address."""
    server = grpc.aio.server(options=server_options(cfg))
    gossip_pb2_grpc.add_GossipServiceServicer_to_server(GossipServicer(handlers), server)
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    host, _, port_text = listen.rpartition(":")
    # gRPC binds every address a name resolves to and succeeds if any one binds: "localhost:P" with 127.0.0.1:P
    # taken would quietly listen on [::1]:P alone, beside the other daemon. Bind the IPv4 loopback only.
    bind = f"127.0.0.1:{port_text}" if host == "localhost" else listen
    try:
        if credentials is not None:
            port = server.add_secure_port(bind, credentials.server_credentials())
        else:
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
