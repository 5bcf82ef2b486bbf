"""The feedback controller: bounded, hysteretic, and stable under step and burst loads."""

from __future__ import annotations

from itertools import pairwise

from synerdiff.contract.config import SchedulerConfig
from synerdiff.engine.simulate import SimRequest, poisson_arrivals, simulate
from synerdiff.scheduling import controller as ctl
from synerdiff.scheduling.cost_model import CostModel, reference_h100_sd15

CFG = SchedulerConfig()


def run(observations):
    st = ctl.ControllerState.initial(CFG)
    out = []
    for i, (waiting, active) in enumerate(observations):
        st = ctl.tick(CFG, st, ctl.Observation(now=i * ctl.TICK_S, waiting_rows=waiting, active_rows=active, mean_queue_wait_s=None))
        out.append(st.threshold)
    return out


def test_rises_under_pressure_and_falls_when_drained_within_bounds():
    up = run([(64, 64)] * 40)
    assert up[-1] == CFG.threshold_max and all(a <= b for a, b in pairwise(up))
    down = run([(0, 0)] * 40)
    assert down[-1] == CFG.threshold_min and all(a >= b for a, b in pairwise(down))


def test_holds_inside_the_hysteresis_band():
    mid_rows = int(CFG.max_rows * (CFG.controller_low_water + CFG.controller_high_water) / 2)
    assert set(run([(0, mid_rows)] * 30)) == {CFG.threshold}


def test_fixed_mode_never_moves():
    cfg = SchedulerConfig(controller="fixed", threshold=0.7)
    st = ctl.ControllerState.initial(cfg)
    for i in range(20):
        st = ctl.tick(cfg, st, ctl.Observation(i * 1.0, 500, 64, 10.0))
    assert st.threshold == 0.7


def test_skip_fraction_grows_with_threshold():
    assert ctl.skip_fraction(CFG, CFG.threshold_min) == 0.0
    assert ctl.skip_fraction(CFG, CFG.threshold_max) == CFG.skip_cfg_bound


def _direction_changes(series):
    moves = [b - a for a, b in pairwise(series) if b != a]
    return sum(1 for a, b in pairwise(moves) if (a > 0) != (b > 0))


def test_no_oscillation_under_a_load_step_in_simulation():
    """Steady light load, then a step to overload: the threshold climbs and stays."""
    cost = CostModel(reference_h100_sd15())
    reqs = poisson_arrivals(0.5, 30, seed=1) + [SimRequest(f"s{i}", r.arrival + 30) for i, r in enumerate(poisson_arrivals(4.5, 30, seed=2))]
    out = simulate(reqs, CFG, cost)
    series = [th for t, th in out.thresholds if 35 <= t <= 60]
    assert max(series) == CFG.threshold_max
    assert _direction_changes(series) <= 2, series


def test_burst_then_quiet_returns_to_the_floor_without_ringing():
    cost = CostModel(reference_h100_sd15())
    burst = [SimRequest(f"b{i}", 1.0 + i * 0.01) for i in range(60)]
    quiet = [SimRequest(f"q{i}", 40.0 + 3.0 * i) for i in range(10)]  # a lone request now and then
    out = simulate(burst + quiet, CFG, cost)
    series = [th for _, th in out.thresholds]
    assert max(series) == CFG.threshold_max
    assert series[-1] == CFG.threshold_min
    assert _direction_changes(series) <= 2, series
    assert all(r.done is not None for r in burst + quiet)
