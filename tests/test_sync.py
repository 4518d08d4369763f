"""The P1 round synchronizer on its own: acknowledgements, de-duplication, give-up, jumps, adaptive timeout."""

from __future__ import annotations

import pytest
import torch

from peer.algorithms.base import Payload
from peer.algorithms.sync import RoundSync


def _msg(r: int) -> Payload:
    return Payload("state", {"params": torch.zeros(2)}, seq=r + 1, round=r)


def _open(s: RoundSync, r: int, members: tuple[str, ...], now: float) -> None:
    s.open(r, {j: _msg(r) for j in members}, now)


def test_round_completes_with_every_member_and_duplicates_are_dropped() -> None:
    s = RoundSync("a", retransmit_s=1.0, give_up_s=100.0)
    _open(s, 0, ("b", "c"), 0.0)
    assert [x.to for x in s.due(0.0)] == ["b", "c"] and s.due(0.1) == []  # sent once, nothing due yet
    assert s.receive("b", _msg(0)) and not s.receive("b", _msg(0)) and s.duplicates == 1
    assert not s.complete(0.2) and s.missing() == {"c"}
    assert s.receive("c", _msg(1))  # one round ahead: buffered, and an implicit ack of our round 0
    assert s.unacked() == 1  # c's round-1 message acknowledged our round-0 message to c; b's is pending
    assert not s.complete(0.2)
    s.receive("c", _msg(0))
    assert s.complete(0.2) and set(s.take()) == {"b", "c"}


def test_unacknowledged_messages_are_resent_and_the_timeout_follows_the_round_trip() -> None:
    s = RoundSync("a", retransmit_s=0.5, give_up_s=100.0)
    _open(s, 0, ("b",), 0.0)
    s.due(0.0)
    assert s.due(0.49) == [] and len(s.due(0.5)) == 1 and s.retransmissions == 1  # no RTT sample yet: 0.5 s
    s.ack("b", (0,), now=0.6)  # retransmitted: Karn's rule, no sample
    assert s.timer.srtt is None
    _open(s, 1, ("b",), 1.0)
    s.due(1.0)
    s.ack("b", (1,), now=1.01)  # a 10 ms round trip
    assert s.timer.srtt == pytest.approx(0.01) and s.timeout_s == pytest.approx(0.03)
    _open(s, 2, ("b",), 2.0)
    s.due(2.0)
    assert s.due(2.029) == [] and len(s.due(2.031)) == 1  # a lost message now costs 30 ms, not 500 ms


def test_a_silent_member_is_given_up_once_and_readmitted_when_heard_from() -> None:
    s = RoundSync("a", retransmit_s=1.0, give_up_s=2.0)
    _open(s, 0, ("b", "dead"), 0.0)
    s.receive("b", _msg(0))
    assert not s.complete(1.9) and s.complete(2.0) and s.gave_up == 1
    assert set(s.take()) == {"b"}
    _open(s, 1, ("b", "dead"), 2.0)
    s.receive("b", _msg(1))
    assert s.complete(2.0)  # no second wait for a member still silent
    s.receive("dead", _msg(2))  # it is back
    _open(s, 2, ("b", "dead"), 3.0)
    assert s.missing() == {"b"}


def test_a_message_far_ahead_asks_for_a_jump() -> None:
    s = RoundSync("a")
    _open(s, 3, ("b",), 0.0)
    s.receive("b", _msg(4))
    assert s.jump_to is None
    s.receive("b", _msg(9))
    assert s.jump_to == 9 and s.complete(0.0)
    assert not s.receive("b", _msg(1)) and s.stale == 1  # finished rounds are stale
