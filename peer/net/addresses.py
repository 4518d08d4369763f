"""Peer addresses: "host:port" parsing and formatting, the `Candidate` a discovery source proposes, and the
static-address fallback (`StaticPeers`). Pure: no sockets.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from peer.errors import ConfigError


@dataclass(frozen=True)
class Candidate:
    """A peer worth dialling. Nothing here is verified until the gRPC Hello succeeds."""

    node_id: str | None  # None for static peers (unknown until Hello)
    address: str  # "host:port", IPv6 hosts in brackets
    source: Literal["mdns", "static", "dns"]
    protocol_version: str | None = None
    schema_fingerprint: str | None = None
    # The peer's whole TXT record (mDNS only), e.g. a `degree` it re-announces with update_txt.
    # Compared but not hashed, so a Candidate stays hashable; treat it as read-only.
    txt: Mapping[str, str] = field(default_factory=dict, hash=False)


_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_][A-Za-z0-9_-]{0,62})*\.?$")


def parse_address(text: str, *, field: str) -> tuple[str, int]:
    """Parse "host:port" or "[v6]:port" into (host, port); the host comes back without brackets.

    The port must be 1..65535; 0 ("pick a free port") is allowed only for a listen address, i.e. when
    `field` is "listen" or ends in ".listen". Raises ConfigError naming `field`.
    """
    allow_zero = field == "listen" or field.endswith(".listen")
    if not isinstance(text, str) or not text or text != text.strip():
        raise ConfigError(f"expected 'host:port', got {text!r}", field=field)
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ConfigError(f"expected '[ipv6]:port', got {text!r}", field=field)
        host, port_text = text[1:close], text[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{host!r} in {text!r} is not an IPv6 address", field=field) from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"expected 'host:port', got {text!r}", field=field)
        if ":" in host:
            raise ConfigError(f"an IPv6 address needs brackets, e.g. '[{host}]:{port_text}', got {text!r}", field=field)
        if not _HOSTNAME_RE.match(host):
            raise ConfigError(f"{host!r} in {text!r} is not a valid host name or IPv4 address", field=field)
    if not port_text.isascii() or not port_text.isdigit():
        raise ConfigError(f"port {port_text!r} in {text!r} is not a number", field=field)
    port = int(port_text)
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ConfigError(f"port {port} in {text!r} is outside {low}..65535", field=field)
    return host, port


def format_address(host: str, port: int) -> str:
    """Inverse of parse_address: brackets IPv6 hosts."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class StaticPeers:
    """Fallback: yields a Candidate for each configured "host:port" (validated: ConfigError(field=
    "discovery.static_peers") for a malformed or repeated entry). The node id stays None until Hello."""

    def __init__(self, addresses: list[str], on_candidate: Callable[[Candidate], None]) -> None:
        fld = "discovery.static_peers"
        self._candidates: list[Candidate] = []
        seen: set[str] = set()
        for i, text in enumerate(addresses):
            try:
                host, port = parse_address(text, field=fld)
            except ConfigError as exc:
                raise ConfigError(f"entry {i}: {str(exc).removeprefix(f'{fld}: ')}", field=fld) from None
            address = format_address(host, port)
            if address in seen:
                raise ConfigError(f"entry {i}: {text!r} is listed twice", field=fld)
            seen.add(address)
            self._candidates.append(Candidate(node_id=None, address=address, source="static"))
        self._on_candidate = on_candidate

    def candidates(self) -> list[Candidate]:
        return list(self._candidates)

    def propose(self) -> None:
        """Hand every static candidate to on_candidate (the daemon may call this again to retry)."""
        for candidate in self._candidates:
            self._on_candidate(candidate)
