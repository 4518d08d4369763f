"""The daemon's discovery sources, started and stopped together: mDNS on the LAN and DNS SRV names. Both only
propose candidates (through `DiscoveryInputs`); the core decides whom to dial and admits whoever answers. Static
peers and peer exchange need no I/O of their own here: the core dials them.
"""

from __future__ import annotations

import asyncio

from peer import PROTOCOL_VERSION
from peer.config import PeerConfig
from peer.daemon.membership import DiscoveryInputs
from peer.logs import OnceLogger
from peer.net.mdns import MdnsDiscovery


class Discovery:
    def __init__(
        self,
        cfg: PeerConfig,
        inputs: DiscoveryInputs,
        once: OnceLogger,
    ) -> None:
        self.cfg = cfg
        self.inputs = inputs
        self.once = once
        self.mdns: MdnsDiscovery | None = None

    async def start(self, port: int, host: str, interfaces: list[str], fingerprint: str) -> None:
        """Announce ourselves (mDNS) once the server listens on `host:port`."""
        if self.cfg.discovery.mdns:
            self.mdns = MdnsDiscovery(
                node_id=self.cfg.node_id,
                port=port,
                advertise_ip=host,
                interfaces=interfaces,
                protocol_version=PROTOCOL_VERSION,
                schema_fingerprint=fingerprint,
                on_candidate=self.inputs.candidate,
                on_removed=self.inputs.removed,
                extra_txt={"cluster": self.cfg.discovery.cluster},
            )
            await self.mdns.start()

    async def run(self) -> None:
        """Browse and resolve until cancelled."""
        d = self.cfg.discovery
        async with asyncio.TaskGroup() as tg:
            if self.mdns is not None:
                tg.create_task(self.mdns.run())
            if d.dns_srv:
                # Imported here: dnspython is only loaded by daemons that use DNS SRV.
                import dns.exception

                from peer.net.dns import SrvDiscovery, SrvResolver

                try:
                    resolver = SrvResolver(d.dns_nameservers, timeout_s=self.cfg.gossip.rpc_timeout_s)
                except dns.exception.DNSException as exc:  # no /etc/resolv.conf, say
                    self.once.warning(("dns",), "DNS SRV discovery is off: %s", exc)
                    return
                srv = SrvDiscovery(d.dns_srv, d.dns_interval_s, resolver, self.inputs.candidate, self._dns_error)
                tg.create_task(srv.run())

    def _dns_error(self, name: str, reason: str) -> None:
        every = self.cfg.discovery.dns_interval_s
        self.once.warning(("dns", name), "DNS SRV %s: %s (tried again every %.0f s)", name, reason, every)

    async def close(self) -> None:
        """mDNS goodbye first, so neighbours stop dialling us. Idempotent."""
        if self.mdns is not None:
            await self.mdns.close()
