"""Property-based hostile input over every RPC of one real daemon (hypothesis): whatever arrives, the answer is
never UNKNOWN or INTERNAL, the daemon keeps serving and training, its peer table stays bounded, and its log output
stays bounded. The daemon runs on its own event loop in a thread; the examples are blocking gRPC calls. Its
request rate limit is raised so that the examples reach the handlers (the limiter has its own tests in
test_hostile.py), and its refusals are not held (the tarpit has its own, test_tarpit.py). Example counts come
from the hypothesis profile (tests/conftest.py); every case's status is counted in `tests.helpers.FUZZ_STATUSES`
and printed at the end of the run."""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from peer import PROTOCOL_VERSION
from peer.daemon.node import Node
from peer.v1 import gossip_pb2
from tests.helpers import FUZZ_STATUSES, fast_config, unique

pytestmark = pytest.mark.timeout(180)

SERVICE = "/peer.v1.GossipService/"
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
MAX_PEERS = 16
EXAMPLES = settings()  # the loaded profile's (tests/conftest.py)
HEALTH = "/grpc.health.v1.Health/"
U64 = st.integers(0, 2**64 - 1)


class LogBytes(logging.Handler):
    """Counts what the daemon would write at its default level (info), and any traceback."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.bytes = 0
        self.tracebacks = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.bytes += len(record.getMessage()) + 60  # the message plus a timestamp, level and names
        if record.exc_info:
            self.tracebacks += 1


@dataclass
class Daemon:
    node: Node
    loop: asyncio.AbstractEventLoop
    channel: grpc.Channel
    log: LogBytes

    def _seen(self, rpc: str, code: grpc.StatusCode) -> grpc.StatusCode:
        FUZZ_STATUSES[rpc, code.name] += 1
        return code

    def call(self, method: str, request: bytes, prefix: str = SERVICE) -> grpc.StatusCode:
        try:
            self.channel.unary_unary(prefix + method)(request, timeout=5)
        except grpc.RpcError as exc:
            return self._seen(method, exc.code())  # type: ignore[attr-defined]
        return self._seen(method, grpc.StatusCode.OK)

    def stream(self, requests: list[bytes]) -> grpc.StatusCode:
        try:
            self.channel.stream_unary(SERVICE + "Push")(iter(requests), timeout=5)
        except grpc.RpcError as exc:
            return self._seen("Push", exc.code())  # type: ignore[attr-defined]
        return self._seen("Push", grpc.StatusCode.OK)

    def fetch(self, request: bytes) -> grpc.StatusCode:
        try:
            for _ in self.channel.unary_stream(SERVICE + "FetchState")(request, timeout=5):
                pass
        except grpc.RpcError as exc:
            return self._seen("FetchState", exc.code())  # type: ignore[attr-defined]
        return self._seen("FetchState", grpc.StatusCode.OK)

    def watch(self, request: bytes, timeout_s: float) -> grpc.StatusCode:
        """Health Watch: a stream that lasts until the deadline for a valid request (DEADLINE_EXCEEDED)."""
        try:
            for _ in self.channel.unary_stream(HEALTH + "Watch")(request, timeout=timeout_s):
                pass
        except grpc.RpcError as exc:
            return self._seen("Watch", exc.code())  # type: ignore[attr-defined]
        return self._seen("Watch", grpc.StatusCode.OK)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp: Path = tmp_path_factory.mktemp("props")
    cfg = fast_config(
        tmp,
        unique("victim"),
        train={"epochs": 1000},
        membership={"max_peers": MAX_PEERS},
        # Refusals answered at once (tarpit off): its holds have their own test (test_tarpit.py).
        gossip={"requests_per_s_per_peer": 10_000, "request_burst": 10_000, "tarpit_delay_s": 0},
    )
    node = Node(cfg, stdout=io.StringIO())
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(node.run(),), daemon=True)
    log = LogBytes()
    root = logging.getLogger()
    root.addHandler(log)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(node.ready.wait(), loop).result(60)
        with grpc.insecure_channel(node.address) as channel:
            yield Daemon(node, loop, channel, log)
    finally:
        root.removeHandler(log)
        loop.call_soon_threadsafe(node.request_stop)
        thread.join(30)
        loop.close()


def _text(limit: int = 300) -> st.SearchStrategy[str]:
    return st.text(max_size=limit)


@EXAMPLES
@given(method=st.sampled_from(["Hello", "GetStatus", "Push", "FetchState"]), data=st.binary(max_size=2048))
def test_any_bytes_on_any_rpc(daemon: Daemon, method: str, data: bytes) -> None:
    if method == "Push":
        code = daemon.stream([data])
    elif method == "FetchState":
        code = daemon.fetch(data)
    else:
        code = daemon.call(method, data)
    assert code not in NEVER


@EXAMPLES
@given(
    node_id=st.one_of(_text(), st.just("victim"), st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True)),
    protocol=st.one_of(st.just(PROTOCOL_VERSION), _text()),
    own_fingerprint=st.booleans(),
    fingerprint=_text(),
    algorithm=st.one_of(st.just("cdl"), _text()),
    degree=st.integers(0, 2**32 - 1),
    address=st.one_of(_text(), st.builds(lambda p: f"127.0.0.1:{p}", st.integers(0, 70000))),
    incarnation=U64,
    step=U64,
    epoch=st.floats(allow_nan=True, allow_infinity=True),
    claim_our_id=st.booleans(),
)
def test_hostile_hellos(
    daemon: Daemon,
    node_id: str,
    protocol: str,
    own_fingerprint: bool,
    fingerprint: str,
    algorithm: str,
    degree: int,
    address: str,
    incarnation: int,
    step: int,
    epoch: float,
    claim_our_id: bool,
) -> None:
    node = daemon.node
    request = gossip_pb2.HelloRequest(
        node_id=node.cfg.node_id if claim_our_id else node_id,
        protocol_version=protocol,
        schema_fingerprint=node.fingerprint if own_fingerprint else fingerprint,
        algorithm=algorithm,
        degree=degree,
        address=address,
        incarnation=incarnation,
        step=step,
        epoch=epoch,
    )
    assert daemon.call("Hello", request.SerializeToString()) not in NEVER
    assert len(node.core.peers) <= MAX_PEERS


@EXAMPLES
@given(node_id=_text(), own_fingerprint=st.booleans(), fingerprint=_text())
def test_hostile_fetches(daemon: Daemon, node_id: str, own_fingerprint: bool, fingerprint: str) -> None:
    fp = daemon.node.fingerprint if own_fingerprint else fingerprint
    request = gossip_pb2.FetchStateRequest(node_id=node_id, schema_fingerprint=fp)
    assert daemon.fetch(request.SerializeToString()) not in NEVER


_tensor = st.builds(
    gossip_pb2.TensorSpec,
    name=st.one_of(st.just("params"), _text(40)),
    shape=st.lists(st.integers(0, 2**40), max_size=4),
    dtype=st.integers(0, 12),
    offset=st.integers(0, 2**40),
)


@st.composite
def _push_message(draw: st.DrawFn, fingerprint: str) -> bytes:
    kind = draw(st.sampled_from(["header", "chunk", "empty", "bytes"]))
    if kind == "header":
        header = gossip_pb2.PushHeader(
            sender_id=draw(_text(100)),
            schema_fingerprint=draw(st.one_of(st.just(fingerprint), _text(40))),
            algorithm=draw(st.one_of(st.just("cdl"), _text(20))),
            protocol_version=draw(st.one_of(st.just(PROTOCOL_VERSION), _text(20))),
            incarnation=draw(U64),
            seq=draw(U64),
            total_bytes=draw(st.one_of(st.just(2600), st.integers(0, 2**63 - 1))),
            sha256=draw(st.binary(max_size=40)),
            kind=draw(st.integers(0, 10)),
            encoding=draw(st.integers(0, 8)),
            tensors=draw(st.lists(_tensor, max_size=3)),
        )
        return gossip_pb2.PushRequest(header=header).SerializeToString()
    if kind == "chunk":
        chunk = gossip_pb2.Chunk(index=draw(st.integers(0, 2**32 - 1)), data=draw(st.binary(max_size=4096)))
        return gossip_pb2.PushRequest(chunk=chunk).SerializeToString()
    if kind == "empty":
        return b""
    return draw(st.binary(max_size=256))


@EXAMPLES
@given(data=st.data())
def test_hostile_push_streams(daemon: Daemon, data: st.DataObject) -> None:
    messages = data.draw(st.lists(_push_message(daemon.node.fingerprint), max_size=6))
    assert daemon.stream(messages) not in NEVER


@EXAMPLES
@given(service=st.one_of(st.sampled_from(["", "peer.v1.GossipService", "nope"]), _text(100)), raw=st.booleans())
def test_health_checks(daemon: Daemon, service: str, raw: bool) -> None:
    request = health_pb2.HealthCheckRequest(service=service).SerializeToString()
    code = daemon.call("Check", request + b"\xff" if raw else request, prefix=HEALTH)
    assert code not in NEVER
    if not raw:  # a known name is SERVING, an unknown one NOT_FOUND
        assert code in {grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND}, code
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, code


# A Watch lasts until its deadline: a tenth of the examples.
@settings(max_examples=max(10, settings.default.max_examples // 10))
@given(service=st.one_of(st.sampled_from(["", "nope"]), _text(50)), data=st.binary(max_size=64), raw=st.booleans())
def test_health_watches(daemon: Daemon, service: str, data: bytes, raw: bool) -> None:
    request = data if raw else health_pb2.HealthCheckRequest(service=service).SerializeToString()
    assert daemon.watch(request, timeout_s=0.05) not in NEVER


def test_after_all_that_the_daemon_serves_trains_and_stayed_quiet(daemon: Daemon) -> None:
    """Runs last in this module (pytest keeps file order)."""
    node = daemon.node
    health = health_pb2_grpc.HealthStub(daemon.channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == 1
    step = node.trainer.step_count
    wait = node.wait_for(lambda: node.trainer.step_count > step, 10, "training to go on")
    asyncio.run_coroutine_threadsafe(wait, daemon.loop).result(15)
    assert node._fatal is None and not node._stop.is_set()
    assert len(node.core.peers) <= MAX_PEERS
    assert daemon.log.tracebacks == 0
    # Thousands of hostile requests: refusals are logged once per source and reason per interval, with a line
    # budget.
    assert daemon.log.bytes < 20_000, daemon.log.bytes
    assert sum(node.counters.rejected.values()) > 0
