"""grpc.aio client for `peer.v1.GossipService`: one long-lived channel per neighbour address.

Every call has a deadline, and its gRPC failures become SendError through `peer.net.rpc_errors`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing
from typing import Any, cast

import grpc

from peer.config import GossipConfig
from peer.net.assembler import Assembler, Received, ReceiveLimits
from peer.net.rpc_errors import SERVICE_NAME, guarded, guarded_stream
from peer.net.server import channel_options
from peer.net.tls import Credentials, server_name_options
from peer.v1 import gossip_pb2, gossip_pb2_grpc

PUSH_METHOD = f"/{SERVICE_NAME}/Push"


class Client:
    """Outgoing calls. One channel per (address, expected node id), closed when the peer leaves or moves.

    With `credentials` every channel is mutual TLS: the server's certificate must come from the cluster CA and
    name the node id we mean to reach (the cluster name when we do not know it yet, as for a static peer).
    """

    def __init__(self, cfg: GossipConfig, credentials: Credentials | None = None) -> None:
        self.cfg = cfg
        self.credentials = credentials
        self._channels: dict[tuple[str, str | None], grpc.aio.Channel] = {}

    def _stub(self, address: str, node_id: str | None = None) -> gossip_pb2_grpc.GossipServiceStub:
        return gossip_pb2_grpc.GossipServiceStub(self._channel(address, node_id))

    def _channel(self, address: str, node_id: str | None = None) -> grpc.aio.Channel:
        key = (address, node_id if self.credentials is not None else None)
        ch = self._channels.get(key)
        if ch is None:
            if self.credentials is not None:
                options = channel_options(self.cfg) + server_name_options(node_id)
                ch = grpc.aio.secure_channel(address, self.credentials.channel_credentials(), options=options)
            else:
                ch = grpc.aio.insecure_channel(address, options=channel_options(self.cfg))
            self._channels[key] = ch
        return ch

    @property
    def verifies_server_identity(self) -> bool:
        """True when a call made with a node id only succeeds if the server's certificate names that node."""
        return self.credentials is not None

    async def _call(self, what: str, fn: Callable[[], Any]) -> object:
        return await guarded(what, cast(Callable[[], Awaitable[object]], fn))

    async def hello(
        self,
        address: str,
        request: gossip_pb2.HelloRequest,
        *,
        timeout_s: float | None = None,
        node_id: str | None = None,
    ) -> gossip_pb2.HelloResponse:
        stub = self._stub(address, node_id)
        timeout = timeout_s if timeout_s is not None else self.cfg.rpc_timeout_s
        result = await self._call(f"hello to {address}", lambda: stub.Hello(request, timeout=timeout))
        assert isinstance(result, gossip_pb2.HelloResponse)
        return result

    async def status(self, address: str, node_id: str | None = None) -> gossip_pb2.GetStatusResponse:
        stub = self._stub(address, node_id)
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
        self, address: str, requests: Iterable[gossip_pb2.PushRequest | bytes], total_bytes: int, peer_id: str
    ) -> gossip_pb2.PushResponse:
        """One Push stream. `requests` are PushRequests, or already serialized ones (`encoder.encode_frames`), which
        go out as they are: the stream serializes nothing per neighbour."""
        # No request serializer: the stream carries bytes (grpc passes them through untouched).
        call: grpc.aio.StreamUnaryMultiCallable[bytes, gossip_pb2.PushResponse] = self._channel(
            address, peer_id
        ).stream_unary(PUSH_METHOD, request_serializer=None, response_deserializer=gossip_pb2.PushResponse.FromString)

        async def gen() -> AsyncIterator[bytes]:
            for r in requests:
                yield r if isinstance(r, bytes) else r.SerializeToString()

        result = await self._call(
            f"push to {peer_id} at {address}",
            # wait_for_ready rides out short link flaps; the deadline still bounds the whole exchange.
            lambda: call(gen(), timeout=self.push_timeout(total_bytes), wait_for_ready=True),
        )
        assert isinstance(result, gossip_pb2.PushResponse)
        return result

    async def fetch_state(
        self,
        address: str,
        request: gossip_pb2.FetchStateRequest,
        limits: ReceiveLimits,
        *,
        timeout_s: float,
        node_id: str | None = None,
    ) -> Received:
        """Download and validate a peer's current model (catch-up). PayloadError if it fails validation."""
        stub = self._stub(address, node_id)
        asm = Assembler(limits, peer=address)

        def call() -> AsyncIterator[gossip_pb2.FetchStateResponse]:
            return cast(AsyncIterator[gossip_pb2.FetchStateResponse], stub.FetchState(request, timeout=timeout_s))

        async with aclosing(guarded_stream(f"fetch state from {address}", call)) as stream:
            async for msg in stream:
                body = msg.WhichOneof("body")
                if body == "header":
                    asm.on_header(msg.header)
                else:
                    asm.on_chunk(msg.chunk)  # an empty message is a framing error; the assembler says so
        if asm.total_bytes > (1 << 20):
            return await asyncio.to_thread(asm.finish)
        return asm.finish()

    async def forget(self, address: str) -> None:
        for key in [k for k in self._channels if k[0] == address]:
            ch = self._channels.pop(key, None)
            if ch is not None:
                await ch.close()

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            await ch.close()
