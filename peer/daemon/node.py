"""The daemon's supervisor: builds the parts, feeds the protocol core its inputs, carries out its effects, and
owns every task in one TaskGroup until a graceful stop.

It makes no decisions of its own: `peer.core.gossip.GossipCore` decides membership, liveness, whom to push to,
catch-up and timers; the algorithm decides how to merge. `dispatch` is the one path from an I/O outcome (a
Hello, a push, a failed call, a clock tick) into the core, and `_execute` the one path out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TextIO

import torch
from torch.utils.data import Dataset as TorchDataset

from peer import PROTOCOL_VERSION
from peer.algorithms import Algorithm
from peer.config import PeerConfig
from peer.core import events as ev
from peer.core.faults import FaultInjector
from peer.core.gossip import GossipCore
from peer.core.settings import Identity
from peer.daemon import readyfile
from peer.daemon.builder import Built, build
from peer.daemon.catchup import CatchUpFetcher
from peer.daemon.changes import Changes
from peer.daemon.checkpoint import Checkpointer
from peer.daemon.credentials import load_credentials
from peer.daemon.discovery import Discovery
from peer.daemon.evaluator import evaluation_task
from peer.daemon.exporter import Exporter, serve_metrics
from peer.daemon.handlers import DaemonFacts, RpcHandlers
from peer.daemon.membership import DiscoveryInputs, HelloCaller
from peer.daemon.metrics import Counters, MetricsLog, extra_metrics, metrics_record
from peer.daemon.pusher import Pusher
from peer.daemon.refusals import Refusals
from peer.daemon.sdnotify import Notifier
from peer.daemon.settings import core_settings
from peer.daemon.worker import TrainingWorker
from peer.errors import PeerError, StartupError
from peer.learn.sources import TaskData, task_data_from
from peer.learn.training import LocalTrainer
from peer.logs import OnceLogger, node_logger
from peer.net.assembler import ReceiveLimits
from peer.net.client import Client
from peer.net.interfaces import check_ports_free, is_wildcard_host, mdns_interfaces
from peer.net.server import Server, start_server
from peer.net.tls import Credentials
from peer.net.wire import Envelope

# The longest the clock sleeps between Ticks even when nothing is due (a safety net, not a schedule).
MAX_TICK_S = 1.0
MIN_TICK_S = 0.002


def _hour_start(unix_s: float) -> float:
    return unix_s - (unix_s % 3600.0)


class Node:
    """One `peer run` daemon. `await Node(cfg).run()` returns after a graceful stop."""

    def __init__(
        self,
        cfg: PeerConfig,
        *,
        reset: bool = False,
        stdout: TextIO | None = None,
        model: torch.nn.Module | None = None,
        train_data: TorchDataset[Any] | None = None,
        test_data: TorchDataset[Any] | None = None,
        external: bool = False,
        notifier: Notifier | None = None,
    ) -> None:
        """`model`, `train_data` and `test_data` (the library API) replace what the config's model and data
        sections would build; the CLI passes none of them. `external`: no training thread; the caller steps the
        model itself and merges through `worker.external_step()` (see `peer.Gossip`)."""
        self.cfg = cfg
        self._model = model
        self.external = external
        self._task: asyncio.Task[None] | None = None
        self._data = (
            task_data_from(train_data, test_data, "train_data", "train_data") if train_data is not None else None
        )
        self.reset = reset
        self.stdout = stdout if stdout is not None else sys.stdout
        self.notifier = notifier if notifier is not None else Notifier()  # systemd (peer.cli reads the environment)
        self.exporter: Exporter | None = None  # Prometheus endpoint (metrics.listen)
        self.metrics_address = ""
        self.log = node_logger("peer.daemon.node", cfg.node_id)
        self.once = OnceLogger(self.log)
        self.counters = Counters()
        self.rng = random.Random(f"{cfg.node_id}-{time.time_ns()}")  # jitter only; never affects the math
        # Wall-clock time with a shared origin, so that both ends of a flapping link see the same outages.
        self.faults = FaultInjector(cfg.faults, node_id=cfg.node_id, start_s=_hour_start(time.time()))
        self.incarnation = time.time_ns() // 1_000_000
        self.ready = asyncio.Event()
        self.trained = asyncio.Event()  # set once train.epochs are done (the daemon keeps mixing after that)
        self.changes = Changes()  # notified when the view changes, the trainer reports progress, metrics are written
        self.refusals = Refusals(self.counters, self.log, cfg.log.refusal_interval_s, self._notify)
        self.address = ""
        self.state_dir = Path(cfg.state_dir)
        self.metrics = MetricsLog(self.state_dir / "metrics.jsonl")
        self._stop = asyncio.Event()
        self._fatal: PeerError | None = None
        self._started = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._pending: list[Coroutine[Any, Any, None]] = []  # tasks asked for before the TaskGroup exists
        self._server: Server | None = None
        self.credentials: Credentials | None = None

    # Read-only views of what the build made (tools, tests and the library API read them).
    @property
    def trainer(self) -> LocalTrainer:
        return self.built.trainer

    @property
    def algorithm(self) -> Algorithm:
        return self.built.algorithm

    @property
    def fingerprint(self) -> str:
        return self.built.fingerprint

    @property
    def dataset(self) -> TaskData:
        return self.built.dataset

    # ------------------------------------------------------------------------------------------- the core
    def dispatch(self, event: ev.Input) -> list[ev.Effect]:
        """Feed one input to the core and carry out its effects (on the loop thread). Returns the effects, so
        that a handler can answer its request (Reply, Deliver)."""
        effects = self.core.handle(event)
        self._execute(effects)
        return effects

    def _execute(self, effects: list[ev.Effect]) -> None:
        for e in effects:
            match e:
                case ev.SayHello():
                    self._spawn(self.hellos.call(e))
                case ev.ViewChanged():
                    self.worker.view = e.view
                    if e.cluster_known:
                        self.worker.neighbours_ready.set()
                    self._notify()
                case ev.Forget():
                    self.worker.forget.append(e.node_id)
                case ev.CloseChannel():
                    self._spawn(self.client.forget(e.address))
                case ev.StartCatchUp():
                    self._spawn(self.fetcher.fetch(e))
                case ev.CatchUpDone():
                    self.worker.catchup_done.set()
                case ev.RequestCheckpoint():
                    self.worker.checkpoint_requested.set()
                case ev.WriteMetrics():
                    self._write_metrics()
                case ev.Fatal():
                    self._on_fatal(StartupError(e.message))
                case ev.Log():
                    if e.key is not None and e.level == "warning":
                        self.once.warning(e.key, "%s", e.message)
                    else:
                        self.log.log(logging.getLevelName(e.level.upper()), "%s", e.message)
                case ev.Refused():
                    self.refusals.refuse(e.reason, e.source, e.message)
                case ev.ClearLog():
                    self.once.forget(e.key)
                case _:
                    pass  # Reply and Deliver answer the request that caused them (see RpcHandlers)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        if self._tg is None:
            self._pending.append(coro)
        else:
            self._tg.create_task(coro)

    def _progress(self) -> ev.Progress:
        trainer = self.built.trainer
        return ev.Progress(trainer.step_count, trainer.step_count / trainer.steps_per_epoch, self.worker.done)

    def me(self) -> ev.PeerInfo:
        """What we say about ourselves in a Hello."""
        p = self._progress()
        return ev.PeerInfo(
            self.cfg.node_id,
            PROTOCOL_VERSION,
            self.built.fingerprint,
            self.built.algorithm.name,
            self.core.degree(),
            self.address,
            self.incarnation,
            p.step,
            p.epoch,
            self.core.offer(),
            self.cfg.gossip.compression,
        )

    def _envelope(self) -> Envelope:
        return Envelope(
            sender_id=self.cfg.node_id,
            schema_fingerprint=self.built.fingerprint,
            algorithm=self.built.algorithm.name,
            incarnation=self.incarnation,
            sender_degree=self.core.degree(),
            sender_address=self.address,
            sent_unix_ms=int(time.time() * 1000),
        )

    async def _clock(self) -> None:
        """Ticks the core whenever its next deadline comes (heartbeats, static re-dials, timers)."""
        while not self._stop.is_set():
            now = time.monotonic()
            self.dispatch(ev.Tick(now, time.time(), self._progress()))
            wait = self.core.next_deadline(now) - time.monotonic()
            await self._sleep(min(max(wait, MIN_TICK_S), MAX_TICK_S))

    # ----------------------------------------------------------------------------------------- assembling
    def _assemble(self, built: Built) -> None:
        """Create the parts around the core (on the loop, after the blocking build)."""
        cfg = self.cfg
        self.built = built
        algorithm = built.algorithm
        identity = Identity(cfg.node_id, PROTOCOL_VERSION, built.fingerprint, algorithm.name, self.incarnation)
        self.core = GossipCore(core_settings(cfg, identity, mid_run_catchup=not algorithm.owns_local_update), self.rng)
        self.checkpointer = Checkpointer(
            self.state_dir,
            {"node_id": cfg.node_id, "fingerprint": built.fingerprint, "algorithm_name": algorithm.name},
            lambda key, msg: self.once.warning(key, "%s", msg),
            time.time,
        )
        self.worker = TrainingWorker(
            train_cfg=cfg.train,
            consensus_interval_s=max(cfg.train.round_interval_s, cfg.gossip.interval_s),
            trainer=built.trainer,
            algorithm=algorithm,
            counters=self.counters,
            log=self.log,
            publish=lambda p: self.pusher.handoff.put(p),
            send=self._threadsafe(lambda s: self.pusher.enqueue(s)),
            on_checkpoint=self._threadsafe(lambda w: self.checkpointer.queue.put_nowait(self.checkpointer.state(w))),
            on_trained=self._threadsafe(lambda _: self._trained()),
            on_progress=self._progress_reported,
            snapshot_dir=self.state_dir / "snapshots" if cfg.metrics.snapshot_interval_s > 0 else None,
            snapshot_interval_s=cfg.metrics.snapshot_interval_s,
            slowdown=cfg.faults.slowdown,
            external=self.external,
        )
        self.worker.view = self.core.view()
        self._pending += evaluation_task(
            cfg, built.trainer.model, built.dataset.test, self.counters, self._sleep, self._stop.is_set
        )
        if not cfg.discovery.finds_peers:
            self.worker.neighbours_ready.set()  # no way to find anyone: waiting for neighbours would be pointless
        self.client = Client(cfg.gossip, self.credentials)
        self.pusher = Pusher(
            cfg,
            self.core,
            self.dispatch,
            self.client,
            self.counters,
            self.faults,
            self._envelope,
            self._sleep,
            self._stop.is_set,
            self.rng,
        )
        self.pusher.on_ack = self._on_ack
        self.hellos = HelloCaller(self.client, self.me, self.dispatch)
        self.discovery = DiscoveryInputs(self.dispatch)
        self._discovery = Discovery(cfg, self.discovery, self.once)
        self.handlers = RpcHandlers(
            DaemonFacts(
                cfg.node_id,
                built.fingerprint,
                built.num_params,
                self.incarnation,
                cfg.gossip.chunk_bytes,
                cfg.gossip.max_message_bytes,
                self._started,
            ),
            self.core,
            self.dispatch,
            algorithm,
            self.worker,
            self.counters,
            self.me,
            self._envelope,
            self.once,
            self.refusals,
        )
        self.fetcher = CatchUpFetcher(
            client=self.client,
            node_id=cfg.node_id,
            fingerprint=built.fingerprint,
            limits=ReceiveLimits(
                max_payload_bytes=cfg.gossip.max_message_bytes,
                max_chunk_bytes=cfg.gossip.chunk_bytes,
                expected_fingerprint=built.fingerprint,
                expected_algorithm=algorithm.name,
                expected_tensors={"params": ((built.num_params,), "float32")},
            ),
            expected_bytes=4 * built.num_params,
            adopt=self.worker.adopt,
            my_epoch=lambda: self._progress().epoch,
            counters=self.counters,
            log=self.log,
            dispatch=self.dispatch,
        )

    # ------------------------------------------------------------------------------------------------ run
    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        cfg = self.cfg
        check_ports_free(
            {"listen": cfg.listen, "metrics.listen": cfg.metrics.listen, "health_listen": cfg.health_listen}
        )  # before the load
        self.credentials = load_credentials(self.cfg, self.log)
        built = await asyncio.to_thread(
            build,
            self.cfg,
            reset=self.reset,
            counters=self.counters,
            log=self.log,
            model=self._model,
            data=self._data,
            external=self.external,
        )
        self._assemble(built)
        if self.worker.done:
            self.trained.set()
        self._server = await start_server(cfg.listen, cfg.gossip, self.handlers, self.credentials, cfg.health_listen)
        try:
            host = self.cfg.listen_host
            interfaces = mdns_interfaces(host, self.cfg.discovery.interfaces)
            if is_wildcard_host(host):
                # Listening everywhere: advertise the first mDNS interface's address.
                host = interfaces[0]
            elif host == "localhost":
                host = "127.0.0.1"
            self.address = f"{host}:{self._server.port}"
            await self._discovery.start(self._server.port, host, interfaces, built.fingerprint)
            if self.cfg.metrics.listen is not None:
                self.exporter = serve_metrics(self.cfg, self.built.algorithm.name, self.counters, self._started)
                self.metrics_address = self.exporter.address
                self.log.info("Prometheus metrics on http://%s/metrics", self.metrics_address)
            self._announce_ready()
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for coro in self._pending:
                    tg.create_task(coro)
                self._pending.clear()
                train_task = tg.create_task(asyncio.to_thread(self.worker.run))
                tg.create_task(self.pusher.loop(tg))
                drain = tg.create_task(self.checkpointer.drain())
                now = time.monotonic()
                self.dispatch(ev.Started(now, time.time(), self.address, self._progress(), built.state_saved_unix_s))
                tg.create_task(self._clock())
                tg.create_task(self.notifier.watchdog(self._stop))
                discovery_task = tg.create_task(self._discovery.run())
                await self._stop.wait()
                await self._shutdown(train_task, discovery_task)
                drain.cancel()
            if self._fatal is not None:
                raise self._fatal
        finally:
            self.worker.stop.set()  # never leave the training thread running (asyncio.run would wait on it)
            readyfile.remove(self.state_dir, os.getpid())
            for coro in self._pending:
                coro.close()
            await self._discovery.close()
            await self.client.close()
            if self._server is not None:
                await self._server.abort()
            if self.exporter is not None:
                await asyncio.to_thread(self.exporter.close)

    def _announce_ready(self) -> None:
        line = {
            "event": "ready",
            "node_id": self.cfg.node_id,
            "address": self.address,
            "incarnation": self.incarnation,
            "step": self.built.trainer.step_count,
        }
        if self.metrics_address:
            line["metrics_address"] = self.metrics_address
        self.stdout.write(json.dumps(line) + "\n")
        self.stdout.flush()
        readyfile.write(self.state_dir, self.cfg.node_id, self.address, os.getpid(), self.metrics_address)
        self.ready.set()
        self.log.info("serving on %s", self.address)
        self.notifier.ready(f"serving on {self.address}")

    async def __aenter__(self) -> Node:
        """`async with Node(cfg, model=..., train_data=...) as node:` runs the daemon until the block ends."""
        self._task = asyncio.create_task(self.run())
        ready = asyncio.ensure_future(self.ready.wait())
        await asyncio.wait([self._task, ready], return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            ready.cancel()
            self._task.result()  # raises the start-up error
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.request_stop()
        if self._task is not None:
            await self._task

    def request_stop(self) -> None:
        """Begin a graceful shutdown (signal handlers and tests call this)."""
        if not self._stop.is_set():
            self.notifier.stopping()
        self._stop.set()

    async def _shutdown(self, train_task: asyncio.Task[None], discovery_task: asyncio.Task[None]) -> None:
        self.log.info("shutting down")
        await self._discovery.close()  # mDNS goodbye first, so neighbours stop dialling us
        discovery_task.cancel()
        self.worker.stop.set()
        await train_task
        if self._server is not None:
            await self._server.stop(grace_s=5.0)  # lets in-flight pushes to us finish; outgoing ones have deadlines
        await self.checkpointer.save(self.checkpointer.state(self.worker.state()))
        self._write_metrics(event="stopped")

    def _on_fatal(self, error: PeerError) -> None:
        self.log.error("%s", error)
        if self._fatal is None:
            self._fatal = error
        self.request_stop()

    # ------------------------------------------------------------------------------- thread bridges, waits
    def _threadsafe(self, fn: Callable[[Any], None]) -> Callable[..., None]:
        """A callback for the training thread that runs `fn` on the event loop (set before training starts)."""
        return lambda arg=None: self._loop.call_soon_threadsafe(fn, arg)  # type: ignore[union-attr,return-value]

    def _progress_reported(self) -> None:
        """From the training thread. Wakes the loop only while someone waits on progress (tests, the library API):
        a wake-up for every report took the GIL from training 100 times a second for nobody."""
        if self.changes.waiting:
            self._running_loop().call_soon_threadsafe(self._notify)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "set before training starts"
        return self._loop

    def _trained(self) -> None:
        self.trained.set()
        self._notify()

    def _on_ack(self, to: str, key: tuple[int, ...]) -> None:
        self.worker.acks.append((to, key))
        self.worker.wake.set()

    def _notify(self) -> None:
        self.changes.notify()

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Wait until `predicate()` holds, re-checked whenever the node reports a change (view, training
        progress, metrics). Raises TimeoutError naming `what`."""
        await self.changes.wait_for(predicate, timeout_s, what)

    # ------------------------------------------------------------------------------------------- metrics
    def _write_metrics(self, event: str = "metrics") -> None:
        self.counters.evictions = self.core.evictions
        self.counters.readmissions = self.core.readmissions
        extra = extra_metrics(self.faults, self.built.dataset.shards, self.built.algorithm, self.worker.pacer)
        record = metrics_record(event, self.cfg.node_id, self._started, self.core.neighbours(), self.counters, extra)
        if self.exporter is not None:
            self.exporter.publish(record, Counter(row.state for row in self.core.table.rows(time.monotonic())))
        try:
            self.metrics.append(record)
        except OSError as exc:
            self.once.warning(("metrics",), "cannot append to %s: %s", self.metrics.path, exc)
        self._notify()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when the daemon stops."""
        if seconds <= 0:
            return
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except TimeoutError:
            pass
