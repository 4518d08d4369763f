"""The daemon shell: wires config, data, trainer, algorithm, gRPC, discovery and checkpoints together.

It makes no decisions of its own: the gossip core (`peer.core.gossip`) decides whom to push to, when to back off
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

from peer import PROTOCOL_VERSION
from peer import config as config_mod
from peer.algorithms import InMessage, Payload, Send, create
from peer.config import PeerConfig
from peer.core.faults import FaultInjector
from peer.core.gossip import BreakerPolicy, GossipCore, LivenessPolicy
from peer.core.topology import is_time_varying, round_index_at
from peer.daemon import checkpoint
from peer.daemon.catchup import CatchUp
from peer.daemon.checkpoint import atomic_write_bytes
from peer.daemon.membership import Identity, Membership, MembershipEvents, reachable_address
from peer.daemon.metrics import Counters, MetricsLog
from peer.daemon.pusher import Pusher
from peer.daemon.worker import TrainingWorker
from peer.errors import CheckpointError, PayloadError, PeerError, SchemaMismatchError
from peer.learn.data import load_dataset, local_partition, partition_summary
from peer.learn.models import build_model, num_params, schema_fingerprint
from peer.learn.training import LocalTrainer, select_device
from peer.logs import OnceLogger, node_logger
from peer.net.assembler import Received, ReceiveLimits
from peer.net.client import Client
from peer.net.encoder import encode
from peer.net.interfaces import resolve_interfaces
from peer.net.mdns import MdnsDiscovery
from peer.net.server import Server, start_server
from peer.net.wire import Envelope
from peer.v1 import gossip_pb2


def _hour_start(unix_s: float) -> float:
    return unix_s - (unix_s % 3600.0)


class Node:
    """One `peer run` daemon. `await Node(cfg).run()` returns after a graceful stop."""

    def __init__(self, cfg: PeerConfig, *, reset: bool = False, stdout: TextIO | None = None) -> None:
        self.cfg = cfg
        self.reset = reset
        self.stdout = stdout if stdout is not None else sys.stdout
        self.log = node_logger("peer.daemon.node", cfg.node_id)
        self.once = OnceLogger(self.log)
        self.counters = Counters()
        self.rng = random.Random(f"{cfg.node_id}-{time.time_ns()}")  # jitter only; never affects the math
        self.core = GossipCore(
            cfg.node_id,
            cfg.topology,
            BreakerPolicy(cfg.gossip.breaker_threshold, cfg.gossip.backoff_base_s, cfg.gossip.backoff_cap_s),
            LivenessPolicy(
                cfg.membership.heartbeat_interval_s, cfg.membership.evict_after, cfg.membership.probe_evicted_max_s
            ),
            topology_seed=cfg.membership.topology_seed,
        )
        self._time_varying = is_time_varying(self.core.spec)
        # Wall-clock time with a shared origin, so that both ends of a flapping link see the same outages.
        self.faults = FaultInjector(cfg.faults, node_id=cfg.node_id, start_s=_hour_start(time.time()))
        self.incarnation = time.time_ns() // 1_000_000
        self.ready = asyncio.Event()
        self.trained = asyncio.Event()  # set once train.epochs are done (the daemon keeps mixing after that)
        self.address = ""
        self._stop = asyncio.Event()
        self._checkpoints: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._fatal: PeerError | None = None
        self._isolated_since: float | None = None
        self.catchup = CatchUp(self)
        self._tg: asyncio.TaskGroup | None = None
        self._state_saved_unix_s: float | None = None  # when the resumed checkpoint was written
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
        self.algorithm.bind_data(int(np.prod(ds.input_shape)), ds.num_classes)
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
            send=self._send_threadsafe,
            on_checkpoint=self._checkpoint_threadsafe,
            on_trained=self._trained_threadsafe,
            snapshot_dir=self.state_dir / "snapshots" if cfg.metrics.snapshot_interval_s > 0 else None,
            snapshot_interval_s=cfg.metrics.snapshot_interval_s,
            slowdown=cfg.faults.slowdown,
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
        self._state_saved_unix_s = float(state.get("saved_unix_s", 0.0))
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
        self.pusher = Pusher(
            self.cfg,
            self.core,
            self.client,
            self.counters,
            self.faults,
            self._envelope,
            self._sleep,
            self._stop.is_set,
            self.log,
            self.rng,
        )
        self.pusher.before_round = self._advance_topology
        self.pusher.on_ack = self._on_ack
        self.membership = Membership(
            self.cfg,
            self.core,
            self.client,
            Identity(self.cfg.node_id, self.fingerprint, self.algorithm.name, self.incarnation),
            MembershipEvents(self._refresh_view, self.worker.forget.append, self._on_readmitted, self._on_fatal),
            progress=lambda: (self.trainer.step_count, self.trainer.step_count / self.trainer.steps_per_epoch),
            sleep=self._sleep,
            stopping=self._stop.is_set,
            log=self.log,
        )
        self._server = await start_server(self.cfg.listen, self.cfg.gossip, self)
        try:
            host = self.cfg.listen_host
            if host in ("0.0.0.0", "::", ""):
                # Listening everywhere: advertise the first mDNS interface's address.
                host = resolve_interfaces(self.cfg.discovery.interfaces)[0]
            elif host == "localhost":
                host = "127.0.0.1"
            self.address = f"{host}:{self._server.port}"
            self.membership.me.address = self.address
            if self.cfg.discovery.mdns:
                self._mdns = MdnsDiscovery(
                    node_id=self.cfg.node_id,
                    port=self._server.port,
                    advertise_ip=host,
                    interfaces=self.cfg.discovery.interfaces,
                    protocol_version=PROTOCOL_VERSION,
                    schema_fingerprint=self.fingerprint,
                    on_candidate=self.membership.on_mdns_candidate,
                    on_removed=self.membership.on_mdns_removed,
                    extra_txt={"cluster": self.cfg.discovery.cluster},
                )
                await self._mdns.start()
            self._announce_ready()
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                train_task = tg.create_task(asyncio.to_thread(self.worker.run))
                tg.create_task(self.pusher.loop(tg))
                waiters = [
                    tg.create_task(self.membership.hello_loop(tg)),
                    tg.create_task(self._drain(self.membership.closed_channels, self.client.forget)),
                    tg.create_task(self._drain(self._checkpoints, self._save_checkpoint)),
                ]
                tg.create_task(self.membership.static_loop())
                tg.create_task(self.membership.heartbeat_loop(tg))
                if self.catchup.needed_at_start():
                    tg.create_task(self.catchup.run(starting=True, old=self.catchup.state_is_old()))
                else:
                    self.worker.catchup_done.set()
                tg.create_task(self._periodic(self.cfg.checkpoint.interval_s, self.worker.checkpoint_requested.set))
                tg.create_task(self._periodic(self.cfg.metrics.interval_s, self._write_metrics))
                tg.create_task(self._periodic(self.cfg.membership.heartbeat_interval_s, self.catchup.check_progress))
                mdns_task = tg.create_task(self._mdns.run()) if self._mdns is not None else None
                await self._stop.wait()
                await self._shutdown(train_task, mdns_task)
                for task in waiters:
                    task.cancel()
            if self._fatal is not None:
                raise self._fatal
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
        self._loop.call_soon_threadsafe(self.pusher.publish, payload)

    def _send_threadsafe(self, sends: list[Send]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.pusher.enqueue, sends)

    def _on_ack(self, to: str, key: tuple[int, ...]) -> None:
        self.worker.acks.append((to, key))
        self.worker.wake.set()

    def _trained_threadsafe(self) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.trained.set)

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

    def _advance_topology(self) -> None:
        """Time-varying topologies change graph every membership.topology_period_s (wall clock)."""
        if self._time_varying:
            r = round_index_at(time.time(), self.cfg.membership.topology_period_s)
            if r != self.core.round_index:
                self.core.round_index = r
                self._refresh_view()

    # ------------------------------------------------------------------------------------------ membership
    # ------------------------------------------------------------------------------- membership callbacks
    def _on_fatal(self, error: PeerError) -> None:
        self.log.error("%s", error)
        if self._fatal is None:
            self._fatal = error
        self.request_stop()

    def _on_readmitted(self, node_id: str) -> None:
        self.catchup.on_readmitted(self._isolated_since)

    def _refresh_view(self) -> None:
        view = self.core.view()
        self.worker.view = view
        if view.degrees:
            self._isolated_since = None
        elif self._isolated_since is None:
            self._isolated_since = time.monotonic()
        # wait_for_neighbors_s waits until the expected cluster (one peer per data partition) is known.
        if view.degrees and len(self.core.members()) + 1 >= self.cfg.data.num_partitions:
            self.worker.neighbours_ready.set()

    # --------------------------------------------------------------------------- server handlers (Handlers)
    def hello(self, request: gossip_pb2.HelloRequest, peer: str) -> gossip_pb2.HelloResponse:
        return self.membership.handle_hello(request, peer)

    async def fetch_state(self, request: gossip_pb2.FetchStateRequest) -> tuple[gossip_pb2.PushHeader, list[bytes]]:
        if request.schema_fingerprint != self.fingerprint:
            raise SchemaMismatchError(
                f"fetch from {request.node_id!r} refused: schema fingerprint {request.schema_fingerprint} != ours "
                f"{self.fingerprint}"
            )
        params = self.worker.latest_params
        payload = Payload("state", {"params": params}, seq=self.counters.seq, step=self.trainer.step_count)
        env = self._envelope()
        # Encoding hashes and copies every byte: off the loop for big models.
        return await asyncio.to_thread(encode, env, payload, chunk_bytes=self.cfg.gossip.chunk_bytes)

    def receive_limits(self) -> ReceiveLimits:
        return ReceiveLimits(
            max_payload_bytes=self.cfg.gossip.max_message_bytes,
            max_chunk_bytes=self.cfg.gossip.chunk_bytes,
            expected_fingerprint=self.fingerprint,
            expected_algorithm=self.algorithm.name,
            expected_tensors=self.algorithm.expected_tensors(self.num_params),
            expected_by_kind=self.algorithm.expected_by_kind(self.num_params),
        )

    def deliver(self, received: Received, peer: str = "") -> None:
        env = received.envelope
        self.counters.add(bytes_received=received.nbytes, messages_received=1)
        now = time.monotonic()
        if self.membership.has_departed(env.sender_id, env.incarnation):
            return  # sent before its goodbye
        rec = self.core.peers.get(env.sender_id)
        if (rec is None or rec.incarnation != env.incarnation) and env.sender_address:
            address = reachable_address(env.sender_address, peer) if peer else env.sender_address
            self.membership.peer_up(env.sender_id, address, env.sender_degree, env.incarnation, "push")
        else:
            self.membership.heard_from(env.sender_id, env.sender_degree)
        self.worker.inbox.append(InMessage(env.sender_id, env.incarnation, env.sender_degree, received.payload, now))
        self.worker.wake.set()

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
                failures=max(rec.misses, rec.breaker.failures),
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
        self.counters.evictions = self.membership.evictions
        self.counters.readmissions = self.membership.readmissions
        c = self.counters.snapshot()
        if self.faults.enabled:
            c.update({f"faults_{k}": v for k, v in self.faults.counters.items()})
        try:
            c.update({f"algo_{k}": v for k, v in self.algorithm.metrics().items()})
        except RuntimeError:  # a dict resized by the training thread mid-read: next time
            pass
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
