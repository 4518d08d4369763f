"""P3, mass-conserving push-sum with running sums (spec §1.4): the averaging core of `sgp` and `next_pushsum`.

Theory of operation. Node i holds mass: one or more named vectors v_i (float64) and a scalar weight φ_i, all
sharing the weight. The de-biased estimate of vector v is v_i / φ_i. Push-sum moves mass along the out-edges:

* `emit(out)` keeps a 1/(d+1) share of every vector and of the weight (d = len(out)) and adds each out-neighbour
  j's share to the running sum σ_ij, the mass i has ever sent to j. The payload to j carries σ_ij itself (every
  vector plus the weight as a one-element tensor: P + 1 values for one vector), not the share;
* `receive(sender, payload)` adds σ_ji − ρ_ji and sets ρ_ji ← σ_ji, where ρ_ji is the last running sum applied
  from that sender. Messages are unkeyed, latest-wins sends: a lost message is recovered by the next one that
  arrives, and a late older one (lower `payload.seq`, which increases per sender) is ignored.

Invariant (exact up to float64 rounding, under any pattern of loss, reordering and duplication):
Σ_i v_i + Σ_{i→j} (σ_ij − ρ_ji) = Σ_i v_i(0), and the same for φ. `network_mass` computes the left-hand side,
so tests can check it at any instant; once every link has delivered its latest message the in-flight term is 0.

Where mass is lost, and why that is the policy:

* `forget(j)` (j left the view) drops both running sums of the link: the mass i sent j that j had not applied,
  the mass j sent i that i had not applied, and whatever j holds are lost. If j comes back, the link restarts
  from zero: i's next payload to j carries a higher link generation (`scalars["gen"]`), which tells j to count
  from zero, and the first payload from j after the forget only re-synchronizes ρ (its delta is dropped, because
  i no longer knows what it had applied) unless j restarted the link too. Nothing is ever counted twice on a
  link both ends know about;
* `restart(values)` starts a fresh push-sum instance at this node (new held mass, every out-link at zero); a
  caller that restarts a whole network (NEXT-pushsum's tracker epochs) drops older instances' payloads itself;
* a sender that restarts (higher `incarnation`) counts from zero again, so ρ is reset for it;
* after `load_state_dict` (a restart from a checkpoint) the held mass is restored but not the running sums
  (they would be stale); the first payload from each sender re-synchronizes. A node that restarts *without*
  a checkpoint cannot tell its neighbours' old running sums from new ones and applies them in full: that
  duplicates mass once. Push-sum still reaches consensus (estimates are ratios), but on a different average.

The wire dtype is float64 by default: running sums grow linearly with the number of sends, and float32 would
drift by about 6e-8 · |σ| per message. With `wire_dtype=torch.float32` the sender rounds σ to float32 *before*
deducting the share, so mass is still conserved exactly; only the share actually moved is perturbed.

Pure: no clocks, no I/O, no randomness.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from peer.algorithms.base import Payload

WEIGHT = "weight"  # the tensor name of the push-sum weight on the wire


@dataclass
class _Seen:
    """What receiver i knows about the link from one sender."""

    incarnation: int
    seq: int
    gen: int
    rho: dict[str, torch.Tensor] | None  # None: forgotten or unknown, the next payload only re-synchronizes


class RunningSums:
    """One node's push-sum state: named vectors sharing one weight, with running sums per link (see module)."""

    def __init__(
        self,
        values: Mapping[str, torch.Tensor],
        weight: float = 1.0,
        *,
        kind: str = "push_sum",
        wire_dtype: torch.dtype = torch.float64,
    ) -> None:
        if WEIGHT in values:
            raise ValueError(f"{WEIGHT!r} is reserved for the push-sum weight")
        self.values: dict[str, torch.Tensor] = {k: v.detach().to(torch.float64).clone() for k, v in values.items()}
        self.weight = float(weight)
        self.kind = kind
        self.wire_dtype = wire_dtype
        self.seq = 0
        self.sent: dict[str, dict[str, torch.Tensor]] = {}  # σ_ij per out-neighbour j (names + WEIGHT)
        self.gen: dict[str, int] = {}  # link generation per out-neighbour; bumped by forget
        self.seen: dict[str, _Seen] = {}
        self.resync_unknown = False  # set after a checkpoint restore: unknown senders re-synchronize
        self.ignored = 0  # out-of-order or duplicate payloads
        self.resynced = 0  # payloads whose delta was dropped to re-synchronize a link

    # ---------------------------------------------------------------------------------------- reading
    def estimate(self, name: str) -> torch.Tensor:
        """The de-biased estimate v / φ (float64)."""
        return self.values[name] / self.weight

    def set(self, name: str, estimate: torch.Tensor) -> None:
        """Set vector `name` so that its estimate is `estimate` (mass = estimate · φ); the caller's local update."""
        self.values[name] = estimate.detach().to(torch.float64) * self.weight

    def add_mass(self, name: str, delta: torch.Tensor) -> None:
        """Inject mass into vector `name` (a gradient step, a tracker correction); changes the network total."""
        self.values[name].add_(delta.detach().to(torch.float64))

    # ---------------------------------------------------------------------------------------- sending
    def emit(
        self,
        out: Sequence[str],
        *,
        round_: int = 0,
        step: int = 0,
        scalars: Mapping[str, float] | None = None,
        resend_only: Collection[str] = (),
    ) -> dict[str, Payload]:
        """Keep a 1/(k+1) share, push one share to each of the k destinations of `out` not in `resend_only`; those
        get their running sum again with nothing new in it (which delivers what a lost message carried). Still
        exact push-sum: a destination without a share is a zero in this node's column. Returns one payload per
        destination of `out`."""
        self.seq += 1
        if not out:
            return {}
        frac = 1.0 / (len([j for j in out if j not in resend_only]) + 1)
        shares = {k: v * frac for k, v in self.values.items()}
        shares[WEIGHT] = torch.tensor([self.weight * frac], dtype=torch.float64)
        moved = {k: torch.zeros_like(v) for k, v in shares.items()}
        payloads: dict[str, Payload] = {}
        for j in out:
            sigma = self.sent.get(j)
            if sigma is None:
                sigma = self.sent[j] = {k: torch.zeros_like(v) for k, v in shares.items()}
            tensors: dict[str, torch.Tensor] = {}
            if j in resend_only:
                tensors = {k: v.to(self.wire_dtype) for k, v in sigma.items()}  # exact: σ is already wire-rounded
                extra = {"gen": float(self.gen.get(j, 0)), **(scalars or {})}
                payloads[j] = Payload(self.kind, tensors, seq=self.seq, round=round_, step=step, scalars=extra)
                continue
            for k, share in shares.items():
                # Round to the wire dtype first, so that what leaves is exactly what the receiver will see.
                new = (sigma[k] + share).to(self.wire_dtype)
                new64 = new.to(torch.float64)
                moved[k].add_(new64 - sigma[k])
                sigma[k] = new64
                tensors[k] = new
            extra = {"gen": float(self.gen.get(j, 0)), **(scalars or {})}
            payloads[j] = Payload(self.kind, tensors, seq=self.seq, round=round_, step=step, scalars=extra)
        for k, v in self.values.items():
            v.sub_(moved[k])
        self.weight -= float(moved[WEIGHT][0])
        return payloads

    # -------------------------------------------------------------------------------------- receiving
    def receive(self, sender: str, payload: Payload, *, incarnation: int = 0) -> bool:
        """Apply σ − ρ from `sender`. False for an older or duplicate payload (by (incarnation, seq)), or one that
        lacks a vector or the weight."""
        gen = int(payload.scalars.get("gen", 0))
        seen = self.seen.get(sender)
        if seen is not None and (incarnation, payload.seq) <= (seen.incarnation, seen.seq):
            self.ignored += 1
            return False
        names = [*self.values, WEIGHT]
        if any(k not in payload.tensors for k in names):
            self.ignored += 1  # another algorithm's payload (the codec checks names per kind; be safe anyway)
            return False
        sigma = {k: payload.tensors[k].to(torch.float64) for k in names}
        if seen is None:
            rho = None if self.resync_unknown else {k: torch.zeros_like(v) for k, v in sigma.items()}
        elif incarnation > seen.incarnation or gen > seen.gen:
            rho = {k: torch.zeros_like(v) for k, v in sigma.items()}  # the sender restarted the link at zero
        else:
            rho = seen.rho
        if rho is None:
            self.resynced += 1
        else:
            for k in self.values:
                self.values[k].add_(sigma[k] - rho[k])
            self.weight += float(sigma[WEIGHT][0] - rho[WEIGHT][0])
        self.seen[sender] = _Seen(incarnation, payload.seq, gen, sigma)
        return True

    # ---------------------------------------------------------------------------------------- restarts
    def forget(self, node: str) -> None:
        """`node` left: drop both running sums of the link; the mass in flight on it is lost (see module)."""
        if self.sent.pop(node, None) is not None:
            self.gen[node] = self.gen.get(node, 0) + 1
        seen = self.seen.get(node)
        if seen is not None:
            seen.rho = None

    def restart(self, values: Mapping[str, torch.Tensor], weight: float = 1.0) -> None:
        """Start a fresh push-sum instance: new held mass, and every out-link restarts at zero.

        Each out-link's generation is bumped, so a receiver counts this node's next payload from zero. What was in
        flight on the out-links is dropped. Payloads still arriving from senders of the previous instance are
        applied as usual: a caller that restarts a whole network (NEXT-pushsum's tracker epochs) tags its payloads
        and drops older instances' payloads before calling `receive`.
        """
        self.values = {k: v.detach().to(torch.float64).clone() for k, v in values.items()}
        self.weight = float(weight)
        for j in self.sent:
            self.gen[j] = self.gen.get(j, 0) + 1
        self.sent = {}

    # ------------------------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Held mass and the message counter; running sums are deliberately not saved (see module)."""
        return {"values": {k: v.clone() for k, v in self.values.items()}, "weight": self.weight, "seq": self.seq}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.values = {k: v.to(torch.float64).clone() for k, v in state["values"].items()}
        self.weight = float(state["weight"])
        self.seq = int(state["seq"])
        self.sent, self.gen, self.seen = {}, {}, {}
        self.resync_unknown = True


def network_mass(nodes: Mapping[str, RunningSums]) -> tuple[dict[str, torch.Tensor], float]:
    """Σ held + Σ in flight (σ_ij − ρ_ji, over links whose receiver still tracks the sender), for tests.

    Equal to the initial total (up to float64 rounding) whatever the network did, as long as no `forget`,
    `restart`, `add_mass` or `set` was called; after a lossless final exchange the in-flight part is zero. Links
    whose sender restarted them (a higher generation) count once the receiver has seen the new generation.
    """
    first = next(iter(nodes.values()))
    values = {k: torch.zeros_like(v) for k, v in first.values.items()}
    weight = 0.0
    for i, node in nodes.items():
        for k, v in node.values.items():
            values[k] += v
        weight += node.weight
        for j, sigma in node.sent.items():
            seen = nodes[j].seen.get(i) if j in nodes else None
            rho = seen.rho if seen is not None else None
            if seen is not None and rho is None:
                continue
            for k in values:
                values[k] += sigma[k] - (rho[k] if rho is not None else 0.0)
            weight += float(sigma[WEIGHT][0] - (rho[WEIGHT][0] if rho is not None else 0.0))
    return values, weight
