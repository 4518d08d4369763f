"""The Push fast path (issue 11): serialized-once chunk frames, zero-copy parsing, in-place decoding, the sum-based
finiteness check and the digest skip over TLS give the same results, and reject the same inputs, as the slow path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.errors import CorruptPayloadError
from peer.net.assembler import Assembler, Received, ReceiveLimits, _non_finite
from peer.net.encoder import encode, encode_frames, iter_requests
from peer.net.frames import ChunkView, chunk_prefix, parse_chunk_frame
from peer.net.server import Undecodable, _push_request
from peer.net.wire import Envelope, Payload
from peer.v1 import gossip_pb2

ENV = Envelope("node-b", "fp", "cdl", 1, 2, "127.0.0.1:1", 0)


def limits(**kw: object) -> ReceiveLimits:
    return ReceiveLimits(
        max_payload_bytes=1 << 24, max_chunk_bytes=1 << 20, expected_fingerprint="fp", expected_algorithm="cdl", **kw
    )  # type: ignore[arg-type]


def mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "odd": torch.tensor([1, -2, 3], dtype=torch.int8),  # 3 bytes: every later tensor starts misaligned
        "w": torch.randn(7, 5, generator=g),
        "h": torch.randn(9, generator=g).to(torch.float16),
        "b": torch.randn(4, generator=g).to(torch.bfloat16),
        "d": torch.randn(3, 2, generator=g).to(torch.float64),
        "aligned": torch.arange(6, dtype=torch.int64),
    }


def receive_frames(frames: list[bytes], lim: ReceiveLimits | None = None) -> Received:
    """Through the server's own deserializer, as the Push handler feeds the assembler."""
    asm = Assembler(lim or limits())
    for raw in frames:
        msg = _push_request(raw)
        assert not isinstance(msg, Undecodable)
        if isinstance(msg, ChunkView):
            asm.on_chunk(msg)
        else:
            asm.feed(msg)
    return asm.finish()


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 1 << 20])
def test_frames_are_byte_for_byte_the_protobuf_stream(chunk_bytes: int) -> None:
    p = Payload("state", mixed(), seq=3)
    header, chunks = encode(ENV, p, chunk_bytes=chunk_bytes)
    _, frames = encode_frames(ENV, p, chunk_bytes=chunk_bytes)
    assert frames == [r.SerializeToString() for r in iter_requests(header, chunks)]
    for i, raw in enumerate(frames[1:]):
        view = parse_chunk_frame(raw)
        assert view is not None and view.index == i and bytes(view.data) == chunks[i]
    assert parse_chunk_frame(frames[0]) is None  # the header goes to protobuf


def test_empty_payload_is_just_a_header() -> None:
    _, frames = encode_frames(ENV, Payload("state", {"e": torch.empty(0)}, seq=1))
    assert len(frames) == 1
    assert receive_frames(frames).payload.tensors["e"].numel() == 0


@settings(max_examples=60, deadline=None)
@given(index=st.integers(0, 2**32 - 1), data=st.binary(min_size=1, max_size=300))
def test_parse_agrees_with_protobuf(index: int, data: bytes) -> None:
    raw = gossip_pb2.PushRequest(chunk=gossip_pb2.Chunk(index=index, data=data)).SerializeToString()
    assert chunk_prefix(index, len(data)) + data == raw
    view = parse_chunk_frame(raw)
    assert view is not None and (view.index, bytes(view.data)) == (index, data)


@pytest.mark.parametrize(
    "raw",
    [
        gossip_pb2.PushRequest(chunk=gossip_pb2.Chunk(index=3)).SerializeToString(),  # no data field
        gossip_pb2.Chunk(index=1, data=b"x").SerializeToString(),  # not wrapped in a PushRequest
        # data before index, and an unknown field after data: valid protobuf, not the canonical layout
        b"\x12\x06" + b"\x12\x01x" + b"\x08\x05",
        chunk_prefix(2, 3) + b"abc" + b"\x18\x01",
        chunk_prefix(2, 3) + b"ab",  # truncated
        b"\x12",
        b"",
    ],
)
def test_non_canonical_frames_fall_back_to_protobuf(raw: bytes) -> None:
    assert parse_chunk_frame(raw) is None
    msg = _push_request(raw)
    try:
        expected: object = gossip_pb2.PushRequest.FromString(raw)
    except Exception:
        assert isinstance(msg, Undecodable)
    else:
        assert msg == expected


def test_in_place_decode_equals_the_copying_decode() -> None:
    sent = mixed()
    got = receive_frames(encode_frames(ENV, Payload("state", sent, seq=1), chunk_bytes=5)[1]).payload.tensors
    for name, t in sent.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape
        assert torch.equal(got[name], t), name
    # Aligned tensors are views of the one stream buffer; the misaligned ones are aligned copies.
    assert got["aligned"].untyped_storage().data_ptr() != got["w"].untyped_storage().data_ptr()
    one = {"x": torch.randn(10), "y": torch.randn(6)}
    views = receive_frames(encode_frames(ENV, Payload("state", one, seq=1))[1]).payload.tensors
    assert views["x"].untyped_storage().data_ptr() == views["y"].untyped_storage().data_ptr()
    views["x"].add_(1)  # writable, and writing one tensor leaves its neighbour alone
    assert torch.equal(views["y"], one["y"])


def test_corrupted_last_chunk_is_still_detected() -> None:
    _, frames = encode_frames(ENV, Payload("state", {"w": torch.randn(1000)}, seq=1), chunk_bytes=512)
    last = bytearray(frames[-1])
    last[-1] ^= 0x01
    with pytest.raises(CorruptPayloadError, match="crc32 mismatch"):
        receive_frames([*frames[:-1], bytes(last)])
    # Over TLS (verify_digest=False) the digest is not recomputed: the TLS record layer guards those bytes.
    receive_frames([*frames[:-1], bytes(last)], limits(verify_digest=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_in_the_last_element_is_detected(dtype: torch.dtype, bad: float) -> None:
    t = torch.randn(3000).to(dtype)
    t[-1] = bad
    with pytest.raises(CorruptPayloadError, match="non-finite"):
        receive_frames(encode_frames(ENV, Payload("state", {"w": t}, seq=1), chunk_bytes=1000)[1])


def test_finite_values_whose_sum_overflows_are_accepted() -> None:
    big32 = torch.full((1000,), 3e38)  # sums to inf in float32: the exact slow path must accept it
    big16 = torch.full((5000,), 60000.0, dtype=torch.float16)
    both = torch.tensor([3e38, -3e38, float("inf"), float("nan")])
    assert _non_finite(big32) is None and _non_finite(big16) is None
    assert _non_finite(both) == (1, 1)
    got = receive_frames(encode_frames(ENV, Payload("state", {"a": big32, "b": big16}, seq=1))[1])
    assert torch.equal(got.payload.tensors["a"], big32)


def test_misaligned_float_is_checked_for_finiteness_too() -> None:
    t = torch.ones(5)
    t[2] = float("nan")
    with pytest.raises(CorruptPayloadError, match=r"\(1 NaN, 0 Inf of 5\)"):
        receive_frames(encode_frames(ENV, Payload("state", {"o": torch.ones(1, dtype=torch.int8), "f": t}, seq=1))[1])
