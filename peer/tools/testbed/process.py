"""The testbed's child processes: one `peer run` daemon (`_Daemon`), pdeathsig, pid + start-time liveness."""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any


def _proc_start_time(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot), or None if there is no such live process.
    A pid together with its start time names one process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _alive(pid: int | None, start_time: int | None) -> bool:
    if not pid:
        return False
    now = _proc_start_time(pid)
    return now is not None and (start_time is None or now == start_time)


def _pdeathsig() -> list[str]:
    """`setpriv --pdeathsig KILL`: the child dies with the process that started it (owned testbeds)."""
    return ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []


class _Daemon:
    """One `peer run` process. With a pipe (owned testbeds) a reader thread queues its stdout lines; detached
    ones write stdout to a file and are known by pid and start time only."""

    def __init__(
        self,
        pid: int,
        start_time: int | None,
        out_path: Path,
        log_path: Path,
        popen: subprocess.Popen[str] | None = None,
    ) -> None:
        self.piped = popen is not None and popen.stdout is not None
        self.pid = pid
        self.start_time = start_time
        self.out_path = out_path
        self.log_path = log_path
        self.popen = popen
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.ready_line: dict[str, Any] | None = None
        self.ready_at: float | None = None  # time.monotonic() when the ready line arrived
        self._file_offset = 0
        if self.piped:
            threading.Thread(target=self._pump, name=f"testbed-stdout-{pid}", daemon=True).start()

    def _pump(self) -> None:
        assert self.popen is not None and self.popen.stdout is not None
        with open(self.out_path, "a") as copy_to:
            for line in self.popen.stdout:
                if self.ready_at is None and '"ready"' in line:
                    self.ready_at = time.monotonic()
                copy_to.write(line)
                copy_to.flush()
                self.lines.put(line)
        self.lines.put(None)

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return _alive(self.pid, self.start_time)

    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen is not None else None

    def signal(self, sig: int) -> None:
        if self.popen is not None:
            if self.popen.poll() is None:
                self.popen.send_signal(sig)
        elif _alive(self.pid, self.start_time):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait(self, timeout_s: float) -> int | None:
        """The exit code (None for a detached process, whose parent is gone); TimeoutError if still running."""
        if self.popen is not None:
            try:
                return self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"pid {self.pid} still running after {timeout_s} s") from None
        deadline = time.monotonic() + timeout_s
        while _alive(self.pid, self.start_time):
            if time.monotonic() > deadline:
                raise TimeoutError(f"pid {self.pid} still running after {timeout_s} s")
            time.sleep(0.02)  # another process's exit: nothing to wait on but /proc
        return None

    def next_line(self, timeout_s: float) -> str | None:
        """The next stdout line; None at EOF (the process exited). TimeoutError when none came in time."""
        if self.piped:
            try:
                return self.lines.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError from None
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(OSError), open(self.out_path) as f:
                f.seek(self._file_offset)
                line = f.readline()
                if line.endswith("\n"):
                    self._file_offset = f.tell()
                    if self.ready_at is None and '"ready"' in line:
                        self.ready_at = time.monotonic()
                    return line
            if not self.alive():
                return None
            if time.monotonic() > deadline:
                raise TimeoutError
            time.sleep(0.05)  # a file written by a process we no longer hold a pipe to

    def close(self) -> None:
        if self.popen is not None and self.popen.stdout is not None and self.popen.poll() is not None:
            with contextlib.suppress(OSError):
                self.popen.stdout.close()
