"""One typed configuration tree, validated on load; every error names the file and the field.

YAML file < `--set key.sub=value` overrides. Units are in the names (`interval_s`, `max_message_bytes`). The
sections live in `peer.config_sections`; they are re-exported here.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from peer.algorithms import PARAMS_TYPES, REGISTRY
from peer.algorithms.delta import support as compression_support
from peer.config_sections import (
    DATA_SOURCES,
    MIB,
    MODEL_NAMES,
    PLUGIN_FORM,
    CatchupConfig,
    CheckpointConfig,
    DataConfig,
    DiscoveryConfig,
    GossipConfig,
    LogConfig,
    MembershipConfig,
    MetricsConfig,
    ModelConfig,
    SecurityConfig,
    TrainConfig,
    _check_ip_hostport,
    _Section,
)
from peer.core.faults import FaultsConfig
from peer.core.topology import parse_topology
from peer.errors import ConfigError, UnknownNameError

__all__ = [
    "DATA_SOURCES",
    "MIB",
    "MODEL_NAMES",
    "PLUGIN_FORM",
    "CatchupConfig",
    "CheckpointConfig",
    "DataConfig",
    "DiscoveryConfig",
    "FaultsConfig",
    "GossipConfig",
    "LogConfig",
    "MembershipConfig",
    "MetricsConfig",
    "ModelConfig",
    "PeerConfig",
    "SecurityConfig",
    "TrainConfig",
    "check_security",
    "dump",
    "load",
    "parse_overrides",
    "validate",
]


# A discriminated union over every registered algorithm's parameter block, keyed by `algorithm.name`.
AlgorithmConfig = Annotated[Union[PARAMS_TYPES], Field(discriminator="name")]  # type: ignore[valid-type]  # noqa: UP007


STATE_DIR_DEFAULT = "./state/<node_id>"


class PeerConfig(_Section):
    """The root of the tree: who this peer is, where it listens and keeps its state, and one of each section."""

    node_id: str = Field(
        min_length=1,
        max_length=63,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="the peer's unique name: letters, digits, `.`, `_`, `-`; also its mDNS instance name",
    )
    listen: str = Field(
        "127.0.0.1:0", description="gRPC `host:port`; port 0 picks a free port (reported in the ready line)"
    )
    health_listen: str | None = Field(
        None,
        description="also serve `grpc.health.v1` alone, in plaintext, on this `ip:port` (port 0: any free port), "
        "for probes that cannot show a client certificate (Kubernetes `grpc` probes); null = off",
    )
    state_dir: str = Field(
        "",
        description="checkpoint, `metrics.jsonl`, a copy of the config, `ready.json` while serving, optional "
        "snapshots; unset (or null) = `./state/<node_id>`, so it follows the node id",
        json_schema_extra={"default_doc": STATE_DIR_DEFAULT},
    )
    topology: str = Field(
        "ring",
        description="the graph over the live members: `ring` (by sorted node id), `full`, `random-regular:K` "
        "(seeded), `exponential`, or `one-peer-exponential` (time-varying)",
    )
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

    @field_validator("health_listen")
    @classmethod
    def _health_listen(cls, v: str | None) -> str | None:
        return None if v is None else _check_ip_hostport(v)

    @field_validator("state_dir", mode="before")
    @classmethod
    def _state_dir_null(cls, v: Any) -> Any:
        return "" if v is None else v

    @model_validator(mode="after")
    def _state_dir_follows_node_id(self) -> PeerConfig:
        if not self.state_dir:
            object.__setattr__(self, "state_dir", STATE_DIR_DEFAULT.replace("<node_id>", self.node_id))
        return self

    @model_validator(mode="after")
    def _compression_fits_algorithm(self) -> PeerConfig:
        name: str = self.algorithm.name  # type: ignore[attr-defined]  # every params block has a name
        why = compression_support(name)
        if self.gossip.compression != "none" and why:
            raise ValueError(
                f"gossip.compression {self.gossip.compression!r} is not available with algorithm "
                f"{name!r}: {why}; set gossip.compression: none"
            )
        return self

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


def _yaml_error(exc: yaml.YAMLError) -> str:
    """`not valid YAML at line L, column C: problem (context)`, without PyYAML's `in "<unicode string>"`."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    return f"not valid YAML{where}: {problem}" + (f" ({context})" if context else "")


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
            raise ConfigError(_yaml_error(exc), source=source) from None
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
