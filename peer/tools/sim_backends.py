"""Where `peer simulate` runs its peer groups: in this process (`local`) or as Ray actors (`ray`).

Both backends run the same `PeerGroup` code and route the same outboxes: group g's outbox for group h at tick t is
group h's inbox from g at tick t + 1. Only the actor layer differs: with Ray, each group is an actor, and the
outboxes travel as object references from actor to actor (the driver only collects the small reports).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, Protocol

from peer.errors import ConfigError
from peer.tools.sim_peers import GroupFinal, GroupReport, GroupSetup, PeerGroup

RAY_MISSING = "--backend ray needs Ray, which is not installed: pip install 'peer[ray]' (or pip install ray)"


class Backend(Protocol):
    def step(self, tick: int) -> list[GroupReport]: ...

    def evaluate(self, x: Any) -> float: ...

    def finish(self) -> list[GroupFinal]: ...

    def close(self) -> None: ...


class LocalBackend:
    """Every group in this process, stepped one after the other."""

    def __init__(self, setups: Sequence[GroupSetup]) -> None:
        self.groups = [PeerGroup(s) for s in setups]
        n = len(self.groups)
        self.inbox: list[list[Any]] = [[[] for _ in range(n)] for _ in range(n)]  # inbox[receiver][sender]

    def step(self, tick: int) -> list[GroupReport]:
        out = [g.step(tick, *self.inbox[i]) for i, g in enumerate(self.groups)]
        n = len(self.groups)
        self.inbox = [[out[src][dst] for src in range(n)] for dst in range(n)]
        return [o[-1] for o in out]

    def evaluate(self, x: Any) -> float:
        return self.groups[0].evaluate(x)

    def finish(self) -> list[GroupFinal]:
        return [g.finish() for g in self.groups]

    def close(self) -> None:
        self.groups = []


def import_ray(*, loopback: bool) -> Any:
    """Ray, or a one-line ConfigError saying how to install it. With `loopback`, the private Ray instance this
    process starts uses 127.0.0.1 for all its services (Ray's single-machine mode, the default on macOS and
    Windows), so a simulation opens no port on the LAN; Ray reads the switch when it is first imported."""
    if loopback and "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    return ray


class RayBackend:
    """One Ray actor per group, on this machine (`address` None: a private Ray instance with `num_cpus` and an
    object store of `object_store_bytes`) or on the Ray cluster at `address` (every node needs peer installed)."""

    def __init__(
        self,
        setups: Sequence[GroupSetup],
        *,
        address: str | None,
        num_cpus: int | None,
        object_store_bytes: int,
    ) -> None:
        ray = self.ray = import_ray(loopback=not address)
        if address:  # an existing cluster brings its own resources and dashboard
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(
                address="local",  # a new private instance, even when a local cluster is running
                num_cpus=num_cpus,
                object_store_memory=object_store_bytes,
                include_dashboard=False,
                logging_level=logging.WARNING,
            )
        try:
            cpus = float(ray.cluster_resources().get("CPU", 1.0))
            share = min(1.0, cpus / len(setups))  # every actor must fit at once: they step in lockstep
            actor = ray.remote(PeerGroup).options(num_cpus=share, scheduling_strategy="SPREAD")
            self.actors = [actor.remote(s) for s in setups]
            ray.get([a.__ray_ready__.remote() for a in self.actors])
        except BaseException:
            ray.shutdown()
            raise
        n = len(self.actors)
        self.inbox: list[list[Any]] = [[[] for _ in range(n)] for _ in range(n)]

    def step(self, tick: int) -> list[GroupReport]:
        n = len(self.actors)
        out = [a.step.options(num_returns=n + 1).remote(tick, *self.inbox[i]) for i, a in enumerate(self.actors)]
        self.inbox = [[out[src][dst] for src in range(n)] for dst in range(n)]
        return list(self.ray.get([o[-1] for o in out]))

    def evaluate(self, x: Any) -> float:
        return float(self.ray.get(self.actors[0].evaluate.remote(x)))

    def finish(self) -> list[GroupFinal]:
        return list(self.ray.get([a.finish.remote() for a in self.actors]))

    def close(self) -> None:
        for a in getattr(self, "actors", []):
            self.ray.kill(a)
        self.actors = []
        self.ray.shutdown()


def make_backend(name: str, setups: Sequence[GroupSetup], **ray_options: Any) -> Backend:
    if name == "local":
        return LocalBackend(setups)
    if name == "ray":
        return RayBackend(setups, **ray_options)
    raise ConfigError(f"unknown backend {name!r}; valid backends: local, ray", source="--backend")
