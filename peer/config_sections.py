"""The sections of the config tree (`peer.config.PeerConfig` holds one of each). Every field carries its
description: `peer.tools.config_reference` renders them into the docs' configuration reference, so the two cannot
drift.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from peer.errors import ConfigError

MIB = 1 << 20


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_hostport(value: str, *, allow_port_zero: bool) -> str:
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port, got {value!r}")
    if not port_text.isdigit():
        raise ValueError(f"port must be a number, got {port_text!r}")
    port = int(port_text)
    if not (0 if allow_port_zero else 1) <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return value


def _check_ip_hostport(value: str) -> str:
    """A listen address: an IP address (or `localhost`) and a port, 0 allowed."""
    _check_hostport(value, allow_port_zero=True)
    host = value.rpartition(":")[0].strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"listen host must be an IP address, got {host!r}") from None
    return value


class DiscoveryConfig(_Section):
    """How a peer finds its neighbours: mDNS on the LAN, static addresses, DNS SRV names, and peer exchange
    (members' members) beyond them."""

    mdns: bool = Field(True, description="announce and browse `_peer._tcp.local.` with zeroconf")
    cluster: str = Field(
        "default",
        min_length=1,
        max_length=63,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="peers announcing another cluster name over mDNS are ignored (several clusters, one LAN)",
    )
    interfaces: list[str] | None = Field(
        None,
        description="where mDNS runs: IPv4 addresses or interface names (`lo`, `eth0`); null follows `listen`: "
        "loopback → `127.0.0.1`, a specific address → that address's interface, `0.0.0.0` → every non-loopback "
        "IPv4 interface that is up",
    )
    static_peers: list[str] = Field(
        default_factory=list, description="fallback `host:port` list, dialled with a Hello until it answers"
    )
    hello_retry_s: float = Field(2.0, gt=0, description="how often unanswered static peers are tried again")
    peer_exchange: bool = Field(
        True,
        description="peer exchange: each Hello names some of our members, and members named in a member's Hello "
        "are dialled (each joins once its address answers our own Hello); finds peers beyond one subnet from one "
        "seed",
    )
    peer_exchange_max: int = Field(
        16, ge=1, le=64, description="members named in one Hello, and the most read from one (a rotating sample)"
    )
    dns_srv: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="DNS SRV names resolved every `dns_interval_s` (e.g. a Kubernetes headless Service, "
        "`_gossip._tcp.peer.default.svc.cluster.local`); each target's address is dialled with a Hello",
    )
    dns_interval_s: float = Field(10.0, gt=0, description="how often the `dns_srv` names are resolved again")
    dns_nameservers: list[str] = Field(
        default_factory=list,
        description="`ip:port` of the DNS servers asked for `dns_srv`; empty = the system's (`/etc/resolv.conf`)",
    )

    @field_validator("static_peers")
    @classmethod
    def _peers(cls, v: list[str]) -> list[str]:
        return [_check_hostport(p, allow_port_zero=False) for p in v]

    @field_validator("dns_srv")
    @classmethod
    def _srv_names(cls, v: list[str]) -> list[str]:
        for name in v:
            labels = name.rstrip(".").split(".")
            if not name or len(name) > 253 or not all(0 < len(label) <= 63 for label in labels):
                raise ValueError(f"{name!r} is not a DNS name")
        return v

    @field_validator("dns_nameservers")
    @classmethod
    def _nameservers(cls, v: list[str]) -> list[str]:
        for ns in v:
            _check_hostport(ns, allow_port_zero=False)
            try:
                ipaddress.ip_address(ns.rpartition(":")[0].strip("[]"))
            except ValueError:
                raise ValueError(f"a DNS server must be given as ip:port, got {ns!r}") from None
        return v

    @property
    def finds_peers(self) -> bool:
        """Some way to find neighbours is configured (mDNS, static peers or DNS SRV)."""
        return self.mdns or bool(self.static_peers) or bool(self.dns_srv)


_PLUGIN = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$"
PLUGIN_FORM = "package.module:function"
DATA_SOURCES = ("dataset", "path", "factory", "image_folder", "shards_dir")


class DataConfig(_Section):
    """Where this peer's training data comes from (set one source) and which part of it is this peer's."""

    dataset: str | None = Field(
        "digits", description="built-in dataset: `digits` or `mnist1d` (generated locally, never downloaded)"
    )
    path: str | None = Field(
        None, description="your own `.npz` file (arrays `x`, `y`, optional `x_test`, `y_test`); replaces the dataset"
    )
    factory: str | None = Field(
        None,
        pattern=_PLUGIN,
        description="`package.module:function` returning `(train, test)` torch Datasets of `(x, y)` (`test` may "
        "be None); called with `data.kwargs`, plus `partition_index` and `num_partitions` if it declares them",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for `data.factory`")
    image_folder: str | None = Field(
        None,
        description="a directory in torchvision's ImageFolder layout, `root/<class>/<image>`, read with PIL (no "
        "torchvision needed); `data.test_fraction` is held out per class",
    )
    shards_dir: str | None = Field(
        None,
        description="a directory of `.npz` shards (`x`, `y`, optional `x_test`, `y_test`); files added while the "
        "daemon runs join at the next epoch",
    )
    partition: str = Field(
        "iid", description="`iid`, `shards:K` (label-sorted shards, K per peer) or `dirichlet:ALPHA`"
    )
    num_partitions: int = Field(1, ge=1, description="how many peers share the dataset")
    partition_index: int = Field(0, ge=0, description="which partition this peer trains on (0-based)")
    seed: int = Field(0, description="partition and train/test split seed; the same on every peer")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="held-out test split when the data has none")

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str | None) -> str | None:
        from peer.learn.data import DATASET_NAMES  # numpy only; keeps torch out of config loading

        if v is not None and v not in DATASET_NAMES:
            raise ValueError(
                f"unknown dataset {v!r}; valid names: {', '.join(sorted(DATASET_NAMES))} (or set data.path)"
            )
        return v

    @field_validator("partition")
    @classmethod
    def _partition(cls, v: str) -> str:
        from peer.learn.data import parse_partition

        try:
            parse_partition(v)
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("data.partition: ")) from None
        return v

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        others = [k for k in DATA_SOURCES[1:] if getattr(self, k) is not None]
        if len(others) > 1:
            raise ValueError("set only one of " + ", ".join(f"data.{k}" for k in others))
        if others:
            object.__setattr__(self, "dataset", None)
        elif self.dataset is None:
            raise ValueError(
                "set data.dataset (a built-in dataset), data.path (an .npz file), data.factory, data.image_folder "
                "or data.shards_dir"
            )
        if self.partition_index >= self.num_partitions:
            raise ValueError(
                f"data.partition_index {self.partition_index} must be < data.num_partitions {self.num_partitions}"
            )
        return self


MODEL_NAMES = ("logreg", "mlp", "cnn")  # peer.learn.models.MODEL_NAMES; a test keeps the two equal


class ModelConfig(_Section):
    """The model every peer trains (all peers must build the same one)."""

    name: str = Field("mlp", description="`logreg`, `mlp` or `cnn`")
    seed: int = Field(0, description="initialization seed; the same on every peer, so all start from one model")
    factory: str | None = Field(
        None,
        pattern=_PLUGIN,
        description="`package.module:function(input_shape, num_classes, **kwargs)` returning any "
        "`torch.nn.Module`; replaces `model.name`; built under a private RNG seeded with `model.seed`",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="keyword arguments for `model.factory` (they change the schema fingerprint when they change "
        "shapes)",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v not in MODEL_NAMES:
            raise ValueError(f"unknown model {v!r}; valid names: {', '.join(sorted(MODEL_NAMES))}")
        return v


class TrainConfig(_Section):
    """Local training: the optimizer, the schedule and how far training may run ahead of consensus."""

    epochs: float = Field(20, gt=0, description="passes over the local partition")
    batch_size: int = Field(32, ge=1, description="minibatch size")
    lr: float = Field(0.1, gt=0, description="learning rate (with momentum 0.9 and the cosine schedule)")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="`constant`, or `cosine` decay to 0 at the last epoch"
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty")
    optimizer: Literal["sgd", "adam"] = Field(
        "sgd", description="`sgd` or `adam`; optimizer state stays local, only the model is mixed"
    )
    device: str = Field("auto", description="`auto` (cuda, then mps, then cpu), `cpu`, `cuda`, `cuda:N` or `mps`")
    steps_per_round: int = Field(1, ge=1, description="local steps between two merges (T_c)")
    max_steps_without_merge: int | None = Field(
        None,
        ge=0,
        description="local steps a peer may take since it last merged fresh neighbour state before it waits "
        "for one (bounded by `train.pace_max_wait_s`); unset = the algorithm's default (1 for `cdl`, `sgp`, "
        "`dmsgd_async`, `next_pushsum`, 16 for `digest`, 0 for the round-synchronous ones), 0 = never wait",
    )
    pace_max_wait_s: float = Field(
        2.0,
        gt=0,
        description="longest wait for fresh neighbour state; a neighbour that misses it is not waited for until "
        "heard from again",
    )
    finish_together: bool = Field(
        True,
        description="a peer with fewer steps per run (less data) than a neighbour does not run ahead of it in "
        "fractions of the run: it takes no step until the neighbour catches up, so every peer's steps "
        "spread over the whole run (uneven partitions)",
    )
    round_interval_s: float = Field(0.0, ge=0, description="optional minimum seconds per round (off by default)")
    wait_for_neighbors_s: float = Field(
        30.0,
        ge=0,
        description="wait at most this long for the expected members (one per `data.num_partitions`, else a "
        "first neighbour) before training, so that peers booting at different times start together",
    )
    seed: int = Field(0, description="minibatch order seed")
    loss: str = Field(
        "cross_entropy",
        description="`cross_entropy` (accuracy is reported), `mse` (loss is reported), or "
        "`package.module:function(output, target)` returning a scalar tensor",
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes for streamed data (0 = in the trainer)")
    amp: bool = Field(False, description="mixed precision (bfloat16 autocast) for forward passes; the wire stays fp32")
    torch_threads: int = Field(
        0, ge=0, description="intra-op threads for torch; 0 = auto (1 for a small model on the CPU, else torch's)"
    )

    @field_validator("loss")
    @classmethod
    def _loss(cls, v: str) -> str:
        import re

        if v not in ("cross_entropy", "mse") and not re.match(_PLUGIN, v):
            raise ValueError(f"unknown loss {v!r}; use cross_entropy, mse or {PLUGIN_FORM}")
        return v


class GossipConfig(_Section):
    """The gRPC transport: deadlines, retries, message and stream limits."""

    interval_s: float = Field(
        0.0, ge=0, description="minimum seconds between pushes to one neighbour; 0 = as fast as the link carries them"
    )
    rpc_timeout_s: float = Field(5.0, gt=0, description="deadline of unary calls, and the base deadline of a push")
    max_attempts: int = Field(
        3, ge=1, description="tries per push, on `UNAVAILABLE` and `DEADLINE_EXCEEDED` only, with full-jitter backoff"
    )
    backoff_base_s: float = Field(0.5, gt=0, description="retry and circuit-breaker backoff base")
    backoff_cap_s: float = Field(20.0, gt=0, description="retry and circuit-breaker backoff cap")
    breaker_threshold: int = Field(
        3, ge=1, description="consecutive failed pushes before a neighbour is skipped for a growing interval"
    )
    chunk_bytes: int = Field(MIB, ge=16 * 1024, le=4 * MIB, description="stream chunk size (16 KiB to 4 MiB)")
    max_message_bytes: int = Field(
        256 * MIB, ge=1024, description="larger incoming pushes are refused with `RESOURCE_EXHAUSTED`"
    )
    min_bandwidth_bytes_per_s: float = Field(
        1e6, gt=0, description="a push's deadline is `rpc_timeout_s + size / min_bandwidth_bytes_per_s`"
    )
    keepalive_time_s: float = Field(
        30.0, gt=0, description="HTTP/2 keepalive; client and server settings derive from it together"
    )
    keepalive_timeout_s: float = Field(10.0, gt=0, description="keepalive ack timeout")
    reconnect_backoff_max_s: float = Field(
        3.0, gt=0, description="cap of gRPC's reconnect backoff (its default, 120 s, is too slow on edge links)"
    )
    stream_idle_s: float = Field(10.0, gt=0, description="a Push stream silent this long is closed")
    max_streams: int = Field(64, ge=1, description="open Push streams, from all peers together")
    max_streams_per_peer: int = Field(8, ge=1, description="open Push streams from one source host")
    max_fetches: int = Field(2, ge=1, description="FetchState downloads served at once")
    requests_per_s_per_peer: float = Field(50.0, gt=0, description="GetStatus and FetchState calls per source host")
    request_burst: int = Field(100, ge=1, description="... in bursts of at most this many")
    max_concurrent_streams: int = Field(
        128,
        ge=1,
        description="calls one connection may have open at once (HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`); a "
        "client's further calls wait in its own gRPC library and cost us nothing",
    )
    tarpit_delay_s: float = Field(
        4.0,
        ge=0,
        description="refusals to a connection (or source host) that spent its free refusals are answered this much "
        "later (an asyncio wait: no CPU), at most until shortly before the caller's deadline; a client that awaits "
        "its answers then sends far fewer requests. Calls that are not refused are never held. 0 = off",
    )
    tarpit_free_refusals: int = Field(
        10, ge=1, description="refusals per connection per minute answered at once (refilled evenly)"
    )
    tarpit_free_refusals_per_peer: int = Field(
        100, ge=1, description="refusals per source host per minute answered at once (refilled evenly)"
    )
    tarpit_max_held: int = Field(
        1024, ge=0, description="refusals held at once, all connections together; beyond, they are answered at once"
    )
    tarpit_max_held_per_connection: int = Field(
        128, ge=0, description="refusals held at once per connection (at most `max_concurrent_streams` can be open)"
    )
    tarpit_max_held_bytes: int = Field(
        64 * MIB, ge=0, description="requests of held refusals (plus 16 KiB each), all connections together"
    )
    compression: str = Field(
        "none",
        description="delta compression of gossiped states: `none`, `fp16`, `bf16`, `int8` (`int8:B`: blockwise, "
        "one float32 scale per B = 256 values), `int4` (`int4:B`: 4-bit levels, one float32 scale per B = 64 "
        "values), or `topk` (`topk:F`: the fraction F = 0.35 of largest changes, as float16, positions as a "
        "bitmask); all with error feedback; each link sends deltas against what its receiver holds. Every peer of a "
        "cluster must set the same value (Hello refuses the others); not for choco, sgp, next, next_pushsum, digest "
        "or dssfn (docs/reference/compression.md)",
    )

    @field_validator("compression")
    @classmethod
    def _compression(cls, v: str) -> str:
        from peer.algorithms.delta import parse_compression  # torch: only when a config is validated

        parse_compression(v)
        return v.strip()

    @model_validator(mode="after")
    def _check(self) -> GossipConfig:
        if self.backoff_cap_s < self.backoff_base_s:
            raise ValueError("gossip.backoff_cap_s must be >= gossip.backoff_base_s")
        return self


class MembershipConfig(_Section):
    """Who is a member: heartbeats, eviction, the topology's seed, admission limits."""

    heartbeat_interval_s: float = Field(2.0, gt=0, description="probe each member this often (Hello, short deadline)")
    evict_after: int = Field(3, ge=1, description="missed heartbeats before a member is evicted from the topology")
    probe_evicted_max_s: float = Field(10.0, gt=0, description="evicted members are re-probed at most this far apart")
    topology_seed: int = Field(0, description="seed of random-regular graphs; the same on every peer")
    topology_period_s: float = Field(1.0, gt=0, description="how long each graph of a time-varying topology lasts")
    max_peers: int = Field(256, ge=1, description="records in the peer table (evicted peers included)")
    max_pending_hellos: int = Field(64, ge=1, description="admission and duplicate-id checks in flight at once")
    hello_rate_per_s: float = Field(50.0, gt=0, description="Hellos accepted per source host per second")
    hello_burst: int = Field(100, ge=1, description="... in bursts of at most this many")
    dial_hello_rate_per_s: float = Field(
        10.0,
        gt=0,
        description="of those, Hellos that make us dial back (a peer not yet admitted, or a claim that our node id is "
        "taken) per source host per second",
    )
    dial_hello_burst: int = Field(64, ge=1, description="... in bursts of at most this many")


class CatchupConfig(_Section):
    """A starting or rejoining peer whose model is stale fetches a neighbour's model before it trains."""

    enabled: bool = Field(True, description="fetch a neighbour's model first when ours is stale")
    max_state_age_s: float = Field(60.0, ge=0, description="fetch a neighbour's model when ours is older than this")
    max_epochs_behind: float = Field(
        2.0,
        gt=0,
        description="a peer this many epochs behind most of its neighbours catches up with the most advanced one "
        "even if its state is fresh (a straggler rejoins the cluster's progress instead of training alone at the end)",
    )
    wait_s: float = Field(10.0, ge=0, description="how long a starting peer waits for a model to fetch")


class CheckpointConfig(_Section):
    """Checkpoints in `state_dir` (atomic: temp file, fsync, rename)."""

    interval_s: float = Field(10.0, gt=0, description="checkpoint period (also written on graceful shutdown)")


class MetricsConfig(_Section):
    """`state_dir/metrics.jsonl`, snapshots for plots, and the Prometheus endpoint."""

    interval_s: float = Field(1.0, gt=0, description="period of the lines appended to `state_dir/metrics.jsonl`")
    snapshot_interval_s: float = Field(
        0.0, ge=0, description="when > 0, flat-parameter snapshots go to `state_dir/snapshots/` (0 = off)"
    )
    listen: str | None = Field(
        None, description="serve Prometheus metrics on http://HOST:PORT/metrics (port 0: any free port); null = off"
    )
    eval_interval_s: float = Field(
        30.0,
        ge=0,
        description="score the model on the test set this often while it changes, for `peer status`, "
        "metrics.jsonl and Prometheus (0 = off; a worker thread, training never waits)",
    )
    eval_max_samples: int = Field(10_000, gt=0, description="score on at most this many (the first) test samples")

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        return None if v is None else _check_ip_hostport(v)


class SecurityConfig(_Section):
    """Mutual TLS. All three files or none; off loopback they are required unless `insecure` is set."""

    ca_file: str | None = Field(None, description="the cluster CA certificate (`peer certs init DIR`)")
    cert_file: str | None = Field(None, description="this node's certificate (`peer certs issue DIR NODE_ID`)")
    key_file: str | None = Field(None, description="this node's private key")
    insecure: bool = Field(False, description="allow plaintext gRPC off loopback (anyone who can reach the port)")

    @model_validator(mode="after")
    def _check(self) -> SecurityConfig:
        given = {k: getattr(self, k) for k in ("ca_file", "cert_file", "key_file")}
        missing = [f"security.{k}" for k, v in given.items() if not v]
        if 0 < len(missing) < 3:
            raise ValueError(
                "set all of security.ca_file, security.cert_file and security.key_file; missing " + ", ".join(missing)
            )
        return self

    @property
    def tls(self) -> bool:
        return bool(self.ca_file and self.cert_file and self.key_file)


class LogConfig(_Section):
    """Logging on stderr."""

    level: Literal["debug", "info", "warning", "error"] = Field("info", description="the lowest level logged")
    json_lines: bool = Field(False, description="one JSON object per log line on stderr")
    refusal_interval_s: float = Field(
        60.0, gt=0, description="refused input is logged once per source and reason per interval, with a count"
    )
