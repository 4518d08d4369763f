"""Client side of `peer status` and `peer health`: ask a running daemon over gRPC and format the answer."""

from __future__ import annotations

import math
import time
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from grpc_health.v1 import health_pb2, health_pb2_grpc

from peer.errors import SendError
from peer.net.rpc_errors import NO_PROXY, SERVICE_NAME, blocking_call, guarded
from peer.net.tls import TlsFiles, load_material, server_name_options
from peer.v1 import gossip_pb2, gossip_pb2_grpc


def _tls(tls: TlsFiles | None) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
    """Channel credentials and options: mutual TLS with a certificate of the cluster CA, else plaintext."""
    if tls is None:
        return None, [NO_PROXY]
    m = load_material(tls)
    creds = grpc.ssl_channel_credentials(root_certificates=m.ca, private_key=m.key, certificate_chain=m.cert)
    return creds, [NO_PROXY, *server_name_options(None)]


def _aio_channel(address: str, tls: TlsFiles | None) -> grpc.aio.Channel:
    creds, options = _tls(tls)
    if creds is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, creds, options=options)


async def fetch_status(address: str, *, timeout_s: float = 5.0, tls: TlsFiles | None = None) -> dict[str, Any]:
    # A bare channel: `peer status` must answer fast, so it imports neither torch nor the config tree.
    async with _aio_channel(address, tls) as channel:
        stub = gossip_pb2_grpc.GossipServiceStub(channel)
        resp = await guarded(
            f"status of {address}", lambda: stub.GetStatus(gossip_pb2.GetStatusRequest(), timeout=timeout_s)
        )
    return MessageToDict(resp, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def probe_status(address: str, timeout_s: float, tls: TlsFiles | None = None) -> dict[str, Any]:
    """Blocking status query for the testbed's long-lived probe: {"ok": True, "status": {...}} (the dict of
    `fetch_status`) or {"ok": False, "error": "CODE: details"}. Imports stay light (no torch), for fast polling."""
    creds, options = _tls(tls)

    def get_status() -> gossip_pb2.GetStatusResponse:
        if creds is None:
            channel = grpc.insecure_channel(address, options=options)
        else:
            channel = grpc.secure_channel(address, creds, options=options)
        with channel:
            stub = gossip_pb2_grpc.GossipServiceStub(channel)
            return stub.GetStatus(gossip_pb2.GetStatusRequest(), timeout=timeout_s)

    resp, error = blocking_call(get_status)
    if resp is None:
        return {"ok": False, "error": error}
    status = MessageToDict(resp, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return {"ok": True, "status": status}


def _age(ms: Any) -> str:
    if not ms:
        return "never"
    return f"{max(0.0, time.time() - int(ms) / 1000):.1f}s ago"


def waiting_text(s: dict[str, Any]) -> str:
    """What the daemon is doing or waiting for, in words, from its status (`info.waiting_for`, progress, peers)."""
    waiting = s.get("info", {}).get("waiting_for")
    alive = sum(1 for n in s.get("neighbours", []) if n.get("state") == "alive")
    if waiting == "neighbours":
        return (
            f"waiting for neighbours ({alive} alive so far; the expected members, at most "
            "train.wait_for_neighbors_s, then it trains alone)"
        )
    if waiting == "catch-up":
        return "waiting for catch-up: fetching a neighbour's model before training (at most catchup.wait_s)"
    if s.get("training_done"):
        return "training done: consensus-only rounds with its neighbours (stop it when you are done)"
    if waiting is None and int(s.get("step", 0)) == 0:
        return "starting: waiting for neighbours or catch-up before the first step"
    if alive == 0:
        return "training alone: no neighbour alive"
    return f"training with {alive} neighbour(s)"


def evaluation_text(info: dict[str, str]) -> str:
    """The live evaluation's line (`metrics.eval_interval_s`)."""
    if "eval.step" not in info:
        return "not scored yet (metrics.eval_interval_s; needs a test set)"
    acc, loss = float(info["eval.accuracy"]), float(info["eval.loss"])
    score = f"accuracy {acc:.2%}, loss {loss:.4f}" if math.isfinite(acc) else f"test loss {loss:.4f}"
    return f"{score} on {info['eval.samples']} test samples, at step {info['eval.step']}"


def format_status(s: dict[str, Any]) -> str:
    started = int(s["step"]) > 0 or s.get("training_done")
    loss = f"{float(s['loss']):.4f}" if started else "- (no step yet)"
    lines = [
        f"node      {s['node_id']} at {s['address']} ({s['algorithm']}, {s.get('info', {}).get('provenance', '')})",
        f"state     {waiting_text(s)}",
        f"training  step {s['step']}, epoch {float(s['epoch']):.2f}, loss {loss}"
        + (" (done)" if s.get("training_done") else ""),
        f"model     {evaluation_text(s.get('info', {}))}",
        f"traffic   sent {int(s['bytes_sent']):,} B, received {int(s['bytes_received']):,} B, "
        f"send failures {s['send_failures']}, rejected {s['rejected_messages']}",
        f"degree    {s['degree']}",
        "",
        f"{'peer':<20} {'address':<22} {'state':<8} {'last seen':>11} {'fail':>5} {'backoff':>8} {'nbr':>4}",
    ]
    info = s.get("info", {})
    for n in s.get("neighbours", []):
        nbr = info.get(f"neighbour.{n['node_id']}", "")
        lines.append(
            f"{n['node_id']:<20} {n['address']:<22} {n['state']:<8} {_age(n['last_seen_unix_ms']):>11} "
            f"{n['failures']:>5} {float(n['backoff_s']):>7.1f}s {nbr:>4}"
        )
    if not s.get("neighbours"):
        lines.append("(no peers known yet)")
    return "\n".join(lines)


async def check_health(address: str, *, timeout_s: float = 3.0, tls: TlsFiles | None = None) -> tuple[bool, str]:
    """True when the daemon's gossip service reports SERVING."""
    async with _aio_channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            resp = await guarded(
                f"health of {address}",
                lambda: stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout_s),
            )
        except SendError as exc:
            return False, str(exc)
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return resp.status == health_pb2.HealthCheckResponse.SERVING, f"{address}: {name}"
