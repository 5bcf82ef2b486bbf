"""GPU smoke run: many concurrent mixed requests through the engine, every iteration recorded.

Checks what a benchmark cannot: that ≥ 32 requests with different steps, guidance and
samplers share UNet forwards (rows per step from an engine observer), all finish with finite
images, and that the first few still match diffusers' own pipeline run alone (PSNR).
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import time
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import torch

from synerdiff.contract.config import EngineConfig
from synerdiff.engine import Engine, EngineObserver, GenerationRequest, IterationStats
from synerdiff.models.loader import ModelBundle
from synerdiff.samplers import DIFFUSERS_CLASSES

from .baselines import make_pipeline
from .quality import psnr
from .workload import PROMPTS

Size = tuple[int, int]


def smoke_requests(
    count: int, size: Size, steps: tuple[int, ...], guidance: tuple[float, ...], samplers: tuple[str, ...], seed: int
) -> list[GenerationRequest]:
    rng = random.Random(f"smoke:{seed}")
    return [
        GenerationRequest(
            prompt=PROMPTS[i % len(PROMPTS)],
            height=size[0],
            width=size[1],
            steps=rng.choice(steps),
            guidance_scale=rng.choice(guidance),
            sampler=samplers[i % len(samplers)],
            seed=seed * 1000 + i,
        )
        for i in range(count)
    ]


def _pipeline_image(pipe, model: ModelBundle, r: GenerationRequest) -> torch.Tensor:
    assert r.seed is not None and r.sampler is not None, "smoke_requests seeds and names the sampler of every request: a reference needs both"
    pipe.scheduler = DIFFUSERS_CLASSES[r.sampler].from_config(model.scheduler_config)
    out = pipe(
        r.prompt,
        height=r.height,
        width=r.width,
        num_inference_steps=r.steps,
        guidance_scale=r.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(r.seed),
        output_type="pt",
    )
    return out.images[0].float().cpu()


def saturation(iters: list[dict[str, Any]], max_rows: int, peak_rows_per_s: float | None) -> dict[str, Any] | None:
    """UNet throughput over the iterations whose batch was (nearly) full, against the profile's peak.

    An iteration's wall time is the gap since the previous hook call, so decodes, admissions and
    Python overhead count against it: this is the engine's delivered rate, not the bare UNet's.
    """
    full = [(it, it["t"] - prev["t"]) for prev, it in pairwise(iters) if it["rows"] >= 0.9 * max_rows]
    if len(full) < 5:
        return None
    seconds = sum(dt for _, dt in full)
    rows_per_s = sum(it["rows"] for it, _ in full) / seconds
    out = {"iterations": len(full), "seconds": seconds, "rows_per_s": rows_per_s, "image_steps_per_s": sum(it["images"] for it, _ in full) / seconds}
    if peak_rows_per_s:
        out.update(profile_peak_rows_per_s=peak_rows_per_s, fraction_of_peak=rows_per_s / peak_rows_per_s)
    return out


def _rows_per_image(requests: list[GenerationRequest]) -> float | None:
    guided = {r.guided for r in requests}
    return None if len(guided) != 1 else (2.0 if guided.pop() else 1.0)


def steady_throughput(outcomes: list[dict[str, Any]], ceiling_rows_per_s: float | None, rows_per_image: float | None = 2.0) -> dict[str, Any] | None:
    """Images/s while the engine was never short of work, against the UNet-bound ceiling.

    With every request submitted at t = 0, a request's finish time is its latency and its
    admission time its queue wait. From the first finish until the last admission the queue
    was never empty, so completions in that span over its length is the saturated rate. The
    ceiling is the profile's best rows/s / rows per image / steps (the saturated-throughput target's definition);
    decodes, admissions and Python overhead all count against the engine.
    """
    ok = [o for o in outcomes if o.get("status") == "ok" and o.get("latency_s") is not None]
    if len(ok) < 4:
        return None
    start = min(o["latency_s"] for o in ok)
    end = max(o["queue_wait_s"] for o in ok)
    inside = [o for o in ok if start < o["latency_s"] <= end]
    if end - start <= 0 or len(inside) < 2:
        return None
    ips = len(inside) / (end - start)
    out: dict[str, Any] = {"span_s": [start, end], "images": len(inside), "images_per_s": ips}
    steps = {o["steps"] for o in ok}
    if ceiling_rows_per_s and rows_per_image and len(steps) == 1:
        ceiling = ceiling_rows_per_s / rows_per_image / steps.pop()
        out.update(ceiling_images_per_s=ceiling, fraction_of_ceiling=ips / ceiling)
    return out


def smoke_engine(
    name: str,
    config: EngineConfig,
    model: ModelBundle,
    requests: list[GenerationRequest],
    stagger_s: float = 0.5,
    check_exact: int = 1,
    timeout_s: float = 600.0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Submit half the requests at once, the rest `stagger_s` later (so some join mid-flight)."""
    iters: list[dict[str, Any]] = []
    t_start = time.perf_counter()

    def record(st: IterationStats) -> None:
        d = dataclasses.asdict(st)
        d["t"] = time.perf_counter() - t_start
        d["queue_waits_s"] = [round(x, 4) for x in d["queue_waits_s"]]
        iters.append(d)

    engine = Engine(config, model=model).start()
    try:
        engine.observers.append(EngineObserver(on_iteration=record))
        t_start = time.perf_counter()
        half = len(requests) // 2
        handles = [engine.submit(r) for r in requests[:half]]
        time.sleep(stagger_s)
        handles += [engine.submit(r) for r in requests[half:]]
        outcomes: list[dict[str, Any]] = []
        kept: dict[int, torch.Tensor] = {}
        for i, (r, h) in enumerate(zip(requests, handles, strict=False)):
            row = {"steps": r.steps, "guidance": r.guidance_scale, "sampler": r.sampler, "seed": r.seed}
            try:
                res = h.wait(max(1.0, timeout_s - (time.perf_counter() - t_start)))
                img = res.images[0]
                row.update(
                    status="ok",
                    finite=bool(torch.isfinite(img).all()),
                    latency_s=res.timings.total_s,
                    queue_wait_s=res.timings.queue_wait_s,
                    cfg_skipped=res.guided_steps_skipped,
                    pixel_std=float(img.std()),
                )
                if len(kept) < check_exact:
                    kept[i] = img
            except Exception as exc:  # recorded, not raised: the JSON is the smoke test's verdict
                row.update(status=f"error:{getattr(exc, 'reason', type(exc).__name__)}", message=str(exc)[:200])
            outcomes.append(row)
        wall = time.perf_counter() - t_start
        peak = engine.cost_model.peak_rows_per_s((requests[0].height, requests[0].width)) if engine.cost_model else None
    finally:
        engine.shutdown()
    exact = []
    if kept:
        pipe = make_pipeline(model)
        for i, img in kept.items():
            ref = _pipeline_image(pipe, model, requests[i])
            exact.append({"request": i, "sampler": requests[i].sampler, "psnr_db": psnr(img, ref), "cfg_skipped": outcomes[i].get("cfg_skipped")})
    steps = [it for it in iters if it["rows"]]
    by_rows: dict[int, list[float]] = {}
    for it in steps:
        by_rows.setdefault(it["rows"], []).append(it["unet_s"])
    ok = [o for o in outcomes if o["status"] == "ok"]
    summary = {
        "requests": len(requests),
        "ok": len(ok),
        "all_ok": len(ok) == len(requests),
        "all_finite": all(o.get("finite") for o in ok),
        "wall_s": wall,
        "images_per_s": len(ok) / wall if wall else 0.0,
        "iterations": len(iters),
        "unet_steps": len(steps),
        "max_rows": max((it["rows"] for it in steps), default=0),
        "max_rows_allowed": config.scheduler.max_rows,
        "mean_rows": statistics.fmean(it["rows"] for it in steps) if steps else 0.0,
        "unet_ms_median_by_rows": {str(r): 1e3 * statistics.median(v) for r, v in sorted(by_rows.items())},
        "vae_s_total": sum(it["vae_s"] for it in iters),
        "cfg_skipped_total": sum(it["cfg_skipped"] for it in iters),
        "latency_s_max": max((o["latency_s"] for o in ok), default=None),
        "saturated": saturation(iters, config.scheduler.max_rows, peak),
        # Only meaningful when every request arrives at once (--stagger-s 0) and all are guided.
        "steady": steady_throughput(outcomes, peak, _rows_per_image(requests)) if stagger_s == 0 else None,
        "exact": exact,
    }
    log(
        f"[smoke {name}] {summary['ok']}/{len(requests)} ok, finite={summary['all_finite']}, "
        f"{summary['unet_steps']} UNet steps, rows mean {summary['mean_rows']:.1f} max {summary['max_rows']}, "
        f"{summary['images_per_s']:.2f} img/s" + "".join(f", PSNR vs diffusers {e['psnr_db']:.1f} dB" for e in exact)
    )
    return {"config": config.model_dump(mode="json"), "summary": summary, "requests": outcomes, "iterations": iters}
