"""A group of simulated peers for `peer simulate`: the real algorithm, oracle, encoder and assembler, no sockets.

One `PeerGroup` holds several peers and is what a backend runs: in this process (`--backend local`) or as one
Ray actor (`--backend ray`). The driver calls `step(tick, *inboxes)` once per tick of virtual time with the
messages addressed to this group's peers; each peer then does what the daemon's training thread and pusher do:

1. every arriving message is decoded and validated by the daemon's `Assembler` (fingerprint, algorithm,
   manifest, checksum, finiteness) and handed to `Algorithm.on_message`; the receiver acknowledges it (the
   RPC's success) so that reliable sends are not retransmitted;
2. if `ready`, one `advance` through the daemon's `TrainerOracle` (minibatch gradients of the peer's own data
   partition on a model shared by the group, so a peer costs its parameters and data, not a module);
3. every `Send` due now is encoded once by the daemon's `encode` into header and chunk bytes, passed through the
   peer's `FaultInjector` (drop, delay, link outages) and addressed to the receiver's group.

A message sent at tick t arrives at tick t + 1 (plus its injected delay). A straggler's `advance` occupies it for
`slowdown` ticks; a churned peer is away for a window of ticks (it neither runs nor receives) and then comes back
with the state it had. Each peer's iterate is summed per round (in float64) so the driver can follow the
disagreement round by round without collecting every model.
"""

from __future__ import annotations

import gc
import math
import os
import resource
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from peer import algorithms
from peer.algorithms.base import Algorithm, InMessage, NeighbourView, Payload, Send
from peer.config import PeerConfig
from peer.core.faults import FaultInjector, FaultsConfig
from peer.errors import ConfigError, PayloadError
from peer.learn.data import load_dataset, partition_indices
from peer.learn.models import flatten_params, load_flat_params, model_from_config, schema_fingerprint
from peer.learn.oracle import TrainerOracle
from peer.learn.training import LocalTrainer, evaluate
from peer.net.assembler import Assembler, ReceiveLimits
from peer.net.encoder import encode
from peer.net.wire import Envelope
from peer.v1 import gossip_pb2


@dataclass(frozen=True)
class Wire:
    """One encoded message between simulated peers: the bytes a Push stream carries, plus the transport's
    knowledge of which `Send.key` it delivers (the daemon's pusher keeps that beside the RPC)."""

    sender: str
    to: str
    key: tuple[int, ...]
    header: bytes
    chunks: tuple[bytes, ...]


@dataclass(frozen=True)
class Ack:
    """The receiver `by` took in `sender`'s reliable message `key` (the Push RPC returned OK)."""

    sender: str
    by: str
    key: tuple[int, ...]


@dataclass(frozen=True)
class PeerPlan:
    """Everything a group needs to know about one of its peers, decided by the driver."""

    node_id: str
    index: int  # data partition
    degrees: dict[str, int]  # neighbour -> its degree (Metropolis–Hastings weights)
    faults: dict[str, Any]  # the `faults:` section (peer.core.faults.FaultsConfig fields)
    away: tuple[int, int] | None = None  # churn: absent for ticks [first, last)


@dataclass(frozen=True)
class GroupSetup:
    cfg: PeerConfig
    plans: tuple[PeerPlan, ...]
    group_of: dict[str, int]  # every peer of the simulation -> its group
    num_groups: int
    tick_s: float


@dataclass
class _Peer:
    plan: PeerPlan
    algo: Algorithm
    oracle: TrainerOracle
    x: torch.Tensor
    view: NeighbourView
    faults: FaultInjector
    busy_until: int = 0
    recorded: int = -1


@dataclass
class GroupReport:
    """What one `step` tells the driver (small: no models)."""

    rounds: dict[int, tuple[torch.Tensor, float, int, int]]  # round -> (Σx, Σ‖x‖², peers, peers done training)
    min_iteration: int
    counters: dict[str, int]


@dataclass
class GroupFinal:
    accuracies: list[float]
    counters: dict[str, int]
    algo_metrics: dict[str, float]
    pid: int  # several groups may share a process (the local backend)
    rss_before_bytes: int  # the process just before this group built its peers
    rss_bytes: int  # the process at the end
    peers: int


def rss_bytes() -> int:
    """This process's resident set size (current, from /proc on Linux; else the peak)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeerGroup:
    """Several simulated peers, stepped together (see the module docstring)."""

    def __init__(self, setup: GroupSetup) -> None:
        torch.set_num_threads(1)  # many tiny models: threads only add contention on a shared machine
        self.setup = setup
        cfg = setup.cfg
        ds = load_dataset(cfg.data.dataset, cfg.data.path, seed=cfg.data.seed, test_fraction=cfg.data.test_fraction)
        self.test = (ds.x_test, ds.y_test)
        parts = partition_indices(ds.y_train, cfg.data.partition, len(setup.group_of), cfg.data.seed)
        self.model = model_from_config(cfg.model, ds.input_shape, ds.num_classes)
        self.peers: dict[str, _Peer] = {}
        members = frozenset(setup.group_of)
        self._warm_up(ds.x_test[: cfg.train.batch_size], ds.y_test[: cfg.train.batch_size])
        self.rss_before = rss_bytes()  # the peers' own memory is what the group holds beyond this
        for plan in setup.plans:
            algo = algorithms.create(cfg.algorithm, plan.node_id)
            if not algo.owns_local_update or algo.trains_own_model:
                raise ConfigError(
                    f"{algo.name} cannot be simulated: peer simulate runs step-mode algorithms that train the "
                    "model's parameters (dpsgd, dmsgd, dmsgd_async, local_sgd, next, next_pushsum, sgp, choco, digest)",
                    field="algorithm.name",
                )
            idx = parts[plan.index]
            trainer = self._trainer(ds.x_train[idx], ds.y_train[idx], plan.index, algo.mixes_buffers)
            total = max(1, math.ceil(cfg.train.epochs * trainer.steps_per_epoch))
            algo.bind_data(int(torch.tensor(ds.input_shape).prod()), ds.num_classes)
            view = NeighbourView(plan.node_id, dict(plan.degrees), members)
            faults = FaultInjector(FaultsConfig(**plan.faults), node_id=plan.node_id, start_s=0.0)
            x = flatten_params(self.model, buffers=algo.mixes_buffers)
            peer = _Peer(plan, algo, TrainerOracle(trainer, cfg.train, total), x, view, faults)
            algo.start(x, 0.0, view)
            self.peers[plan.node_id] = peer
        first = next(iter(self.peers.values())).algo
        self.buffers = first.mixes_buffers
        self.fingerprint = schema_fingerprint(self.model, buffers=self.buffers)
        num = flatten_params(self.model, buffers=self.buffers).numel()
        self.limits = ReceiveLimits(
            max_payload_bytes=cfg.gossip.max_message_bytes,
            max_chunk_bytes=cfg.gossip.chunk_bytes,
            expected_fingerprint=self.fingerprint,
            expected_algorithm=first.name,
            expected_tensors=first.expected_tensors(num),
            expected_by_kind=first.expected_by_kind(num),
        )
        self.counters = dict.fromkeys(
            ("messages", "bytes", "acks", "dropped", "outage_dropped", "delayed", "rejected", "lost_away"), 0
        )
        self._delayed: list[tuple[int, Wire]] = []
        self._rounds: dict[int, tuple[torch.Tensor, float, int, int]] = {}
        for peer in self.peers.values():
            self._record(peer)

    def _warm_up(self, x: Any, y: Any) -> None:
        """A throwaway trainer's gradient and one evaluation, so that what torch allocates once per process (the
        optimizer machinery, autograd, allocator pools) is not counted as the peers' memory."""
        self._trainer(x, y, 0, buffers=False).gradient()
        self.model.zero_grad(set_to_none=True)
        evaluate(self.model, x, y)
        gc.collect()

    def _trainer(self, x: Any, y: Any, index: int, buffers: bool) -> LocalTrainer:
        t = self.setup.cfg.train
        return LocalTrainer(
            self.model,  # shared: the oracle loads each peer's parameters into it before every gradient
            x,
            y,
            batch_size=t.batch_size,
            lr=t.lr,
            momentum=t.momentum,
            weight_decay=t.weight_decay,
            optimizer=t.optimizer,
            device=torch.device("cpu"),
            seed=t.seed + 1000 * index,  # as the daemon seeds partition `index`
            exchange_buffers=buffers,
        )

    # -------------------------------------------------------------------------------------------- stepping
    def away(self, peer: _Peer, tick: int) -> bool:
        w = peer.plan.away
        return w is not None and w[0] <= tick < w[1]

    def step(self, tick: int, *inboxes: Sequence[Wire | Ack]) -> tuple[Any, ...]:
        """One tick: take in `inboxes` (one list per sending group), run every peer, and return one outbox per
        group followed by this group's `GroupReport`."""
        now = tick * self.setup.tick_s
        self._out: list[list[Wire | Ack]] = [[] for _ in range(self.setup.num_groups)]
        for inbox in inboxes:
            for item in inbox:
                if isinstance(item, Ack):
                    sender = self.peers[item.sender]
                    if not self.away(sender, tick):
                        sender.algo.on_ack(item.by, item.key, now)
                else:
                    self._receive(item, tick, now)
        for peer in self.peers.values():
            if self.away(peer, tick):
                continue
            algo = peer.algo
            if tick >= peer.busy_until and algo.ready(now, peer.view):
                peer.x = algo.advance(peer.x, peer.oracle, now, peer.view)
                peer.busy_until = tick + max(1, round(peer.faults.cfg.slowdown))
                self._record(peer)
            self._send_all(peer, algo.sends(now), tick, now)
        due = [w for t, w in self._delayed if t <= tick + 1]
        self._delayed = [(t, w) for t, w in self._delayed if t > tick + 1]
        for wire in due:
            self._out[self.setup.group_of[wire.to]].append(wire)
        report = GroupReport(self._rounds, min(p.algo.iteration for p in self.peers.values()), dict(self.counters))
        self._rounds = {}
        return (*self._out, report)

    def _record(self, peer: _Peer) -> None:
        k = peer.algo.iteration
        if k == peer.recorded:
            return
        peer.recorded = k
        x = peer.x.detach().to(torch.float64)
        done = int(peer.oracle.done)
        prev = self._rounds.get(k)
        if prev is None:
            self._rounds[k] = (x.clone(), float(x @ x), 1, done)
        else:
            prev[0].add_(x)
            self._rounds[k] = (prev[0], prev[1] + float(x @ x), prev[2] + 1, prev[3] + done)

    def _send_all(self, peer: _Peer, sends: list[Send], tick: int, now: float) -> None:
        encoded: dict[int, tuple[bytes, tuple[bytes, ...], int]] = {}  # encode once per payload, as the pusher
        for send in sends:
            if send.to not in self.setup.group_of:
                continue
            decision = peer.faults.decide(send.to, now)
            if decision.drop:
                self.counters["outage_dropped" if decision.reason == "outage" else "dropped"] += 1
                continue
            got = encoded.get(id(send.payload))
            if got is None:
                got = encoded[id(send.payload)] = self._encode(peer, send.payload, now)
            header, chunks, nbytes = got
            self.counters["messages"] += 1
            self.counters["bytes"] += nbytes
            wire = Wire(peer.plan.node_id, send.to, send.key, header, chunks)
            lag = math.ceil(decision.delay_s / self.setup.tick_s - 1e-9) if decision.delay_s > 0 else 0
            if lag:
                self.counters["delayed"] += 1
                self._delayed.append((tick + 1 + lag, wire))
            else:
                self._out[self.setup.group_of[send.to]].append(wire)

    def _encode(self, peer: _Peer, payload: Payload, now: float) -> tuple[bytes, tuple[bytes, ...], int]:
        env = Envelope(
            sender_id=peer.plan.node_id,
            schema_fingerprint=self.fingerprint,
            algorithm=peer.algo.name,
            incarnation=1,
            sender_degree=len(peer.plan.degrees),
            sender_address=f"sim:{peer.plan.node_id}",
            sent_unix_ms=int(now * 1000),
        )
        header, chunks = encode(env, payload, chunk_bytes=self.setup.cfg.gossip.chunk_bytes)
        data = header.SerializeToString()
        return data, tuple(chunks), len(data) + sum(len(c) for c in chunks)

    def _receive(self, wire: Wire, tick: int, now: float) -> None:
        peer = self.peers[wire.to]
        if self.away(peer, tick):
            self.counters["lost_away"] += 1
            return
        asm = Assembler(self.limits, peer=f"sim:{wire.sender}")
        try:
            asm.on_header(gossip_pb2.PushHeader.FromString(wire.header))
            for index, data in enumerate(wire.chunks):
                asm.on_chunk(gossip_pb2.Chunk(index=index, data=data))
            received = asm.finish()
        except PayloadError:
            self.counters["rejected"] += 1
            return
        env = received.envelope
        if env.sender_id != wire.sender:  # the daemon checks the claim against the caller's certificate
            self.counters["rejected"] += 1
            return
        msg = InMessage(env.sender_id, env.incarnation, env.sender_degree, received.payload, now)
        peer.algo.on_message(msg, now)
        if wire.key:  # back at the next tick; never dropped (it is the Push RPC's own response)
            self.counters["acks"] += 1
            self._out[self.setup.group_of[wire.sender]].append(Ack(wire.sender, wire.to, wire.key))

    # ----------------------------------------------------------------------------------------------- results
    def evaluate(self, x: torch.Tensor) -> float:
        """Test accuracy of the parameters `x` (e.g. the network average)."""
        load_flat_params(self.model, x.to(torch.float32), buffers=self.buffers)
        return evaluate(self.model, *self.test)[0]

    def finish(self) -> GroupFinal:
        accuracies = [self.evaluate(p.x) for p in self.peers.values()]
        metrics: dict[str, float] = {}
        for p in self.peers.values():
            for k, v in p.algo.metrics().items():
                if k in ("retransmissions", "gave_up", "jumps", "duplicates", "stale"):
                    metrics[k] = metrics.get(k, 0.0) + float(v)
        return GroupFinal(
            accuracies, dict(self.counters), metrics, os.getpid(), self.rss_before, rss_bytes(), len(self.peers)
        )
