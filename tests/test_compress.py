"""Compressors (peer.algorithms.compress): round trips, selection rules, unbiasedness, wire sizes, hostile input."""

from __future__ import annotations

import math

import pytest
import torch

from peer.algorithms.compress import Compressor, Qsgd, parse_compressor
from peer.algorithms.compress_packed import Int4Block, SparseTopK, pack_bits, unpack_bits
from peer.errors import CorruptPayloadError

SPECS = ["none", "fp16", "topk:0.1", "randk:0.25", "qsgd:16", "sign"]


def _vec(n: int = 37, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wire_tensors_match_the_manifest_and_decode(spec: str, dtype: torch.dtype) -> None:
    comp = parse_compressor(spec, seed=3)
    v = _vec(dtype=dtype)
    wire = comp.compress(v)
    dtype_name = str(dtype).removeprefix("torch.")
    manifest = comp.manifest(v.numel(), dtype_name)
    assert {k: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in wire.items()} == manifest
    assert sum(t.numel() for t in wire.values()) == comp.wire_elements(v.numel())
    out = comp.decompress(wire, v.numel(), dtype)
    assert out.shape == v.shape and out.dtype == dtype
    # Every compressor here is contractive or unbiased-with-bounded-variance: the error is below ‖v‖ (scaled).
    err = float(torch.linalg.vector_norm(out * comp.contraction_scale(v.numel()) - v))
    assert err < float(torch.linalg.vector_norm(v))


def test_none_is_exact_and_fp16_is_close() -> None:
    v = _vec(1000)
    ident = parse_compressor("none")
    assert torch.equal(ident.decompress(ident.compress(v), 1000, torch.float64), v)
    assert ident.contraction_scale(1000) == 1.0
    half = parse_compressor("fp16")
    out = half.decompress(half.compress(v), 1000, torch.float64)
    assert torch.allclose(out, v, rtol=1e-3, atol=1e-4)
    big = half.decompress(half.compress(torch.tensor([1e6, -1e6])), 2, torch.float32)
    assert big.tolist() == [65504.0, -65504.0]  # clamped, never Inf


def test_topk_keeps_the_largest_magnitudes_with_deterministic_ties() -> None:
    v = torch.tensor([0.1, -5.0, 3.0, 0.0, -3.0, 2.0, 3.0, -0.2, 1.0, 4.0])
    comp = parse_compressor("topk:0.3")  # k = ceil(0.3·10) = 3
    wire = comp.compress(v)
    # |−5| and |4| are the two largest; three coordinates tie at |3|: the lowest index (2) wins.
    assert wire["indices"].tolist() == [1, 2, 9]
    assert wire["values"].tolist() == [-5.0, 3.0, 4.0]
    out = comp.decompress(wire, 10, torch.float32)
    assert out.tolist() == [0.0, -5.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 4.0]
    # k = max(1, ceil(F·P)): at least one coordinate, at most all of them.
    assert parse_compressor("topk:0.001").manifest(10)["values"] == ((1,), "float32")
    assert parse_compressor("topk:1").manifest(10)["indices"] == ((10,), "int32")
    big = _vec(10_000, seed=1)
    idx = parse_compressor("topk:0.01").compress(big)["indices"].long()
    assert idx.numel() == 100
    assert big.abs()[idx].min() >= big.abs().topk(100).values.min()


def test_randk_is_seeded_and_sends_its_indices() -> None:
    v = _vec(100)
    a, b, c = (
        parse_compressor("randk:0.1", seed=5),
        parse_compressor("randk:0.1", seed=5),
        parse_compressor("randk:0.1", seed=6),
    )
    wa, wb, wc = a.compress(v), b.compress(v), c.compress(v)
    assert torch.equal(wa["indices"], wb["indices"]) and not torch.equal(wa["indices"], wc["indices"])
    assert not torch.equal(a.compress(v)["indices"], wa["indices"])  # the generator advances
    idx = wa["indices"].long()
    assert torch.equal(wa["values"], v[idx])  # unscaled: the selected coordinates are exact
    # Any receiver decodes it without knowing the seed.
    out = parse_compressor("randk:0.1", seed=99).decompress(wa, 100, torch.float64)
    assert torch.equal(out[idx], v[idx]) and int((out != 0).sum()) == 10


def test_qsgd_is_unbiased_with_bounded_variance() -> None:
    """E[Q(v)] = v: the mean of 4000 seeded draws is within 4 standard errors of v, coordinate-wise."""
    v = _vec(50, seed=2)
    comp = parse_compressor("qsgd:4", seed=11)
    assert isinstance(comp, Qsgd)
    draws = torch.stack([comp.decompress(comp.compress(v), 50, torch.float64) for _ in range(4000)])
    mean, std = draws.mean(0), draws.std(0)
    assert bool(((mean - v).abs() <= 4 * std / math.sqrt(4000) + 1e-12).all())
    # The variance bound ω = min(P/s², √P/s) holds on average.
    mse = float(((draws - v) ** 2).sum(1).mean())
    assert mse <= comp.omega(50) * float(v.norm() ** 2)
    assert comp.contraction_scale(50) == pytest.approx(1 / (1 + comp.omega(50)))
    levels = comp.compress(v)["levels"]
    assert levels.dtype == torch.int8 and int(levels.abs().max()) <= 4


def test_qsgd_of_zero_is_zero_and_same_seed_same_draws() -> None:
    comp = parse_compressor("qsgd:8", seed=1)
    assert torch.equal(comp.decompress(comp.compress(torch.zeros(9)), 9, torch.float32), torch.zeros(9))
    v = _vec(30)
    assert torch.equal(
        parse_compressor("qsgd:8", 4).compress(v)["levels"], parse_compressor("qsgd:8", 4).compress(v)["levels"]
    )


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64])
def test_sign_packs_one_bit_per_coordinate(n: int) -> None:
    v = _vec(n, seed=n)
    comp = parse_compressor("sign")
    wire = comp.compress(v)
    assert wire["bits"].dtype == torch.uint8 and wire["bits"].numel() == math.ceil(n / 8)
    out = comp.decompress(wire, n, torch.float64)
    scale = float(v.abs().sum()) / n
    assert torch.allclose(out, torch.where(v < 0, -scale, scale).to(torch.float64))


def test_wire_element_counts() -> None:
    p = 1000
    counts = {
        spec: parse_compressor(spec).wire_elements(p) for spec in ["none", "topk:0.1", "randk:0.05", "qsgd:16", "sign"]
    }
    assert counts == {"none": 1000, "topk:0.1": 200, "randk:0.05": 100, "qsgd:16": 1001, "sign": 126}


def _corrupt(spec: str, numel: int, **tensors: torch.Tensor) -> None:
    comp = parse_compressor(spec)
    with pytest.raises(CorruptPayloadError):
        comp.decompress(tensors, numel, torch.float32)


def test_hostile_inputs_are_rejected() -> None:
    f, i32 = torch.float32, torch.int32
    ok_vals = torch.ones(2, dtype=f)
    _corrupt("topk:0.2", 10, values=ok_vals, indices=torch.tensor([3, 10], dtype=i32))  # out of range
    _corrupt("topk:0.2", 10, values=ok_vals, indices=torch.tensor([-1, 3], dtype=i32))  # negative
    _corrupt("topk:0.2", 10, values=ok_vals, indices=torch.tensor([4, 4], dtype=i32))  # duplicate
    _corrupt("topk:0.2", 10, values=ok_vals, indices=torch.tensor([5, 4], dtype=i32))  # unsorted
    _corrupt("topk:0.2", 10, values=torch.ones(3), indices=torch.tensor([1, 2, 3], dtype=i32))  # k wrong
    _corrupt("topk:0.2", 10, values=ok_vals, indices=torch.tensor([1, 2], dtype=torch.int64))  # dtype
    _corrupt("topk:0.2", 10, values=torch.tensor([1.0, math.nan]), indices=torch.tensor([1, 2], dtype=i32))
    _corrupt("topk:0.2", 10, values=ok_vals)  # missing tensor
    _corrupt("randk:0.2", 10, values=ok_vals, indices=torch.tensor([1, 2], dtype=i32), extra=ok_vals)
    _corrupt("none", 10, values=torch.ones(9))
    _corrupt("none", 10, values=torch.ones(10, dtype=torch.int32))
    _corrupt("qsgd:4", 3, norm=torch.ones(1), levels=torch.tensor([1, 5, 0], dtype=torch.int8))  # level > s
    _corrupt("qsgd:4", 3, norm=torch.ones(1), levels=torch.tensor([1, -128, 0], dtype=torch.int8))
    _corrupt("qsgd:4", 3, norm=-torch.ones(1), levels=torch.zeros(3, dtype=torch.int8))
    _corrupt("qsgd:4", 3, norm=torch.full((1,), math.inf), levels=torch.zeros(3, dtype=torch.int8))
    _corrupt("sign", 3, scale=torch.ones(1), bits=torch.tensor([0b1000], dtype=torch.uint8))  # padding bit set
    _corrupt("sign", 3, scale=torch.ones(1), bits=torch.zeros(2, dtype=torch.uint8))
    _corrupt("fp16", 2, values=torch.ones(2))  # float32 where float16 is declared
    with pytest.raises(CorruptPayloadError, match="out of range"):
        parse_compressor("topk:0.2").decompress({"values": ok_vals, "indices": torch.tensor([3, 10], dtype=i32)}, 10, f)


@pytest.mark.parametrize("spec", ["", "topk", "topk:0", "topk:1.5", "topk:x", "qsgd:0", "qsgd:200", "sign:3", "zip"])
def test_bad_specs_are_rejected(spec: str) -> None:
    with pytest.raises(ValueError, match="compressor"):
        parse_compressor(spec)


def test_the_api_is_uniform() -> None:
    for spec in SPECS:
        comp = parse_compressor(spec)
        assert isinstance(comp, Compressor) and spec in repr(comp)
        wire, decoded = comp.round_trip(_vec(16))
        assert torch.equal(decoded, comp.decompress(wire, 16, torch.float64))


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1001])
def test_packed_compressors_match_their_manifests_at_any_length(numel: int) -> None:
    v = _vec(numel, dtype=torch.float32)
    for comp in (Int4Block(8, "int4:8"), SparseTopK(0.35, "topk:0.35"), SparseTopK(0.01, "topk:0.01")):
        wire = comp.compress(v)
        assert {k: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in wire.items()} == comp.manifest(
            numel
        )
        out = comp.decompress(wire, numel, torch.float32)
        assert out.shape == (numel,) and float(torch.linalg.vector_norm(out - v)) < float(torch.linalg.vector_norm(v))
    bits = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) < 0.5
    assert torch.equal(unpack_bits(pack_bits(bits))[:numel], bits)
    assert not bool(unpack_bits(pack_bits(bits))[numel:].any())


def test_random_bytes_in_packed_payloads_are_refused_or_decode_finite() -> None:
    """Valid-looking nibbles and masks with one random byte overwritten: the decoder either refuses them with
    CorruptPayloadError or returns a finite vector of the right size; no other exception, no NaN."""
    gen = torch.Generator().manual_seed(5)
    n = 77
    int4, topk = Int4Block(16, "int4:16"), SparseTopK(0.35, "topk:0.35")
    refused = decoded = 0

    def spoil(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        if bool(torch.rand(1, generator=gen) < 0.5):
            t[int(torch.randint(0, t.numel(), (1,), generator=gen))] = int(torch.randint(0, 256, (1,), generator=gen))
        return t

    for _ in range(300):
        nibbles = torch.randint(1, 16, (78,), generator=gen, dtype=torch.int32)
        nibbles[77] = 8
        q = (nibbles[0::2] | (nibbles[1::2] << 4)).to(torch.uint8)
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.randperm(n, generator=gen)[:27]] = True
        cases = [
            (int4, {"scales": torch.rand(5, generator=gen), "q": spoil(q)}),
            (topk, {"mask": spoil(pack_bits(keep)), "values": torch.randn(27, generator=gen).to(torch.float16)}),
        ]
        for comp, tensors in cases:
            try:
                out = comp.decompress(tensors, n, torch.float32)
            except CorruptPayloadError:
                refused += 1
                continue
            decoded += 1
            assert out.shape == (n,) and bool(torch.isfinite(out).all())
    assert refused > 50 and decoded > 300  # both paths were exercised
