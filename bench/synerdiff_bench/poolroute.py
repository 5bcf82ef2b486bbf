"""Pool simulator, routing: the router's decision function against kube-proxy, on mixed request shapes.

    python -m synerdiff_bench.poolroute --out bench/results/poolroute.json --md bench/results/poolroute.md

The same discrete-event pool as `poolsim` (pods that start after `startup_s`, drain on removal,
the operator's own `scaling.decide` through `signals.aggregate` every period), with two changes:

- **Mixed requests.** Each request has its own shape, step count, image count and guidance, drawn
  from a mix (default: `MIX`). A pod is step-level continuous batching as processor sharing: every
  running request advances one step per iteration; an iteration runs one UNet forward per shape
  bucket present (the rows of one shape share a forward, so a request that joins its shape's batch
  costs less than one that opens a bucket), plus each request's share of its VAE decode and text
  encode. Admission is FIFO, bounded by `max_rows` rows at the native size (a 768x768 row counts
  2.25). SLO: each request within 3x its own lone latency on an idle pod.
- **Routing** is a parameter:
  - `router`: `synerdiff.router.decide.choose`, the function `synerdiff route` runs, over the
    state the router would have: per pod the row-steps it sent and has not seen finish (full cost
    until done, as for a non-streamed request), `max_rows`, the shapes in flight;
  - `least-requests`: the fewest requests in the pod (what `poolsim` assumed);
  - `random`: a uniformly random ready pod per request (kube-proxy with a new connection per request);
  - `per-connection`: kube-proxy with keep-alive clients: `clients` callers each keep an httpx-style
    pool; a request reuses an idle connection of its caller (pinned to the pod it was opened to) or
    opens one to a random ready pod; connections idle for more than `keepalive_s` (uvicorn's 5 s) or
    to a draining pod close.

Deterministic for a given seed (arrivals, request mix, random picks).
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
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synerdiff.router.decide import EngineState, RequestCost, choose
from synerdiff.scheduling.cost_model import CostModel
from synerdiff_operator import signals

from . import poolsim
from .poolsim import LATENCY_BUCKETS, Ours, Policy, Static, Trace

NATIVE = (512, 512)


@dataclass(frozen=True)
class Kind:
    """One kind of request in a mix."""

    name: str
    weight: float
    size: tuple[int, int] = NATIVE
    steps: int = 30
    n: int = 1
    guided: bool = True

    @property
    def rows(self) -> int:
        return (2 if self.guided else 1) * self.n

    @property
    def pixel_rows(self) -> float:
        """Rows in units of a native-size row (what max_rows bounds)."""
        return self.rows * self.size[0] * self.size[1] / (NATIVE[0] * NATIVE[1])

    def cost(self) -> RequestCost:
        return RequestCost(self.size, self.rows, self.steps, self.size[0] * self.size[1] / (NATIVE[0] * NATIVE[1]))


# A mix of what an images API sees: mostly the default, longer and shorter runs, pairs, a larger
# size, and few-step unguided "turbo" requests.
MIX: tuple[Kind, ...] = (
    Kind("512² 30 steps", 0.50),
    Kind("512² 50 steps", 0.15, steps=50),
    Kind("512² 20 steps n=2", 0.15, steps=20, n=2),
    Kind("768² 30 steps", 0.10, size=(768, 768)),
    Kind("512² 8 steps unguided", 0.10, steps=8, guided=False),
)
UNIFORM: tuple[Kind, ...] = (Kind("512² 30 steps", 1.0),)


@dataclass(frozen=True)
class Service:
    cost: CostModel
    max_rows: int = 64

    def lone_latency(self, k: Kind) -> float:
        return k.steps * self.cost.unet_step_s(k.rows, k.size) + self.cost.vae_decode_s(k.n, k.size) + self.cost.encode_s(2 if k.guided else 1)

    def extra(self, k: Kind) -> float:
        """Per iteration: this request's share of its decode and encode."""
        return (self.cost.vae_decode_s(k.n, k.size) + self.cost.encode_s(2 if k.guided else 1)) / k.steps

    def iteration_s(self, rows_by_shape: Counter[tuple[int, int]], extra: float) -> float:
        return sum(self.cost.unet_step_s(r, s) for s, r in rows_by_shape.items() if r > 0) + extra

    def mean_cost_per_image(self, mix: Sequence[Kind]) -> float:
        total = sum(k.weight for k in mix)
        work = sum(k.weight * k.pixel_rows * k.steps for k in mix) / total
        images = sum(k.weight * k.n for k in mix) / total
        return work / images


def h100() -> Service:
    return Service(poolsim.h100_service().cost)


# ------------------------------------------------------------------------------------ the pool
@dataclass
class Pod:
    id: int
    created: float
    ready_at: float
    draining: bool = False
    gone_at: float | None = None
    vtime: float = 0.0
    last: float = 0.0
    active: list[tuple[float, int]] = field(default_factory=list)
    queue: deque[int] = field(default_factory=deque)
    rows_by_shape: Counter[tuple[int, int]] = field(default_factory=Counter)
    pixel_rows: float = 0.0
    extra: float = 0.0
    sent: float = 0.0  # the router's accounting: row-steps of requests here, full cost until done
    shapes: Counter[tuple[int, int]] = field(default_factory=Counter)
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
        return poolsim.Pod.sample(self)  # type: ignore[arg-type]  # the same fields


def _observe(hist: list[float], value: float) -> None:
    hist[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1


class Pool(poolsim.EventPods):
    """poolsim.Pool's interface (live, _advance, scale_to, pods) for mixed requests and a routing choice."""

    pod_type = Pod

    def __init__(self, service: Service, startup_s: float, routing: str, kinds: list[Kind], seed: int, clients: int = 8, keepalive_s: float = 5.0) -> None:
        self.service = service
        self.startup_s = startup_s
        self.routing = routing
        self.kinds = kinds  # per request
        self.rng = random.Random(seed)
        self.pods: list[Pod] = []
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = 0
        self.arrival: list[float] = []
        self.done: list[float] = []
        self.backlog: deque[int] = deque()
        self.scale_events = 0
        self.clients = clients
        self.keepalive_s = keepalive_s
        self.idle: list[list[tuple[int, float]]] = [[] for _ in range(clients)]  # per caller: (pod, idle since)
        self.conn: dict[int, tuple[int, int]] = {}  # request -> (caller, pod) while in flight
        self.joined = 0

    def _iteration(self, pod: Pod) -> float:
        return self.service.iteration_s(pod.rows_by_shape, pod.extra)

    def _advance(self, pod: Pod, now: float) -> None:
        if pod.active:
            pod.vtime += (now - pod.last) / self._iteration(pod)
        pod.last = now

    def _schedule(self, pod: Pod, now: float) -> None:
        pod.version += 1
        if pod.active:
            left = max(0.0, pod.active[0][0] - pod.vtime)
            self.push(now + left * self._iteration(pod), "complete", (pod.id, pod.version))

    def _admit(self, pod: Pod, now: float) -> None:
        limit = float(self.service.max_rows)
        while pod.queue:
            k = self.kinds[pod.queue[0]]
            if pod.active and pod.pixel_rows + k.pixel_rows > limit + 1e-9:
                break
            rid = pod.queue.popleft()
            _observe(pod.queue_wait, now - self.arrival[rid])
            heapq.heappush(pod.active, (pod.vtime + k.steps, rid))
            pod.rows_by_shape[k.size] += k.rows
            pod.pixel_rows += k.pixel_rows
            pod.extra += self.service.extra(k)

    # -------------------------------------------------------------------------------- routing
    def pick(self, rid: int, now: float, ready: list[Pod]) -> Pod:
        k = self.kinds[rid]
        if self.routing == "router":
            states = [
                EngineState(name=str(p.id), sent=p.sent, capacity=self.service.max_rows, shapes=frozenset(s for s, c in p.shapes.items() if c > 0))
                for p in ready
            ]
            choice = choose(states, k.cost())
            assert choice is not None
            self.joined += choice.joins_batch
            return self.pods[int(choice.name)]
        if self.routing == "least-requests":
            return min(ready, key=lambda p: (p.load, p.id))
        if self.routing == "random":
            return self.rng.choice(ready)
        if self.routing == "per-connection":
            caller = self.rng.randrange(self.clients)
            idle = self.idle[caller]
            while idle:
                pod_id, since = idle.pop()  # the most recently used connection first
                if now - since <= self.keepalive_s and self.pods[pod_id].ready(now):
                    self.conn[rid] = (caller, pod_id)
                    return self.pods[pod_id]
            pod = self.rng.choice(ready)  # a new connection: kube-proxy picks
            self.conn[rid] = (caller, pod.id)
            return pod
        raise ValueError(f"unknown routing {self.routing!r}")

    def route(self, rid: int, now: float) -> None:
        ready = [p for p in self.pods if p.ready(now)]
        if not ready:
            self.backlog.append(rid)  # the router buffers; kube-proxy's callers would retry
            return
        pod = self.pick(rid, now, ready)
        k = self.kinds[rid]
        pod.sent += k.cost().row_steps
        pod.shapes[k.size] += 1
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
            k = self.kinds[rid]
            self.done[rid] = now
            pod.images += k.n
            pod.finished += 1
            pod.rows_by_shape[k.size] -= k.rows
            pod.pixel_rows -= k.pixel_rows
            pod.extra -= self.service.extra(k)
            pod.sent -= k.cost().row_steps
            pod.shapes[k.size] -= 1
            _observe(pod.latency, now - self.arrival[rid])
            if rid in self.conn:
                caller, pod_id = self.conn.pop(rid)
                if not pod.draining:
                    self.idle[caller].append((pod_id, now))
        if not pod.active:
            pod.extra, pod.pixel_rows = 0.0, 0.0  # no float drift across idle periods
        self._admit(pod, now)
        self._schedule(pod, now)
        if pod.draining and not pod.active and not pod.queue:
            pod.gone_at = now

    def scale_to(self, desired: int, now: float) -> None:
        poolsim.Pool.scale_to(self, desired, now)  # type: ignore[arg-type]  # the same interface

    def pod_ready(self, now: float) -> None:
        while self.backlog:
            self.route(self.backlog.popleft(), now)


@dataclass
class Result:
    trace: str
    routing: str
    policy: str
    requests: int
    slo_attainment: float
    p50_s: float
    p99_s: float
    p99_slowdown: float  # latency over the request's own lone latency
    gpu_seconds: float
    mean_pods: float
    max_pods: int
    joined_batch: float  # router only: fraction of picks made for the shape

    def summary(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def draw_kinds(mix: Sequence[Kind], n: int, seed: int) -> list[Kind]:
    rng = random.Random(seed)
    return rng.choices(list(mix), weights=[k.weight for k in mix], k=n)


def run(
    trace: Trace, policy: Policy, service: Service, routing: str, mix: Sequence[Kind] = MIX, *, startup_s: float = 90.0, seed: int = 11, slo_factor: float = 3.0
) -> Result:
    kinds = draw_kinds(mix, len(trace.arrivals), seed)
    pool = Pool(service, startup_s, routing, kinds, seed + 1)
    for _ in range(max(1, policy.initial(trace))):
        pool.add_pod(0.0, ready_now=True)
    pool.arrival = list(trace.arrivals)
    pool.done = [math.inf] * len(pool.arrival)
    for rid, t in enumerate(pool.arrival):
        pool.push(t, "arrive", rid)
    pool.push(policy.period, "tick", None)
    while pool.events:
        now, _, kind, payload = heapq.heappop(pool.events)
        if kind == "arrive":
            pool.route(payload, now)
        elif kind == "complete":
            pool.complete(pool.pods[payload[0]], payload[1], now)
        elif kind == "ready":
            pool.pod_ready(now)
        elif kind == "tick" and now < trace.duration:
            pool.scale_to(policy.tick(pool, now), now)  # type: ignore[arg-type]  # poolsim.Pool's interface
            pool.push(now + policy.period, "tick", None)
    lone = {k: service.lone_latency(k) for k in set(kinds)}
    lat = [d - a for a, d in zip(pool.arrival, pool.done, strict=True)]
    slow = sorted(x / lone[k] for x, k in zip(lat, kinds, strict=True))
    lat.sort()
    n = len(lat)
    gpu = sum(min(p.gone_at if p.gone_at is not None else trace.duration, trace.duration) - p.created for p in pool.pods if p.created < trace.duration)
    spans = [(p.created, p.gone_at if p.gone_at is not None else math.inf) for p in pool.pods]
    return Result(
        trace=trace.name,
        routing=routing,
        policy=policy.name,
        requests=n,
        slo_attainment=round(sum(1 for s in slow if s <= slo_factor) / n, 4) if n else 1.0,
        p50_s=round(lat[n // 2], 3) if n else 0.0,
        p99_s=round(lat[min(n - 1, int(0.99 * n))], 3) if n else 0.0,
        p99_slowdown=round(slow[min(n - 1, int(0.99 * n))], 2) if n else 0.0,
        gpu_seconds=round(gpu, 1),
        mean_pods=round(gpu / trace.duration, 2),
        max_pods=max(sum(1 for c, g in spans if c <= t < g) for t in [c for c, _ in spans] or [0.0]),
        joined_batch=round(pool.joined / n, 3) if n and routing == "router" else 0.0,
    )


ROUTINGS = ("router", "least-requests", "random", "per-connection")
TRACES = ("steady", "step", "burst", "diurnal")
GOAL = 0.99


def ours_spec(service: Service, mix: Sequence[Kind], max_replicas: int, utilization: float = 0.8) -> Any:
    """poolsim's chosen configuration (util 0.8, delay 120 s, predict 0 s, headroom 9 img/s, maxReplicas =
    budget), with capacityPerReplica rescaled from the uniform request to the mix's work per image."""
    uniform = poolsim.h100_service()
    cap_uniform = uniform.capacity(3.0 * uniform.lone_latency)
    scale = service.mean_cost_per_image(UNIFORM) / service.mean_cost_per_image(mix)
    spec = poolsim.ours_spec(uniform, utilization, scaleDownDelaySeconds=120, predictSeconds=0, headroomImagesPerSecond=9.0, maxReplicas=max_replicas)
    a = spec.autoscaling.model_copy(update={"capacity_per_replica": round(cap_uniform * scale, 4)})
    return spec.model_copy(update={"autoscaling": a})


def smallest_static(trace: Trace, service: Service, mix: Sequence[Kind], routing: str, goal: float = GOAL, **kw: Any) -> Result:
    n = 1
    while True:
        r = run(trace, Static(n), service, routing, mix, **kw)
        if r.slo_attainment >= goal or n >= 64:
            return r
        n += 1


UTILIZATION = (0.5, 0.6, 0.7, 0.8)


def experiment(*, quick: bool = False, startup_s: float = 90.0, mix: Sequence[Kind] = MIX, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    service = h100()
    traces = [t for t in poolsim.standard_traces() if t.name in TRACES]
    if quick:
        traces = [dataclasses.replace(t, duration=t.duration / 5, arrivals=tuple(a for a in t.arrivals if a < t.duration / 5)) for t in traces]
    out: dict[str, Any] = {
        "mix": [dataclasses.asdict(k) for k in mix],
        "service": {
            "profile": service.cost.profile.gpu,
            "max_rows": service.max_rows,
            "lone_latency_s": {k.name: round(service.lone_latency(k), 3) for k in mix},
        },
        "startup_s": startup_s,
        "goal": GOAL,
        "traces": {t.name: {"description": t.description, "requests": len(t.arrivals)} for t in traces},
        "tuning": [],
        "runs": [],
    }
    # The GPU budget per trace: static peak provisioning under the router (the fewest pods meeting the goal).
    budgets: dict[str, int] = {}
    for t in traces:
        static = smallest_static(t, service, mix, "router", startup_s=startup_s)
        budgets[t.name] = static.max_pods
        out["runs"].append({"autoscaler": "static", "budget": static.max_pods, **static.summary()})
        log(f"{t.name:8s} static({static.max_pods}) router slo={static.slo_attainment:.4f}")
    # poolsim's chosen configuration, its targetUtilization re-tuned for the mix under the router
    # (most traces at the goal, then fewest GPU-seconds); then the same configuration for every routing.
    tuned: dict[float, list[Result]] = {}
    for u in (0.8,) if quick else UTILIZATION:
        tuned[u] = [run(t, Ours(ours_spec(service, mix, budgets[t.name], u), "ours"), service, "router", mix, startup_s=startup_s) for t in traces]
        for r in tuned[u]:
            out["tuning"].append({"targetUtilization": u, **r.summary()})
            log(f"{r.trace:8s} ours(util={u}) router slo={r.slo_attainment:.4f} gpu_s={r.gpu_seconds:.0f}")
    best = min(tuned, key=lambda u: (-sum(r.slo_attainment >= GOAL for r in tuned[u]), sum(r.gpu_seconds for r in tuned[u])))
    out["chosen_utilization"] = best
    for t, router_result in zip(traces, tuned[best], strict=True):
        out["runs"].append({"autoscaler": "ours", "budget": budgets[t.name], "targetUtilization": best, **router_result.summary()})
        for routing in ROUTINGS[1:]:
            r = run(t, Ours(ours_spec(service, mix, budgets[t.name], best), "ours"), service, routing, mix, startup_s=startup_s)
            out["runs"].append({"autoscaler": "ours", "budget": budgets[t.name], "targetUtilization": best, **r.summary()})
            log(f"{t.name:8s} ours(util={best}) {routing:15s} slo={r.slo_attainment:.4f} p99={r.p99_s}s gpu_s={r.gpu_seconds:.0f}")
            s_ = run(t, Static(budgets[t.name]), service, routing, mix, startup_s=startup_s)
            out["runs"].append({"autoscaler": "static", "budget": budgets[t.name], **s_.summary()})
            log(f"{t.name:8s} static({budgets[t.name]}) {routing:15s} slo={s_.slo_attainment:.4f} p99={s_.p99_s}s")
    return out


def markdown(result: dict[str, Any], command: str) -> str:
    lines = [
        "# Pool simulator, routing: the router's decision function against kube-proxy (mixed requests)",
        "",
        f"Command: `{command}`",
        "",
        "Request mix (drawn per request): " + "; ".join(f"{k['name']} {k['weight']:.0%}" for k in result["mix"]) + ".",
        "Lone latency per kind (s): " + ", ".join(f"{n} {v}" for n, v in result["service"]["lone_latency_s"].items()) + ".",
        f"SLO: each request within 3x its own lone latency. Pod start-up {result['startup_s']:g} s. Goal >= {result['goal']:.0%}.",
        "Autoscaler: the operator's `scaling.decide` with poolsim's chosen configuration (delay 120 s, predict 0 s, headroom 9 img/s),",
        f"capacity rescaled to the mix, `targetUtilization` re-tuned for the mix under the router ({result['chosen_utilization']:g}; every value tried is in `tuning`),",
        "`maxReplicas` = the static peak count under the router (the GPU budget). Only the routing changes between the rows of a trace.",
        "",
        "| trace | routing | autoscaler | SLO attainment | p50 (s) | p99 (s) | p99 slowdown | GPU-seconds | mean pods |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        mark = "" if r["slo_attainment"] >= result["goal"] else " ✗"
        auto = r["policy"] if r["autoscaler"] == "static" else f"ours(util={r['targetUtilization']:g}, max={r['budget']})"
        lines.append(
            f"| {r['trace']} | {r['routing']} | {auto} | {r['slo_attainment']:.2%}{mark} | {r['p50_s']} | {r['p99_s']} | {r['p99_slowdown']} | {r['gpu_seconds']:.0f} | {r['mean_pods']} |"
        )
    lines += ["", "Traces:", ""]
    for name, t in result["traces"].items():
        lines.append(f"- **{name}**: {t['description']} ({t['requests']} requests)")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=poolsim.REPO_ROOT / "bench" / "results" / "poolroute.json")
    parser.add_argument("--md", type=Path, default=poolsim.REPO_ROOT / "bench" / "results" / "poolroute.md")
    parser.add_argument("--startup", type=float, default=90.0, help="pod start-up delay, seconds")
    parser.add_argument("--uniform", action="store_true", help="every request 512x512, 30 steps (poolsim's workload)")
    parser.add_argument("--quick", action="store_true", help="a fifth of each trace (smoke test)")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    mix = UNIFORM if args.uniform else MIX
    result = experiment(quick=args.quick, startup_s=args.startup, mix=mix, log=lambda s: print(s, file=sys.stderr, flush=True))
    result["wall_s"] = round(time.monotonic() - t0, 1)
    command = "python -m synerdiff_bench.poolroute" + (" --quick" if args.quick else "") + (" --uniform" if args.uniform else "")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.md.write_text(markdown(result, command))
    print(markdown(result, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
