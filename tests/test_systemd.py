"""systemd integration: the notify protocol against a real datagram socket and a real `peer run` process, the
watchdog task, journald-friendly log lines, and `systemd-analyze verify` of the unit where it is installed."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peer import config
from peer.daemon.sdnotify import Notifier
from peer.logs import JournalFormatter, stderr_is_journal
from tests.helpers import PeerProcess, fast_config, unique

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "systemd" / "peer.service"


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound AF_UNIX datagram socket, as systemd's NOTIFY_SOCKET (a short path: sun_path holds 108 bytes)."""
    path = f"/tmp/peer-notify-{os.getpid()}-{unique('s')}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield sock, path
    finally:
        sock.close()
        os.unlink(path)


def _receive_until(sock: socket.socket, wanted: str, timeout_s: float) -> list[str]:
    """Datagrams until one holding the line `wanted` arrives (blocking receive with a deadline)."""
    got: list[str] = []
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {wanted} within {timeout_s} s; received {got}")
        sock.settimeout(left)
        try:
            msg = sock.recv(4096).decode()
        except TimeoutError:
            continue
        got.append(msg)
        if wanted in msg.splitlines():
            return got


def test_notifier_abstract_namespace_and_no_socket() -> None:
    name = f"peer-test-{os.getpid()}-{unique('a')}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        n = Notifier(f"@{name}")
        assert n.notify("STATUS=hello", "READY=1")
        assert sock.recv(4096) == b"STATUS=hello\nREADY=1"
    assert not Notifier(None).notify("READY=1")  # outside systemd: a no-op
    assert not Notifier("/nonexistent/socket").notify("READY=1")  # logged once, never raised


def test_watchdog_settings_from_the_environment() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "42"}
    assert Notifier.from_env(env, pid=42).watchdog_interval_s == pytest.approx(10.0)
    assert Notifier.from_env(env, pid=43).watchdog_interval_s is None  # the watchdog is another process's
    assert Notifier.from_env({"NOTIFY_SOCKET": "/run/x"}).watchdog_interval_s is None
    assert not Notifier.from_env({}).enabled


async def test_watchdog_task_pings_until_stopped(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    stopped = asyncio.Event()
    task = asyncio.create_task(Notifier(path, watchdog_usec=20_000).watchdog(stopped))
    got = await asyncio.to_thread(_receive_until, sock, "WATCHDOG=1", 10)
    got += await asyncio.to_thread(_receive_until, sock, "WATCHDOG=1", 10)
    stopped.set()
    await asyncio.wait_for(task, 5)
    assert got == ["WATCHDOG=1", "WATCHDOG=1"]


@pytest.mark.timeout(120)
def test_real_daemon_notifies_ready_watchdog_and_stopping(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    cfg = fast_config(tmp_path, unique("sd"), **{"train.epochs": 200})
    cfg_path = tmp_path / "peer.yaml"
    cfg_path.write_text(config.dump(cfg))
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}  # a ping every 0.2 s
    proc = PeerProcess(cfg_path, tmp_path / "peer.log", env=env)
    try:
        ready = proc.ready(timeout_s=90)
        got = _receive_until(sock, "READY=1", 30)
        ready_msg = got[-1].splitlines()
        assert f"STATUS=serving on {ready['address']}" in ready_msg
        assert f"MAINPID={proc.proc.pid}" in ready_msg
        _receive_until(sock, "WATCHDOG=1", 30)
        _receive_until(sock, "WATCHDOG=1", 30)
        proc.proc.send_signal(signal.SIGTERM)
        _receive_until(sock, "STOPPING=1", 30)
    finally:
        code = proc.stop()
    assert code == 0, (tmp_path / "peer.log").read_text()[-3000:]


def test_journal_formatter_prefixes_priorities() -> None:
    record = logging.LogRecord("peer.x", logging.WARNING, __file__, 1, "line one\nline two", None, None)
    record.node_id = "n1"
    assert JournalFormatter().format(record) == "<4>[n1] peer.x: line one\n<4>line two"
    st = os.fstat(sys.stderr.fileno())
    assert stderr_is_journal(f"{st.st_dev}:{st.st_ino}")
    assert not stderr_is_journal(None) and not stderr_is_journal("1:2")


def test_unit_file_verifies() -> None:
    text = UNIT.read_text()
    for directive in (
        "Type=notify",
        "WatchdogSec=",
        "DynamicUser=yes",
        "StateDirectory=peer",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "AF_NETLINK",
    ):
        assert directive in text, directive
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart's program exists: point it at this interpreter.
    unit = Path(f"/tmp/peer-verify-{os.getpid()}-{unique('u')}") / "peer.service"
    unit.parent.mkdir()
    try:
        unit.write_text(text.replace("/opt/peer/venv/bin/peer", f"{sys.executable} -m peer"))
        verify = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
        # It exits 0 on many problems and only complains on stderr ("Failed to parse ..."): require silence.
        assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
        security = subprocess.run(
            [tool, "security", "--offline=yes", str(unit)], capture_output=True, text=True, timeout=60
        )
        level = re.search(r"Overall exposure level for peer\.service: ([0-9.]+)", security.stdout + security.stderr)
        assert level is not None, security.stdout + security.stderr
        assert float(level.group(1)) <= 2.5, security.stdout
    finally:
        shutil.rmtree(unit.parent)
