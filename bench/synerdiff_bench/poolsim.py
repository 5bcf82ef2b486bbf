"""Pool simulator: a DiffusionPool under a request trace, scaled by a policy, on a cost-model clock.

    python -m synerdiff_bench.poolsim --out bench/results/poolsim.json --md bench/results/poolsim.md

A discrete-event simulation of one pool:

- **Pods**: each serves with step-level continuous batching modelled as processor sharing: the
  k running requests advance one denoising step per iteration, an iteration takes the UNet step
  time of their 2k rows from the engine's cost model (a measured H100 profile), plus their share
  of VAE decode and text encoding (one of each per request per `steps` iterations). At most
  `max_rows` rows run; the rest wait in FIFO order. A new pod serves after `startup_s` (model
  load); a removed pod stops getting requests and drains what it holds (the engine's SIGTERM
  path), then frees its GPU.
- **Routing**: each request goes to the ready pod with the fewest requests (running + waiting).
- **Policies**: `Ours` (the operator's `scaling.decide`, fed through the same `signals.aggregate`
  from engine-shaped counters and histograms, every period), `KubeAI` (ceil(moving average of
  active requests / target), scale-down after consecutive low readings), `Static` (a fixed count).
  On a scale-down the ready pod with the fewest requests goes (what the operator's
  pod-deletion-cost marking asks the ReplicaSet for); every policy gets the same.
- **Metrics**: SLO attainment = fraction of requests whose end-to-end latency is within
  `slo_factor` x the lone-request latency; GPU-seconds = pod lifetime (start-up and drain
  included) up to the trace's end.

Deterministic for a given seed. Engine-internal effects (adaptive skip-CFG, VAE chunking, the
operator's threshold tuning) are not modelled: every policy runs the same engine model.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import heapq
import json
import math
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from synerdiff.scheduling.cost_model import CostModel, Profile, reference_h100_sd15
from synerdiff_operator import scaling, signals
from synerdiff_operator.spec import PoolSpec, parse_spec

REPO_ROOT = Path(__file__).resolve().parents[2]  # bench/synerdiff_bench/poolsim.py
H100_PROFILE = REPO_ROOT / "bench" / "results" / "h100-run2" / "profile.json"
# The engine's request-latency histogram buckets (synerdiff.metrics.server.LATENCY_BUCKETS).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, math.inf)


# ------------------------------------------------------------------------------------ service model
@dataclass(frozen=True)
class ServiceModel:
    cost: CostModel
    steps: int = 30
    guided: bool = True
    bucket: tuple[int, int] = (512, 512)
    max_rows: int = 64

    @property
    def rows(self) -> int:
        return 2 if self.guided else 1

    @property
    def max_running(self) -> int:
        return max(1, self.max_rows // self.rows)

    def iteration_s(self, k: int) -> float:
        extra = self.cost.vae_decode_s(1, self.bucket) + self.cost.encode_s(self.rows)
        return self.cost.unet_step_s(k * self.rows, self.bucket) + k * extra / self.steps

    def latency(self, k: int) -> float:
        """End-to-end latency of a request among k running, none waiting."""
        return self.steps * self.iteration_s(k)

    @property
    def lone_latency(self) -> float:
        return self.latency(1)

    def capacity(self, slo_s: float | None = None) -> float:
        """Images/s of one pod at the largest batch whose latency stays within `slo_s` (any batch if None)."""
        best = 0.0
        for k in range(1, self.max_running + 1):
            lat = self.latency(k)
            if slo_s is None or lat <= slo_s:
                best = max(best, k / lat)
        return best


def h100_service(steps: int = 30) -> ServiceModel:
    profile = Profile.load(H100_PROFILE) if H100_PROFILE.exists() else reference_h100_sd15()
    return ServiceModel(CostModel(profile), steps=steps)


# ------------------------------------------------------------------------------------------ traces
@dataclass(frozen=True)
class Trace:
    name: str
    description: str
    duration: float
    arrivals: tuple[float, ...]
    rate: Callable[[float], float] = field(compare=False, repr=False)

    @property
    def peak_rate(self) -> float:
        return max(self.rate(t) for t in range(0, int(self.duration) + 1, 5))


def poisson(rate: Callable[[float], float], duration: float, peak: float, seed: int) -> tuple[float, ...]:
    """Non-homogeneous Poisson arrivals by thinning."""
    rng = random.Random(seed)
    out: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= duration:
            return tuple(out)
        if rng.random() * peak <= rate(t):
            out.append(t)


def trace(name: str, description: str, duration: float, rate: Callable[[float], float], seed: int) -> Trace:
    peak = max(rate(t) for t in range(0, int(duration) + 1)) * 1.001
    return Trace(name, description, duration, poisson(rate, duration, peak, seed), rate)


def _burst_rate(base: float, high: float, starts: Sequence[float], hold: float, ramp: float) -> Callable[[float], float]:
    def rate(t: float) -> float:
        level = 0.0
        for s in starts:
            if s <= t < s + ramp:
                level = max(level, (t - s) / ramp)
            elif s + ramp <= t < s + ramp + hold:
                level = 1.0
            elif s + ramp + hold <= t < s + 2 * ramp + hold:
                level = max(level, 1 - (t - s - ramp - hold) / ramp)
        return base + (high - base) * level

    return rate


def standard_traces(seed: int = 7) -> list[Trace]:
    m = 60.0
    bursts = (10 * m, 25 * m, 40 * m)
    return [
        trace("steady", "Poisson 16 req/s for 30 min", 30 * m, lambda t: 16.0, seed),
        trace("step", "Poisson 8 req/s, 20 req/s from 10 to 30 min (instant steps); 40 min", 40 * m, lambda t: 20.0 if 10 * m <= t < 30 * m else 8.0, seed + 1),
        trace(
            "burst",
            "Poisson 8 req/s with three bursts to 20 req/s at 10, 25, 40 min: 2-min rise, 5-min hold, 2-min fall; 55 min",
            55 * m,
            _burst_rate(8.0, 20.0, bursts, 5 * m, 2 * m),
            seed + 2,
        ),
        trace(
            "spike",
            "as burst, but 10-s rise and fall (flash crowds): no pod can start in time; 55 min",
            55 * m,
            _burst_rate(8.0, 20.0, bursts, 5 * m, 10.0),
            seed + 4,
        ),
        trace(
            "diurnal",
            "Poisson, sinusoid 3-24 req/s, period 30 min (a compressed day), 2 periods",
            60 * m,
            lambda t: 3.0 + 21.0 * (1 - math.cos(2 * math.pi * t / (30 * m))) / 2,
            seed + 3,
        ),
    ]


# --------------------------------------------------------------------------------------- the pool
@dataclass
class Pod:
    id: int
    created: float
    ready_at: float
    draining: bool = False
    gone_at: float | None = None
    vtime: float = 0.0  # iterations done since the pod started: processor sharing's virtual clock
    last: float = 0.0
    active: list[tuple[float, int]] = field(default_factory=list)  # heap of (vtime at finish, request)
    queue: deque[int] = field(default_factory=deque)
    version: int = 0
    images: float = 0.0
    finished: float = 0.0
    latency: list[float] = field(default_factory=lambda: [0.0] * len(LATENCY_BUCKETS))
    queue_wait: list[float] = field(default_factory=lambda: [0.0] * len(LATENCY_BUCKETS))

    def ready(self, now: float) -> bool:
        return now >= self.ready_at and not self.draining and self.gone_at is None

    @property
    def load(self) -> int:
        return len(self.active) + len(self.queue)

    def sample(self) -> signals.EngineSample:
        cumulative = lambda counts: tuple(zip(LATENCY_BUCKETS, _cumsum(counts), strict=False))  # noqa: E731
        return signals.EngineSample(
            waiting=float(len(self.queue)),
            running=float(len(self.active)),
            images=self.images,
            ok=self.finished,
            finished=self.finished,
            latency=cumulative(self.latency),
            queue_wait=cumulative(self.queue_wait),
        )


def _cumsum(xs: list[float]) -> list[float]:
    out, total = [], 0.0
    for x in xs:
        total += x
        out.append(total)
    return out


def _observe(hist: list[float], value: float) -> None:
    hist[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1


@dataclass
class Result:
    trace: str
    policy: str
    requests: int
    slo_s: float
    slo_attainment: float
    p50_s: float
    p99_s: float
    gpu_seconds: float
    mean_pods: float
    max_pods: int
    scale_events: int
    timeline: list[tuple[float, int, int]] = field(default_factory=list)  # (t, pods, ready pods) per tick

    def summary(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("timeline")
        return out


class EventPods:
    """The event queue and pod list a simulated pool keeps (this module's Pool and the routing
    simulator's): `pod_type` is the pod record it makes."""

    pod_type: Any
    pods: list[Any]
    events: list[tuple[float, int, str, Any]]
    seq: int
    startup_s: float

    def push(self, t: float, kind: str, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))

    def add_pod(self, now: float, ready_now: bool = False) -> Any:
        pod = self.pod_type(len(self.pods), created=now, ready_at=now if ready_now else now + self.startup_s, last=now)
        self.pods.append(pod)
        if not ready_now:
            self.push(pod.ready_at, "ready", pod.id)
        return pod

    def live(self) -> list[Any]:
        return [p for p in self.pods if not p.draining and p.gone_at is None]


class Pool(EventPods):
    pod_type = Pod

    def __init__(self, service: ServiceModel, startup_s: float) -> None:
        self.service = service
        self.startup_s = startup_s
        self.pods: list[Pod] = []
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = 0
        self.arrival: list[float] = []
        self.done: list[float] = []
        self.backlog: deque[int] = deque()  # requests that found no ready pod
        self.scale_events = 0

    def _advance(self, pod: Pod, now: float) -> None:
        if pod.active:
            pod.vtime += (now - pod.last) / self.service.iteration_s(len(pod.active))
        pod.last = now

    def _schedule(self, pod: Pod, now: float) -> None:
        pod.version += 1
        if pod.active:
            left = max(0.0, pod.active[0][0] - pod.vtime)
            self.push(now + left * self.service.iteration_s(len(pod.active)), "complete", (pod.id, pod.version))

    def _admit(self, pod: Pod, now: float) -> None:
        while pod.queue and len(pod.active) < self.service.max_running:
            rid = pod.queue.popleft()
            _observe(pod.queue_wait, now - self.arrival[rid])
            heapq.heappush(pod.active, (pod.vtime + self.service.steps, rid))

    def route(self, rid: int, now: float) -> None:
        ready = [p for p in self.pods if p.ready(now)]
        if not ready:
            self.backlog.append(rid)
            return
        pod = min(ready, key=lambda p: (p.load, p.id))
        self._advance(pod, now)
        pod.queue.append(rid)
        self._admit(pod, now)
        self._schedule(pod, now)

    def complete(self, pod: Pod, version: int, now: float) -> None:
        if version != pod.version:
            return
        self._advance(pod, now)
        while pod.active and pod.active[0][0] <= pod.vtime + 1e-9:
            _, rid = heapq.heappop(pod.active)
            self.done[rid] = now
            pod.images += 1
            pod.finished += 1
            _observe(pod.latency, now - self.arrival[rid])
        self._admit(pod, now)
        self._schedule(pod, now)
        if pod.draining and not pod.active and not pod.queue:
            pod.gone_at = now

    def scale_to(self, desired: int, now: float) -> None:
        live = self.live()
        if desired > len(live):
            for _ in range(desired - len(live)):
                self.add_pod(now)
            self.scale_events += 1
        elif desired < len(live):
            # Not-ready pods first (the ReplicaSet's rule), then the ready pod with the least work.
            order = sorted(live, key=lambda p: (p.ready(now), p.load, -p.created, -p.id))
            for pod in order[: len(live) - desired]:
                pod.draining = True
                self._advance(pod, now)
                if not pod.active and not pod.queue:
                    pod.gone_at = now
            self.scale_events += 1

    def pod_ready(self, now: float) -> None:
        while self.backlog:
            self.route(self.backlog.popleft(), now)


# ---------------------------------------------------------------------------------------- policies
class Policy:
    name = "policy"
    period = 5.0

    def initial(self, trace: Trace) -> int:
        raise NotImplementedError

    def tick(self, pool: Pool, now: float) -> int:
        raise NotImplementedError


class Static(Policy):
    def __init__(self, pods: int) -> None:
        self.pods = pods
        self.name = f"static({pods})"
        self.period = 3600.0

    def initial(self, trace: Trace) -> int:
        return self.pods

    def tick(self, pool: Pool, now: float) -> int:
        return self.pods


def autoscaling_spec(min_replicas: int = 1, max_replicas: int = 64, **autoscaling: Any) -> PoolSpec:
    """A pool spec as a user would write it, through the operator's own parser."""
    return parse_spec(
        {
            "image": "sim",
            "model": {"path": "/sim"},
            "replicas": min_replicas,
            "minReplicas": min_replicas,
            "maxReplicas": max_replicas,
            "autoscaling": {"enabled": True, **autoscaling},
        }
    )


class Ours(Policy):
    """The operator's loop: pods' engine-shaped samples -> signals.aggregate -> scaling.decide."""

    def __init__(self, spec: PoolSpec, label: str = "ours") -> None:
        self.spec = spec
        self.name = label
        self.period = spec.autoscaling.period_seconds
        self.state = scaling.ScalerState()
        self.history: list[signals.PoolMetrics] = []
        self.previous: dict[int, tuple[float, signals.EngineSample]] = {}

    def initial(self, trace: Trace) -> int:
        a = self.spec.autoscaling
        assert a.capacity_per_replica
        return max(self.spec.min_replicas, math.ceil(trace.rate(0.0) / (a.capacity_per_replica * a.target_utilization)))

    def tick(self, pool: Pool, now: float) -> int:
        live = pool.live()
        readings = []
        for pod in live:
            if not pod.ready(now):
                continue
            pool._advance(pod, now)
            sample = pod.sample()
            prev = self.previous.get(pod.id)
            readings.append(signals.PodReading(str(pod.id), sample, prev[1] if prev else None, now - prev[0] if prev else None))
            self.previous[pod.id] = (now, sample)
        metrics = signals.aggregate(now, readings, pending=len(live) - len(readings), slo_seconds=self.spec.autoscaling.latency_slo_seconds)
        self.history.append(metrics)
        keep = scaling.history_seconds(self.spec)
        while self.history and self.history[0].time < now - keep:
            self.history.pop(0)
        spec = self.spec.model_copy(update={"replicas": len(live)})
        decision = scaling.decide(spec, self.history, now, self.state)
        self.state = decision.state
        return decision.replicas


class KubeAI(Policy):
    """KubeAI's model autoscaler: ceil(moving average of active requests / targetRequests)."""

    def __init__(
        self, target: float, window_s: float = 600.0, interval_s: float = 10.0, scale_down_delay_s: float = 30.0, min_replicas: int = 1, max_replicas: int = 64
    ) -> None:
        self.target, self.window, self.period = target, window_s, interval_s
        self.delay, self.lo, self.hi = scale_down_delay_s, min_replicas, max_replicas
        self.samples: deque[float] = deque(maxlen=max(1, int(window_s / interval_s)))
        self.low_count = 0
        self.name = f"kubeai(target={target:g}, window={window_s:g}s)"

    def initial(self, trace: Trace) -> int:
        return -1  # filled in by run() with the same start as ours

    def tick(self, pool: Pool, now: float) -> int:
        active = sum(p.load for p in pool.pods if p.gone_at is None)
        self.samples.append(active)
        desired = min(self.hi, max(self.lo, math.ceil(sum(self.samples) / len(self.samples) / self.target)))
        current = len(pool.live())
        if desired < current:
            self.low_count += 1
            if self.low_count < math.ceil(self.delay / self.period):
                return current
        self.low_count = 0
        return desired


# -------------------------------------------------------------------------------------------- run
class RunOptions(TypedDict, total=False):
    """Keyword options of `run` that an experiment passes to every run alike."""

    slo_factor: float
    startup_s: float


def run(trace: Trace, policy: Policy, service: ServiceModel, *, slo_factor: float = 3.0, startup_s: float = 90.0, initial: int | None = None) -> Result:
    pool = Pool(service, startup_s)
    n0 = initial if initial is not None else policy.initial(trace)
    for _ in range(max(1, n0)):
        pool.add_pod(0.0, ready_now=True)
    pool.arrival = list(trace.arrivals)
    pool.done = [math.inf] * len(pool.arrival)
    for rid, t in enumerate(pool.arrival):
        pool.push(t, "arrive", rid)
    pool.push(policy.period, "tick", None)
    timeline: list[tuple[float, int, int]] = []
    while pool.events:
        now, _, kind, payload = heapq.heappop(pool.events)
        if kind == "arrive":
            pool.route(payload, now)
        elif kind == "complete":
            pod_id, version = payload
            pool.complete(pool.pods[pod_id], version, now)
        elif kind == "ready":
            pool.pod_ready(now)
        elif kind == "tick" and now < trace.duration:
            pool.scale_to(policy.tick(pool, now), now)
            timeline.append((round(now, 1), len(pool.live()), sum(p.ready(now) for p in pool.pods)))
            pool.push(now + policy.period, "tick", None)
    slo = slo_factor * service.lone_latency
    lat = sorted(d - a for a, d in zip(pool.arrival, pool.done, strict=False))
    n = len(lat)
    gpu = sum(min(p.gone_at if p.gone_at is not None else trace.duration, trace.duration) - p.created for p in pool.pods if p.created < trace.duration)
    pods_ever = [(p.created, p.gone_at if p.gone_at is not None else math.inf) for p in pool.pods]
    max_pods = max(sum(1 for c, g in pods_ever if c <= t < g) for t in [c for c, _ in pods_ever] or [0.0])
    return Result(
        trace=trace.name,
        policy=policy.name,
        requests=n,
        slo_s=round(slo, 3),
        slo_attainment=sum(1 for x in lat if x <= slo) / n if n else 1.0,
        p50_s=round(lat[n // 2], 3) if n else 0.0,
        p99_s=round(lat[min(n - 1, int(0.99 * n))], 3) if n else 0.0,
        gpu_seconds=round(gpu, 1),
        mean_pods=round(gpu / trace.duration, 2),
        max_pods=max_pods,
        scale_events=pool.scale_events,
        timeline=timeline,
    )


def smallest_static(trace: Trace, service: ServiceModel, goal: float, **kw: Any) -> Result:
    """Static provisioning at peak: the fewest pods that meet the goal on this trace."""
    n = max(1, math.ceil(trace.peak_rate / service.capacity()))
    while True:
        result = run(trace, Static(n), service, **kw)
        if result.slo_attainment >= goal or n >= 256:
            return result
        n += 1


# ----------------------------------------------------------------------------------- experiment
GOAL = 0.99
# The grids each policy is tuned over (one configuration is then used for every trace).
OURS_UTILIZATION = (0.6, 0.7, 0.8)
OURS_DELAY = (120, 300)
OURS_PREDICT = (0, 90)
OURS_HEADROOM = (0.0, 9.0)  # img/s kept spare: 9 is the burst trace's rise (0.1 req/s²) over a 90 s start-up
# maxReplicas: unbounded (64), or the GPU budget a platform team would give the pool = the static
# peak provisioning it replaces (the fewest pods that meet the goal on that trace).
BUDGETS = (False, True)
KUBEAI_TARGET = (1, 1.5, 2, 3)
KUBEAI_WINDOW = (60.0, 600.0)  # KubeAI's default time window is 10 min


def ours_spec(service: ServiceModel, utilization: float, slo_factor: float = 3.0, **extra: Any) -> PoolSpec:
    slo = slo_factor * service.lone_latency
    return autoscaling_spec(
        max_replicas=extra.pop("maxReplicas", 64),
        capacityPerReplica=round(service.capacity(slo), 4),
        targetUtilization=utilization,
        periodSeconds=5,
        scaleUpWindowSeconds=30,
        panicWindowSeconds=10,
        panicThreshold=2.0,
        scaleDownDelaySeconds=extra.pop("scaleDownDelaySeconds", 300),
        latencySLOSeconds=round(slo, 3),
        **extra,
    )


def experiment(*, quick: bool = False, startup_s: float = 90.0, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    service = h100_service()
    traces = standard_traces()
    if quick:
        traces = [dataclasses.replace(t, duration=t.duration / 5, arrivals=tuple(a for a in t.arrivals if a < t.duration / 5)) for t in traces]
    slo = 3.0 * service.lone_latency
    ours_grid = [(u, d, p, h, b) for u in OURS_UTILIZATION for d in OURS_DELAY for p in OURS_PREDICT for h in OURS_HEADROOM for b in BUDGETS]
    kubeai_grid = [(target, window, b) for target in KUBEAI_TARGET for window in KUBEAI_WINDOW for b in BUDGETS]
    if quick:
        ours_grid, kubeai_grid = [(0.7, 120, 90, 0.0, False), (0.8, 120, 90, 9.0, True)], [(2, 600.0, False)]

    out: dict[str, Any] = {
        "service": {
            "profile": service.cost.profile.gpu + " / " + service.cost.profile.model,
            "steps": service.steps,
            "guided": service.guided,
            "size": "512x512",
            "max_rows": service.max_rows,
            "lone_latency_s": round(service.lone_latency, 4),
            "slo_s": round(slo, 4),
            "capacity_within_slo_img_s": round(service.capacity(slo), 3),
            "capacity_max_img_s": round(service.capacity(), 3),
        },
        "startup_s": startup_s,
        "goal": GOAL,
        "traces": {
            t.name: {"description": t.description, "requests": len(t.arrivals), "duration_s": t.duration, "peak_rate": round(t.peak_rate, 2)} for t in traces
        },
        "runs": [],
    }
    kw: RunOptions = {"startup_s": startup_s}
    statics = {}
    for t in traces:
        r = smallest_static(t, service, GOAL, **kw)
        statics[t.name] = r
        out["runs"].append({"family": "static", "config": {"pods": int(r.policy[7:-1])}, **r.summary()})
        log(f"{t.name:8s} {r.policy:32s} slo={r.slo_attainment:.4f} gpu_s={r.gpu_seconds:.0f}")
    configs: dict[tuple[str, str], dict[str, Any]] = {}

    def budget(t: Trace, bounded: bool) -> int:
        return statics[t.name].max_pods if bounded else 64

    for u, delay, predict, headroom, bounded in ours_grid:
        label = f"ours(util={u:g}, delay={delay}s, predict={predict}s, headroom={headroom:g}, max={'static' if bounded else 64})"
        for t in traces:
            spec = ours_spec(service, u, scaleDownDelaySeconds=delay, predictSeconds=predict, headroomImagesPerSecond=headroom, maxReplicas=budget(t, bounded))
            r = run(t, Ours(spec, label), service, **kw)
            configs.setdefault(("ours", label), {})[t.name] = r
            out["runs"].append(
                {
                    "family": "ours",
                    "config": {
                        "targetUtilization": u,
                        "scaleDownDelaySeconds": delay,
                        "predictSeconds": predict,
                        "headroomImagesPerSecond": headroom,
                        "maxReplicas": budget(t, bounded),
                    },
                    **r.summary(),
                }
            )
            log(f"{t.name:8s} {label:32s} slo={r.slo_attainment:.4f} gpu_s={r.gpu_seconds:.0f}")
    for target, window, bounded in kubeai_grid:
        label = f"kubeai(target={target}, window={window:g}s, max={'static' if bounded else 64})"
        for t in traces:
            n0 = Ours(ours_spec(service, 0.7)).initial(t)
            r = run(t, KubeAI(target, window, max_replicas=budget(t, bounded)), service, initial=n0, **kw)
            r.policy = label
            configs.setdefault(("kubeai", label), {})[t.name] = r
            out["runs"].append(
                {"family": "kubeai", "config": {"targetRequests": target, "windowSeconds": window, "maxReplicas": budget(t, bounded)}, **r.summary()}
            )
            log(f"{t.name:8s} {label:32s} slo={r.slo_attainment:.4f} gpu_s={r.gpu_seconds:.0f}")

    def score(results: dict[str, Result]) -> tuple[int, float]:
        # One configuration per policy for every trace: most traces at the goal, then fewest GPU-seconds.
        return (-sum(r.slo_attainment >= GOAL for r in results.values()), sum(r.gpu_seconds for r in results.values()))

    chosen = {}
    for family in ("ours", "kubeai"):
        label, results = min(((k[1], v) for k, v in configs.items() if k[0] == family), key=lambda kv: score(kv[1]))
        chosen[family] = (label, results)
    out["chosen"] = {f: label for f, (label, _) in chosen.items()}
    out["table"] = [
        {
            "trace": t.name,
            "policy": name,
            "label": res.policy,
            "slo_attainment": round(res.slo_attainment, 4),
            "p99_s": res.p99_s,
            "gpu_seconds": res.gpu_seconds,
            "mean_pods": res.mean_pods,
            "max_pods": res.max_pods,
            "scale_events": res.scale_events,
        }
        for t in traces
        for name, res in (("static-peak", statics[t.name]), ("kubeai", chosen["kubeai"][1][t.name]), ("ours", chosen["ours"][1][t.name]))
    ]
    return out


def markdown(result: dict[str, Any], command: str) -> str:
    s = result["service"]
    lines = [
        "# Pool simulator results",
        "",
        f"Command: `{command}`",
        "",
        f"Engine model: {s['profile']}, {s['steps']} steps, guided, {s['size']}, max_rows {s['max_rows']}: lone latency "
        f"{s['lone_latency_s']} s, SLO = 3x = {s['slo_s']} s; one pod carries {s['capacity_within_slo_img_s']} img/s within the SLO "
        f"({s['capacity_max_img_s']} at full batch). Pod start-up {result['startup_s']:g} s. Goal: >= {result['goal']:.0%} of requests within the SLO.",
        "",
        "Each policy runs with one configuration for all traces, the best of its grid (most traces at the goal, then fewest GPU-seconds): "
        f"ours = `{result['chosen']['ours']}`, KubeAI-style = `{result['chosen']['kubeai']}`. Static = the fewest pods that meet the goal on that trace.",
        "",
        "| trace | policy | SLO attainment | p99 latency (s) | GPU-seconds | mean pods | max pods | scale events |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["table"]:
        mark = "" if row["slo_attainment"] >= result["goal"] else " ✗"
        lines.append(
            f"| {row['trace']} | {row['label']} | {row['slo_attainment']:.2%}{mark} | {row['p99_s']} | {row['gpu_seconds']:.0f} | {row['mean_pods']} | {row['max_pods']} | {row['scale_events']} |"
        )
    lines += ["", "Traces:", ""]
    for name, t in result["traces"].items():
        lines.append(f"- **{name}**: {t['description']} ({t['requests']} requests, peak {t['peak_rate']} req/s)")
    lines += ["", "Every configuration tried is in `poolsim.json` (`runs`).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "poolsim.json")
    parser.add_argument("--md", type=Path, default=REPO_ROOT / "bench" / "results" / "poolsim.md")
    parser.add_argument("--startup", type=float, default=90.0, help="pod start-up delay, seconds")
    parser.add_argument("--quick", action="store_true", help="a fifth of each trace and one configuration per policy (smoke test)")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    result = experiment(quick=args.quick, startup_s=args.startup, log=lambda s: print(s, file=sys.stderr, flush=True))
    result["wall_s"] = round(time.monotonic() - t0, 1)
    command = "python -m synerdiff_bench.poolsim" + (" --quick" if args.quick else "") + (f" --startup {args.startup:g}" if args.startup != 90.0 else "")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.md.write_text(markdown(result, command))
    print(markdown(result, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
