"""The commit a benchmark ran on, for the header of its committed results (bench-results/)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_revision(root: Path) -> str:
    """The short commit of the checkout at `root`, with "+dirty" when tracked files have uncommitted changes;
    "unknown" outside a git checkout (a source tarball, a container image)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")
