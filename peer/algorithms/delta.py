"""Delta compression on the wire (`gossip.compression`): what a sender sends each neighbour, what a receiver rebuilds.

Theory of operation. Compressing a whole model is lossy in the wrong place (top-k of a model is not a model), so
each link carries a **delta against a reference both ends hold**:

- The sender keeps, per neighbour j, the reference r_j: exactly what j has rebuilt from this sender so far. To
  send x it transmits q = C(x − r_j) (the compressor's wire tensors) and, once j acknowledged the push (the Push
  RPC succeeded), sets r_j ← r_j + D(q), D being the receiver's own decoding. The part of x − r_j that C dropped
  stays in x − r_j and goes out with the next delta: that is the error feedback, with no separate residual
  buffer (sum of what j decoded + residual = x − r_j⁰ at every step, exactly).
- The receiver keeps, per sender, the same r and its version, applies r ← r + D(q) and hands the algorithm a
  plain "state" payload holding r. Both ends add the same decoded tensors in the same order, so they agree bit
  for bit.
- The first message on a link, and the first after any failed push, is a **key frame**: the raw float32 tensors,
  which become r on both ends. A delta whose base version is not the receiver's current one (a push lost after
  the receiver applied it, a receiver restart, an evicted reference) is refused with FAILED_PRECONDITION; the
  sender then drops r_j and sends a key frame. A replay of the delta already applied is accepted and ignored.

Only payload kinds whose tensors are states to be approximated (`COMPRESSIBLE_KINDS`) are compressed; which
algorithms accept which compression, and why, is `support()` (docs/reference/compression.md has the table).
Pure: no sockets or clocks; the daemon's pusher and handlers hold one `DeltaSender` and one `DeltaReceiver`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from peer.algorithms.base import Manifest, Payload
from peer.algorithms.compress import Compressor, parse_compressor
from peer.algorithms.compress_packed import Int4Block, SparseTopK
from peer.errors import CorruptPayloadError, SchemaMismatchError

COMPRESSION_SPECS = ("none", "fp16", "bf16", "int8", "int8:B", "int4", "int4:B", "topk", "topk:F")
DEFAULT_INT8_BLOCK = 256
DEFAULT_INT4_BLOCK = 64
DEFAULT_TOPK_FRACTION = 0.35
COMPRESSIBLE_KINDS = frozenset({"state", "momentum_state"})
VERSION_KEY = "_delta.version"  # in Payload.scalars: this message's version on its link
BASE_KEY = "_delta.base"  # the version the delta applies to; -1 marks a key frame
SEP = "/"  # wire tensor names of a compressed tensor: "params/values", "params/indices"

# Algorithms whose messages may be compressed, and why the others may not.
_UNSOUND = {
    "choco": "CHOCO already compresses its messages (algorithm.compressor); compressing them again breaks its x̂ copies",
    "sgp": "push-sum mass must be conserved exactly; a lossy delta creates or destroys mass",
    "next_pushsum": "push-sum mass and the gradient tracker's sum must be conserved exactly",
    "next": "the gradient tracker's invariant (the trackers sum to the sum of gradients) needs exact messages",
    "digest": "a token is one model handed from peer to peer, not a state both ends can hold a reference of",
    "dssfn": "ADMM needs exact averages of its layer variables; a lossy delta biases the solution",
}


def support(algorithm: str) -> str:
    """ "" if `gossip.compression` is sound for `algorithm`, else the reason it is not."""
    return _UNSOUND.get(algorithm, "")


def parse_compression(spec: str) -> Compressor | None:
    """The compressor of a `gossip.compression` value (None for "none"); ValueError naming the valid values."""
    name, _, arg = spec.strip().partition(":")
    try:
        if name == "none" and not arg:
            return None
        if name in ("fp16", "bf16") and not arg:
            return parse_compressor(name)
        if name == "int8":
            return parse_compressor(f"int8:{int(arg) if arg else DEFAULT_INT8_BLOCK}")
        if name == "int4":
            block = int(arg) if arg else DEFAULT_INT4_BLOCK
            return Int4Block(block, f"int4:{block}")
        if name == "topk":
            fraction = float(arg) if arg else DEFAULT_TOPK_FRACTION
            if not 0.0 < fraction < 1.0:
                raise ValueError(f"the fraction must be in (0, 1), got {fraction}")
            return SparseTopK(fraction, f"topk:{fraction}")
    except ValueError as e:
        raise ValueError(f"invalid gossip.compression {spec!r}: {e}") from None
    raise ValueError(f"unknown gossip.compression {spec!r}; valid: {', '.join(COMPRESSION_SPECS)}")


def _compressible(shape: tuple[int, ...], dtype: str) -> bool:
    return len(shape) == 1 and shape[0] > 0 and dtype == "float32"


def compressed_manifest(manifest: Manifest, compressor: Compressor) -> Manifest:
    """The wire manifest of a delta: each 1-D float32 tensor replaced by its compressor's tensors."""
    out: Manifest = {}
    for name, (shape, dtype) in manifest.items():
        if _compressible(tuple(shape), dtype):
            for wire, spec in compressor.manifest(shape[0]).items():
                out[f"{name}{SEP}{wire}"] = spec
        else:
            out[name] = (tuple(shape), dtype)
    return out


def expected_with_compression(
    expected_tensors: Manifest,
    expected_by_kind: Mapping[str, Manifest | list[Manifest]] | None,
    compressor: Compressor,
) -> dict[str, Manifest | list[Manifest]]:
    """Per-kind manifests a receiver accepts: for compressible kinds, the key frame (raw) or the delta."""
    out: dict[str, Manifest | list[Manifest]] = dict(expected_by_kind or {})
    for kind in COMPRESSIBLE_KINDS:
        base = out.get(kind, expected_tensors)
        raws = [base] if isinstance(base, Mapping) else list(base)
        out[kind] = [*raws, *(compressed_manifest(m, compressor) for m in raws)]
    return out


@dataclass
class _Ref:
    version: int
    tensors: dict[str, torch.Tensor]
    incarnation: int = 0


class DeltaSender:
    """The sending end: per-neighbour references, committed only when a push is acknowledged."""

    def __init__(self, compressor: Compressor) -> None:
        self.compressor = compressor
        self._refs: dict[str, _Ref] = {}
        self._pending: dict[str, _Ref] = {}
        self._version = 0
        self.key_frames = 0
        self.deltas = 0

    def encode(self, to: str, payload: Payload) -> Payload:
        """The message for `to`: a delta against its reference, or a key frame. Call `delivered(to)` once the
        push succeeded, `failed(to)` if it did not."""
        if payload.kind not in COMPRESSIBLE_KINDS:
            return payload
        names = [n for n, t in payload.tensors.items() if _compressible(tuple(t.shape), _dtype(t))]
        self._version += 1
        version = self._version
        ref = self._refs.get(to)
        wire: dict[str, torch.Tensor] = {n: t for n, t in payload.tensors.items() if n not in names}
        new: dict[str, torch.Tensor] = {}
        if (
            ref is None
            or sorted(ref.tensors) != sorted(names)
            or any(ref.tensors[n].shape != payload.tensors[n].shape for n in names)
        ):
            base = -1
            for n in names:
                new[n] = payload.tensors[n].detach().clone()
                wire[n] = new[n]
            self.key_frames += 1
        else:
            base = ref.version
            for n in names:
                x = payload.tensors[n].detach()
                tensors, decoded = self.compressor.round_trip(x - ref.tensors[n])
                for w, t in tensors.items():
                    wire[f"{n}{SEP}{w}"] = t
                new[n] = ref.tensors[n] + decoded
            self.deltas += 1
        self._pending[to] = _Ref(version, new)
        scalars = {**payload.scalars, VERSION_KEY: float(version), BASE_KEY: float(base)}
        return replace(payload, tensors=wire, scalars=scalars)

    def delivered(self, to: str) -> None:
        pending = self._pending.pop(to, None)
        if pending is not None:
            self._refs[to] = pending

    def failed(self, to: str) -> None:
        """The push may or may not have arrived: start the link over with a key frame."""
        self._pending.pop(to, None)
        self._refs.pop(to, None)

    def reference(self, to: str) -> dict[str, torch.Tensor] | None:
        ref = self._refs.get(to)
        return ref.tensors if ref is not None else None


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _version(scalars: Mapping[str, float], key: str, low: int) -> int:
    value = scalars.get(key)
    if value is None:
        raise CorruptPayloadError(f"compressed payload lacks scalar {key!r}")
    if not math.isfinite(value) or value != int(value) or not low <= value < 2**53:
        raise CorruptPayloadError(f"compressed payload has invalid {key!r} = {value}")
    return int(value)


class DeltaReceiver:
    """The receiving end: per-sender references (at most `max_senders`, least recently used evicted).

    `decode` treats its input as hostile (it already passed the codec's manifest check): version scalars,
    compressed tensors and the rebuilt state are checked, and CorruptPayloadError (INVALID_ARGUMENT) or, for a
    delta against a reference this receiver does not hold, SchemaMismatchError (FAILED_PRECONDITION) is raised.
    Not thread-safe: the shell serializes `decode` calls (it may run them in a worker thread).
    """

    def __init__(self, compressor: Compressor, *, max_senders: int = 64) -> None:
        self.compressor = compressor
        self.max_senders = max_senders
        self._refs: OrderedDict[str, _Ref] = OrderedDict()

    def decode(self, sender: str, incarnation: int, payload: Payload) -> Payload | None:
        """The plain payload for the algorithm, or None for a replay of the delta already applied."""
        if payload.kind not in COMPRESSIBLE_KINDS:
            return payload
        version = _version(payload.scalars, VERSION_KEY, 1)
        base = _version(payload.scalars, BASE_KEY, -1)
        if base >= version:
            raise CorruptPayloadError(f"compressed payload's base version {base} is not before its version {version}")
        scalars = {k: v for k, v in payload.scalars.items() if k not in (VERSION_KEY, BASE_KEY)}
        groups: dict[str, dict[str, torch.Tensor]] = {}
        plain: dict[str, torch.Tensor] = {}
        for name, t in payload.tensors.items():
            head, sep, wire = name.partition(SEP)
            if sep:
                groups.setdefault(head, {})[wire] = t
            else:
                plain[name] = t
        if base < 0:
            if groups:
                raise CorruptPayloadError("a key frame (base -1) carries compressed tensors")
            tensors = {n: t for n, t in plain.items() if _compressible(tuple(t.shape), _dtype(t))}
            self._store(sender, _Ref(version, {n: t.clone() for n, t in tensors.items()}, incarnation))
            return replace(payload, scalars=scalars)
        ref = self._refs.get(sender)
        if ref is not None and ref.incarnation == incarnation and ref.version == version:
            return None  # the sender retried a push we had applied
        if ref is None or ref.incarnation != incarnation or ref.version != base:
            have = "no reference" if ref is None or ref.incarnation != incarnation else f"version {ref.version}"
            raise SchemaMismatchError(
                f"compressed delta against version {base}, but this receiver holds {have}: the sender must "
                "send a key frame (it does so after this refusal)"
            )
        if sorted(groups) != sorted(ref.tensors):
            raise CorruptPayloadError(f"delta compresses tensors {sorted(groups)}, expected {sorted(ref.tensors)}")
        rebuilt = {}
        for name, wire_tensors in groups.items():
            r = ref.tensors[name]
            q = self.compressor.decompress(wire_tensors, r.numel(), r.dtype)
            x = r + q
            if not bool(torch.isfinite(x).all()):
                raise CorruptPayloadError(f"delta for {name!r} makes the state non-finite")
            rebuilt[name] = x
        self._store(sender, _Ref(version, rebuilt, incarnation))
        tensors = {**plain, **{n: t.clone() for n, t in rebuilt.items()}}
        return replace(payload, tensors=tensors, scalars=scalars)

    def _store(self, sender: str, ref: _Ref) -> None:
        self._refs[sender] = ref
        self._refs.move_to_end(sender)
        while len(self._refs) > self.max_senders:
            self._refs.popitem(last=False)

    def forget(self, sender: str) -> None:
        self._refs.pop(sender, None)
