"""An inpainting UNet (9 input channels: latents, mask, masked-picture latents), built here from
config with random weights: a masked edit equals diffusers' StableDiffusionInpaintPipeline for
every sampler, alone and sharing forwards with other edits of other sizes, steps and guidance;
a request without a mask (or picture) equals the pipeline with an all-white mask."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from PIL import Image

from synerdiff.contract.config import EngineConfig, SchedulerConfig
from synerdiff.contract.families import UNET_SAMPLERS
from synerdiff.engine import Engine, GenerationRequest
from synerdiff.samplers import DIFFUSERS_CLASSES
from synerdiff_training.make_tiny import build

from .conftest import pipeline_kwargs, submit_joining
from .test_exactness import check
from .test_img2img import MASK, PICTURE, picture

WHITE = Image.new("L", (64, 64), 255)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tiny-sd-inpaint"), seed=3, inpainting=True)


@pytest.fixture(scope="module")
def engine9(model_dir):
    sched = SchedulerConfig(policy="continuous", max_rows=64)
    eng = Engine(EngineConfig(model=str(model_dir), device="cpu", dtype="float32", warmup=True, scheduler=sched)).start()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def reference9(model_dir):
    """reference(request) -> (n, 3, H, W) from StableDiffusionInpaintPipeline; a request without a
    mask is the pipeline's all-white mask, one without a picture any picture at strength 1."""
    from diffusers import StableDiffusionInpaintPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionInpaintPipeline.from_pretrained(model_dir, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.in_channels == 9
    base_config = dict(pipe.scheduler.config)
    cache: dict = {}

    def run(r: GenerationRequest) -> torch.Tensor:
        key = (r.prompt, r.negative_prompt, r.n, r.height, r.width, r.steps, r.guidance_scale, r.seed, r.sampler, r.strength, id(r.image), id(r.mask))
        if key not in cache:
            pipe.scheduler = DIFFUSERS_CLASSES[r.sampler].from_config(base_config)
            cache[key] = pipe(
                r.prompt,
                image=r.image if r.image is not None else picture(shift=90),
                mask_image=r.mask if r.mask is not None else WHITE,
                strength=r.strength if r.image is not None else 1.0,
                height=r.height,
                width=r.width,
                **pipeline_kwargs(r),
            ).images.float()
        return cache[key]

    return run


def inpaint(**kw) -> GenerationRequest:
    base = dict(
        prompt="a red circle on a blue background", negative_prompt="blurry", steps=8, guidance_scale=7.5, seed=1, image=PICTURE, mask=MASK, strength=0.8
    )
    base.update(kw)
    return GenerationRequest(**base)


def other_seed(r: GenerationRequest) -> GenerationRequest:
    return dataclasses.replace(r, seed=r.seed + 100, request_id=r.request_id + "-other")


def test_the_inpainting_unet_is_read_from_its_config(engine9):
    m = engine9.model
    assert m.family == "sd" and m.inpainting_unet
    assert (m.unet_in_channels, m.latent_channels) == (9, 4)


@pytest.mark.parametrize("sampler", UNET_SAMPLERS)
def test_masked_edit_alone_matches_diffusers(engine9, reference9, sampler):
    r = inpaint(sampler=sampler, seed=71)
    res = engine9.generate_sync(r)
    assert res.steps == 6  # int(8 * 0.8)
    check(res, reference9(r), reference9(other_seed(r)), label=f"inpaint9 {sampler}")


def test_full_strength_n2_unguided(engine9, reference9):
    """At strength 1 the pipeline does not encode the picture (only the masked one): pure noise,
    one draw fewer from the generator; guidance 1 runs one row per image."""
    for r in (inpaint(sampler="euler_a", seed=72, strength=1.0, n=2), inpaint(sampler="ddim", seed=73, guidance_scale=1.0)):
        res = engine9.generate_sync(r)
        check(res, reference9(r), reference9(other_seed(r)), label=f"inpaint9 strength {r.strength} n={r.n} g={r.guidance_scale}")
    # The mask and the masked picture are read: the same seed with everything repainted differs.
    check(res, reference9(r))
    with pytest.raises(AssertionError):
        check(res, reference9(dataclasses.replace(r, mask=WHITE)), label="inpaint9 against the all-white mask")


def test_without_a_mask_or_picture_everything_is_repainted(engine9, reference9):
    """Text-to-image on an inpainting model is the pipeline with an all-white mask (its picture
    unread at strength 1); an edit without a mask is the same mask at the edit's strength."""
    gen = GenerationRequest(prompt="a green square", negative_prompt="", steps=6, seed=74, sampler="dpmpp_2m")
    check(engine9.generate_sync(gen), reference9(gen), reference9(other_seed(gen)), label="inpaint9 text-to-image")
    edit = inpaint(mask=None, sampler="euler", seed=75, strength=0.6)
    check(engine9.generate_sync(edit), reference9(edit), reference9(other_seed(edit)), label="inpaint9 unmasked edit")


def test_mixed_batch_of_edits(engine9, reference9):
    """Masked edits of two sizes, different samplers, steps, strengths, guidance and n, joining at
    different steps: each still equals its own pipeline run, its mask channels riding with its
    own rows (conditional and unconditional)."""
    wide_picture = picture(48, 80, shift=40)
    wide_mask = Image.new("L", (80, 48), 0)
    wide_mask.paste(255, (0, 0, 40, 24))
    first = [
        inpaint(sampler="euler", steps=14, seed=81),
        inpaint(sampler="ddim", steps=8, strength=1.0, seed=82, n=2, guidance_scale=3.0),
        inpaint(sampler="dpmpp_2m", steps=10, seed=83, height=48, width=80, image=wide_picture, mask=wide_mask),
    ]
    later = [
        inpaint(sampler="euler_a", steps=10, strength=0.6, seed=84, guidance_scale=1.0),
        inpaint(sampler="dpmpp_2m", steps=9, seed=85, prompt="a blue triangle"),
        inpaint(sampler="euler", steps=6, seed=86, height=48, width=80, image=wide_picture, mask=wide_mask, guidance_scale=5.0),
    ]
    results, most = submit_joining(engine9, first, later, join_at_step=3, join_timeout=60)
    assert most >= 4, "edits never shared a forward"
    for r, res in zip(first + later, results, strict=True):
        check(res, reference9(r), reference9(other_seed(r)), label=f"inpaint9 mixed {r.sampler}/{r.steps}/{r.height}x{r.width}/n={r.n}/s={r.strength}")


def test_the_profiler_times_steps_at_the_unets_input_width(engine9, model_dir):
    """Timed steps carry mask channels, as served steps do (a 4-channel input would not run)."""
    from synerdiff.engine.profiler import profile_executor

    p = profile_executor(engine9.executor, str(model_dir), max_rows=2, repeats=1, warmup=1)
    assert [rows for rows, _ in p.unet["64x64"]] == [1, 2]


def test_mask_channels_stack_per_row_and_never_half():
    from synerdiff.models.conditioning import Conditioning

    a = Conditioning(torch.zeros(1, 2, 3), channels=torch.arange(20.0).view(1, 5, 2, 2))
    b = Conditioning(torch.ones(1, 2, 3), channels=-torch.ones(1, 5, 2, 2))
    stacked = Conditioning.stack([(a, 2), (b, 1)])
    assert stacked.channels is not None and stacked.channels.shape == (3, 5, 2, 2)
    assert torch.equal(stacked.channels[1], a.channels[0]) and torch.equal(stacked.channels[2], b.channels[0])
    assert stacked.unet_input(torch.zeros(3, 4, 2, 2)).shape == (3, 9, 2, 2)
    for parts in ([(a, 1), (Conditioning(torch.zeros(1, 2, 3)), 1)], [(Conditioning(torch.zeros(1, 2, 3)), 1), (a, 1)]):
        with pytest.raises(ValueError, match="extra input channels"):
            Conditioning.stack(parts)
