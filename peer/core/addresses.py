"""Which address to dial back a peer that called us (pure string logic)."""

from __future__ import annotations


def reachable_address(advertised: str, peer: str) -> str:
    """The address to dial a peer that said Hello: its advertised one, unless that names an unspecified or
    loopback host while the call came from elsewhere; then the caller's IP with the advertised port.

    `peer` is gRPC's `context.peer()`, e.g. "ipv4:198.18.0.2:40312"."""
    host, _, port = advertised.rpartition(":")
    kind, _, rest = peer.partition(":")
    if kind != "ipv4" or not port:
        return advertised
    caller_ip = rest.rpartition(":")[0]
    if host in ("0.0.0.0", "", "localhost") or (host.startswith("127.") and not caller_ip.startswith("127.")):
        return f"{caller_ip}:{port}"
    return advertised
