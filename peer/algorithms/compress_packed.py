"""Packed compressors for delta gossip (`gossip.compression`): under one byte per float32 value.

`int8` cannot pass 4x fewer bytes (one byte per value plus its scales), and top-k with an int32 index per kept
value spends more on indices than on values. These two spend less:

| spec            | wire tensors for P elements                                       | bytes per value        |
|-----------------|-------------------------------------------------------------------|------------------------|
| `topk:F` (mask) | mask[⌈P/8⌉] uint8 (bit i = coordinate i kept), values[k] float16  | 1/8 + 2F               |
| `topk:F` (list) | values[k] float16, indices[k] int32, sorted (compress.TopK)       | 6F                     |
| `int4:B`        | scales[⌈P/B⌉] float32, q[⌈P/2⌉] uint8: two 4-bit levels per byte  | 1/2 + 4/B              |

`SparseTopK` picks the mask when it is the smaller of the two (F > 1/32), so `topk:0.35` costs 0.825 bytes per
value (4.8x fewer than float32) and keeps more than twice the coordinates that int32 indices would allow at the
same size. A mask encodes a set, so a mask message cannot repeat or misorder an index; the decoder checks that
exactly k bits are set and that the padding bits past P are clear.

`Int4Block` is blockwise absmax with levels in [−7, 7], stored as level + 8 in a nibble (low nibble first);
nibble 0 (level −8) is refused, and the padding nibble of an odd P must hold level 0, so one vector has one
encoding. An entry's error is at most half its block's scale (max |v| / 7); error feedback sends the rest later.

Decoders treat their input as hostile and raise CorruptPayloadError, as in peer.algorithms.compress.
"""

from __future__ import annotations

import math

import torch

from peer.algorithms.compress import Compressor, Float16, Int8Block, Manifest, TopK, _check_numel, _num_selected
from peer.errors import CorruptPayloadError

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """A bool vector as uint8 bytes, bit i of byte j = element 8j + i; the padding bits are clear."""
    n = bits.numel()
    padded = torch.zeros(8 * math.ceil(n / 8), dtype=torch.int32)
    padded[:n] = bits.to(torch.int32)
    return (padded.reshape(-1, 8) * _BIT_WEIGHTS).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """The bool vector of `pack_bits`, padding included (8 per byte)."""
    return (packed.to(torch.int32).reshape(-1, 1) & _BIT_WEIGHTS).ne(0).reshape(-1)


class SparseTopK(Compressor):
    """The k = ⌈F·P⌉ largest-magnitude coordinates (ties to the lower index), values as float16 (clamped to
    ±65504), their positions as a bitmask or as sorted int32 indices, whichever is smaller for P."""

    def __init__(self, fraction: float, spec: str) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"{spec}: the fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction
        self.spec = spec
        self._listed = TopK(fraction, spec, half_values=True)

    def k(self, numel: int) -> int:
        return _num_selected(self.fraction, numel)

    def uses_mask(self, numel: int) -> bool:
        return math.ceil(numel / 8) < 4 * self.k(numel)

    def compress(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = v.detach().reshape(-1)
        n = flat.numel()
        _check_numel(n)
        if not self.uses_mask(n):
            return self._listed.compress(flat)
        k = self.k(n)
        idx = self._listed.select(flat, k)
        if idx.numel() != k:
            raise ValueError(f"{self.spec}: cannot select {k} coordinates of a vector holding NaN")
        mask = torch.zeros(n, dtype=torch.bool)
        mask[idx] = True
        values = flat[idx].clamp(-Float16._MAX, Float16._MAX).to(torch.float16)
        return {"mask": pack_bits(mask), "values": values}

    def decompress(self, tensors: dict[str, torch.Tensor], numel: int, dtype: torch.dtype) -> torch.Tensor:
        if not self.uses_mask(numel):
            return self._listed.decompress(tensors, numel, dtype)
        k = self.k(numel)
        self._check(tensors, numel, {"mask": ((math.ceil(numel / 8),), "uint8"), "values": ((k,), "float16")})
        if not bool(torch.isfinite(tensors["values"]).all()):
            raise CorruptPayloadError(f"{self.spec}: tensor 'values' holds NaN or Inf")
        bits = unpack_bits(tensors["mask"])
        if bool(bits[numel:].any()):
            raise CorruptPayloadError(f"{self.spec}: mask bits past the last element are set")
        kept = int(bits.sum())
        if kept != k:
            raise CorruptPayloadError(f"{self.spec}: the mask selects {kept} coordinates, expected {k}")
        out = torch.zeros(numel, dtype=dtype)
        out[bits[:numel]] = tensors["values"].to(dtype)
        return out

    def manifest(self, numel: int, dtype: str = "float32") -> Manifest:
        if not self.uses_mask(numel):
            return self._listed.manifest(numel, dtype)
        return {"mask": ((math.ceil(numel / 8),), "uint8"), "values": ((self.k(numel),), "float16")}


class Int4Block(Int8Block):
    """Blockwise absmax 4-bit: each block of B entries travels as B levels in [−7, 7] (two per byte) and one
    float32 scale (its max |v| / 7); an entry's error is at most half its block's scale. Deterministic."""

    _LEVELS = 7

    def compress(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        scales, levels = self._quantize(v)
        n = levels.numel()
        nibbles = torch.full((2 * math.ceil(n / 2),), 8, dtype=torch.int32)  # the padding nibble: level 0
        nibbles[:n] = levels.to(torch.int32) + 8
        pairs = nibbles.reshape(-1, 2)
        return {"scales": scales, "q": (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)}

    def decompress(self, tensors: dict[str, torch.Tensor], numel: int, dtype: torch.dtype) -> torch.Tensor:
        nb = self._blocks(numel)
        self._check(tensors, numel, {"scales": ((nb,), "float32"), "q": ((math.ceil(numel / 2),), "uint8")})
        scales = self._checked_scales(tensors)
        q = tensors["q"].to(torch.int32)
        nibbles = torch.stack([q & 15, q >> 4], dim=1).reshape(-1)
        if bool((nibbles == 0).any()):
            raise CorruptPayloadError(f"{self.spec}: level -8 is outside [-7, 7]")
        if bool((nibbles[numel:] != 8).any()):
            raise CorruptPayloadError(f"{self.spec}: the padding nibble past the last element is not level 0")
        return self._dequantize(nibbles[:numel] - 8, scales, numel, dtype)

    def manifest(self, numel: int, dtype: str = "float32") -> Manifest:
        return {"scales": ((self._blocks(numel),), "float32"), "q": ((math.ceil(numel / 2),), "uint8")}
