"""Delta compression on the wire (`gossip.compression`): compressor error bounds, the error-feedback invariant,
key frames and resynchronisation, Hello agreement, and hostile compressed pushes to a real daemon on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from peer import PROTOCOL_VERSION
from peer import config as config_mod
from peer.algorithms.base import Payload
from peer.algorithms.compress import parse_compressor
from peer.algorithms.compress_packed import Int4Block, SparseTopK, unpack_bits
from peer.algorithms.delta import (
    BASE_KEY,
    SEP,
    VERSION_KEY,
    DeltaReceiver,
    DeltaSender,
    compressed_manifest,
    parse_compression,
    support,
)
from peer.core.events import PeerInfo
from peer.core.settings import Identity, incompatibility
from peer.daemon.node import Node
from peer.errors import ConfigError, CorruptPayloadError, SchemaMismatchError
from peer.net.encoder import encode, iter_requests
from peer.net.wire import Envelope
from peer.v1 import gossip_pb2, gossip_pb2_grpc
from tests.helpers import consensus_distance, fast_config, start_nodes, stop_nodes, unique, until

pytestmark = pytest.mark.timeout(60)

SPECS = ("fp16", "bf16", "int8", "int4", "int4:8", "topk", "topk:0.03")  # topk:0.03: int32 indices, not a mask


def vector(n: int = 1000, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- compressors
def test_round_trip_error_bounds() -> None:
    v = vector(1000) * 3
    for spec, bound in (("fp16", 2**-11), ("bf16", 2**-8)):
        c = parse_compression(spec)
        assert c is not None
        _, d = c.round_trip(v)
        assert bool(((d - v).abs() <= bound * v.abs() + 1e-7).all()), spec
    c = parse_compressor("int8:100")
    wire, d = c.round_trip(v)
    assert wire["q"].dtype == torch.int8 and wire["scales"].shape == (10,)
    per_block = v.reshape(10, 100).abs().amax(1) / 127
    assert bool(((d - v).abs().reshape(10, 100) <= per_block[:, None] / 2 + 1e-6).all())
    c = parse_compressor("topk:0.1")
    _, d = c.round_trip(v)
    kept = d != 0
    assert int(kept.sum()) == 100 and torch.equal(d[kept], v[kept])
    assert float(v[~kept].abs().max()) <= float(v[kept].abs().min())


def test_int8_edge_cases() -> None:
    c = parse_compressor("int8:8")
    for v in (torch.zeros(13), torch.tensor([5.0]), torch.full((20,), -2.0)):
        _, d = c.round_trip(v)
        assert torch.allclose(d, v, atol=float(v.abs().max()) / 254 + 1e-9)


def test_int4_and_mask_topk_round_trips() -> None:
    v = vector(1001) * 3  # odd: a padding nibble, and mask bits past the end
    c = parse_compression("int4:16")
    assert isinstance(c, Int4Block)
    wire, d = c.round_trip(v)
    assert wire["q"].dtype == torch.uint8 and wire["q"].shape == (501,) and wire["scales"].shape == (63,)
    padded = torch.cat([v, torch.zeros(7)]).reshape(63, 16)
    per_block = padded.abs().amax(1) / 7
    err = torch.cat([d - v, torch.zeros(7)]).reshape(63, 16).abs()
    assert bool((err <= per_block[:, None] / 2 + 1e-6).all())
    assert int(wire["q"][-1]) >> 4 == 8, "the padding nibble holds level 0"
    c = parse_compression("topk:0.3")
    assert isinstance(c, SparseTopK) and c.uses_mask(1001)
    wire, d = c.round_trip(v)
    assert set(wire) == {"mask", "values"} and wire["mask"].shape == (126,) and wire["values"].shape == (301,)
    kept = d != 0
    assert int(kept.sum()) == 301 and torch.equal(d[kept], v[kept].to(torch.float16).float())
    assert float(v[~kept].abs().max()) <= float(v[kept].abs().min())
    assert torch.equal(unpack_bits(wire["mask"])[:1001], kept) and not bool(unpack_bits(wire["mask"])[1001:].any())
    # Few coordinates: sorted int32 indices are smaller than a mask, and are used instead.
    sparse = parse_compression("topk:0.01")
    assert isinstance(sparse, SparseTopK) and not sparse.uses_mask(1001)
    assert sparse.manifest(1001) == {"values": ((11,), "float16"), "indices": ((11,), "int32")}
    _, d = sparse.round_trip(v)
    assert int((d != 0).sum()) == 11


def test_wire_sizes_reach_four_times_fewer_bytes() -> None:
    """Bytes per float32 value on the wire, from the manifests (the demo's mlp has about 17k parameters)."""
    sizes = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "int8": 1, "uint8": 1}
    n = 17_290

    def ratio(spec: str) -> float:
        c = parse_compression(spec)
        assert c is not None
        return 4 * n / sum(math.prod(shape) * sizes[dt] for shape, dt in c.manifest(n).values())

    assert 3.9 < ratio("int8") < 4.0  # one byte per value plus the scales: never 4x
    assert ratio("int4") > 7.0 and ratio("int4:32") > 6.3
    assert 4.8 < ratio("topk") < 4.9  # 0.35 of the values as float16 and a bit per value
    assert ratio("topk:0.15") > 4 / (0.125 + 2 * 0.15) - 0.01
    assert ratio("topk:0.01") > 60  # indices, not a mask


@pytest.mark.parametrize("spec", SPECS)
def test_error_feedback_invariant_and_bitwise_agreement(spec: str) -> None:
    """Sum of what the receiver decoded + the sender's residual = the true change, and both ends hold the
    same reference bit for bit; with x held still, the residual shrinks (compression error does not pile up)."""
    c = parse_compression(spec)
    assert c is not None
    tx, rx = DeltaSender(c), DeltaReceiver(c)
    x0 = vector(512, seed=1)
    x = x0.clone()
    decoded_sum = torch.zeros(512)
    rx_ref: torch.Tensor | None = None
    for t in range(44):  # 7 changes, then 36 messages with x held still (enough for topk:0.03 to send all)
        if t:
            x = x + 0.05 * vector(512, seed=10 + t) if t < 8 else x  # then hold still
        msg = tx.encode("b", Payload("state", {"params": x.clone()}, seq=t + 1))
        before = rx_ref
        out = rx.decode("a", 7, msg)
        assert out is not None and set(out.scalars) == set()
        tx.delivered("b")
        rx_ref = out.tensors["params"]
        ref = tx.reference("b")
        assert ref is not None and torch.equal(ref["params"], rx_ref)
        if before is not None:
            decoded_sum += rx_ref - before
        residual = x - ref["params"]
        assert torch.allclose(decoded_sum + residual, x - x0, atol=1e-5)
    assert tx.key_frames == 1 and tx.deltas == 43
    assert rx_ref is not None and float((x - rx_ref).norm()) <= 1e-3 * float(x.norm())


def test_key_frames_after_failures_replays_and_restarts() -> None:
    c = parse_compression("int8")
    assert c is not None
    tx, rx = DeltaSender(c), DeltaReceiver(c)
    x = vector(300)
    key = tx.encode("b", Payload("state", {"params": x}))
    assert "params" in key.tensors and key.scalars[BASE_KEY] == -1
    assert rx.decode("a", 1, key) is not None
    tx.delivered("b")
    delta = tx.encode("b", Payload("state", {"params": x + 1}))
    assert f"params{SEP}q" in delta.tensors and "params" not in delta.tensors
    assert rx.decode("a", 1, delta) is not None
    assert rx.decode("a", 1, delta) is None, "a replay of the applied delta is acknowledged, not applied twice"
    with pytest.raises(SchemaMismatchError, match="key frame"):
        rx.decode("a", 2, delta)  # a restarted sender (new incarnation) without a key frame
    fresh = DeltaReceiver(c)
    with pytest.raises(SchemaMismatchError):
        fresh.decode("a", 1, delta)  # a restarted receiver
    tx.failed("b")
    assert tx.encode("b", Payload("state", {"params": x}, seq=3)).scalars[BASE_KEY] == -1
    other = tx.encode("c", Payload("token", {"params": x}))
    assert other.tensors.keys() == {"params"} and VERSION_KEY not in other.scalars


def hostile_delta(c: Any, n: int, **changes: torch.Tensor) -> Payload:
    tx = DeltaSender(c)
    tx.encode("v", Payload("state", {"params": torch.zeros(n)}))
    tx.delivered("v")
    msg = tx.encode("v", Payload("state", {"params": torch.ones(n)}))
    tensors = dict(msg.tensors)
    for name, t in changes.items():
        tensors[f"params{SEP}{name}"] = t
    return Payload("state", tensors, scalars=msg.scalars)


def primed(c: Any, n: int) -> DeltaReceiver:
    rx = DeltaReceiver(c)
    rx.decode("a", 1, Payload("state", {"params": torch.zeros(n)}, scalars={VERSION_KEY: 1.0, BASE_KEY: -1.0}))
    return rx


def test_hostile_compressed_payloads_are_refused_by_the_decoder() -> None:
    n = 64
    int8, topk = parse_compressor("int8:16"), parse_compressor("topk:0.25")
    int4, mask = Int4Block(16, "int4:16"), SparseTopK(0.35, "topk:0.35")
    odd_mask = mask.compress(torch.arange(n - 1, dtype=torch.float32))["mask"].clone()
    odd_mask[-1] |= 0x80  # the padding bit past the last of n - 1 elements, one real bit cleared to keep k set
    odd_mask[-1] &= 0xBF
    cases = [
        (int8, {"scales": torch.tensor([1.0, math.nan, 1.0, 1.0])}, "scale"),
        (int8, {"scales": torch.tensor([1.0, -1.0, 1.0, 1.0])}, "scale"),
        (int8, {"scales": torch.full((4,), 3e38)}, "overflow"),
        (int8, {"q": torch.full((n,), -128, dtype=torch.int8)}, "-128"),
        (int8, {"q": torch.zeros(n - 1, dtype=torch.int8)}, "shape"),
        (topk, {"indices": torch.arange(16, dtype=torch.int32) + n}, "out of range"),
        (topk, {"indices": torch.zeros(16, dtype=torch.int32)}, "strictly increasing"),
        (topk, {"values": torch.full((16,), math.inf)}, "NaN or Inf"),
        (int4, {"scales": torch.tensor([1.0, -1.0, 1.0, 1.0])}, "scale"),
        (int4, {"scales": torch.tensor([1.0, math.inf, 1.0, 1.0])}, "scale"),
        (int4, {"scales": torch.full((4,), 3e38)}, "overflow"),
        (int4, {"q": torch.zeros(n // 2, dtype=torch.uint8)}, "-8"),
        (int4, {"q": torch.full((n // 2,), 0xF0, dtype=torch.uint8)}, "-8"),
        (int4, {"q": torch.full((n // 2,), 0x08, dtype=torch.int8)}, "expected torch.uint8"),
        (int4, {"q": torch.full((n // 2 + 1,), 0x88, dtype=torch.uint8)}, "shape"),
        (mask, {"mask": torch.full((n // 8,), 0xFF, dtype=torch.uint8)}, "selects 64 coordinates, expected 23"),
        (mask, {"mask": torch.zeros(n // 8, dtype=torch.uint8)}, "selects 0 coordinates"),
        (mask, {"mask": torch.zeros(n // 8 + 1, dtype=torch.uint8)}, "shape"),
        (mask, {"values": torch.full((23,), math.nan, dtype=torch.float16)}, "NaN or Inf"),
        (mask, {"values": torch.ones(23)}, "expected torch.float16"),
    ]
    for c, change, match in cases:
        with pytest.raises(CorruptPayloadError, match=match):
            primed(c, n).decode("a", 1, hostile_delta(c, n, **change))
    odd = [  # n - 1 elements: a padding nibble, and padding bits in the mask
        (int4, {"q": torch.full((n // 2,), 0x98, dtype=torch.uint8)}, "padding nibble"),
        (mask, {"mask": odd_mask}, "past the last element"),
    ]
    for c, change, match in odd:
        with pytest.raises(CorruptPayloadError, match=match):
            primed(c, n - 1).decode("a", 1, hostile_delta(c, n - 1, **change))
    good = hostile_delta(int8, n)
    for scalars in ({}, {VERSION_KEY: 2.5, BASE_KEY: 1.0}, {VERSION_KEY: 2.0, BASE_KEY: 2.0}):
        with pytest.raises(CorruptPayloadError):
            primed(int8, n).decode("a", 1, Payload("state", good.tensors, scalars=scalars))
    mixed = Payload("state", good.tensors, scalars={VERSION_KEY: 2.0, BASE_KEY: -1.0})
    with pytest.raises(CorruptPayloadError, match="key frame"):
        primed(int8, n).decode("a", 1, mixed)


def test_config_names_the_key_and_refuses_unsound_algorithms(tmp_path: Path) -> None:
    base = {"node_id": "a", "state_dir": str(tmp_path)}
    for spec in ("none", "fp16", "bf16", "int8", "int8:512", "int4", "int4:32", "topk", "topk:0.05", "topk:0.35"):
        assert config_mod.validate({**base, "gossip": {"compression": spec}}, source="t").gossip.compression == spec
    for bad in ("gzip", "topk:0", "topk:1", "topk:1.5", "int8:3", "int4:3", "int4:x", "int4:2000000", "fp16:2"):
        with pytest.raises(ConfigError, match=r"gossip\.compression"):
            config_mod.validate({**base, "gossip": {"compression": bad}}, source="t")
    for name in ("choco", "sgp", "next", "dssfn"):
        assert support(name)
        with pytest.raises(ConfigError, match=f"gossip.compression 'int8' is not available with algorithm '{name}'"):
            config_mod.validate({**base, "algorithm": {"name": name}, "gossip": {"compression": "int8"}}, source="t")
    for name in ("cdl", "dpsgd", "local_sgd", "dmsgd", "dmsgd_async", "none"):
        assert not support(name)


def test_hello_agreement_names_the_key() -> None:
    me = Identity("a", PROTOCOL_VERSION, "fp", "cdl", 1, compression="int8")
    info = PeerInfo("b", PROTOCOL_VERSION, "fp", "cdl", 1, "127.0.0.1:1", 2)
    assert "gossip.compression 'none' != ours 'int8'" in incompatibility(me, info)
    assert incompatibility(me, PeerInfo("b", PROTOCOL_VERSION, "fp", "cdl", 1, "x:1", 2, compression="int8")) == ""


# ------------------------------------------------------------------------------------- a real daemon
EVIL = "evil"


async def push(stub: gossip_pb2_grpc.GossipServiceStub, requests: Iterable[gossip_pb2.PushRequest]) -> Any:
    async def gen() -> AsyncIterator[gossip_pb2.PushRequest]:
        for r in requests:
            yield r

    try:
        return await stub.Push(gen(), timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code()


def victim(tmp_path: Path, spec: str) -> Node:
    tree = {
        "node_id": "victim",
        "state_dir": str(tmp_path / "victim"),
        "discovery": {"mdns": False},
        "data": {"dataset": "digits"},
        "model": {"name": "logreg"},
        "train": {"epochs": 0.02, "torch_threads": 1, "device": "cpu"},
        "gossip": {"interval_s": 0.02, "compression": spec, "max_message_bytes": 4096},
        "metrics": {"interval_s": 60.0},
        "checkpoint": {"interval_s": 60.0},
    }
    return Node(config_mod.validate(tree, source="test"), stdout=io.StringIO())


@dataclass
class Attack:
    """A running victim daemon, a stub to it, and a sender whose key frame the victim already holds."""

    node: Node
    stub: gossip_pb2_grpc.GossipServiceStub
    tx: DeltaSender
    n: int
    x: torch.Tensor

    async def send(self, payload: Payload) -> Any:
        env = Envelope(EVIL, self.node.fingerprint, self.node.algorithm.name, 5, 1, "127.0.0.1:9", 1)
        header, chunks = encode(env, payload, chunk_bytes=1000)
        return await push(self.stub, iter_requests(header, chunks))


@contextlib.asynccontextmanager
async def attacking(tmp_path: Path, spec: str) -> AsyncIterator[Attack]:
    node = victim(tmp_path, spec)
    task = asyncio.create_task(node.run())
    try:
        await asyncio.wait_for(node.ready.wait(), timeout=20)
        async with grpc.aio.insecure_channel(node.address) as channel:
            n = node.handlers.facts.num_params
            c = parse_compression(spec)
            assert c is not None
            a = Attack(node, gossip_pb2_grpc.GossipServiceStub(channel), DeltaSender(c), n, torch.linspace(-1, 1, n))
            assert (await a.send(a.tx.encode("victim", Payload("state", {"params": a.x}, seq=1)))).accepted
            a.tx.delivered("victim")
            yield a
    finally:
        node.request_stop()
        await asyncio.wait_for(task, timeout=20)


async def test_hostile_compressed_pushes_to_a_real_daemon(tmp_path: Path) -> None:
    """A daemon with gossip.compression=int8 takes a key frame and a delta, refuses hostile deltas with the
    right status (and never applies them), refuses a Hello with another compression naming the key, and keeps
    serving."""
    async with attacking(tmp_path, "int8:16") as attack:
        node, stub, tx, n, x, send = attack.node, attack.stub, attack.tx, attack.n, attack.x, attack.send
        delta = tx.encode("victim", Payload("state", {"params": x * 0.5}, seq=2))
        nb = math.ceil(n / 16)
        bad = {
            "scales": (torch.full((nb,), math.nan), grpc.StatusCode.INVALID_ARGUMENT),
            "q": (torch.full((n,), -128, dtype=torch.int8), grpc.StatusCode.INVALID_ARGUMENT),
        }
        for wire, (t, code) in bad.items():
            assert (
                await send(Payload("state", {**delta.tensors, f"params{SEP}{wire}": t}, seq=2, scalars=delta.scalars))
                == code
            )
        wrong_size = {**delta.tensors, f"params{SEP}q": torch.zeros(n + 1, dtype=torch.int8)}
        assert (
            await send(Payload("state", wrong_size, seq=2, scalars=delta.scalars))
            == grpc.StatusCode.FAILED_PRECONDITION
        )
        unknown_base = {**delta.scalars, BASE_KEY: 0.0}
        assert (
            await send(Payload("state", delta.tensors, seq=2, scalars=unknown_base))
            == grpc.StatusCode.FAILED_PRECONDITION
        )
        big = {"params": torch.zeros(2000)}
        assert await send(Payload("state", big, seq=2, scalars=delta.scalars)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert node.counters.rejected_messages == 5
        ok = await send(delta)
        assert ok.accepted, "the daemon still takes a valid delta after the hostile ones"
        ref = node.handlers.codec._refs[EVIL].tensors["params"]  # type: ignore[union-attr]
        assert torch.equal(ref, tx._pending["victim"].tensors["params"])

        hello = gossip_pb2.HelloRequest(
            node_id="other", protocol_version=PROTOCOL_VERSION, schema_fingerprint=node.fingerprint,
            algorithm=node.algorithm.name, degree=1, address="127.0.0.1:9", incarnation=3, compression="topk",
        )  # fmt: skip
        answer = await stub.Hello(hello, timeout=5)
        assert not answer.accepted and "gossip.compression 'topk' != ours 'int8:16'" in answer.reason
        assert answer.compression == "int8:16"
        status = await stub.GetStatus(gossip_pb2.GetStatusRequest(), timeout=5)
        assert status.rejected_messages == 5


@pytest.mark.parametrize("spec", ["int4:16", "topk:0.35"])
async def test_packed_deltas_through_a_real_daemon(tmp_path: Path, spec: str) -> None:
    """int4 nibbles and a top-k position mask travel as uint8 through the real encoder, Push stream and codec:
    valid deltas are applied bit for bit as the sender decoded them, hostile ones refused and never applied."""
    async with attacking(tmp_path, spec) as attack:
        node, tx, n, x, send = attack.node, attack.tx, attack.n, attack.x, attack.send
        delta = tx.encode("victim", Payload("state", {"params": x * 0.5 + 0.01}, seq=2))
        wire = {k.partition(SEP)[2]: t for k, t in delta.tensors.items() if SEP in k}
        if spec.startswith("int4"):
            assert set(wire) == {"scales", "q"} and wire["q"].dtype == torch.uint8
            hostile, wrong_size = {"q": torch.zeros_like(wire["q"])}, {"q": torch.zeros(n, dtype=torch.uint8)}
        else:
            assert set(wire) == {"mask", "values"} and wire["mask"].dtype == torch.uint8
            hostile, wrong_size = (
                {"mask": torch.full_like(wire["mask"], 0xFF)},
                {"mask": torch.zeros(n, dtype=torch.uint8)},
            )
        for change, code in (
            (hostile, grpc.StatusCode.INVALID_ARGUMENT),
            (wrong_size, grpc.StatusCode.FAILED_PRECONDITION),
        ):
            tensors = {**delta.tensors, **{f"params{SEP}{k}": t for k, t in change.items()}}
            assert await send(Payload("state", tensors, seq=2, scalars=delta.scalars)) == code
        assert node.counters.rejected_messages == 2
        assert (await send(delta)).accepted, "the daemon still takes a valid delta after the hostile ones"
        tx.delivered("victim")
        ref = node.handlers.codec._refs[EVIL].tensors["params"]  # type: ignore[union-attr]
        sent = tx.reference("victim")
        assert sent is not None and torch.equal(ref, sent["params"])


def test_compressed_manifest() -> None:
    c = parse_compressor("topk:0.5")
    m = compressed_manifest({"params": ((10,), "float32"), "step": ((1,), "int64")}, c)
    assert m == {"params/values": ((5,), "float32"), "params/indices": ((5,), "int32"), "step": ((1,), "int64")}


@pytest.mark.timeout(120)
# CI budget: the step-mode case in CI; the mix-mode one (the demo benchmark's path as well) under --slow.
@pytest.mark.parametrize(
    ("algorithm", "spec"), [pytest.param("cdl", "int8", marks=pytest.mark.slow), ("dpsgd", "topk")]
)
async def test_two_daemons_gossip_compressed_deltas_and_agree(tmp_path: Path, algorithm: str, spec: str) -> None:
    """Mix mode (cdl, one latest-wins state per round) and step mode (dpsgd, reliable per-destination sends):
    the pushes carry deltas (a key frame first), and after training the peers agree as closely as without."""
    cluster = unique("cmp")

    def make(i: int) -> Node:
        sections: dict[str, Any] = {
            "data": {"partition": "shards:2", "num_partitions": 2, "partition_index": i},
            "algorithm": {"name": algorithm},
            "train": {"epochs": 1, "wait_for_neighbors_s": 20, "lr": 0.1},
            "discovery": {"mdns": True, "cluster": cluster},
            "gossip": {"interval_s": 0.01, "rpc_timeout_s": 2.0, "compression": spec},
        }
        return Node(fast_config(tmp_path, f"{cluster}-{i}", **sections), stdout=io.StringIO())

    nodes = [make(i) for i in range(2)]
    tasks = await start_nodes(nodes)
    try:
        await until(nodes, lambda: all(len(x.core.neighbours()) == 1 for x in nodes), 20, "membership")
        await asyncio.wait_for(asyncio.gather(*(x.trained.wait() for x in nodes)), timeout=60)
        await until(nodes, lambda: consensus_distance([x.trainer.get_flat() for x in nodes]) < 1e-4, 30, "consensus")
    finally:
        await stop_nodes(nodes, tasks)
    raw = 4 * nodes[0].handlers.facts.num_params
    for x in nodes:
        codec = x.pusher.codec
        assert codec is not None and codec.key_frames >= 1 and codec.deltas > 3 * codec.key_frames
        c = x.counters
        assert c.messages_sent > 4 and c.bytes_sent / c.messages_sent < 0.45 * raw, (c.bytes_sent, c.messages_sent)
        assert x.counters.rejected_messages == 0
