"""A real server on loopback serving an inpainting model (a UNet with 9 input channels, built
here from config with random weights): the official openai client's `images.edit` with a mask,
`images.edit` without one and `images.generate` return diffusers' StableDiffusionInpaintPipeline
images (without a mask: its all-white mask)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from openai import OpenAI
from PIL import Image

from synerdiff.contract.config import EngineConfig, LimitsConfig
from synerdiff.samplers import DIFFUSERS_CLASSES
from synerdiff_training.make_tiny import build

from .httpkit import TEST_LIMITS, decode_png, psnr, serve_engine
from .test_http_edits import PICTURE, png

MASK_RGBA = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
MASK_RGBA.paste((0, 0, 0, 0), (8, 16, 40, 56))  # OpenAI's convention: transparent = repaint
REPAINT = Image.new("L", (64, 64), 0)
REPAINT.paste(255, (8, 16, 40, 56))  # diffusers' convention: white = repaint
WHITE = Image.new("L", (64, 64), 255)
GUIDANCE = 7.5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tiny-sd-inpaint"), seed=5, inpainting=True)


@pytest.fixture(scope="module")
def url(model_dir) -> Iterator[str]:
    cfg = EngineConfig(model=str(model_dir), device="cpu", dtype="float32", default_steps=4, default_guidance=GUIDANCE, limits=LimitsConfig(**TEST_LIMITS))
    with serve_engine(cfg) as live:  # its warm-up is a text-to-image request: everything repainted
        yield live


@pytest.fixture(scope="module")
def client(url: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(model_dir):
    from diffusers import StableDiffusionInpaintPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionInpaintPipeline.from_pretrained(model_dir, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    base_config = dict(pipe.scheduler.config)

    def run(*, mask: Image.Image, strength: float, seed: int, steps: int, sampler: str, n: int = 1) -> list[Image.Image]:
        pipe.scheduler = DIFFUSERS_CLASSES[sampler].from_config(base_config)
        out = pipe(
            "a red circle",
            image=PICTURE,
            mask_image=mask,
            strength=strength,
            negative_prompt="blurry",
            num_images_per_prompt=n,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="np",
        ).images
        return [Image.fromarray((img * 255).round().astype(np.uint8)) for img in out]

    return run


def test_openai_client_masked_edit_equals_diffusers(client: OpenAI, reference):
    resp = client.images.edit(
        image=("picture.png", png(PICTURE), "image/png"),
        mask=("mask.png", png(MASK_RGBA), "image/png"),
        prompt="a red circle",
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body={"strength": 0.8, "seed": 9, "num_inference_steps": 6, "sampler": "dpmpp_2m", "negative_prompt": "blurry"},
    )
    assert resp.to_dict()["synerdiff"]["steps"] == 4  # int(6 * 0.8)
    got = [decode_png(d.b64_json) for d in resp.data]
    want = reference(mask=REPAINT, strength=0.8, seed=9, steps=6, sampler="dpmpp_2m", n=2)
    other = reference(mask=REPAINT, strength=0.8, seed=10, steps=6, sampler="dpmpp_2m", n=2)
    for g, w, o in zip(got, want, other, strict=True):
        assert psnr(g, w) >= 40
        assert psnr(g, o) < psnr(g, w) - 15


def test_without_a_mask_the_whole_picture_is_repainted(client: OpenAI, reference):
    """An edit without a mask and a generation are the pipeline with an all-white mask."""
    resp = client.images.edit(
        image=("picture.png", png(PICTURE), "image/png"),
        prompt="a red circle",
        extra_body={"strength": 0.5, "seed": 11, "num_inference_steps": 6, "sampler": "euler", "negative_prompt": "blurry"},
    )
    got = decode_png(resp.data[0].b64_json)
    assert psnr(got, reference(mask=WHITE, strength=0.5, seed=11, steps=6, sampler="euler")[0]) >= 40
    assert psnr(got, reference(mask=REPAINT, strength=0.5, seed=11, steps=6, sampler="euler")[0]) < 40
    gen = client.images.generate(
        prompt="a red circle", size="64x64", extra_body={"seed": 12, "num_inference_steps": 5, "sampler": "ddim", "negative_prompt": "blurry"}
    )
    # At strength 1 the pipeline reads no pixel of its picture: pure noise, everything repainted.
    assert psnr(decode_png(gen.data[0].b64_json), reference(mask=WHITE, strength=1.0, seed=12, steps=5, sampler="ddim")[0]) >= 40
