"""Open-loop load: send a seeded Poisson arrival sequence to one system and measure it.

Arrivals are sent at their scheduled times whatever the system is doing (open loop), so
an overloaded system shows up as a growing backlog and latency, not as a slower sender.
A point is cut (remaining requests abandoned, recorded as `unfinished`) once any request
has been outstanding for `cut_factor` times its SLO: its P99 is past saving and more
waiting would only spend GPU time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .systems import System, wait_idle
from .timing import percentile
from .workload import Arrival, BenchRequest, Mix, size_key

SloFn = Callable[[BenchRequest], float]


@dataclass
class Record:
    request: BenchRequest
    warmup: bool
    scheduled_s: float
    slo_s: float
    submitted: float = 0.0
    done: float | None = None
    status: str = "pending"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def latency_s(self) -> float | None:
        return None if self.done is None else self.done - self.submitted


class _Tracker:
    """Records shared between the sender and the systems' callback threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: list[Record] = []

    def callback(self, rec: Record) -> Callable[[str, dict[str, Any]], None]:
        def done(status: str, info: dict[str, Any]) -> None:
            now = time.perf_counter()
            with self.lock:
                if rec.status != "pending":  # already written off by the harness
                    return
                rec.done, rec.status, rec.info = now, status, dict(info)

        return done

    def add(self, rec: Record) -> None:
        with self.lock:
            self.records.append(rec)

    def pending(self) -> list[Record]:
        with self.lock:
            return [r for r in self.records if r.status == "pending"]

    def abandon(self, now: float) -> int:
        with self.lock:
            n = 0
            for r in self.records:
                if r.status == "pending":
                    r.status, r.info = "unfinished", {"age_s": now - r.submitted}
                    n += 1
            return n


def run_rate(
    system: System,
    arrivals: list[Arrival],
    slo_of: SloFn,
    *,
    rate: float,
    duration_s: float,
    warmup_s: float,
    window_end_s: float | None = None,
    cut_factor: float = 4.0,
    lone_step_s: dict[str, float] | None = None,
    progress_s: float = 10.0,
    idle_timeout_s: float = 120.0,
    raw: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Drive `system` with `arrivals`; return the rate point's statistics.

    Throughput counts completions inside the measurement window [warmup_s, window_end_s]
    (default warmup_s + duration_s), so the drain after the last arrival does not dilute it.
    """
    label = f"[{system.name} @ {rate:g}/s]"
    tr = _Tracker()
    t0 = time.perf_counter() + 0.02
    window = (t0 + warmup_s, t0 + (window_end_s if window_end_s is not None else warmup_s + duration_s))
    cut_reason: str | None = None
    backlog_at_end: int | None = None
    next_progress = t0 + progress_s

    def check(now: float) -> str | None:
        nonlocal next_progress
        pend = tr.pending()
        late = [r for r in pend if now - r.submitted > cut_factor * r.slo_s]
        if now >= next_progress:
            next_progress += progress_s
            done = sum(r.status == "ok" for r in tr.records)
            errs = sum(r.status.startswith("error") or r.status == "rejected" for r in tr.records)
            log(f"{label} t={now - t0:5.1f}s sent {len(tr.records)}/{len(arrivals)} done {done} in-flight {len(pend)} failed {errs}")
        if late:
            return f"a request waited over {cut_factor:g}x its SLO ({cut_factor * late[0].slo_s:.1f}s)"
        return None

    for a in arrivals:
        while True:
            now = time.perf_counter()
            if cut_reason is None:
                cut_reason = check(now)
            if cut_reason or now >= t0 + a.t:
                break
            time.sleep(min(0.05, t0 + a.t - now))
        if cut_reason:
            break
        rec = Record(a.request, a.warmup, a.t, slo_of(a.request))
        tr.add(rec)
        rec.submitted = time.perf_counter()
        system.submit(a.request, tr.callback(rec))
    # Drain: everything sent must finish, or be written off once it is hopeless.
    while cut_reason is None and tr.pending():
        now = time.perf_counter()
        if backlog_at_end is None and now >= window[1]:
            backlog_at_end = len(tr.pending())
        cut_reason = check(now)
        time.sleep(0.02)
    if backlog_at_end is None and time.perf_counter() >= window[1]:
        backlog_at_end = len(tr.pending())  # None: cut before the window closed
    end = time.perf_counter()
    abandoned = 0
    if cut_reason:
        abandoned = tr.abandon(end)  # first, so cancellations arriving now are not taken as results
        system.abort_all()
    # Not yet abandoned arrivals never sent: count them so every request is accounted for.
    unsent = len(arrivals) - len(tr.records)
    settled = wait_idle(system, idle_timeout_s)
    point = summarise(tr.records, unsent_measured=sum(not a.warmup for a in arrivals[len(tr.records) :]), window=window, lone_step_s=lone_step_s or {})
    point.update(
        rate=rate,
        # What the seeded draw offered in the window: one draw can be 30% off the nominal rate.
        drawn_rate=point["measured"] / max(window[1] - window[0], 1e-9),
        arrivals=len(arrivals),
        unsent=unsent,
        cut=cut_reason is not None,
        cut_reason=cut_reason,
        abandoned=abandoned,
        backlog_at_window_end=backlog_at_end,
        wall_s=end - t0,
        settled=settled,
    )
    if raw:
        point["requests"] = [_raw(r, t0) for r in tr.records]
    lat = point["latency_s"]
    log(
        f"{label} {point['completed']}/{point['measured']} ok"
        f" | {point['throughput_ips']:.2f} img/s | mean {_f(lat['mean'])} p50 {_f(lat['p50'])} p99 {_f(lat['p99'])}"
        f" | SLO {100 * point['slo_attainment']:.0f}% | step x{_f(point['step_inflation'], 2)}"
        + (f" | cfg skipped {point['cfg_skipped_mean']:.1f}/req" if point.get("cfg_skipped_mean") else "")
        + f" | wall {point['wall_s']:.0f}s"
        + (f" | CUT: {cut_reason}" if cut_reason else "")
    )
    return point


def _f(x: float | None, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _raw(r: Record, t0: float) -> list:
    """Compact per-request row: [t_sent, latency, status, h, w, steps, warmup, queue_wait, inference]."""
    lat = r.latency_s
    return [
        round(r.submitted - t0, 4),
        None if lat is None else round(lat, 4),
        r.status,
        r.request.height,
        r.request.width,
        r.request.steps,
        r.warmup,
        _round(r.info.get("queue_wait_s")),
        _round(r.info.get("inference_s")),
    ]


def _round(x: Any) -> Any:
    return round(x, 4) if isinstance(x, float) else x


def summarise(records: list[Record], *, unsent_measured: int, window: tuple[float, float], lone_step_s: dict[str, float]) -> dict[str, Any]:
    measured = [r for r in records if not r.warmup]
    ok = [r for r in measured if r.status == "ok"]
    lats = [r.latency_s for r in ok if r.latency_s is not None]
    span = max(window[1] - window[0], 1e-9)
    in_window = sum(r.request.n for r in records if r.status == "ok" and r.done is not None and window[0] <= r.done <= window[1])
    good_in_window = sum(
        r.request.n
        for r in records
        if r.status == "ok" and r.done is not None and window[0] <= r.done <= window[1] and r.latency_s is not None and r.latency_s <= r.slo_s
    )
    n_measured = len(measured) + unsent_measured
    first = min((r.submitted for r in measured), default=0.0)
    last = max((r.done for r in ok if r.done is not None), default=first)
    images_ok = sum(r.request.n for r in ok)
    waits = [r.info["queue_wait_s"] for r in ok if "queue_wait_s" in r.info]
    skipped = [r.info["cfg_skipped"] for r in ok if "cfg_skipped" in r.info]
    per_step = [(r.info["inference_s"] / r.request.steps, size_key(r.request.size)) for r in ok if "inference_s" in r.info]
    ratios = [s / lone_step_s[k] for s, k in per_step if lone_step_s.get(k)]
    # Age at abandonment is a lower bound on an unfinished request's latency.
    bounds = lats + [r.info.get("age_s", 0.0) for r in measured if r.status == "unfinished"]
    statuses: dict[str, int] = {}
    for r in measured:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    if unsent_measured:
        statuses["unfinished"] = statuses.get("unfinished", 0) + unsent_measured
    return {
        "measured": n_measured,
        "warmup_requests": len(records) - len(measured),
        "completed": len(ok),
        "statuses": statuses,
        "images": images_ok,
        "window_s": span,
        "throughput_ips": in_window / span,
        "goodput_ips": good_in_window / span,
        "throughput_total_ips": images_ok / (last - first) if last > first else 0.0,
        "latency_s": {
            "mean": sum(lats) / len(lats) if lats else None,
            "p50": percentile(lats, 50),
            "p90": percentile(lats, 90),
            "p99": percentile(lats, 99),
            "max": max(lats) if lats else None,
        },
        "p99_lower_bound_s": percentile(bounds, 99),
        "queue_wait_mean_s": sum(waits) / len(waits) if waits else None,
        # guided steps run without CFG, per completed request (engines in-process; None over HTTP)
        "cfg_skipped_mean": sum(skipped) / len(skipped) if skipped else None,
        "step_time_mean_ms": 1e3 * sum(s for s, _ in per_step) / len(per_step) if per_step else None,
        "step_inflation": sum(ratios) / len(ratios) if ratios else None,
        "slo_attainment": sum(1 for r in ok if r.latency_s is not None and r.latency_s <= r.slo_s) / n_measured if n_measured else 0.0,
        "slo_s_mean": sum(r.slo_s for r in measured) / len(measured) if measured else None,
    }


def run_one(system: System, request: BenchRequest, timeout_s: float = 600.0) -> tuple[str, float, dict[str, Any]]:
    """Send one request alone and wait for it: (status, latency, info)."""
    ev = threading.Event()
    out: dict[str, Any] = {}

    def done(status: str, info: dict[str, Any]) -> None:
        out.update(status=status, info=info, t=time.perf_counter())
        ev.set()

    t0 = time.perf_counter()
    system.submit(request, done)
    if not ev.wait(timeout_s):
        system.abort_all()
        return "error:lone-timeout", timeout_s, {}
    return out["status"], out["t"] - t0, out["info"]


def measure_lone(system: System, mix: Mix, repeats: int = 2) -> dict[str, dict[str, Any]]:
    """Per size: latency of one request alone at the mix's most steps, after a short warm-up
    request of that size (first calls pay one-off kernel selection and allocation)."""
    out: dict[str, dict[str, Any]] = {}
    for req in mix.lone_requests():
        warm = BenchRequest(req.index, req.prompt, req.height, req.width, min(2, req.steps), req.guidance, req.seed, req.sampler)
        run_one(system, warm)
        lats, steps_s = [], []
        status = "ok"
        for _ in range(max(1, repeats)):
            status, lat, info = run_one(system, req)
            if status != "ok":
                break
            lats.append(lat)
            if "inference_s" in info:
                steps_s.append(info["inference_s"] / req.steps)
        if status != "ok":
            raise RuntimeError(f"{system.name}: the lone {size_key(req.size)} request failed ({status})")
        # Best of the repeats: the reference is what the GPU can do, not what noise added to it.
        total = min(lats)
        step = min(steps_s) if steps_s else None
        out[size_key(req.size)] = {"total_s": total, "step_s": step, "steps": req.steps}
    return out
