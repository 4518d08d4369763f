"""`peer simulate --faults SPEC`: the demo's fault items per peer, plus two for many peers (stragglers, churn).

The demo's items (`drop=P`, `delay=DIST`, `flap=A:B:UP_S:DOWN_S`, `straggler=ID:FACTOR`) mean the same here and
are parsed by the demo's own `faults_for_peer`. Two more pick peers by a seeded draw instead of by name:

* `stragglers=F:FACTOR`: a share F of the peers runs FACTOR times slower (an iteration takes FACTOR ticks);
* `churn=F:DOWN_S`: a share F of the peers leaves once, at a uniformly drawn time during training, stays away
  DOWN_S virtual seconds (it neither computes nor receives; what is sent to it is lost) and comes back with the
  state it had, as a peer cut off by its network would.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from peer.errors import ConfigError
from peer.tools.demo_config import faults_for_peer

SIM_ONLY = ("stragglers", "churn")


@dataclass(frozen=True)
class FaultPlan:
    faults: dict[str, dict[str, Any]]  # node id -> its `faults:` section
    away: dict[str, tuple[int, int]]  # node id -> absent for ticks [first, last)


def _share(value: str, item: str) -> tuple[float, float]:
    try:
        share_text, number_text = value.split(":")
        share, number = float(share_text), float(number_text)
    except ValueError:
        raise ConfigError(f"bad item {item!r}: expected SHARE:NUMBER", source="--faults") from None
    if not (0.0 <= share <= 1.0 and math.isfinite(number)):
        raise ConfigError(f"bad item {item!r}: the share must be in [0, 1]", source="--faults")
    return share, number


def plan_faults(spec: str, ids: list[str], *, seed: int, tick_s: float, training_ticks: int) -> FaultPlan:
    """Every peer's fault section and churn window from SPEC (see the module docstring)."""
    rng = random.Random(f"simulate-faults-{seed}")
    demo_items: list[str] = []
    slow: dict[str, float] = {}
    away: dict[str, tuple[int, int]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, _, value = item.partition("=")
        if key == "stragglers":
            share, factor = _share(value, item)
            if factor < 1:
                raise ConfigError(f"bad item {item!r}: FACTOR must be >= 1", source="--faults")
            slow.update(dict.fromkeys(rng.sample(ids, round(share * len(ids))), factor))
        elif key == "churn":
            share, down_s = _share(value, item)
            if down_s <= 0:
                raise ConfigError(f"bad item {item!r}: DOWN_S must be > 0", source="--faults")
            for node in rng.sample(ids, round(share * len(ids))):
                leave = rng.randrange(1, max(2, training_ticks))
                away[node] = (leave, leave + max(1, math.ceil(down_s / tick_s)))
        else:
            demo_items.append(item)
    demo_spec = ",".join(demo_items)
    faults: dict[str, dict[str, Any]] = {}
    for i, node in enumerate(ids):
        section = faults_for_peer(demo_spec, f"peer-{i}", len(ids)) if demo_spec else {}
        if node in slow:
            section["slowdown"] = max(section.get("slowdown", 1.0), slow[node])
        faults[node] = {"seed": seed, **section}
    return FaultPlan(faults, away)
