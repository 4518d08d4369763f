"""scripts/_fleet.py's step rate, which the straggler and overhead benchmarks read from metrics records."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _fleet() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_fleet", ROOT / "scripts" / "_fleet.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("_fleet", module)
    spec.loader.exec_module(module)
    return module


def _records() -> list[dict[str, float]]:
    # A late starter: 10 steps per second, but 35 steps adopted at once from a neighbour ahead between 1 s and 2 s.
    return [
        {"elapsed_s": 0.0, "step": 0},
        {"elapsed_s": 1.0, "step": 5},
        {"elapsed_s": 2.0, "step": 50},
        {"elapsed_s": 3.0, "step": 60},
        {"elapsed_s": 4.0, "step": 70},
        {"elapsed_s": 5.0, "step": 80},
        {"elapsed_s": 6.0, "step": 90},
        {"elapsed_s": 6.25, "step": 90},
    ]


def test_step_rate_counts_from_the_first_training_record() -> None:
    rate, steps, seconds = _fleet().step_rate(_records())
    assert (steps, seconds) == (85, 5.0)
    assert rate == pytest.approx(17.0)  # the adoption jump inflates it


def test_step_rate_past_a_fraction_of_the_run_leaves_the_start_up_jump_out() -> None:
    rate, steps, seconds = _fleet().step_rate(_records(), skip_fraction=0.25)
    assert (steps, seconds) == (40, 4.0)
    assert rate == pytest.approx(10.0)


def test_step_rate_refuses_a_run_too_short_to_measure() -> None:
    with pytest.raises(RuntimeError, match="train longer"):
        _fleet().step_rate([{"elapsed_s": 0.0, "step": 0}, {"elapsed_s": 1.0, "step": 5}])
