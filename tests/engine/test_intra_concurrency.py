"""VAE chunking and skip-CFG, on the CPU: chunked decode is exact, skipping off is exact,
a fixed cutoff equals diffusers' own CFG-cutoff callback."""

from __future__ import annotations

from dataclasses import replace

import torch

from synerdiff.contract.config import EngineConfig
from synerdiff.engine import Engine, EngineObserver, GenerationRequest
from synerdiff.scheduling.planner import ContinuousPolicy, EngineView, IterationPlan
from synerdiff_bench.quality import psnr


class OneImagePerIteration(ContinuousPolicy):
    """Decode at most one image per iteration: forces the chunked path."""

    def plan(self, view: EngineView) -> IterationPlan:
        plan = super().plan(view)
        return replace(plan, decode=plan.decode[:1] and ((plan.decode[0][0], 1),))


class SkipAllowedSteps(ContinuousPolicy):
    """Skip guidance wherever a request allows it (the adaptive path, deterministically)."""

    def __init__(self, fraction: float):
        self.fraction = fraction

    def plan(self, view: EngineView) -> IterationPlan:
        plan = super().plan(view)
        skip = frozenset(a.request_id for a in view.active if a.may_skip_cfg(self.fraction))
        return replace(plan, skip_cfg=skip)


def req(**kw):
    base = dict(prompt="a yellow triangle", negative_prompt="", steps=10, guidance_scale=6.0, seed=9, sampler="euler")
    base.update(kw)
    return GenerationRequest(**base)


def test_chunked_decode_equals_whole_decode(engine):
    lat = torch.randn(5, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    whole = engine.executor.decode(lat)
    chunks = torch.cat([engine.executor.decode(lat[i : i + 2]) for i in range(0, 5, 2)])
    assert psnr(whole, chunks) >= 60, psnr(whole, chunks)


def test_engine_with_one_image_chunks_matches_diffusers(reference):
    eng = Engine(EngineConfig(device="cpu", dtype="float32", warmup=False), policy=OneImagePerIteration()).start()
    chunks = []
    eng.observers.append(EngineObserver(on_iteration=lambda st: chunks.append(st.decoded_images) if st.decoded_images else None))
    try:
        r = req(n=3)
        res = eng.generate_sync(r, timeout=60)
    finally:
        eng.shutdown()
    assert chunks == [1, 1, 1]
    for i in range(3):
        assert psnr(res.images[i], reference(r)[i]) >= 40


def test_skip_cfg_never_and_zero_bound_stay_exact(reference):
    eng = Engine(EngineConfig(device="cpu", dtype="float32", warmup=False), policy=SkipAllowedSteps(0.5)).start()
    try:
        r = req(cfg_skip="never")
        res = eng.generate_sync(r, timeout=60)
        skipped = eng.generate_sync(req(seed=10), timeout=60)
    finally:
        eng.shutdown()
    assert res.guided_steps_skipped == 0
    assert psnr(res.images[0], reference(r)[0]) >= 40
    assert skipped.guided_steps_skipped == 5  # last half of 10 steps
    assert psnr(skipped.images[0], reference(req(seed=10))[0]) < 60  # it really changed something


def test_fixed_cutoff_equals_diffusers_cfg_cutoff_callback(engine, reference):
    rows = []
    engine.observers.append(EngineObserver(on_iteration=lambda st: rows.append(st.rows) if st.rows else None))
    try:
        r = req(cfg_cutoff_ratio=0.4, sampler="dpmpp_2m", steps=10)
        res = engine.generate_sync(r, timeout=60)
    finally:
        engine.observers.pop()
    ref = reference(r, cutoff_ratio=0.4)
    full = reference(replace(r, cfg_cutoff_ratio=None))
    own = psnr(res.images[0], ref[0])
    print(f"cutoff 0.4: PSNR {own:.1f} dB against diffusers' SDCFGCutoffCallback, {psnr(res.images[0], full[0]):.1f} dB against full CFG")
    assert own >= 40
    assert own - psnr(res.images[0], full[0]) >= 15
    assert rows == [2] * 5 + [1] * 5  # steps 0..4 guided (cutoff step 4 included), then one row


def test_decodes_beside_the_step_give_the_same_images_and_are_counted(reference):
    """The synerdiff policy with a profile that says a one-image decode overlaps a step: images
    of a 2-image request are decoded beside the steps of another still running (on a CPU the
    "beside" decode runs just before the step), and they equal diffusers' output."""
    from synerdiff.contract.config import SchedulerConfig
    from synerdiff.metrics import ServerMetrics
    from synerdiff.scheduling.cost_model import CostModel, Profile
    from synerdiff.scheduling.policies import SynerDiffPolicy

    prof = Profile(
        gpu="cpu",
        model="tiny",
        dtype="float32",
        unet={"64x64": [(1, 0.01), (64, 0.2)]},
        vae={"64x64": [(1, 0.004), (4, 0.012)]},
        vae_beside={"64x64": [(1, 0.001), (64, 0.001)]},
    )
    policy = SynerDiffPolicy(SchedulerConfig(skip_cfg_bound=0.0), CostModel(prof))
    cfg = EngineConfig(device="cpu", dtype="float32", warmup=False, scheduler=SchedulerConfig(policy="continuous"))
    eng = Engine(cfg, policy=policy).start()
    metrics = ServerMetrics(eng)
    metrics.attach()
    beside = []
    eng.observers.append(EngineObserver(on_iteration=lambda st: beside.append(st.vae_beside) if st.vae_beside else None))
    try:
        short, long = req(n=2, steps=4, seed=1), req(steps=12, seed=2, prompt="a blue square")
        h_long = eng.submit(long)
        h_short = eng.submit(short)
        res_short, res_long = h_short.wait(60), h_long.wait(60)
    finally:
        eng.shutdown()
    assert sum(beside) >= 1, "no decode ran beside a step"
    assert metrics.vae_beside._value.get() == sum(beside)
    t = res_short.timings
    assert t.decode_wait_s >= 0 and t.decode_s > 0 and t.total_s >= t.queue_wait_s + t.inference_s + t.decode_s - 1e-6
    for res, r in ((res_short, short), (res_long, long)):
        ref = reference(r)
        for i in range(r.n):
            assert psnr(res.images[i], ref[i]) >= 40
