"""Peer discovery over mDNS: register and browse `_peer._tcp.local.` (static peers: `peer.net.addresses`).

Discovery only *proposes* candidates; the daemon verifies each one with a gRPC Hello. mDNS is not a liveness
signal: a crashed peer's records linger in other caches for at least 1125 s, so eviction is the job of the
health/heartbeat layer, and `on_removed` only reports peers that said goodbye cleanly.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable, Mapping
from typing import Any

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
from peer.net.addresses import Candidate
from peer.net.interfaces import resolve_interfaces

SERVICE_TYPE = "_peer._tcp.local."
RESOLVE_TIMEOUT_MS = 3000
# TXT keys written by every peer; extra_txt may not override them.
RESERVED_TXT_KEYS = frozenset({"node_id", "proto", "schema", "port"})

logger = logging.getLogger(__name__)


def _validate_txt(txt: Mapping[str, str]) -> None:
    for key, value in txt.items():
        if key in RESERVED_TXT_KEYS:
            raise ValueError(f"TXT key {key!r} is reserved")
        # RFC 6763 §6.1: each key=value string is at most 255 bytes.
        if not key or "=" in key or len(f"{key}={value}".encode()) > 255:
            raise ValueError(f"bad TXT entry {key!r}={value!r} (empty key, '=' in key, or over 255 bytes)")


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
        on_removed: Callable[[str, str], None],
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
        # The instance name carries the cluster (node_id@cluster) when it is not the default one: node ids are
        # unique within a cluster, and two clusters on one LAN (two `peer demo` runs on one host, each with its
        # peer-0) must not take each other's names. Peers read the node id from the TXT record.
        self.cluster = extra.get("cluster", "default")
        label = node_id if self.cluster == "default" else f"{node_id}@{self.cluster}"
        self.instance_name = f"{label if len(label.encode()) <= 63 else node_id}.{service_type}"
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
                f"another live peer already uses node_id {self.node_id!r} in cluster {self.cluster!r} on the "
                f"network (mDNS name {self.instance_name!r} is taken); give this node a unique node_id"
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
            self._on_removed(candidate.node_id, candidate.address)

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
            node_id=txt["node_id"],
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
        if txt.get("node_id") not in (instance, instance.split("@", 1)[0]):
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
