"""Catch-up policy: when a peer's model is stale, and which neighbour to fetch a model (and progress) from.

When: a new peer, or one back from a long time without neighbours (its state is older than `max_state_age_s`),
takes any neighbour at least an epoch ahead; any peer, however fresh its state, takes a neighbour more than
`max_epochs_behind` ahead (after a restart, or when it straggles behind most of its neighbours). A search lasts
at most `wait_s`; a starting peer's training waits for its verdict. Progress comes from every Hello and heartbeat
answer.

Pure: `now` is an argument; the shell performs the download (`StartCatchUp`) and reports `FetchDone`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CatchUpSettings:
    enabled: bool = True
    max_state_age_s: float = 60.0
    max_epochs_behind: float = 2.0
    wait_s: float = 10.0
    # Step-mode algorithms keep their own state once started: only a model fetched before their first
    # iteration can be adopted, so they never catch up mid-run.
    mid_run: bool = True
    # Nobody to fetch from without discovery (no mDNS, no static peers): a lone peer must not wait.
    can_fetch: bool = True


@dataclass(frozen=True)
class Search:
    deadline: float
    old: bool  # our state is old: any neighbour at least an epoch ahead will do
    starting: bool


@dataclass(frozen=True)
class Fetch:
    node_id: str
    step: int
    epoch: float


@dataclass(frozen=True)
class Finish:
    reason: str
    log: str = ""


@dataclass
class CatchUpPolicy:
    settings: CatchUpSettings
    search: Search | None = None
    fetching: str | None = None
    # node id -> (step, epoch) from its last Hello or heartbeat answer
    progress: dict[str, tuple[int, float]] = field(default_factory=dict)
    isolated_since: float | None = None

    @property
    def active(self) -> bool:
        return self.search is not None or self.fetching is not None

    def start(self, now: float, wall: float, state_saved_unix_s: float | None, done: bool) -> bool:
        """At start-up: begin a search if one may help. False means the training thread need not wait."""
        s = self.settings
        if not s.enabled or done or not s.can_fetch:
            return False
        old = state_saved_unix_s is None or wall - state_saved_unix_s > s.max_state_age_s
        self.search = Search(now + s.wait_s, old=old, starting=True)
        return True

    def report(self, node_id: str, step: int, epoch: float) -> None:
        self.progress[node_id] = (step, epoch)

    def isolation(self, has_neighbours: bool, now: float) -> None:
        if has_neighbours:
            self.isolated_since = None
        elif self.isolated_since is None:
            self.isolated_since = now

    def on_readmitted(self, now: float) -> str:
        """A neighbour answers again: search if we spent longer than max_state_age_s without any. Returns the
        log line when a search begins."""
        s = self.settings
        since = self.isolated_since
        if since is None or not s.enabled or self.active or now - since <= s.max_state_age_s:
            return ""
        self.search = Search(now + s.wait_s, old=True, starting=False)
        return f"back from {now - since:.0f} s without neighbours: catching up"

    def check_progress(self, now: float, mine: float, done: bool, neighbours: Collection[str]) -> None:
        """A straggler that falls more than max_epochs_behind behind most of its neighbours rejoins the cluster's
        progress: training on alone after the others finished would pull the consensus towards its own classes.
        A peer behind only some of them (uneven compute shares: one neighbour raced ahead) still trains with the
        others at its own pace; adopting the leader's model would throw away their remaining epochs."""
        s = self.settings
        if not s.enabled or not s.mid_run or done or self.active or not neighbours:
            return
        ahead = sum(1 for j, (_, e) in self.progress.items() if j in neighbours and e > mine + s.max_epochs_behind)
        if 2 * ahead > len(neighbours):
            self.search = Search(now + s.wait_s, old=False, starting=False)

    def decide(
        self, now: float, mine: float, live: Collection[str], neighbours: Collection[str]
    ) -> Fetch | Finish | None:
        """The next step of a search: fetch from the most advanced live peer far enough ahead, finish (every
        neighbour answered and none is ahead enough, or the time is up), or keep waiting (None)."""
        search = self.search
        if search is None or self.fetching is not None:
            return None
        s = self.settings
        # An old state adopts any neighbour at least an epoch ahead (peers of a fresh cluster that start a
        # moment apart don't); a fresh one only a neighbour far ahead.
        lead = min(1.0, s.max_epochs_behind) if search.old else s.max_epochs_behind
        ahead = [(epoch, step, j) for j, (step, epoch) in self.progress.items() if epoch > mine + lead and j in live]
        if ahead:
            epoch, step, j = max(ahead)
            self.fetching = j
            return Fetch(j, step, epoch)
        if neighbours and all(j in self.progress for j in neighbours):
            self.search = None
            return Finish("no neighbour is ahead")
        if now >= search.deadline:
            self.search = None
            line = f"no neighbour ahead of us within {s.wait_s:.0f} s; training from our own state"
            return Finish("timed out", line if search.starting else "")
        return None

    def fetch_done(self, node_id: str, ok: bool) -> None:
        self.fetching = None
        if ok:
            self.search = None
        else:
            self.progress.pop(node_id, None)  # try another neighbour, or wait for fresher progress

    def deadline(self) -> float | None:
        return self.search.deadline if self.search is not None and self.fetching is None else None
