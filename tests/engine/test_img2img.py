"""An image-to-image request equals diffusers' StableDiffusionImg2ImgPipeline, and a masked one
its StableDiffusionInpaintPipeline, alone and sharing forwards with text-to-image requests."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from synerdiff.contract.families import UNET_SAMPLERS
from synerdiff.engine import GenerationRequest, RequestError
from synerdiff.samplers import DIFFUSERS_CLASSES

from .conftest import pipeline_kwargs, submit_joining
from .test_exactness import check, req


def picture(height: int = 64, width: int = 64, shift: int = 0) -> Image.Image:
    """A deterministic test picture: colour gradients and a square."""
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([(x * 255 // width + shift) % 256, y * 255 // height, ((x + y) * 2) % 256], axis=-1).astype(np.uint8)
    arr[height // 4 : height // 2, width // 4 : width // 2] = (250, 240, 20)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def img2img_reference(pipe):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    base_config = dict(pipe.scheduler.config)
    cache: dict = {}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inpaint = StableDiffusionInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)

    def run(r: GenerationRequest) -> torch.Tensor:
        key = (r.prompt, r.negative_prompt, r.n, r.steps, r.guidance_scale, r.seed, r.sampler, r.strength, id(r.image), id(r.mask))
        if key not in cache:
            p = i2i if r.mask is None else inpaint
            p.scheduler = DIFFUSERS_CLASSES[r.sampler].from_config(base_config)
            kw = {} if r.mask is None else dict(mask_image=r.mask, height=r.height, width=r.width)
            cache[key] = p(
                r.prompt,
                image=r.image,
                strength=r.strength,
                **kw,
                **pipeline_kwargs(r),
            ).images.float()
        return cache[key]

    return run


PICTURE = picture()
MASK = Image.new("L", (64, 64), 0)
MASK.paste(255, (8, 16, 40, 56))  # white = repaint


def edit(**kw) -> GenerationRequest:
    return req(image=PICTURE, **kw)


@pytest.mark.parametrize("sampler", UNET_SAMPLERS)
def test_img2img_alone_matches_diffusers(engine, img2img_reference, sampler):
    r = edit(sampler=sampler, seed=31, steps=10, strength=0.7)
    result = engine.generate_sync(r)
    assert result.steps == 7  # int(10 * 0.7) steps of the schedule's tail
    check(result, img2img_reference(r), img2img_reference(edit(sampler=sampler, seed=32, steps=10, strength=0.7)), label=f"img2img {sampler}")


def test_img2img_n_images_and_default_strength(engine, img2img_reference):
    r = edit(sampler="euler_a", seed=33, steps=10, n=2)
    check(engine.generate_sync(r), img2img_reference(r), img2img_reference(edit(sampler="euler_a", seed=34, steps=10, n=2)), "img2img n=2")


def test_img2img_mixed_with_text_to_image(engine, reference, img2img_reference):
    """Edit rows enter at their later timesteps beside text-to-image rows; each image still
    equals its own pipeline's."""
    first = [req(sampler="euler", steps=16, seed=41), edit(sampler="dpmpp_2m", steps=12, strength=0.5, seed=42)]
    later = [
        edit(sampler="ddim", steps=10, strength=0.9, seed=43, guidance_scale=3.0),
        req(sampler="euler_a", steps=8, seed=44),
        inpaint(sampler="dpmpp_2m", steps=10, strength=0.7, seed=45),
    ]
    results, most = submit_joining(engine, first, later, join_at_step=3)
    assert most >= 3, "requests never shared a forward"
    for r, res in zip(first + later, results, strict=True):
        ref = img2img_reference(r) if r.image is not None else reference(r)
        kind = "txt2img" if r.image is None else "img2img" if r.mask is None else "inpaint"
        check(res, ref, label=f"{kind} {r.sampler}")


def inpaint(**kw) -> GenerationRequest:
    return req(image=PICTURE, mask=MASK, **kw)


@pytest.mark.parametrize("sampler", UNET_SAMPLERS)
def test_inpaint_alone_matches_diffusers(engine, img2img_reference, sampler):
    r = inpaint(sampler=sampler, seed=51, steps=10, strength=0.8)
    result = engine.generate_sync(r)
    ref = img2img_reference(r)
    check(result, ref, img2img_reference(inpaint(sampler=sampler, seed=52, steps=10, strength=0.8)), label=f"inpaint {sampler}")
    # The known region stays the picture's; the masked one is repainted.
    changed = (result.images[0] - img2img_reference(edit(sampler=sampler, seed=51, steps=10, strength=0.8))[0]).abs().mean()
    assert changed > 0.01


def test_inpaint_full_strength_and_n(engine, img2img_reference):
    r = inpaint(sampler="euler_a", seed=53, steps=8, strength=1.0, n=2)
    check(
        engine.generate_sync(r), img2img_reference(r), img2img_reference(inpaint(sampler="euler_a", seed=54, steps=8, strength=1.0, n=2)), "inpaint strength 1"
    )


@pytest.mark.parametrize(
    ("kw", "field"),
    [(dict(strength=1.5), "strength"), (dict(strength=0.05, steps=10), "strength"), (dict(strength=-0.1), "strength"), (dict(image=None, mask=MASK), "mask")],
)
def test_img2img_refusals_name_the_field(engine, kw, field):
    with pytest.raises(RequestError) as err:
        engine.submit(req(**kw) if "image" in kw else edit(**kw))
    assert err.value.field == field
