"""Property-based tests of the Push assembler (peer.net.assembler), without sockets: every payload the encoder
makes comes back exactly; every mutation of a valid stream, and every arbitrary stream, ends in a `PayloadError`
with a deliberate status or, when the mutation changed nothing that matters, in the same payload; nothing else
is ever raised. Example counts come from the hypothesis profile (tests/conftest.py: `ci`, or `slow` with --slow)."""

from __future__ import annotations

from collections import Counter

import grpc
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peer import PROTOCOL_VERSION
from peer.algorithms.base import Payload
from peer.errors import PayloadError
from peer.net.assembler import Assembler, ReceiveLimits
from peer.net.encoder import encode, iter_requests
from peer.net.wire import Envelope
from peer.v1 import gossip_pb2
from tests.helpers import FUZZ_STATUSES

FP = "fingerprint-0"
ENV = Envelope("sender", FP, "cdl", 1, 1, "127.0.0.1:1", 0)
STATUSES = {c.name for c in grpc.StatusCode} - {"OK", "UNKNOWN", "INTERNAL"}
DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
    torch.int32,
    torch.int64,
    torch.uint8,
]
# Pure: three times the profile's example count.
MANY = settings(max_examples=3 * settings.default.max_examples)


def limits(max_payload_bytes: int = 1 << 20, max_chunk_bytes: int = 1 << 16) -> ReceiveLimits:
    return ReceiveLimits(
        max_payload_bytes=max_payload_bytes,
        max_chunk_bytes=max_chunk_bytes,
        expected_fingerprint=FP,
        expected_algorithm="cdl",
    )


@st.composite
def payloads(draw: st.DrawFn) -> Payload:
    names = draw(st.lists(st.text(min_size=1, max_size=12), min_size=0, max_size=4, unique=True))
    tensors = {}
    for name in names:
        dtype = draw(st.sampled_from(DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 6), max_size=3)))
        n = int(np.prod(shape)) if shape else 1
        if dtype.is_floating_point:
            values = draw(st.lists(st.floats(-1e4, 1e4, width=16), min_size=n, max_size=n))
        else:
            info = torch.iinfo(dtype)
            values = draw(st.lists(st.integers(info.min, info.max), min_size=n, max_size=n))
        tensors[name] = torch.tensor(values, dtype=torch.float64 if dtype.is_floating_point else dtype).reshape(shape)
        tensors[name] = tensors[name].to(dtype)
    kind = draw(st.sampled_from(["state", "delta", "momentum_state"]))
    scalars = draw(st.dictionaries(st.text(max_size=8), st.floats(-1e6, 1e6), max_size=2))
    return Payload(kind, tensors, seq=draw(st.integers(0, 2**40)), round=draw(st.integers(0, 2**31)), scalars=scalars)


def run(requests: list[gossip_pb2.PushRequest], lim: ReceiveLimits) -> Payload | str:
    """The assembled payload, or the status of the PayloadError it was rejected with."""
    asm = Assembler(lim, peer="ipv4:127.0.0.1:1")
    try:
        for r in requests:
            asm.feed(r)
        return asm.finish().payload
    except PayloadError as exc:
        assert exc.status in STATUSES, exc.status
        FUZZ_STATUSES["assembler", exc.status] += 1
        return exc.status


def same(a: Payload, b: Payload) -> bool:
    return (
        a.kind == b.kind
        and a.seq == b.seq
        and a.scalars == b.scalars
        and a.tensors.keys() == b.tensors.keys()
        and all(a.tensors[k].dtype == b.tensors[k].dtype and torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    )


@MANY
@given(payload=payloads(), chunk=st.integers(1, 64))
def test_every_encoded_payload_comes_back_exactly(payload: Payload, chunk: int) -> None:
    header, chunks = encode(ENV, payload, chunk_bytes=chunk)
    out = run(list(iter_requests(header, chunks)), limits())
    assert isinstance(out, Payload), out
    FUZZ_STATUSES["assembler", "OK"] += 1
    assert same(out, payload)


MUTATIONS = ["flip_byte", "drop_chunk", "swap_chunks", "repeat_chunk", "second_header", "total_bytes", "truncate_sha"]


@MANY
@given(payload=payloads(), chunk=st.integers(1, 64), mutation=st.sampled_from(MUTATIONS), data=st.data())
def test_every_mutated_stream_is_refused_or_unchanged(
    payload: Payload, chunk: int, mutation: str, data: st.DataObject
) -> None:
    header, chunks = encode(ENV, payload, chunk_bytes=chunk)
    requests = list(iter_requests(header, chunks))
    body = requests[1:]
    if mutation == "flip_byte" and body:
        i = data.draw(st.integers(0, len(body) - 1))
        raw = bytearray(body[i].chunk.data)
        j = data.draw(st.integers(0, len(raw) - 1))
        raw[j] ^= data.draw(st.integers(1, 255))
        body[i] = gossip_pb2.PushRequest(chunk=gossip_pb2.Chunk(index=body[i].chunk.index, data=bytes(raw)))
    elif mutation == "drop_chunk" and body:
        del body[data.draw(st.integers(0, len(body) - 1))]
    elif mutation == "swap_chunks" and len(body) > 1:
        i, j = data.draw(st.lists(st.integers(0, len(body) - 1), min_size=2, max_size=2, unique=True))
        body[i], body[j] = body[j], body[i]
    elif mutation == "repeat_chunk" and body:
        body.insert(data.draw(st.integers(0, len(body))), body[data.draw(st.integers(0, len(body) - 1))])
    elif mutation == "second_header":
        body.insert(data.draw(st.integers(0, len(body))), requests[0])
    elif mutation == "total_bytes":
        h = gossip_pb2.PushHeader()
        h.CopyFrom(header)
        h.total_bytes = data.draw(st.integers(0, 2**63 - 1))
        requests[0] = gossip_pb2.PushRequest(header=h)
    elif mutation == "truncate_sha":
        h = gossip_pb2.PushHeader()
        h.CopyFrom(header)
        h.sha256 = header.sha256[: data.draw(st.integers(0, 31))]
        requests[0] = gossip_pb2.PushRequest(header=h)
    out = run([requests[0], *body], limits())
    if isinstance(out, Payload):
        # Only mutations that had nothing to act on (an empty payload has no chunk) leave it whole.
        FUZZ_STATUSES["assembler", "OK"] += 1
        assert same(out, payload), mutation


@st.composite
def stream_message(draw: st.DrawFn) -> gossip_pb2.PushRequest:
    kind = draw(st.sampled_from(["header", "chunk", "empty"]))
    if kind == "header":
        spec = st.builds(
            gossip_pb2.TensorSpec,
            name=st.text(max_size=8),
            shape=st.lists(st.integers(0, 2**20), max_size=3),
            dtype=st.integers(0, 12),
            offset=st.integers(0, 2**20),
            nbytes=st.integers(0, 2**20),
            encoding=st.integers(0, 8),
        )
        header = gossip_pb2.PushHeader(
            sender_id=draw(st.text(max_size=8)),
            schema_fingerprint=draw(st.sampled_from([FP, "other"])),
            algorithm=draw(st.sampled_from(["cdl", "dpsgd"])),
            protocol_version=draw(st.sampled_from([PROTOCOL_VERSION, "0"])),
            total_bytes=draw(st.integers(0, 2**21)),
            sha256=draw(st.binary(min_size=0, max_size=33)),
            kind=draw(st.integers(0, 10)),
            encoding=draw(st.integers(0, 8)),
            tensors=draw(st.lists(spec, max_size=3)),
        )
        return gossip_pb2.PushRequest(header=header)
    if kind == "chunk":
        chunk = gossip_pb2.Chunk(index=draw(st.integers(0, 4)), data=draw(st.binary(max_size=512)))
        return gossip_pb2.PushRequest(chunk=chunk)
    return gossip_pb2.PushRequest()


@MANY
@given(requests=st.lists(stream_message(), max_size=6), max_chunk=st.integers(1, 1024))
def test_arbitrary_streams_raise_only_payload_errors(requests: list[gossip_pb2.PushRequest], max_chunk: int) -> None:
    out = run(requests, limits(max_payload_bytes=1 << 20, max_chunk_bytes=max_chunk))
    if isinstance(out, Payload):
        FUZZ_STATUSES["assembler", "OK"] += 1


def test_fuzz_statuses_are_recorded() -> None:
    """Runs last in this module: the suites above saw both outcomes."""
    seen: Counter[str] = Counter({s: n for (where, s), n in FUZZ_STATUSES.items() if where == "assembler"})
    assert seen["OK"] > 0 and seen["INVALID_ARGUMENT"] > 0, seen
