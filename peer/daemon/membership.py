"""Membership I/O: Hello calls the core asks for, and discovery's candidates, turned into core inputs.

The decisions (whom to greet, when to probe, whom to evict, who is compatible) live in
`peer.core.gossip.GossipCore`; this module only converts between protobuf messages and core events and performs
the calls. A heartbeat is a Hello with a short deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from peer.core.events import (
    CandidateFound,
    CandidateGone,
    Effect,
    HelloAnswered,
    HelloFailed,
    Input,
    KnownPeer,
    PeerInfo,
    SayHello,
)
from peer.errors import SendError
from peer.net.addresses import Candidate
from peer.net.client import Client
from peer.v1 import gossip_pb2

Dispatch = Callable[[Input], list[Effect]]

# The most peer-exchange entries read from one Hello (`discovery.peer_exchange_max` is at most this); the core
# reads at most its own bound of these.
MAX_KNOWN_PEERS = 64


def info_of(msg: gossip_pb2.HelloRequest | gossip_pb2.HelloResponse) -> PeerInfo:
    """The core's view of what a Hello (request or answer) says about its sender."""
    return PeerInfo(
        node_id=msg.node_id,
        protocol_version=msg.protocol_version,
        schema_fingerprint=msg.schema_fingerprint,
        algorithm=msg.algorithm,
        degree=msg.degree,
        address=msg.address,
        incarnation=msg.incarnation,
        step=msg.step,
        epoch=msg.epoch,
        known_peers=tuple(KnownPeer(k.node_id, k.address) for k in msg.known_peers[:MAX_KNOWN_PEERS]),
        compression=msg.compression or "none",
    )


def known_peers(me: PeerInfo) -> list[gossip_pb2.KnownPeer]:
    return [gossip_pb2.KnownPeer(node_id=k.node_id, address=k.address) for k in me.known_peers]


def hello_request(me: PeerInfo) -> gossip_pb2.HelloRequest:
    return gossip_pb2.HelloRequest(
        node_id=me.node_id,
        protocol_version=me.protocol_version,
        schema_fingerprint=me.schema_fingerprint,
        algorithm=me.algorithm,
        degree=me.degree,
        address=me.address,
        incarnation=me.incarnation,
        step=me.step,
        epoch=me.epoch,
        known_peers=known_peers(me),
        compression=me.compression,
    )


def hello_response(me: PeerInfo, accepted: bool, reason: str) -> gossip_pb2.HelloResponse:
    return gossip_pb2.HelloResponse(
        node_id=me.node_id,
        protocol_version=me.protocol_version,
        schema_fingerprint=me.schema_fingerprint,
        algorithm=me.algorithm,
        degree=me.degree,
        address=me.address,
        incarnation=me.incarnation,
        step=me.step,
        epoch=me.epoch,
        compression=me.compression,
        accepted=accepted,
        reason=reason,
        known_peers=known_peers(me),
    )


class HelloCaller:
    """Performs the core's SayHello effects and reports each outcome back as an input."""

    def __init__(self, client: Client, me: Callable[[], PeerInfo], dispatch: Dispatch) -> None:
        self.client = client
        self.me = me
        self.dispatch = dispatch

    async def call(self, effect: SayHello) -> None:
        try:
            resp = await self.client.hello(
                effect.address, hello_request(self.me()), timeout_s=effect.timeout_s, node_id=effect.node_id
            )
        except SendError as exc:
            self.dispatch(
                HelloFailed(effect.address, effect.purpose, exc.code, str(exc), time.monotonic(), effect.node_id)
            )
            return
        self.dispatch(
            HelloAnswered(
                effect.address,
                effect.purpose,
                info_of(resp),
                resp.accepted,
                resp.reason,
                time.monotonic(),
                node_id=effect.node_id,
                # With TLS, a call made for a node id only succeeds if the server's certificate names that node.
                identity=effect.node_id if self.client.verifies_server_identity else None,
            )
        )


class DiscoveryInputs:
    """mDNS callbacks (which must only enqueue) as core inputs."""

    def __init__(self, dispatch: Dispatch) -> None:
        self.dispatch = dispatch

    def candidate(self, cand: Candidate) -> None:
        cluster = cand.txt.get("cluster", "default") if cand.source == "mdns" else None
        self.dispatch(CandidateFound(cand.address, cand.node_id, cand.source, time.monotonic(), cluster))

    def removed(self, node_id: str, address: str | None = None) -> None:
        self.dispatch(CandidateGone(node_id, time.monotonic(), address))
