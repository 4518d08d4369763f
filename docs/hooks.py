"""mkdocs hook: the committed benchmark tables in bench-results/*.md become pages under benchmarks/, as they are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files


def on_files(files: Files, config: Any) -> Files:
    root = Path(config.config_file_path).parent
    for md in sorted((root / "bench-results").glob("*.md")):
        files.append(File.generated(config, f"benchmarks/{md.name}", content=md.read_text(encoding="utf-8")))
    return files
