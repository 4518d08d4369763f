"""Every check made on an arriving Push stream, and its reassembly into a validated payload.

Pure: no sockets, clocks or grpc calls; the servicer feeds `Assembler` one stream message at a time.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from peer import PROTOCOL_VERSION
from peer.algorithms.base import Payload
from peer.errors import (
    CorruptPayloadError,
    IncompleteStreamError,
    PayloadError,
    PayloadTooLargeError,
    SchemaMismatchError,
)
from peer.net.wire import (
    _BY_WIRE,
    _KIND_NAMES,
    MIB,
    Crc32,
    Envelope,
    Manifest,
    _DType,
    _encoding_name,
    _hex,
    _show,
    decode_header_envelope,
)
from peer.v1 import gossip_pb2

__all__ = ["Assembler", "ReceiveLimits", "Received"]

_NATIVE_LITTLE = sys.byteorder == "little"
_FINITE_CHUNK = 1 << 20  # elements per isfinite call on the slow path: a bounded temporary, never a full-size one


class _ChunkLike(Protocol):
    """A `Chunk` message, or a `peer.net.frames.ChunkView` (data as a zero-copy view)."""

    @property
    def index(self) -> int: ...
    @property
    def data(self) -> bytes | memoryview: ...


@dataclass(frozen=True)
class Received:
    """An incoming message that passed every check."""

    envelope: Envelope
    payload: Payload
    nbytes: int


@dataclass(frozen=True, kw_only=True)
class ReceiveLimits:
    """What the receiver accepts. `expected_by_kind` overrides `expected_tensors` for the kinds it names."""

    max_payload_bytes: int
    max_chunk_bytes: int = MIB
    expected_fingerprint: str
    expected_algorithm: str
    expected_tensors: Manifest | None = None  # None: any names and shapes (the fingerprint still binds)
    # A kind may list several accepted manifests (e.g. dSSFN's layer 0 and later layers differ in shape).
    expected_by_kind: Mapping[str, Manifest | Sequence[Manifest]] | None = None
    # False only where the transport itself authenticates every byte (mutual TLS: each TLS record carries an AEAD
    # tag, so a corrupted or altered byte fails the record and ends the connection before it reaches us). The
    # header's digest must still be well-formed; it is just not recomputed. See docs/reference/performance.md.
    verify_digest: bool = True


@dataclass(frozen=True)
class _Slot:
    name: str
    dtype: _DType
    shape: tuple[int, ...]
    offset: int
    numel: int


class Assembler:
    """Validates and reassembles one Push stream: `on_header`, `on_chunk`..., then `finish`.

    Memory is bounded by `max_payload_bytes`: the buffer is allocated once the declared size has passed.
    Every rejection is a PayloadError whose `status` is the gRPC code to abort the stream with.

    Cost per byte: each chunk is copied once, into a buffer allocated without zero-filling (`torch.empty`), and
    hashed as it arrives; the decoded tensors are views of that buffer (no second copy) wherever the host is
    little-endian and the tensor's offset is aligned to its element size (else one aligned copy); finiteness
    is checked by a sum (see `_non_finite`), with no full-size temporary.
    """

    def __init__(self, limits: ReceiveLimits, *, peer: str = "") -> None:
        self.limits = limits
        self.peer = peer  # transport address (context.peer()), named in errors raised before the header
        self._header: gossip_pb2.PushHeader | None = None
        self._slots: list[_Slot] = []
        self._buf = torch.empty(0, dtype=torch.uint8)
        self._view = memoryview(b"")
        self._received = 0
        self._next_index = 0
        self._digest: Crc32 | hashlib._Hash = Crc32()  # set from the header: crc32, or sha256 from older senders
        self._done = False

    @property
    def sender(self) -> str:
        """The declared sender id, or "" before the header."""
        return self._header.sender_id if self._header is not None else ""

    @property
    def total_bytes(self) -> int:
        """Declared payload size, 0 before the header."""
        return self._header.total_bytes if self._header is not None else 0

    @property
    def bytes_received(self) -> int:
        """Chunk bytes accepted so far (for PushResponse.bytes_received and the counters)."""
        return self._received

    def _reject(self, cls: type[PayloadError], problem: str) -> PayloadError:
        if self._header is not None:
            who = _show(self._header.sender_id)
        else:
            who = f"unknown sender at {_show(self.peer)}" if self.peer else "unknown sender"
        return cls(f"push from {who} rejected: {problem}")

    def feed(self, request: gossip_pb2.PushRequest) -> None:
        """Dispatch one stream message to on_header or on_chunk."""
        body = request.WhichOneof("body")
        if body == "header":
            self.on_header(request.header)
        elif body == "chunk":
            self.on_chunk(request.chunk)
        else:
            raise self._reject(CorruptPayloadError, "stream message carries neither a header nor a chunk")

    def on_header(self, header: gossip_pb2.PushHeader) -> None:
        if self._done:
            raise self._reject(CorruptPayloadError, "header after the stream was finished")
        if self._header is not None:
            raise self._reject(CorruptPayloadError, "second header in one stream")
        self._header = header  # from here on, errors name the declared sender
        lim = self.limits
        if header.protocol_version != PROTOCOL_VERSION:
            raise self._reject(
                SchemaMismatchError,
                f"protocol version {_show(header.protocol_version)} is not ours ({PROTOCOL_VERSION})",
            )
        if header.schema_fingerprint != lim.expected_fingerprint:
            raise self._reject(
                SchemaMismatchError,
                f"schema fingerprint {_show(header.schema_fingerprint)} differs from ours "
                f"({lim.expected_fingerprint}): the model architecture differs",
            )
        if header.algorithm != lim.expected_algorithm:
            raise self._reject(
                SchemaMismatchError,
                f"algorithm {_show(header.algorithm)} differs from ours ({lim.expected_algorithm})",
            )
        if not header.sender_id:
            raise self._reject(CorruptPayloadError, "header has an empty sender_id")
        kind = _KIND_NAMES.get(header.kind)
        if kind is None:
            raise self._reject(CorruptPayloadError, f"unknown payload kind {header.kind}")
        self._check_encoding(header.encoding, "header", inherit_ok=False)
        if header.total_bytes > lim.max_payload_bytes:
            limit = lim.max_payload_bytes
            problem = f"declared size {header.total_bytes} bytes exceeds the limit of {limit} bytes"
            raise self._reject(PayloadTooLargeError, problem)
        if header.HasField("crc32"):
            if header.sha256:
                raise self._reject(CorruptPayloadError, "header carries both crc32 and sha256; one digest only")
            self._digest = Crc32()
        elif len(header.sha256) != 32:
            raise self._reject(CorruptPayloadError, f"sha256 is {len(header.sha256)} bytes, not 32 (and no crc32)")
        else:
            self._digest = hashlib.sha256()  # a sender before peer.v1.1
        for key, value in header.scalars.items():
            if not math.isfinite(value):
                raise self._reject(CorruptPayloadError, f"scalar {_show(key)} is {value}")
        self._slots = self._check_manifest(header)
        expected: Manifest | Sequence[Manifest] | None = lim.expected_tensors
        if lim.expected_by_kind is not None and kind in lim.expected_by_kind:
            expected = lim.expected_by_kind[kind]
        if isinstance(expected, Mapping):
            self._check_against_model(expected)
        elif expected is not None:
            self._check_against_any(list(expected))
        # No zero-fill: every byte is written by a chunk before `finish` reads it (it checks the count).
        self._buf = torch.empty(header.total_bytes, dtype=torch.uint8)
        self._view = self._buf.numpy().data  # a writable memoryview of the buffer

    def _check_encoding(self, value: int, where: str, *, inherit_ok: bool) -> None:
        if value == gossip_pb2.ENCODING_RAW or (inherit_ok and value == gossip_pb2.ENCODING_UNSPECIFIED):
            return
        if value in gossip_pb2.Encoding.values() and value != gossip_pb2.ENCODING_UNSPECIFIED:
            # A real encoding this build cannot decode: the sender must fall back, not retry.
            problem = f"{where} uses {_encoding_name(value)}; this receiver accepts ENCODING_RAW only"
            raise self._reject(SchemaMismatchError, problem)
        raise self._reject(CorruptPayloadError, f"{where} has invalid encoding {_encoding_name(value)}")

    def _check_manifest(self, header: gossip_pb2.PushHeader) -> list[_Slot]:
        """Names unique, dtypes known, sizes consistent, offsets contiguous from 0 to total_bytes."""
        slots: list[_Slot] = []
        seen: set[str] = set()
        end = 0
        for spec in header.tensors:
            name = spec.name
            if not name:
                raise self._reject(CorruptPayloadError, f"manifest entry {len(slots)} has no name")
            label = f"tensor {_show(name)}"
            if name in seen:
                raise self._reject(CorruptPayloadError, f"{label} appears twice in the manifest")
            seen.add(name)
            dtype = _BY_WIRE.get(spec.dtype)
            if dtype is None:
                raise self._reject(CorruptPayloadError, f"{label} has unknown dtype {spec.dtype}")
            self._check_encoding(spec.encoding, label, inherit_ok=True)
            shape = tuple(spec.shape)
            if any(d < 0 for d in shape):
                raise self._reject(CorruptPayloadError, f"{label} has a negative dimension in shape {shape}")
            numel = math.prod(shape)
            if spec.nbytes != numel * dtype.np_wire.itemsize:
                raise self._reject(
                    CorruptPayloadError,
                    f"{label} declares {spec.nbytes} bytes but shape {shape} of {dtype.name} needs "
                    f"{numel * dtype.np_wire.itemsize}",
                )
            if spec.offset < end:
                problem = f"{label} at offset {spec.offset} overlaps the previous tensor (ends at {end})"
                raise self._reject(CorruptPayloadError, problem)
            if spec.offset > end:
                raise self._reject(
                    CorruptPayloadError, f"{label} at offset {spec.offset} leaves a gap after byte {end}"
                )
            end += spec.nbytes
            slots.append(_Slot(name, dtype, shape, spec.offset, numel))
        if end != header.total_bytes:
            problem = f"manifest covers {end} bytes but total_bytes declares {header.total_bytes}"
            raise self._reject(CorruptPayloadError, problem)
        return slots

    def _check_against_model(self, expected: Manifest) -> None:
        got = {s.name for s in self._slots}
        missing = sorted(set(expected) - got)
        unknown = sorted(got - set(expected))
        if missing or unknown:
            raise self._reject(
                SchemaMismatchError,
                f"tensor names differ from our model: missing {_few(missing)}, unexpected {_few(unknown)}",
            )
        for slot in self._slots:
            shape, dtype = expected[slot.name]
            if slot.shape != tuple(shape) or slot.dtype.name != dtype:
                raise self._reject(
                    SchemaMismatchError,
                    f"tensor {_show(slot.name)} is {slot.dtype.name}{list(slot.shape)}, "
                    f"our model has {dtype}{list(shape)}",
                )

    def _check_against_any(self, manifests: list[Manifest]) -> None:
        first: PayloadError | None = None
        for manifest in manifests:
            try:
                self._check_against_model(manifest)
                return
            except PayloadError as exc:
                first = first or exc
        if first is None:
            raise self._reject(SchemaMismatchError, "this payload kind accepts no tensors")
        raise first

    def on_chunk(self, chunk: _ChunkLike) -> None:
        if self._done:
            raise self._reject(CorruptPayloadError, f"chunk {chunk.index} after the stream was finished")
        if self._header is None:
            raise self._reject(CorruptPayloadError, f"chunk {chunk.index} arrived before the header")
        if chunk.index != self._next_index:
            raise self._reject(
                CorruptPayloadError, f"chunk index {chunk.index} out of order (expected {self._next_index})"
            )
        n = len(chunk.data)
        if n > self.limits.max_chunk_bytes:
            raise self._reject(
                PayloadTooLargeError,
                f"chunk {chunk.index} is {n} bytes, over the {self.limits.max_chunk_bytes}-byte chunk limit",
            )
        if n == 0:
            raise self._reject(CorruptPayloadError, f"chunk {chunk.index} is empty")
        total = self._header.total_bytes
        if self._received + n > total:
            raise self._reject(
                PayloadTooLargeError,
                f"stream carries more than the declared {total} bytes (at least {self._received + n})",
            )
        data = chunk.data
        self._view[self._received : self._received + n] = data
        if self.limits.verify_digest:
            self._digest.update(data)
        self._received += n
        self._next_index += 1

    def _check_digest(self, header: gossip_pb2.PushHeader) -> None:
        if isinstance(self._digest, Crc32):
            if self._digest.value != header.crc32:
                problem = f"crc32 mismatch (declared {header.crc32:08x}, computed {self._digest.value:08x})"
                raise self._reject(CorruptPayloadError, problem)
            return
        computed = self._digest.digest()
        if computed != header.sha256:
            problem = f"sha256 mismatch (declared {_hex(header.sha256)}, computed {_hex(computed)})"
            raise self._reject(CorruptPayloadError, problem)

    def finish(self) -> Received:
        """Check completeness and checksum, decode, check finiteness. CPU-bound for big payloads."""
        if self._done:
            raise RuntimeError("Assembler.finish called twice")
        header = self._header
        if header is None:
            raise self._reject(IncompleteStreamError, "stream ended before the header")
        if self._received < header.total_bytes:
            raise self._reject(
                IncompleteStreamError,
                f"stream truncated: {self._received} of {header.total_bytes} declared bytes arrived "
                f"in {self._next_index} chunks",
            )
        if self.limits.verify_digest:
            self._check_digest(header)
        tensors = {slot.name: self._decode(slot) for slot in self._slots}
        self._done = True
        # The tensors are views of the buffer (or own copies); the assembler lets go of it now.
        self._buf, self._view = torch.empty(0, dtype=torch.uint8), memoryview(b"")
        payload = Payload(
            kind=_KIND_NAMES[header.kind],
            tensors=tensors,
            seq=header.seq,
            round=header.round,
            step=header.step,
            scalars=dict(header.scalars),
        )
        return Received(envelope=decode_header_envelope(header), payload=payload, nbytes=header.total_bytes)

    def _decode(self, slot: _Slot) -> torch.Tensor:
        dt = slot.dtype
        if slot.numel == 0:
            return torch.empty(slot.shape, dtype=dt.torch_dtype)
        size = dt.np_wire.itemsize
        # numpy and torch views, never pickle: the bytes can only ever become numbers.
        if _NATIVE_LITTLE and slot.offset % size == 0:
            # In place: a view of the stream buffer (torch.empty is aligned, so is offset).
            tensor = self._buf[slot.offset : slot.offset + slot.numel * size].view(dt.torch_dtype)
        else:
            # Misaligned or big-endian host: one copy, which astype makes aligned and in native order.
            wire = np.frombuffer(self._view, dtype=dt.np_wire, count=slot.numel, offset=slot.offset)
            tensor = torch.from_numpy(wire.astype(dt.np_wire.newbyteorder("=")))
            if dt.torch_dtype is torch.bfloat16:
                tensor = tensor.view(torch.bfloat16)
        tensor = tensor.reshape(slot.shape)
        if dt.is_float:
            counts = _non_finite(tensor)
            if counts is not None:
                nan, inf = counts
                raise self._reject(
                    CorruptPayloadError,
                    f"tensor {_show(slot.name)} has non-finite values ({nan} NaN, {inf} Inf of {slot.numel})",
                )
        return tensor


def _non_finite(tensor: torch.Tensor) -> tuple[int, int] | None:
    """(NaN count, Inf count) if `tensor` has a non-finite element, else None. Exact, with no full-size temporary.

    Fast path: one sum. NaN and Inf propagate through addition (NaN + x is NaN, Inf + finite is Inf, Inf + -Inf
    is NaN), in any summation order, so a finite sum proves every element finite. Half types are summed in
    float32 so that ordinary values do not overflow. A non-finite sum is either a non-finite element or an
    overflow of finite ones (|sum| > float max): the slow path then checks element by element, in slices of
    `_FINITE_CHUNK` elements, and counts.
    """
    flat = tensor.reshape(-1)
    acc = torch.float64 if tensor.dtype is torch.float64 else torch.float32
    if math.isfinite(float(flat.sum(dtype=acc))):
        return None
    nan = inf = 0
    for start in range(0, flat.numel(), _FINITE_CHUNK):
        part = flat[start : start + _FINITE_CHUNK]
        nan += int(torch.isnan(part).sum())
        inf += int(torch.isinf(part).sum())
    return (nan, inf) if nan or inf else None


def _few(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    shown = ", ".join(_show(n) for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}] ({len(names)})"
