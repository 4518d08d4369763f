"""The Prometheus endpoint (`metrics.listen`): `/metrics` served by prometheus-client's HTTP server thread.

A custom collector turns the daemon's state into metric families at scrape time, in the server's thread: the
counters are read live (under their lock); what only the event loop may read (the peer table, the algorithm's
and the pacer's figures) comes from the last record the loop published (`Exporter.publish`, every
`metrics.interval_s`, the same record that goes to `metrics.jsonl`). The event loop never waits on a scrape.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from peer.config import PeerConfig
from peer.daemon.metrics import Counters
from peer.errors import StartupError

# Peer-table states (peer.core.peers), each exported even at 0 so that dashboards see the series.
NEIGHBOUR_STATES = ("alive", "suspect", "backoff", "evicted")

# Monotonic counters: (Counters field, metric name without `_total`, help).
COUNTERS = (
    ("step", "peer_steps", "Local training steps taken (continues across restarts)."),
    ("rounds", "peer_rounds", "Gossip rounds (mix or step-mode iterations)."),
    ("mixes", "peer_mixes", "Rounds that merged neighbour state."),
    ("bytes_sent", "peer_bytes_sent", "Payload bytes pushed to neighbours."),
    ("bytes_received", "peer_bytes_received", "Payload bytes accepted from neighbours."),
    ("messages_sent", "peer_messages_sent", "Pushes accepted by neighbours."),
    ("messages_received", "peer_messages_received", "Pushes accepted from neighbours."),
    ("send_failures", "peer_send_failures", "Pushes that failed after their retries."),
    ("send_retries", "peer_send_retries", "Push retries on transient errors."),
    (
        "tarpit_held",
        "peer_tarpit_held",
        "Refusals held before they were answered (a client that keeps being refused).",
    ),
    ("dropped_stale", "peer_dropped_stale", "Received states dropped as out of date."),
    ("catchups", "peer_catchups", "Models fetched from a neighbour to catch up."),
    ("evictions", "peer_evictions", "Members evicted after missed heartbeats."),
    ("readmissions", "peer_readmissions", "Evicted members admitted again."),
)
# Pacing figures from `peer.core.pacing.Pacer.metrics`: (record key, metric name, kind, help).
PACING = (
    ("pace_waits", "peer_pace_waits", "counter", "Times training waited for fresh neighbour state."),
    ("pace_wait_s", "peer_pace_wait_seconds", "counter", "Seconds training spent waiting for neighbour state."),
    ("pace_missed_deadlines", "peer_pace_missed_deadlines", "counter", "Waits that ended at train.pace_max_wait_s."),
    ("pace_idle_s", "peer_pace_idle_seconds", "counter", "Seconds held without stepping by train.finish_together."),
    ("pace_gap_s", "peer_pace_gap_seconds", "gauge", "Seconds since the last merge of fresh neighbour state."),
    ("pace_steps_per_s", "peer_pace_steps_per_second", "gauge", "This peer's measured compute rate."),
)


def _num(value: Any) -> float:
    """A record value as a float; None (a NaN written to JSON) stays NaN, which Prometheus accepts."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)):
        return float(value)
    return math.nan


class PeerCollector(Collector):
    """Metric families for one daemon, built at each scrape."""

    def __init__(self, node_id: str, algorithm: str, counters: Counters, started: float) -> None:
        self.node_id = node_id
        self.algorithm = algorithm
        self.counters = counters
        self.started = started
        self._latest: Mapping[str, Any] = {}
        self._states: Mapping[str, int] = {}

    def publish(self, record: Mapping[str, Any], states: Mapping[str, int]) -> None:
        """The loop's latest record and peer-table state counts (swapped atomically; never mutated after)."""
        self._latest, self._states = record, states

    def collect(self) -> Iterator[Metric]:
        c = self.counters.snapshot()
        latest, states = self._latest, self._states
        info = GaugeMetricFamily("peer_info", "This daemon (value 1).", labels=["node_id", "algorithm"])
        info.add_metric([self.node_id, self.algorithm], 1.0)
        yield info
        for key, name, text in COUNTERS:
            yield CounterMetricFamily(name, text, value=float(c[key]))
        rejected = CounterMetricFamily(
            "peer_rejected_messages", "Refused remote input (pushes, Hellos, requests), by reason.", labels=["reason"]
        )
        for reason, n in sorted(c["rejected"].items()):
            rejected.add_metric([reason], float(n))
        yield rejected
        yield GaugeMetricFamily("peer_train_loss", "Training loss of the latest local step.", value=_num(c["loss"]))
        yield GaugeMetricFamily(
            "peer_eval_accuracy",
            "Test accuracy of the live evaluation (NaN before it or for regression).",
            value=_num(c["eval_accuracy"]),
        )
        yield GaugeMetricFamily("peer_eval_loss", "Test loss of the live evaluation.", value=_num(c["eval_loss"]))
        yield GaugeMetricFamily("peer_epoch", "Epochs done over the local partition.", value=float(c["epoch"]))
        yield GaugeMetricFamily("peer_training_done", "1 once train.epochs are done.", value=_num(c["training_done"]))
        yield GaugeMetricFamily(
            "peer_uptime_seconds", "Seconds since this daemon started.", value=time.monotonic() - self.started
        )
        yield self._push_histogram()
        neighbours = GaugeMetricFamily("peer_neighbors", "Peers in the peer table, by state.", labels=["state"])
        for state in sorted({*NEIGHBOUR_STATES, *states}):
            neighbours.add_metric([state], float(states.get(state, 0)))
        yield neighbours
        yield GaugeMetricFamily(
            "peer_topology_neighbors",
            "Neighbours in the current topology.",
            value=float(len(latest.get("neighbours", []))),
        )
        distance = latest.get("algo_neighbour_distance")
        if isinstance(distance, (int, float)):
            yield GaugeMetricFamily(
                "peer_consensus_distance",
                "Local estimate of the consensus distance: mean |theta_j - theta_i| / |theta_i| over the neighbour "
                "models mixed in the last mixing round (cdl).",
                value=float(distance),
            )
        yield from self._pacing_and_extras(latest)

    def _push_histogram(self) -> HistogramMetricFamily:
        h = HistogramMetricFamily(
            "peer_push_duration_seconds", "Duration of one Push RPC to a neighbour, by outcome.", labels=["outcome"]
        )
        for outcome, (cumulative, total) in sorted(self.counters.push_histograms().items()):
            buckets = [("+Inf" if math.isinf(b) else repr(float(b)), n) for b, n in cumulative]
            h.add_metric([outcome], buckets, total)
        return h

    def _pacing_and_extras(self, latest: Mapping[str, Any]) -> Iterator[Metric]:
        for key, name, kind, text in PACING:
            if key not in latest:
                continue
            if kind == "counter":
                yield CounterMetricFamily(name, text, value=_num(latest[key]))
            else:
                yield GaugeMetricFamily(name, text, value=_num(latest[key]))
        faults = CounterMetricFamily(
            "peer_faults_injected", "Injected faults (faults: config), by kind.", labels=["kind"]
        )
        algo = GaugeMetricFamily(
            "peer_algorithm_metric", "The algorithm's own figures (algo_* in metrics.jsonl).", labels=["name"]
        )
        for key, value in sorted(latest.items()):
            if key.startswith("faults_"):
                faults.add_metric([key.removeprefix("faults_")], _num(value))
            elif key.startswith("algo_"):
                algo.add_metric([key.removeprefix("algo_")], _num(value))
        yield faults
        yield algo


class Exporter:
    """The HTTP server thread serving one collector's registry; `close` stops it."""

    def __init__(self, collector: PeerCollector, listen: str) -> None:
        self.collector = collector
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        bind = "127.0.0.1" if host == "localhost" else host
        self._server, self._thread = start_http_server(int(port), bind, registry=self.registry)
        bound = self._server.server_address[1]
        self.address = f"[{bind}]:{bound}" if ":" in bind else f"{bind}:{bound}"

    def publish(self, record: Mapping[str, Any], states: Mapping[str, int]) -> None:
        self.collector.publish(record, states)

    def close(self) -> None:
        """Blocking (up to the server's 0.5 s poll): call it off the event loop."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)


def start_exporter(listen: str, node_id: str, algorithm: str, counters: Counters, started: float) -> Exporter:
    """Bind and serve; OSError (port in use, address not here) propagates for the caller to name the key."""
    return Exporter(PeerCollector(node_id, algorithm, counters, started), listen)


def serve_metrics(cfg: PeerConfig, algorithm: str, counters: Counters, started: float) -> Exporter:
    """Start the Prometheus endpoint of `metrics.listen`; a port that cannot be bound is a StartupError."""
    listen = cfg.metrics.listen
    assert listen is not None
    try:
        return start_exporter(listen, cfg.node_id, algorithm, counters, started)
    except OSError as exc:
        raise StartupError(f"metrics.listen: cannot serve metrics on {listen}: {exc.strerror or exc}") from None
