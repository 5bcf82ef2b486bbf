"""An SD2-style v-prediction model (prediction_type from the scheduler config) equals diffusers'
StableDiffusionPipeline through the engine."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from synerdiff.contract.config import EngineConfig, SchedulerConfig
from synerdiff.engine import Engine, GenerationRequest
from synerdiff.samplers import DIFFUSERS_CLASSES
from synerdiff_training.make_tiny import build

from .test_exactness import check


@pytest.fixture(scope="module")
def v_dir(tmp_path_factory):
    out = build(tmp_path_factory.mktemp("tiny-sd-v"), seed=3)
    path = out / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"prediction_type": "v_prediction"}))
    return out


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_v_prediction_matches_diffusers(v_dir, sampler):
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline.from_pretrained(v_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.scheduler = DIFFUSERS_CLASSES[sampler].from_config(pipe.scheduler.config)

    def reference(seed: int) -> torch.Tensor:
        gen = torch.Generator("cpu").manual_seed(seed)
        return pipe("a red circle", negative_prompt="blurry", num_inference_steps=8, guidance_scale=6.0, generator=gen, output_type="pt").images

    eng = Engine(EngineConfig(model=str(v_dir), device="cpu", dtype="float32", warmup=False, scheduler=SchedulerConfig(policy="continuous"))).start()
    try:
        r = GenerationRequest(prompt="a red circle", negative_prompt="blurry", steps=8, guidance_scale=6.0, seed=4, sampler=sampler)
        check(eng.generate_sync(r), reference(4), reference(5), label=f"v-prediction {sampler}")
    finally:
        eng.shutdown()
