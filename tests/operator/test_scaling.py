"""The outer loop's pure decisions: `scaling.decide` (replicas) and `scaling.tune` (threshold floor)."""

from __future__ import annotations

from typing import Any

import pytest

from synerdiff_operator import scaling
from synerdiff_operator.autoscaler import scale_down_candidates
from synerdiff_operator.scaling import ScalerState, TuneState, decide, tune
from synerdiff_operator.signals import PoolMetrics
from synerdiff_operator.spec import PoolSpec, parse_spec

AUTO = {
    "enabled": True,
    "periodSeconds": 5,
    "capacityPerReplica": 2.0,
    "targetUtilization": 0.5,
    "targetQueuePerReplica": 4,
    "scaleUpWindowSeconds": 30,
    "panicWindowSeconds": 10,
    "scaleDownDelaySeconds": 60,
}


def spec(replicas: int = 2, *, min_r: int = 1, max_r: int = 20, scheduler: dict[str, Any] | None = None, router: bool = True, **auto: Any) -> PoolSpec:
    return parse_spec(
        {
            "image": "x",
            "model": {"path": "/m"},
            "replicas": replicas,
            "minReplicas": min_r,
            "maxReplicas": max_r,
            "engine": {"scheduler": scheduler or {}},
            "autoscaling": {**AUTO, **auto},
            "router": {"enabled": router},
        }
    )


def reading(
    t: float, rate: float | None, *, ready: int = 2, waiting: float = 0.0, scraped: int | None = None, rated: int | None = None, pending: int = 0, **kw: Any
) -> PoolMetrics:
    scraped = ready if scraped is None else scraped
    rated = scraped if rated is None else rated
    return PoolMetrics(
        time=t,
        ready=ready,
        pending=pending,
        scraped=scraped,
        rated=rated,
        waiting=waiting if scraped else None,
        running=0.0 if scraped else None,
        arrival_rate=rate if rated else None,
        **kw,
    )


def steady(rate: float, *, until: float, ready: int = 2, every: float = 5.0, start: float = 0.0, **kw: Any) -> list[PoolMetrics]:
    return [reading(start + i * every, rate, ready=ready, **kw) for i in range(int((until - start) / every) + 1)]


def test_scales_up_to_the_capacity_model_within_the_rate_limit() -> None:
    # 8 img/s over pods planned at 2 x 0.5 img/s: 8 pods; 2 ready pods may become at most 4 at once.
    d = decide(spec(2, panicThreshold=10), steady(8.0, until=60), 60.0, ScalerState())
    assert (d.replicas, d.reason, d.stable_pods) == (4, "ScaleUp", 8)
    assert d.changed and d.state.last_scale_time == 60.0
    # Next period, with 4 ready, the rest.
    d = decide(spec(4, panicThreshold=10), steady(8.0, until=65, ready=4), 65.0, d.state)
    assert (d.replicas, d.reason) == (8, "ScaleUp")


def test_a_backlog_beyond_the_tolerated_queue_adds_pods_to_drain_it() -> None:
    hist = steady(2.0, until=60)
    assert decide(spec(2), hist, 60.0, ScalerState()).reason == "Steady"
    # 38 waiting, 8 tolerated on 2 pods: 30 to drain in the 30 s stable window = +1 img/s.
    hist[-1] = reading(60, 2.0, waiting=38.0)
    assert decide(spec(2), hist, 60.0, ScalerState()).replicas == 3


def test_a_burst_panics_and_panic_never_scales_down() -> None:
    hist = steady(1.0, until=55) + [reading(60, 9.0)]  # the panic window (55, 60] sees 5 img/s, the stable one 2.3
    d = decide(spec(2), hist, 60.0, ScalerState())
    assert (d.stable_pods, d.panic_pods) == (3, 5)
    assert d.panic and d.reason == "PanicScaleUp" and d.replicas == 5  # 5 >= 2 x 2 ready: what the burst needs, at once
    # The burst is gone at once: still no scale-down while in panic (a stable window long).
    calm = hist + steady(0.1, until=85, start=65)
    d2 = decide(spec(5), calm, 85.0, d.state)
    assert d2.panic and d2.replicas == 5
    later = calm + steady(0.1, until=200, start=90)
    d3 = decide(spec(5), later, 200.0, d2.state)
    assert not d3.panic and d3.reason == "ScaleDown"


@pytest.mark.parametrize(
    "case,reason",
    [
        ("nothing", "MetricsUnknown"),
        ("stale", "MetricsStale"),
        ("nobody answered", "MetricsUnknown"),
        ("first scrapes", "MetricsIncomplete"),
    ],
)
def test_never_scales_on_unknown_or_stale_metrics(case: str, reason: str) -> None:
    hist = {
        "nothing": [],
        "stale": steady(20.0, until=60),  # a burst... seen 16 s ago (> 3 periods)
        "nobody answered": steady(20.0, until=55) + [reading(60, None, scraped=0)],
        "first scrapes": [reading(60, None, rated=0, waiting=50)],
    }[case]
    d = decide(spec(2), hist, 76.0 if case == "stale" else 60.0, ScalerState())
    assert (d.replicas, d.reason) == (2, reason)


def test_an_unknown_pod_blocks_scale_down_but_not_scale_up() -> None:
    idle = steady(0.0, until=300, ready=3, scraped=2)
    d = decide(spec(3), idle, 300.0, ScalerState(observed_since=0.0))
    assert (d.replicas, d.reason) == (3, "MetricsIncomplete") and "without metrics" in d.message
    busy = steady(8.0, until=60, ready=3, scraped=2)
    up = decide(spec(3, panicThreshold=10), busy, 60.0, ScalerState())
    # The two known pods' load needs 8 pods; the unknown one is kept, not counted as capacity.
    assert up.reason == "ScaleUp" and up.stable_pods == 9 and up.replicas == 6


def test_scale_down_waits_out_the_delay_and_takes_its_highest_recommendation() -> None:
    hist = steady(6.0, until=60, ready=6) + steady(1.0, until=300, ready=6, start=65)  # 6 pods' worth, then 1
    st, current, changes = ScalerState(), 6, []
    for t in range(60, 301, 5):
        d = decide(spec(current, scaleDownDelaySeconds=60), [m for m in hist if m.time <= t], float(t), st)
        st = d.state
        if d.changed:
            assert d.reason == "ScaleDown" and d.replicas >= current / 2  # at most half at once
            # Never below any recommendation of the last 60 s.
            assert d.replicas == max(p for tt, p in st.recommendations if tt > t - 60)
            changes.append((t, d.replicas))
            current = d.replicas
    assert changes[0][0] > 120  # the last 6-pod recommendation (stable window still over the old load) aged out
    assert current == 1 and [r for _, r in changes] == sorted((r for _, r in changes), reverse=True)


def test_a_restarted_operator_waits_a_full_delay_before_scaling_down() -> None:
    hist = steady(0.0, until=300, ready=4)
    d = decide(spec(4), hist[-2:], 300.0, ScalerState())
    assert d.reason == "ScaleDownDelayed" and d.replicas == 4


def test_bounds_and_zero_only_behind_the_router() -> None:
    assert decide(spec(2, max_r=3), steady(50.0, until=60), 60.0, ScalerState()).replicas == 3
    assert decide(spec(3, max_r=3), steady(50.0, until=60, ready=3), 60.0, ScalerState()).reason == "AtMaxReplicas"
    idle = steady(0.0, until=300, ready=2)
    d = decide(spec(2, min_r=0, router=False), idle, 300.0, ScalerState(observed_since=0.0))
    assert (d.replicas, d.reason) == (1, "ScaleDown")  # without the router min 0 means 1: nothing would hold requests
    d = decide(spec(1, min_r=0, router=False), steady(0.0, until=300, ready=1), 300.0, ScalerState(observed_since=0.0))
    assert (d.replicas, d.reason) == (1, "AtMinReplicas")
    # Behind the router: idle past the delay goes to zero, not while the router holds requests.
    d = decide(spec(1, min_r=0), steady(0.0, until=300, ready=1, buffered=0.0), 300.0, ScalerState(observed_since=0.0))
    assert (d.replicas, d.reason) == (0, "ScaleDown")
    d = decide(spec(1, min_r=0), steady(0.0, until=300, ready=1, buffered=2.0), 300.0, ScalerState(observed_since=0.0))
    assert d.replicas == 1


def test_a_pool_at_zero_wakes_on_buffered_requests() -> None:
    at_zero = [PoolMetrics(time=t, ready=0, buffered=0.0) for t in range(0, 60, 5)]
    d = decide(spec(0, min_r=0), at_zero, 55.0, ScalerState())
    assert (d.replicas, d.reason) == (0, "ScaledToZero")
    d = decide(spec(0, min_r=0), [*at_zero, PoolMetrics(time=60.0, ready=0, buffered=3.0)], 60.0, ScalerState())
    assert (d.replicas, d.reason) == (1, "WakeUp") and d.changed
    unknown = decide(spec(0, min_r=0), [PoolMetrics(time=60.0, ready=0, buffered=None)], 60.0, ScalerState())
    assert (unknown.replicas, unknown.reason) == (0, "MetricsUnknown")  # no router read: hold
    # Waking (1 pod, not ready yet): hold at 1 rather than scale back to 0.
    waking = decide(spec(1, min_r=0), [PoolMetrics(time=60.0, ready=0, pending=1, buffered=3.0)], 60.0, ScalerState())
    assert waking.replicas == 1
    # An autoscaled spec.replicas outside the bounds (the CRD allows it) is brought back.
    assert decide(spec(9, max_r=4), steady(4.0, until=60, ready=4), 60.0, ScalerState()).replicas == 4


def test_pods_blocked_for_a_known_cause_hold_the_ask() -> None:
    # 2 ready + 4 Pending with no node for them: the load wants 8, but more Pending pods would wait the same way.
    why = "pod sd-5 is Pending: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    d = decide(spec(6), steady(8.0, until=60, ready=2, pending=4, blocked=4, blocked_reason=why), 60.0, ScalerState())
    assert (d.replicas, d.reason) == (6, "ScaleUpBlocked") and why in d.message
    # Even a burst does not pile more on them.
    burst = steady(1.0, until=55, ready=2, pending=4, blocked=4, blocked_reason=why) + [reading(60, 40.0, pending=4, blocked=4, blocked_reason=why)]
    assert decide(spec(6), burst, 60.0, ScalerState()).reason == "ScaleUpBlocked"


def test_pending_pods_are_capacity_on_the_way_not_serving() -> None:
    # 2 ready + 2 starting (scheduled, loading the model): the load wants 8 pods (8 img/s at 2 x 0.5 each).
    d = decide(spec(4, panicThreshold=10), steady(8.0, until=60, ready=2, pending=2), 60.0, ScalerState())
    # Stable mode goes to maxScaleUpRate x (ready + on the way) = 8, not 2 x ready = 4 (which would hold).
    assert (d.replicas, d.reason) == (8, "ScaleUp")
    # ...but they serve nothing: the same load asks for the same 8 pods, whatever part of them is ready.
    assert d.stable_pods == decide(spec(4, panicThreshold=10), steady(8.0, until=60, ready=4), 60.0, ScalerState()).stable_pods == 8
    # With none on the way, 2 ready pods may only double.
    assert decide(spec(4, panicThreshold=10), steady(8.0, until=60, ready=2), 60.0, ScalerState()).reason == "ScaleUpLimited"


def test_panic_asks_for_what_the_load_needs_up_to_max_replicas() -> None:
    burst = steady(1.0, until=55) + [reading(60, 40.0)]  # the panic window sees 20.5 img/s: 21 pods
    d = decide(spec(2, max_r=12), burst, 60.0, ScalerState())
    assert d.panic and (d.replicas, d.reason) == (12, "PanicScaleUp")  # not 2 x 2 ready
    assert decide(spec(2, max_r=40), burst, 60.0, ScalerState()).replicas == d.panic_pods == 21


def test_a_gpu_budget_caps_scale_ups_and_never_forces_a_scale_down() -> None:
    burst = steady(1.0, until=55) + [reading(60, 40.0)]
    s = parse_spec({**spec(2, max_r=40).model_dump(by_alias=True, exclude_none=True), "autoscaling": {**AUTO, "gpuBudget": 6}})
    d = decide(s, burst, 60.0, ScalerState())
    assert (d.replicas, d.reason) == (6, "PanicScaleUp")  # 6 GPUs hold 6 one-GPU pods
    assert decide(s.model_copy(update={"replicas": 6}), burst, 60.0, ScalerState()).reason == "AtGPUBudget"
    # The operator-wide budget: what the other pools leave.
    assert decide(spec(2, max_r=40), burst, 60.0, ScalerState(), gpu_room=9).replicas == 9
    assert decide(spec(2, max_r=40), burst, 60.0, ScalerState(), gpu_room=1).reason == "AtGPUBudget"
    assert scaling.budget_replicas(spec(2), gpu_room=None) is None
    # Over the budget already (it shrank): held, not scaled down for it.
    over = decide(spec(9, max_r=40), steady(18.0, until=60, ready=9), 60.0, ScalerState(), gpu_room=4)
    assert over.replicas == 9


def test_without_a_capacity_it_learns_one_from_saturated_pods() -> None:
    s = spec(2, capacityPerReplica=None)
    blind = decide(s, steady(5.0, until=60, waiting=20.0), 60.0, ScalerState())
    assert (blind.replicas, blind.reason) == (3, "ScaleUp") and blind.capacity is None  # +1 on the queue alone
    idle = decide(s, steady(0.0, until=300), 300.0, ScalerState(observed_since=0.0))
    assert idle.reason == "CapacityUnknown" and idle.replicas == 2  # never down on a guess
    learnt = decide(s, steady(5.0, until=60, waiting=20.0, saturated_rate=1.25), 60.0, ScalerState())
    assert learnt.capacity == pytest.approx(1.25) and learnt.state.learned_capacity == pytest.approx(1.25)
    assert learnt.stable_pods == 8 + 1  # (5 + 12/30) / (1.25 x 0.5), rounded up


def test_a_rising_trend_is_planned_for_ahead() -> None:
    ramp = [reading(t, 1.0 + 0.02 * t) for t in range(0, 125, 5)]  # +0.02 img/s per second
    plain = decide(spec(2), ramp, 120.0, ScalerState())
    ahead = decide(spec(2, predictSeconds=90), ramp, 120.0, ScalerState())
    assert ahead.stable_pods > plain.stable_pods
    flat = decide(spec(2, predictSeconds=90), steady(3.0, until=120), 120.0, ScalerState())
    assert flat.stable_pods == decide(spec(2), steady(3.0, until=120), 120.0, ScalerState()).stable_pods
    assert scaling.rising_trend(list(reversed([reading(t, 10 - 0.05 * t) for t in range(0, 125, 5)])), 120.0, 120.0) == 0.0


def test_headroom_keeps_spare_pods_within_max_replicas() -> None:
    # 2 img/s at 2 x 0.5 img/s a pod: 2 pods; 3 img/s of headroom adds 3 more, and maxReplicas caps them.
    plain = decide(spec(2, panicThreshold=10), steady(2.0, until=60), 60.0, ScalerState())
    spare = decide(spec(2, panicThreshold=10, headroomImagesPerSecond=3.0), steady(2.0, until=60), 60.0, ScalerState())
    assert (plain.stable_pods, spare.stable_pods) == (2, 5)
    assert plain.reason == "Steady" and spare.replicas == 4  # the scale-up rate limit: 2 ready -> at most 4 now
    capped = decide(spec(4, max_r=4, panicThreshold=10, headroomImagesPerSecond=3.0), steady(2.0, until=60, ready=4), 60.0, ScalerState())
    assert (capped.replicas, capped.reason) == (4, "AtMaxReplicas")


def test_disabled_autoscaling_holds() -> None:
    d = decide(spec(2, enabled=False), steady(50.0, until=60), 60.0, ScalerState())
    assert (d.replicas, d.reason) == (2, "Disabled")


# --------------------------------------------------------------------------------------- tuning
SCHED = {"threshold": 0.8, "threshold_min": 0.5, "threshold_max": 0.9, "skip_cfg_bound": 0.2}


def test_saturation_with_a_missed_slo_raises_the_floor_step_by_step_to_midspan() -> None:
    s = spec(2, scheduler=SCHED, latencySLOSeconds=1.0, panicWindowSeconds=5)
    hist, st, floors = [], TuneState(), []
    for i in range(8):
        hist.append(reading(5.0 * i, 4.0, waiting=20.0, slo_good=1.0, slo_total=10.0))
        d = tune(s, hist, 5.0 * i, st)
        st = d.state
        floors.append(d.target.threshold_min)
    assert floors[0] == 0.5 and floors[1:6] == [0.55, 0.6, 0.65, 0.7, 0.7]  # 0.5 + level x 0.5 x 0.4, level <= 1
    assert d.target.body() == {"threshold_min": 0.7, "threshold": 0.8, "skip_cfg_bound": 0.2}


def test_headroom_lowers_the_floor_back_to_the_spec_and_no_further() -> None:
    s = spec(2, scheduler={**SCHED, "threshold": 0.5}, latencySLOSeconds=1.0, panicWindowSeconds=5)
    hist = steady(1.0, until=10, slo_good=10.0, slo_total=10.0)
    d = tune(s, hist, 10.0, TuneState(level=0.25, last_change=0.0))
    assert d.reason == "Headroom" and d.target.threshold_min == 0.5 and d.changed
    assert tune(s, hist, 10.0, d.state).reason == "Hold"
    # The configured start threshold is kept inside the raised floor.
    assert scaling.tuning_for(s, 1.0).threshold == pytest.approx(0.7)


@pytest.mark.parametrize("case", ["slo met", "cooldown", "unknown pod", "stale"])
def test_tuning_holds(case: str) -> None:
    s = spec(2, scheduler=SCHED, latencySLOSeconds=1.0, panicWindowSeconds=5)
    st = TuneState(level=0.5, last_change=-100.0)
    if case == "slo met":
        hist, now = steady(4.0, until=10, waiting=20.0, slo_good=10.0, slo_total=10.0), 10.0
    elif case == "cooldown":
        hist, now, st = steady(4.0, until=10, waiting=20.0, slo_good=0.0, slo_total=10.0), 10.0, TuneState(level=0.5, last_change=8.0)
    elif case == "unknown pod":  # idle, but one pod is unknown: no lowering on partial knowledge
        hist, now = steady(0.0, until=10, ready=3, scraped=2, slo_good=10.0, slo_total=10.0), 10.0
    else:
        hist, now = steady(4.0, until=10, waiting=20.0, slo_good=0.0, slo_total=10.0), 60.0
    d = tune(s, hist, now, st)
    assert not d.changed and d.state.level == 0.5 and d.target.threshold_min == pytest.approx(0.6)
    assert d.reason == ("MetricsUnknown" if case == "stale" else "Hold")


def test_without_an_slo_saturation_alone_raises_the_floor() -> None:
    s = spec(2, scheduler=SCHED)
    d = tune(s, steady(4.0, until=10, waiting=20.0), 10.0, TuneState())
    assert d.reason == "Saturated" and d.target.threshold_min == 0.55


# ------------------------------------------------------------------------------ drain candidates
def _pod(name: str, *, ready: bool = True, created: str = "2025-01-01T00:00:00Z", terminating: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "uid": name, "creationTimestamp": created}
    if terminating:
        meta["deletionTimestamp"] = "2025-01-01T01:00:00Z"
    return {
        "metadata": meta,
        "spec": {"containers": [{"name": "engine", "ports": [{"name": "http", "containerPort": 8000}]}]},
        "status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def test_scale_down_marks_the_idlest_ready_pods_after_the_unready_ones() -> None:
    pods = [_pod("a"), _pod("b"), _pod("c", created="2025-01-02T00:00:00Z"), _pod("d")]
    running = {"a": 3.0, "b": 0.0, "c": 0.0}  # d's metrics are unknown: it goes last
    assert scale_down_candidates(pods, running, 1) == ["c"]  # idle and the youngest
    assert scale_down_candidates(pods, running, 3) == ["c", "b", "a"]
    # A Pending pod goes first anyway (ReplicaSet), so it takes one removal without any mark.
    assert scale_down_candidates(pods + [_pod("p", ready=False)], running, 2) == ["c"]
    assert scale_down_candidates(pods + [_pod("t", terminating=True)], running, 1) == ["c"]


def test_status_is_written_when_it_changes_and_moving_readings_only_on_a_heartbeat() -> None:
    from synerdiff_operator.autoscaler import needs_write

    base = {"desiredReplicas": 2, "autoscaler": {"reason": "Steady", "waiting": 0.0, "arrivalRate": 1.0, "message": "1.00 img/s"}}
    same = {"desiredReplicas": 2, "autoscaler": dict(base["autoscaler"])}
    assert not needs_write(base, same, last_write=None, now=20.0, heartbeat_s=60.0)  # at rest: nothing
    moved = {"desiredReplicas": 2, "autoscaler": {**base["autoscaler"], "arrivalRate": 1.2, "message": "1.20 img/s"}}
    assert not needs_write(base, moved, last_write=10.0, now=20.0, heartbeat_s=60.0)  # only readings moved
    assert needs_write(base, moved, last_write=10.0, now=70.0, heartbeat_s=60.0)  # ... until the heartbeat
    assert needs_write(base, moved, last_write=None, now=20.0, heartbeat_s=60.0)  # never written by this loop
    for change in ({"reason": "ScaleUp"}, {"waiting": 3.0}, {"arrivalRate": None}):  # a reading turned unknown is cleared at once
        assert needs_write(base, {"desiredReplicas": 2, "autoscaler": {**base["autoscaler"], **change}}, last_write=10.0, now=11.0, heartbeat_s=60.0)
    assert needs_write(base, {"desiredReplicas": 3, "autoscaler": dict(base["autoscaler"])}, last_write=10.0, now=11.0, heartbeat_s=60.0)
