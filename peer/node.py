"""The daemon shell: wires config, data, trainer, algorithm, gRPC, discovery and checkpoints together.

It makes no decisions of its own: the gossip core (`peer.gossip`) decides whom to push to, when to back off
and what the neighbour set is; the algorithm decides how to merge. The shell moves inputs in and effects out,
and owns every task in one TaskGroup.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from peer import PROTOCOL_VERSION, checkpoint
from peer import config as config_mod
from peer.algorithms import InMessage, Payload, create
from peer.checkpoint import atomic_write_bytes
from peer.codec import Envelope, Received, ReceiveLimits, encode, iter_requests
from peer.config import PeerConfig
from peer.data import load_dataset, local_partition, partition_summary
from peer.discovery import Candidate, MdnsDiscovery, StaticPeers, resolve_interfaces
from peer.errors import CheckpointError, PayloadError, SendError
from peer.gossip import BreakerPolicy, GossipCore, retry_delay, should_retry
from peer.logs import OnceLogger, node_logger
from peer.metrics import Counters, MetricsLog
from peer.models import build_model, num_params, schema_fingerprint
from peer.training import LocalTrainer, select_device
from peer.transport import Client, Server, start_server
from peer.v1 import gossip_pb2
from peer.worker import TrainingWorker


def reachable_address(advertised: str, peer: str) -> str:
    """The address to dial a peer that said Hello: its advertised one, unless that names an unspecified or
    loopback host while the call came from elsewhere; then the caller's IP with the advertised port."""
    host, _, port = advertised.rpartition(":")
    kind, _, rest = peer.partition(":")
    if kind != "ipv4" or not port:
        return advertised
    caller_ip = rest.rpartition(":")[0]
    if host in ("0.0.0.0", "", "localhost") or (host.startswith("127.") and not caller_ip.startswith("127.")):
        return f"{caller_ip}:{port}"
    return advertised


class Node:
    """One `peer run` daemon. `await Node(cfg).run()` returns after a graceful stop."""

    def __init__(self, cfg: PeerConfig, *, reset: bool = False, stdout: TextIO | None = None) -> None:
        self.cfg = cfg
        self.reset = reset
        self.stdout = stdout if stdout is not None else sys.stdout
        self.log = node_logger("peer.node", cfg.node_id)
        self.once = OnceLogger(self.log)
        self.counters = Counters()
        self.rng = random.Random(f"{cfg.node_id}-{time.time_ns()}")  # jitter only; never affects the math
        self.core = GossipCore(
            cfg.node_id,
            cfg.topology,
            BreakerPolicy(cfg.gossip.breaker_threshold, cfg.gossip.backoff_base_s, cfg.gossip.backoff_cap_s),
        )
        self.incarnation = time.time_ns() // 1_000_000
        self.ready = asyncio.Event()
        self.trained = asyncio.Event()  # set once train.epochs are done (the daemon keeps mixing after that)
        self.address = ""
        self._stop = asyncio.Event()
        self._outbox: Payload | None = None
        self._outbox_event = asyncio.Event()
        self._encoded: tuple[int, Any, list[bytes], int] | None = None
        self._in_flight: set[str] = set()
        self._candidates: asyncio.Queue[Candidate] = asyncio.Queue()
        self._hello_in_progress: set[str] = set()
        self._closed_channels: asyncio.Queue[str] = asyncio.Queue()
        self._checkpoints: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._started = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Server | None = None
        self._mdns: MdnsDiscovery | None = None
        self.state_dir = Path(cfg.state_dir)
        self.metrics = MetricsLog(self.state_dir / "metrics.jsonl")

    # ---------------------------------------------------------------------------------------------- set-up
    def _build(self) -> None:
        """Blocking set-up (data, model, checkpoint); runs in a thread before the daemon serves."""
        cfg = self.cfg
        self.state_dir.mkdir(parents=True, exist_ok=True)
        ds = load_dataset(cfg.data.dataset, cfg.data.path, seed=cfg.data.seed, test_fraction=cfg.data.test_fraction)
        x, y = local_partition(ds, cfg.data.partition, cfg.data.num_partitions, cfg.data.partition_index, cfg.data.seed)
        self.log.info(
            "data %s, partition %s [%d/%d]: %d samples, labels %s",
            ds.name,
            cfg.data.partition,
            cfg.data.partition_index,
            cfg.data.num_partitions,
            len(y),
            partition_summary(y, [np.arange(len(y))])[0] if len(y) else {},
        )
        self.dataset = ds
        if cfg.train.torch_threads:
            torch.set_num_threads(cfg.train.torch_threads)
        device = select_device(cfg.train.device)
        model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, seed=cfg.model.seed).to(device)
        self.fingerprint = schema_fingerprint(model)
        self.num_params = num_params(model)
        t = cfg.train
        self.trainer = LocalTrainer(
            model,
            x,
            y,
            batch_size=t.batch_size,
            lr=t.lr,
            momentum=t.momentum,
            weight_decay=t.weight_decay,
            optimizer=t.optimizer,
            device=device,
            seed=t.seed + 1000 * cfg.data.partition_index,
        )
        self.algorithm = create(cfg.algorithm, cfg.node_id)
        if self.reset and (aside := checkpoint.discard(self.state_dir)) is not None:
            self.log.warning("--reset: previous checkpoint moved to %s", aside)
        state = checkpoint.load(self.state_dir)
        if state is not None:
            self._restore(state)
        atomic_write_bytes(self.state_dir / "config.yaml", config_mod.dump(cfg).encode())
        self.worker = TrainingWorker(
            train_cfg=cfg.train,
            consensus_interval_s=max(cfg.train.round_interval_s, cfg.gossip.interval_s),
            trainer=self.trainer,
            algorithm=self.algorithm,
            counters=self.counters,
            log=self.log,
            publish=self._publish_threadsafe,
            on_checkpoint=self._checkpoint_threadsafe,
            on_trained=self._trained_threadsafe,
            snapshot_dir=self.state_dir / "snapshots" if cfg.metrics.snapshot_interval_s > 0 else None,
            snapshot_interval_s=cfg.metrics.snapshot_interval_s,
        )
        self.log.info(
            "model %s (%d parameters, schema %s) on %s; algorithm %s [%s]",
            cfg.model.name,
            self.num_params,
            self.fingerprint,
            device,
            self.algorithm.name,
            self.algorithm.provenance,
        )

    def _restore(self, state: dict[str, Any]) -> None:
        path = self.state_dir / checkpoint.CHECKPOINT_NAME
        for key, mine in (
            ("node_id", self.cfg.node_id),
            ("fingerprint", self.fingerprint),
            ("algorithm_name", self.algorithm.name),
        ):
            if state.get(key) != mine:
                raise CheckpointError(
                    f"checkpoint {path} was written with {key}={state.get(key)!r} but this config has {mine!r}; "
                    "use another state_dir, or --reset to discard the checkpoint"
                )
        try:
            self.trainer.model.load_state_dict(state["model"])
            self.trainer.load_state_dict(state["trainer"])
            self.algorithm.load_state_dict(state["algorithm"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {path} does not match this model: {exc}") from exc
        self.counters.restore(state.get("counters", {}))
        self.log.info("resumed from checkpoint %s at step %d", path, self.trainer.step_count)

    def _checkpoint_state(self, worker_state: dict[str, Any]) -> dict[str, Any]:
        return {
            "node_id": self.cfg.node_id,
            "fingerprint": self.fingerprint,
            "algorithm_name": self.algorithm.name,
            "saved_unix_s": time.time(),
            **worker_state,
        }

    # ------------------------------------------------------------------------------------------------ run
    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._build)
        self.worker.view = self.core.view()
        if self.worker.done:
            self.trained.set()
        self.client = Client(self.cfg.gossip)
        self._server = await start_server(self.cfg.listen, self.cfg.gossip, self)
        try:
            host = self.cfg.listen_host
            if host in ("0.0.0.0", "::", ""):
                # Listening everywhere: advertise the first mDNS interface's address.
                host = resolve_interfaces(self.cfg.discovery.interfaces)[0]
            elif host == "localhost":
                host = "127.0.0.1"
            self.address = f"{host}:{self._server.port}"
            if self.cfg.discovery.mdns:
                self._mdns = MdnsDiscovery(
                    node_id=self.cfg.node_id,
                    port=self._server.port,
                    advertise_ip=host,
                    interfaces=self.cfg.discovery.interfaces,
                    protocol_version=PROTOCOL_VERSION,
                    schema_fingerprint=self.fingerprint,
                    on_candidate=self._on_mdns_candidate,
                    on_removed=self._on_mdns_removed,
                    extra_txt={"cluster": self.cfg.discovery.cluster},
                )
                await self._mdns.start()
            self._announce_ready()
            async with asyncio.TaskGroup() as tg:
                train_task = tg.create_task(asyncio.to_thread(self.worker.run))
                tg.create_task(self._gossip_loop(tg))
                waiters = [
                    tg.create_task(self._hello_loop(tg)),
                    tg.create_task(self._drain(self._closed_channels, self.client.forget)),
                    tg.create_task(self._drain(self._checkpoints, self._save_checkpoint)),
                ]
                tg.create_task(self._static_loop())
                tg.create_task(self._periodic(self.cfg.checkpoint.interval_s, self.worker.checkpoint_requested.set))
                tg.create_task(self._periodic(self.cfg.metrics.interval_s, self._write_metrics))
                mdns_task = tg.create_task(self._mdns.run()) if self._mdns is not None else None
                await self._stop.wait()
                await self._shutdown(train_task, mdns_task)
                for task in waiters:
                    task.cancel()
        finally:
            self.worker.stop.set()  # never leave the training thread running (asyncio.run would wait on it)
            if self._mdns is not None:
                await self._mdns.close()
            await self.client.close()
            if self._server is not None:
                await self._server.server.stop(None)

    def _announce_ready(self) -> None:
        line = {
            "event": "ready",
            "node_id": self.cfg.node_id,
            "address": self.address,
            "incarnation": self.incarnation,
            "step": self.trainer.step_count,
        }
        self.stdout.write(json.dumps(line) + "\n")
        self.stdout.flush()
        self.ready.set()
        self.log.info("serving on %s", self.address)

    def request_stop(self) -> None:
        """Begin a graceful shutdown (signal handlers and tests call this)."""
        self._stop.set()

    async def _shutdown(self, train_task: asyncio.Task[None], mdns_task: asyncio.Task[None] | None) -> None:
        self.log.info("shutting down")
        if self._mdns is not None:
            await self._mdns.close()  # goodbye first, so neighbours stop dialling us
        if mdns_task is not None:
            mdns_task.cancel()
        self.worker.stop.set()
        await train_task
        if self._server is not None:
            await self._server.stop(grace_s=5.0)  # lets in-flight pushes to us finish
        # Outgoing pushes still in flight have their own deadlines; the TaskGroup waits for them.
        await self._save_checkpoint(self._checkpoint_state(self.worker.state()))
        self._write_metrics(event="stopped")

    # ------------------------------------------------------------------------------------------- gossiping
    def _publish_threadsafe(self, payload: Payload) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._set_outbox, payload)

    def _trained_threadsafe(self) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.trained.set)

    def _set_outbox(self, payload: Payload) -> None:
        self._outbox = payload
        self._outbox_event.set()

    def _envelope(self) -> Envelope:
        return Envelope(
            sender_id=self.cfg.node_id,
            schema_fingerprint=self.fingerprint,
            algorithm=self.algorithm.name,
            incarnation=self.incarnation,
            sender_degree=self.core.degree(),
            sender_address=self.address,
            sent_unix_ms=int(time.time() * 1000),
        )

    async def _gossip_loop(self, tg: asyncio.TaskGroup) -> None:
        """Push each new payload as soon as the training thread publishes it (a stale copy at the receiver
        slows consensus), but no more often than `gossip.interval_s` per neighbour. Also wakes every
        interval to retry neighbours that were skipped (breaker open, push in flight)."""
        interval = self.cfg.gossip.interval_s
        while not self._stop.is_set():
            started = time.monotonic()
            self._outbox_event.clear()
            payload = self._outbox
            if payload is not None:
                due = self.core.sends_due(started, payload.seq, self._in_flight)
                if due:
                    encoded = await self._encode(payload)
                    for j in due:
                        self._in_flight.add(j)
                        tg.create_task(self._push(j, payload.seq, encoded))
            await self._sleep(interval - (time.monotonic() - started))
            if not self._outbox_event.is_set():
                await self._wait_outbox(interval)

    async def _wait_outbox(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._outbox_event.wait(), timeout=timeout_s)
        except TimeoutError:
            pass

    async def _encode(self, payload: Payload) -> tuple[Any, list[bytes], int]:
        if self._encoded is not None and self._encoded[0] == payload.seq:
            return self._encoded[1:]
        env = self._envelope()
        big = sum(t.numel() * t.element_size() for t in payload.tensors.values()) > (1 << 20)
        fn = lambda: encode(env, payload, chunk_bytes=self.cfg.gossip.chunk_bytes)  # noqa: E731
        header, chunks = await asyncio.to_thread(fn) if big else fn()
        self._encoded = (payload.seq, header, chunks, int(header.total_bytes))
        return header, chunks, int(header.total_bytes)

    async def _push(self, node_id: str, seq: int, encoded: tuple[Any, list[bytes], int]) -> None:
        header, chunks, total = encoded
        attempt = 0
        try:
            while True:
                rec = self.core.peers.get(node_id)
                if rec is None or self._stop.is_set():
                    return
                try:
                    await self.client.push(rec.address, iter_requests(header, chunks), total, node_id)
                except SendError as exc:
                    newer = self._outbox is not None and self._outbox.seq > seq
                    # Full-state pushes are idempotent (the receiver drops old sequence numbers), so a timed-out
                    # push may be retried; but never once a newer state supersedes this one.
                    if not newer and should_retry(
                        exc.code, attempt, max_attempts=self.cfg.gossip.max_attempts, idempotent=True, details=str(exc)
                    ):
                        self.counters.add(send_retries=1)
                        delay = retry_delay(
                            attempt,
                            base_s=self.cfg.gossip.backoff_base_s,
                            cap_s=self.cfg.gossip.backoff_cap_s,
                            rng=self.rng,
                        )
                        attempt += 1
                        await self._sleep(delay)
                        continue
                    self.counters.add(send_failures=1)
                    skip = self.core.send_failed(node_id, exc.code, time.monotonic(), self.rng)
                    self.once.warning(
                        ("send", node_id), "%s%s", exc, f"; skipping {node_id} for {skip:.1f} s" if skip else ""
                    )
                    return
                self.core.send_ok(node_id, seq, time.monotonic())
                self.once.reset("send")
                self.counters.add(bytes_sent=total, messages_sent=1)
                return
        finally:
            self._in_flight.discard(node_id)

    # ------------------------------------------------------------------------------------------ membership
    async def _hello_loop(self, tg: asyncio.TaskGroup) -> None:
        while True:
            cand = await self._candidates.get()
            if cand.address in self._hello_in_progress or cand.address == self.address:
                continue
            rec = self.core.peers.get(cand.node_id) if cand.node_id else None
            if rec is not None and rec.address == cand.address and rec.breaker.failures == 0:
                continue
            self._hello_in_progress.add(cand.address)
            tg.create_task(self._say_hello(cand))

    def _hello_request(self) -> gossip_pb2.HelloRequest:
        return gossip_pb2.HelloRequest(
            node_id=self.cfg.node_id,
            protocol_version=PROTOCOL_VERSION,
            schema_fingerprint=self.fingerprint,
            algorithm=self.algorithm.name,
            degree=self.core.degree(),
            address=self.address,
            incarnation=self.incarnation,
        )

    async def _say_hello(self, cand: Candidate) -> None:
        try:
            resp = await self.client.hello(cand.address, self._hello_request())
        except SendError as exc:
            self.log.debug("hello to %s failed: %s", cand.address, exc)
            return
        finally:
            self._hello_in_progress.discard(cand.address)
        if not resp.accepted:
            self.once.warning(
                ("hello", cand.address), "peer %s at %s refused us: %s", resp.node_id, cand.address, resp.reason
            )
            return
        problem = self._incompatibility(resp.node_id, resp.protocol_version, resp.schema_fingerprint, resp.algorithm)
        if problem:
            self.once.warning(
                ("incompatible", resp.node_id), "ignoring peer %s at %s: %s", resp.node_id, cand.address, problem
            )
            return
        # The address we dialled is known to work from here; the one the peer advertises may not be (NAT, a
        # container bridge, a 0.0.0.0 listener).
        self._peer_up(resp.node_id, cand.address, resp.degree, resp.incarnation, "hello")

    def _incompatibility(self, node_id: str, proto: str, fingerprint: str, algorithm: str) -> str:
        if proto != PROTOCOL_VERSION:
            return f"protocol {proto!r} != ours {PROTOCOL_VERSION!r}"
        if fingerprint != self.fingerprint:
            return f"schema fingerprint {fingerprint} != ours {self.fingerprint} (a different model?)"
        if algorithm != self.algorithm.name:
            return f"algorithm {algorithm!r} != ours {self.algorithm.name!r}"
        return ""

    def _peer_up(self, node_id: str, address: str, degree: int, incarnation: int, source: str) -> None:
        old = self.core.peers.get(node_id)
        old_address = old.address if old else None
        upd = self.core.peer_up(node_id, address, degree, incarnation, time.monotonic(), source)
        if upd.new:
            self.log.info("new peer %s at %s (via %s)", node_id, address, source)
        elif upd.restarted:
            self.log.info("peer %s restarted (new incarnation) at %s", node_id, address)
            self.worker.forget.append(node_id)
        if upd.redial and old_address and old_address != address:
            self._closed_channels.put_nowait(old_address)
        self._refresh_view()

    def _on_mdns_candidate(self, cand: Candidate) -> None:
        cluster = cand.txt.get("cluster", "default")
        if cluster != self.cfg.discovery.cluster:
            self.once.warning(
                ("cluster", cand.node_id or cand.address),
                "ignoring peer %s at %s: cluster %r != ours %r",
                cand.node_id,
                cand.address,
                cluster,
                self.cfg.discovery.cluster,
            )
            return
        self._candidates.put_nowait(cand)

    def _on_mdns_removed(self, node_id: str) -> None:
        rec = self.core.peer_gone(node_id)
        if rec is not None:
            self.log.info("peer %s left (mDNS goodbye)", node_id)
            self._refresh_view()

    def _refresh_view(self) -> None:
        view = self.core.view()
        self.worker.view = view
        target = len(self.core.neighbours())
        if target >= (2 if self.cfg.topology == "ring" else 1) or target >= self.cfg.data.num_partitions - 1:
            self.worker.neighbours_ready.set()

    async def _static_loop(self) -> None:
        static = StaticPeers(self.cfg.discovery.static_peers, self._candidates.put_nowait)
        if not self.cfg.discovery.static_peers:
            return
        while not self._stop.is_set():
            known = {r.address for r in self.core.peers.values() if r.breaker.failures == 0}
            for cand in static.candidates():
                if cand.address not in known:
                    self._candidates.put_nowait(cand)
            await self._sleep(self.cfg.discovery.hello_retry_s)

    # --------------------------------------------------------------------------- server handlers (Handlers)
    def hello(self, request: gossip_pb2.HelloRequest, peer: str) -> gossip_pb2.HelloResponse:
        resp = self._hello_request()
        reply = gossip_pb2.HelloResponse(
            node_id=resp.node_id,
            protocol_version=resp.protocol_version,
            schema_fingerprint=resp.schema_fingerprint,
            algorithm=resp.algorithm,
            degree=resp.degree,
            address=resp.address,
            incarnation=resp.incarnation,
            accepted=True,
        )
        if request.node_id == self.cfg.node_id and request.incarnation != self.incarnation:
            self.once.warning(("dup", peer), "another live peer at %s uses our node id %r", peer, request.node_id)
            reply.accepted, reply.reason = False, f"node id {request.node_id!r} is already in use at {self.address}"
            return reply
        problem = self._incompatibility(
            request.node_id, request.protocol_version, request.schema_fingerprint, request.algorithm
        )
        if problem:
            self.once.warning(
                ("incompatible", request.node_id),
                "ignoring hello from %s at %s: %s",
                request.node_id,
                request.address,
                problem,
            )
            reply.accepted, reply.reason = False, problem
            return reply
        if request.node_id != self.cfg.node_id:
            address = reachable_address(request.address, peer)
            self._peer_up(request.node_id, address, request.degree, request.incarnation, "hello-in")
        return reply

    def receive_limits(self) -> ReceiveLimits:
        return ReceiveLimits(
            max_payload_bytes=self.cfg.gossip.max_message_bytes,
            max_chunk_bytes=self.cfg.gossip.chunk_bytes,
            expected_fingerprint=self.fingerprint,
            expected_algorithm=self.algorithm.name,
            expected_tensors=self.algorithm.expected_tensors(self.num_params),
        )

    def deliver(self, received: Received) -> None:
        env = received.envelope
        self.counters.add(bytes_received=received.nbytes, messages_received=1)
        now = time.monotonic()
        rec = self.core.peers.get(env.sender_id)
        if (rec is None or rec.incarnation != env.incarnation) and env.sender_address:
            self._peer_up(env.sender_id, env.sender_address, env.sender_degree, env.incarnation, "push")
        else:
            self.core.heard_from(env.sender_id, env.sender_degree, now)
        self.worker.inbox.append(InMessage(env.sender_id, env.incarnation, env.sender_degree, received.payload, now))

    def rejected(self, sender: str, error: PayloadError, peer: str) -> None:
        self.counters.add(rejected_messages=1)
        self.once.warning(
            ("reject", sender, type(error).__name__),
            "rejected a push from %s (%s): %s [%s]",
            sender,
            peer,
            error,
            error.status,
        )

    def status(self) -> gossip_pb2.GetStatusResponse:
        c = self.counters.snapshot()
        now = time.monotonic()
        wall = time.time()
        resp = gossip_pb2.GetStatusResponse(
            node_id=self.cfg.node_id,
            address=self.address,
            algorithm=self.algorithm.name,
            protocol_version=PROTOCOL_VERSION,
            schema_fingerprint=self.fingerprint,
            incarnation=self.incarnation,
            step=c["step"],
            epoch=c["epoch"],
            seq=c["seq"],
            loss=c["loss"],
            training_done=c["training_done"],
            uptime_s=now - self._started,
            bytes_sent=c["bytes_sent"],
            bytes_received=c["bytes_received"],
            send_failures=c["send_failures"],
            rejected_messages=c["rejected_messages"],
            degree=self.core.degree(),
        )
        neighbours = set(self.core.neighbours())
        for node_id, rec in sorted(self.core.peers.items()):
            resp.neighbours.add(
                node_id=node_id,
                address=rec.address,
                state=self.core.state_of(node_id, now),
                last_seen_unix_ms=int((wall - (now - rec.last_seen)) * 1000),
                failures=rec.breaker.failures,
                backoff_s=rec.breaker.remaining(now),
                degree=rec.degree,
                last_seq=rec.last_sent_seq,
            )
            resp.info[f"neighbour.{node_id}"] = "yes" if node_id in neighbours else "no"
        resp.info["provenance"] = self.algorithm.provenance
        return resp

    # ------------------------------------------------------------------------------------ checkpoints, metrics
    def _checkpoint_threadsafe(self, worker_state: dict[str, Any]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._checkpoints.put_nowait, self._checkpoint_state(worker_state))

    async def _save_checkpoint(self, state: dict[str, Any]) -> None:
        try:
            await asyncio.to_thread(checkpoint.save, self.state_dir, state)
        except CheckpointError as exc:
            # A full disk must not kill training: keep the old checkpoint and try again next interval.
            self.once.warning(("checkpoint",), "%s", exc)

    def _write_metrics(self, event: str = "metrics") -> None:
        c = self.counters.snapshot()
        record = {
            "event": event,
            "node_id": self.cfg.node_id,
            "time": time.time(),
            "elapsed_s": time.monotonic() - self._started,
            "neighbours": self.core.neighbours(),
            **c,
        }
        try:
            self.metrics.append(record)
        except OSError as exc:
            self.once.warning(("metrics",), "cannot append to %s: %s", self.metrics.path, exc)

    @staticmethod
    async def _drain(queue: asyncio.Queue[Any], fn: Any) -> None:
        while True:
            await fn(await queue.get())

    async def _periodic(self, interval_s: float, fn: Any) -> None:
        while not self._stop.is_set():
            await self._sleep(interval_s)
            if not self._stop.is_set():
                fn()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when the daemon stops."""
        if seconds <= 0:
            return
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except TimeoutError:
            pass
