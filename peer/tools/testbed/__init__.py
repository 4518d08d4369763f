"""A multi-host testbed on one Linux machine: `peer run` daemons in network namespaces on a virtual LAN.

Layout (all of it inside namespaces this testbed creates; the host's own interfaces are never touched):

    <prefix>br        the "switch": bridges br0 (everyone) and br1.. (partitions); no address
    <prefix>h<i>      host i: lo, and eth0 = 198.18.0.(i+1)/24 (RFC 2544 benchmarking range), a veth whose
                      other end, <prefix>b<i>, is a port of a bridge in <prefix>br

`<prefix>` is `pt<4 hex>-`, chosen per testbed, so concurrent testbeds never collide and teardown deletes only
its own namespaces. Faults: `cut(i)` / `restore(i)` take host i's switch port down / up; `partition(groups)`
puts each group on its own bridge, `heal()` puts everyone back on br0; `kill(i)` is SIGKILL.

Library use (the netns tests):

    tb = Testbed("t1", 4, workdir, {"model": {"name": "logreg"}})
    tb.up()
    try:
        for i in range(4): tb.start(i)
        lines = [tb.ready(i) for i in range(4)]
        tb.cut(1); ...; tb.restore(1)
        print(tb.status(0)["neighbours"])
    finally:
        tb.down()

Command line (state kept in /run/peer-testbed/<name>.json, so each subcommand is a separate invocation):

    scripts/testbed up --name demo -n 4 --set model.name=logreg --set train.epochs=50
    scripts/testbed status --name demo           # every peer's `peer status` table (--json for JSON)
    scripts/testbed cut 1 --name demo; scripts/testbed restore 1 --name demo
    scripts/testbed partition 0,1 2,3 --name demo; scripts/testbed heal --name demo
    scripts/testbed kill 2 --name demo; scripts/testbed restart 2 --name demo
    scripts/testbed down --name demo
    scripts/testbed cleanup                      # namespaces of testbeds whose owner process died

Everything needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN).
"""

from __future__ import annotations

from peer.tools.testbed.bed import Testbed, cleanup
from peer.tools.testbed.cli import build_parser, main
from peer.tools.testbed.common import (
    DEFAULT_PORT,
    DEFAULT_STATE_DIR,
    HOST_IF,
    MAX_HOSTS,
    NAME_RE,
    PREFIX_RE,
    SUBNET,
    TestbedError,
    deep_merge,
    host_ip,
    parse_sets,
)
from peer.tools.testbed.netns import list_netns, netns_unavailable

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_STATE_DIR",
    "HOST_IF",
    "MAX_HOSTS",
    "NAME_RE",
    "PREFIX_RE",
    "SUBNET",
    "Testbed",
    "TestbedError",
    "build_parser",
    "cleanup",
    "deep_merge",
    "host_ip",
    "list_netns",
    "main",
    "netns_unavailable",
    "parse_sets",
]
