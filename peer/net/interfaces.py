"""Local network interfaces: which IPv4 addresses mDNS may run on (ifaddr asks the OS).

`mdns_interfaces` is the default that follows `listen`: loopback stays on 127.0.0.1, a specific address runs mDNS
on that address's interface, and 0.0.0.0 on every non-loopback IPv4 interface that is up.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import socket
import struct

import ifaddr

from peer.errors import ConfigError, StartupError


def _available_interfaces() -> dict[str, list[str]]:
    """Interface name -> its IPv4 addresses, as the OS reports them (netlink on Linux)."""
    return {
        adapter.name: [ip.ip for ip in adapter.ips if ip.is_IPv4 and isinstance(ip.ip, str)]
        for adapter in ifaddr.get_adapters()
    }


_SIOCGIFFLAGS = 0x8913
_IFF_UP = 0x1


def _is_up(name: str) -> bool:
    """Whether the interface is administratively up (Linux SIOCGIFFLAGS; True where that is unavailable)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            raw = fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, struct.pack("256s", name.encode()[:15]))
    except OSError:
        return True
    return bool(struct.unpack_from("H", raw, 16)[0] & _IFF_UP)


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 and "localhost"."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_wildcard_host(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def mdns_interfaces(listen_host: str, configured: list[str] | None) -> list[str]:
    """Where mDNS runs, as IPv4 addresses. `configured` (discovery.interfaces) wins when given; otherwise it
    follows `listen`'s host. Raises ConfigError(field="discovery.interfaces") when nothing fits."""
    if configured is not None:
        return resolve_interfaces(configured)
    if is_loopback_host(listen_host):
        return ["127.0.0.1"]
    if is_wildcard_host(listen_host):
        ips = [
            ip
            for name, addrs in _available_interfaces().items()
            if _is_up(name)
            for ip in addrs
            if not ipaddress.ip_address(ip).is_loopback
        ]
        if not ips:
            raise ConfigError(
                "listen is 0.0.0.0 but no non-loopback IPv4 interface is up; name one in discovery.interfaces",
                field="discovery.interfaces",
            )
        return list(dict.fromkeys(ips))
    return resolve_interfaces([listen_host])


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


def check_ports_free(listens: dict[str, str | None]) -> None:
    """Bind each `host:port` (port 0 and None skipped) with a plain socket and close it at once, so that a port in
    use is a StartupError naming the key before the data and model load, and before gRPC logs its own line."""
    for key, listen in listens.items():
        if listen is None:
            continue
        host, _, port_text = listen.rpartition(":")
        host = "127.0.0.1" if host == "localhost" else host.strip("[]")
        if int(port_text) == 0:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
            try:
                s.bind((host, int(port_text)))
            except OSError as exc:
                why = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
                raise StartupError(f"{key}: cannot listen on {listen}: {why}") from None
