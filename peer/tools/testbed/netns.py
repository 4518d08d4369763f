"""The `ip` plumbing under the testbed: running `ip`, listing namespaces, checking that namespaces can be used."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess

from peer.tools.testbed.common import TestbedError


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise TestbedError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc


def list_netns() -> list[str]:
    proc = _ip("netns", "list", check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be used here (None when they can): not root, no `ip`, no netns."""
    if os.geteuid() != 0:
        return "needs root (network namespaces need CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    name = f"pt{secrets.token_hex(2)}-probe"
    proc = _ip("netns", "add", name, check=False)
    if proc.returncode != 0:
        return f"`ip netns add` failed: {proc.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


def _require_root() -> None:
    if os.geteuid() != 0:
        raise TestbedError("must be run as root (network namespaces need CAP_NET_ADMIN and CAP_SYS_ADMIN)")
    if shutil.which("ip") is None:
        raise TestbedError("the `ip` command (iproute2) is not installed")
