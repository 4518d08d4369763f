"""Starting, watching and stopping `peer run` child processes (used by `peer demo`)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from peer.errors import PeerError

if TYPE_CHECKING:
    pass


# ------------------------------------------------------------------------------------------------ processes
READY_TIMEOUT_S = 60.0


class DemoError(PeerError):
    """The demo cannot go on (a peer died, a timeout, an unusable --out directory)."""


_PR_SET_PDEATHSIG = 1


def _pdeathsig_hook() -> Any:
    """Linux: a pre-exec hook so that a peer gets SIGTERM if the demo dies without cleaning up (SIGKILL).

    libc is loaded here, in the parent, so that the child only makes one plain call between fork and exec.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:  # pragma: no cover - runs in the child
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))

    return hook


@dataclass
class PeerProc:
    index: int
    node_id: str
    config_path: Path
    state_dir: Path
    log_path: Path
    proc: subprocess.Popen[str]
    log_file: IO[bytes]
    ready: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    address: str = ""
    reader: threading.Thread | None = None

    def read_stdout(self) -> None:
        assert self.proc.stdout is not None
        announced = False
        for line in self.proc.stdout:
            if announced:
                continue  # keep draining so the pipe never fills
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict) and msg.get("event") == "ready":
                announced = True
                self.ready.put(msg)

    def log_tail(self, lines: int = 25) -> str:
        with contextlib.suppress(OSError):
            self.log_file.flush()
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        tail = text.splitlines()[-lines:]
        return "\n".join("    " + t for t in tail) if tail else "    (empty log)"


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Tiny models on a shared CPU: one intra-op thread per peer avoids N processes fighting over every core.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def start_peer(
    index: int, node_id: str, config_path: Path, state_dir: Path, log_path: Path, *, read: bool = True
) -> PeerProc:
    """Launch `peer run`; its stdout is read by a thread (started here, or later by `start_reader`)."""
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed in stop_all
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "peer", "run", "--config", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            env=_child_env(),
            start_new_session=True,  # Ctrl-C reaches the demo only; it stops the peers itself
            preexec_fn=_pdeathsig_hook(),
        )
    except BaseException:
        log_file.close()
        raise
    p = PeerProc(index, node_id, config_path, state_dir, log_path, proc, log_file)
    if read:
        start_reader(p)
    return p


def start_reader(p: PeerProc) -> None:
    p.reader = threading.Thread(target=p.read_stdout, name=f"demo-stdout-{p.node_id}", daemon=True)
    p.reader.start()


def stop_all(procs: Sequence[PeerProc], timeout_s: float, *, quiet: bool = False) -> dict[str, int | None]:
    """SIGTERM every live peer, wait up to `timeout_s`, then SIGKILL (with a warning). Returns exit codes."""
    for p in procs:
        if p.proc.poll() is None:
            with contextlib.suppress(OSError):
                p.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    codes: dict[str, int | None] = {}
    for p in procs:
        try:
            codes[p.node_id] = p.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            if not quiet:
                print(f"warning: {p.node_id} did not exit {timeout_s:g} s after SIGTERM; killing it", file=sys.stderr)
            with contextlib.suppress(OSError):
                p.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.proc.wait(timeout=5.0)
            codes[p.node_id] = None
    for p in procs:
        if p.reader is not None:
            p.reader.join(timeout=2.0)
        with contextlib.suppress(OSError):
            p.log_file.close()
        if p.proc.stdout is not None:
            with contextlib.suppress(OSError):
                p.proc.stdout.close()
    return codes


def check_alive(procs: Sequence[PeerProc], what: str) -> None:
    for p in procs:
        code = p.proc.poll()
        if code is not None:
            raise DemoError(f"{p.node_id} exited with code {code} {what}; last lines of {p.log_path}:\n{p.log_tail()}")


def wait_ready(procs: Sequence[PeerProc], deadline: float) -> None:
    ready_by = min(deadline, time.monotonic() + READY_TIMEOUT_S)
    pending = list(procs)
    while pending:
        for p in list(pending):
            try:
                msg = p.ready.get_nowait()
            except queue.Empty:
                continue
            p.address = str(msg.get("address", ""))
            pending.remove(p)
        if not pending:
            break
        check_alive(procs, "before it was ready")
        if time.monotonic() > ready_by:
            names = ", ".join(p.node_id for p in pending)
            tails = "\n".join(f"  {p.node_id} ({p.log_path}):\n{p.log_tail(10)}" for p in pending)
            if ready_by >= deadline:
                raise TimeoutError(f"--timeout-s expired while waiting for {names} to start\n{tails}")
            raise DemoError(f"{names} did not report ready within {READY_TIMEOUT_S:g} s\n{tails}")
        time.sleep(0.05)


# -------------------------------------------------------------------------------------------------- progress
def last_metrics(path: Path) -> dict[str, Any] | None:
    """The last complete JSON line of a metrics file (reads only its tail)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            data = fh.read()
    except OSError:
        return None
    for line in reversed(data.splitlines()):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            return rec
    return None


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def progress_line(records: Sequence[dict[str, Any] | None], node_ids: Sequence[str], epochs: float) -> str:
    parts, nbrs, sent = [], [], 0
    for node_id, rec in zip(node_ids, records, strict=True):
        if rec is None:
            parts.append(f"{node_id} -")
            nbrs.append("-")
            continue
        ep = float(rec.get("epoch") or 0.0)
        parts.append(f"{node_id} {'done' if rec.get('training_done') else f'{ep:.1f}/{epochs:g}'}")
        nbrs.append(str(len(rec.get("neighbours") or [])))
        sent += int(rec.get("bytes_sent") or 0)
    phase = "consensus" if all(r is not None and r.get("training_done") for r in records) else "training"
    return f"{phase}  {'  '.join(parts)}  neighbours {'/'.join(nbrs)}  sent {mb(sent)}"


def foreign_neighbours(records: Sequence[dict[str, Any] | None], node_ids: Sequence[str]) -> set[str]:
    """Neighbours in the metrics that are not this demo's peers (another daemon on the same mDNS link)."""
    ours = set(node_ids)
    return {str(j) for r in records if r for j in (r.get("neighbours") or []) if str(j) not in ours}


def watch(procs: Sequence[PeerProc], epochs: float, deadline: float, foreign: set[str] | None = None) -> float:
    """Show progress until every peer reports training_done; returns the training wall time.

    Neighbours that are not this demo's peers are added to `foreign` (and reported once).
    """
    tty = sys.stdout.isatty()
    node_ids = [p.node_id for p in procs]
    started = time.monotonic()
    last_plain = -math.inf
    width = 0
    try:
        while True:
            check_alive(procs, "during training")
            records = [last_metrics(p.state_dir / "metrics.jsonl") for p in procs]
            strangers = foreign_neighbours(records, node_ids) - (foreign or set())
            if strangers and foreign is not None:
                foreign |= strangers
                names = ", ".join(sorted(strangers))
                print(
                    f"\nwarning: peers outside this demo joined the network over mDNS: {names}; the results mix in "
                    "their models",
                    file=sys.stderr,
                )
            done = all(r is not None and r.get("training_done") for r in records)
            line = progress_line(records, node_ids, epochs)
            now = time.monotonic()
            if tty:
                # One line, cut to the terminal width so that "\r" can overwrite it.
                shown = line[: max(20, shutil.get_terminal_size().columns - 1)]
                sys.stdout.write("\r" + shown.ljust(width))
                sys.stdout.flush()
                width = max(width, len(shown))
            elif now - last_plain >= 5.0 or done:
                print(line, flush=True)
                last_plain = now
            if done:
                return now - started
            if now > deadline:
                raise TimeoutError(f"--timeout-s expired during training; last progress: {line}")
            time.sleep(0.5)
    finally:
        if tty:
            sys.stdout.write("\n")
            sys.stdout.flush()
