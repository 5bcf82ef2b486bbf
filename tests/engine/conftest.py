"""Shared fixtures for engine tests: one CPU engine and diffusers reference images."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from synerdiff.contract.config import EMBEDDED_MODEL_DIR, EngineConfig, SchedulerConfig
from synerdiff.engine import Engine, EngineObserver, GenerationRequest, GenerationResult
from synerdiff.samplers import DIFFUSERS_CLASSES


def pipeline_kwargs(r: GenerationRequest) -> dict[str, Any]:
    """What every diffusers reference call takes from a request: the negative prompt (the engine's
    empty one is the pipeline's absent one), n, steps, guidance, the request's seeded CPU
    generator, and tensor output."""
    return dict(
        negative_prompt=r.negative_prompt or None,
        num_images_per_prompt=r.n,
        num_inference_steps=r.steps,
        guidance_scale=r.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(r.seed),
        output_type="pt",
    )


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
                height=req.height,
                width=req.width,
                **pipeline_kwargs(req),
                **kw,
            ).images
            cache[key] = out.float()
        return cache[key]

    return run


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and counters empty before and after a test that counts its traces."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def make_engine(**scheduler) -> Engine:
    sched = SchedulerConfig(**{"policy": "continuous", **scheduler})
    return Engine(EngineConfig(device="cpu", dtype="float32", scheduler=sched)).start()


@pytest.fixture(scope="module")
def engine():
    eng = make_engine(max_rows=64)
    yield eng
    eng.shutdown()


def submit_joining(
    engine: Engine, first: Sequence[GenerationRequest], later: Sequence[GenerationRequest], *, join_at_step: int, join_timeout: float = 30.0
) -> tuple[list[GenerationResult], int]:
    """Submit `first`, then `later` once the first request has run `join_at_step` steps, so they
    join a running batch; wait for all. The results in submission order, and the most images one
    iteration held (whether the requests really shared forwards)."""
    shared: list[int] = []
    engine.observers.append(EngineObserver(on_iteration=lambda st: shared.append(st.images)))
    try:
        joined = threading.Event()
        handles = [engine.submit(r) for r in first]
        handles[0].add_progress_callback(lambda step, total: joined.set() if step >= join_at_step else None)
        assert joined.wait(join_timeout)
        handles += [engine.submit(r) for r in later]
        results = [h.wait(120) for h in handles]
    finally:
        engine.observers.pop()
    return results, max(shared, default=0)
