"""The protocol core's settings, derived from the config tree (the core itself knows no config)."""

from __future__ import annotations

from dataclasses import replace

from peer.algorithms import Algorithm
from peer.config import PeerConfig, TrainConfig
from peer.core.admission import AdmissionSettings
from peer.core.backoff import BreakerPolicy
from peer.core.catchup import CatchUpSettings
from peer.core.exchange import ExchangeSettings
from peer.core.pacing import Pacer, PacingSettings, PooledPacer
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
            can_fetch=cfg.discovery.finds_peers,
        ),
        admission=AdmissionSettings(
            max_peers=cfg.membership.max_peers,
            max_pending=cfg.membership.max_pending_hellos,
            pending_ttl_s=max(30.0, 2 * cfg.gossip.rpc_timeout_s),
            hello_rate_per_s=cfg.membership.hello_rate_per_s,
            hello_burst=cfg.membership.hello_burst,
            dial_rate_per_s=cfg.membership.dial_hello_rate_per_s,
            dial_burst=cfg.membership.dial_hello_burst,
            log_interval_s=cfg.log.refusal_interval_s,
        ),
        exchange=ExchangeSettings(
            enabled=cfg.discovery.peer_exchange,
            max_per_hello=cfg.discovery.peer_exchange_max,
            max_known=4 * cfg.membership.max_peers,
            # A learned address that did not answer is tried again this much later, however often it is named.
            retry_s=5 * max(cfg.discovery.hello_retry_s, cfg.membership.heartbeat_interval_s),
        ),
        cluster=cfg.discovery.cluster,
        static_peers=tuple(c.address for c in static),
        hello_retry_s=cfg.discovery.hello_retry_s,
        rpc_timeout_s=cfg.gossip.rpc_timeout_s,
        expected_members=cfg.data.num_partitions,
        checkpoint_interval_s=cfg.checkpoint.interval_s,
        metrics_interval_s=cfg.metrics.interval_s,
    )


def make_pacer(cfg: TrainConfig, algorithm: Algorithm, budget: int | None = None) -> Pacer:
    """The training thread's pacer: pooled for an algorithm whose fresh state comes from one neighbour at a time."""
    pacer = PooledPacer if algorithm.paced_by_any_neighbour else Pacer
    return pacer(pacing_settings(cfg, algorithm, budget))


def pacing_settings(cfg: TrainConfig, algorithm: Algorithm, budget: int | None = None) -> PacingSettings:
    """The pacer's bound and waits: `train.max_steps_without_merge`, else the algorithm's own default; `budget`:
    our steps per run, for `train.finish_together` (ignored when that is off, and by models the algorithm trains
    itself)."""
    bound = cfg.max_steps_without_merge
    if bound is None:
        bound = algorithm.default_max_steps_without_merge
    return PacingSettings(
        max_steps=bound,
        max_wait_s=cfg.pace_max_wait_s,
        min_wait_s=min(0.05, cfg.pace_max_wait_s),
        start_wait_s=max(cfg.pace_max_wait_s, cfg.wait_for_neighbors_s),
        budget=budget if cfg.finish_together and not algorithm.trains_own_model else None,
    )
