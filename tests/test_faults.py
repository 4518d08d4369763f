"""Fault injection: reproducible decisions, the right rates and distributions, Gilbert–Elliott statistics."""

from __future__ import annotations

import math
import random

import pytest
from pydantic import ValidationError

from peer.core.faults import DelaySpec, FaultInjector, FaultsConfig, OutageConfig, parse_delay


def faults(**kwargs: object) -> FaultsConfig:
    return FaultsConfig.model_validate(kwargs)


def error_locs(exc: ValidationError) -> list[str]:
    return [".".join(str(p) for p in err["loc"]) for err in exc.errors()]


# -- config ---------------------------------------------------------------------------------------------------


def test_defaults_are_neutral() -> None:
    cfg = FaultsConfig()
    inj = FaultInjector(cfg, node_id="a")
    assert not inj.enabled
    assert inj.decide("b", 0.0).drop is False
    assert inj.straggler_sleep_s(1.0) == 0.0
    assert not FaultInjector(faults(delay_s="const:0"), node_id="a").enabled
    assert not FaultInjector(faults(delay_s="normal:0,0"), node_id="a").enabled


@pytest.mark.parametrize(
    "kwargs",
    [
        {"drop_probability": 0.1},
        {"delay_s": "exp:0.01"},
        {"outage": {"mean_up_s": 1, "mean_down_s": 1}},
        {"slowdown": 2.0},
    ],
)
def test_any_knob_enables(kwargs: dict[str, object]) -> None:
    assert FaultInjector(faults(**kwargs), node_id="a").enabled


@pytest.mark.parametrize(
    ("kwargs", "loc"),
    [
        ({"drop_probability": 1.0}, "drop_probability"),
        ({"drop_probability": -0.1}, "drop_probability"),
        ({"drop_probability": float("nan")}, "drop_probability"),
        ({"slowdown": 0.5}, "slowdown"),
        ({"slowdown": float("inf")}, "slowdown"),
        ({"delay_s": "gamma:1,2"}, "delay_s"),
        ({"delay_s": "const"}, "delay_s"),
        ({"delay_s": "const:-1"}, "delay_s"),
        ({"delay_s": "uniform:0.2,0.1"}, "delay_s"),
        ({"delay_s": "uniform:0.1"}, "delay_s"),
        ({"delay_s": "exp:abc"}, "delay_s"),
        ({"delay_s": "normal:0.1,-1"}, "delay_s"),
        ({"delay_s": "exp:inf"}, "delay_s"),
        ({"outage": {"mean_up_s": 0, "mean_down_s": 1}}, "outage.mean_up_s"),
        ({"outage": {"mean_up_s": 1, "mean_down_s": -1}}, "outage.mean_down_s"),
        ({"outage": {"mean_up_s": 1}}, "outage.mean_down_s"),
        ({"outage": {"mean_up_s": 1, "mean_down_s": 1, "links": [""]}}, "outage.links"),
        ({"outage": {"mean_up_s": 1, "mean_down_s": 1, "extra": 1}}, "outage.extra"),
        ({"drop_rate": 0.1}, "drop_rate"),
    ],
)
def test_validation_names_the_field(kwargs: dict[str, object], loc: str) -> None:
    with pytest.raises(ValidationError) as info:
        faults(**kwargs)
    assert loc in error_locs(info.value)


def test_delay_error_message_lists_forms() -> None:
    with pytest.raises(ValidationError) as info:
        faults(delay_s="pareto:1")
    assert "uniform:LO,HI" in str(info.value)


def test_config_is_frozen() -> None:
    cfg = FaultsConfig()
    with pytest.raises(ValidationError):
        cfg.seed = 3  # type: ignore[misc]


def test_parse_delay() -> None:
    assert parse_delay("const:0.05") == DelaySpec("const", 0.05)
    assert parse_delay("uniform:0.01, 0.1") == DelaySpec("uniform", 0.01, 0.1)
    assert parse_delay("exp:0.05") == DelaySpec("exp", 0.05)
    assert parse_delay(" normal:0.05,0.01 ") == DelaySpec("normal", 0.05, 0.01)


# -- decisions ------------------------------------------------------------------------------------------------


def trace(cfg: FaultsConfig, node_id: str = "a", n: int = 500) -> list[tuple[bool, float, str]]:
    inj = FaultInjector(cfg, node_id=node_id, start_s=0.0)
    out = []
    for i in range(n):
        d = inj.decide(f"peer-{i % 3}", i * 0.1)
        out.append((d.drop, d.delay_s, d.reason))
    return out


def test_decisions_are_reproducible_and_seeded() -> None:
    cfg = faults(drop_probability=0.2, delay_s="exp:0.05", outage={"mean_up_s": 3, "mean_down_s": 1}, seed=5)
    assert trace(cfg) == trace(cfg)
    assert trace(cfg) != trace(cfg.model_copy(update={"seed": 6}))
    assert trace(cfg, node_id="a") != trace(cfg, node_id="b")  # each peer has its own stream


def test_global_random_does_not_matter() -> None:
    cfg = faults(drop_probability=0.3, delay_s="uniform:0,1", seed=1)
    random.seed(1)
    a = trace(cfg)
    random.seed(2)
    b = trace(cfg)
    assert a == b


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 0.9])
def test_drop_rate(p: float) -> None:
    n = 20_000
    inj = FaultInjector(faults(drop_probability=p, seed=3), node_id="x")
    drops = sum(inj.decide("y", float(i)).drop for i in range(n))
    assert abs(drops - n * p) <= 3 * math.sqrt(n * p * (1 - p))
    assert inj.counters == {"dropped": drops, "outage_dropped": 0, "delayed": 0}


def test_drop_decision_fields() -> None:
    inj = FaultInjector(faults(drop_probability=0.5, delay_s="const:0.2"), node_id="x")
    decisions = [inj.decide("y", 0.0) for _ in range(200)]
    assert {(d.drop, d.delay_s, d.reason) for d in decisions} == {(True, 0.0, "drop"), (False, 0.2, "")}
    assert inj.counters["dropped"] + inj.counters["delayed"] == 200


@pytest.mark.parametrize(
    ("spec", "mean", "std"),
    [
        ("const:0.05", 0.05, 0.0),
        ("uniform:0.01,0.1", 0.055, 0.09 / math.sqrt(12)),
        ("exp:0.05", 0.05, 0.05),
        ("normal:0.05,0.01", 0.05, 0.01),
    ],
)
def test_delay_distributions(spec: str, mean: float, std: float) -> None:
    n = 20_000
    inj = FaultInjector(faults(delay_s=spec, seed=9), node_id="x")
    delays = [inj.decide("y", 0.0).delay_s for _ in range(n)]
    assert min(delays) >= 0
    assert sum(delays) / n == pytest.approx(mean, abs=4 * std / math.sqrt(n) + 1e-12)
    assert inj.counters["delayed"] == n
    if spec.startswith("uniform"):
        assert min(delays) >= 0.01 and max(delays) <= 0.1


def test_normal_delay_is_clipped_at_zero() -> None:
    inj = FaultInjector(faults(delay_s="normal:0,0.1"), node_id="x")
    delays = [inj.decide("y", 0.0).delay_s for _ in range(2000)]
    assert min(delays) == 0.0
    assert 0.3 < delays.count(0.0) / len(delays) < 0.7
    assert inj.counters["delayed"] == sum(d > 0 for d in delays)


def test_straggler_sleep() -> None:
    assert FaultInjector(faults(), node_id="a").straggler_sleep_s(0.3) == 0.0
    assert FaultInjector(faults(slowdown=3.0), node_id="a").straggler_sleep_s(0.5) == pytest.approx(1.0)


# -- Gilbert–Elliott outages ----------------------------------------------------------------------------------


def outage_periods(inj: FaultInjector, link: str, horizon: float, dt: float) -> tuple[float, list[float]]:
    """Sample link_up every dt over [0, horizon): the down fraction and the lengths of completed down periods."""
    down_samples = 0
    periods: list[float] = []
    began: float | None = None
    steps = int(horizon / dt)
    for i in range(steps):
        now = i * dt
        up = inj.link_up(link, now)
        if not up:
            down_samples += 1
            if began is None:
                began = now
        elif began is not None:
            if began > 0:  # skip the period in progress at time 0 (its length is censored)
                periods.append(now - began)
            began = None
    return down_samples / steps, periods


@pytest.mark.parametrize(("up", "down"), [(9.0, 1.0), (2.0, 2.0), (1.0, 3.0)])
def test_gilbert_elliott_statistics(up: float, down: float) -> None:
    inj = FaultInjector(faults(outage={"mean_up_s": up, "mean_down_s": down}, seed=1), node_id="a", start_s=0.0)
    frac, periods = outage_periods(inj, "b", horizon=6000 * (up + down), dt=0.05)
    assert frac == pytest.approx(down / (up + down), rel=0.10)
    assert len(periods) > 3000
    assert sum(periods) / len(periods) == pytest.approx(down, rel=0.10)


def test_stationary_start_across_links() -> None:
    # At time 0 each link is down with probability mean_down / (mean_up + mean_down) = 0.25.
    inj = FaultInjector(faults(outage={"mean_up_s": 3, "mean_down_s": 1}), node_id="a", start_s=0.0)
    n = 4000
    down = sum(not inj.link_up(f"link-{i}", 0.0) for i in range(n))
    assert abs(down - n * 0.25) <= 3 * math.sqrt(n * 0.25 * 0.75)


def test_outage_drops_and_counts() -> None:
    cfg = faults(outage={"mean_up_s": 1, "mean_down_s": 1}, drop_probability=0.1, seed=2)
    inj = FaultInjector(cfg, node_id="a", start_s=0.0)
    decisions = [(inj.link_up("b", t * 0.01), inj.decide("b", t * 0.01)) for t in range(20_000)]
    for up, d in decisions:
        if not up:
            assert d == type(d)(True, 0.0, "outage")
        else:
            assert d.reason in ("", "drop")
    assert inj.counters["outage_dropped"] == sum(not up for up, _ in decisions)
    assert inj.counters["dropped"] == sum(d.reason == "drop" for _, d in decisions)
    assert inj.counters["outage_dropped"] > 0 and inj.counters["dropped"] > 0


def test_unlisted_links_never_go_down() -> None:
    cfg = faults(outage={"mean_up_s": 0.5, "mean_down_s": 5, "links": ["b"]})
    inj = FaultInjector(cfg, node_id="a", start_s=0.0)
    times = [t * 0.1 for t in range(5000)]
    assert all(inj.link_up("c", t) for t in times)
    assert not all(inj.link_up("b", t) for t in times)
    assert all(inj.decide("c", t).reason == "" for t in times[-100:])


def test_link_pattern_is_independent_of_other_traffic() -> None:
    cfg = faults(outage={"mean_up_s": 2, "mean_down_s": 1}, seed=4)
    times = [t * 0.05 for t in range(4000)]
    alone = FaultInjector(cfg, node_id="a", start_s=0.0)
    busy = FaultInjector(cfg, node_id="a", start_s=0.0)
    pattern_alone = [alone.link_up("b", t) for t in times]
    pattern_busy = []
    for t in times:
        busy.decide("c", t)
        busy.decide("d", t + 0.01)
        pattern_busy.append(busy.link_up("b", t))
    assert pattern_alone == pattern_busy


def test_sparse_queries_see_the_same_path() -> None:
    # The lazy simulation gives the same state at t whatever the times it was asked at before.
    cfg = faults(outage={"mean_up_s": 2, "mean_down_s": 1}, seed=8)
    dense = FaultInjector(cfg, node_id="a", start_s=0.0)
    sparse = FaultInjector(cfg, node_id="a", start_s=0.0)
    dense_states = {round(t * 0.01, 2): dense.link_up("b", t * 0.01) for t in range(100_000)}
    for t in (1.0, 55.55, 300.0, 999.99):
        assert sparse.link_up("b", t) == dense_states[t]


def test_time_origin_defaults_to_first_call_and_time_going_back_is_harmless() -> None:
    cfg = faults(outage={"mean_up_s": 2, "mean_down_s": 1}, seed=8)
    a = FaultInjector(cfg, node_id="a")
    b = FaultInjector(cfg, node_id="a", start_s=1_000_000.0)
    assert a.start_s is None
    assert [a.link_up("b", 1_000_000.0 + t) for t in range(100)] == [
        b.link_up("b", 1_000_000.0 + t) for t in range(100)
    ]
    assert a.start_s == 1_000_000.0
    assert a.link_up("b", 0.0) == a.link_up("b", 1_000_099.0)  # earlier time: the latest state


def test_huge_time_jump_is_bounded() -> None:
    inj = FaultInjector(faults(outage={"mean_up_s": 0.001, "mean_down_s": 0.001}), node_id="a", start_s=0.0)
    inj.link_up("b", 0.0)
    inj.link_up("b", 1e9)  # would be ~1e12 flips; redrawn from the stationary distribution instead
    assert isinstance(inj.link_up("b", 1e9 + 1), bool)


def test_outage_config_links_deduplicated() -> None:
    assert OutageConfig(mean_up_s=1, mean_down_s=1, links=["b", "a", "b"]).links == ["a", "b"]
