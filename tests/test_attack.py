"""A real attacker: 5 daemons over mutual TLS (certificates of one throwaway CA, so the attacker is an
authenticated member), on a full graph, D-PSGD on digits; one of them (`tests.attackers.HostileNode`) pushes every
model scaled by 1e4. With `algorithm.robust: clip` the honest peers end within 3 points of the attacker-free run;
without a defence they fall to chance, so the test can fail. The full table (every attack against none, clip,
trimmed_mean and median) is `scripts/bench_attack.py`."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from tests.attackers import DPSGD, attacked_cluster

pytestmark = pytest.mark.timeout(150)


async def test_clipping_holds_off_an_authenticated_attacker(tmp_path: Path) -> None:
    clean = await attacked_cluster(tmp_path / "clean", attack=None, algorithm=DPSGD)
    undefended = await attacked_cluster(tmp_path / "none", attack="scaled_1e4", algorithm=DPSGD)
    defended = await attacked_cluster(tmp_path / "clip", attack="scaled_1e4", algorithm={**DPSGD, "robust": "clip"})
    reference = statistics.mean(clean)
    assert reference > 0.85, clean  # the attacker-free run learned (the comparison means something)
    assert max(undefended) < 0.5, (clean, undefended)  # 10 classes: 0.1 is chance
    assert min(defended) >= reference - 0.03, (clean, defended)
