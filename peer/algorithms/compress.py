"""Compressors for flat parameter vectors: what CHOCO-SGD sends, and what delta compression will use later.

A compressor turns a vector v into a few named wire tensors (`compress`), turns them back into a vector
(`decompress`), and states exactly which tensors travel for a P-element vector (`manifest`), so the receiver's
codec can reject anything else before the algorithm sees it. `decompress` treats its input as hostile: names,
shapes, dtypes, index ranges and ordering are checked, and a violation raises `CorruptPayloadError`.

Specs (`parse_compressor`):

| spec     | wire tensors for P elements                             | kind                                        |
|----------|---------------------------------------------------------|---------------------------------------------|
| none     | values[P] (float)                                       | identity                                    |
| fp16     | values[P] float16 (clamped to ±65504)                   | near-identity, deterministic                |
| bf16     | values[P] bfloat16 (round to nearest even)              | near-identity, deterministic                |
| int8:B   | scales[⌈P/B⌉] float32, q[P] int8 in [−127, 127]         | blockwise absmax, error ≤ scale/2 per entry |
| topk:F   | values[k] (float), indices[k] int32, k = max(1, ⌈F·P⌉)  | biased, contractive (δ = k/P)               |
| randk:F  | values[k] (float), indices[k] int32                     | biased (unscaled), contractive (δ = k/P)   |
| qsgd:S   | norm[1] (float), levels[P] int8 in [−S, S]              | unbiased, variance ω = min(P/S², √P/S)      |
| sign     | scale[1] (float) = ‖v‖₁/P, bits[⌈P/8⌉] uint8 (1 = negative) | biased, contractive (δ ≥ 1/P)           |

Indices are sent sorted ascending and unique (the receiver checks it), so one vector has one encoding. Random
compressors (randk, qsgd) own a seeded `torch.Generator`; randk sends its indices rather than its seed, because
`torch.randperm` streams are not guaranteed identical across torch versions and the peers may run different
ones. "float" tensors carry the vector's dtype (float32 in the daemon, which is what `manifest` declares by
default).

`contraction_scale(P)` turns an unbiased compressor into a contractive one (Koloskova et al. 2019: Q/(1 + ω)
satisfies E‖Q(v)/(1+ω) − v‖² ≤ (1 − 1/(1+ω))‖v‖²); CHOCO multiplies every decompressed q by it.
"""

from __future__ import annotations

import abc
import math
from typing import ClassVar

import torch

from peer.errors import CorruptPayloadError

Manifest = dict[str, tuple[tuple[int, ...], str]]  # as peer.algorithms.base.Manifest (no import cycle)

_MAX_NUMEL = 2**31 - 1  # indices travel as int32


class Compressor(abc.ABC):
    """One compression rule. Instances may own a seeded generator; they never touch global randomness."""

    spec: str
    unbiased: ClassVar[bool] = False

    @abc.abstractmethod
    def compress(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        """The wire tensors for the 1-D vector `v` (exactly the names and shapes of `manifest(v.numel())`)."""

    @abc.abstractmethod
    def decompress(self, tensors: dict[str, torch.Tensor], numel: int, dtype: torch.dtype) -> torch.Tensor:
        """The 1-D vector of `numel` elements and `dtype` the tensors encode; CorruptPayloadError if malformed."""

    @abc.abstractmethod
    def manifest(self, numel: int, dtype: str = "float32") -> Manifest:
        """name -> (shape, dtype name) of every wire tensor for a `numel`-element vector of dtype `dtype`."""

    def omega(self, numel: int) -> float:
        """For unbiased compressors, ω with E‖Q(v) − v‖² ≤ ω‖v‖². Meaningless (0) for biased ones."""
        return 0.0

    def contraction_scale(self, numel: int) -> float:
        """The factor that makes Q contractive: 1/(1 + ω) for unbiased compressors, 1 for the others."""
        return 1.0 / (1.0 + self.omega(numel)) if self.unbiased else 1.0

    def wire_elements(self, numel: int) -> int:
        """Tensor elements on the wire for a `numel`-element vector."""
        return sum(math.prod(shape) for shape, _ in self.manifest(numel).values())

    def round_trip(self, v: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(wire tensors, what the receiver will decode): the sender applies the decoded vector, not `v`."""
        wire = self.compress(v)
        return wire, self.decompress(wire, v.numel(), v.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    # ------------------------------------------------------------------------------------------- checks
    def _check(
        self, tensors: dict[str, torch.Tensor], numel: int, kinds: dict[str, tuple[tuple[int, ...], str]]
    ) -> None:
        """Names exactly `kinds`; each tensor of the given shape and of a float dtype ("float") or the exact one."""
        if set(tensors) != set(kinds):
            raise CorruptPayloadError(
                f"{self.spec}: expected tensors {sorted(kinds)}, got {sorted(tensors)} (for {numel} elements)"
            )
        for name, (shape, kind) in kinds.items():
            t = tensors[name]
            if tuple(t.shape) != shape:
                got, want = list(t.shape), list(shape)
                raise CorruptPayloadError(f"{self.spec}: tensor {name!r} has shape {got}, expected {want}")
            if kind == "float":
                if not t.dtype.is_floating_point:
                    raise CorruptPayloadError(f"{self.spec}: tensor {name!r} is {t.dtype}, expected a float dtype")
                if not bool(torch.isfinite(t).all()):
                    raise CorruptPayloadError(f"{self.spec}: tensor {name!r} holds NaN or Inf")
            elif t.dtype != getattr(torch, kind):
                raise CorruptPayloadError(f"{self.spec}: tensor {name!r} is {t.dtype}, expected torch.{kind}")


def _check_numel(numel: int) -> None:
    if not 0 < numel <= _MAX_NUMEL:
        raise ValueError(f"cannot compress a vector of {numel} elements (1 to {_MAX_NUMEL})")


def _num_selected(fraction: float, numel: int) -> int:
    return min(numel, max(1, math.ceil(fraction * numel)))


class Identity(Compressor):
    """No compression: the vector itself travels."""

    spec = "none"
    unbiased = True

    def compress(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_numel(v.numel())
        return {"values": v.detach().reshape(-1).clone()}

    def decompress(self, tensors: dict[str, torch.Tensor], numel: int, dtype: torch.dtype) -> torch.Tensor:
        self._check(tensors, numel, {"values": ((numel,), "float")})
        return tensors["values"].to(dtype, copy=True)  # never an alias of the wire tensor

    def manifest(self, numel: int, dtype: str = "float32") -> Manifest:
        return {"values": ((numel,), dtype)}


class Float16(Compressor):
    """Half precision: values clamped to the float16 range (so nothing overflows to Inf) and rounded."""

    spec = "fp16"
    _MAX = 65504.0

    def compress(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_numel(v.numel())
        return {"values": v.detach().reshape(-1).clamp(-self._MAX, self._MAX).to(torch.float16)}

    def decompress(self, tensors: dict[str, torch.Tensor], numel: int, dtype: torch.dtype) -> torch.Tensor:
        self._check(tensors, numel, {"values": ((numel,), "float16")})
        if not bool(torch.isfinite(tensors["values"]).all()):
            raise CorruptPayloadError("fp16: tensor 'values' holds NaN or Inf")
        return tensors["values"].to(dtype)

    def manifest(self, numel: int, dtype: str = "float32") -> Manifest:
        return {"values": ((numel,), "float16")}


class _Sparse(Compressor):
    """k selected coordinates: values[k] and sorted unique int32 indices[k]. With `half_values`, the values travel
    as float16 (clamped to ±65504): 6 bytes per coordinate instead of 8."""

    def __init__(self, fraction: float, spec: str, *, half_values: bool = False) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"{spec}: the fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction
        self.spec = spec
        self.half_values = half_values

    def k(self, numel: int) -> int:
        return _num_selected(self.fraction, numel)

    @abc.abstractmethod
    def select(self, v: torch.Tensor, k: int) -> torch.Tensor:
        """Indices (int64, sorted ascending, unique) of the k coordinates to send."""

    def compress(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = v.detach().reshape(-1)
        _check_numel(flat.numel())
        k = self.k(flat.numel())
        idx = self.select(flat, k)
        if idx.numel() != k:
            raise ValueError(f"{self.spec}: cannot select {k} coordinates of a vector holding NaN")
        values = flat[idx].clone()
        if self.half_values:
            values = values.clamp(-Float16._MAX, Float16._MAX).to(torch.float16)
        return {"values": values, "indices": idx.to(torch.int32)}

    def decompress(self, tensors: dict[str, torch.Tensor], numel: int, dtype: torch.dtype) -> torch.Tensor:
        k = self.k(numel)
        self._check(
            tensors, numel, {"values": ((k,), "float16" if self.half_values else "float"), "indices": ((k,), "int32")}
        )
        if self.half_values and not bool(torch.isfinite(tensors["values"]).all()):
            raise CorruptPayloadError(f"{self.spec}: tensor 'values' holds NaN or Inf")
        idx = tensors["indices"].to(torch.int64)
        if k and (int(idx[0]) < 0 or int(idx[-1]) >= numel):
            raise CorruptPayloadError(f"{self.spec}: indices out of range [0, {numel})")
        if k > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise CorruptPayloadError(f"{self.spec}: indices are not strictly increasing (duplicates or unsorted)")
        out = torch.zeros(numel, dtype=dtype)
        out[idx] = tensors["values"].to(dtype)
        return out

    def manifest(self, numel: int, dtype: str = "float32") -> Manifest:
        k = self.k(numel)
        return {"values": ((k,), "float16" if self.half_values else dtype), "indices": ((k,), "int32")}


class TopK(_Sparse):
    """The k coordinates of largest magnitude; ties go to the lower index, so the choice is deterministic."""

    def select(self, v: torch.Tensor, k: int) -> torch.Tensor:
        n = v.numel()
        if k >= n:
            return torch.arange(n)
        a = v.abs()
        threshold = torch.topk(a, k, sorted=False).values.min()
        above = torch.nonzero(a > threshold).reshape(-1)
        ties = torch.nonzero(a == threshold).reshape(-1)[: k - above.numel()]
        return torch.cat([above, ties]).sort().values


class RandK(_Sparse):
    """k coordinates drawn uniformly without replacement from the compressor's own seeded generator; unscaled."""

    def __init__(self, fraction: float, spec: str, seed: int) -> None:
        super().__init__(fraction, spec)
        self.gen = torch.Generator().manual_seed(seed)

    def select(self, v: torch.Tensor, k: int) -> torch.Tensor:
        return torch.randperm(v.numel(), generator=self.gen)[:k].sort().values


class Qsgd(Compressor):
    """QSGD (Alistarh et al. 2017): v ↦ ‖v‖₂ · sign(v_i) · ξ_i/s, with ξ_i ∈ {0..s} stochastically rounded.

    Unbiased: E[ξ_i/s] = |v_i|/‖v‖₂. Levels travel as signed int8, so s ≤ 127.
    """

    unbiased = True

    def __init__(self, levels: int, spec: str, seed: int) -> None:
        if not 1 <= levels <= 127:
            raise ValueError(f"{spec}: the number of levels must be in [1, 127], got {levels}")
        self.s = levels
        self.spec = spec
        self.gen = torch.Generator().manual_seed(seed)

    def omega(self, numel: int) -> float:
        return min(numel / self.s**2, math.sqrt(numel) / self.s)

    def compress(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = v.detach().reshape(-1)
        _check_numel(flat.numel())
        norm = torch.linalg.vector_norm(flat)
        # Draw the uniforms even for a zero vector, so the generator advances the same way whatever v is.
        u = torch.rand(flat.numel(), generator=self.gen, dtype=torch.float64)
        if float(norm) == 0.0:
            levels = torch.zeros(flat.numel(), dtype=torch.int8)
        else:
            r = (flat.abs().to(torch.float64) / float(norm) * self.s).clamp_(0, self.s)
            lower = r.floor()
            level = (lower + (u < (r - lower)).to(torch.float64)).clamp_(0, self.s)
            levels = (level * torch.sign(flat).to(torch.float64)).to(torch.int8)
        return {"norm": norm.reshape(1).clone(), "levels": levels}

    def decompress(self, tensors: dict[str, torch.Tensor], numel: int, dtype: torch.dtype) -> torch.Tensor:
        self._check(tensors, numel, {"norm": ((1,), "float"), "levels": ((numel,), "int8")})
        norm = tensors["norm"].to(dtype)
        if float(norm[0]) < 0:
            raise CorruptPayloadError(f"{self.spec}: negative norm {float(norm[0])}")
        levels = tensors["levels"]
        if int(levels.max()) > self.s or int(levels.min()) < -self.s:  # not abs(): int8 abs(-128) is -128
            raise CorruptPayloadError(f"{self.spec}: a level exceeds {self.s} in magnitude")
        return levels.to(dtype) * (norm / self.s)

    def manifest(self, numel: int, dtype: str = "float32") -> Manifest:
        return {"norm": ((1,), dtype), "levels": ((numel,), "int8")}


_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32)


class Sign(Compressor):
    """Scaled sign (Karimireddy et al. 2019): v ↦ (‖v‖₁/P) · sign(v), one bit per coordinate (1 = negative)."""

    spec = "sign"

    def compress(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = v.detach().reshape(-1)
        n = flat.numel()
        _check_numel(n)
        scale = flat.abs().sum() / n
        neg = torch.zeros(8 * math.ceil(n / 8), dtype=torch.int32)
        neg[:n] = (flat < 0).to(torch.int32)
        bits = (neg.reshape(-1, 8) * _BIT_WEIGHTS).sum(1).to(torch.uint8)
        return {"scale": scale.reshape(1).clone(), "bits": bits}

    def decompress(self, tensors: dict[str, torch.Tensor], numel: int, dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.ceil(numel / 8)
        self._check(tensors, numel, {"scale": ((1,), "float"), "bits": ((nbytes,), "uint8")})
        scale = tensors["scale"].to(dtype)
        if float(scale[0]) < 0:
            raise CorruptPayloadError(f"sign: negative scale {float(scale[0])}")
        unpacked = (tensors["bits"].to(torch.int32).reshape(-1, 1) & _BIT_WEIGHTS).ne(0).reshape(-1)
        if bool(unpacked[numel:].any()):
            raise CorruptPayloadError("sign: padding bits past the last element are set")
        signs = 1.0 - 2.0 * unpacked[:numel].to(dtype)
        return signs * scale

    def manifest(self, numel: int, dtype: str = "float32") -> Manifest:
        return {"scale": ((1,), dtype), "bits": ((math.ceil(numel / 8),), "uint8")}


class BFloat16(Compressor):
    """bfloat16: float32's range with an 8-bit mantissa (relative error ≤ 2⁻⁹); nothing overflows."""

    spec = "bf16"

    def compress(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_numel(v.numel())
        return {"values": v.detach().reshape(-1).to(torch.bfloat16)}

    def decompress(self, tensors: dict[str, torch.Tensor], numel: int, dtype: torch.dtype) -> torch.Tensor:
        self._check(tensors, numel, {"values": ((numel,), "bfloat16")})
        if not bool(torch.isfinite(tensors["values"]).all()):
            raise CorruptPayloadError("bf16: tensor 'values' holds NaN or Inf")
        return tensors["values"].to(dtype)

    def manifest(self, numel: int, dtype: str = "float32") -> Manifest:
        return {"values": ((numel,), "bfloat16")}


class Int8Block(Compressor):
    """Blockwise absmax int8: each block of B entries travels as B int8 levels in [−127, 127] and one float32
    scale (its max |v| / 127), so an entry's error is at most half its block's scale. Deterministic."""

    def __init__(self, block: int, spec: str) -> None:
        if not 8 <= block <= 1 << 20:
            raise ValueError(f"{spec}: the block size must be in [8, {1 << 20}], got {block}")
        self.block = block
        self.spec = spec

    def _blocks(self, numel: int) -> int:
        return math.ceil(numel / self.block)

    _LEVELS = 127

    def _quantize(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block scales, levels in [-_LEVELS, _LEVELS] as float32, one per entry of `v`)."""
        flat = v.detach().reshape(-1).to(torch.float32)
        n = flat.numel()
        _check_numel(n)
        padded = torch.zeros(self._blocks(n) * self.block, dtype=torch.float32)
        padded[:n] = flat
        blocks = padded.reshape(-1, self.block)
        scales = blocks.abs().amax(1) / self._LEVELS
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        return scales, torch.round(blocks / safe[:, None]).clamp_(-self._LEVELS, self._LEVELS).reshape(-1)[:n]

    def _checked_scales(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        scales = tensors["scales"]
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise CorruptPayloadError(f"{self.spec}: a block scale is negative, NaN or Inf")
        return scales

    def _dequantize(self, levels: torch.Tensor, scales: torch.Tensor, numel: int, dtype: torch.dtype) -> torch.Tensor:
        nb = self._blocks(numel)
        padded = torch.zeros(nb * self.block, dtype=torch.float32)
        padded[:numel] = levels.to(torch.float32)
        out = (padded.reshape(nb, self.block) * scales[:, None]).reshape(-1)[:numel]
        if not bool(torch.isfinite(out).all()):
            raise CorruptPayloadError(f"{self.spec}: a block scale overflows float32")
        return out.to(dtype)

    def compress(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        scales, levels = self._quantize(v)
        return {"scales": scales, "q": levels.to(torch.int8)}

    def decompress(self, tensors: dict[str, torch.Tensor], numel: int, dtype: torch.dtype) -> torch.Tensor:
        nb = self._blocks(numel)
        self._check(tensors, numel, {"scales": ((nb,), "float32"), "q": ((numel,), "int8")})
        scales = self._checked_scales(tensors)
        q = tensors["q"]
        if bool((q == -128).any()):
            raise CorruptPayloadError(f"{self.spec}: level -128 is outside [-127, 127]")
        return self._dequantize(q, scales, numel, dtype)

    def manifest(self, numel: int, dtype: str = "float32") -> Manifest:
        return {"scales": ((self._blocks(numel),), "float32"), "q": ((numel,), "int8")}


COMPRESSOR_SPECS = ("none", "fp16", "bf16", "int8:B", "topk:F", "randk:F", "qsgd:S", "sign")


def parse_compressor(spec: str, seed: int = 0) -> Compressor:
    """A compressor from its spec ("none", "fp16", "bf16", "int8:256", "topk:0.1", "randk:0.1", "qsgd:16", "sign").

    `seed` seeds the generator of the random compressors (randk, qsgd); give each peer its own.
    ValueError, naming the valid specs, for anything else.
    """
    name, _, arg = spec.strip().partition(":")
    try:
        if name == "none" and not arg:
            return Identity()
        if name == "fp16" and not arg:
            return Float16()
        if name == "sign" and not arg:
            return Sign()
        if name == "bf16" and not arg:
            return BFloat16()
        if name == "int8" and arg:
            return Int8Block(int(arg), spec)
        if name == "topk" and arg:
            return TopK(float(arg), spec)
        if name == "randk" and arg:
            return RandK(float(arg), spec, seed)
        if name == "qsgd" and arg:
            return Qsgd(int(arg), spec, seed)
    except ValueError as e:
        raise ValueError(f"invalid compressor {spec!r}: {e}") from None
    raise ValueError(f"unknown compressor {spec!r}; valid: {', '.join(COMPRESSOR_SPECS)}")
