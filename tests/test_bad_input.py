"""Bad input gets a clear error and loses nothing.

* invalid configs and unknown names: `peer run` exits 2 naming the file and the field (and the valid names);
* bad pushes to a real daemon over real gRPC: exactly INVALID_ARGUMENT / FAILED_PRECONDITION /
  RESOURCE_EXHAUSTED, the model and the algorithm's cache untouched, the daemon keeps serving, the rejection
  logged once and counted;
* a corrupt checkpoint: exit 3 naming the file and `--reset`, the file kept; `--reset` moves it aside;
* a port in use: exit 4 naming the address.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import math
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import yaml

from peer import PROTOCOL_VERSION
from peer import config as config_mod
from peer.algorithms import REGISTRY
from peer.cli import main as cli_main
from peer.config import GossipConfig
from peer.daemon import checkpoint
from peer.daemon.node import Node
from peer.errors import CheckpointError, StartupError
from peer.learn.data import DATASET_NAMES
from peer.learn.models import MODEL_NAMES
from peer.net.encoder import encode, iter_requests
from peer.net.server import start_server
from peer.net.wire import Envelope, Payload
from peer.v1 import gossip_pb2, gossip_pb2_grpc

pytestmark = pytest.mark.timeout(60)

CHUNK_LIMIT = 16 * 1024  # the smallest gossip.chunk_bytes the config allows
SIZE_LIMIT = 4096  # gossip.max_message_bytes: a logreg on digits (650 float32 = 2600 bytes) fits
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
EVIL = "evil"
INCARNATION = 1_700_000_000_123


def fast_tree(state_dir: Path, **sections: Any) -> dict[str, Any]:
    """A small daemon: logreg on digits, one training step, no mDNS, quick rounds once training is done."""
    tree: dict[str, Any] = {
        "node_id": "victim",
        "state_dir": str(state_dir),
        "listen": "127.0.0.1:0",
        "discovery": {"mdns": False},
        "data": {"dataset": "digits"},
        "model": {"name": "logreg"},
        "train": {"epochs": 0.02, "torch_threads": 1, "device": "cpu"},
        "gossip": {"interval_s": 0.02, "chunk_bytes": CHUNK_LIMIT, "max_message_bytes": SIZE_LIMIT},
        "metrics": {"interval_s": 60.0},
        "checkpoint": {"interval_s": 60.0},
    }
    tree.update(sections)
    return tree


def tiny_npz(path: Path) -> dict[str, Any]:
    """A data section for a daemon subprocess: a small .npz spares it importing scikit-learn for `digits`."""
    x = np.linspace(0.0, 1.0, 40 * 4, dtype=np.float32).reshape(40, 4)
    y = np.arange(40) % 2
    np.savez(path, x=x, y=y, x_test=x[:4], y_test=y[:4])
    return {"path": str(path)}


# ------------------------------------------------------------------------------------- a real receiving daemon
class FakeNeighbour(gossip_pb2_grpc.GossipServiceServicer):
    """The gRPC server behind the bad sender's advertised address, so the victim can greet it (a peer joins only
    once its address answers the victim's Hello) and push back to it."""

    def __init__(self) -> None:
        self.pushes = 0
        self.answer: gossip_pb2.HelloResponse | None = None  # set once the victim's fingerprint is known

    async def Hello(  # noqa: N802 - gRPC method name
        self, request: gossip_pb2.HelloRequest, context: grpc.aio.ServicerContext
    ) -> gossip_pb2.HelloResponse:
        if self.answer is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not ready")
        return self.answer

    async def Push(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[gossip_pb2.PushRequest], context: grpc.aio.ServicerContext
    ) -> gossip_pb2.PushResponse:
        async for _ in request_iterator:
            pass
        self.pushes += 1
        return gossip_pb2.PushResponse(accepted=True)


@dataclasses.dataclass
class Victim:
    node: Node
    stub: gossip_pb2_grpc.GossipServiceStub
    evil_address: str  # where the bad sender's own (fake) server listens

    def envelope(self, sender_id: str = EVIL) -> Envelope:
        return Envelope(
            sender_id=sender_id,
            schema_fingerprint=self.node.fingerprint,
            algorithm=self.node.algorithm.name,
            incarnation=INCARNATION,
            sender_degree=1,
            sender_address=self.evil_address,
            sent_unix_ms=1,
        )

    def params(self) -> torch.Tensor:
        ((shape, dtype),) = self.node.handlers.receive_limits().expected_tensors.values()  # type: ignore[union-attr]
        assert dtype == "float32"
        return torch.linspace(-1.0, 1.0, math.prod(shape)).reshape(shape)

    def encoded(
        self,
        tensors: dict[str, torch.Tensor] | None = None,
        *,
        chunk_bytes: int = 1000,
        seq: int = 1,
        sender_id: str = EVIL,
        scalars: dict[str, float] | None = None,
    ) -> tuple[gossip_pb2.PushHeader, list[bytes]]:
        """A push as a real neighbour encodes it (several chunks), for the test to corrupt."""
        payload = Payload(
            "state",
            tensors if tensors is not None else {"params": self.params()},
            seq=seq,
            step=1,
            scalars=scalars or {},
        )
        return encode(self.envelope(sender_id), payload, chunk_bytes=chunk_bytes)

    def snapshot(self) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.node.trainer.get_flat().clone(), dict(self.node.algorithm.cache)  # type: ignore[attr-defined]


async def push(stub: gossip_pb2_grpc.GossipServiceStub, requests: Iterable[gossip_pb2.PushRequest]) -> Any:
    """The PushResponse, or the grpc.StatusCode the daemon answered with."""

    async def gen() -> AsyncIterator[gossip_pb2.PushRequest]:
        for r in requests:
            yield r

    try:
        return await stub.Push(gen(), timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code()


@pytest.fixture
async def victim(tmp_path: Path) -> AsyncIterator[Victim]:
    evil_server = grpc.aio.server()
    neighbour = FakeNeighbour()
    gossip_pb2_grpc.add_GossipServiceServicer_to_server(neighbour, evil_server)
    evil_port = evil_server.add_insecure_port("127.0.0.1:0")
    await evil_server.start()
    cfg = config_mod.validate(fast_tree(tmp_path / "victim"), source="test")
    node = Node(cfg, stdout=io.StringIO())
    task = asyncio.create_task(node.run())
    channel = None
    try:
        await asyncio.wait_for(node.ready.wait(), timeout=20)
        # Training is one step: from then on the parameters change only by mixing what arrives.
        await node.wait_for(lambda: node.counters.training_done and node.counters.rounds >= 2, 10, "training done")
        neighbour.answer = gossip_pb2.HelloResponse(
            node_id=EVIL,
            protocol_version=PROTOCOL_VERSION,
            schema_fingerprint=node.fingerprint,
            algorithm=node.algorithm.name,
            degree=1,
            address=f"127.0.0.1:{evil_port}",
            incarnation=INCARNATION,
            accepted=True,
        )
        channel = grpc.aio.insecure_channel(node.address)
        yield Victim(node, gossip_pb2_grpc.GossipServiceStub(channel), f"127.0.0.1:{evil_port}")
    finally:
        if channel is not None:
            await channel.close()
        node.request_stop()
        await asyncio.wait_for(task, timeout=20)
        await evil_server.stop(None)


async def assert_untouched_and_serving(
    v: Victim, before: tuple[torch.Tensor, dict[str, Any]], rejected: int | tuple[int, ...]
) -> None:
    """Nothing of the bad push reached the model; the daemon still answers and still takes a good push.
    `rejected`: how many rejections the daemon must have counted (or the values it may have counted)."""
    node = v.node
    rounds = node.counters.rounds
    # Give the training thread two full rounds in which a leaked message would have been mixed.
    await node.wait_for(lambda: node.counters.rounds >= rounds + 2, 10, "two more rounds")
    flat, cache = v.snapshot()
    assert torch.equal(flat, before[0]), "a rejected push changed the model"
    assert cache == before[1] and EVIL not in cache
    assert not node.worker.inbox
    assert EVIL not in node.core.peers, "a rejected push made its sender a neighbour"
    assert node.counters.messages_received == 0
    count = node.counters.rejected_messages
    assert count in ((rejected,) if isinstance(rejected, int) else rejected)

    status = await v.stub.GetStatus(gossip_pb2.GetStatusRequest(), timeout=5)
    assert status.node_id == "victim" and status.rejected_messages == count
    hello = await v.stub.Hello(
        gossip_pb2.HelloRequest(
            node_id=EVIL,
            protocol_version=PROTOCOL_VERSION,
            schema_fingerprint=node.fingerprint,
            algorithm=node.algorithm.name,
            degree=1,
            address=v.evil_address,
            incarnation=INCARNATION,
        ),
        timeout=5,
    )
    assert hello.accepted, hello.reason

    good = v.params()
    header, chunks = v.encoded({"params": good}, seq=7)
    resp = await push(v.stub, iter_requests(header, chunks))
    assert isinstance(resp, gossip_pb2.PushResponse) and resp.accepted, resp
    assert resp.bytes_received == good.numel() * 4
    cache_of = node.algorithm.cache  # type: ignore[attr-defined]
    await node.wait_for(lambda: EVIL in cache_of and node.counters.mixes >= 1, 10, "the good push to be mixed")
    assert torch.equal(cache_of[EVIL].params, good)
    assert not torch.equal(node.trainer.get_flat(), before[0]), "mixing a good push must move the model"
    assert node.counters.rejected_messages == count and node.counters.messages_received == 1


def rejection_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and "rejected a push" in r.getMessage()]


def incomplete_notes(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.INFO and "incomplete push" in r.getMessage()]


# ------------------------------------------------------------------------------------------ bad pushes, one each
def _req(header: gossip_pb2.PushHeader, chunks: list[bytes]) -> list[gossip_pb2.PushRequest]:
    return list(iter_requests(header, chunks))


def _with_header(mutate: Callable[[gossip_pb2.PushHeader], None]) -> Callable[[Victim], list[gossip_pb2.PushRequest]]:
    def build(v: Victim) -> list[gossip_pb2.PushRequest]:
        header, chunks = v.encoded()
        mutate(header)
        return _req(header, chunks)

    return build


def _with_tensors(
    make: Callable[[torch.Tensor], dict[str, torch.Tensor]],
) -> Callable[[Victim], list[gossip_pb2.PushRequest]]:
    def build(v: Victim) -> list[gossip_pb2.PushRequest]:
        return _req(*v.encoded(make(v.params())))

    return build


def _with_chunks(mutate: Callable[[list[bytes]], list[bytes]]) -> Callable[[Victim], list[gossip_pb2.PushRequest]]:
    def build(v: Victim) -> list[gossip_pb2.PushRequest]:
        header, chunks = v.encoded()
        assert len(chunks) >= 3
        return _req(header, mutate(list(chunks)))

    return build


def _set(**fields: Any) -> Callable[[gossip_pb2.PushHeader], None]:
    def mutate(h: gossip_pb2.PushHeader) -> None:
        for key, value in fields.items():
            setattr(h, key, value)

    return mutate


def _first_tensor(**fields: Any) -> Callable[[gossip_pb2.PushHeader], None]:
    def mutate(h: gossip_pb2.PushHeader) -> None:
        for key, value in fields.items():
            if key == "shape":
                del h.tensors[0].shape[:]
                h.tensors[0].shape.extend(value)
            else:
                setattr(h.tensors[0], key, value)

    return mutate


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def _with_value(value: float) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    def make(p: torch.Tensor) -> dict[str, torch.Tensor]:
        p = p.clone()
        p[p.numel() // 2] = value
        return {"params": p}

    return make


def _two_headers(v: Victim) -> list[gossip_pb2.PushRequest]:
    reqs = _req(*v.encoded())
    return [reqs[0], *reqs]


def _chunk_first(v: Victim) -> list[gossip_pb2.PushRequest]:
    reqs = _req(*v.encoded())
    return [*reqs[1:], reqs[0]]


def _chunks_out_of_order(v: Victim) -> list[gossip_pb2.PushRequest]:
    header, chunks = v.encoded()
    order = [1, 0, *range(2, len(chunks))]
    return [
        gossip_pb2.PushRequest(header=header),
        *(gossip_pb2.PushRequest(chunk=gossip_pb2.Chunk(index=i, data=chunks[i])) for i in order),
    ]


def _more_than_declared(v: Victim) -> list[gossip_pb2.PushRequest]:
    """The header honestly declares 2600 bytes; the stream then carries 1000 more."""
    header, chunks = v.encoded()
    return _req(header, [*chunks, b"\0" * 1000])


def _oversized_chunk(v: Victim) -> list[gossip_pb2.PushRequest]:
    """One chunk over gossip.chunk_bytes (the whole payload declared honestly and small)."""
    header, _ = v.encoded()
    return [
        gossip_pb2.PushRequest(header=header),
        gossip_pb2.PushRequest(chunk=gossip_pb2.Chunk(index=0, data=b"\0" * (CHUNK_LIMIT + 1))),
    ]


def _chunk_over_grpc_limit(v: Victim) -> list[gossip_pb2.PushRequest]:
    """One stream message over gRPC's own message limit (8 MiB here): gRPC refuses it before our code."""
    header, _ = v.encoded()
    return [
        gossip_pb2.PushRequest(header=header),
        gossip_pb2.PushRequest(chunk=gossip_pb2.Chunk(index=0, data=b"\0" * (9 << 20))),
    ]


BAD_PUSHES: list[tuple[str, Callable[[Victim], list[gossip_pb2.PushRequest]], grpc.StatusCode]] = [
    # another model, algorithm or protocol: the sender must not retry
    ("wrong-fingerprint", _with_header(_set(schema_fingerprint="0123456789ab")), PRECONDITION),
    ("wrong-algorithm", _with_header(_set(algorithm="none")), PRECONDITION),
    ("wrong-protocol", _with_header(_set(protocol_version="peer.v0")), PRECONDITION),
    ("unsupported-encoding", _with_header(_set(encoding=gossip_pb2.ENCODING_FP16)), PRECONDITION),
    # well-formed, but not the shape / dtype / names of our model
    ("wrong-shape", _with_tensors(lambda p: {"params": p.reshape(2, -1)}), PRECONDITION),
    ("wrong-numel", _with_tensors(lambda p: {"params": p[:-10]}), PRECONDITION),
    ("wrong-dtype", _with_tensors(lambda p: {"params": p.to(torch.float16)}), PRECONDITION),
    ("wrong-dtype-same-width", _with_header(_first_tensor(dtype=gossip_pb2.DTYPE_INT32)), PRECONDITION),
    ("wrong-name", _with_tensors(lambda p: {"weights": p}), PRECONDITION),
    ("extra-tensor", _with_tensors(lambda p: {"params": p, "momentum": torch.zeros(3)}), PRECONDITION),
    # a header that contradicts itself
    ("shape-tampered", _with_header(_first_tensor(shape=[651])), INVALID),
    ("dtype-tampered", _with_header(_first_tensor(dtype=gossip_pb2.DTYPE_FLOAT64)), INVALID),
    ("unknown-dtype", _with_header(_first_tensor(dtype=99)), INVALID),
    ("offset-gap", _with_header(_first_tensor(offset=4)), INVALID),
    ("unknown-kind", _with_header(_set(kind=99)), INVALID),
    ("empty-sender", _with_header(_set(sender_id="")), INVALID),
    ("short-sha256", _with_header(_set(sha256=b"\0" * 16)), INVALID),
    ("total-bytes-below-manifest", _with_header(_set(total_bytes=2000)), INVALID),
    # values
    ("nan", _with_tensors(_with_value(math.nan)), INVALID),
    ("inf", _with_tensors(_with_value(math.inf)), INVALID),
    ("minus-inf", _with_tensors(_with_value(-math.inf)), INVALID),
    ("nan-scalar", lambda v: _req(*v.encoded(scalars={"weight": math.nan})), INVALID),
    # integrity and framing
    ("bad-crc32", _with_header(_set(crc32=0)), INVALID),
    ("flipped-payload-byte", _with_chunks(lambda c: [_flip(c[0], 5), *c[1:]]), INVALID),
    ("truncated", _with_chunks(lambda c: c[:-1]), INVALID),
    ("header-only", _with_chunks(lambda c: []), INVALID),
    ("chunks-out-of-order", _chunks_out_of_order, INVALID),
    ("chunks-swapped", _with_chunks(lambda c: [c[1], c[0], *c[2:]]), INVALID),  # renumbered: the hash catches it
    ("empty-chunk", _with_chunks(lambda c: [c[0], b"", *c[1:]]), INVALID),
    ("empty-stream", lambda v: [], INVALID),
    ("chunk-before-header", _chunk_first, INVALID),
    ("two-headers", _two_headers, INVALID),
    # size
    ("declared-over-max-message-bytes", _with_tensors(lambda p: {"params": torch.zeros(2 * SIZE_LIMIT)}), EXHAUSTED),
    ("total-bytes-lie-over-limit", _with_header(_set(total_bytes=SIZE_LIMIT + 1)), EXHAUSTED),
    ("more-than-declared", _more_than_declared, EXHAUSTED),
    ("oversized-chunk", _oversized_chunk, EXHAUSTED),
    ("chunk-over-grpc-limit", _chunk_over_grpc_limit, EXHAUSTED),
]


# Streams that end early: what a sender's cancelled call looks like too, so they are noted at info level. gRPC
# refuses a message over its own limit before our code and ends the servicer's stream there, so that case reads
# as an incomplete stream as well (the sender still gets RESOURCE_EXHAUSTED from gRPC).
INCOMPLETE = {"truncated", "header-only", "empty-stream", "chunk-over-grpc-limit"}


@pytest.mark.parametrize(
    "build,code,incomplete", [pytest.param(b, c, name in INCOMPLETE, id=name) for name, b, c in BAD_PUSHES]
)
async def test_bad_push_is_rejected_and_loses_nothing(
    victim: Victim,
    build: Callable[[Victim], list[gossip_pb2.PushRequest]],
    code: grpc.StatusCode,
    incomplete: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="peer.daemon.node")
    before = victim.snapshot()
    got = await push(victim.stub, build(victim))
    assert got == code, f"expected {code}, got {got}"
    assert victim.node.counters.rejected_messages == 1
    logged = (incomplete_notes if incomplete else rejection_warnings)(caplog)
    assert len(logged) == 1, [r.getMessage() for r in caplog.records]
    if incomplete:
        assert not rejection_warnings(caplog) and victim.node.counters.rejected == {"push_incomplete": 1}
    await assert_untouched_and_serving(victim, before, rejected=1)


async def test_same_bad_sender_twice_is_logged_once_and_counted_twice(
    victim: Victim, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="peer.daemon.node")
    before = victim.snapshot()
    header, chunks = victim.encoded(_with_value(math.nan)(victim.params()))
    for seq in (1, 2):
        header.seq = seq
        assert await push(victim.stub, iter_requests(header, chunks)) == INVALID
    warnings = rejection_warnings(caplog)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    text = warnings[0].getMessage()
    assert EVIL in text and "non-finite" in text and "INVALID_ARGUMENT" in text
    # Another sender is a new problem: it gets its own warning.
    other, other_chunks = victim.encoded(_with_value(math.nan)(victim.params()), sender_id="mallory")
    assert await push(victim.stub, iter_requests(other, other_chunks)) == INVALID
    assert len(rejection_warnings(caplog)) == 2
    await assert_untouched_and_serving(victim, before, rejected=3)


async def test_sender_that_gives_up_mid_stream_loses_nothing(victim: Victim, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="peer.daemon.node")
    before = victim.snapshot()
    header, chunks = victim.encoded()
    sent_first_chunk = asyncio.Event()

    async def stalled() -> AsyncIterator[gossip_pb2.PushRequest]:
        yield gossip_pb2.PushRequest(header=header)
        yield gossip_pb2.PushRequest(chunk=gossip_pb2.Chunk(index=0, data=chunks[0]))
        sent_first_chunk.set()
        await asyncio.Event().wait()  # never sends the rest

    call = victim.stub.Push(stalled(), timeout=10)
    await asyncio.wait_for(sent_first_chunk.wait(), timeout=5)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    # gRPC ends the servicer's request stream either with a cancellation (not counted) or as a stream that
    # stopped short (counted as a truncated push): both are fine, as long as nothing of it is used. A cancelled
    # call is no hostile input: never a warning (peers that shut down or re-dial cancel their pushes).
    await assert_untouched_and_serving(victim, before, rejected=(0, 1))
    assert not rejection_warnings(caplog), [r.getMessage() for r in rejection_warnings(caplog)]
    assert set(victim.node.counters.rejected) <= {"push_incomplete"}


async def test_valid_push_is_accepted(victim: Victim) -> None:
    """The control case: the same machinery with nothing corrupted is accepted (so the rejections above are
    caused by the corruption, not by the harness)."""
    await assert_untouched_and_serving(victim, victim.snapshot(), rejected=0)


# ------------------------------------------------------------------------------------------------- the CLI
# Each case is a real `python -m peer run` process. They are independent, and each spends its time importing
# torch, so the module-scoped batch starts them all at once and each test then waits for its own.
CliSetup = Callable[[Path, list[socket.socket]], list[str]]


def write_config(path: Path, tree: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    return path


def held_port(hold: list[socket.socket]) -> int:
    """A port on 127.0.0.1 that a plain listening socket keeps busy until the batch is closed."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    hold.append(sock)
    return int(sock.getsockname()[1])


# id, YAML text (None: no file), the field the message must name, another phrase it must contain
BAD_CONFIGS = [  # each run as a real process
    ("unknown-field", "node_id: a\nstate_dir: s\ntrain:\n  epoch: 3\n", "train.epoch", "unknown field"),
    ("wrong-type", "node_id: a\nstate_dir: s\ntrain:\n  epochs: lots\n", "train.epochs", "number"),
    ("missing-node-id", "state_dir: s\n", "node_id", "missing"),
    ("bad-listen", "node_id: a\nstate_dir: s\nlisten: 127.0.0.1:99999\n", "listen", "out of range"),
    ("bad-yaml-syntax", "node_id: a\nstate_dir: s\ntrain: [1, 2\n", "YAML", "line"),
    ("missing-file", None, "not found", "config"),
]
MORE_BAD_CONFIGS = [  # the same path through `peer.cli.main`, in this process (a process each costs seconds)
    ("unknown-section", "node_id: a\nstate_dir: s\ntrian:\n  epochs: 3\n", "trian", "unknown field"),
    ("wrong-type-section", "node_id: a\nstate_dir: s\ngossip: 3\n", "gossip", "valid"),
    ("bad-listen-host", "node_id: a\nstate_dir: s\nlisten: my-host:80\n", "listen", "IP address"),
    ("bad-listen-no-port", "node_id: a\nstate_dir: s\nlisten: 127.0.0.1\n", "listen", "host:port"),
    ("bad-value", "node_id: a\nstate_dir: s\ntrain:\n  lr: -1\n", "train.lr", "greater than 0"),
    ("bad-node-id", "node_id: has space\nstate_dir: s\n", "node_id", "pattern"),
    ("not-a-mapping", "- node_id\n- state_dir\n", "mapping", "config"),
    ("empty-file", "", "node_id", "missing"),
]
UNKNOWN_NAMES = [
    # --set key, the kind the message names, the valid names it must list
    ("data.dataset", "dataset", DATASET_NAMES),
    ("model.name", "model", MODEL_NAMES),
    ("algorithm.name", "algorithm", tuple(REGISTRY)),
]
GARBAGE = b"PK\x03\x04 this is not a checkpoint " + bytes(range(256)) * 2


def _bad_config(text: str | None) -> CliSetup:
    def setup(d: Path, hold: list[socket.socket]) -> list[str]:
        if text is not None:
            (d / "bad.yaml").write_text(text, encoding="utf-8")
        return ["--config", str(d / "bad.yaml")]

    return setup


def _unknown_name(key: str) -> CliSetup:
    def setup(d: Path, hold: list[socket.socket]) -> list[str]:
        data = {} if key.startswith("data.") else {"data": tiny_npz(d / "data.npz")}
        cfg = write_config(d / "peer.yaml", fast_tree(d / "state", **data))
        return ["--config", str(cfg), "--set", f"{key}=nope"]

    return setup


def _with_checkpoint(content: bytes) -> CliSetup:
    def setup(d: Path, hold: list[socket.socket]) -> list[str]:
        (d / "state").mkdir()
        (d / "state" / checkpoint.CHECKPOINT_NAME).write_bytes(content)
        cfg = write_config(d / "peer.yaml", fast_tree(d / "state", data=tiny_npz(d / "data.npz")))
        return ["--config", str(cfg)]

    return setup


def _port_in_use(host: str) -> CliSetup:
    def setup(d: Path, hold: list[socket.socket]) -> list[str]:
        tree = fast_tree(d / "state", listen=f"{host}:{held_port(hold)}", data=tiny_npz(d / "data.npz"))
        return ["--config", str(write_config(d / "peer.yaml", tree))]

    return setup


CLI_CASES: dict[str, CliSetup] = {
    **{f"config-{i}": _bad_config(text) for i, text, _, _ in BAD_CONFIGS},
    **{f"name-{key}": _unknown_name(key) for key, _, _ in UNKNOWN_NAMES},
    "checkpoint-garbage": _with_checkpoint(GARBAGE),
    "port-in-use": _port_in_use("127.0.0.1"),
}


class CliBatch:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.hold: list[socket.socket] = []
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        for name, setup in CLI_CASES.items():
            d = self.dir(name)
            d.mkdir()
            args = setup(d, self.hold)
            with open(d / "stdout.txt", "wb") as out, open(d / "stderr.txt", "wb") as err:
                self.procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "peer", "run", *args],
                    cwd=d,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                )

    def dir(self, name: str) -> Path:
        return self.root / name

    def result(self, name: str, timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
        proc = self.procs[name]
        d = self.dir(name)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(
                f"`peer run` ({name}) still running after {timeout_s} s; stderr:\n{(d / 'stderr.txt').read_text()}"
            ) from None
        return subprocess.CompletedProcess(
            proc.args, proc.returncode, (d / "stdout.txt").read_text(), (d / "stderr.txt").read_text()
        )

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for sock in self.hold:
            sock.close()


@pytest.fixture(scope="module")
def cli() -> Iterator[CliBatch]:
    root = Path(tempfile.mkdtemp(prefix="peer-bad-input-"))
    batch = CliBatch(root)
    try:
        yield batch
    finally:
        batch.close()
        shutil.rmtree(root, ignore_errors=True)


def assert_clean_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert proc.returncode == code, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "peer: error:" in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in stderr:\n{proc.stderr}"
    assert '"event": "ready"' not in proc.stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case,field,phrase", [pytest.param(i, f, p, id=i) for i, _, f, p in BAD_CONFIGS])
def test_invalid_config_exits_2_naming_file_and_field(cli: CliBatch, case: str, field: str, phrase: str) -> None:
    proc = cli.result(f"config-{case}")
    d = cli.dir(f"config-{case}")
    assert_clean_error(proc, 2, str(d / "bad.yaml"), field, phrase)
    assert not (d / "s").exists(), "an invalid config must not create its state_dir"


@pytest.mark.parametrize("text,field,phrase", [pytest.param(t, f, p, id=i) for i, t, f, p in MORE_BAD_CONFIGS])
def test_more_invalid_configs_exit_2_naming_file_and_field(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    text: str,
    field: str,
    phrase: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    code = cli_main(["run", "--config", str(path)])
    out, err = capsys.readouterr()
    assert_clean_error(subprocess.CompletedProcess(["peer", "run"], code, out, err), 2, str(path), field, phrase)
    assert not (tmp_path / "s").exists(), "an invalid config must not create its state_dir"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("key,kind,valid", [pytest.param(k, n, v, id=k) for k, n, v in UNKNOWN_NAMES])
def test_unknown_name_exits_2_listing_valid_names(cli: CliBatch, key: str, kind: str, valid: tuple[str, ...]) -> None:
    proc = cli.result(f"name-{key}")
    assert_clean_error(proc, 2, key, f"unknown {kind} 'nope'", "valid names: " + ", ".join(sorted(valid)))


@pytest.mark.timeout(120)
def test_corrupt_checkpoint_exits_3_and_keeps_the_file(cli: CliBatch) -> None:
    proc = cli.result("checkpoint-garbage")
    state = cli.dir("checkpoint-garbage") / "state"
    ckpt = state / checkpoint.CHECKPOINT_NAME
    assert_clean_error(proc, 3, str(ckpt), "corrupt", "--reset")
    assert ckpt.read_bytes() == GARBAGE, "the corrupt checkpoint was overwritten"
    assert not list(state.glob(f"{checkpoint.CHECKPOINT_NAME}?*")), "nothing may be moved aside without --reset"


async def run_briefly(cfg: config_mod.PeerConfig) -> None:
    """Start a daemon in this process, wait until it serves, stop it (which writes its checkpoint)."""
    node = Node(cfg, stdout=io.StringIO())
    task = asyncio.create_task(node.run())
    try:
        await asyncio.wait_for(node.ready.wait(), timeout=20)
    finally:
        node.request_stop()
        await asyncio.wait_for(task, timeout=20)


def _torch_file(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    "spoil,other,phrase",
    [
        pytest.param(lambda real: real[: len(real) // 2], {}, "corrupt", id="torn-write"),
        pytest.param(lambda real: _torch_file({"weights": torch.zeros(3)}), {}, "unknown format", id="foreign"),
        pytest.param(lambda real: real, {"model": {"name": "mlp"}}, "fingerprint", id="other-model"),
        pytest.param(lambda real: real, {"node_id": "someone-else"}, "node_id", id="other-node"),
    ],
)
async def test_unusable_checkpoint_stops_the_daemon_and_is_kept(
    tmp_path: Path, spoil: Callable[[bytes], bytes], other: dict[str, Any], phrase: str
) -> None:
    """The same refusal, in this process, for a real checkpoint that was torn, replaced, or is another's."""
    await run_briefly(config_mod.validate(fast_tree(tmp_path / "state"), source="test"))
    ckpt = tmp_path / "state" / checkpoint.CHECKPOINT_NAME
    content = spoil(ckpt.read_bytes())
    ckpt.write_bytes(content)
    node = Node(config_mod.validate(fast_tree(tmp_path / "state", **other), source="test"), stdout=io.StringIO())
    with pytest.raises(CheckpointError) as info:
        await asyncio.wait_for(node.run(), timeout=20)
    text = str(info.value)
    assert str(ckpt) in text and phrase in text and "--reset" in text, text
    assert not node.ready.is_set()
    assert ckpt.read_bytes() == content, "the checkpoint was overwritten"
    assert not list(ckpt.parent.glob(f"{checkpoint.CHECKPOINT_NAME}?*"))


@pytest.mark.timeout(120)
def test_port_held_by_a_socket_exits_4(cli: CliBatch) -> None:
    proc = cli.result("port-in-use")
    listen = yaml.safe_load((cli.dir("port-in-use") / "peer.yaml").read_text())["listen"]
    assert_clean_error(proc, 4, f"cannot listen on {listen}", "in use")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_start_server_refuses_a_port_in_use(host: str) -> None:
    """gRPC binds every address a name resolves to and is content with one: "localhost" must not end up on
    [::1] alone while another socket holds 127.0.0.1 on the same port."""
    hold: list[socket.socket] = []
    try:
        listen = f"{host}:{held_port(hold)}"
        with pytest.raises(StartupError, match=f"cannot listen on {listen}: the port is in use"):
            server = await start_server(listen, GossipConfig(), Node.__new__(Node))
            await server.server.stop(None)
    finally:
        for sock in hold:
            sock.close()


async def test_reset_moves_corrupt_checkpoint_aside_and_starts(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    ckpt = state / checkpoint.CHECKPOINT_NAME
    ckpt.write_bytes(GARBAGE)
    cfg = write_config(tmp_path / "peer.yaml", fast_tree(state, data=tiny_npz(tmp_path / "data.npz")))
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "peer",
            "run",
            "--config",
            str(cfg),
            "--reset",
            cwd=tmp_path,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
        )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=40)
        assert b'"event": "ready"' in line, (line, stderr_path.read_text())
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), timeout=15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    stderr = stderr_path.read_text()
    assert rc == 0, stderr
    aside = state / f"{checkpoint.CHECKPOINT_NAME}.discarded.0"
    assert aside.read_bytes() == GARBAGE, "--reset must move the corrupt checkpoint aside, not delete it"
    assert str(aside) in stderr
    # The graceful stop wrote a fresh, loadable checkpoint in its place.
    fresh = checkpoint.load(state)
    assert fresh is not None and fresh["node_id"] == "victim"


async def test_port_held_by_another_daemon_exits_4(victim: Victim, tmp_path: Path) -> None:
    """Two daemons on one port: with SO_REUSEPORT both would bind and share it silently; it is off."""
    listen = f"127.0.0.1:{victim.node.address.rpartition(':')[2]}"
    tree = fast_tree(tmp_path / "second", node_id="second", listen=listen, data=tiny_npz(tmp_path / "data.npz"))
    cfg = write_config(tmp_path / "peer.yaml", tree)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "peer",
        "run",
        "--config",
        str(cfg),
        cwd=tmp_path,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=50)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    result = subprocess.CompletedProcess(["peer", "run"], proc.returncode, out.decode(), err.decode())
    assert_clean_error(result, 4, f"cannot listen on {listen}", "in use")
    # The first daemon is unharmed and still serving.
    status = await victim.stub.GetStatus(gossip_pb2.GetStatusRequest(), timeout=5)
    assert status.node_id == "victim" and status.rejected_messages == 0


async def test_a_refused_push_that_is_still_streaming_gets_the_reason(victim: Victim) -> None:
    """The header is refused at once while the sender still has most of its stream to write. Aborting then raced
    our status with the stream's reset, and the sender saw INTERNAL instead of the reason (about 1 suite run in
    10). The daemon reads the rest of a refused push (bounded) before it answers."""
    header, chunks = victim.encoded()
    header.kind = 99
    requests = _req(header, [c for c in chunks for _ in range(400)])
    codes = [await push(victim.stub, requests) for _ in range(6)]
    assert codes == [INVALID] * 6
