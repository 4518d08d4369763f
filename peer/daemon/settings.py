"""The protocol core's settings, derived from the config tree (the core itself knows no config)."""

from __future__ import annotations

from dataclasses import replace

from peer.config import PeerConfig
from peer.core.admission import AdmissionSettings
from peer.core.backoff import BreakerPolicy
from peer.core.catchup import CatchUpSettings
from peer.core.peers import LivenessPolicy
from peer.core.settings import CoreSettings, Identity
from peer.net.addresses import StaticPeers


def core_settings(cfg: PeerConfig, identity: Identity, *, mid_run_catchup: bool) -> CoreSettings:
    """The protocol core's part of the config tree."""
    static = StaticPeers(cfg.discovery.static_peers, lambda c: None).candidates()
    return CoreSettings(
        identity=replace(identity, compression=cfg.gossip.compression),
        topology=cfg.topology,
        topology_seed=cfg.membership.topology_seed,
        topology_period_s=cfg.membership.topology_period_s,
        breaker=BreakerPolicy(cfg.gossip.breaker_threshold, cfg.gossip.backoff_base_s, cfg.gossip.backoff_cap_s),
        liveness=LivenessPolicy(
            cfg.membership.heartbeat_interval_s, cfg.membership.evict_after, cfg.membership.probe_evicted_max_s
        ),
        catchup=CatchUpSettings(
            enabled=cfg.catchup.enabled,
            max_state_age_s=cfg.catchup.max_state_age_s,
            max_epochs_behind=cfg.catchup.max_epochs_behind,
            wait_s=cfg.catchup.wait_s,
            mid_run=mid_run_catchup,
            can_fetch=cfg.discovery.mdns or bool(cfg.discovery.static_peers),
        ),
        admission=AdmissionSettings(
            max_peers=cfg.membership.max_peers,
            max_pending=cfg.membership.max_pending_hellos,
            pending_ttl_s=max(30.0, 2 * cfg.gossip.rpc_timeout_s),
            hello_rate_per_s=cfg.membership.hello_rate_per_s,
            hello_burst=cfg.membership.hello_burst,
            log_interval_s=cfg.log.refusal_interval_s,
        ),
        cluster=cfg.discovery.cluster,
        static_peers=tuple(c.address for c in static),
        hello_retry_s=cfg.discovery.hello_retry_s,
        rpc_timeout_s=cfg.gossip.rpc_timeout_s,
        expected_members=cfg.data.num_partitions,
        checkpoint_interval_s=cfg.checkpoint.interval_s,
        metrics_interval_s=cfg.metrics.interval_s,
    )
