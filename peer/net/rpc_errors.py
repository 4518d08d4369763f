"""The single mapping from a gRPC failure to our error tree (light: no torch, no config)."""

from __future__ import annotations

import grpc

from peer.errors import SendError

SERVICE_NAME = "peer.v1.GossipService"

# Peers are dialled directly; an http_proxy in the environment must never reroute gossip or probes.
NO_PROXY = ("grpc.enable_http_proxy", 0)


def map_rpc_error(exc: grpc.RpcError, what: str) -> SendError:
    """A SendError naming the call, the status code and the details; `retryable` for transient codes."""
    code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)) or ""
    name = code.name if code is not None else "UNKNOWN"
    retryable = name in ("UNAVAILABLE", "DEADLINE_EXCEEDED") and "handshake" not in details.lower()
    return SendError(f"{what}: {name}: {details}", code=name, retryable=retryable)
