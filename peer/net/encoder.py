"""Named tensors -> one PushHeader plus chunks, and the Push stream that carries them.

Pure: no sockets, clocks or grpc calls; encode once, then stream the same chunks to every neighbour.

Copies: the tensors are read through zero-copy views (`_wire_bytes`) and every byte is copied exactly once, into
the snapshot that is sent (the tensors may change while it travels, so one copy is the minimum). `encode_frames`
makes that one copy the serialized stream message itself, so the sender's Push path copies nothing more in Python
(`encode` + `iter_requests` would copy twice more: into each `Chunk`, then into its serialized form).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from peer import PROTOCOL_VERSION
from peer.algorithms.base import Payload
from peer.net.frames import chunk_prefix
from peer.net.wire import _BY_TORCH, _DTYPES, _KINDS, MIB, Crc32, Envelope, _DType
from peer.v1 import gossip_pb2

__all__ = ["encode", "encode_frames", "iter_requests"]


def _wire_bytes(name: str, tensor: torch.Tensor) -> tuple[_DType, memoryview]:
    """A zero-copy byte view of a tensor in wire layout (a copy only for GPU or non-contiguous tensors)."""
    spec = _BY_TORCH.get(tensor.dtype)
    if spec is None:
        names = ", ".join(d.name for d in _DTYPES)
        raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} cannot be sent; supported: {names}")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if spec.torch_dtype is torch.bfloat16:
        flat = flat.view(torch.int16)  # numpy has no bfloat16; the bit pattern is what travels
    # A no-op on little-endian hosts; a big-endian host pays one byte-swapping copy here.
    arr = flat.numpy().astype(spec.np_wire, copy=False)
    return spec, arr.view(np.uint8).data


def _cut(views: list[memoryview], chunk_bytes: int, *, framed: bool = False) -> list[bytes]:
    """Concatenate the views and cut into chunks, copying each byte exactly once.

    `framed`: each chunk comes out as its whole serialized PushRequest (`chunk_prefix` + data), same single copy.
    """
    total = sum(v.nbytes for v in views)
    chunks: list[bytes] = []
    parts: list[memoryview | bytes] = []
    room = chunk_bytes

    def start() -> None:
        if framed:
            parts.append(chunk_prefix(len(chunks), min(chunk_bytes, total - len(chunks) * chunk_bytes)))

    if total:
        start()
    for view in views:
        pos = 0
        while pos < view.nbytes:
            take = min(room, view.nbytes - pos)
            parts.append(view[pos : pos + take])
            pos += take
            room -= take
            if room == 0:
                chunks.append(b"".join(parts))
                parts, room = [], chunk_bytes
                if len(chunks) * chunk_bytes < total:
                    start()
    if room < chunk_bytes:
        chunks.append(b"".join(parts))
    return chunks


def encode(
    envelope: Envelope, payload: Payload, *, chunk_bytes: int = MIB
) -> tuple[gossip_pb2.PushHeader, list[bytes]]:
    """Header plus chunks for one payload. The chunks are a snapshot: the tensors may change afterwards.

    Encode once and stream the same result to every neighbour. The sender does not check finiteness;
    every receiver does.
    """
    header, views = _header_and_views(envelope, payload, chunk_bytes)
    return header, _cut(views, chunk_bytes)


def encode_frames(
    envelope: Envelope, payload: Payload, *, chunk_bytes: int = MIB
) -> tuple[gossip_pb2.PushHeader, list[bytes]]:
    """Like `encode`, but the whole Push stream as serialized PushRequests: the header's, then one per chunk.

    Byte for byte what `iter_requests(*encode(...))` serializes to, with one copy of the data instead of three.
    """
    header, views = _header_and_views(envelope, payload, chunk_bytes)
    head = gossip_pb2.PushRequest(header=header).SerializeToString()
    return header, [head, *_cut(views, chunk_bytes, framed=True)]


def _header_and_views(
    envelope: Envelope, payload: Payload, chunk_bytes: int
) -> tuple[gossip_pb2.PushHeader, list[memoryview]]:
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    kind = _KINDS.get(payload.kind)
    if kind is None:
        raise ValueError(f"unknown payload kind {payload.kind!r}; valid kinds: {', '.join(_KINDS)}")
    header = gossip_pb2.PushHeader(
        sender_id=envelope.sender_id,
        schema_fingerprint=envelope.schema_fingerprint,
        algorithm=envelope.algorithm,
        protocol_version=PROTOCOL_VERSION,
        incarnation=envelope.incarnation,
        seq=payload.seq,
        step=payload.step,
        round=payload.round,
        kind=kind,
        encoding=gossip_pb2.ENCODING_RAW,
        scalars=payload.scalars,
        sender_degree=envelope.sender_degree,
        sender_address=envelope.sender_address,
        sent_unix_ms=envelope.sent_unix_ms,
    )
    digest = Crc32()
    views: list[memoryview] = []
    offset = 0
    for name, tensor in payload.tensors.items():
        spec, view = _wire_bytes(name, tensor)
        # encoding stays ENCODING_UNSPECIFIED per tensor: it inherits the header's RAW.
        header.tensors.add(name=name, dtype=spec.wire, shape=tensor.shape, offset=offset, nbytes=view.nbytes)
        digest.update(view)
        views.append(view)
        offset += view.nbytes
    header.total_bytes = offset
    header.crc32 = digest.value
    return header, views


def iter_requests(header: gossip_pb2.PushHeader, chunks: Iterable[bytes]) -> Iterator[gossip_pb2.PushRequest]:
    """The Push stream: the header, then the chunks numbered from 0. Lazy, so it can be replayed per peer."""
    yield gossip_pb2.PushRequest(header=header)
    for index, data in enumerate(chunks):
        yield gossip_pb2.PushRequest(chunk=gossip_pb2.Chunk(index=index, data=data))
