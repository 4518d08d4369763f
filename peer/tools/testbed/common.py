"""What every testbed module shares: the error type, names and addresses, config merging, small file helpers."""

from __future__ import annotations

import copy
import ipaddress
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

DEFAULT_STATE_DIR = Path("/run/peer-testbed")
SUBNET = ipaddress.IPv4Network("198.18.0.0/24")  # inside 198.18.0.0/15; host i is .(i + 1)
ROUTER_HOST = 254  # with two routed subnets, the router is 198.18.<subnet>.254
MAX_HOSTS = 200
DEFAULT_PORT = 50051
HOST_IF = "eth0"
PREFIX_RE = re.compile(r"^pt[0-9a-f]{4}-$")
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "grpc_proxy")


class TestbedError(RuntimeError):
    """A testbed operation failed (not root, `ip` failed, a daemon did not start, ...)."""

    __test__ = False  # not a pytest test class


# -------------------------------------------------------------------------------------------------- helpers
def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A new dict: `over` merged into `base`, nested dicts merged key by key."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_sets(items: Iterable[str]) -> dict[str, Any]:
    """`["a.b=1", "c=[x]"]` -> `{"a": {"b": 1}, "c": ["x"]}` (values parsed as YAML, as `peer run --set`)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise TestbedError(f"--set expects KEY=VALUE, got {item!r}")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(text)
    return out


def subnet_address(subnet: int, host: int) -> str:
    """198.18.<subnet>.<host>"""
    return str(SUBNET.network_address + 256 * subnet + host)


def host_ip(i: int, subnet: int = 0) -> str:
    """Host i's address: 198.18.<subnet>.(i + 1)."""
    return subnet_address(subnet, i + 1)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"
