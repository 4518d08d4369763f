"""Deterministic, seeded fault injection inside the application: drops, delays, link outages, stragglers.

The config (`FaultsConfig`, the `faults:` section) is validated on load; `FaultInjector` is a pure core: the
shell asks it, per outgoing message, what to do (`decide(link, now)`) and carries the answer out. No clocks,
sockets or global randomness here: `now` comes in as an argument and every draw comes from a private
`random.Random` seeded by (seed, node id[, link]), so a run with the same seed and the same sequence of calls
makes the same decisions.

Link outages follow a Gilbert–Elliott on/off process per outgoing link: a two-state continuous-time Markov
chain whose up and down periods are exponential with means `mean_up_s` and `mean_down_s`. Each link's process
has its own RNG, so its outage pattern is a function of its own clock only, not of traffic on other links. The
process starts at the injector's time origin (`start_s`, default: the first `now` the injector sees) in a state
drawn from the stationary distribution, P(down) = mean_down_s / (mean_up_s + mean_down_s), and is simulated
lazily as `now` advances. Outages are directional: peer A's outage pattern on A→B is independent of B's on B→A.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

DELAY_FORMS = ("const:S", "uniform:LO,HI", "exp:MEAN", "normal:MEAN,STD")

# A gap longer than this many mean cycles between two looks at a link is not simulated flip by flip: the state
# is redrawn from the stationary distribution (exact in distribution after that many cycles). Bounds the work
# of one call when `now` jumps far ahead (a suspended laptop, or an origin far in the past).
_MAX_CYCLES_SIMULATED = 10_000


# -- config ---------------------------------------------------------------------------------------------------


class OutageConfig(BaseModel):
    """Gilbert–Elliott on/off outages of this peer's outgoing links."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mean_up_s: float = Field(gt=0, allow_inf_nan=False, description="mean length of an up period (exponential)")
    mean_down_s: float = Field(gt=0, allow_inf_nan=False, description="mean length of an outage (exponential)")
    links: list[str] = Field(
        default_factory=list,
        description="neighbour node ids whose links suffer outages; empty means every link of this peer",
    )

    @field_validator("links")
    @classmethod
    def _links(cls, v: list[str]) -> list[str]:
        for link in v:
            if not link or link != link.strip():
                raise ValueError(f"link entries are neighbour node ids, got {link!r}")
        return sorted(set(v))


class FaultsConfig(BaseModel):
    """Faults injected on purpose, for experiments and tests. Every default is neutral (no faults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    drop_probability: float = Field(
        0.0, ge=0.0, lt=1.0, allow_inf_nan=False, description="probability that an outgoing message is dropped"
    )
    delay_s: str | None = Field(
        None,
        description='delay added to each outgoing message: "const:S", "uniform:LO,HI", "exp:MEAN" or '
        '"normal:MEAN,STD" (clipped at 0), in seconds; unset means no delay',
    )
    outage: OutageConfig | None = Field(None, description="on/off link outages (Gilbert–Elliott); unset means none")
    slowdown: float = Field(
        1.0, ge=1.0, allow_inf_nan=False, description="straggler factor: training steps take this many times as long"
    )
    seed: int = Field(0, description="seed of the fault RNGs (combined with the node id and the link)")

    @field_validator("delay_s")
    @classmethod
    def _delay(cls, v: str | None) -> str | None:
        if v is not None:
            parse_delay(v)  # raises ValueError, which pydantic reports under `delay_s`
        return v


@dataclass(frozen=True)
class DelaySpec:
    """A parsed delay distribution. `a`, `b` are (value, -), (lo, hi), (mean, -) or (mean, std)."""

    kind: str
    a: float
    b: float = 0.0

    @property
    def mean_s(self) -> float:
        """The nominal mean (for normal, before clipping at 0)."""
        return (self.a + self.b) / 2 if self.kind == "uniform" else self.a

    @property
    def is_zero(self) -> bool:
        """True when every draw is 0 (the distribution adds no delay)."""
        if self.kind in ("const", "exp"):
            return self.a == 0
        if self.kind == "uniform":
            return self.b == 0
        return self.b == 0 and self.a <= 0

    def sample(self, rng: random.Random) -> float:
        """One delay in seconds, >= 0."""
        if self.kind == "const":
            return self.a
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        if self.kind == "exp":
            return rng.expovariate(1.0 / self.a) if self.a > 0 else 0.0
        return max(0.0, rng.gauss(self.a, self.b))


def parse_delay(text: str) -> DelaySpec:
    """Parse a delay distribution spec (see `DELAY_FORMS`). Raises ValueError naming the problem."""
    forms = ", ".join(DELAY_FORMS)
    name, sep, params = text.strip().partition(":")
    arity = {"const": 1, "uniform": 2, "exp": 1, "normal": 2}
    if name not in arity or not sep:
        raise ValueError(f"unknown delay distribution {text!r}; valid forms: {forms}")
    parts = [p.strip() for p in params.split(",")]
    if len(parts) != arity[name]:
        raise ValueError(f"{name} takes {arity[name]} number(s), got {params!r}; valid forms: {forms}")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"delay parameters must be numbers, got {params!r}; valid forms: {forms}") from None
    if not all(math.isfinite(x) for x in values):
        raise ValueError(f"delay parameters must be finite, got {params!r}")
    if name == "normal":
        if values[1] < 0:
            raise ValueError(f"normal std must be >= 0, got {values[1]:g}")
    elif any(x < 0 for x in values):
        raise ValueError(f"{name} delay parameters must be >= 0 seconds, got {params!r}")
    if name == "uniform" and values[0] > values[1]:
        raise ValueError(f"uniform needs LO <= HI, got {params!r}")
    return DelaySpec(name, *values)


# -- the injector ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """What to do with one outgoing message: drop it (reason "drop" or "outage") or send it after `delay_s`."""

    drop: bool
    delay_s: float
    reason: str  # "" (send), "drop" (random loss) or "outage" (the link is down)


SEND = Decision(False, 0.0, "")


@dataclass
class _Link:
    """Gilbert–Elliott state of one link: up or down until `next_flip`."""

    rng: random.Random
    up: bool
    next_flip: float


class FaultInjector:
    """Decides, per outgoing message, whether to drop it and how long to delay it; counts what it injected.

    `counters`: "dropped" (random drops), "outage_dropped" (drops because the link was down) and "delayed"
    (messages given a delay > 0). Times (`now`, `start_s`) are seconds on any clock that only moves forward
    (the shell's monotonic loop time); a `now` earlier than one already seen on a link answers with the
    state at the latest time seen.
    """

    def __init__(self, cfg: FaultsConfig, *, node_id: str, start_s: float | None = None) -> None:
        self.cfg = cfg
        self.node_id = node_id
        self.rng = random.Random(f"{cfg.seed}-{node_id}")
        self.delay = parse_delay(cfg.delay_s) if cfg.delay_s is not None else None
        self.start_s = start_s
        self.counters: dict[str, int] = {"dropped": 0, "outage_dropped": 0, "delayed": 0}
        self._links: dict[str, _Link] = {}

    @property
    def enabled(self) -> bool:
        """False when every knob is neutral: the shell can skip the injector entirely."""
        return (
            self.cfg.drop_probability > 0
            or (self.delay is not None and not self.delay.is_zero)
            or self.cfg.outage is not None
            or self.cfg.slowdown != 1.0
        )

    def decide(self, link: str, now: float) -> Decision:
        """The fate of one message to neighbour `link` sent at `now`: outage, else random drop, else delay."""
        if not self.link_up(link, now):
            self.counters["outage_dropped"] += 1
            return Decision(True, 0.0, "outage")
        p = self.cfg.drop_probability
        if p > 0 and self.rng.random() < p:
            self.counters["dropped"] += 1
            return Decision(True, 0.0, "drop")
        if self.delay is None:
            return SEND
        delay = self.delay.sample(self.rng)
        if delay > 0:
            self.counters["delayed"] += 1
        return Decision(False, delay, "")

    def link_up(self, link: str, now: float) -> bool:
        """Whether the link to neighbour `link` is up at `now` (always, for links without outages)."""
        outage = self.cfg.outage
        if outage is None or (outage.links and link not in outage.links):
            return True
        if self.start_s is None:
            self.start_s = now
        state = self._links.get(link)
        if state is None:
            state = self._links[link] = self._new_link(link, outage, self.start_s)
        self._advance(state, outage, now)
        return state.up

    def straggler_sleep_s(self, step_seconds: float) -> float:
        """Extra seconds to sleep after a training step that took `step_seconds`: (slowdown − 1)·step."""
        return max(0.0, (self.cfg.slowdown - 1.0) * step_seconds)

    # -- Gilbert–Elliott ----------------------------------------------------------------------------------------
    def _new_link(self, link: str, outage: OutageConfig, start: float) -> _Link:
        # Seeded by the unordered pair, so that both ends of a link (each with its own injector, in its own
        # process) simulate the same outage process: a flapping link is down in both directions at once, given
        # a shared time origin (the daemon uses wall-clock time from the start of the hour).
        a, b = sorted((self.node_id, link))
        rng = random.Random(f"{self.cfg.seed}-{a}|{b}")
        state = _Link(rng, True, start)
        self._draw_stationary(state, outage, start)
        return state

    @staticmethod
    def _draw_stationary(state: _Link, outage: OutageConfig, at: float) -> None:
        # Stationary start; the residual of an exponential sojourn is exponential with the same mean.
        p_down = outage.mean_down_s / (outage.mean_up_s + outage.mean_down_s)
        state.up = state.rng.random() >= p_down
        mean = outage.mean_up_s if state.up else outage.mean_down_s
        state.next_flip = at + state.rng.expovariate(1.0 / mean)

    def _advance(self, state: _Link, outage: OutageConfig, now: float) -> None:
        if now - state.next_flip > _MAX_CYCLES_SIMULATED * (outage.mean_up_s + outage.mean_down_s):
            self._draw_stationary(state, outage, now)
            return
        while state.next_flip <= now:
            state.up = not state.up
            mean = outage.mean_up_s if state.up else outage.mean_down_s
            state.next_flip += state.rng.expovariate(1.0 / mean)
