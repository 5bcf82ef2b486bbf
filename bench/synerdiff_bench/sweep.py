"""The load sweep: every system at every offered rate, on one set of weights.

Rate-major order (all systems at 0.5/s, then all at 1/s, ...) so that when the time
budget runs out the systems have been compared at the same rates. A system that is
clearly overloaded at a rate (cut, or P99 past `cut_factor` x SLO) skips the higher ones.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .load import measure_lone, run_rate
from .systems import System
from .workload import Arrival, BenchRequest, Mix, poisson_arrivals, size_key, window_end


@dataclass
class SweepConfig:
    rates: list[float]
    duration_s: float = 20.0
    warmup_s: float = 2.0
    max_requests: int | None = None
    slo_s: float | None = None  # fixed SLO; None = slo_factor x lone-request latency
    slo_factor: float = 3.0
    cut_factor: float = 4.0
    budget_s: float | None = None
    seed: int = 0
    arrival_draw: str = "shared"  # see workload.poisson_arrivals
    lone_repeats: int = 2
    progress_s: float = 10.0
    raw: bool = True
    # Pool runs: the arrivals of `rate / speedup` over `duration * speedup`, replayed `speedup`
    # times faster. Pools of n servers at n x r then see the same draw, so "equal per-GPU
    # load" holds exactly rather than up to one Poisson draw's luck.
    speedup: float = 1.0

    @classmethod
    def from_args(cls, args: Any, **fields: Any) -> SweepConfig:
        """The options `run` and `scale` share, from their parsed arguments; `fields` sets the rest."""
        return cls(
            duration_s=args.duration,
            warmup_s=args.warmup_s,
            slo_factor=args.slo_factor,
            cut_factor=args.cut_factor,
            seed=args.seed,
            lone_repeats=args.lone_repeats,
            progress_s=args.progress_s,
            raw=not args.no_raw,
            **fields,
        )


def sped_up(arrivals: list[Arrival], speedup: float) -> list[Arrival]:
    return arrivals if speedup == 1.0 else [dataclasses.replace(a, t=a.t / speedup) for a in arrivals]


def reference_lone(lone: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per size, the fastest system's lone request: the best this GPU does for one image."""
    ref: dict[str, dict[str, Any]] = {}
    for sys_name, per_size in lone.items():
        for key, v in per_size.items():
            if key not in ref or v["total_s"] < ref[key]["total_s"]:
                ref[key] = {**v, "system": sys_name}
    return ref


def slo_function(cfg: SweepConfig, ref: dict[str, dict[str, Any]]) -> Callable[[BenchRequest], float]:
    """Fixed SLO, or slo_factor x the lone latency of a request like this one.

    A request with fewer steps than the measured one is credited the steps it skips
    (at the lone per-step time), so short requests get proportionally tighter SLOs.
    """
    if cfg.slo_s is not None:
        fixed = cfg.slo_s
        return lambda r: fixed

    def slo(r: BenchRequest) -> float:
        v = ref[size_key(r.size)]
        step = v["step_s"] if v.get("step_s") else v["total_s"] / v["steps"]
        return cfg.slo_factor * max(v["total_s"] - (v["steps"] - r.steps) * step, step * r.steps)

    return slo


def run_sweep(
    systems: list[System],
    mix: Mix,
    cfg: SweepConfig,
    report: dict[str, Any],
    save: Callable[[], object],
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    began = time.monotonic()
    results: dict[str, Any] = {}
    report["systems"] = results
    lone: dict[str, dict[str, dict[str, Any]]] = {}
    for s in systems:
        t = time.monotonic()
        try:
            s.start()
            lone[s.name] = measure_lone(s, mix, cfg.lone_repeats)
        except Exception as exc:  # one broken system must not cost the others their (scarce) GPU time
            traceback.print_exc()
            results[s.name] = {"kind": s.kind, "lone": {}, "stopped": f"failed to start: {type(exc).__name__}: {exc}", "points": []}
            log(f"[{s.name}] FAILED to start: {exc}")
            continue
        results[s.name] = {**s.describe(), "lone": lone[s.name], "stopped": None, "points": []}
        per = ", ".join(f"{k} {v['total_s']:.3f}s" for k, v in lone[s.name].items())
        log(f"[{s.name}] ready in {time.monotonic() - t:.1f}s; lone request {per}")
        save()
    if not lone:
        raise RuntimeError("no system started")
    ref = reference_lone(lone)
    slo_of = slo_function(cfg, ref)
    report["slo"] = {
        "mode": "fixed" if cfg.slo_s is not None else "factor",
        "fixed_s": cfg.slo_s,
        "factor": cfg.slo_factor,
        "reference_lone": ref,
        "default_request_slo_s": slo_of(mix.lone_requests()[0]),
    }
    log(f"SLO for a {size_key(mix.sizes[0])} {mix.steps[1]}-step request: {report['slo']['default_request_slo_s']:.2f}s")
    save()
    for rate in cfg.rates:
        arrivals = sped_up(
            poisson_arrivals(rate / cfg.speedup, cfg.duration_s * cfg.speedup, cfg.warmup_s * cfg.speedup, mix, cfg.seed, cfg.max_requests, cfg.arrival_draw),
            cfg.speedup,
        )
        end_s = window_end(arrivals, cfg.warmup_s, cfg.duration_s, cfg.max_requests)
        for s in systems:
            entry = results[s.name]
            if entry["stopped"]:
                entry["points"].append({"rate": rate, "skipped": entry["stopped"]})
                continue
            if cfg.budget_s is not None and time.monotonic() - began + end_s > cfg.budget_s:
                entry["points"].append({"rate": rate, "skipped": "time budget"})
                log(f"[{s.name} @ {rate:g}/s] skipped: the {cfg.budget_s:.0f}s budget would be exceeded")
                continue
            lone_step = {k: v["step_s"] for k, v in lone[s.name].items() if v.get("step_s")}
            try:
                point = run_rate(
                    s,
                    arrivals,
                    slo_of,
                    rate=rate,
                    duration_s=cfg.duration_s,
                    warmup_s=cfg.warmup_s,
                    window_end_s=end_s,
                    cut_factor=cfg.cut_factor,
                    lone_step_s=lone_step,
                    progress_s=cfg.progress_s,
                    raw=cfg.raw,
                    log=log,
                )
            except Exception as exc:
                traceback.print_exc()
                entry["stopped"] = f"failed at {rate:g}/s: {type(exc).__name__}: {exc}"
                entry["points"].append({"rate": rate, "skipped": entry["stopped"]})
                save()
                continue
            entry["points"].append(point)
            p99 = point["latency_s"]["p99"]
            slo_ref = report["slo"]["default_request_slo_s"]
            if point["cut"]:
                entry["stopped"] = f"overloaded at {rate:g}/s: {point['cut_reason']}"
            elif p99 is not None and p99 > cfg.cut_factor * slo_ref:
                entry["stopped"] = f"overloaded at {rate:g}/s: P99 {p99:.1f}s > {cfg.cut_factor:g}x SLO"
            save()
    for s in systems:
        if s.name in lone:
            results[s.name].update(s.describe())  # final counters (e.g. batch sizes the static baseline saw)
    report["wall_s"] = time.monotonic() - began
    save()
    return report
