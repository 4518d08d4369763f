"""Inputs and effects of the protocol core (`peer.core.gossip.GossipCore`).

Inputs are what happened (a Hello arrived, a push was accepted, a call failed, time passed), each with `now` in
monotonic seconds. Effects are what the shell must do (dial a Hello, hand a payload to the algorithm, start a
catch-up, log a line). Plain frozen dataclasses: no protobuf, gRPC or asyncio types cross this boundary.

`identity` on an input is the peer's authenticated identity (its TLS certificate's node id) when the transport
has one, else None; the core refuses a claim that contradicts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from peer.core.view import NeighbourView

# join: admit the peer at that address; heartbeat: a member's liveness probe; verify: check a claim that our node
# id is in use at that address (the claim counts only if a daemon with our id and another incarnation answers).
Purpose = Literal["join", "heartbeat", "verify"]
Level = Literal["debug", "info", "warning", "error"]


@dataclass(frozen=True)
class KnownPeer:
    """One member a peer names in its Hello (peer exchange): a candidate, never a member by itself."""

    node_id: str
    address: str


@dataclass(frozen=True)
class PeerInfo:
    """What a peer says about itself in a Hello (request or answer), with a sample of its members."""

    node_id: str
    protocol_version: str
    schema_fingerprint: str
    algorithm: str
    degree: int
    address: str
    incarnation: int
    step: int = 0
    epoch: float = 0.0
    known_peers: tuple[KnownPeer, ...] = ()
    compression: str = "none"  # gossip.compression; every member of a cluster must agree on it


@dataclass(frozen=True)
class Progress:
    """This daemon's own training progress, as the training thread last reported it."""

    step: int = 0
    epoch: float = 0.0
    done: bool = False


# --------------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Started:
    """The server is bound and discovery runs. `state_saved_unix_s`: when a resumed checkpoint was written."""

    now: float
    wall: float
    address: str
    progress: Progress
    state_saved_unix_s: float | None = None


@dataclass(frozen=True)
class Tick:
    """Time passed. `wall` (Unix seconds) only places time-varying topologies on a clock shared by all peers."""

    now: float
    wall: float
    progress: Progress


@dataclass(frozen=True)
class CandidateFound:
    """Discovery proposes an address (mDNS, with the node id and cluster it announced; or a static entry)."""

    address: str
    node_id: str | None
    source: str
    now: float
    cluster: str | None = None


@dataclass(frozen=True)
class CandidateGone:
    """A peer said goodbye on mDNS (a clean unregister; a crash never produces this). `address`: where the
    leaving instance served, when known; node ids are only unique within a cluster."""

    node_id: str
    now: float
    address: str | None = None


@dataclass(frozen=True)
class HelloReceived:
    """A peer called our Hello. `transport_peer` is gRPC's `context.peer()` ("ipv4:1.2.3.4:5678")."""

    info: PeerInfo
    transport_peer: str
    now: float
    identity: str | None = None


@dataclass(frozen=True)
class HelloAnswered:
    """Our Hello to `address` was answered. For a heartbeat, `node_id` is the peer we meant to reach."""

    address: str
    purpose: Purpose
    info: PeerInfo
    accepted: bool
    reason: str
    now: float
    node_id: str | None = None
    identity: str | None = None


@dataclass(frozen=True)
class HelloFailed:
    """Our Hello to `address` failed (`code` is the gRPC status name)."""

    address: str
    purpose: Purpose
    code: str
    detail: str
    now: float
    node_id: str | None = None


@dataclass(frozen=True)
class StateReceived:
    """A push passed every check of the codec; the header's routing facts."""

    sender_id: str
    incarnation: int
    degree: int
    address: str
    transport_peer: str
    now: float
    identity: str | None = None


@dataclass(frozen=True)
class SendOk:
    node_id: str
    seq: int
    now: float


@dataclass(frozen=True)
class SendFailed:
    """A push failed after its retries. An empty `detail` logs nothing (an injected outage)."""

    node_id: str
    code: str
    now: float
    detail: str = ""


@dataclass(frozen=True)
class SendDropped:
    """An injected fault lost the push on purpose."""

    node_id: str
    seq: int
    now: float


@dataclass(frozen=True)
class FetchDone:
    """A catch-up download from `node_id` finished: adopted (`ok`) or failed."""

    node_id: str
    ok: bool
    now: float


Input = (
    Started
    | Tick
    | CandidateFound
    | CandidateGone
    | HelloReceived
    | HelloAnswered
    | HelloFailed
    | StateReceived
    | SendOk
    | SendFailed
    | SendDropped
    | FetchDone
)


# -------------------------------------------------------------------------------------------------- effects
@dataclass(frozen=True)
class SayHello:
    """Call `address`'s Hello with our identity; report HelloAnswered or HelloFailed."""

    address: str
    purpose: Purpose
    timeout_s: float
    node_id: str | None = None


@dataclass(frozen=True)
class Reply:
    """The answer to HelloReceived or StateReceived. `status` names the gRPC code of a refusal."""

    accepted: bool
    reason: str = ""
    status: str = "OK"


@dataclass(frozen=True)
class Deliver:
    """Hand the received payload to the algorithm."""

    sender_id: str
    incarnation: int
    degree: int
    now: float


@dataclass(frozen=True)
class ViewChanged:
    """The neighbour view changed. `cluster_known`: the expected number of members (one per data partition)
    is in view, so a training thread told to wait for its neighbours may start."""

    view: NeighbourView
    cluster_known: bool


@dataclass(frozen=True)
class Forget:
    """Drop what the algorithm cached for this peer (it left or restarted)."""

    node_id: str


@dataclass(frozen=True)
class CloseChannel:
    address: str


@dataclass(frozen=True)
class StartCatchUp:
    """Download `node_id`'s model and adopt it with its progress; report FetchDone."""

    node_id: str
    address: str
    step: int
    epoch: float


@dataclass(frozen=True)
class CatchUpDone:
    """No catch-up is pending: the training thread may (go on) train."""

    reason: str


@dataclass(frozen=True)
class RequestCheckpoint:
    pass


@dataclass(frozen=True)
class WriteMetrics:
    pass


@dataclass(frozen=True)
class Fatal:
    """The daemon must stop with this error (another live daemon uses our node id)."""

    message: str


@dataclass(frozen=True)
class Log:
    """A log line. With a `key`, the first one is logged at `level` and repeats at debug level."""

    level: Level
    message: str
    key: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Refused:
    """Remote input was refused and changed nothing: count it under `reason`, and log `message` unless the same
    `source` was refused for the same reason within the log interval."""

    reason: str
    source: str
    message: str


@dataclass(frozen=True)
class ClearLog:
    """The condition behind a keyed Log cleared: warn afresh next time."""

    key: tuple[str, ...]


Effect = (
    SayHello
    | Reply
    | Deliver
    | ViewChanged
    | Forget
    | CloseChannel
    | StartCatchUp
    | CatchUpDone
    | RequestCheckpoint
    | WriteMetrics
    | Fatal
    | Log
    | Refused
    | ClearLog
)
