"""P4, the token protocol (spec §1.4): random-walk tokens that lost or duplicated packets can neither lose nor fork.

Theory of operation. A token is (stream id, hop counter, payload tensors, scalars: N_current and a
`regenerated` count). Each node runs one `TokenWalk`, which holds, per stream, at most one copy in one of two
states:

* **held**: the token is at this node (it arrived, or it was created here, or it came back here). The algorithm
  merges into it and calls `forward` when it is ready to pass it on;
* **in flight**: it was sent to a neighbour `to` with hop h + 1 and no acknowledgement has come back yet. The
  copy is kept and re-sent every `retransmit_s` (`due`) until `ack(to, (stream, hop))`.

Receiving (`receive`): a copy of stream s with hop h is accepted only if h is above every hop of s this node has
accepted or sent (`seen[s]`); anything else is a duplicate (a retransmission whose ACK was lost, a duplicated
packet) and is ignored, though the transport acknowledges it again. Hops only grow along one walk, so a genuine
arrival always passes this test. Accepting s with a higher hop than an in-flight copy of s proves the copy got
through, so the copy is dropped (implicit acknowledgement).

Next hop (`next_hop`): the simple random walk (uniform over neighbours, stationary law ∝ degree), the lazy
Metropolis–Hastings walk (propose j uniformly, accept with min(1, d_i/d_j), otherwise *stay*: the token remains
held here and the algorithm merges into it again at its next opportunity; stationary law uniform), or `cycle`, a
fixed Hamiltonian order (the next node after this one in sorted(members) that is a neighbour; a test and
operations schedule, not a random walk). A node with no neighbour keeps the token.

Why a stream neither multiplies nor vanishes on a lossy network. At any time each stream has exactly one *live*
copy: the held copy, or the in-flight copy whose destination has not accepted its hop yet. A sent copy whose
destination already accepted that hop is dead: its destination rejects it, acknowledges it, and the sender drops it.
The only node that may ever put a stream back into circulation (the *regeneration authority*) is the one with the
in-flight copy, i.e. the last holder. It does so under one rule only:

    the destination of the in-flight copy was `forget`-ed AND is no longer in `view.members` (when the view
    lists members), AND this has been so for `regen_s`, with neither an ACK nor an implicit ACK meanwhile.

The copy is then taken back as held (same hop, `regenerated` + 1) and the algorithm forwards it to a neighbour drawn
among the remaining ones; with none it keeps it. While the destination is still a member the holder never re-draws,
however long the ACK takes: the destination may well hold the token already (only its ACK was lost), and a second
copy would fork the stream. What this cannot exclude is a destination that left after accepting and forwarding the
token (or a member evicted while alive). The two copies are pruned back to one as their walks cross: a copy is
rejected by every node that has seen an equal or higher hop of its stream, and a held copy is replaced by a
higher-hop arrival, at the cost of the progress merged into the losing copy. Restoring a checkpoint has the same
property. Conversely, a node that leaves for good while *holding* a stream takes it along: no other node may stand
in for it (that would be "anyone who has not seen it"), so the stream ends unless that node comes back from its
checkpoint; with S > 1 the other streams go on.

Streams are created once, at `start` (or at the first view that lists members): stream s ∈ [0, S) starts at
sorted(members)[s mod |members|], or at `origins[s mod len(origins)]` when the parameter is set. Peers must agree
on that list; a second origin of a stream is pruned as above.

Pure: no clock, no I/O; randomness from a `random.Random` seeded from the parameters and the node id.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field

from peer.algorithms.base import AlgoParams, NeighbourView, Payload, Send
from peer.algorithms.rto import RetransmitTimer

TOKEN_KIND = "token"
Walk = Literal["uniform", "lazy_mh", "cycle"]


class TokenParams(AlgoParams):
    """Parameters every token (P4) algorithm shares."""

    walk: Walk = Field(
        "uniform",
        description="next-hop kernel: uniform random walk, lazy Metropolis–Hastings (uniform visits), or cycle "
        "(sorted-member order; a test and operations schedule)",
    )
    retransmit_s: float = Field(
        0.5, gt=0, description="largest retransmission timeout of a token (adapts to the measured round trip)"
    )
    regen_s: float = Field(
        2.0, ge=0, description="re-issue a token whose destination left the membership after this long without ACK"
    )
    origins: list[str] = Field(
        default_factory=list, description="node ids where streams start (default: sorted cluster members)"
    )
    seed: int = Field(0, description="seed of the walk's random generator (combined with the node id)")


@dataclass
class Token:
    """One stream's token. The hop counts sends along the walk; `tensors` are replaced, never mutated in place."""

    stream: int
    hop: int
    tensors: dict[str, torch.Tensor]
    n: int  # N_current, the membership size the merge rule divides by
    regenerated: int = 0

    def payload(self) -> Payload:
        scalars = {"stream": float(self.stream), "hop": float(self.hop), "n": float(self.n)}
        scalars["regenerated"] = float(self.regenerated)
        return Payload(TOKEN_KIND, self.tensors, seq=self.hop, round=self.hop, scalars=scalars)

    @classmethod
    def from_payload(cls, payload: Payload) -> Token | None:
        s = payload.scalars
        if payload.kind != TOKEN_KIND or "stream" not in s or "n" not in s:
            return None
        tensors = {k: v.clone() for k, v in payload.tensors.items()}  # the sender may still hold these tensors
        return cls(int(s["stream"]), int(payload.round), tensors, max(int(s["n"]), 1), int(s.get("regenerated", 0)))

    def to_state(self) -> dict[str, Any]:
        meta = {"stream": self.stream, "hop": self.hop, "n": self.n, "regenerated": self.regenerated}
        return {**meta, "tensors": dict(self.tensors)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Token:
        stream, hop, n, regen = (int(state[k]) for k in ("stream", "hop", "n", "regenerated"))
        return cls(stream, hop, dict(state["tensors"]), n, regen)


@dataclass
class InFlight:
    token: Token  # carries the hop it was sent with
    to: str
    last_sent: float | None = None  # None: not sent yet
    sends: int = 0
    forgotten: bool = False  # `forget(to)` was called since it was sent
    orphaned_at: float | None = None  # when the regeneration rule first held


def stream_origins(streams: int, members: Sequence[str], origins: Sequence[str]) -> list[str]:
    """The node each stream s ∈ [0, streams) starts at ([] when no list to agree on is known)."""
    order = list(origins) if origins else sorted(members)
    return [order[s % len(order)] for s in range(streams)] if order else []


@dataclass
class TokenWalk:
    """One node's side of the P4 protocol (see the module docstring)."""

    node_id: str
    walk: Walk = "uniform"
    retransmit_s: float = 0.5
    regen_s: float = 2.0
    seed: int = 0
    held: dict[int, Token] = field(default_factory=dict)
    inflight: dict[int, InFlight] = field(default_factory=dict)
    seen: dict[int, int] = field(default_factory=dict)  # stream -> highest hop accepted or sent here
    accepted: int = 0
    duplicates: int = 0
    retransmissions: int = 0
    implicit_acks: int = 0
    stays: int = 0
    regenerations: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed * 1_000_003 + zlib.crc32(self.node_id.encode()))
        # Adapted to the measured round trip, at most retransmit_s: a lost token on a LAN costs milliseconds.
        self.timer = RetransmitTimer(max_s=self.retransmit_s)

    # ------------------------------------------------------------------------------------------ streams
    def create(self, stream: int, tensors: dict[str, torch.Tensor], n: int) -> Token:
        """Start `stream` here (the caller checked this node is its origin). Hop 0, held."""
        token = Token(stream, 0, {k: v.clone() for k, v in tensors.items()}, max(n, 1))
        self.held[stream] = token
        self.seen[stream] = max(self.seen.get(stream, -1), 0)
        return token

    def receive(self, payload: Payload) -> Token | None:
        """Accept a token (now held here) or return None for a duplicate, a stale copy or a malformed payload."""
        token = Token.from_payload(payload)
        if token is None:
            return None
        if token.hop <= self.seen.get(token.stream, -1):
            self.duplicates += 1
            return None
        self.seen[token.stream] = token.hop
        # A held copy of the same stream (only after a regeneration race) is superseded: the streams re-converge.
        if token.stream in self.inflight:
            del self.inflight[token.stream]  # the stream came back past our copy: it was delivered
            self.implicit_acks += 1
        self.held[token.stream] = token
        self.accepted += 1
        return token

    # ----------------------------------------------------------------------------------------- next hop
    def next_hop(self, view: NeighbourView) -> str | None:
        """Where the walk goes from here; None means stay (lazy walk rejected the proposal, or no neighbour)."""
        nbrs = sorted(view.degrees)
        if not nbrs:
            return None
        if self.walk == "uniform":
            return self.rng.choice(nbrs)
        if self.walk == "lazy_mh":
            j = self.rng.choice(nbrs)
            d_i, d_j = len(nbrs), max(view.degrees[j], 1)
            if d_i >= d_j or self.rng.random() < d_i / d_j:
                return j
            self.stays += 1
            return None
        order = sorted(set(view.members) | {self.node_id}) if view.members else sorted({*nbrs, self.node_id})
        k = order.index(self.node_id)
        for j in order[k + 1 :] + order[:k]:
            if j in view.degrees:
                return j
        return None

    def forward(self, stream: int, view: NeighbourView) -> str | None:
        """Send the held token of `stream` one hop on (hop + 1). Returns the destination, or None if it stays."""
        to = self.next_hop(view)
        if to is None:
            return None
        token = self.held.pop(stream)
        sent = Token(token.stream, token.hop + 1, token.tensors, token.n, token.regenerated)
        self.seen[stream] = max(self.seen.get(stream, -1), sent.hop)
        self.inflight[stream] = InFlight(sent, to)
        return to

    # ------------------------------------------------------------------------------------------ sending
    def due(self, now: float) -> list[Send]:
        """In-flight copies never sent or unacknowledged for the retransmission timeout; marks them sent at `now`."""
        out: list[Send] = []
        timeout = self.timer.timeout_s
        for s in sorted(self.inflight):
            f = self.inflight[s]
            if f.last_sent is None or now - f.last_sent >= timeout:
                if f.last_sent is not None:
                    self.retransmissions += 1
                f.last_sent = now
                f.sends += 1
                out.append(Send(f.to, f.token.payload(), (s, f.token.hop)))
        return out

    def ack(self, to: str, key: tuple[int, ...], now: float | None = None) -> None:
        if len(key) != 2:
            return
        f = self.inflight.get(key[0])
        if f is not None and f.to == to and f.token.hop == key[1]:
            del self.inflight[key[0]]
            self.timer.acknowledged(f.last_sent, f.sends, now)

    # -------------------------------------------------------------------------------------------- churn
    def forget(self, node_id: str) -> None:
        """`node_id` left the view. Copies in flight to it become candidates for regeneration."""
        for f in self.inflight.values():
            if f.to == node_id:
                f.forgotten = True

    def regenerate(self, view: NeighbourView, now: float) -> list[int]:
        """Apply the regeneration rule (module docstring); returns the streams taken back as held."""
        back: list[int] = []
        for s in sorted(self.inflight):
            f = self.inflight[s]
            if not f.forgotten or (view.members and f.to in view.members):
                f.orphaned_at = None
                continue
            if f.orphaned_at is None:
                f.orphaned_at = now
            if now - f.orphaned_at >= self.regen_s:
                del self.inflight[s]
                t = f.token
                self.held[s] = Token(t.stream, t.hop, t.tensors, t.n, t.regenerated + 1)
                self.regenerations += 1
                back.append(s)
        return back

    # ------------------------------------------------------------------------------------------ queries
    def holds(self, stream: int) -> bool:
        """Is this node the stream's last holder (held, or an unacknowledged copy in flight)?"""
        return stream in self.held or stream in self.inflight

    def state_dict(self) -> dict[str, Any]:
        return {
            "seen": [[s, h] for s, h in sorted(self.seen.items())],
            "held": [t.to_state() for _, t in sorted(self.held.items())],
            "inflight": [{"to": f.to, "token": f.token.to_state()} for _, f in sorted(self.inflight.items())],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = {int(s): int(h) for s, h in state.get("seen", [])}
        self.held = {t.stream: t for t in (Token.from_state(d) for d in state.get("held", []))}
        self.inflight = {}
        for d in state.get("inflight", []):
            t = Token.from_state(d["token"])
            self.inflight[t.stream] = InFlight(t, str(d["to"]))  # re-sent at once; a stale copy is rejected
