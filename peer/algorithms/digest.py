"""DIGEST (Gholami & Seferoglu, arXiv 2307.07652; spec §4): local SGD that never waits, plus S token streams.

Every node runs local SGD continuously, x_i ← x_i − η g_i (optional local heavy-ball momentum). Each stream s is a
token carrying a global model x̄^(s) on a random walk, moved by the P4 token protocol of `peer.algorithms.tokens`
(ACK, retransmission, de-duplication by (stream, hop), one regeneration authority). Node i keeps one reference
x_i^{ref,(s)} per stream: the value x_i had right after it last synchronized with s (initially x^0).

The whole update rule is reconstructed (spec v1, §4(a)); runs are labelled so. A node merges the tokens it holds
once it has done at least `hold_steps` (H) local steps since its previous merge, then forwards them:

1. for each held stream s in increasing order (the delta merge): Δ = x_i − x_i^{ref,(s)}; x̄^(s) += Δ / N with
   N = the token's N_current, refreshed from the membership size when the view lists members; then x_i adopts
   x̄^(s), x_i^{ref,(s)} ← x̄^(s), and every other reference moves by the adoption jump,
   x_i^{ref,(s')} += x̄^(s) − x_i^{before} (option (a)): each stream receives each node's own SGD progress once,
   and a jump to another stream's model never counts as progress;
2. when two or more tokens meet (are merged in the same step), their models are replaced by their average, which
   the node adopts (references of those streams set to it, the others shifted by the jump, as in 1).

Invariant. With one stream, x̄ = x^0 + Σ_merges Δ/N exactly: no progress is merged twice (hop de-duplication) or
lost (retransmission). With S streams, 1 holds per stream, and the averaging of 2 preserves the sum over the
streams that meet, so the mean over streams keeps (1/S) Σ_s x̄^(s) = x^0 + (1/S) Σ_merges Δ/N, while the
per-stream identity no longer holds once streams have met (mass moves between them). `merged_progress[s]` counts
Σ Δ/N merged into s at this node, for tests.

Wire: one model (P floats) per token hop, sent by the holder only. Local SGD never waits (`ready` is always true).
A node with no neighbour keeps its tokens and does not merge (merging a token it cannot pass on would only scale
its own progress by 1/N); lazy-MH "stay" keeps the token too, and it is merged again after H more steps.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from peer.algorithms.base import AlgoParams, Algorithm, InMessage, Manifest, NeighbourView, Oracle, Send
from peer.algorithms.tokens import TOKEN_KIND, Token, TokenParams, TokenWalk, stream_origins


class DigestParams(TokenParams):
    name: Literal["digest"] = "digest"
    streams: int = Field(1, ge=1, description="number of token streams S (multi-stream reading (i) of spec §4(a))")
    hold_steps: int = Field(1, ge=1, description="local steps H a node takes between two merges (holds tokens)")
    momentum: float = Field(
        0.9,
        ge=0.0,
        lt=1.0,
        description="local heavy-ball momentum on the SGD step, as the other SGD-family defaults and the centralized "
        "reference (0: plain SGD, 88.9 to 91.4% on the demo where 0.9 gives 95.8%)",
    )


class Digest(Algorithm):
    name: ClassVar[str] = "digest"
    params_type: ClassVar[type[AlgoParams]] = DigestParams
    provenance: ClassVar[str] = "reconstructed (spec v1)"
    default_max_steps_without_merge: ClassVar[int] = 16
    owns_local_update: ClassVar[bool] = True
    messages_carry_step: ClassVar[bool] = False  # tokens carry hop counts, not the sender's step
    paced_by_any_neighbour: ClassVar[bool] = True  # a token comes from one neighbour, whichever the walk took

    def __init__(self, params: AlgoParams, node_id: str) -> None:
        super().__init__(params, node_id)
        assert isinstance(params, DigestParams)
        self.p: DigestParams = params
        self.walk = TokenWalk(node_id, params.walk, params.retransmit_s, params.regen_s, params.seed)
        self.ref: list[torch.Tensor] = []
        self.buf: torch.Tensor | None = None
        self.steps_since_merge = 0
        self.originated = False  # streams are created once, at the first view that lists members
        self.merged_progress: list[torch.Tensor] = []
        self.merges = 0
        self.meetings = 0
        # Tests set a list here to record (stream, hop, local steps since the previous merge, x̄ after the merge).
        self.merge_log: list[tuple[int, int, int, torch.Tensor]] | None = None

    # ------------------------------------------------------------------------------------------ streams
    def _originate(self, view: NeighbourView) -> None:
        if self.originated:
            return
        origins = stream_origins(self.p.streams, sorted(view.members), self.p.origins)
        if not origins:
            return
        self.originated = True
        for s, origin in enumerate(origins):
            if origin == self.node_id and not self.walk.holds(s):
                # The token starts from the reference (x^0 at start), so the origin's own progress is merged once.
                self.walk.create(s, {"params": self.ref[s]}, len(view.members))

    def start(self, x: torch.Tensor, now: float, view: NeighbourView) -> None:
        if len(self.ref) != self.p.streams:  # not restored from a checkpoint
            self.ref = [x.clone() for _ in range(self.p.streams)]
        self.merged_progress = [torch.zeros_like(x) for _ in range(self.p.streams)]
        self._originate(view)

    # --------------------------------------------------------------------------------------- iteration
    def _adopt(self, x: torch.Tensor, new: torch.Tensor, streams: set[int]) -> torch.Tensor:
        """x ← new; the references of `streams` become `new`, every other one moves by the jump (option (a))."""
        jump = new - x
        for s in range(self.p.streams):
            self.ref[s] = new if s in streams else self.ref[s] + jump
        return new.clone()

    def _merge(self, x: torch.Tensor, view: NeighbourView) -> torch.Tensor:
        streams = sorted(self.walk.held)
        for s in streams:
            token = self.walk.held[s]
            if view.members:
                token.n = len(view.members)
            step = (x - self.ref[s]) / token.n
            new = token.tensors["params"] + step
            self.merged_progress[s] += step
            token.tensors = {"params": new}
            x = self._adopt(x, new, {s})
            self.merges += 1
            if self.merge_log is not None:
                self.merge_log.append((s, token.hop, self.steps_since_merge, new.clone()))
        if len(streams) > 1:
            tokens = [self.walk.held[s] for s in streams]
            mean = torch.stack([t.tensors["params"] for t in tokens]).mean(0)
            for t in tokens:
                t.tensors = {"params": mean}
            x = self._adopt(x, mean, set(streams))
            self.meetings += 1
        return x

    def advance(self, x: torch.Tensor, oracle: Oracle, now: float, view: NeighbourView) -> torch.Tensor:
        if not self.ref or not self.merged_progress:
            self.start(x, now, view)
        _, g = oracle.gradient(x)
        lr = oracle.lr()
        if self.p.momentum > 0:
            self.buf = g.clone() if self.buf is None else self.buf.mul_(self.p.momentum).add_(g)
            g = self.buf
        x = x - lr * g
        self.iteration += 1
        self.steps_since_merge += 1
        self._originate(view)
        self.walk.regenerate(view, now)
        if self.walk.held and view.degrees and self.steps_since_merge >= self.p.hold_steps:
            x = self._merge(x, view)
            self.steps_since_merge = 0
            for s in sorted(self.walk.held):
                self.walk.forward(s, view)
        return x

    def holds_fresh_state(self) -> bool:
        return bool(self.walk.held)

    # ---------------------------------------------------------------------------------------- messages
    def sends(self, now: float) -> list[Send]:
        return self.walk.due(now)

    def on_ack(self, to: str, key: tuple[int, ...], now: float) -> None:
        self.walk.ack(to, key, now)

    def on_message(self, msg: InMessage, now: float) -> bool:
        payload = msg.payload
        if payload.kind != TOKEN_KIND or "params" not in payload.tensors:
            return False
        if not 0 <= int(payload.scalars.get("stream", -1)) < self.p.streams:
            return False  # a peer configured with more streams than this one
        return self.walk.receive(payload) is not None

    def forget(self, node_id: str) -> None:
        self.walk.forget(node_id)

    def expected_by_kind(self, num_params: int) -> dict[str, Manifest]:
        return {TOKEN_KIND: {"params": ((num_params,), "float32")}}

    # ------------------------------------------------------------------------------------------ queries
    def tokens(self) -> list[Token]:
        """Copies of streams at this node: held ones, then those in flight (unacknowledged)."""
        return [*self.walk.held.values(), *(f.token for f in self.walk.inflight.values())]

    def state_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "steps_since_merge": self.steps_since_merge,
            "originated": self.originated,
            "ref": list(self.ref),
            "buf": self.buf if self.buf is not None else torch.zeros(0),
            "walk": self.walk.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state.get("iteration", 0))
        self.steps_since_merge = int(state.get("steps_since_merge", 0))
        self.originated = bool(state.get("originated", False))
        ref = state.get("ref", [])
        self.ref = list(ref) if len(ref) == self.p.streams else []
        buf = state.get("buf")
        self.buf = buf if isinstance(buf, torch.Tensor) and buf.numel() else None
        self.walk.load_state_dict(state.get("walk", {}))
