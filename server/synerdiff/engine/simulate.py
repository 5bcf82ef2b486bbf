"""Simulation mode: the engine's own loop (`core.EngineCore`) with a cost model in place of the GPU.

The runner here does no device work: it advances a virtual clock by what the cost model says
each call takes (encode, UNet step, VAE decode; a one-image chunk beside the step adds the
profile's measured `vae_beside`, since only such small chunks overlap a step on the GPU).
Admission, deadlines, the controller, the policy, skip-CFG and fixed CFG cut-offs are the
engine's code, so the simulator cannot drift from the engine. Deterministic and fast: the
scheduler and controller are tested on a CPU with it, and benchmarks predict GPU runs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..contract.config import SchedulerConfig
from ..contract.requests import rows_per_image
from ..scheduling.cost_model import CostModel
from ..scheduling.planner import Bucket, Policy
from ..scheduling.policies import policy_for
from .core import DecodeReport, DecodeWork, EngineCore, StepReport
from .errors import EngineError
from .jobs import Decoding, Denoising, JobSpec, Phase
from .observer import EngineObserver
from .request import Timings


@dataclass
class SimRequest:
    request_id: str
    arrival: float
    bucket: Bucket = (512, 512)
    images: int = 1
    guided: bool = True
    steps: int = 50
    cfg_skippable: bool = True
    cfg_cutoff_step: int | None = None  # a fixed CFG cutoff, as a request's cfg_cutoff_ratio sets
    # filled in by the simulation
    admitted: float | None = None
    step: int = 0
    skipped: int = 0
    unet_done: float | None = None
    done: float | None = None
    error: str | None = None

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
        span = max(r.done for r in done if r.done is not None) - min(r.arrival for r in self.requests) if done else 0.0
        return sum(r.images for r in done) / span if span > 0 else 0.0


def poisson_arrivals(rate: float, duration: float, seed: int = 0, **kw: Any) -> list[SimRequest]:
    rng = random.Random(seed)
    t, out = 0.0, list[SimRequest]()
    while True:
        t += rng.expovariate(rate)
        if t > duration:
            return out
        out.append(SimRequest(f"r{len(out)}", t, **kw))


class VirtualClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class CostModelRunner:
    """The `core.Runner` of the simulator: every call advances the clock by its modelled cost."""

    def __init__(self, cost: CostModel, clock: VirtualClock):
        self.cost = cost
        self.clock = clock
        self.step_times: list[float] = []
        self._step_rows = 0  # rows of the step the decodes launched beside it overlap
        self._beside: list[tuple[Bucket, int, str]] = []

    def admit(self, jobs: Sequence[JobSpec]) -> None:
        self.clock.t += self.cost.encode_s(len(jobs) + sum(j.guided for j in jobs))

    def step(self, jobs: Sequence[Denoising], guided: Sequence[bool]) -> StepReport:
        rows = sum(d.spec.n * rows_per_image(g) for d, g in zip(jobs, guided, strict=True))
        t = self.cost.unet_step_s(rows, jobs[0].spec.bucket)
        self.clock.t += t
        self.step_times.append(t)
        self._step_rows = rows
        return StepReport(unet_s=t, sampler_s=0.0, rows=rows)

    def launch_beside(self, work: DecodeWork) -> DecodeReport:
        self._step_rows = 0
        self._beside = [(d.spec.bucket, k, d.spec.id) for d, k in work]
        return DecodeReport(decoded={d.spec.id: k for d, k in work})

    def land_beside(self) -> DecodeReport:
        report = DecodeReport()
        for bucket, k, job_id in self._beside:
            self.clock.t += k * self.cost.vae_beside_s(self._step_rows, bucket)
            report.decoded[job_id] = k
            report.chunks += k
        self._beside = []
        return report

    def decode(self, work: DecodeWork) -> DecodeReport:
        report = DecodeReport(chunks=len(work))
        for d, k in work:
            self.clock.t += self.cost.vae_decode_s(k, d.spec.bucket)
            report.decoded[d.spec.id] = k
        return report

    def take_images(self, job_id: str) -> list[Any]:
        return []

    def release(self, job_id: str) -> None:
        pass

    def admissible(self, job_ids: Sequence[str]) -> list[str]:
        return list(job_ids)


class _Recorder:
    """The core's listener: writes what happened into the `SimRequest`s."""

    def __init__(self, requests: dict[str, SimRequest], clock: VirtualClock):
        self.requests = requests
        self.clock = clock

    def admitted(self, job: Denoising) -> None:
        self.requests[job.spec.id].admitted = job.admitted_at

    def progressed(self, job: Denoising) -> None:
        r = self.requests[job.spec.id]
        r.step, r.skipped = job.step, job.skipped

    def retired(self, job: Decoding) -> None:
        self.requests[job.spec.id].unet_done = job.finished_at

    def served(self, job: Decoding, timings: Timings, images: list[Any], tiled: bool) -> None:
        self.requests[job.spec.id].done = self.clock()

    def failed(self, spec: JobSpec, phase: Phase, error: EngineError) -> None:
        self.requests[spec.id].error = error.reason


def simulate(
    requests: list[SimRequest],
    cfg: SchedulerConfig,
    cost: CostModel,
    policy: Policy | None = None,
    max_time: float = 3600.0,
) -> SimOutcome:
    """Run `requests` (arrival times in seconds from 0) through the engine loop on the cost model."""
    clock = VirtualClock()
    runner = CostModelRunner(cost, clock)
    out = SimOutcome(requests, 0.0, step_times=runner.step_times)
    ticks = EngineObserver(on_controller_tick=lambda now, threshold: out.thresholds.append((now, threshold)))
    by_id = {r.request_id: r for r in requests}
    core = EngineCore(cfg, policy or policy_for(cfg, cost), runner, _Recorder(by_id, clock), clock=clock, cost_model=cost, observers=[ticks])
    pending = sorted(requests, key=lambda r: r.arrival)
    i = 0
    while (i < len(pending) or len(core.table)) and clock.t < max_time:
        while i < len(pending) and pending[i].arrival <= clock.t:
            r = pending[i]
            core.add(JobSpec(r.request_id, r.bucket, r.images, r.guided, r.steps, r.arrival, math.inf, r.cfg_skippable, r.cfg_cutoff_step))
            i += 1
        if not core.iterate():
            if i >= len(pending):
                break
            clock.t = pending[i].arrival
    out.end = clock.t
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


def capacity(p99_by_rate: Iterable[tuple[float, float | None]], slo_s: float) -> float | None:
    """The highest rate whose P99 meets the SLO with no lower rate failing it (None: none did).
    A P99 of None (the point was cut or never measured) fails."""
    best = None
    for rate, p99 in sorted(p99_by_rate, key=lambda x: x[0]):
        if p99 is None or p99 > slo_s:
            break
        best = rate
    return best


def capacities(rows: list[dict[str, Any]], slo_s: float) -> dict[str, dict[int, float | None]]:
    """Per system and seed of the simulator's rows: `capacity`."""
    out: dict[str, dict[int, float | None]] = {}
    for name, seed in sorted({(r["system"], r["seed"]) for r in rows}):
        points = ((r["rate"], r["p99_s"]) for r in rows if r["system"] == name and r["seed"] == seed)
        out.setdefault(name, {})[seed] = capacity(points, slo_s)
    return out
