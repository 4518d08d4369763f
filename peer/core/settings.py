"""The protocol core's settings: who we are, and the policies and timers it runs by (plain values, no config
tree: the daemon derives them from `peer.config.PeerConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peer.core.admission import AdmissionSettings, clip
from peer.core.backoff import BreakerPolicy
from peer.core.catchup import CatchUpSettings
from peer.core.events import PeerInfo
from peer.core.exchange import ExchangeSettings
from peer.core.peers import LivenessPolicy

# A Hello refusal that starts with this says our node id is taken by the daemon that refused.
DUPLICATE_PREFIX = "duplicate node id"


@dataclass(frozen=True)
class Identity:
    """What this daemon says about itself, and what a compatible peer must share with it."""

    node_id: str
    protocol_version: str
    schema_fingerprint: str
    algorithm: str
    incarnation: int
    compression: str = "none"


@dataclass(frozen=True)
class CoreSettings:
    identity: Identity
    topology: str = "ring"
    topology_seed: int = 0
    topology_period_s: float = 1.0  # how long each graph of a time-varying topology lasts (wall clock)
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    liveness: LivenessPolicy = field(default_factory=LivenessPolicy)
    catchup: CatchUpSettings = field(default_factory=CatchUpSettings)
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)
    exchange: ExchangeSettings = field(default_factory=ExchangeSettings)
    cluster: str = "default"
    static_peers: tuple[str, ...] = ()
    hello_retry_s: float = 2.0
    rpc_timeout_s: float = 5.0
    expected_members: int = 1  # one peer per data partition: the cluster a waiting peer waits for
    checkpoint_interval_s: float = 10.0
    metrics_interval_s: float = 1.0


def incompatibility(me: Identity, info: PeerInfo) -> str:
    """Why a peer that says `info` cannot mix with us ("" when it can)."""
    if info.protocol_version != me.protocol_version:
        return f"protocol {clip(repr(info.protocol_version), 80)} != ours {me.protocol_version!r}"
    if info.schema_fingerprint != me.schema_fingerprint:
        theirs = clip(info.schema_fingerprint, 80)
        return (
            f"schema fingerprint {theirs} != ours {me.schema_fingerprint} (a different model.name, model.factory, "
            "model.kwargs, input shape or buffer rule?)"
        )
    if info.algorithm != me.algorithm:
        return f"algorithm {clip(repr(info.algorithm), 80)} != ours {me.algorithm!r}"
    if (info.compression or "none") != me.compression:
        theirs = clip(repr(info.compression or "none"), 80)
        return f"gossip.compression {theirs} != ours {me.compression!r} (every peer must set the same value)"
    return ""
