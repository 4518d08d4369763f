"""The single mapping from a gRPC failure to our error tree, and the only place that catches `grpc.RpcError`.

Light: no torch, no config, so `peer status` and the testbed's status probe stay fast to import.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable
from typing import TypeVar, cast

import grpc

from peer.errors import SendError

T = TypeVar("T")

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


async def guarded(what: str, call: Callable[[], Awaitable[T]]) -> T:
    """Await one grpc.aio call; a grpc.RpcError becomes `map_rpc_error(exc, what)` (a SendError)."""
    try:
        return await call()
    except grpc.RpcError as exc:
        raise map_rpc_error(exc, what) from None


async def guarded_stream(what: str, call: Callable[[], AsyncIterable[T]]) -> AsyncGenerator[T, None]:
    """The messages of a server-streaming grpc.aio call; a grpc.RpcError becomes `map_rpc_error(exc, what)`.

    Close it when the consumer stops early (`contextlib.aclosing`), so that the call is released at once.
    """
    try:
        async for message in call():
            yield message
    except grpc.RpcError as exc:
        raise map_rpc_error(exc, what) from None


def blocking_call(call: Callable[[], T]) -> tuple[T, None] | tuple[None, str]:
    """Run one call of a blocking (non-aio) stub: (result, None), or (None, "CODE: details") on a grpc.RpcError.

    For callers that report the failure rather than raise it (the testbed's status probe).
    """
    try:
        return call(), None
    except grpc.RpcError as exc:
        failed = cast(grpc.Call, exc)  # blocking stubs raise errors that are also grpc.Call
        return None, f"{failed.code().name}: {failed.details()}"
