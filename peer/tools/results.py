"""How the benchmark scripts under scripts/ keep their results: print the markdown table, write the JSON and
the markdown beside it (bench-results/NAME.json and NAME.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_results(json_path: str | Path, result: dict[str, Any], md: str) -> None:
    print(md)
    out = Path(json_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(md, encoding="utf-8")
