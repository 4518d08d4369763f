"""Push stream messages as wire bytes: chunk frames built in one copy, and parsed without copying.

Pure: no sockets, clocks or grpc calls. A chunk message is `PushRequest{chunk: Chunk{index, data}}`; protobuf would
copy its data three times on the way out (into the `Chunk`, into the serialized string, and the join that cut it)
and twice on the way in (`FromString`, then `.data`). Here the sender writes the serialized form directly, and the
receiver reads `data` as a memoryview into the bytes gRPC handed over. Anything that is not a chunk message in
the exact layout produced here (a header, unknown or repeated fields, another field order) is left to protobuf's
own parser, so what is accepted, and how it is rejected, does not change.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ChunkView", "chunk_prefix", "parse_chunk_frame"]

# PushRequest field 2 (chunk) and Chunk fields 1 (index, varint) and 2 (data, bytes): (field << 3) | wire type.
_TAG_CHUNK = 0x12
_TAG_INDEX = 0x08
_TAG_DATA = 0x12
_MAX_VARINT_BYTES = 10


@dataclass(frozen=True, slots=True)
class ChunkView:
    """A parsed chunk message: `data` is a read-only view into the received frame (no copy)."""

    index: int
    data: memoryview


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def chunk_prefix(index: int, nbytes: int) -> bytes:
    """The bytes before a chunk's data in its serialized PushRequest, exactly as protobuf writes them.

    proto3 omits a zero index, and protobuf's serializer does the same, so the output equals
    `PushRequest(chunk=Chunk(index=index, data=data)).SerializeToString()` byte for byte.
    """
    inner = (bytes([_TAG_INDEX]) + _varint(index) if index else b"") + bytes([_TAG_DATA]) + _varint(nbytes)
    return bytes([_TAG_CHUNK]) + _varint(len(inner) + nbytes) + inner


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int] | None:
    value = shift = 0
    for i in range(pos, min(end, pos + _MAX_VARINT_BYTES)):
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i + 1
        shift += 7
    return None


def parse_chunk_frame(raw: bytes) -> ChunkView | None:
    """The chunk in `raw` if it is a chunk message in the canonical layout (`chunk_prefix` + data), else None.

    None means "not recognised", never "invalid": the caller hands such bytes to `PushRequest.FromString`.
    """
    buf = memoryview(raw)
    end = len(buf)
    if end < 2 or buf[0] != _TAG_CHUNK:
        return None
    got = _read_varint(buf, 1, end)
    if got is None or got[0] != end - got[1]:
        return None
    pos = got[1]
    index = 0
    if pos < end and buf[pos] == _TAG_INDEX:
        got = _read_varint(buf, pos + 1, end)
        if got is None or got[0] >= 1 << 32:  # uint32 field: leave out-of-range values to protobuf
            return None
        index, pos = got
    if pos >= end or buf[pos] != _TAG_DATA:
        return None
    got = _read_varint(buf, pos + 1, end)
    if got is None or got[0] != end - got[1]:
        return None
    return ChunkView(index, buf[got[1] :])
