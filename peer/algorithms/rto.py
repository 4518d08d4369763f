"""The retransmission timeout of the reliable patterns (P1 rounds, P4 tokens), adapted to the measured round trip.

RFC 6298, as TCP does it: smoothed RTT plus four times its mean deviation, clamped to [min_s, max_s], with
`max_s` also the timeout before the first sample. Karn's rule: only a message sent once gives a sample (the
acknowledgement of a retransmitted one could answer either copy). A lost message on a LAN then costs a few
milliseconds instead of the configured worst case. Pure: the caller passes the times.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RetransmitTimer:
    max_s: float = 0.5
    min_s: float = 0.005
    srtt: float | None = None
    rttvar: float = 0.0
    samples: int = 0

    def sample(self, rtt: float) -> None:
        rtt = max(0.0, rtt)
        self.samples += 1
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt

    def acknowledged(self, sent_at: float | None, sends: int, now: float | None) -> None:
        """A message sent `sends` times, last at `sent_at`, was acknowledged at `now` (None: time unknown)."""
        if sends == 1 and sent_at is not None and now is not None:
            self.sample(now - sent_at)

    @property
    def timeout_s(self) -> float:
        if self.srtt is None:
            return self.max_s
        return min(self.max_s, max(self.min_s, self.srtt + 4 * self.rttvar))
