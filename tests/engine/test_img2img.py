"""An image-to-image request equals diffusers' StableDiffusionImg2ImgPipeline, alone and
sharing its forwards with text-to-image requests."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from synerdiff.engine import EngineObserver, GenerationRequest, RequestError
from synerdiff.samplers import DIFFUSERS_CLASSES, SAMPLERS

from .test_exactness import check, req


def picture(height: int = 64, width: int = 64, shift: int = 0) -> Image.Image:
    """A deterministic test picture: colour gradients and a square."""
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([(x * 255 // width + shift) % 256, y * 255 // height, ((x + y) * 2) % 256], axis=-1).astype(np.uint8)
    arr[height // 4 : height // 2, width // 4 : width // 2] = (250, 240, 20)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def img2img_reference(pipe):
    from diffusers import StableDiffusionImg2ImgPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    base_config = dict(pipe.scheduler.config)
    cache: dict = {}

    def run(r: GenerationRequest) -> torch.Tensor:
        key = (r.prompt, r.negative_prompt, r.n, r.steps, r.guidance_scale, r.seed, r.sampler, r.strength, id(r.image))
        if key not in cache:
            i2i.scheduler = DIFFUSERS_CLASSES[r.sampler].from_config(base_config)
            cache[key] = i2i(
                r.prompt,
                image=r.image,
                strength=r.strength,
                negative_prompt=r.negative_prompt or None,
                num_images_per_prompt=r.n,
                num_inference_steps=r.steps,
                guidance_scale=r.guidance_scale,
                generator=torch.Generator("cpu").manual_seed(r.seed),
                output_type="pt",
            ).images.float()
        return cache[key]

    return run


PICTURE = picture()


def edit(**kw) -> GenerationRequest:
    return req(image=PICTURE, **kw)


@pytest.mark.parametrize("sampler", SAMPLERS)
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
    later = [edit(sampler="ddim", steps=10, strength=0.9, seed=43, guidance_scale=3.0), req(sampler="euler_a", steps=8, seed=44)]
    shared = []
    engine.observers.append(EngineObserver(on_iteration=lambda st: shared.append(st.images)))
    try:
        joined = threading.Event()
        handles = [engine.submit(r) for r in first]
        handles[0].add_progress_callback(lambda step, total: joined.set() if step >= 3 else None)
        assert joined.wait(30)
        handles += [engine.submit(r) for r in later]
        results = [h.wait(120) for h in handles]
    finally:
        engine.observers.pop()
    assert max(shared) >= 3, "requests never shared a forward"
    for r, res in zip(first + later, results, strict=True):
        ref = img2img_reference(r) if r.image is not None else reference(r)
        check(res, ref, label=f"{'img2img' if r.image is not None else 'txt2img'} {r.sampler}")


@pytest.mark.parametrize(
    ("kw", "field"),
    [(dict(strength=1.5), "strength"), (dict(strength=0.05, steps=10), "strength"), (dict(strength=-0.1), "strength")],
)
def test_img2img_refusals_name_the_field(engine, kw, field):
    with pytest.raises(RequestError) as err:
        engine.submit(edit(**kw))
    assert err.value.field == field
