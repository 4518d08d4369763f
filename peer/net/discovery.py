"""Peer discovery: register and browse `_peer._tcp.local.` over mDNS, plus a static-address fallback.

Discovery only *proposes* candidates; the daemon verifies each one with a gRPC Hello. mDNS is not a liveness
signal: a crashed peer's records linger in other caches for at least 1125 s, so eviction is the job of the
health/heartbeat layer, and `on_removed` only reports peers that said goodbye cleanly.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import ifaddr
from zeroconf import (
    BadTypeInNameException,
    DNSQuestionType,
    IPVersion,
    NonUniqueNameException,
    NotRunningException,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from peer.errors import ConfigError, StartupError

SERVICE_TYPE = "_peer._tcp.local."
RESOLVE_TIMEOUT_MS = 3000
# TXT keys written by every peer; extra_txt may not override them.
RESERVED_TXT_KEYS = frozenset({"node_id", "proto", "schema", "port"})

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """A peer worth dialling. Nothing here is verified until the gRPC Hello succeeds."""

    node_id: str | None  # None for static peers (unknown until Hello)
    address: str  # "host:port", IPv6 hosts in brackets
    source: Literal["mdns", "static"]
    protocol_version: str | None = None
    schema_fingerprint: str | None = None
    # The peer's whole TXT record (mDNS only), e.g. a `degree` it re-announces with update_txt.
    # Compared but not hashed, so a Candidate stays hashable; treat it as read-only.
    txt: Mapping[str, str] = field(default_factory=dict, hash=False)


# ---------------------------------------------------------------------------------------------------------
# Address and interface parsing (pure)
# ---------------------------------------------------------------------------------------------------------

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


def _validate_txt(txt: Mapping[str, str]) -> None:
    for key, value in txt.items():
        if key in RESERVED_TXT_KEYS:
            raise ValueError(f"TXT key {key!r} is reserved")
        # RFC 6763 §6.1: each key=value string is at most 255 bytes.
        if not key or "=" in key or len(f"{key}={value}".encode()) > 255:
            raise ValueError(f"bad TXT entry {key!r}={value!r} (empty key, '=' in key, or over 255 bytes)")


# ---------------------------------------------------------------------------------------------------------
# Static peers
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# mDNS
# ---------------------------------------------------------------------------------------------------------


class MdnsDiscovery:
    """Registers this node as `{node_id}.{service_type}` and proposes compatible peers found by browsing.

    Lifecycle: `await start()` (registration finished, browser running), then run `run()` as a task until it
    is cancelled, then `await close()` (goodbye packets). Callbacks run in the event loop and must not block.
    """

    def __init__(
        self,
        *,
        node_id: str,
        port: int,
        advertise_ip: str,
        interfaces: list[str],
        protocol_version: str,
        schema_fingerprint: str,
        on_candidate: Callable[[Candidate], None],
        on_removed: Callable[[str], None],
        service_type: str = SERVICE_TYPE,
        extra_txt: dict[str, str] | None = None,
        duplicate_check_ms: int = 2000,
    ) -> None:
        if not node_id or len(node_id.encode()) > 63:
            # The instance name is one DNS label.
            raise ConfigError(f"{node_id!r} must be 1..63 bytes to serve as an mDNS instance name", field="node_id")
        try:
            ipaddress.IPv4Address(advertise_ip)
        except ValueError:
            raise ConfigError(f"{advertise_ip!r} is not an IPv4 address", field="discovery.advertise_ip") from None
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is not a bound port (announce the real port, not 0)")
        extra = dict(extra_txt or {})
        _validate_txt(extra)
        self.node_id = node_id
        self.port = port
        self.advertise_ip = advertise_ip
        self.interfaces = list(interfaces)
        self.protocol_version = protocol_version
        self.schema_fingerprint = schema_fingerprint
        self.service_type = service_type
        self.instance_name = f"{node_id}.{service_type}"
        self._on_candidate = on_candidate
        self._on_removed = on_removed
        self._extra_txt = extra
        self._duplicate_check_ms = duplicate_check_ms
        self._log = logging.LoggerAdapter(logger, {"node_id": node_id})

        self._loop: asyncio.AbstractEventLoop | None = None
        self._aiozc: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._registered = False
        self._started = False
        self._closed = False
        self._events: asyncio.Queue[tuple[str, ServiceStateChange]] = asyncio.Queue()
        # Bumped on every browser event for a name, so that a slow resolve which a later Updated/Removed
        # overtook is dropped.
        self._generation: dict[str, int] = {}
        self._proposed: dict[str, Candidate] = {}  # instance name -> last candidate handed out
        self._logged_ignores: set[tuple[str, str]] = set()

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Register (probing for a duplicate node id first) and start browsing.

        Raises ConfigError for bad interfaces and StartupError when another live peer owns our node id.
        """
        if self._started:
            raise RuntimeError("MdnsDiscovery.start() called twice")
        self._started = True
        ips = resolve_interfaces(self.interfaces)
        self._loop = asyncio.get_running_loop()
        try:
            # Created inside the running loop so zeroconf uses this loop (not a thread of its own) and fires
            # AsyncServiceBrowser handlers in it.
            try:
                self._aiozc = AsyncZeroconf(interfaces=ips, ip_version=IPVersion.V4Only)
            except OSError as exc:
                raise StartupError(f"cannot open mDNS sockets on {ips}: {exc}") from exc
            # Browse from the start (events wait in the queue until run() consumes them), so peers are already
            # known when start() returns. QM questions: the answers come by multicast, which reaches every
            # responder on this host; QU answers come by unicast and reach only one of them (see
            # _check_name_is_free).
            self._browser = AsyncServiceBrowser(
                self._aiozc.zeroconf,
                [self.service_type],
                handlers=[self._on_service_state_change],
                question_type=DNSQuestionType.QM,
            )
            self._info = self._service_info()
            await self._check_name_is_free(self._aiozc.zeroconf, self._info)
            # Probing is done (above), so register as a "cooperating responder", which skips zeroconf's own
            # probes. The outer await adds the service to the registry and returns the task that sends the
            # announcements.
            announce = await self._aiozc.async_register_service(self._info, cooperating_responders=True)
            self._registered = True
            # Awaiting the task too means start() returns only once we are announced, and no close() can race
            # the announcements.
            await announce
        except BaseException:
            await self.close()
            raise
        self._log.info(
            "mDNS registered %s at %s:%d on %s",
            self.instance_name,
            self.advertise_ip,
            self.port,
            ", ".join(ips),
        )

    async def _check_name_is_free(self, zc: Zeroconf, info: AsyncServiceInfo) -> None:
        """Fail with StartupError if a live peer already owns our instance name (i.e. our node id).

        zeroconf's probing alone is not reliable when several responders share a host (tests, or two daemons
        on one machine): the defender answers a probe by *unicast* to port 5353, and the kernel hands a
        unicast datagram to just one of the SO_REUSEPORT sockets bound there, often not ours. So, while
        probing (our registry is still empty, so nothing we receive can be our own echo), we also ask for our
        own SRV/TXT with multicast-response (QM) questions: any answer comes from another live owner. A
        responder holds its answer back about a second when it multicast the same records within the last
        second (RFC 6762 §6, §14; measured: answers came 1.4-1.5 s after the query when the owner had just
        finished announcing), hence the 2 s window. Crashed peers' records in other caches never answer: only
        owners respond, so a restart after a crash is not mistaken for a duplicate.
        """
        await zc.async_wait_for_start()

        async def probe() -> bool:
            try:
                await zc.async_check_service(info, allow_name_change=False)
            except NonUniqueNameException:
                return True
            return False

        async def lookup() -> bool:
            other = AsyncServiceInfo(self.service_type, self.instance_name)
            return await other.async_request(zc, self._duplicate_check_ms, question_type=DNSQuestionType.QM)

        try:
            async with asyncio.TaskGroup() as tg:
                probed = tg.create_task(probe())
                looked = tg.create_task(lookup())
        except BaseExceptionGroup as group:
            # Unexpected (e.g. an OSError from the sockets): re-raise it bare, as if there were one task.
            raise group.exceptions[0] from None
        if probed.result() or looked.result():
            raise StartupError(
                f"another live peer already uses node_id {self.node_id!r} on the network "
                f"(mDNS name {self.instance_name!r} is taken); give this node a unique node_id"
            )

    async def update_txt(self, extra: dict[str, str]) -> None:
        """Replace the extra TXT entries (e.g. {"degree": "3"}) and re-announce; returns once announced."""
        if not self._registered or self._aiozc is None:
            raise RuntimeError("update_txt() needs a started, not closed, MdnsDiscovery")
        extra = dict(extra)
        _validate_txt(extra)
        self._extra_txt = extra
        self._info = self._service_info()
        await (await self._aiozc.async_update_service(self._info))

    async def close(self) -> None:
        """Say goodbye (browsers see Removed ~0.3 s later), stop browsing, close sockets. Idempotent, and safe
        after a start() that failed half-way."""
        if self._closed:
            return
        self._closed = True
        aiozc, self._aiozc = self._aiozc, None
        browser, self._browser = self._browser, None
        info, registered, self._registered = self._info, self._registered, False
        if aiozc is None:
            return
        try:
            if registered and info is not None:
                # Await the returned task as well: otherwise async_close() can shut the sockets before the
                # goodbye packets leave, and the other peers never see Removed.
                await (await aiozc.async_unregister_service(info))
            if browser is not None:
                await browser.async_cancel()
        finally:
            await aiozc.async_close()
            self._log.debug("mDNS closed")

    # -- browsing -------------------------------------------------------------------------------------------

    def _on_service_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        """Browser handler: only enqueues. AsyncServiceBrowser fires it in the event loop, but stay correct if
        it ever comes from zeroconf's own thread."""
        item = (name, state_change)
        loop = self._loop
        assert loop is not None
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._events.put_nowait(item)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(self._events.put_nowait, item)

    async def run(self) -> None:
        """Consume browser events until cancelled; each resolve runs in a task owned by a TaskGroup."""
        if not self._started:
            raise RuntimeError("call start() before run()")
        async with asyncio.TaskGroup() as tg:
            while True:
                name, change = await self._events.get()
                if name == self.instance_name or not name.endswith("." + self.service_type):
                    continue  # ourselves, or not a name of our type
                gen = self._generation[name] = self._generation.get(name, 0) + 1
                if change is ServiceStateChange.Removed:
                    self._forget(name, "said goodbye")
                else:
                    tg.create_task(self._resolve(name, gen), name=f"mdns-resolve {name}")

    def _forget(self, name: str, why: str) -> None:
        if (candidate := self._proposed.pop(name, None)) is not None:
            assert candidate.node_id is not None
            self._log.info("mDNS: peer %s at %s %s", candidate.node_id, candidate.address, why)
            self._on_removed(candidate.node_id)

    async def _resolve(self, name: str, gen: int) -> None:
        aiozc = self._aiozc
        if aiozc is None:
            return  # closed meanwhile
        try:
            info = AsyncServiceInfo(self.service_type, name)
            found = await info.async_request(aiozc.zeroconf, RESOLVE_TIMEOUT_MS, question_type=DNSQuestionType.QM)
        except BadTypeInNameException:
            self._log.debug("mDNS: skipping malformed service name %r", name)
            return
        except NotRunningException:
            return  # close() ran while we waited
        if self._generation.get(name) != gen:
            return  # a newer event for this name (Updated or Removed) overtook this resolve
        instance = name[: -len(self.service_type) - 1]
        if not found:
            self._log.debug("mDNS: no answer resolving %s within %d ms", instance, RESOLVE_TIMEOUT_MS)
            return
        txt = {k: v for k, v in info.decoded_properties.items() if v is not None}
        ipv4 = info.parsed_scoped_addresses(IPVersion.V4Only)
        where = f"{ipv4[0]}:{info.port}" if ipv4 and info.port else "(no address)"
        reason = self._incompatibility(instance, txt, bool(ipv4 and info.port))
        if reason is not None:
            key, message = reason
            if (instance, key) not in self._logged_ignores:
                self._logged_ignores.add((instance, key))
                self._log.warning("ignoring peer %s at %s: %s", instance, where, message)
            self._forget(name, "is no longer compatible")
            return
        candidate = Candidate(
            node_id=instance,
            address=where,
            source="mdns",
            protocol_version=txt["proto"],
            schema_fingerprint=txt["schema"],
            txt=txt,
        )
        if self._proposed.get(name) == candidate:
            return  # nothing changed (e.g. a re-announcement)
        self._proposed[name] = candidate
        self._log.debug("mDNS candidate %s at %s", instance, where)
        self._on_candidate(candidate)

    def _incompatibility(self, instance: str, txt: dict[str, str], has_address: bool) -> tuple[str, str] | None:
        """(dedup key, message) if the peer must not be proposed, else None."""
        theirs_proto, theirs_schema = txt.get("proto"), txt.get("schema")
        if txt.get("node_id") != instance:
            return "node_id", f"TXT node_id {txt.get('node_id')!r} != instance name (not a peer daemon?)"
        if theirs_proto is None:
            return "proto-missing", "no 'proto' in TXT (not a peer daemon?)"
        if theirs_proto != self.protocol_version:
            return (
                f"proto={theirs_proto}",
                f"protocol {theirs_proto} != ours {self.protocol_version} (upgrade one of them)",
            )
        if theirs_schema != self.schema_fingerprint:
            return (
                f"schema={theirs_schema}",
                f"schema fingerprint {theirs_schema} != ours {self.schema_fingerprint} (different model?)",
            )
        if not has_address:
            return "address", "no IPv4 address or port in its mDNS records"
        return None

    # -- helpers --------------------------------------------------------------------------------------------

    def _service_info(self) -> AsyncServiceInfo:
        properties: dict[str | bytes, Any] = {
            "node_id": self.node_id,
            "proto": self.protocol_version,
            "schema": self.schema_fingerprint,
            "port": str(self.port),
        }
        properties.update(self._extra_txt)
        return AsyncServiceInfo(
            self.service_type,
            self.instance_name,
            addresses=[socket.inet_aton(self.advertise_ip)],
            port=self.port,
            properties=properties,
            server=f"{self.node_id}.local.",
            # zeroconf's defaults, written out: the 4500 s PTR TTL is why a crashed peer lingers (module doc).
            host_ttl=120,
            other_ttl=4500,
        )
