"""DNS SRV discovery: SRV names (a Kubernetes headless Service, a zone an operator keeps) resolved periodically
into dial candidates. Nothing found here is trusted: each address joins once it answers our Hello.

dnspython's asyncio resolver does the lookups on the event loop without blocking it; every lookup has a deadline
(`timeout_s`). The A/AAAA records of the SRV targets come from the answer's additional section when the server
sends them (Kubernetes' CoreDNS does), else from one lookup per target.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from peer.net.addresses import Candidate, format_address

log = logging.getLogger(__name__)

MAX_TARGETS = 256  # SRV records used per name and lookup (the peer table is bounded anyway)


class SrvResolver:
    """Resolves SRV names to "ip:port" candidates with the given DNS servers (`ip:port`; none = the system's)."""

    def __init__(self, nameservers: list[str], timeout_s: float = 5.0) -> None:
        """Raises dns.exception.DNSException when there are no servers given and no system configuration."""
        self.resolver = dns.asyncresolver.Resolver(configure=not nameservers)
        if nameservers:
            servers: list[str | dns.nameserver.Nameserver] = []
            for ns in nameservers:
                host, _, port = ns.rpartition(":")
                servers.append(dns.nameserver.Do53Nameserver(host.strip("[]"), int(port)))
            self.resolver.nameservers = servers
        self.resolver.lifetime = timeout_s
        self.resolver.cache = None  # re-resolving is the point: a pod that moved has a new address

    async def resolve(self, name: str) -> list[Candidate]:
        """The candidates `name`'s SRV records point at, ordered by priority then weight (heaviest first).
        Raises dns.exception.DNSException when the name does not resolve."""
        answer = await self.resolver.resolve(name, "SRV", search=False)
        glue: dict[dns.name.Name, list[str]] = {}
        if answer.response is not None:
            for rrset in answer.response.additional:
                if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                    glue.setdefault(rrset.name, []).extend(r.address for r in rrset)
        records = sorted(answer, key=lambda r: (r.priority, -r.weight, r.target.to_text(), r.port))
        out: list[Candidate] = []
        seen: set[str] = set()
        for srv in records[:MAX_TARGETS]:
            if srv.target == dns.name.root:
                continue  # "." says the service is decidedly not there
            for ip in glue.get(srv.target) or await self._addresses(srv.target):
                address = format_address(ip, srv.port)
                if address not in seen:
                    seen.add(address)
                    out.append(Candidate(node_id=None, address=address, source="dns"))
        return out

    async def _addresses(self, target: dns.name.Name) -> list[str]:
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self.resolver.resolve(target, rdtype, search=False)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            return [r.address for r in answer]
        return []


class SrvDiscovery:
    """Resolves every name each `interval_s` and proposes what it finds; a name that fails is reported through
    `on_error(name, reason)` and tried again next time."""

    def __init__(
        self,
        names: list[str],
        interval_s: float,
        resolver: SrvResolver,
        on_candidate: Callable[[Candidate], None],
        on_error: Callable[[str, str], None],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.names = names
        self.interval_s = interval_s
        self.resolver = resolver
        self.on_candidate = on_candidate
        self.on_error = on_error
        self.sleep = sleep
        self.rounds = 0

    async def resolve_once(self) -> list[Candidate]:
        found: list[Candidate] = []
        for name in self.names:
            try:
                candidates = await self.resolver.resolve(name)
            except (dns.exception.DNSException, OSError) as exc:
                self.on_error(name, f"{type(exc).__name__}: {exc}")
                continue
            if not candidates:
                self.on_error(name, "no SRV target with an address")
            found += candidates
        for c in found:
            self.on_candidate(c)
        self.rounds += 1
        return found

    async def run(self) -> None:
        """Resolve now and every `interval_s` until cancelled (or until `sleep` returns at a stop)."""
        while True:
            await self.resolve_once()
            await self.sleep(self.interval_s)
