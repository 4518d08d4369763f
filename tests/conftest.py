"""Test-wide settings: one intra-op torch thread per test process, and the hypothesis profiles.

The suite runs on small shared CI machines (2 cores) while in-process daemons and simulations use torch from
several threads; torch's default thread pool then oversubscribes the cores and some tests slow down tenfold.

Hypothesis: the `ci` profile (the default run) and the `slow` profile (ten times the examples) when slow tests are
selected (`scripts/test --slow`, i.e. a `-m` expression without "not slow"). The property-based suites count the
status of every case in `tests.helpers.FUZZ_STATUSES`; the totals are printed at the end of the run.

Parallel runs (pytest-xdist; `scripts/test` uses `-n 3 --dist loadfile`): most daemon tests wait on the network far
more than they compute, so several run at once. Tests are isolated by unique node ids, cluster names, ports and
testbed prefixes (a testbed's clean-up only takes down testbeds whose owner process is gone). Each test file runs
in one worker, in file order, as in a serial run: some files share a module-scoped daemon whose last test checks
what the earlier ones did to it. Fuzz totals come back from the workers through `workeroutput`.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(1)

settings.register_profile(
    "ci",
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("slow", parent=settings.get_profile("ci"), max_examples=3000)


def pytest_configure(config: pytest.Config) -> None:
    markexpr = str(config.getoption("markexpr", "") or "")
    settings.load_profile("ci" if "not slow" in markexpr else "slow")


def pytest_sessionfinish(session: pytest.Session) -> None:
    from tests.helpers import FUZZ_STATUSES

    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand the counts to the controller
        workeroutput["fuzz_statuses"] = [[w, s, n] for (w, s), n in FUZZ_STATUSES.items()]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: object, error: object) -> None:
    from tests.helpers import FUZZ_STATUSES

    for w, s, n in getattr(node, "workeroutput", {}).get("fuzz_statuses", []):
        FUZZ_STATUSES[(w, s)] += n


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.helpers import FUZZ_STATUSES

    if not FUZZ_STATUSES:
        return
    profile = settings.get_current_profile_name()
    terminalreporter.write_sep("-", f"fuzz cases by status (hypothesis profile {profile!r})")
    for where in sorted({w for w, _ in FUZZ_STATUSES}):
        row = {s: n for (w, s), n in FUZZ_STATUSES.items() if w == where}
        total = sum(row.values())
        statuses = ", ".join(f"{s} {n}" for s, n in sorted(row.items(), key=lambda kv: -kv[1]))
        terminalreporter.write_line(f"{where}: {total} cases: {statuses}")
    terminalreporter.write_line(f"total: {sum(FUZZ_STATUSES.values())} cases")
