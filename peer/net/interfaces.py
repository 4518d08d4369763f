"""Local network interfaces: which IPv4 addresses mDNS may run on (ifaddr asks the OS)."""

from __future__ import annotations

import ipaddress

import ifaddr

from peer.errors import ConfigError


def _available_interfaces() -> dict[str, list[str]]:
    """Interface name -> its IPv4 addresses, as the OS reports them (netlink on Linux)."""
    return {
        adapter.name: [ip.ip for ip in adapter.ips if ip.is_IPv4 and isinstance(ip.ip, str)]
        for adapter in ifaddr.get_adapters()
    }


def resolve_interfaces(interfaces: list[str]) -> list[str]:
    """Map each entry (an IPv4 address or an interface name) to IPv4 addresses, in order, without repeats.

    Raises ConfigError(field="discovery.interfaces") listing the available interfaces when an entry is an
    unknown name, a name with no IPv4 address, an address no local interface holds, or an IPv6 address.
    """
    fld = "discovery.interfaces"
    available = _available_interfaces()

    def listing() -> str:
        return ", ".join(f"{name} ({', '.join(ips) or 'no IPv4'})" for name, ips in available.items())

    if not interfaces:
        raise ConfigError(f"no interfaces given; name at least one of: {listing()}", field=fld)
    local_ips = {ip for ips in available.values() for ip in ips}
    resolved: list[str] = []
    for entry in interfaces:
        try:
            addr = ipaddress.ip_address(entry)
        except ValueError:
            addr = None
        if addr is not None:
            if addr.version != 4:
                # zeroconf cannot listen on ::1 and we run it IPv4-only (one A record per peer).
                raise ConfigError(f"{entry!r} is IPv6; only IPv4 is supported; available: {listing()}", field=fld)
            if entry not in local_ips:
                raise ConfigError(f"no local interface has address {entry!r}; available: {listing()}", field=fld)
            ips = [entry]
        elif entry in available:
            ips = available[entry]
            if not ips:
                raise ConfigError(f"interface {entry!r} has no IPv4 address; available: {listing()}", field=fld)
        else:
            raise ConfigError(f"unknown interface {entry!r}; available: {listing()}", field=fld)
        resolved.extend(ip for ip in ips if ip not in resolved)
    return resolved
