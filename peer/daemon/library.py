"""The library API for one's own training loop: `peer.Gossip(model, config)` runs a daemon (discovery, gRPC,
merges) in a background thread with its own event loop; `gossip.step()`, called after `optimizer.step()`, merges
what arrived into the model in the caller's thread and publishes the result. Never behind the caller's back.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from peer import config as config_mod
from peer.algorithms import REGISTRY
from peer.algorithms.base import AlgoParams
from peer.config import PeerConfig
from peer.daemon.node import Node
from peer.errors import ConfigError, PeerError, StartupError


def as_config(config: PeerConfig | dict[str, Any] | str | Path, source: str) -> PeerConfig:
    """A PeerConfig from a PeerConfig, a raw mapping (validated like a YAML file) or a YAML path."""
    if isinstance(config, PeerConfig):
        return config
    if isinstance(config, dict):
        return config_mod.validate(dict(config), source=source)
    return config_mod.load(config)


class Gossip:
    """Decentralized averaging for a model trained in the caller's own loop.

        with peer.Gossip(model, {"node_id": "robot-1", "state_dir": "state/robot-1"}) as gossip:
            for x, y in loader:
                loss_fn(model(x), y).backward(); optimizer.step(); optimizer.zero_grad()
                gossip.step()

    Which algorithms: the mix-mode ones (`cdl`, `none`) take the caller's parameters after each local step and
    mix them with the neighbours'. Of the step-mode ones, `dpsgd` (P1, round-synchronous) runs one round per
    `step()`: the caller's step stands in for its gradient step (x_{k+1} = Σ_j w_ij x_j^k − (the caller's step)),
    and `step()` waits for the round's neighbour states (bounded by `algorithm.give_up_s`); its own `momentum` is
    set to 0, since the caller's optimizer already carries one. The others own the local update and cannot follow
    an optimizer the caller steps: `dmsgd`/`dmsgd_async` share a momentum built from raw gradients, `next` and
    `next_pushsum` track gradients, `choco` needs the gradient when a round opens (its compressed half-step,
    before the caller's next step exists), `local_sgd` takes H gradients per round, `sgp` and `digest` scale or
    carry the step in their push-sum mass or tokens, and `dssfn` trains its own model.
    Float buffers (BatchNorm statistics) are mixed with the parameters by the mix-mode algorithms
    (`Algorithm.mixes_buffers`) and stay local with dpsgd.
    """

    def __init__(
        self, model: torch.nn.Module, config: PeerConfig | dict[str, Any] | str | Path, *, start_timeout_s: float = 60
    ) -> None:
        self.cfg = as_config(config, "peer.Gossip config")
        name: str = self.cfg.algorithm.name  # type: ignore[attr-defined]
        algo = REGISTRY[name]
        if algo.owns_local_update and not algo.follows_caller_step:
            ok = sorted(n for n, a in REGISTRY.items() if not a.owns_local_update or a.follows_caller_step)
            raise ConfigError(
                f"{algo.name} owns the local update (it computes its own steps from gradients), so it cannot follow "
                f"an optimizer the caller steps; peer.Gossip supports {', '.join(ok)} (or run `peer run` with "
                "model.factory/data.factory)",
                field="algorithm.name",
            )
        params: AlgoParams = self.cfg.algorithm  # type: ignore[assignment]
        if algo.owns_local_update and float(getattr(params, "momentum", 0.0)):
            # The caller's optimizer carries the momentum; a second heavy ball on its step would compound it.
            self.cfg = self.cfg.model_copy(update={"algorithm": params.model_copy(update={"momentum": 0.0})})
        self.model = model
        self.node = Node(self.cfg, model=model, external=True, stdout=io.StringIO())
        self.start_timeout_s = start_timeout_s
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    # ----------------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> Gossip:
        self.start()
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self.close()

    def start(self) -> None:
        """Start the daemon thread and wait until it serves (raises its start-up error, if any)."""
        self._thread = threading.Thread(target=self._thread_main, name=f"peer-{self.cfg.node_id}", daemon=True)
        self._thread.start()
        if not self._started.wait(self.start_timeout_s):
            raise StartupError(f"peer.Gossip did not start within {self.start_timeout_s} s")
        self._raise_if_failed()

    def close(self) -> None:
        """Stop the daemon gracefully (final checkpoint written) and join its thread."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.node.request_stop)
        if self._thread is not None:
            self._thread.join()
        self._raise_if_failed()

    def _thread_main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            task = asyncio.create_task(self.node.run())
            ready = asyncio.ensure_future(self.node.ready.wait())
            await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
            self._started.set()
            ready.cancel()
            await task

        try:
            asyncio.run(main())
        except BaseException as exc:  # handed to the caller's thread by _raise_if_failed
            self._error = exc
        finally:
            self._started.set()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, PeerError):
                raise err
            raise StartupError(f"the peer daemon thread failed: {err!r}") from err

    # ---------------------------------------------------------------------------------------------- use
    def step(self) -> bool:
        """After `optimizer.step()`: merge neighbours' state that arrived into the model (in this thread) and
        publish the result. Returns whether neighbour state was merged."""
        if self._thread is None:
            raise RuntimeError("use `with peer.Gossip(...)` or call start() first")
        if not self._thread.is_alive():
            self._raise_if_failed()
            raise StartupError("the peer daemon thread has stopped")
        return self.node.worker.external_step()

    def wait_for_neighbours(self, count: int = 1, timeout_s: float = 30.0) -> bool:
        """Block until at least `count` neighbours are in the view (returns True) or `timeout_s` passed (False).
        Call it before the loop so that peers start together: a peer that starts alone trains on its own data
        until the others arrive (on biased data, a two-peer loop ended at 57% against 94% for its neighbour)."""
        deadline = time.monotonic() + timeout_s
        while len(self.neighbours) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self._thread is None or not self._thread.is_alive():
                self._raise_if_failed()
                raise StartupError("the peer daemon thread has stopped")
            self.node.worker.stop.wait(min(remaining, 0.05))  # the view is published by the loop, not signalled
        return True

    @property
    def address(self) -> str:
        return self.node.address

    @property
    def neighbours(self) -> list[str]:
        return list(self.node.worker.view.degrees)

    @property
    def steps(self) -> int:
        return self.node.trainer.step_count
