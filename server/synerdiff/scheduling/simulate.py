"""Simulation mode: the engine's iteration loop with the cost model in place of the GPU.

The same policies and controller as the real engine decide every iteration; each
iteration's duration is what the cost model says its encode + UNet step + VAE decodes
take back to back, plus what each one-image chunk beside the step adds to it (the profile's
measured `vae_beside`; only such small chunks overlap a step on the GPU). Deterministic and
fast, so scheduler and controller behaviour is tested on a CPU, and the operator's pool
simulator uses it as a pod's capacity model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
import random
from dataclasses import dataclass, field

from ..contract.config import SchedulerConfig
from . import controller as ctl
from .cost_model import CostModel
from .planner import Active, Bucket, Decode, EngineView, Policy, Waiting
from .policies import policy_for


@dataclass
class SimRequest:
    request_id: str
    arrival: float
    bucket: Bucket = (512, 512)
    images: int = 1
    guided: bool = True
    steps: int = 50
    cfg_skippable: bool = True
    # filled in by the simulation
    admitted: float | None = None
    step: int = 0
    skipped: int = 0
    unet_done: float | None = None
    images_left: int = 0
    done: float | None = None

    @property
    def latency(self) -> float:
        return math.inf if self.done is None else self.done - self.arrival


@dataclass
class SimOutcome:
    requests: list[SimRequest]
    end: float
    thresholds: list[tuple[float, float]] = field(default_factory=list)  # (time, threshold)
    step_times: list[float] = field(default_factory=list)

    def latencies(self) -> list[float]:
        return sorted(r.latency for r in self.requests)

    def percentile(self, q: float) -> float:
        lat = self.latencies()
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else 0.0

    @property
    def mean_latency(self) -> float:
        lat = self.latencies()
        return sum(lat) / len(lat) if lat else 0.0

    @property
    def throughput(self) -> float:
        done = [r for r in self.requests if r.done is not None]
        span = max(r.done for r in done) - min(r.arrival for r in self.requests) if done else 0.0
        return sum(r.images for r in done) / span if span > 0 else 0.0


def poisson_arrivals(rate: float, duration: float, seed: int = 0, **kw) -> list[SimRequest]:
    rng = random.Random(seed)
    t, out = 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t > duration:
            return out
        out.append(SimRequest(f"r{len(out)}", t, **kw))


def simulate(
    requests: list[SimRequest],
    cfg: SchedulerConfig,
    cost: CostModel,
    policy: Policy | None = None,
    max_time: float = 3600.0,
) -> SimOutcome:
    policy = policy or policy_for(cfg, cost)
    pending = sorted(requests, key=lambda r: r.arrival)
    waiting: list[SimRequest] = []
    active: list[SimRequest] = []
    decoding: list[SimRequest] = []
    state = ctl.ControllerState.initial(cfg)
    last_served: dict[Bucket, float] = {}
    recent_waits: list[float] = []
    now = 0.0
    out = SimOutcome(requests, 0.0)
    i = 0
    while (i < len(pending) or waiting or active or decoding) and now < max_time:
        while i < len(pending) and pending[i].arrival <= now:
            waiting.append(pending[i])
            i += 1
        if now - state.last_tick >= ctl.TICK_S:
            obs = ctl.Observation(
                now,
                waiting_rows=sum(r.images * (2 if r.guided else 1) for r in waiting),
                active_rows=sum(r.images * (2 if r.guided else 1) for r in active),
                mean_queue_wait_s=sum(recent_waits) / len(recent_waits) if recent_waits else None,
            )
            recent_waits = []
            state = ctl.tick(cfg, state, obs)
            out.thresholds.append((now, state.threshold))
        view = EngineView(
            now=now,
            waiting=tuple(Waiting(r.request_id, r.bucket, r.images, r.guided, r.steps, r.arrival) for r in waiting),
            active=tuple(Active(r.request_id, r.bucket, r.images, r.guided, r.step, r.steps, r.cfg_skippable and r.guided) for r in active),
            decodes=tuple(Decode(r.request_id, r.bucket, r.images_left, r.unet_done) for r in decoding),
            max_rows=cfg.max_rows,
            last_served=dict(last_served),
            threshold=state.threshold,
            skip_fraction=ctl.skip_fraction(cfg, state.threshold),
        )
        plan = policy.plan(view)
        if plan.idle:
            if i >= len(pending):
                break
            now = pending[i].arrival
            continue
        dt, rows = 0.0, 0
        by_id = {r.request_id: r for r in waiting}
        admitted = [by_id[x] for x in plan.admit]
        if admitted:
            dt += cost.encode_s(len(admitted) + sum(r.guided for r in admitted))
            for r in admitted:
                waiting.remove(r)
                active.append(r)
                r.admitted = now
                recent_waits.append(now - r.arrival)
        if plan.step_bucket is not None:
            last_served[plan.step_bucket] = now
            group = [r for r in active if r.bucket == plan.step_bucket]
            rows = sum(r.images * (2 if r.guided and r.request_id not in plan.skip_cfg else 1) for r in group)
            t_step = cost.unet_step_s(rows, plan.step_bucket)
            dt += t_step
            out.step_times.append(t_step)
            for r in group:
                r.skipped += r.guided and r.request_id in plan.skip_cfg
                r.step += 1
        by_id = {r.request_id: r for r in decoding}
        finished_decodes = []
        for rid, k in plan.decode_beside:  # one-image chunks on a second stream during the step
            r = by_id[rid]
            dt += k * cost.vae_beside_s(rows, r.bucket)
            r.images_left -= k
            if r.images_left <= 0:
                finished_decodes.append(r)
        for rid, k in plan.decode:
            r = by_id[rid]
            dt += cost.vae_decode_s(k, r.bucket)
            r.images_left -= k
            if r.images_left <= 0:
                finished_decodes.append(r)
        now += dt
        for r in finished_decodes:
            decoding.remove(r)
            r.done = now
        for r in [r for r in active if r.step >= r.steps]:
            active.remove(r)
            r.unet_done = now
            r.images_left = r.images
            decoding.append(r)
    out.end = now
    return out


def simulate_static(requests: list[SimRequest], cost: CostModel, batch: int, wait_s: float) -> SimOutcome:
    """Static batching: gather up to `batch` requests or wait `wait_s`, run the whole pipeline."""
    pending = sorted(requests, key=lambda r: r.arrival)
    now, i = 0.0, 0
    while i < len(pending):
        head = pending[i]
        now = max(now, head.arrival)
        deadline = max(now, head.arrival + wait_s)
        j = i
        while j < len(pending) and j - i < batch and pending[j].arrival <= deadline:
            j += 1
        start = max(now, pending[j - 1].arrival) if j - i == batch else max(now, deadline)
        group = pending[i:j]
        rows = sum(r.images * (2 if r.guided else 1) for r in group)
        steps = max(r.steps for r in group)
        t = cost.encode_s(2 * len(group)) + steps * cost.unet_step_s(rows, head.bucket) + cost.vae_decode_s(sum(r.images for r in group), head.bucket)
        for r in group:
            r.admitted = start
            r.done = start + t
        now = start + t
        i = j
    return SimOutcome(requests, now)


def main(argv: list[str] | None = None) -> None:
    """python -m synerdiff.scheduling.simulate --profile P --rates 1,2,3 --duration 120"""
    import argparse
    import json
    import sys

    from .cost_model import Profile

    ap = argparse.ArgumentParser(description="Simulate the engine's policies on a measured profile (no GPU).")
    ap.add_argument("--profile", required=True)
    ap.add_argument("--bucket", default="512x512")
    ap.add_argument("--rates", default="0.5,1,1.5,2,2.5,3,3.5,4,5")
    ap.add_argument("--duration", type=float, default=120.0)
    ap.add_argument("--max-rows", type=int, default=64)
    ap.add_argument("--static-batch", type=int, default=8)
    ap.add_argument("--static-wait", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default=None, help="several arrival draws, e.g. 0,1,2,3,4 (overrides --seed)")
    ap.add_argument("--slo", type=float, default=None, help="P99 SLO in seconds: also report each system's capacity per seed")
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args(argv)
    cost = CostModel(Profile.load(args.profile))
    h, w = (int(v) for v in args.bucket.split("x"))
    systems = {
        "static": None,
        "continuous": SchedulerConfig(policy="continuous", max_rows=args.max_rows),
        "synerdiff": SchedulerConfig(policy="synerdiff", max_rows=args.max_rows),
        "chunking-only": SchedulerConfig(policy="synerdiff", max_rows=args.max_rows, skip_cfg_bound=0.0),
    }
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    rates = [float(r) for r in args.rates.split(",")]
    rows = []
    for seed in seeds:
        for rate in rates:
            for name, cfg in systems.items():
                reqs = poisson_arrivals(rate, args.duration, seed=seed, bucket=(h, w))
                out = simulate_static(reqs, cost, args.static_batch, args.static_wait) if cfg is None else simulate(reqs, cfg, cost)
                rows.append(dict(system=name, seed=seed, rate=rate, throughput=out.throughput, mean_s=out.mean_latency, p50_s=out.percentile(0.5),
                                 p99_s=out.percentile(0.99), skipped_per_request=sum(r.skipped for r in reqs) / max(1, len(reqs))))
                r = rows[-1]
                print(f"{name:>13} @ {rate:>4}/s seed {seed}: {r['throughput']:.2f} img/s, mean {r['mean_s']:.2f} s, p99 {r['p99_s']:.2f} s, skipped {r['skipped_per_request']:.1f}/req")
    caps = capacities(rows, args.slo) if args.slo else {}
    for name, per_seed in caps.items():
        print(f"capacity at P99 <= {args.slo:g} s, {name:>13}: " + ", ".join(f"seed {k}: {v if v is not None else '-'}" for k, v in per_seed.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python -m synerdiff.scheduling.simulate " + " ".join(sys.argv[1:] if argv is None else argv),
                       "profile": args.profile, "rows": rows, "capacity": caps}, f, indent=1)


def capacity(p99_by_rate: Iterable[tuple[float, float | None]], slo_s: float) -> float | None:
    """The highest rate whose P99 meets the SLO with no lower rate failing it (None: none did).
    A P99 of None (the point was cut or never measured) fails."""
    best = None
    for rate, p99 in sorted(p99_by_rate, key=lambda x: x[0]):
        if p99 is None or p99 > slo_s:
            break
        best = rate
    return best


def capacities(rows: list[dict], slo_s: float) -> dict[str, dict[int, float | None]]:
    """Per system and seed of the simulator's rows: `capacity`."""
    out: dict[str, dict[int, float | None]] = {}
    for name, seed in sorted({(r["system"], r["seed"]) for r in rows}):
        points = ((r["rate"], r["p99_s"]) for r in rows if r["system"] == name and r["seed"] == seed)
        out.setdefault(name, {})[seed] = capacity(points, slo_s)
    return out


if __name__ == "__main__":
    main()
