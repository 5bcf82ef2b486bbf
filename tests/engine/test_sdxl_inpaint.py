"""SDXL masked edits equal diffusers' StableDiffusionXLInpaintPipeline (default arguments: no
aesthetic score, size ids from the request's size), on tiny random-weight SDXL-shaped models
built here: a 4-channel UNet, alone and sharing forwards with SDXL text-to-image rows, and an
inpainting UNet (9 input channels)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from synerdiff.contract.config import EngineConfig, SchedulerConfig
from synerdiff.contract.families import UNET_SAMPLERS
from synerdiff.engine import Engine, GenerationRequest
from synerdiff.models.loader import ModelLoadError, load_model
from synerdiff.samplers import DIFFUSERS_CLASSES
from synerdiff_training.make_tiny import build_xl

from .conftest import pipeline_kwargs, submit_joining
from .test_exactness import check
from .test_img2img import MASK, PICTURE, picture

Reference = Callable[[GenerationRequest], torch.Tensor]


def start(path: Path) -> Engine:
    sched = SchedulerConfig(policy="continuous", max_rows=64)
    return Engine(EngineConfig(model=str(path), device="cpu", dtype="float32", warmup=False, scheduler=sched)).start()


def references(path: Path) -> Reference:
    """reference(request) -> (n, 3, H, W): StableDiffusionXLInpaintPipeline for a request with a
    picture (an all-white mask when it has none), StableDiffusionXLPipeline for text-to-image on
    a 4-channel UNet, the inpaint pipeline with an all-white mask at strength 1 on an inpainting one."""
    from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inpaint = StableDiffusionXLInpaintPipeline.from_pretrained(path, local_files_only=True, add_watermarker=False)
        text = StableDiffusionXLPipeline(**inpaint.components, add_watermarker=False) if inpaint.unet.config.in_channels == 4 else None
    base_config = dict(inpaint.scheduler.config)
    cache: dict = {}

    def run(r: GenerationRequest) -> torch.Tensor:
        key = (r.prompt, r.negative_prompt, r.n, r.height, r.width, r.steps, r.guidance_scale, r.seed, r.sampler, r.strength, id(r.image), id(r.mask))
        if key not in cache:
            kw: dict = dict(
                height=r.height,
                width=r.width,
                **pipeline_kwargs(r),
            )
            if r.image is None and text is not None:
                pipe, extra = text, {}
            else:
                pipe = inpaint
                white = Image.new("L", (r.width, r.height), 255)
                extra = dict(
                    image=r.image if r.image is not None else picture(r.height, r.width, shift=90),
                    mask_image=r.mask if r.mask is not None else white,
                    strength=r.strength if r.image is not None else 1.0,
                )
            pipe.set_progress_bar_config(disable=True)
            pipe.scheduler = DIFFUSERS_CLASSES[r.sampler].from_config(base_config)
            cache[key] = pipe(r.prompt, **extra, **kw).images.float()
        return cache[key]

    return run


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory):
    return build_xl(tmp_path_factory.mktemp("tiny-sdxl"), seed=0)


@pytest.fixture(scope="module")
def xl_engine(xl_dir):
    eng = start(xl_dir)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def xl_reference(xl_dir) -> Reference:
    return references(xl_dir)


def req(**kw) -> GenerationRequest:
    base = dict(prompt="a red circle on a blue background", negative_prompt="blurry", steps=8, guidance_scale=7.5, seed=1)
    base.update(kw)
    return GenerationRequest(**base)


def inpaint(**kw) -> GenerationRequest:
    return req(**{"image": PICTURE, "mask": MASK, "strength": 0.8, **kw})


def other_seed(r: GenerationRequest) -> GenerationRequest:
    return dataclasses.replace(r, seed=r.seed + 100, request_id=r.request_id + "-other")


@pytest.mark.parametrize("sampler", UNET_SAMPLERS)
def test_masked_edit_alone_matches_diffusers(xl_engine, xl_reference, sampler):
    r = inpaint(sampler=sampler, seed=91)
    check(xl_engine.generate_sync(r), xl_reference(r), xl_reference(other_seed(r)), label=f"sdxl inpaint {sampler}")


def test_full_strength_n2(xl_engine, xl_reference):
    r = inpaint(sampler="euler_a", seed=92, strength=1.0, n=2)
    check(xl_engine.generate_sync(r), xl_reference(r), xl_reference(other_seed(r)), label="sdxl inpaint strength 1 n=2")


def test_mixed_with_text_to_image(xl_engine, xl_reference):
    """Masked edits join text-to-image rows mid-way (two sizes, different samplers, steps,
    guidance); the known region's blend touches only the edits' own rows."""
    wide = picture(48, 80, shift=30)
    from PIL import Image

    wide_mask = Image.new("L", (80, 48), 0)
    wide_mask.paste(255, (40, 8, 80, 48))
    first = [req(sampler="euler", steps=14, seed=101), req(sampler="ddim", steps=8, seed=102, height=48, width=80, n=2, guidance_scale=3.0)]
    later = [
        inpaint(sampler="dpmpp_2m", steps=10, seed=103),
        inpaint(sampler="euler_a", steps=8, seed=104, strength=0.6, guidance_scale=1.0),
        inpaint(sampler="euler", steps=9, seed=105, height=48, width=80, image=wide, mask=wide_mask),
        req(sampler="euler_a", steps=6, seed=106, negative_prompt=""),
    ]
    results, most = submit_joining(xl_engine, first, later, join_at_step=3, join_timeout=60)
    assert most >= 4, "requests never shared a forward"
    for r, res in zip(first + later, results, strict=True):
        kind = "txt2img" if r.image is None else "inpaint"
        check(res, xl_reference(r), xl_reference(other_seed(r)), label=f"sdxl mixed {kind} {r.sampler}/{r.steps}/{r.height}x{r.width}")


def test_the_inpaint_encode_is_not_normalised_by_the_latent_statistics(xl_dir, tmp_path):
    """With latents_mean/latents_std in the VAE config the inpaint pipeline scales its encodes
    only (img2img normalises them), while the decode de-normalises: the engine does the same."""
    shutil.copytree(xl_dir, tmp_path / "m")
    cfg_path = tmp_path / "m" / "vae" / "config.json"
    stats = {"latents_mean": [0.3, -0.2, 0.1, 0.0], "latents_std": [0.8, 1.3, 0.6, 1.1]}
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | stats))
    reference = references(tmp_path / "m")
    eng = start(tmp_path / "m")
    try:
        r = inpaint(sampler="euler", seed=111, steps=6)
        check(eng.generate_sync(r), reference(r), reference(other_seed(r)), label="sdxl inpaint latents_mean/std")
    finally:
        eng.shutdown()


def test_a_refiner_is_refused_at_load(xl_dir, tmp_path):
    shutil.copytree(xl_dir, tmp_path / "m")
    index = tmp_path / "m" / "model_index.json"
    index.write_text(json.dumps(json.loads(index.read_text()) | {"requires_aesthetics_score": True}))
    with pytest.raises(ModelLoadError, match="requires_aesthetics_score"):
        load_model(tmp_path / "m", "cpu", "float32")


def test_inpainting_unet(tmp_path):
    """An SDXL inpainting UNet (9 input channels): masked edits, an unmasked edit and text-to-image
    (both with everything repainted) equal StableDiffusionXLInpaintPipeline, sharing forwards."""
    path = build_xl(tmp_path / "xl9", seed=2, inpainting=True)
    reference = references(path)
    eng = start(path)
    try:
        assert eng.model.family == "sdxl" and eng.model.inpainting_unet
        requests = [
            inpaint(sampler="euler", seed=121),
            inpaint(sampler="dpmpp_2m", seed=122, strength=1.0, n=2),
            inpaint(sampler="ddim", seed=123, mask=None, strength=0.6),
            req(sampler="euler_a", seed=124),
        ]
        handles = [eng.submit(r) for r in requests]
        for r, h in zip(requests, handles, strict=True):
            check(h.wait(120), reference(r), reference(other_seed(r)), label=f"sdxl inpainting unet {r.sampler} s={r.strength} mask={r.mask is not None}")
    finally:
        eng.shutdown()
