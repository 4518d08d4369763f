"""The layout's rules, checked on the source: pure layers import no I/O, imports run one way, no cycles, small
modules, one place that catches gRPC errors, and test modules that import helpers, never each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "peer"

# Layers, from the bottom up. A module may import its own layer and the layers listed as below it.
LAYER_OF_PACKAGE = {
    "core": "core",
    "algorithms": "algorithms",
    "net": "net",
    "learn": "learn",
    "daemon": "daemon",
    "tools": "tools",
    "v1": "v1",
}
ALLOWED = {
    "core": {"core"},
    "algorithms": {"core", "algorithms"},
    "v1": {"v1"},
    "net": {"core", "algorithms", "net", "v1"},
    "learn": {"core", "algorithms", "learn"},
    "daemon": {"core", "algorithms", "net", "learn", "daemon", "v1"},
    "tools": {"core", "algorithms", "net", "learn", "daemon", "tools", "v1"},
}
# Root modules every layer may use (they import no layer above `core`/`algorithms` at module level).
SHARED_ROOT = {"peer", "peer.errors", "peer.config", "peer.config_sections", "peer.logs"}
# The wire codec's pure parts: encoding and validation of bytes, no sockets.
PURE_NET = ["peer.net.wire", "peer.net.encoder", "peer.net.assembler", "peer.net.addresses"]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """Modules `path` imports (`from peer.x import y` counts as peer.x and peer.x.y, whichever exists)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.If) and top_level_only:
            continue  # `if TYPE_CHECKING:` blocks
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in LAYER_OF_PACKAGE:
        return LAYER_OF_PACKAGE[parts[1]]
    return None


def test_imports_follow_the_layers() -> None:
    """tools -> daemon -> net/learn -> algorithms/core, never upwards (module-level imports)."""
    modules = _modules()
    bad = []
    for name, path in modules.items():
        layer = _layer(name)
        for imp in _imports(path, top_level_only=True):
            if imp not in modules:
                continue
            target = _layer(imp)
            if layer is None:
                # Root modules (cli, config, errors, logs) may import the pure layers only at module level.
                if target not in (None, "core", "algorithms") and name not in ("peer.cli", "peer.__main__"):
                    bad.append(f"{name} -> {imp}")
            elif target is not None and target not in ALLOWED[layer]:
                bad.append(f"{name} ({layer}) -> {imp} ({target})")
            elif target is None and imp not in SHARED_ROOT and imp != "peer.cli":
                bad.append(f"{name} -> {imp} (root module)")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {
        name: {i for i in _imports(path, top_level_only=True) if i in modules and i != name}
        for name, path in modules.items()
    }
    # A package's __init__ re-exporting its own modules is not a cycle worth reporting.
    for name in graph:
        graph[name] = {i for i in graph[name] if not (i.startswith(name + ".") or name.startswith(i + "."))}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_pure_layers_load_no_io_libraries() -> None:
    """The core, the algorithms and the codec's pure parts load without grpc, zeroconf or asyncio's event loop
    machinery of their own (torch itself imports asyncio, so that is checked on the source below)."""
    pure = ["peer.core", *sorted(m for m in _modules() if m.startswith("peer.core.")), "peer.algorithms", *PURE_NET]
    code = (
        "import importlib, sys\n"
        f"for m in {pure!r}: importlib.import_module(m)\n"
        "bad = [m for m in ('grpc', 'zeroconf', 'ifaddr') if m in sys.modules]\n"
        "print(*bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    for name, path in _modules().items():
        if not (name.startswith(("peer.core", "peer.algorithms")) or name in PURE_NET):
            continue
        for imp in _imports(path, top_level_only=False):
            root = imp.split(".")[0]
            assert root not in {"asyncio", "socket", "time", "grpc", "zeroconf", "threading"}, (name, imp)
            assert not imp.startswith("peer.v1.gossip_pb2_grpc"), (name, imp)


def test_core_loads_without_torch() -> None:
    """The protocol core is plain Python: it must not need torch (tests and tools use it cheaply)."""
    core = sorted(m for m in _modules() if m.startswith("peer.core"))
    code = (
        "import importlib, sys\n"
        f"for m in {core!r}: importlib.import_module(m)\n"
        "print('torch' in sys.modules); sys.exit(1 if 'torch' in sys.modules else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_modules_stay_small() -> None:
    big = {
        str(p.relative_to(ROOT)): n
        for p in PKG.rglob("*.py")
        if "v1" not in p.parts and (n := len(p.read_text(encoding="utf-8").splitlines())) > 500
    }
    assert not big, f"modules over 500 lines: {big}"


def test_grpc_errors_are_caught_in_one_module() -> None:
    catching = set()
    for path in [*PKG.rglob("*.py"), *(ROOT / "scripts").glob("*.py")]:
        if "v1" in path.parts:
            continue
        if "except grpc.RpcError" in path.read_text(encoding="utf-8") or "except RpcError" in path.read_text(
            encoding="utf-8"
        ):
            catching.add(str(path.relative_to(ROOT)))
    assert catching == {"peer/net/rpc_errors.py"}, catching


@pytest.mark.parametrize("path", sorted((ROOT / "tests").glob("test_*.py")), ids=lambda p: p.name)
def test_test_modules_import_no_other_test_module(path: Path) -> None:
    others = {i for i in _imports(path, top_level_only=False) if i.startswith("tests.test_")}
    assert not others, f"{path.name} imports {others}; move shared code to a helper module"
