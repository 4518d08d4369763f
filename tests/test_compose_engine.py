"""The compose cluster on a real container engine, as a user runs it: build, `up -d` (the one-shot `certs` service
makes the cluster CA, then every peer speaks mutual TLS), every service healthy, the peers find each other (over
TLS) and train with the daemon's defaults, the consensus model's accuracy, then `down` and `up`
again with the state kept in the named volumes, and `down -v`.

Marked `engine` (excluded by default; `scripts/test --engine`). Skipped, saying why, without Docker Compose (v2
`docker compose` or 1.x `docker-compose`), a running engine, or the base image `python:3.11-slim`. The build reads
TORCH_VERSION / TORCH_INDEX_URL / TORCH_FIND_LINKS and PEER_BUILD_NETWORK from the environment, as compose does.
Set PEER_ENGINE_REPORT=PATH to write the measured figures there as JSON.

The engine is another process: its state (health, the daemons' status) is polled with a deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ["peer0", "peer1", "peer2", "peer3"]
BASE_IMAGE = "python:3.11-slim"
STATE_DIR = "/home/peer/state"
CERTS_DIR = "/home/peer/certs"  # made by the one-shot `certs` service; the peers speak mutual TLS
HEALTHY_WITHIN_S = 180.0  # start_period 60 s on 2 cores, with room for a loaded machine
TRAINED_WITHIN_S = 600.0
POLL_S = 1.0
T = TypeVar("T")


def _run(cmd: list[str], timeout_s: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def poll(fn: Callable[[], T | None], timeout_s: float, what: str) -> T:
    """fn() until it returns something other than None, or fail after timeout_s naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = fn()
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(POLL_S)  # another process's state: nothing to wait on but the clock


class Cluster:
    """One compose project (a unique name, so its containers and volumes never meet a user's)."""

    def __init__(self, compose: list[str]) -> None:
        self.project = f"peer-engine-{uuid.uuid4().hex[:8]}"
        self.base = [*compose, "-p", self.project, "-f", str(ROOT / "docker-compose.yml")]
        self.figures: dict[str, Any] = {"project": self.project, "compose": " ".join(compose)}

    def __call__(self, *args: str, timeout_s: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run([*self.base, *args], timeout_s=timeout_s, check=check)

    def timed(self, key: str, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        start = time.monotonic()
        proc = self(*args, timeout_s=timeout_s)
        self.figures[key] = round(time.monotonic() - start, 1)
        return proc

    def containers(self) -> dict[str, str]:
        return {s: self("ps", "-q", s).stdout.strip() for s in SERVICES}

    def health(self) -> dict[str, str]:
        out = {}
        for service, cid in self.containers().items():
            state = _run(["docker", "inspect", "-f", "{{json .State}}", cid]).stdout if cid else "{}"
            parsed = json.loads(state)
            if parsed.get("Status") == "exited":
                logs = _run(["docker", "logs", "--tail", "30", cid], check=False)
                raise AssertionError(f"{service} exited {parsed.get('ExitCode')}:\n{logs.stdout}{logs.stderr}")
            out[service] = (parsed.get("Health") or {}).get("Status", "none")
        return out

    def wait_healthy(self, key: str, since: float) -> None:
        poll(lambda: True if set(self.health().values()) == {"healthy"} else None, HEALTHY_WITHIN_S, "all healthy")
        self.figures[key] = round(time.monotonic() - since, 1)

    def status(self, service: str) -> dict[str, Any]:
        tls = [
            "--ca",
            f"{CERTS_DIR}/ca.pem",
            "--cert",
            f"{CERTS_DIR}/{service}.pem",
            "--key",
            f"{CERTS_DIR}/{service}.key",
        ]
        proc = self("exec", "-T", service, "peer", "status", "127.0.0.1:50051", "--json", *tls, timeout_s=60)
        return dict(json.loads(proc.stdout))

    def eval(self, service: str, running: bool) -> dict[str, Any]:
        """`peer eval` of the service's checkpoint in its volume (in the running container, or a one-off)."""
        if running:
            proc = self("exec", "-T", service, "peer", "eval", "--state-dir", STATE_DIR, "--json", timeout_s=120)
        else:
            proc = self("run", "--rm", "--no-deps", "-T", service, "eval", "--state-dir", STATE_DIR, "--json")
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))

    def logs(self) -> str:
        return self("logs", "--no-color", check=False).stdout


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    compose = _compose_command()
    if compose is None:
        pytest.skip("no Docker Compose: neither `docker compose` (v2) nor `docker-compose` (1.x) is installed")
    if shutil.which("docker") is None:
        pytest.skip("no `docker` command (the engine's CLI)")
    if _run(["docker", "info"], check=False).returncode != 0:
        pytest.skip("no container engine answers `docker info` (is dockerd running, and may this user reach it?)")
    have_base = _run(["docker", "image", "inspect", BASE_IMAGE], check=False).returncode == 0
    if not have_base and _run(["docker", "pull", BASE_IMAGE], timeout_s=600, check=False).returncode != 0:
        pytest.skip(f"no base image {BASE_IMAGE}: it cannot be pulled here and was not built locally")
    c = Cluster(compose)
    try:
        yield c
    finally:
        c("down", "-v", "--remove-orphans", timeout_s=180, check=False)
        report = os.environ.get("PEER_ENGINE_REPORT")
        if report:
            Path(report).write_text(json.dumps(c.figures, indent=2) + "\n", encoding="utf-8")


def test_compose_cluster_builds_trains_and_keeps_its_state(cluster: Cluster) -> None:
    c = cluster
    version = _run(["docker", "version", "--format", "{{.Server.Version}}"]).stdout.strip()
    c.figures["engine"] = f"Docker {version}"
    c.figures["compose_version"] = c("version").stdout.strip().splitlines()[0]
    c.timed("build_s", "build", timeout_s=1500)

    start = time.monotonic()
    c("up", "-d")
    c.wait_healthy("up_to_healthy_s", start)

    # Every peer sees the other three alive, and trains to the end of its epochs with the daemon's defaults.
    def trained() -> dict[str, dict[str, Any]] | None:
        st = {s: c.status(s) for s in SERVICES}
        for s in st.values():
            alive = {n["node_id"] for n in s.get("neighbours", []) if n.get("state") == "alive"}
            if len(alive) < len(SERVICES) - 1 or not s.get("training_done"):
                return None
        return st

    status = poll(trained, TRAINED_WITHIN_S, "every peer to see the other three and finish training")
    c.figures["up_to_trained_s"] = round(time.monotonic() - start, 1)
    steps = {s: int(st["step"]) for s, st in status.items()}
    c.figures["steps"] = steps
    c.figures["epochs"] = {s: st["epoch"] for s, st in status.items()}
    c.figures["rejected"] = {
        s: {k: v for k, v in st.get("info", {}).items() if k.startswith("rejected.")} for s, st in status.items()
    }
    for s, st in status.items():
        assert int(st["bytes_received"]) > 0, f"{s} received nothing from its neighbours"
    logs = c.logs()
    c.figures["rejected_push_warnings"] = logs.count("rejected a push")
    c.figures["incomplete_pushes_noted"] = logs.count("incomplete push")
    c.figures["catch_up_adoptions"] = logs.count("caught up: adopted")

    # `down` stops the daemons (SIGTERM: each writes its final checkpoint) and keeps the named volumes.
    c.timed("down_s", "down", timeout_s=180)
    accuracy = {s: c.eval(s, running=False) for s in SERVICES}
    c.figures["accuracy"] = {s: a["accuracy"] for s, a in accuracy.items()}
    for s, a in accuracy.items():
        assert a["step"] == steps[s], f"{s}: checkpoint at step {a['step']}, the daemon reported {steps[s]}"
        assert a["accuracy"] > 0.2, f"{s}: accuracy {a['accuracy']:.3f} is near chance (10 classes)"

    # `up` again: the state in the volumes survived; training does not start over.
    start = time.monotonic()
    c("up", "-d")
    c.wait_healthy("up_again_to_healthy_s", start)
    again = {s: c.status(s) for s in SERVICES}
    c.figures["steps_after_restart"] = {s: int(st["step"]) for s, st in again.items()}
    for s, st in again.items():
        assert int(st["step"]) >= steps[s] and st["training_done"], f"{s} started over: {st['step']} < {steps[s]}"
    for s in SERVICES:
        assert c.eval(s, running=True)["step"] >= steps[s]
    c.timed("down_v_s", "down", "-v", timeout_s=180)
