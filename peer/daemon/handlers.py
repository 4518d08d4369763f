"""The daemon's answers to the gRPC server: Hello, accepted and rejected pushes, status and state fetches.

Each handler turns a request into a core input, lets the core decide, and carries out what concerns the request
(the Hello reply, handing a payload to the training thread). Quick, and never blocking the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from peer import PROTOCOL_VERSION
from peer.algorithms import Algorithm, InMessage, Payload
from peer.algorithms.delta import DeltaReceiver, expected_with_compression, parse_compression
from peer.core.admission import clip, source_of, valid_node_id
from peer.core.events import Deliver, Effect, HelloReceived, Input, PeerInfo, Reply, StateReceived
from peer.core.gossip import GossipCore
from peer.daemon.membership import hello_response, info_of
from peer.daemon.metrics import Counters
from peer.daemon.refusals import Refusals
from peer.daemon.worker import TrainingWorker
from peer.errors import (
    CorruptPayloadError,
    IdentityError,
    IncompleteStreamError,
    PayloadError,
    RateLimitedError,
    SchemaMismatchError,
)
from peer.logs import OnceLogger
from peer.net.assembler import Received, ReceiveLimits
from peer.net.encoder import encode
from peer.net.wire import Envelope
from peer.v1 import gossip_pb2


@dataclass
class DaemonFacts:
    """What the handlers need to know about the daemon besides the core."""

    node_id: str
    fingerprint: str
    num_params: int
    incarnation: int
    chunk_bytes: int
    max_message_bytes: int
    started: float  # monotonic


class RpcHandlers:
    """Implements `peer.net.server.Handlers` for one daemon."""

    def __init__(
        self,
        facts: DaemonFacts,
        core: GossipCore,
        dispatch: Callable[[Input], list[Effect]],
        algorithm: Algorithm,
        worker: TrainingWorker,
        counters: Counters,
        me: Callable[[], PeerInfo],
        envelope: Callable[[], Envelope],
        once: OnceLogger,
        refusals: Refusals,
    ) -> None:
        self.facts = facts
        self.core = core
        self.dispatch = dispatch
        self.algorithm = algorithm
        self.worker = worker
        self.counters = counters
        self.me = me
        self.envelope = envelope
        self.once = once
        self.refusals = refusals
        compressor = parse_compression(core.me.compression)
        self.codec = DeltaReceiver(compressor) if compressor is not None else None
        self._decode_lock = threading.Lock()

    def hello(
        self, request: gossip_pb2.HelloRequest, peer: str, identity: str | None = None
    ) -> gossip_pb2.HelloResponse:
        if not valid_node_id(request.node_id):
            self.refused("bad_node_id", peer, f"hello with node_id {clip(repr(request.node_id), 80)}")
            raise CorruptPayloadError(f"node_id {clip(repr(request.node_id), 80)} is not a valid node id")
        effects = self.dispatch(HelloReceived(info_of(request), peer, time.monotonic(), identity))
        reply = next((e for e in effects if isinstance(e, Reply)), Reply(False, "no answer"))
        if reply.status == "RESOURCE_EXHAUSTED":
            raise RateLimitedError(reply.reason)
        if reply.status == "PERMISSION_DENIED":
            raise self._impostor(request.node_id, peer, reply.reason)
        return hello_response(self.me(), reply.accepted, reply.reason)

    def _impostor(self, claimed: str, peer: str, reason: str) -> IdentityError:
        """A claim that contradicts the caller's certificate: counted, logged quietly, refused."""
        self.counters.add(rejected_messages=1)
        self.refused("impostor", peer, f"{clip(claimed, 80)}: {clip(reason)} [PERMISSION_DENIED]")
        return IdentityError(clip(reason))

    def receive_limits(self) -> ReceiveLimits:
        f = self.facts
        expected = self.algorithm.expected_tensors(f.num_params)
        by_kind = self.algorithm.expected_by_kind(f.num_params)
        if self.codec is not None:  # a compressible kind arrives as a key frame or as a delta
            by_kind = expected_with_compression(expected, by_kind, self.codec.compressor)
        return ReceiveLimits(
            max_payload_bytes=f.max_message_bytes,
            max_chunk_bytes=f.chunk_bytes,
            expected_fingerprint=f.fingerprint,
            expected_algorithm=self.algorithm.name,
            expected_tensors=expected,
            expected_by_kind=by_kind,
        )

    async def deliver(self, received: Received, peer: str = "", identity: str | None = None) -> None:
        env = received.envelope
        now = time.monotonic()
        event = StateReceived(
            env.sender_id, env.incarnation, env.sender_degree, env.sender_address, peer, now, identity
        )
        effects = self.dispatch(event)
        if any(isinstance(e, Reply) and e.status == "PERMISSION_DENIED" for e in effects):
            # The servicer's `rejected` counts and logs it (once per sender).
            raise IdentityError(next(e.reason for e in effects if isinstance(e, Reply)))
        payload: Payload | None = received.payload
        if self.codec is not None:
            # After the identity check, so an impostor cannot touch another sender's reference.
            big = received.nbytes > (1 << 20)
            args = (env.sender_id, env.incarnation, received.payload)
            payload = await asyncio.to_thread(self._decode, *args) if big else self._decode(*args)
        self.counters.add(bytes_received=received.nbytes, messages_received=1)
        for e in effects:
            if isinstance(e, Deliver) and payload is not None:
                msg = InMessage(env.sender_id, env.incarnation, env.sender_degree, payload, now)
                self.worker.inbox.append(msg)
                self.worker.wake.set()

    def _decode(self, sender: str, incarnation: int, payload: Payload) -> Payload | None:
        assert self.codec is not None
        with self._decode_lock:  # decodes may run in worker threads; the receiver's references are not shared
            return self.codec.decode(sender, incarnation, payload)

    def rejected(self, sender: str, error: PayloadError, peer: str) -> None:
        self.counters.add(rejected_messages=1)
        who = clip(sender, 80)
        if isinstance(error, IncompleteStreamError):
            # Also what a sender's cancelled call looks like (it stopped, or closed that channel): nothing of it
            # is used, and it is no sign of hostile input. Counted apart, logged at info level.
            message = f"incomplete push from {who} ({clip(peer, 80)}), the sender may have cancelled it: {clip(error)}"
            self.refusals.refuse("push_incomplete", f"{who}/incomplete", message, level=logging.INFO)
            return
        message = f"rejected a push from {who} ({clip(peer, 80)}): {clip(error)} [{error.status}]"
        self.refusals.refuse(f"push_{error.status.lower()}", f"{who}/{type(error).__name__}", message)

    def refused(self, reason: str, peer: str, message: str) -> None:
        self.refusals.refuse(reason, source_of(peer), f"refused a request from {clip(peer, 80)}: {message}")

    def held(self, peer: str) -> None:
        self.counters.add(tarpit_held=1)

    def status(self) -> gossip_pb2.GetStatusResponse:
        c = self.counters.snapshot()
        now = time.monotonic()
        wall = time.time()
        me = self.me()
        resp = gossip_pb2.GetStatusResponse(
            node_id=me.node_id,
            address=me.address,
            algorithm=self.algorithm.name,
            protocol_version=PROTOCOL_VERSION,
            schema_fingerprint=self.facts.fingerprint,
            incarnation=self.facts.incarnation,
            step=c["step"],
            epoch=c["epoch"],
            seq=c["seq"],
            loss=c["loss"],
            training_done=c["training_done"],
            uptime_s=now - self.facts.started,
            bytes_sent=c["bytes_sent"],
            bytes_received=c["bytes_received"],
            send_failures=c["send_failures"],
            rejected_messages=c["rejected_messages"],
            degree=self.core.degree(),
        )
        for row in self.core.table.rows(now):
            resp.neighbours.add(
                node_id=row.node_id,
                address=row.address,
                state=row.state,
                last_seen_unix_ms=int((wall - (now - row.last_seen)) * 1000),
                failures=row.failures,
                backoff_s=row.backoff_s,
                degree=row.degree,
                last_seq=row.last_seq,
            )
            resp.info[f"neighbour.{row.node_id}"] = "yes" if row.neighbour else "no"
        resp.info["provenance"] = self.algorithm.provenance
        resp.info["waiting_for"] = self.worker.waiting_for
        if c["eval_step"] >= 0:  # the live evaluation (peer.daemon.evaluator) has scored the model at least once
            for key in ("eval_step", "eval_accuracy", "eval_loss", "eval_samples"):
                resp.info[key.replace("_", ".", 1)] = repr(c[key])
        resp.info["peer_exchange.learned"] = str(self.core.exchange.learned)  # named peers we dialled
        for reason, n in sorted(c["rejected"].items()):
            resp.info[f"rejected.{reason}"] = str(n)
        return resp

    async def fetch_state(
        self, request: gossip_pb2.FetchStateRequest, identity: str | None = None
    ) -> tuple[gossip_pb2.PushHeader, list[bytes]]:
        if request.node_id and not valid_node_id(request.node_id):
            raise CorruptPayloadError(f"fetch with node_id {clip(repr(request.node_id), 80)}: not a valid node id")
        if identity is not None and identity != request.node_id:
            raise self._impostor(
                clip(request.node_id, 80),
                f"fetch by {identity}",
                f"fetch claims node id {clip(repr(request.node_id), 80)} but the certificate says {identity!r}",
            )
        if request.schema_fingerprint != self.facts.fingerprint:
            raise SchemaMismatchError(
                f"fetch from {clip(repr(request.node_id), 80)} refused: schema fingerprint "
                f"{clip(request.schema_fingerprint, 80)} != ours {self.facts.fingerprint}"
            )
        params = self.worker.latest_params
        payload = Payload("state", {"params": params}, seq=self.counters.seq, step=self.worker.trainer.step_count)
        env = self.envelope()
        # Encoding hashes and copies every byte: off the loop for big models.
        return await asyncio.to_thread(encode, env, payload, chunk_bytes=self.facts.chunk_bytes)
