"""Every command in the docs runs: the runnable shell blocks of README.md and the tutorial pages, in order.

The markers (docs/contributing.md, "Runnable docs"): the line before a fenced shell block is
`<!-- run -->` or `<!-- no-run: why -->`, and every shell block has one of them. A ```text block after
`<!-- expect -->` is the expected output of the run block before it: each non-empty line must appear in that
block's output (stdout and stderr together), where `...` stands for anything within the line.

Each page runs in a scratch directory in one bash shell (`set -eo pipefail`), so a daemon started with `&` in one
block is job %1 in the next. `peer` on PATH is this checkout's. The one liberty taken with the text: a
`discovery.cluster=NAME` gets a suffix unique to this run, so that concurrent runs on one host never see each
other. At the end every process the page started is stopped (its process group).
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_PAGES = ["README.md", *(f"docs/tutorial/{p}" for p in ("one-daemon.md", "two-daemons.md", "lan-fleet.md"))]
RUN_PAGES += ["docs/tutorial/compose.md"]
SHELL = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.M | re.S)
MARK = re.compile(r"<!--\s*(run|expect|no-run:[^>]*)\s*-->\s*$")
BLOCK_TIMEOUT_S = 150.0


@dataclass
class Block:
    page: str
    line: int
    lang: str
    marker: str  # "run", "expect", "no-run: ...", or ""
    code: str
    expect: list[str]


def blocks(page: str) -> list[Block]:
    """The fenced blocks of a page with their markers; each `expect` block is attached to the run block before."""
    text = (ROOT / page).read_text(encoding="utf-8")
    out: list[Block] = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = MARK.search(before)
        marker = mark.group(1) if mark else ""
        line = text.count("\n", 0, m.start()) + 1
        if marker == "expect":
            assert out and out[-1].marker == "run", f"{page}:{line}: an expect block must follow a run block"
            out[-1].expect += [x for x in m.group(2).splitlines() if x.strip()]
            continue
        out.append(Block(page, line, m.group(1), marker, m.group(2), []))
    return out


def test_every_shell_block_says_whether_it_runs() -> None:
    pages = ["README.md", *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").rglob("*.md")))]
    unmarked = [f"{b.page}:{b.line}" for p in pages for b in blocks(p) if b.lang in SHELL and not b.marker]
    assert not unmarked, f"shell blocks without <!-- run --> or <!-- no-run: why -->: {unmarked}"
    runnable = [b for p in pages for b in blocks(p) if b.marker == "run"]
    assert all(b.page in RUN_PAGES for b in runnable), "runnable blocks outside the pages this test runs"


def _matches(expected: str, output: str) -> bool:
    pattern = ".*?".join(re.escape(part.strip()) for part in expected.split("..."))
    return re.search(pattern, output) is not None


class Shell:
    """One bash per page, in its own session so that everything it starts can be stopped together."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd = cwd
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._send("set -eo pipefail\n")

    def _send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def run(self, block: Block, index: int) -> tuple[bool, str]:
        """(finished cleanly, output). A failing command ends the shell (set -e): that is a failed block."""
        script = self.cwd / f".docs-block-{index}.sh"
        out = self.cwd / f".docs-block-{index}.out"
        script.write_text(block.code, encoding="utf-8")
        self._send(f"source {script} > {out} 2>&1 < /dev/null\necho __block_done__\n")
        assert self.proc.stdout is not None
        deadline = time.monotonic() + BLOCK_TIMEOUT_S
        line = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], deadline - time.monotonic())
            if ready:
                line = self.proc.stdout.readline()
                break
        output = out.read_text(encoding="utf-8", errors="replace") if out.exists() else ""
        if not line:
            status = "timed out" if self.proc.poll() is None else f"shell exited {self.proc.returncode}"
            return False, f"({status})\n{output}"
        return line.strip() == b"__block_done__", output

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything that ignored SIGTERM
        except ProcessLookupError:
            pass
        self.proc.wait()


def _env(bin_dir: Path) -> dict[str, str]:
    bin_dir.mkdir()
    shim = bin_dir / "peer"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m peer "$@"\n')
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PEER_", "PYTEST_"))}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    env["NO_COLOR"] = "1"
    return env


# README's two daemons repeat the tutorial's (which run in CI); the README page runs with `scripts/test --slow`.
SLOW_PAGES = {"README.md"}


@pytest.mark.parametrize(
    "page",
    [
        pytest.param(p, marks=[pytest.mark.slow] if p in SLOW_PAGES else [])
        for p in RUN_PAGES
        if any(b.marker == "run" for b in blocks(p))
    ],
)
@pytest.mark.timeout(400)
def test_runnable_blocks_run_and_print_what_the_docs_say(page: str, tmp_path: Path) -> None:
    cluster = uuid.uuid4().hex[:8]
    scratch = tmp_path / "work"
    scratch.mkdir()
    shell = Shell(scratch, _env(tmp_path / "bin"))
    try:
        for i, block in enumerate(b for b in blocks(page) if b.marker == "run"):
            code = re.sub(r"discovery\.cluster=([\w.-]+)", rf"discovery.cluster=\1-{cluster}", block.code)
            ok, output = shell.run(Block(block.page, block.line, block.lang, block.marker, code, []), i)
            where = f"{page}:{block.line}"
            assert ok, f"{where}: a command failed\n--- block\n{block.code}--- output\n{output}"
            assert "Traceback" not in output, f"{where}: a traceback reached the user\n{output}"
            missing = [e for e in block.expect if not _matches(e, output)]
            assert not missing, f"{where}: expected output not found: {missing}\n--- output\n{output}"
    finally:
        shell.close()
