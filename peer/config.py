"""One typed configuration tree, validated on load; every error names the file and the field.

YAML file < `--set key.sub=value` overrides. Units are in the names (`interval_s`, `max_message_bytes`).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from peer.algorithms import PARAMS_TYPES, REGISTRY
from peer.core.faults import FaultsConfig
from peer.core.topology import parse_topology
from peer.errors import ConfigError, UnknownNameError

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
    mdns: bool = True
    cluster: str = Field("default", min_length=1, max_length=63, pattern=r"^[A-Za-z0-9_.-]+$")
    # None: follow `listen` (loopback -> 127.0.0.1; an address -> its interface; 0.0.0.0 -> every interface up).
    interfaces: list[str] | None = None
    static_peers: list[str] = Field(default_factory=list)
    hello_retry_s: float = Field(2.0, gt=0)

    @field_validator("static_peers")
    @classmethod
    def _peers(cls, v: list[str]) -> list[str]:
        return [_check_hostport(p, allow_port_zero=False) for p in v]


_PLUGIN = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$"
PLUGIN_FORM = "package.module:function"
DATA_SOURCES = ("dataset", "path", "factory", "image_folder", "shards_dir")


class DataConfig(_Section):
    dataset: str | None = "digits"
    path: str | None = None
    factory: str | None = Field(
        None, pattern=_PLUGIN, description="package.module:function returning (train, test) torch Datasets"
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for data.factory")
    image_folder: str | None = Field(None, description="a directory in the ImageFolder layout: root/<class>/<image>")
    shards_dir: str | None = Field(None, description="a directory of .npz shards (x, y); new files join while running")
    partition: str = "iid"
    num_partitions: int = Field(1, ge=1)
    partition_index: int = Field(0, ge=0)
    seed: int = 0
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)

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
    name: str = "mlp"
    seed: int = 0
    factory: str | None = Field(
        None,
        pattern=_PLUGIN,
        description="package.module:function(input_shape, num_classes, **kwargs) returning a torch.nn.Module; "
        "replaces model.name",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for model.factory")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v not in MODEL_NAMES:
            raise ValueError(f"unknown model {v!r}; valid names: {', '.join(sorted(MODEL_NAMES))}")
        return v


class TrainConfig(_Section):
    epochs: float = Field(20, gt=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.1, gt=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    device: str = "auto"
    steps_per_round: int = Field(1, ge=1)
    max_steps_without_merge: int | None = Field(
        None,
        ge=0,
        description="local steps a peer may take since it last merged fresh neighbour state before it waits "
        "for one (bounded by pace_max_wait_s); unset = the algorithm's default, 0 = never wait",
    )
    pace_max_wait_s: float = Field(
        2.0, gt=0, description="longest wait for fresh neighbour state once max_steps_without_merge is reached"
    )
    round_interval_s: float = Field(0.0, ge=0, description="optional minimum seconds per round (off by default)")
    wait_for_neighbors_s: float = Field(
        30.0, ge=0, description="bounded wait for the expected members (data.num_partitions) or a first neighbour"
    )
    seed: int = 0
    loss: str = Field("cross_entropy", description="cross_entropy, mse, or package.module:function(output, target)")
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
    interval_s: float = Field(
        0.0, ge=0, description="minimum seconds between pushes to one neighbour; 0 = as fast as the link carries them"
    )
    rpc_timeout_s: float = Field(5.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    backoff_base_s: float = Field(0.5, gt=0)
    backoff_cap_s: float = Field(20.0, gt=0)
    breaker_threshold: int = Field(3, ge=1)
    chunk_bytes: int = Field(MIB, ge=16 * 1024, le=4 * MIB)
    max_message_bytes: int = Field(256 * MIB, ge=1024)
    min_bandwidth_bytes_per_s: float = Field(1e6, gt=0)
    keepalive_time_s: float = Field(30.0, gt=0)
    keepalive_timeout_s: float = Field(10.0, gt=0)
    reconnect_backoff_max_s: float = Field(3.0, gt=0)
    stream_idle_s: float = Field(10.0, gt=0, description="a Push stream silent this long is closed")
    max_streams: int = Field(64, ge=1, description="open Push streams, from all peers together")
    max_streams_per_peer: int = Field(8, ge=1, description="open Push streams from one source host")
    max_fetches: int = Field(2, ge=1, description="FetchState downloads served at once")
    requests_per_s_per_peer: float = Field(50.0, gt=0, description="GetStatus and FetchState calls per source host")
    request_burst: int = Field(100, ge=1, description="... in bursts of at most this many")

    @model_validator(mode="after")
    def _check(self) -> GossipConfig:
        if self.backoff_cap_s < self.backoff_base_s:
            raise ValueError("gossip.backoff_cap_s must be >= gossip.backoff_base_s")
        return self


class MembershipConfig(_Section):
    heartbeat_interval_s: float = Field(2.0, gt=0, description="probe each member this often (Hello, short deadline)")
    evict_after: int = Field(3, ge=1, description="missed heartbeats before a member is evicted from the topology")
    probe_evicted_max_s: float = Field(10.0, gt=0, description="evicted members are re-probed at most this far apart")
    topology_seed: int = Field(0, description="seed of random-regular graphs; the same on every peer")
    topology_period_s: float = Field(1.0, gt=0, description="how long each graph of a time-varying topology lasts")
    max_peers: int = Field(256, ge=1, description="records in the peer table (evicted peers included)")
    max_pending_hellos: int = Field(64, ge=1, description="admission and duplicate-id checks in flight at once")
    hello_rate_per_s: float = Field(50.0, gt=0, description="Hellos accepted per source host per second")
    hello_burst: int = Field(100, ge=1, description="... in bursts of at most this many")


class CatchupConfig(_Section):
    enabled: bool = True
    max_state_age_s: float = Field(60.0, ge=0, description="fetch a neighbour's model when ours is older than this")
    max_epochs_behind: float = Field(
        2.0, gt=0, description="a neighbour this many epochs ahead is caught up with even if our state is fresh"
    )
    wait_s: float = Field(10.0, ge=0, description="how long a starting peer waits for a model to fetch")


class CheckpointConfig(_Section):
    interval_s: float = Field(10.0, gt=0)


class MetricsConfig(_Section):
    interval_s: float = Field(1.0, gt=0)
    snapshot_interval_s: float = Field(0.0, ge=0, description="write flat-parameter snapshots (0 = off)")
    listen: str | None = Field(
        None, description="serve Prometheus metrics on http://HOST:PORT/metrics (port 0: any free port); null = off"
    )

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
    level: Literal["debug", "info", "warning", "error"] = "info"
    json_lines: bool = False
    refusal_interval_s: float = Field(
        60.0, gt=0, description="refused input is logged once per source and reason per interval, with a count"
    )


# A discriminated union over every registered algorithm's parameter block, keyed by `algorithm.name`.
AlgorithmConfig = Annotated[Union[PARAMS_TYPES], Field(discriminator="name")]  # type: ignore[valid-type]  # noqa: UP007


class PeerConfig(_Section):
    node_id: str = Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    listen: str = "127.0.0.1:0"
    state_dir: str
    topology: str = "ring"
    discovery: DiscoveryConfig = DiscoveryConfig()
    algorithm: AlgorithmConfig = Field(default_factory=lambda: REGISTRY["cdl"].params_type(name="cdl"))
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    gossip: GossipConfig = GossipConfig()
    membership: MembershipConfig = MembershipConfig()
    catchup: CatchupConfig = CatchupConfig()
    faults: FaultsConfig = FaultsConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    metrics: MetricsConfig = MetricsConfig()
    security: SecurityConfig = SecurityConfig()
    log: LogConfig = LogConfig()

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        return _check_ip_hostport(v)

    @field_validator("topology")
    @classmethod
    def _topology(cls, v: str) -> str:
        try:
            return str(parse_topology(v))
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("topology: ")) from None

    @property
    def listen_host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def listen_port(self) -> int:
        return int(self.listen.rpartition(":")[2])


def check_security(cfg: PeerConfig, source: str | None = None) -> None:
    """Off loopback, mutual TLS is required unless security.insecure is set (ConfigError naming the keys)."""
    host = cfg.listen_host
    loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    if not loopback and not cfg.security.tls and not cfg.security.insecure:
        raise ConfigError(
            f"listen {cfg.listen} is not loopback, so mutual TLS is required: create certificates with "
            "`peer certs init DIR` and `peer certs issue DIR NODE_ID`, then set security.ca_file, "
            "security.cert_file and security.key_file; or set security.insecure: true to accept anyone who can "
            "reach the port",
            source=source,
            field="security.ca_file",
        )


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted}: {part} is not a section", source=source, field=dotted)
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`key.sub=value` strings; values are parsed as YAML scalars (so `true`, `3`, `[a, b]` work)."""
    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key.sub=value, got {item!r}", source="--set")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"cannot parse value {raw!r}: {exc}", source="--set", field=key) from None
        out.append((key.strip(), value))
    return out


def _format_errors(exc: ValidationError) -> tuple[str, str]:
    lines, first = [], ""
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        # Discriminated unions add the tag to the path ("algorithm.cdl.epsilon"): drop it for the user.
        parts = loc.split(".")
        if len(parts) > 1 and parts[0] == "algorithm" and parts[1] in REGISTRY:
            loc = ".".join([parts[0], *parts[2:]])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `peer init-config` lists every field)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"{loc or '<root>'}: {msg}")
        first = first or loc
    return "; ".join(lines), first


def validate(raw: dict[str, Any], *, source: str) -> PeerConfig:
    """Validate a raw tree (from YAML plus overrides). Raises ConfigError naming `source` and the field."""
    if not isinstance(raw, dict):
        raise ConfigError("the config must be a mapping of sections", source=source)
    algo = raw.get("algorithm")
    if isinstance(algo, dict):
        name = algo.setdefault("name", "cdl")
        if name not in REGISTRY:
            raise UnknownNameError("algorithm", str(name), list(REGISTRY), field="algorithm.name", source=source)
    try:
        cfg = PeerConfig.model_validate(raw)
    except ValidationError as exc:
        text, field = _format_errors(exc)
        err = ConfigError(text, source=source)
        err.field = field
        raise err from None
    check_security(cfg, source)
    return cfg


def load(path: str | Path | None, overrides: list[str] | None = None) -> PeerConfig:
    """Read a YAML file (or start empty), apply `--set` overrides, validate."""
    source = str(path) if path else "<defaults>"
    raw: Any = {}
    if path:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError("config file not found", source=source) from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file: {exc.strerror}", source=source) from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"not valid YAML: {exc}", source=source) from None
        if raw is None:
            raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("the config must be a YAML mapping of sections", source=source)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value, source)
    if overrides:
        source += " (with --set overrides)"
    return validate(raw, source=source)


def dump(cfg: PeerConfig) -> str:
    """The config as YAML, for the copy kept in `state_dir` (so `peer eval` can rebuild the data and model)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
