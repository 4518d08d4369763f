"""Testbed methods that build the virtual LAN and rearrange it: prefix claim, bridges and veths, cut/restore,
partition/heal."""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Sequence

from peer.tools.testbed.base import BedBase
from peer.tools.testbed.common import HOST_IF, ROUTER_HOST, SUBNET, TestbedError, subnet_address
from peer.tools.testbed.netns import _ip, list_netns


class NetworkMixin(BedBase):
    """The namespaces, bridges and veths of a `Testbed`, and the faults that rewire them."""

    # -- network ----------------------------------------------------------------------------------------
    def _choose_prefix(self) -> str:
        taken = {ns[:7] for ns in list_netns()}
        state_dir = self.state_path.parent
        if state_dir.is_dir():
            for f in state_dir.glob("*.json"):
                with contextlib.suppress(OSError, ValueError):
                    taken.add(json.loads(f.read_text()).get("prefix", ""))
        for _ in range(1000):
            prefix = f"pt{secrets.token_hex(2)}-"
            if prefix not in taken:
                return prefix
        raise TestbedError("no free namespace prefix")

    def _claim_prefix(self) -> None:
        """Pick a prefix and create its switch namespace: `ip netns add` fails if it exists, so a prefix
        that another testbed picked at the same moment is never shared (nor deleted by our teardown)."""
        for _ in range(20):
            self.prefix = self._choose_prefix()
            self.save()  # before creating anything, so that `cleanup` finds it after a crash
            proc = _ip("netns", "add", self.bridge_ns, check=False)
            if proc.returncode == 0:
                return
            self.prefix = ""
            self.save()
            if "exists" not in proc.stderr:
                raise TestbedError(f"`ip netns add` failed: {proc.stderr.strip()}")
        raise TestbedError("no free namespace prefix")

    def _build_network(self) -> None:
        br = self.bridge_ns
        _ip("-n", br, "link", "set", "lo", "up")
        for k in (0, 1):
            self._add_bridge(k)
        if self.subnets == 2:
            self._add_router()
        for i in range(self.n):
            ns = self.host_ns(i)
            s = self.subnet_of(i)
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            # Created inside the host namespace, the other end moved straight into the bridge namespace:
            # no interface ever exists in the initial namespace.
            _ip("-n", ns, "link", "add", HOST_IF, "type", "veth", "peer", "name", self.port_name(i), "netns", br)
            _ip("-n", br, "link", "set", self.port_name(i), "master", f"br{s}")
            _ip("-n", br, "link", "set", self.port_name(i), "up")
            _ip("-n", ns, "addr", "add", f"{self.ip(i)}/{SUBNET.prefixlen}", "dev", HOST_IF)
            _ip("-n", ns, "link", "set", HOST_IF, "up")
            # mDNS sends to 224.0.0.251; zeroconf sets IP_MULTICAST_IF, but a route makes any other multicast
            # sender in the namespace work too.
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", HOST_IF)
            if self.subnets == 2:
                other = f"{subnet_address(1 - s, 0)}/{SUBNET.prefixlen}"
                _ip("-n", ns, "route", "add", other, "via", subnet_address(s, ROUTER_HOST))
            self.placement[i] = s

    def _add_router(self) -> None:
        """A namespace with a leg on br0 (198.18.0.254) and one on br1 (198.18.1.254) that forwards between
        them: unicast crosses, multicast (mDNS, link-local) does not."""
        rt, br = self.router_ns, self.bridge_ns
        _ip("netns", "add", rt)
        _ip("-n", rt, "link", "set", "lo", "up")
        for s in (0, 1):
            leg, port = f"eth{s}", f"{self.prefix}r{s}"
            _ip("-n", rt, "link", "add", leg, "type", "veth", "peer", "name", port, "netns", br)
            _ip("-n", br, "link", "set", port, "master", f"br{s}")
            _ip("-n", br, "link", "set", port, "up")
            _ip("-n", rt, "addr", "add", f"{subnet_address(s, ROUTER_HOST)}/{SUBNET.prefixlen}", "dev", leg)
            _ip("-n", rt, "link", "set", leg, "up")
        _ip("netns", "exec", rt, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")

    def _add_bridge(self, k: int) -> None:
        if k in self.bridges:
            return
        br = self.bridge_ns
        # No STP (ports forward at once) and no multicast snooping (mDNS floods like on a dumb switch).
        _ip("-n", br, "link", "add", f"br{k}", "type", "bridge", "stp_state", "0", "mcast_snooping", "0")
        _ip("-n", br, "link", "set", f"br{k}", "up")
        self.bridges.add(k)

    def cut(self, i: int) -> None:
        """Take host i's switch port down: its packets go nowhere (connections time out, not refused)."""
        self._check_index(i)
        _ip("-n", self.bridge_ns, "link", "set", self.port_name(i), "down")
        self.cut_hosts.add(i)
        self.save()

    def restore(self, i: int) -> None:
        self._check_index(i)
        _ip("-n", self.bridge_ns, "link", "set", self.port_name(i), "up")
        self.cut_hosts.discard(i)
        self.save()

    def partition(self, groups: Sequence[Sequence[int]]) -> None:
        """Put group g on bridge br<g>: hosts talk only within their group. Hosts in no group join group 0."""
        seen: set[int] = set()
        for group in groups:
            for i in group:
                self._check_index(i)
                if i in seen:
                    raise TestbedError(f"host {i} is in two groups")
                seen.add(i)
        target = dict.fromkeys(range(self.n), 0)
        for g, group in enumerate(groups):
            for i in group:
                target[i] = g
        self._place(target)

    def heal(self) -> None:
        """Everyone back on br0 (cut links stay cut; `restore` them)."""
        self._place(dict.fromkeys(range(self.n), 0))

    def _place(self, target: dict[int, int]) -> None:
        for i, g in sorted(target.items()):
            if self.placement.get(i) == g:
                continue
            self._add_bridge(g)
            _ip("-n", self.bridge_ns, "link", "set", self.port_name(i), "master", f"br{g}")
            self.placement[i] = g
        self.save()
