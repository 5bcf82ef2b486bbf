"""A real server on loopback serving a FLUX-shaped model (tiny, random weights, built here): the
official openai client's images.generate and images.edit return FluxPipeline's images with the
family's defaults (flow_euler, guidance 3.5); what the family refuses is a 400 naming the field;
/readyz publishes what a request costs on this model."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import httpx
import pytest
import torch
from openai import BadRequestError, OpenAI

from synerdiff.contract import readiness
from synerdiff.contract.config import EngineConfig, LimitsConfig
from synerdiff_training.make_tiny import build_flux

from .httpkit import TEST_LIMITS, decode_png, psnr, serve_engine
from .test_http_edits import PICTURE, png

STEPS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_flux(tmp_path_factory.mktemp("tiny-flux"), seed=3)


@pytest.fixture(scope="module")
def url(model_dir) -> Iterator[str]:
    cfg = EngineConfig(model=str(model_dir), device="cpu", dtype="float32", default_steps=STEPS, warmup=False, limits=LimitsConfig(**TEST_LIMITS))
    with serve_engine(cfg) as live:
        yield live


@pytest.fixture(scope="module")
def client(url: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def pipes(model_dir):
    from diffusers import FluxImg2ImgPipeline, FluxPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = FluxPipeline.from_pretrained(model_dir, local_files_only=True)
        i2i = FluxImg2ImgPipeline(**pipe.components)
    for p in (pipe, i2i):
        p.set_progress_bar_config(disable=True)
    return pipe, i2i


def _pil(pipe, seed: int, **kw):
    out = pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="pil", num_inference_steps=STEPS, **kw)
    return out.images[0]


def test_generate_uses_the_family_defaults_and_equals_the_pipeline(client, pipes):
    resp = client.images.generate(prompt="a red circle", size="48x32", extra_body={"seed": 3})
    info = resp.to_dict()["synerdiff"]
    assert (info["sampler"], info["guidance_scale"]) == ("flow_euler", 3.5)
    got = decode_png(resp.data[0].b64_json)
    ref = _pil(pipes[0], 3, prompt="a red circle", height=32, width=48, guidance_scale=3.5)
    other = _pil(pipes[0], 4, prompt="a red circle", height=32, width=48, guidance_scale=3.5)
    assert psnr(got, ref) >= 40 and psnr(got, ref) - psnr(got, other) >= 10


def test_edit_equals_the_img2img_pipeline(client, pipes):
    resp = client.images.edit(image=png(PICTURE), prompt="a blue circle", size="64x64", extra_body={"seed": 5, "strength": 0.7, "guidance_scale": 5.0})
    got = decode_png(resp.data[0].b64_json)
    ref = _pil(pipes[1], 5, prompt="a blue circle", image=PICTURE, strength=0.7, height=64, width=64, guidance_scale=5.0)
    assert psnr(got, ref) >= 40


@pytest.mark.parametrize(
    "extra,param",
    [({"sampler": "euler"}, "sampler"), ({"negative_prompt": "blurry"}, "negative_prompt")],
)
def test_what_the_family_refuses_is_a_400_naming_it(client, extra, param):
    with pytest.raises(BadRequestError) as err:
        client.images.generate(prompt="a red circle", size="32x32", extra_body=extra)
    assert err.value.body["param"] == param and "flux" in err.value.body["message"]


def test_readyz_publishes_what_a_request_costs(url):
    load = httpx.get(url + "/readyz", timeout=10).json()["load"]
    assert load[readiness.CFG_ROWS] is False  # FLUX's guidance adds no rows
    assert load[readiness.TEXT_TOKENS] == 512 and load[readiness.TOKEN_SIDE] == 4  # VAE factor 2 x 2x2 packing
    assert load[readiness.DEFAULT_GUIDANCE] == 3.5
