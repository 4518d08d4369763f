"""The docs site builds (`mkdocs build --strict`: no broken links or anchors) and its generated pages are fresh."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peer.tools import config_reference

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_reference_is_generated_from_the_config_model() -> None:
    committed = (ROOT / "docs" / "reference" / "configuration.md").read_text(encoding="utf-8")
    assert committed == config_reference.render(), (
        "docs/reference/configuration.md is stale: run `python -m peer.tools.config_reference > "
        "docs/reference/configuration.md`"
    )


def test_every_config_field_has_a_description() -> None:
    text = config_reference.render()
    empty = [
        line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| `") and line.endswith("|  |")
    ]
    assert not empty, f"config fields without a description: {empty}"


@pytest.mark.timeout(120)
@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
    reason="mkdocs and mkdocs-material are not installed (scripts/test installs them with the test tools)",
)
def test_site_builds_strictly(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=110,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for page in (
        "tutorial/two-daemons/index.html",
        "reference/configuration/index.html",
        "benchmarks/faults/index.html",
    ):
        assert (tmp_path / "site" / page).exists(), page
