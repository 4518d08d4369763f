"""peer.net.{wire,encoder,assembler}: round trips and every rejection, without sockets; plus generated-code checks."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from peer import PROTOCOL_VERSION
from peer.errors import (
    CorruptPayloadError,
    IncompleteStreamError,
    PayloadError,
    PayloadTooLargeError,
    SchemaMismatchError,
)
from peer.net.assembler import Assembler, Received, ReceiveLimits
from peer.net.encoder import encode, iter_requests
from peer.net.wire import MIB, Envelope, Payload, decode_header_envelope, tensor_manifest
from peer.v1 import gossip_pb2

ROOT = Path(__file__).resolve().parents[1]
FP = "3f2a9bc1d00d"
ALGO = "cdl"
SENDER = "node-b"
ENV = Envelope(
    sender_id=SENDER,
    schema_fingerprint=FP,
    algorithm=ALGO,
    incarnation=1_700_000_000_123,
    sender_degree=3,
    sender_address="10.0.0.2:50051",
    sent_unix_ms=1_700_000_000_456,
)

# The gRPC status each error class answers with.
PRECONDITION = "FAILED_PRECONDITION"
EXHAUSTED = "RESOURCE_EXHAUSTED"
INVALID = "INVALID_ARGUMENT"


def model_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "fc1.weight": torch.randn(40, 25, generator=g),
        "fc1.bias": torch.randn(25, generator=g),
        "fc2.weight": torch.randn(25, 10, generator=g).to(torch.float64),
        "bn.num_batches_tracked": torch.tensor(17, dtype=torch.int64),
    }


def payload(tensors: dict[str, torch.Tensor] | None = None, kind: str = "state") -> Payload:
    return Payload(
        kind=kind,
        tensors=model_tensors() if tensors is None else tensors,
        seq=12,
        round=3,
        step=480,
        scalars={"weight": 0.25, "mass": 1.5},
    )


def limits(**overrides: object) -> ReceiveLimits:
    base = ReceiveLimits(
        max_payload_bytes=4 * MIB,
        max_chunk_bytes=MIB,
        expected_fingerprint=FP,
        expected_algorithm=ALGO,
        expected_tensors=tensor_manifest(model_tensors()),
    )
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


def receive(header: gossip_pb2.PushHeader, chunks: list[bytes], lim: ReceiveLimits | None = None) -> Received:
    asm = Assembler(lim or limits(), peer="ipv4:10.0.0.2:40000")
    asm.on_header(header)
    for index, data in enumerate(chunks):
        asm.on_chunk(gossip_pb2.Chunk(index=index, data=data))
    return asm.finish()


def receiving(
    header: gossip_pb2.PushHeader, chunks: list[bytes], lim: ReceiveLimits | None = None
) -> Callable[[], Received]:
    return lambda: receive(header, chunks, lim)


def rejected(
    cls: type[PayloadError], status: str, match: str, fn: Callable[[], object], *, sender: str = SENDER
) -> PayloadError:
    with pytest.raises(cls, match=match) as info:
        fn()
    assert type(info.value) is cls
    assert info.value.status == status
    assert str(info.value).startswith(f"push from {sender} rejected: ")
    return info.value


# ---------------------------------------------------------------- round trips


def assert_same(sent: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(sent)
    for name, tensor in sent.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


def test_round_trip_many_chunks() -> None:
    sent = payload()
    header, chunks = encode(ENV, sent, chunk_bytes=1000)
    assert len(chunks) == math.ceil(header.total_bytes / 1000) > 3
    assert all(len(c) == 1000 for c in chunks[:-1])
    assert sum(len(c) for c in chunks) == header.total_bytes
    got = receive(header, chunks)
    assert got.envelope == ENV
    assert got.nbytes == header.total_bytes
    assert (got.payload.kind, got.payload.seq, got.payload.round, got.payload.step) == ("state", 12, 3, 480)
    assert got.payload.scalars == {"weight": 0.25, "mass": 1.5}
    assert_same(sent.tensors, got.payload.tensors)


@pytest.mark.parametrize("kind", ["state", "delta", "token", "admm", "push_sum", "momentum_state", "tracker"])
def test_every_kind_survives(kind: str) -> None:
    header, chunks = encode(ENV, payload(kind=kind), chunk_bytes=4096)
    assert receive(header, chunks).payload.kind == kind


def test_every_dtype_and_odd_shapes_round_trip() -> None:
    sent = {
        "f16": torch.randn(7, 3).half(),
        "bf16": torch.randn(33).to(torch.bfloat16),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "i32": torch.tensor([[-(2**31), 2**31 - 1]], dtype=torch.int32),
        "u8": torch.arange(256, dtype=torch.uint8),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "strided": torch.randn(6, 5).t(),  # non-contiguous on the sending side
    }
    header, chunks = encode(ENV, payload(sent), chunk_bytes=7)  # odd chunk size splits elements
    assert_same(sent, receive(header, chunks, limits(expected_tensors=tensor_manifest(sent))).payload.tensors)


def test_stream_via_iter_requests_and_feed() -> None:
    sent = payload()
    header, chunks = encode(ENV, sent, chunk_bytes=1000)
    requests = list(iter_requests(header, chunks))
    assert requests[0].WhichOneof("body") == "header"
    assert [r.chunk.index for r in requests[1:]] == list(range(len(chunks)))
    asm = Assembler(limits())
    for request in requests:
        asm.feed(request)
    assert asm.sender == SENDER and asm.total_bytes == asm.bytes_received == header.total_bytes
    assert_same(sent.tensors, asm.finish().payload.tensors)


def test_chunks_are_a_snapshot_and_received_tensors_are_independent() -> None:
    sent = payload()
    original = {k: v.clone() for k, v in sent.tensors.items()}
    header, chunks = encode(ENV, sent, chunk_bytes=1000)
    sent.tensors["fc1.weight"].add_(1.0)  # the sender keeps training after encoding
    got = receive(header, chunks).payload.tensors
    assert_same(original, got)
    got["fc1.bias"].mul_(0)  # writable, owns its memory
    assert torch.equal(receive(header, chunks).payload.tensors["fc1.bias"], original["fc1.bias"])


def test_empty_payload_has_no_chunks() -> None:
    header, chunks = encode(ENV, payload({}, kind="token"), chunk_bytes=1000)
    assert header.total_bytes == 0 and chunks == []
    got = receive(header, chunks, limits(expected_tensors=None))
    assert got.payload.tensors == {} and got.payload.scalars == {"weight": 0.25, "mass": 1.5}


def test_header_fields() -> None:
    header, _ = encode(ENV, payload(), chunk_bytes=1000)
    assert header.protocol_version == PROTOCOL_VERSION == "peer.v1.1"
    assert header.encoding == gossip_pb2.ENCODING_RAW and header.kind == gossip_pb2.PAYLOAD_KIND_STATE
    assert header.HasField("crc32") and not header.sha256
    assert [t.offset for t in header.tensors] == [0, 4000, 4100, 6100]
    assert decode_header_envelope(header) == ENV


def test_expected_tensors_none_skips_the_shape_check() -> None:
    header, chunks = encode(ENV, payload({"anything": torch.ones(3)}), chunk_bytes=1000)
    assert "anything" in receive(header, chunks, limits(expected_tensors=None)).payload.tensors


def test_expected_by_kind_overrides_expected_tensors() -> None:
    tracker = {"params": torch.ones(5), "tracker": torch.zeros(5)}
    lim = limits(expected_by_kind={"tracker": tensor_manifest(tracker)})
    header, chunks = encode(ENV, payload(tracker, kind="tracker"), chunk_bytes=1000)
    assert set(receive(header, chunks, lim).payload.tensors) == {"params", "tracker"}
    header, chunks = encode(ENV, payload(tracker, kind="state"), chunk_bytes=1000)  # state uses the default
    rejected(SchemaMismatchError, PRECONDITION, "tensor names differ", receiving(header, chunks, lim))


def test_tensor_manifest_of_a_module() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    manifest = tensor_manifest(model)
    assert manifest["0.weight"] == ((3, 4), "float32")
    assert manifest["1.num_batches_tracked"] == ((), "int64")


def test_encode_refuses_what_it_cannot_send() -> None:
    with pytest.raises(ValueError, match="unknown payload kind 'gradient'"):
        encode(ENV, payload(kind="gradient"))
    with pytest.raises(ValueError, match=r"dtype torch\.bool cannot be sent"):
        encode(ENV, payload({"mask": torch.ones(3, dtype=torch.bool)}))
    with pytest.raises(ValueError, match="chunk_bytes must be positive"):
        encode(ENV, payload(), chunk_bytes=0)


# ---------------------------------------------------------------- schema mismatch (FAILED_PRECONDITION)


def test_wrong_fingerprint() -> None:
    header, chunks = encode(dataclasses.replace(ENV, schema_fingerprint="ffff0000"), payload())
    rejected(SchemaMismatchError, PRECONDITION, "fingerprint ffff0000 differs", receiving(header, chunks))


def test_wrong_algorithm() -> None:
    header, chunks = encode(dataclasses.replace(ENV, algorithm="dsgd"), payload())
    rejected(
        SchemaMismatchError,
        PRECONDITION,
        r"algorithm dsgd differs from ours \(cdl\)",
        receiving(header, chunks),
    )


def test_wrong_protocol_version() -> None:
    header, chunks = encode(ENV, payload())
    header.protocol_version = "peer.v2"
    rejected(SchemaMismatchError, PRECONDITION, "protocol version peer.v2", receiving(header, chunks))


def test_wrong_shape() -> None:
    tensors = model_tensors()
    tensors["fc1.weight"] = tensors["fc1.weight"].reshape(25, 40)
    header, chunks = encode(ENV, payload(tensors))
    rejected(
        SchemaMismatchError,
        PRECONDITION,
        r"tensor fc1.weight is float32\[25, 40\], our model has float32\[40, 25\]",
        receiving(header, chunks),
    )


def test_wrong_dtype() -> None:
    tensors = model_tensors()
    tensors["fc1.bias"] = tensors["fc1.bias"].double()
    header, chunks = encode(ENV, payload(tensors))
    rejected(
        SchemaMismatchError,
        PRECONDITION,
        r"tensor fc1.bias is float64\[25\], our model has float32\[25\]",
        receiving(header, chunks),
    )


def test_unknown_tensor_name() -> None:
    tensors = model_tensors()
    tensors["extra.weight"] = torch.ones(2)
    header, chunks = encode(ENV, payload(tensors))
    rejected(
        SchemaMismatchError,
        PRECONDITION,
        r"missing none, unexpected \[extra.weight\]",
        receiving(header, chunks),
    )


def test_missing_tensor() -> None:
    tensors = model_tensors()
    del tensors["fc2.weight"]
    header, chunks = encode(ENV, payload(tensors))
    rejected(
        SchemaMismatchError,
        PRECONDITION,
        r"missing \[fc2.weight\] \(1\), unexpected none",
        receiving(header, chunks),
    )


@pytest.mark.parametrize("where", ["header", "tensor"])
def test_known_but_unsupported_encoding(where: str) -> None:
    header, chunks = encode(ENV, payload())
    if where == "header":
        header.encoding = gossip_pb2.ENCODING_FP16
    else:
        header.tensors[1].encoding = gossip_pb2.ENCODING_TOPK
    rejected(SchemaMismatchError, PRECONDITION, "accepts ENCODING_RAW only", receiving(header, chunks))


# ---------------------------------------------------------------- size limits (RESOURCE_EXHAUSTED)


def test_declared_size_over_the_limit() -> None:
    header, _ = encode(ENV, payload())
    lim = limits(max_payload_bytes=header.total_bytes - 1)
    asm = Assembler(lim)
    rejected(
        PayloadTooLargeError,
        EXHAUSTED,
        f"declared size {header.total_bytes} bytes exceeds the limit of {header.total_bytes - 1}",
        lambda: asm.on_header(header),
    )


def test_more_bytes_than_declared() -> None:
    header, chunks = encode(ENV, payload(), chunk_bytes=1000)
    rejected(
        PayloadTooLargeError,
        EXHAUSTED,
        f"more than the declared {header.total_bytes} bytes",
        receiving(header, [*chunks, b"\x00" * 8]),
    )


def test_chunk_over_the_chunk_limit() -> None:
    header, chunks = encode(ENV, payload(), chunk_bytes=2000)
    rejected(
        PayloadTooLargeError,
        EXHAUSTED,
        "chunk 0 is 2000 bytes, over the 1000-byte chunk limit",
        lambda: receive(header, chunks, limits(max_chunk_bytes=1000)),
    )


# ---------------------------------------------------------------- corrupt payloads (INVALID_ARGUMENT)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_non_finite_values(bad: float, dtype: torch.dtype) -> None:
    tensors = {"w": torch.zeros(100, dtype=dtype)}
    tensors["w"][57] = bad
    header, chunks = encode(ENV, payload(tensors), chunk_bytes=64)
    lim = limits(expected_tensors=tensor_manifest(tensors))
    rejected(CorruptPayloadError, INVALID, "tensor w has non-finite values", receiving(header, chunks, lim))


def test_nan_message_counts_values() -> None:
    tensors = model_tensors()
    tensors["fc1.bias"][[1, 2]] = math.nan
    tensors["fc1.bias"][3] = math.inf
    header, chunks = encode(ENV, payload(tensors))
    rejected(
        CorruptPayloadError,
        INVALID,
        r"tensor fc1.bias has non-finite values \(2 NaN, 1 Inf of 25\)",
        receiving(header, chunks),
    )


def test_non_finite_scalar() -> None:
    header, chunks = encode(ENV, dataclasses.replace(payload(), scalars={"weight": math.nan}))
    rejected(CorruptPayloadError, INVALID, "scalar weight is nan", receiving(header, chunks))


def _corrupt(chunks: list[bytes]) -> None:
    broken = bytearray(chunks[2])
    broken[17] ^= 0x01
    chunks[2] = bytes(broken)


def _as_before_v1_1(header: gossip_pb2.PushHeader, chunks: list[bytes]) -> None:
    """What a sender before peer.v1.1 declared: a SHA-256 and no CRC-32."""
    header.ClearField("crc32")
    header.sha256 = hashlib.sha256(b"".join(chunks)).digest()


def test_crc32_mismatch() -> None:
    header, chunks = encode(ENV, payload(), chunk_bytes=1000)
    assert header.HasField("crc32") and header.crc32 == zlib.crc32(b"".join(chunks)) and not header.sha256
    _corrupt(chunks)
    expected = rf"crc32 mismatch \(declared {header.crc32:08x}, computed [0-9a-f]{{8}}\)"
    rejected(CorruptPayloadError, INVALID, expected, receiving(header, chunks))


def test_a_sha256_from_a_sender_before_v1_1_is_still_checked() -> None:
    header, chunks = encode(ENV, payload(), chunk_bytes=1000)
    _as_before_v1_1(header, chunks)
    got = receive(header, chunks).payload.tensors
    assert got.keys() == model_tensors().keys() and all(torch.equal(got[k], v) for k, v in model_tensors().items())
    _corrupt(chunks)
    expected = rf"sha256 mismatch \(declared {header.sha256.hex()[:12]}\.\., computed [0-9a-f]{{12}}\.\.\)"
    rejected(CorruptPayloadError, INVALID, expected, receiving(header, chunks))


def test_one_well_formed_digest_exactly() -> None:
    header, chunks = encode(ENV, payload())
    header.sha256 = b"\x00" * 32
    rejected(CorruptPayloadError, INVALID, "both crc32 and sha256", receiving(header, chunks))
    header.ClearField("crc32")
    header.sha256 = b"\x00" * 16
    rejected(CorruptPayloadError, INVALID, "sha256 is 16 bytes, not 32", receiving(header, chunks))
    header.sha256 = b""
    rejected(CorruptPayloadError, INVALID, "sha256 is 0 bytes, not 32 \\(and no crc32\\)", receiving(header, chunks))


def test_truncated_stream() -> None:
    header, chunks = encode(ENV, payload(), chunk_bytes=1000)
    got = sum(len(c) for c in chunks[:-1])
    rejected(
        IncompleteStreamError,
        INVALID,
        f"stream truncated: {got} of {header.total_bytes} declared bytes",
        receiving(header, chunks[:-1]),
    )


def test_chunk_before_header_names_the_transport_peer() -> None:
    asm = Assembler(limits(), peer="ipv4:10.0.0.9:5555")
    with pytest.raises(CorruptPayloadError) as info:
        asm.on_chunk(gossip_pb2.Chunk(index=0, data=b"abcd"))
    assert info.value.status == INVALID
    assert str(info.value) == (
        "push from unknown sender at ipv4:10.0.0.9:5555 rejected: chunk 0 arrived before the header"
    )


def test_stream_without_header() -> None:
    asm = Assembler(limits())
    with pytest.raises(CorruptPayloadError, match="stream ended before the header") as info:
        asm.finish()
    assert info.value.status == INVALID


@pytest.mark.parametrize(("good", "bad"), [(0, 1), (1, 0), (1, 2)])
def test_out_of_order_chunk_index(good: int, bad: int) -> None:
    """`good` valid chunks first, then one with index `bad`: skipped, repeated or swapped."""
    header, chunks = encode(ENV, payload(), chunk_bytes=1000)
    asm = Assembler(limits())
    asm.on_header(header)
    for index in range(good):
        asm.on_chunk(gossip_pb2.Chunk(index=index, data=chunks[index]))
    late = gossip_pb2.Chunk(index=bad, data=chunks[bad])
    rejected(
        CorruptPayloadError,
        INVALID,
        rf"chunk index {bad} out of order \(expected {good}\)",
        lambda: asm.on_chunk(late),
    )


def test_duplicate_header() -> None:
    header, _ = encode(ENV, payload())
    asm = Assembler(limits())
    asm.on_header(header)
    rejected(CorruptPayloadError, INVALID, "second header in one stream", lambda: asm.on_header(header))


def test_empty_chunk_and_empty_message() -> None:
    header, _ = encode(ENV, payload())
    asm = Assembler(limits())
    asm.on_header(header)
    rejected(CorruptPayloadError, INVALID, "chunk 0 is empty", lambda: asm.on_chunk(gossip_pb2.Chunk()))
    rejected(
        CorruptPayloadError,
        INVALID,
        "neither a header nor a chunk",
        lambda: asm.feed(gossip_pb2.PushRequest()),
    )


def test_unknown_kind_and_invalid_encoding() -> None:
    header, chunks = encode(ENV, payload())
    header.kind = gossip_pb2.PAYLOAD_KIND_UNSPECIFIED
    rejected(CorruptPayloadError, INVALID, "unknown payload kind 0", receiving(header, chunks))
    header, chunks = encode(ENV, payload())
    header.encoding = gossip_pb2.ENCODING_UNSPECIFIED
    rejected(CorruptPayloadError, INVALID, "invalid encoding ENCODING_UNSPECIFIED", receiving(header, chunks))


def _overlap(h: gossip_pb2.PushHeader) -> None:
    h.tensors[1].offset -= 4


def _gap(h: gossip_pb2.PushHeader) -> None:
    h.tensors[1].offset += 4


def _nbytes(h: gossip_pb2.PushHeader) -> None:
    h.tensors[0].nbytes -= 4


def _duplicate(h: gossip_pb2.PushHeader) -> None:
    h.tensors[1].name = h.tensors[0].name


def _dtype(h: gossip_pb2.PushHeader) -> None:
    h.tensors[0].dtype = gossip_pb2.DTYPE_UNSPECIFIED


def _negative(h: gossip_pb2.PushHeader) -> None:
    h.tensors[1].shape[0] = -25


def _total(h: gossip_pb2.PushHeader) -> None:
    h.total_bytes += 8


def _nameless(h: gossip_pb2.PushHeader) -> None:
    h.tensors[2].name = ""


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (_overlap, r"tensor fc1.bias at offset 3996 overlaps the previous tensor \(ends at 4000\)"),
        (_gap, r"tensor fc1.bias at offset 4004 leaves a gap after byte 4000"),
        (_nbytes, r"tensor fc1.weight declares 3996 bytes but shape \(40, 25\) of float32 needs 4000"),
        (_duplicate, "tensor fc1.weight appears twice"),
        (_dtype, "tensor fc1.weight has unknown dtype 0"),
        (_negative, "negative dimension"),
        (_total, "manifest covers 6108 bytes but total_bytes declares 6116"),
        (_nameless, "manifest entry 2 has no name"),
    ],
)
def test_inconsistent_manifest(mutate: Callable[[gossip_pb2.PushHeader], None], match: str) -> None:
    header, chunks = encode(ENV, payload())
    mutate(header)
    rejected(CorruptPayloadError, INVALID, match, receiving(header, chunks))


def test_hostile_sender_id_is_cut_in_messages() -> None:
    header, chunks = encode(dataclasses.replace(ENV, sender_id="x" * 500 + "\n"), payload())
    header.schema_fingerprint = "other"
    with pytest.raises(SchemaMismatchError) as info:
        receive(header, chunks)
    assert len(str(info.value)) < 250 and "\n" not in str(info.value)


# ---------------------------------------------------------------- generated code


def test_generated_code_imports() -> None:
    from peer.v1 import gossip_pb2_grpc

    assert gossip_pb2.DESCRIPTOR.package == "peer.v1"
    assert gossip_pb2.DESCRIPTOR.services_by_name["GossipService"].full_name == "peer.v1.GossipService"
    assert hasattr(gossip_pb2_grpc, "GossipServiceStub") and hasattr(gossip_pb2_grpc, "GossipServiceServicer")


def test_generated_code_is_up_to_date() -> None:
    pytest.importorskip("grpc_tools")
    pytest.importorskip("mypy_protobuf")
    result = subprocess.run(
        [str(ROOT / "scripts" / "check_protos.sh")], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
