"""Shared fixtures for engine tests: one CPU engine and diffusers reference images."""

from __future__ import annotations

import warnings

import pytest
import torch

from synerdiff.contract.config import EMBEDDED_MODEL_DIR, EngineConfig, SchedulerConfig
from synerdiff.engine import Engine, GenerationRequest
from synerdiff.samplers import DIFFUSERS_CLASSES


@pytest.fixture(scope="session")
def pipe():
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL_DIR, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="session")
def reference(pipe):
    """reference(request) -> (n, 3, H, W) float images from diffusers' own pipeline."""
    cache: dict = {}
    base_config = dict(pipe.scheduler.config)

    def run(req: GenerationRequest, cutoff_ratio: float | None = None) -> torch.Tensor:
        key = (req.prompt, req.negative_prompt, req.n, req.height, req.width, req.steps, req.guidance_scale, req.seed, req.sampler, cutoff_ratio)
        if key not in cache:
            pipe.scheduler = DIFFUSERS_CLASSES[req.sampler].from_config(base_config)
            kw = {}
            if cutoff_ratio is not None:
                from diffusers.callbacks import SDCFGCutoffCallback

                kw = dict(callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=cutoff_ratio), callback_on_step_end_tensor_inputs=["prompt_embeds"])
            out = pipe(
                req.prompt,
                negative_prompt=req.negative_prompt or None,
                num_images_per_prompt=req.n,
                height=req.height,
                width=req.width,
                num_inference_steps=req.steps,
                guidance_scale=req.guidance_scale,
                generator=torch.Generator("cpu").manual_seed(req.seed),
                output_type="pt",
                **kw,
            ).images
            cache[key] = out.float()
        return cache[key]

    return run


def make_engine(**scheduler) -> Engine:
    sched = SchedulerConfig(**{"policy": "continuous", **scheduler})
    return Engine(EngineConfig(device="cpu", dtype="float32", scheduler=sched)).start()


@pytest.fixture(scope="module")
def engine():
    eng = make_engine(max_rows=64)
    yield eng
    eng.shutdown()
