"""A request's image equals diffusers' StableDiffusionPipeline, alone and in mixed batches."""

from __future__ import annotations

import pytest

from synerdiff.contract.families import UNET_SAMPLERS
from synerdiff.engine import EngineObserver, GenerationRequest
from synerdiff_bench.quality import psnr

from .conftest import submit_joining

MIN_PSNR = 40.0
MARGIN_DB = 15.0


def req(**kw) -> GenerationRequest:
    base = dict(prompt="a red circle on a blue background", negative_prompt="blurry", steps=12, guidance_scale=7.5, seed=1)
    base.update(kw)
    return GenerationRequest(**base)


def check(result, ref, other_ref=None, label=""):
    assert len(result.images) == ref.shape[0]
    for i, img in enumerate(result.images):
        own = psnr(img, ref[i])
        other = psnr(img, other_ref[i]) if other_ref is not None else None
        print(f"{label} image {i}: PSNR {own:.1f} dB against diffusers" + (f" ({other:.1f} dB against another seed's)" if other is not None else ""))
        assert own >= MIN_PSNR, f"{label}: PSNR {own:.1f} dB < {MIN_PSNR}"
        if other is not None:
            assert own - other >= MARGIN_DB, f"{label}: own {own:.1f} dB vs other seed {other:.1f} dB"


@pytest.mark.parametrize("sampler", UNET_SAMPLERS)
def test_alone_matches_diffusers(engine, reference, sampler):
    r = req(sampler=sampler, seed=11)
    result = engine.generate_sync(r)
    check(result, reference(r), reference(req(sampler=sampler, seed=12)), label=f"{sampler} alone")
    assert result.seed == 11


def test_n_images_match_num_images_per_prompt(engine, reference):
    r = req(n=3, sampler="euler_a", seed=5)
    check(engine.generate_sync(r), reference(r), reference(req(n=3, sampler="euler_a", seed=6)), "n=3")


@pytest.mark.parametrize("guidance", [1.0, 0.0])
def test_unguided_uses_one_row_per_image(engine, reference, guidance):
    rows = []
    engine.observers.append(EngineObserver(on_iteration=lambda st: rows.append(st.rows) if st.rows else None))
    try:
        r = req(guidance_scale=guidance, n=2, sampler="dpmpp_2m")
        check(engine.generate_sync(r), reference(r), label=f"guidance {guidance}")
    finally:
        engine.observers.pop()
    assert rows and max(rows) == 2, rows


def test_mixed_batch_joining_and_leaving(engine, reference):
    """Requests with different samplers, steps, guidance, sizes and n share forwards,
    joining at different steps; each still equals its own reference."""
    first = [
        req(sampler="euler", steps=20, seed=21),
        req(sampler="ddim", steps=8, guidance_scale=3.0, seed=22, n=2),
        req(sampler="dpmpp_2m", steps=15, guidance_scale=1.0, seed=23, height=48, width=80),
    ]
    later = [
        req(sampler="euler_a", steps=10, seed=24, prompt="a green square", negative_prompt=""),
        req(sampler="dpmpp_2m", steps=6, seed=25, height=48, width=80, guidance_scale=5.0),
        req(sampler="ddim", steps=16, seed=26, guidance_scale=9.0),
    ]
    results, most = submit_joining(engine, first, later, join_at_step=4)
    assert most >= 4, "requests never shared a forward"
    for r, res in zip(first + later, results, strict=True):
        check(res, reference(r), label=f"{r.sampler}/{r.steps} steps/{r.height}x{r.width}")
