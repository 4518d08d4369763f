"""The exception tree of `peer`. Every error the package raises on purpose derives from PeerError.

    PeerError
    ├── ConfigError            invalid configuration; names the field and the file (CLI exit 2)
    │   └── UnknownNameError   unknown dataset / model / algorithm / topology; lists the valid names
    ├── DataError              a dataset or a user data file cannot be loaded or partitioned
    ├── CheckpointError        a checkpoint is missing, corrupt or incompatible (never silently reset)
    ├── StartupError           the daemon cannot start (port in use, duplicate node id, no interface)
    ├── SimulationStalledError `peer simulate`: no round completed for a long time (exit 1)
    └── PayloadError           a received message is rejected; carries the gRPC status name to answer with
        ├── SchemaMismatchError    another fingerprint, algorithm, protocol or encoding, or tensors whose
        │                          names, shapes or dtypes differ from our model's   -> FAILED_PRECONDITION
        ├── PayloadTooLargeError   over the configured size (declared or actual)     -> RESOURCE_EXHAUSTED
        ├── CorruptPayloadError    bad SHA-256, truncated, NaN/Inf, a header that contradicts itself,
        │   │                      bad framing                                       -> INVALID_ARGUMENT
        │   └── IncompleteStreamError  the stream ended before its header or its declared bytes: what a
        │                          sender's cancelled call looks like too (gRPC reports it to the servicer
        │                          as the end of the stream), so it is logged at info level
        ├── IdentityError          a claimed node id that contradicts the caller's certificate
        │                                                                            -> PERMISSION_DENIED
        ├── UndecodableError       bytes that do not parse as the request message    -> INVALID_ARGUMENT
        ├── RateLimitedError       too many requests or open streams from one source -> RESOURCE_EXHAUSTED
        └── StalledStreamError     a Push stream idle too long, or past its deadline -> DEADLINE_EXCEEDED

Transport failures (gRPC status codes on the client side) are mapped in one place, `peer.net.rpc_errors`,
into `SendError`, which is a PeerError too.
"""

from __future__ import annotations


class PeerError(Exception):
    """Base class of every deliberate error in `peer`."""


class ConfigError(PeerError):
    """The configuration is invalid. The message names the file and the field."""

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None) -> None:
        self.source = source
        self.field = field
        prefix = ""
        if source:
            prefix += f"{source}: "
        if field:
            prefix += f"{field}: "
        super().__init__(prefix + message)


class UnknownNameError(ConfigError):
    """A registry lookup failed; the message lists every valid name."""

    def __init__(
        self,
        kind: str,
        name: str,
        valid: list[str] | tuple[str, ...],
        *,
        field: str | None = None,
        source: str | None = None,
    ) -> None:
        self.kind = kind
        self.name = name
        self.valid = sorted(valid)
        super().__init__(f"unknown {kind} {name!r}; valid names: {', '.join(self.valid)}", source=source, field=field)


class DataError(PeerError):
    """A dataset or data file cannot be loaded or partitioned."""


class CheckpointError(PeerError):
    """A checkpoint is missing, corrupt or does not match this configuration."""


class StartupError(PeerError):
    """The daemon cannot start: port in use, duplicate node id, bad interface."""


class SimulationStalledError(PeerError):
    """`peer simulate`: no round completed for a long time; every peer waits for one that never answers."""


class PayloadError(PeerError):
    """A received payload was rejected. `status` is the grpc.StatusCode name to answer with."""

    status = "INVALID_ARGUMENT"


class SchemaMismatchError(PayloadError):
    """The sender's model schema, algorithm or protocol differs from ours."""

    status = "FAILED_PRECONDITION"


class PayloadTooLargeError(PayloadError):
    """The payload (declared or actual) exceeds the configured limit."""

    status = "RESOURCE_EXHAUSTED"


class CorruptPayloadError(PayloadError):
    """Framing, checksum, shape, dtype or finiteness check failed."""

    status = "INVALID_ARGUMENT"


class IncompleteStreamError(CorruptPayloadError):
    """A Push stream ended early. A sender that cancels its call (it shuts down, or closed the channel) looks the
    same to the receiver as one that half-closes a short stream, so this is not evidence of hostile input."""


class IdentityError(PayloadError):
    """The sender claims a node id that its authenticated identity (TLS certificate) contradicts."""

    status = "PERMISSION_DENIED"


class UndecodableError(PayloadError):
    """The request's bytes do not parse as the message the RPC takes."""

    status = "INVALID_ARGUMENT"


class RateLimitedError(PayloadError):
    """Refused before any work: the source sent too many requests, or holds too many open streams."""

    status = "RESOURCE_EXHAUSTED"


class StalledStreamError(PayloadError):
    """A Push stream sent nothing for the idle limit, or outlived the deadline its declared size allows."""

    status = "DEADLINE_EXCEEDED"


class SendError(PeerError):
    """An outgoing RPC failed. `code` is the grpc.StatusCode name; `retryable` says if backoff may retry it."""

    def __init__(self, message: str, *, code: str, retryable: bool) -> None:
        self.code = code
        self.retryable = retryable
        super().__init__(message)
