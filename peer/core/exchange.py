"""Peer exchange: members learn their members' members through Hello. Pure bookkeeping, taking `now`.

Every Hello (request and answer, heartbeats included) carries a sample of the sender's members: node id and the
address the sender's own Hello reached it at. The sample rotates through the members, so over a few Hellos a
neighbour hears of all of them. What we read is only a candidate: the core dials it with a join Hello, and it
enters the peer table like any other peer, once its address answered (with mutual TLS, once its certificate
names that node id). Only members speak for others: a list is read from the answer to our own Hello, or from a
Hello by a member we admitted at the address we confirmed.

Bounds: at most `max_per_hello` entries are sent in, and read from, one Hello; at most `max_known` addresses are
remembered (least recently dialled forgotten first); and one address is dialled again no sooner than `retry_s`
later, however many members name it. Join Hellos in flight stay bounded by the core's admission limit.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from peer.core.admission import valid_node_id
from peer.core.events import KnownPeer
from peer.core.peers import PeerTable

MAX_ADDRESS_CHARS = 270  # a 253-character host name, brackets, a colon and a port


@dataclass(frozen=True)
class ExchangeSettings:
    """Derived from `discovery.peer_exchange*` and `membership.max_peers`."""

    enabled: bool = True
    max_per_hello: int = 16
    max_known: int = 1024
    retry_s: float = 10.0


def plausible_address(address: str) -> bool:
    """ "host:port" with a port in 1..65535 and a short host: cheap checks before a remote string is dialled."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or len(address) > MAX_ADDRESS_CHARS or not port.isascii() or not port.isdigit():
        return False
    return 0 < int(port) <= 65535 and not any(c.isspace() for c in host)


class PeerExchange:
    def __init__(self, settings: ExchangeSettings) -> None:
        self.settings = settings
        self._cursor = 0
        self._dialled: OrderedDict[str, float] = OrderedDict()  # address -> when we last dialled it for exchange
        self.learned = 0  # candidates handed to the core for a join Hello (a counter for tests and metrics)

    def offer(self, table: PeerTable) -> tuple[KnownPeer, ...]:
        """The members to name in our next Hello: a window of at most `max_per_hello` that rotates each call."""
        if not self.settings.enabled:
            return ()
        members = table.members()
        n = self.settings.max_per_hello
        if len(members) > n:
            start = self._cursor % len(members)
            self._cursor = start + n
            members = (members + members)[start : start + n]
        return tuple(KnownPeer(j, table.peers[j].address) for j in members)

    def learn(self, entries: Iterable[KnownPeer], table: PeerTable, own_address: str, now: float) -> list[KnownPeer]:
        """Of the members one Hello named, those worth a join Hello now (the caller dials each)."""
        if not self.settings.enabled:
            return []
        out: list[KnownPeer] = []
        for i, k in enumerate(entries):
            if i >= self.settings.max_per_hello:
                break
            if k.node_id == table.self_id or k.address == own_address:
                continue
            if not valid_node_id(k.node_id) or not plausible_address(k.address):
                continue
            rec = table.peers.get(k.node_id)
            if rec is not None and (rec.answers_at(k.address) or not rec.evicted):
                continue  # a member: its own heartbeats keep it (an evicted one is worth a try at a new address)
            last = self._dialled.get(k.address)
            if last is not None and now - last < self.settings.retry_s:
                continue
            self._dialled[k.address] = now
            self._dialled.move_to_end(k.address)
            while len(self._dialled) > self.settings.max_known:
                self._dialled.popitem(last=False)
            out.append(k)
        self.learned += len(out)
        return out

    def __len__(self) -> int:
        return len(self._dialled)
