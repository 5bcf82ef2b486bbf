"""Pure: the outer feedback loop's decisions. Replicas from a capacity model; scheduler floors.

`decide(spec, history, now, state)` and `tune(spec, history, now, state)` do no I/O: the operator
(`autoscaler.py`) and the pool simulator (`synerdiff_bench.poolsim`) call the same functions.

Replicas (KPA-style, on a capacity model instead of a concurrency target):

    pods(window) = ceil((arrival rate over the window + backlog beyond the tolerated queue / stable
                         window) / (capacityPerReplica x targetUtilization)) + ready pods without rates

- the stable window gives the normal recommendation, its rate extrapolated `predictSeconds`
  ahead along a rising trend (new pods take minutes to load a model: a reactive count is late
  on every ramp); the panic window reacts to a burst: when
  it asks for panicThreshold x the ready pods, panic mode starts, scales up at once and never
  scales down until a stable window passes without panic;
- a scale-down takes the highest recommendation of the last scaleDownDelaySeconds, and only
  after the loop has watched that long (an operator restart forgets its history: it waits);
- pods that exist but are not ready are capacity on the way, never serving capacity: a stable
  scale-up goes to at most maxScaleUpRate x (ready + on the way), and panic compares the load
  with them too; in panic the loop asks at once for what the load needs, up to maxReplicas (with
  a node autoscaler the Pending pods are what makes it add nodes);
- while any pod waits for a cause its status shows (Unschedulable, image pull, config error,
  crash loop), the loop does not ask for more: more pods would wait the same way;
- a GPU budget (the pool's `autoscaling.gpuBudget`, the operator's `SYNERDIFF_OPERATOR_GPU_BUDGET`
  across pools) caps scale-ups; it never forces a scale-down;
- one decision scales down by at most maxScaleDownRate;
- nothing scales on a stale or empty reading, and nothing scales down while any ready pod is
  unknown (its metrics failed or it has no rates yet): an unknown is never read as zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from synerdiff_operator.signals import PoolMetrics
from synerdiff_operator.spec import PoolSpec

# A reading older than this many periods is stale: the loop is stuck or the history is old.
STALE_PERIODS = 3.0
# How much of the spec's [threshold_min, threshold_max] span the operator may claim as floor:
# the upper half stays for the engine's own controller to move in.
FLOOR_SHARE = 0.5
TUNE_STEP = 0.25
CAPACITY_EMA = 0.3
TREND_WINDOWS = 4  # the trend is regressed over this many stable windows: one is too noisy
MIN_TREND_POINTS = 4


def rising_trend(history: Sequence[PoolMetrics], now: float, seconds: float) -> float:
    """Least-squares slope of the arrival rate (images/s per second) over the window; 0 unless rising."""
    pts = [(m.time, m.arrival_rate) for m in history if now - seconds < m.time <= now and m.arrival_rate is not None]
    if len(pts) < MIN_TREND_POINTS:
        return 0.0
    mt = sum(t for t, _ in pts) / len(pts)
    mr = sum(r for _, r in pts) / len(pts)
    var = sum((t - mt) ** 2 for t, _ in pts)
    if var <= 0:
        return 0.0
    return max(0.0, sum((t - mt) * (r - mr) for t, r in pts) / var)


def history_seconds(spec: PoolSpec) -> float:
    """How much history `decide` and `tune` look at."""
    a = spec.autoscaling
    stable = max(float(a.scale_up_window_seconds), a.period_seconds)
    return (TREND_WINDOWS * stable if a.predict_seconds > 0 else stable) + STALE_PERIODS * a.period_seconds


@dataclass(frozen=True)
class ScalerState:
    recommendations: tuple[tuple[float, int], ...] = ()  # (time, pods) within the scale-down delay
    observed_since: float | None = None  # first fresh reading (scale-down needs a full delay of them)
    panic_until: float | None = None
    last_scale_time: float | None = None
    learned_capacity: float | None = None  # images/s per pod, from pods seen saturated


@dataclass(frozen=True)
class Decision:
    replicas: int  # what spec.replicas should be (== current when holding)
    current: int
    reason: str
    message: str
    state: ScalerState
    panic: bool = False
    stable_pods: int | None = None
    panic_pods: int | None = None
    capacity: float | None = None

    @property
    def changed(self) -> bool:
        return self.replicas != self.current


def _window(history: Sequence[PoolMetrics], now: float, seconds: float) -> list[PoolMetrics]:
    # At least the newest reading, however short the window.
    rated = [m for m in history if m.time <= now and m.arrival_rate is not None]
    inside = [m for m in rated if m.time > now - seconds]
    return inside or rated[-1:]


def _pods_for(load: float, capacity: float, utilization: float) -> int:
    return max(0, math.ceil(load / (capacity * utilization) - 1e-9))


def stale_after(spec: PoolSpec) -> float:
    return STALE_PERIODS * spec.autoscaling.period_seconds


def budget_replicas(spec: PoolSpec, gpu_room: int | None = None) -> int | None:
    """The most replicas the GPU budgets allow: the pool's own `autoscaling.gpuBudget` and
    `gpu_room`, the GPUs the operator-wide budget leaves to this pool. None: no budget applies."""
    per_pod = spec.gpu.count
    caps = [b for b in (spec.autoscaling.gpu_budget, gpu_room) if b is not None]
    if per_pod <= 0 or not caps:
        return None
    return max(0, min(caps) // per_pod)


def decide(spec: PoolSpec, history: Sequence[PoolMetrics], now: float, state: ScalerState, *, gpu_room: int | None = None) -> Decision:
    """`gpu_room`: GPUs this pool may hold under the operator-wide budget (None: no such budget)."""
    a = spec.autoscaling
    current = spec.desired_replicas()
    # Zero only with the router: it buffers requests while the pool has no engine, and its
    # buffered count is what wakes the pool (without it nothing would ever scale a pool from 0).
    lo = 0 if spec.min_replicas == 0 and spec.router.enabled else max(spec.min_replicas, 1)
    hi = max(spec.max_replicas, 1)
    budget = budget_replicas(spec, gpu_room)

    def hold(reason: str, message: str, st: ScalerState = state, **kw: Any) -> Decision:
        return Decision(current, current, reason, message, st, **kw)

    if not a.enabled:
        return hold("Disabled", "autoscaling.enabled is false")
    past = [m for m in history if m.time <= now]
    latest = past[-1] if past else None
    if latest is None:
        return hold("MetricsUnknown", "no reading of the pods yet")
    if now - latest.time > stale_after(spec):
        return hold("MetricsStale", f"the newest reading is {now - latest.time:.0f}s old")
    buffered = latest.buffered or 0.0
    if current == 0:
        if buffered > 0:
            return _done(spec, min(1, hi), current, "WakeUp", f"{buffered:.0f} request(s) buffered at the router", state, now)
        if latest.buffered is None:
            return hold("MetricsUnknown", "scaled to zero and no router answered /metrics; holding at 0")
        return hold("ScaledToZero", "no engine and no request buffered at the router")
    if latest.scraped == 0:
        what = "no ready pod" if latest.ready == 0 else f"none of {latest.ready} ready pod(s) answered /metrics"
        return hold("MetricsUnknown", f"{what}; holding at {current}")

    st = state if state.observed_since is not None else replace(state, observed_since=latest.time)
    if latest.saturated_rate is not None and latest.saturated_rate > 0:
        old = st.learned_capacity
        st = replace(st, learned_capacity=latest.saturated_rate if old is None else (1 - CAPACITY_EMA) * old + CAPACITY_EMA * latest.saturated_rate)
    capacity = a.capacity_per_replica or st.learned_capacity
    ready = latest.ready
    # Pods that exist but are not ready yet (Pending for a node, pulling, loading) are capacity on
    # the way: they bound how fast the loop asks for more, but never count as serving.
    have = ready + latest.pending
    unrated = latest.ready - latest.rated  # kept as they are: neither capacity for, nor load of, what we see
    tolerated = a.target_queue_per_replica * max(ready, 1)
    backlog = max(0.0, (latest.waiting or 0.0) - tolerated)
    stable_s = max(float(a.scale_up_window_seconds), a.period_seconds)

    if capacity is None:
        # Before any pod was seen saturated there is no capacity to divide by: add one pod per
        # period while the queue exceeds its tolerance, and never scale down on a guess.
        if backlog > 0 and latest.rated > 0 and latest.blocked == 0:
            desired = min(hi if budget is None else min(hi, max(budget, current)), max(current, ready + 1))
            if desired > current:
                return _done(spec, desired, current, "ScaleUp", f"{latest.waiting:.0f} waiting > {tolerated:.0f} tolerated; capacity not known yet", st, now)
        return hold("CapacityUnknown", "capacityPerReplica unset and no pod seen saturated yet; scaling up on queue only", st)

    if latest.arrival_rate is None:
        return hold("MetricsIncomplete", "no ready pod has rates yet (first scrape of each)", st, capacity=capacity)
    stable = _window(past, now, stable_s)
    panic_s = min(a.panic_window_seconds, stable_s)
    panicw = _window(past, now, panic_s)
    drain = backlog / stable_s
    rate_s = sum(m.arrival_rate for m in stable) / len(stable)  # type: ignore[misc]
    rate_p = sum(m.arrival_rate for m in panicw) / len(panicw)  # type: ignore[misc]
    ahead = 0.0
    if a.predict_seconds > 0:
        # rate_s is centred half a stable window ago; cap the extrapolation at doubling, so the
        # noise of a nearly idle pool cannot invent a burst.
        ahead = min(rate_s, rising_trend(past, now, TREND_WINDOWS * stable_s) * (a.predict_seconds + stable_s / 2))
    stable_pods = unrated + _pods_for(rate_s + ahead + drain + a.headroom_images_per_second, capacity, a.target_utilization)
    panic_pods = unrated + _pods_for(rate_p + drain, capacity, a.target_utilization)

    panic = st.panic_until is not None and now < st.panic_until
    if panic_pods >= a.panic_threshold * max(have, 1) and panic_pods > current:
        panic = True
        st = replace(st, panic_until=now + stable_s)
    elif not panic:
        st = replace(st, panic_until=None)

    want = max(current, panic_pods, stable_pods) if panic else stable_pods
    if buffered > 0:
        want = max(want, 1)  # never to zero while the router holds requests
    recs = tuple((t, p) for t, p in st.recommendations if t > now - a.scale_down_delay_seconds) + ((now, want),)
    st = replace(st, recommendations=recs)
    detail = dict(panic=panic, stable_pods=stable_pods, panic_pods=panic_pods, capacity=capacity)
    trend = f" + {ahead:.2f} trend" if ahead > 0 else ""
    load = f"{rate_s:.2f}{trend} img/s (panic window {rate_p:.2f}), {latest.waiting:.0f} waiting, capacity {capacity:.2f} img/s/pod x {a.target_utilization:g}"

    if want < current:
        if not latest.complete:
            why = f"{latest.unknown} ready pod(s) without metrics" if latest.unknown else f"{unrated} pod(s) without rates yet"
            return hold("MetricsIncomplete", f"load asks for {want} but {why}: no scale-down on unknowns", st, **detail)
        watched = now - st.observed_since if st.observed_since is not None else 0.0
        if watched < a.scale_down_delay_seconds:
            return hold("ScaleDownDelayed", f"load asks for {want}; watched {watched:.0f}s of the {a.scale_down_delay_seconds}s delay", st, **detail)
        floor = max(p for _, p in recs)
        want = max(want, floor)
        if want >= current:
            return hold("ScaleDownDelayed", f"load asks for fewer pods, but up to {floor} within the last {a.scale_down_delay_seconds}s; {load}", st, **detail)
        limit = min(current - 1, math.floor(current / a.max_scale_down_rate))
        desired = max(want, limit, lo)
        if desired >= current:
            return hold("AtMinReplicas", f"load asks for {want}; minReplicas is {lo}", st, **detail)
        return _done(spec, desired, current, "ScaleDown", load, st, now, **detail)

    if want > current:
        if latest.blocked > 0:
            # Pods already asked for wait on something more pods cannot fix (no node fits, the
            # image does not pull, the model does not load); a node autoscaler sees them already.
            why = latest.blocked_reason or "a known cause"
            return hold("ScaleUpBlocked", f"load asks for {want}; {latest.blocked} pod(s) not ready: {why}; {load}", st, **detail)
        top = hi if budget is None else min(hi, max(budget, current))
        if panic:
            # A burst: ask at once for what the load needs; pods Pending for nodes are how a node
            # autoscaler learns how many to add.
            desired = min(want, top)
        else:
            limit = max(have + 1, math.ceil(have * a.max_scale_up_rate))
            desired = min(want, max(current, limit), top)
        if desired <= current:
            if budget is not None and current >= budget and budget < hi:
                return hold("AtGPUBudget", f"load asks for {want}; the GPU budget allows {budget} pod(s) of {spec.gpu.count} GPU(s); {load}", st, **detail)
            reason = "AtMaxReplicas" if current >= hi else "ScaleUpLimited"
            extra = f"maxReplicas is {hi}" if current >= hi else f"{ready} pod(s) ready, {latest.pending} on the way (maxScaleUpRate {a.max_scale_up_rate:g})"
            return hold(reason, f"load asks for {want}; {extra}; {load}", st, **detail)
        return _done(spec, desired, current, "PanicScaleUp" if panic else "ScaleUp", load, st, now, **detail)

    clamped = min(max(current, lo), hi)
    if clamped != current:
        return _done(spec, clamped, current, "OutOfBounds", f"replicas must lie within [{lo}, {hi}]", st, now, **detail)
    return hold("Steady", load, st, **detail)


def _done(spec: PoolSpec, desired: int, current: int, reason: str, message: str, st: ScalerState, now: float, **detail: Any) -> Decision:
    return Decision(desired, current, reason, f"{current} -> {desired}: {message}", replace(st, last_scale_time=now), **detail)


# ------------------------------------------------------------------------------------------ tuning
@dataclass(frozen=True)
class TuneState:
    level: float = 0.0  # 0: the spec's own bounds; 1: the highest floor the operator may set
    last_change: float | None = None


@dataclass(frozen=True)
class Tuning:
    """The scheduler knobs every pod should run with."""

    threshold_min: float
    threshold: float  # the configured start value, kept inside [threshold_min, threshold_max]
    skip_cfg_bound: float

    def body(self) -> dict[str, float]:
        return {"threshold_min": self.threshold_min, "threshold": self.threshold, "skip_cfg_bound": self.skip_cfg_bound}


@dataclass(frozen=True)
class TuneDecision:
    target: Tuning
    reason: str
    message: str
    state: TuneState
    changed: bool = False


def tuning_for(spec: PoolSpec, level: float) -> Tuning:
    s = spec.engine.scheduler
    floor = round(s.threshold_min + level * FLOOR_SHARE * (s.threshold_max - s.threshold_min), 4)
    return Tuning(threshold_min=floor, threshold=round(min(s.threshold_max, max(floor, s.threshold)), 4), skip_cfg_bound=s.skip_cfg_bound)


def slo_attainment(history: Sequence[PoolMetrics], now: float, seconds: float) -> tuple[float | None, float]:
    """(fraction within the SLO, requests counted) over the window; None with no request."""
    inside = [m for m in history if now - seconds < m.time <= now]
    good, total = sum(m.slo_good for m in inside), sum(m.slo_total for m in inside)
    return (good / total if total > 0 else None), total


def tune(spec: PoolSpec, history: Sequence[PoolMetrics], now: float, state: TuneState) -> TuneDecision:
    """Raise the threshold floor one step while the pool is saturated and misses its SLO; lower it
    one step while it has headroom; hold otherwise, and at most one step per panic window.

    A higher floor keeps the engines' controllers at larger batches with less VAE interleaving
    (more images per GPU-second) while a queue builds faster than new pods can start; with
    headroom the floor returns to the spec's, where the engines favour latency. Everything stays
    within the spec's engine settings: the floor within [threshold_min, the middle of the span],
    the skip-CFG bound at the spec's (pods restarted or edited by hand get it back).
    """
    a = spec.autoscaling

    def out(reason: str, message: str, st: TuneState = state, changed: bool = False) -> TuneDecision:
        return TuneDecision(tuning_for(spec, st.level), reason, message, st, changed)

    past = [m for m in history if m.time <= now]
    if not past or now - past[-1].time > stale_after(spec) or past[-1].scraped == 0:
        return out("MetricsUnknown", "no fresh reading: the pods keep their knobs")
    last = past[-2:]
    if len(last) < 2 or last[0].scraped == 0:
        return out("Hold", "waiting for a second reading")
    if state.last_change is not None and now - state.last_change < a.panic_window_seconds:
        return out("Hold", "changed within the last panic window")
    stable_s = max(float(a.scale_up_window_seconds), a.period_seconds)
    attained, counted = slo_attainment(past, now, stable_s)
    saturated = all((m.waiting or 0.0) >= a.target_queue_per_replica * m.scraped for m in last)
    idle = all((m.waiting or 0.0) == 0 for m in last)
    if a.latency_slo_seconds is None:
        missing, meeting = True, True
        slo = "no latencySLOSeconds"
    elif attained is None:
        p99 = past[-1].queue_wait_p99
        missing = p99 is not None and p99 > a.latency_slo_seconds
        meeting = not missing
        slo = "no request finished in the stable window" + (f", queue-wait p99 {p99:.2f}s" if p99 is not None else "")
    else:
        missing, meeting = attained < a.slo_target, attained >= a.slo_target
        slo = f"SLO attainment {attained:.1%} of {counted:.0f} (target {a.slo_target:.1%})"
    if saturated and missing and state.level < 1.0:
        st = TuneState(level=min(1.0, state.level + TUNE_STEP), last_change=now)
        return out(
            "Saturated", f"{past[-1].waiting:.0f} waiting on {past[-1].scraped} pod(s); {slo}: floor up to {tuning_for(spec, st.level).threshold_min}", st, True
        )
    if idle and meeting and past[-1].complete and state.level > 0.0:
        st = TuneState(level=max(0.0, state.level - TUNE_STEP), last_change=now)
        return out("Headroom", f"no queue; {slo}: floor down to {tuning_for(spec, st.level).threshold_min}", st, True)
    return out("Hold", f"{past[-1].waiting:.0f} waiting on {past[-1].scraped} pod(s); {slo}")
