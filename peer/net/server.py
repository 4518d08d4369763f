"""grpc.aio server for `peer.v1.GossipService`, and the options both ends of a gossip channel use.

Serves Hello, Push (client-streaming, validated by `peer.net.assembler.Assembler`), GetStatus and FetchState,
plus grpc.health.v1 (per service name) and server reflection (grpcurl). Keepalive and message limits derive
from `GossipConfig`, the same as the client's.
Hostile input is refused cheaply and with a deliberate status: bytes that do not parse get INVALID_ARGUMENT (not
gRPC's UNKNOWN and a traceback), GetStatus and FetchState are rate-limited per source host, Push streams are
bounded per source and in total and closed when idle or past the deadline their declared size allows, and no
status detail echoes more than `peer.core.admission.MAX_ECHO_CHARS` characters of input. Refusals to a connection
(or source host) that keeps being refused are held before they are answered (`peer.core.tarpit`): grpc.aio costs
about 200 us of the loop per call whatever we answer, so the cheapest call is the one a looping client never sends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from peer.config import GossipConfig
from peer.core.admission import RateLimiter, StreamSlots, clip, source_of, stream_deadline_s
from peer.core.tarpit import Tarpit, TarpitSettings
from peer.errors import (
    IncompleteStreamError,
    PayloadError,
    RateLimitedError,
    StalledStreamError,
    StartupError,
    UndecodableError,
)
from peer.net.assembler import Assembler, Received, ReceiveLimits
from peer.net.frames import ChunkView, parse_chunk_frame
from peer.net.rpc_errors import NO_PROXY, SERVICE_NAME
from peer.net.tls import Credentials, identity_of, tls_protected
from peer.v1 import gossip_pb2, gossip_pb2_grpc

log = logging.getLogger(__name__)
_ENVELOPE_SLACK = 1 << 20  # room for the header's manifest on top of one chunk
REFLECTED_SERVICES = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
HEALTH_SERVICES = ("", SERVICE_NAME, reflection.SERVICE_NAME)
M = TypeVar("M")
# A held refusal is answered this long before the caller's deadline, so that it still gets our status.
_TARPIT_MARGIN_S = 0.25
# Before refusing a push, read what its sender still streams, up to this long: aborting a stream the client is still
# writing races our status with the stream's reset, and the sender then saw INTERNAL instead of the reason (the
# bad-input tests, about 1 run in 10). Bounded in bytes by the payload limit too, so it costs no more than a push.
_DRAIN_S = 1.0


class Undecodable:
    """What a request deserializer yields for bytes that do not parse, so the servicer can answer
    INVALID_ARGUMENT itself (a raising deserializer makes gRPC answer UNKNOWN and log a traceback)."""

    def __init__(self, message_type: str, nbytes: int = 0) -> None:
        self.message_type = message_type
        self.nbytes = nbytes


def _lenient(parse: Callable[[bytes], M], name: str) -> Callable[[bytes], M | Undecodable]:
    def deserialize(data: bytes) -> M | Undecodable:
        try:
            return parse(data)
        except Exception:  # protobuf's DecodeError, or any other way the bytes fail to parse
            return Undecodable(name, len(data))

    return deserialize


def _push_request(data: bytes) -> gossip_pb2.PushRequest | ChunkView | Undecodable:
    """Push stream messages: a chunk in the canonical layout as a zero-copy view, anything else via protobuf."""
    return parse_chunk_frame(data) or _lenient_push(data)


_lenient_push = _lenient(gossip_pb2.PushRequest.FromString, "peer.v1.PushRequest")


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
        # Enforced by gRPC's C core: a connection's surplus calls queue in the client and never reach Python.
        ("grpc.max_concurrent_streams", cfg.max_concurrent_streams),
    ]


def tarpit_settings(cfg: GossipConfig) -> TarpitSettings:
    return TarpitSettings(
        delay_s=cfg.tarpit_delay_s,
        free_refusals=cfg.tarpit_free_refusals,
        free_refusals_per_source=cfg.tarpit_free_refusals_per_peer,
        max_held=cfg.tarpit_max_held,
        max_held_per_connection=cfg.tarpit_max_held_per_connection,
        max_held_bytes=cfg.tarpit_max_held_bytes,
    )


def _request_bytes(request: object) -> int:
    """What holding a refused call keeps alive besides its call state: the parsed request."""
    if isinstance(request, Undecodable):
        return request.nbytes
    byte_size = getattr(request, "ByteSize", None)
    return int(byte_size()) if callable(byte_size) else 0


class Handlers(Protocol):
    """What the daemon provides to the servicer. Each method is quick and never blocks the loop.

    `identity` is the caller's node id from its verified client certificate (None without TLS): a claimed node id
    that contradicts it is refused with PERMISSION_DENIED (IdentityError).
    """

    def hello(self, request: gossip_pb2.HelloRequest, peer: str, identity: str | None) -> gossip_pb2.HelloResponse: ...
    def receive_limits(self) -> ReceiveLimits: ...
    async def deliver(self, received: Received, peer: str, identity: str | None) -> None: ...
    def rejected(self, sender: str, error: PayloadError, peer: str) -> None: ...
    def status(self) -> gossip_pb2.GetStatusResponse: ...
    async def fetch_state(
        self, request: gossip_pb2.FetchStateRequest, identity: str | None
    ) -> tuple[gossip_pb2.PushHeader, list[bytes]]: ...
    def refused(self, reason: str, peer: str, message: str) -> None: ...
    def held(self, peer: str) -> None: ...


async def _abort(context: grpc.aio.ServicerContext, exc: PayloadError) -> NoReturn:
    await context.abort(grpc.StatusCode[exc.status], clip(str(exc)))
    raise AssertionError("unreachable: abort raises")


class GossipServicer(gossip_pb2_grpc.GossipServiceServicer):
    def __init__(self, handlers: Handlers, cfg: GossipConfig) -> None:
        self.handlers = handlers
        self.cfg = cfg
        self.requests = RateLimiter(cfg.requests_per_s_per_peer, cfg.request_burst, max_keys=1024)
        self.streams = StreamSlots(cfg.max_streams, cfg.max_streams_per_peer)
        self.fetches = 0  # FetchState calls being served
        self.tarpit = Tarpit(tarpit_settings(cfg))

    async def _answer(self, context: grpc.aio.ServicerContext, exc: PayloadError, request: object = None) -> NoReturn:
        """Refuse the call with `exc`'s status; held first (peer.core.tarpit) when its connection or source host
        keeps being refused, so that a client looping on refused calls slows down instead of costing us CPU."""
        connection = context.peer()
        nbytes = _request_bytes(request)
        delay = self.tarpit.hold(connection, source_of(connection), nbytes, asyncio.get_running_loop().time())
        if delay > 0:
            self.handlers.held(connection)
            try:
                left = context.time_remaining()
                if left is not None:
                    delay = min(delay, left - _TARPIT_MARGIN_S)
                if delay > 0:
                    await asyncio.sleep(delay)
            finally:
                self.tarpit.release(connection, nbytes)
        await _abort(context, exc)

    async def _refuse(
        self, context: grpc.aio.ServicerContext, reason: str, exc: PayloadError, request: object = None
    ) -> NoReturn:
        self.handlers.refused(reason, context.peer(), str(exc))
        await self._answer(context, exc, request)

    async def _check(self, request: object, context: grpc.aio.ServicerContext, limited: bool) -> None:
        if isinstance(request, Undecodable):
            error = UndecodableError(f"the request does not parse as {request.message_type}")
            await self._refuse(context, "undecodable", error, request)
        if limited and not self.requests.allow(source_of(context.peer()), asyncio.get_running_loop().time()):
            await self._refuse(context, "request_rate", RateLimitedError("too many requests from this source"), request)

    async def Hello(  # noqa: N802 - gRPC method name
        self, request: gossip_pb2.HelloRequest, context: grpc.aio.ServicerContext
    ) -> gossip_pb2.HelloResponse:
        await self._check(request, context, limited=False)  # the core rate-limits Hellos itself
        try:
            return self.handlers.hello(request, context.peer(), identity_of(context))
        except PayloadError as exc:
            await self._answer(context, exc, request)

    async def GetStatus(  # noqa: N802
        self, request: gossip_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> gossip_pb2.GetStatusResponse:
        await self._check(request, context, limited=True)
        return self.handlers.status()

    async def FetchState(  # noqa: N802
        self, request: gossip_pb2.FetchStateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gossip_pb2.FetchStateResponse]:
        await self._check(request, context, limited=True)
        if self.fetches >= self.cfg.max_fetches:
            error = RateLimitedError("too many model downloads in progress")
            await self._refuse(context, "fetch_busy", error, request)
        self.fetches += 1
        try:
            header, chunks = await self.handlers.fetch_state(request, identity_of(context))
        except PayloadError as exc:
            refused: PayloadError | None = exc
        else:
            refused = None
        finally:
            self.fetches -= 1
        if refused is not None:  # answered once this call no longer counts as a download in progress
            await self._answer(context, refused, request)
        yield gossip_pb2.FetchStateResponse(header=header)
        for i, data in enumerate(chunks):
            yield gossip_pb2.FetchStateResponse(chunk=gossip_pb2.Chunk(index=i, data=data))

    async def Push(  # noqa: N802
        self, request_iterator: AsyncIterator[gossip_pb2.PushRequest], context: grpc.aio.ServicerContext
    ) -> gossip_pb2.PushResponse:
        source = source_of(context.peer())
        why = self.streams.acquire(source)
        if why:
            await self._refuse(context, "streams", RateLimitedError(why))
        try:
            return await self._push(request_iterator, context)
        except PayloadError as exc:
            refused = exc
        finally:
            self.streams.release(source)
        # A stalled stream was held for its idle limit already; an incomplete one is also what a sender's own
        # cancellation looks like. Others are held once the slot is free again (a held call never holds a slot).
        if isinstance(refused, (StalledStreamError, IncompleteStreamError)):
            await _abort(context, refused)
        await self._drain(request_iterator)
        await self._answer(context, refused)

    async def _drain(self, request_iterator: AsyncIterator[Any]) -> None:
        """Discard the rest of a refused push until its sender half-closes, for at most _DRAIN_S and the payload
        limit in bytes, so that the refusal's status reaches it (see _DRAIN_S)."""
        loop = asyncio.get_running_loop()
        end, left_bytes = loop.time() + _DRAIN_S, self.handlers.receive_limits().max_payload_bytes
        iterator = aiter(request_iterator)
        while left_bytes > 0 and (wait := end - loop.time()) > 0:
            try:
                req = await asyncio.wait_for(anext(iterator), wait)
            except Exception:  # its end, our time limit, or a broken stream: the refusal goes out
                return
            left_bytes -= len(req.data) if isinstance(req, ChunkView) else _request_bytes(req)

    async def _next(self, iterator: AsyncIterator[M], deadline: float) -> M | None:
        """The stream's next message, None at its end; StalledStreamError when the sender goes quiet for the
        idle limit, or the stream outlives its deadline."""
        loop = asyncio.get_running_loop()
        left = deadline - loop.time()
        wait = min(self.cfg.stream_idle_s, left)
        if wait <= 0:
            raise StalledStreamError(f"push still incomplete at its deadline ({self.cfg.rpc_timeout_s:.0f} s + size)")
        try:
            return await asyncio.wait_for(anext(iterator), wait)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            if wait < self.cfg.stream_idle_s:
                raise StalledStreamError("push still incomplete at the deadline its declared size allows") from None
            raise StalledStreamError(f"push stalled: nothing received for {wait:g} s") from None

    async def _push(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> gossip_pb2.PushResponse:
        limits = self.handlers.receive_limits()
        if tls_protected(context):
            limits = dataclasses.replace(limits, verify_digest=False)  # TLS records are authenticated already
        peer = context.peer()
        asm = Assembler(limits, peer=peer)
        sender = "?"
        cfg = self.cfg
        # Until the header declares a size, the stream has the base deadline; then the client's own formula.
        start = asyncio.get_running_loop().time()
        deadline = start + cfg.rpc_timeout_s
        iterator = aiter(request_iterator)
        try:
            while (req := await self._next(iterator, deadline)) is not None:
                if isinstance(req, Undecodable):
                    raise UndecodableError(f"a stream message does not parse as {req.message_type}")
                if isinstance(req, ChunkView):
                    asm.on_chunk(req)
                    continue
                body = req.WhichOneof("body")
                if body == "header":
                    sender = req.header.sender_id or "?"
                    asm.on_header(req.header)
                    size = stream_deadline_s(asm.total_bytes, cfg.rpc_timeout_s, cfg.min_bandwidth_bytes_per_s)
                    deadline = start + size
                elif body == "chunk":
                    asm.on_chunk(req.chunk)
                else:
                    asm.on_chunk(gossip_pb2.Chunk())  # an empty message is a framing error; let the assembler say so
            # Hashing is incremental; decoding and the finiteness check touch every byte: off the loop when big.
            if asm.total_bytes > (1 << 20):
                received = await asyncio.to_thread(asm.finish)
            else:
                received = asm.finish()
            await self.handlers.deliver(received, peer, identity_of(context))
        except PayloadError as exc:
            del asm  # the partial buffer goes now, not when the aborted call is collected
            self.handlers.rejected(sender, exc, peer)
            raise
        return gossip_pb2.PushResponse(accepted=True, bytes_received=received.nbytes)


def _add_servicer(servicer: GossipServicer, server: grpc.aio.Server) -> None:
    """Like the generated `add_GossipServiceServicer_to_server`, with deserializers that never raise."""
    pb = gossip_pb2
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Hello": grpc.unary_unary_rpc_method_handler(
            servicer.Hello,
            request_deserializer=_lenient(pb.HelloRequest.FromString, "peer.v1.HelloRequest"),
            response_serializer=pb.HelloResponse.SerializeToString,
        ),
        "Push": grpc.stream_unary_rpc_method_handler(
            servicer.Push,
            request_deserializer=_push_request,
            response_serializer=pb.PushResponse.SerializeToString,
        ),
        "GetStatus": grpc.unary_unary_rpc_method_handler(
            servicer.GetStatus,
            request_deserializer=_lenient(pb.GetStatusRequest.FromString, "peer.v1.GetStatusRequest"),
            response_serializer=pb.GetStatusResponse.SerializeToString,
        ),
        "FetchState": grpc.unary_stream_rpc_method_handler(
            servicer.FetchState,
            request_deserializer=_lenient(pb.FetchStateRequest.FromString, "peer.v1.FetchStateRequest"),
            response_serializer=pb.FetchStateResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


async def _refuse_undecodable(context: grpc.aio.ServicerContext, what: str) -> NoReturn:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request does not parse as {what}")
    raise AssertionError("unreachable: abort raises")


def _add_health_and_reflection(hs: health.aio.HealthServicer, server: grpc.aio.Server) -> None:
    """Like `add_HealthServicer_to_server` and `enable_server_reflection`, with deserializers that never raise:
    undecodable bytes get INVALID_ARGUMENT here too, not UNKNOWN and a traceback."""
    _add_health(hs, server)
    _add_reflection(server)


def _add_health(hs: health.aio.HealthServicer, server: grpc.aio.Server) -> None:
    parse = _lenient(health_pb2.HealthCheckRequest.FromString, "grpc.health.v1.HealthCheckRequest")

    async def check(request: Any, context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        if isinstance(request, Undecodable):
            await _refuse_undecodable(context, request.message_type)
        return await hs.Check(request, context)

    async def watch(request: Any, context: grpc.aio.ServicerContext) -> None:
        if isinstance(request, Undecodable):
            await _refuse_undecodable(context, request.message_type)
        await hs.Watch(request, context)  # the aio servicer writes the stream through the context

    health_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Check": grpc.unary_unary_rpc_method_handler(
            check,
            request_deserializer=parse,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            watch,
            request_deserializer=parse,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(health.SERVICE_NAME, health_handlers),))


def _add_reflection(server: grpc.aio.Server) -> None:
    reflector = reflection.aio.ReflectionServicer(REFLECTED_SERVICES)
    request_name = "grpc.reflection.v1alpha.ServerReflectionRequest"

    async def info(request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            async for req in request_iterator:
                if isinstance(req, Undecodable):
                    await _refuse_undecodable(context, req.message_type)
                yield req

        async for response in reflector.ServerReflectionInfo(requests(), context):
            yield response

    reflection_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            info,
            request_deserializer=_lenient(reflection_pb2.ServerReflectionRequest.FromString, request_name),
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(reflection.SERVICE_NAME, reflection_handlers),)
    )


@dataclass
class Server:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    servicer: GossipServicer
    probe: grpc.aio.Server | None = None  # the plaintext health-only server (`health_listen`)
    probe_port: int = 0

    async def stop(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        if self.probe is not None:
            await self.probe.stop(None)

    async def abort(self) -> None:
        """Stop both servers at once (in-flight calls are cancelled)."""
        await self.server.stop(None)
        if self.probe is not None:
            await self.probe.stop(None)


async def start_server(
    listen: str,
    cfg: GossipConfig,
    handlers: Handlers,
    credentials: Credentials | None = None,
    health_listen: str | None = None,
) -> Server:
    """Bind and start (mutual TLS with `credentials`, else plaintext). A port in use or a bad address raises
    StartupError naming the address. With `health_listen`, a second server answers `grpc.health.v1` alone there,
    in plaintext (for probes without a client certificate), from the same health states."""
    server = grpc.aio.server(options=server_options(cfg))
    servicer = GossipServicer(handlers, cfg)
    _add_servicer(servicer, server)
    hs = health.aio.HealthServicer()
    # Health, and server reflection, so that grpcurl and other generic clients list and call the services without
    # .proto files.
    _add_health_and_reflection(hs, server)
    port = _bind(server, listen, credentials)
    probe, probe_port = None, 0
    if health_listen is not None:
        probe = grpc.aio.server(options=server_options(cfg))
        _add_health(hs, probe)
        probe_port = _bind(probe, health_listen, None)
        await probe.start()
    await server.start()
    # Health per service name: "" is the whole server; each goes NOT_SERVING at a graceful stop.
    for name in HEALTH_SERVICES:
        await hs.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Server(server, hs, port, servicer, probe, probe_port)


def _bind(server: grpc.aio.Server, listen: str, credentials: Credentials | None) -> int:
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
    return port
