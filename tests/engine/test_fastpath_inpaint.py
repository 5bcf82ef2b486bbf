"""CUDA only: the fast path's graphs of an inpainting UNet (9 input channels) are captured at the
UNet's input width and replayed for masked edits, whose images still equal diffusers'
StableDiffusionInpaintPipeline, graphed and compiled alike."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from synerdiff.contract.config import EngineConfig, SchedulerConfig
from synerdiff.engine import Engine, GenerationRequest
from synerdiff.samplers import DIFFUSERS_CLASSES
from synerdiff_training.make_tiny import build

from .conftest import pipeline_kwargs
from .test_exactness import check
from .test_img2img import MASK, PICTURE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the fast path needs CUDA")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tiny-sd-inpaint"), seed=3, inpainting=True)


@pytest.fixture(scope="module")
def reference(model_dir):
    from diffusers import StableDiffusionInpaintPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionInpaintPipeline.from_pretrained(model_dir, local_files_only=True, safety_checker=None, requires_safety_checker=False).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    base_config = dict(pipe.scheduler.config)

    def run(r: GenerationRequest) -> torch.Tensor:
        pipe.scheduler = DIFFUSERS_CLASSES[r.sampler].from_config(base_config)
        return (
            pipe(
                r.prompt,
                image=r.image,
                mask_image=r.mask,
                strength=r.strength,
                **pipeline_kwargs(r),
            )
            .images.float()
            .cpu()
        )

    return run


@pytest.mark.parametrize("compile", [False, True])
def test_graphs_take_the_mask_channels(model_dir, reference, tmp_path, compile):
    cfg = EngineConfig(
        model=str(model_dir),
        device="cuda",
        dtype="float32",
        fast_path=True,
        fast_path_compile=compile,
        fast_path_rows=[2, 4, 8],
        fast_path_sizes=[f"{PICTURE.width}x{PICTURE.height}"],  # the edits' size, not the model's native one
        compile_cache_dir=str(tmp_path / "cache"),
        attention_backend="torch",
        scheduler=SchedulerConfig(policy="continuous", max_rows=8),
    )
    eng = Engine(cfg).start()
    try:
        g = eng.executor.graphed
        f = eng.model.vae_scale_factor
        assert g is not None and g.shapes == [(9, PICTURE.height // f, PICTURE.width // f)]
        replays = g.replays
        base = dict(prompt="a red circle", negative_prompt="blurry", image=PICTURE, mask=MASK, steps=8, guidance_scale=7.5)
        requests = [
            GenerationRequest(**base, sampler="euler", seed=1, strength=0.8),
            GenerationRequest(**base, sampler="dpmpp_2m", seed=2, strength=1.0, n=2),
            GenerationRequest(**base, sampler="euler_a", seed=3, strength=0.6),
        ]
        handles = [eng.submit(r) for r in requests]
        for r, h in zip(requests, handles, strict=True):
            other = dataclasses.replace(r, seed=r.seed + 100, request_id=r.request_id + "-other")
            check(h.wait(300), reference(r), reference(other), label=f"fast path (compile={compile}) inpaint9 {r.sampler}")
        assert g.replays > replays and g.eager_calls == 0
    finally:
        eng.shutdown()
