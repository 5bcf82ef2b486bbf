"""Per-request LoRA on the DiT families: a served SD3 or FLUX image with adapters equals diffusers'
pipeline after `load_lora_weights` + `set_adapters`, alone and in a mixed running batch (another
adapter, two adapters, none), transformer and CLIP text-encoder layers alike."""

from __future__ import annotations

import warnings

import pytest
import torch

from synerdiff.contract.config import EngineConfig, LoraConfig, SchedulerConfig
from synerdiff.engine import Engine, GenerationRequest
from synerdiff_training.make_tiny import build_flux, build_sd3

from .conftest import submit_joining
from .lora_kit import TEXT_TARGETS, allow_installed_peft, random_layers
from .test_exactness import check

DIT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj", "ff.net.2", "proj_mlp")
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


def save_adapter(pipe, folder, name: str, seed: int, text: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    kw = {"transformer_lora_layers": random_layers(pipe.transformer, DIT_TARGETS, 4, gen, std=0.1)}
    if text:
        kw["text_encoder_lora_layers"] = random_layers(pipe.text_encoder, TEXT_TARGETS, 4, gen)
    type(pipe).save_lora_weights(folder / name, **kw)


@pytest.fixture(scope="module", params=["sd3", "flux"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def setup(family, tmp_path_factory):
    """(engine, reference) for one family: a tiny model, three adapters, the engine serving them."""
    import diffusers

    allow_installed_peft()
    root = tmp_path_factory.mktemp(f"lora-{family}")
    path = (build_sd3 if family == "sd3" else build_flux)(root / "model", seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    adapters = root / "adapters"
    save_adapter(pipe, adapters, "ink", seed=1, text=True)
    save_adapter(pipe, adapters, "neon", seed=2, text=False)
    save_adapter(pipe, adapters, "wash", seed=3, text=True)
    cfg = EngineConfig(
        model=str(path),
        device="cpu",
        dtype="float32",
        warmup=False,
        scheduler=SchedulerConfig(policy="continuous", max_rows=64),
        lora=LoraConfig(dir=str(adapters), cache_slots=4),
    )
    engine = Engine(cfg).start()
    cache: dict = {}

    def reference(r: GenerationRequest, seed: int | None = None) -> torch.Tensor:
        seed = r.seed if seed is None else seed
        key = (tuple(r.lora), r.prompt, r.n, r.height, r.width, r.steps, r.guidance_scale, seed)
        if key not in cache:
            pipe.unload_lora_weights()
            for n, _ in r.lora:
                pipe.load_lora_weights(str(adapters / n), adapter_name=n)
            if r.lora:
                pipe.set_adapters([n for n, _ in r.lora], [s for _, s in r.lora])
            kw = dict(negative_prompt=r.negative_prompt or None) if family == "sd3" else {}
            cache[key] = pipe(
                r.prompt,
                height=r.height,
                width=r.width,
                num_inference_steps=r.steps,
                guidance_scale=r.guidance_scale,
                num_images_per_prompt=r.n,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="pt",
                **kw,
            ).images.float()
        return cache[key]

    yield engine, reference
    engine.shutdown()


def req(lora=(), **kw) -> GenerationRequest:
    base = dict(prompt="a red circle on a blue background", steps=5, seed=1, height=32, width=32, guidance_scale=4.0)
    base.update(kw)
    return GenerationRequest(lora=list(lora), **base)


def test_an_adapter_alone_equals_the_pipeline_with_it(setup, family):
    engine, reference = setup
    r = req(lora=[("ink", 0.8)])
    result = engine.generate_sync(r)
    check(result, reference(r), reference(r, seed=40), label=f"{family} ink alone")
    # The adapter changed the image: the same request without it is far away.
    plain = req()
    assert float(((torch.stack(result.images) - reference(plain)) ** 2).mean()) > 1e-4


def test_mixed_adapters_in_one_running_batch(setup, family):
    """Rows with another adapter, two adapters, none, in the same forwards: each equals its
    pipeline alone."""
    engine, reference = setup
    cache = engine.lora
    forwards: list[set] = []  # the distinct adapter sets of each denoiser forward's rows
    set_rows = cache.set_denoiser_rows
    cache.set_denoiser_rows = lambda rows: (forwards.append({tuple(r) for r in rows if r}), set_rows(rows))[1]
    try:
        first = [req(lora=[("neon", 1.0)], steps=7, seed=3)]
        later = [req(lora=[("ink", 0.5), ("wash", 1.2)], seed=4, n=2), req(seed=5, guidance_scale=1.0), req(lora=[("wash", 0.7)], seed=6)]
        results, shared = submit_joining(engine, first, later, join_at_step=1)
    finally:
        cache.set_denoiser_rows = set_rows
    assert shared > 1 and max(len(f) for f in forwards) >= 3  # three different adapter sets in one forward
    for r, res in zip(first + later, results, strict=True):
        check(res, reference(r), reference(r, seed=r.seed + 30), label=f"{family} {list(r.lora)}")
