"""SDXL: a request's image equals diffusers' StableDiffusionXLPipeline, alone and in mixed
batches, on a tiny random-weight SDXL-shaped model built here; the family is detected from
`model_index.json` and other pipelines are refused."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

from synerdiff.contract.config import EMBEDDED_MODEL_DIR, EngineConfig, SchedulerConfig
from synerdiff.contract.families import UNET_SAMPLERS
from synerdiff.engine import Engine, EngineObserver, GenerationRequest
from synerdiff.models.conditioning import Prompt, SDXLConditioner
from synerdiff.models.loader import ModelLoadError, detect_family, load_model
from synerdiff.samplers import DIFFUSERS_CLASSES
from synerdiff_training.make_tiny import build_xl

from .conftest import pipeline_kwargs, submit_joining
from .test_exactness import check


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory):
    return build_xl(tmp_path_factory.mktemp("tiny-sdxl"), seed=0)


@pytest.fixture(scope="module")
def xl_engine(xl_dir):
    sched = SchedulerConfig(policy="continuous", max_rows=64)
    eng = Engine(EngineConfig(model=str(xl_dir), device="cpu", dtype="float32", warmup=False, scheduler=sched)).start()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def xl_reference(xl_dir):
    """reference(request) -> (n, 3, H, W) float images from diffusers' StableDiffusionXLPipeline."""
    from diffusers import StableDiffusionXLPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionXLPipeline.from_pretrained(xl_dir, local_files_only=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    base_config = dict(pipe.scheduler.config)
    cache: dict = {}

    def run(req: GenerationRequest) -> torch.Tensor:
        key = (req.prompt, req.negative_prompt, req.n, req.height, req.width, req.steps, req.guidance_scale, req.seed, req.sampler, req.cfg_cutoff_ratio)
        if key not in cache:
            pipe.scheduler = DIFFUSERS_CLASSES[req.sampler].from_config(base_config)
            kw = {}
            if req.cfg_cutoff_ratio is not None:
                from diffusers.callbacks import SDXLCFGCutoffCallback

                cb = SDXLCFGCutoffCallback(cutoff_step_ratio=req.cfg_cutoff_ratio)
                kw = dict(callback_on_step_end=cb, callback_on_step_end_tensor_inputs=cb.tensor_inputs)
            cache[key] = pipe(
                req.prompt,
                height=req.height,
                width=req.width,
                **pipeline_kwargs(req),
                **kw,
            ).images.float()
        return cache[key]

    return run


def req(**kw) -> GenerationRequest:
    base = dict(prompt="a red circle on a blue background", negative_prompt="blurry", steps=10, guidance_scale=7.5, seed=1)
    base.update(kw)
    return GenerationRequest(**base)


def test_family_is_detected(xl_engine):
    assert xl_engine.model.family == "sdxl"
    assert xl_engine.model.text_encoder_2 is not None
    assert detect_family(EMBEDDED_MODEL_DIR)[0] == "sd"


@pytest.mark.parametrize("cls", ["QwenImagePipeline", "FluxFillPipeline", None])
def test_unsupported_pipeline_is_refused(tmp_path, cls):
    index = {"_diffusers_version": "0.30.0"} | ({"_class_name": cls} if cls else {})
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError) as err:
        load_model(tmp_path, "cpu", "float32")
    msg = str(err.value)
    assert (repr(cls) if cls else "no pipeline class") in msg
    assert all(name in msg for name in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline"))


def test_sdxl_directory_lacking_its_second_encoder_is_refused(xl_dir, tmp_path):
    (tmp_path / "model_index.json").write_text((xl_dir / "model_index.json").read_text())
    for part in ("unet", "vae", "text_encoder", "tokenizer", "tokenizer_2", "scheduler"):
        (tmp_path / part).mkdir()
    with pytest.raises(ModelLoadError, match="text_encoder_2"):
        load_model(tmp_path, "cpu", "float32")


@pytest.mark.parametrize("sampler", UNET_SAMPLERS)
def test_alone_matches_diffusers(xl_engine, xl_reference, sampler):
    r = req(sampler=sampler, seed=11)
    check(xl_engine.generate_sync(r), xl_reference(r), xl_reference(req(sampler=sampler, seed=12)), label=f"sdxl {sampler} alone")


def test_empty_negative_prompt_is_zeros(xl_engine, xl_reference):
    r = req(negative_prompt="", n=2, sampler="euler_a", seed=5)
    check(xl_engine.generate_sync(r), xl_reference(r), xl_reference(req(negative_prompt="", n=2, sampler="euler_a", seed=6)), "sdxl empty negative")
    cond = SDXLConditioner(xl_engine.model)
    zeros, text = cond.encode([Prompt("", True, 64, 64), Prompt("", False, 64, 64)])
    assert not zeros.context.any() and not zeros.added["text_embeds"].any()
    assert text.context.abs().sum() > 0  # an empty positive prompt is encoded
    off = SDXLConditioner(dataclasses.replace(xl_engine.model, pipeline_config={"force_zeros_for_empty_prompt": False}))
    assert off.encode([Prompt("", True, 64, 64)])[0].context.abs().sum() > 0


def test_fixed_cutoff_equals_diffusers_sdxl_cfg_cutoff_callback(xl_engine, xl_reference):
    """After the cutoff an image runs on its conditional row alone, pooled embedding and size ids
    included, as SDXLCFGCutoffCallback leaves them."""
    rows = []
    xl_engine.observers.append(EngineObserver(on_iteration=lambda st: rows.append(st.rows) if st.rows else None))
    try:
        r = req(cfg_cutoff_ratio=0.4, sampler="euler", steps=10)
        res = xl_engine.generate_sync(r, timeout=60)
    finally:
        xl_engine.observers.pop()
    check(res, xl_reference(r), xl_reference(dataclasses.replace(r, cfg_cutoff_ratio=None)), label="sdxl cutoff 0.4 (other: full CFG)")
    assert rows == [2] * 5 + [1] * 5


def test_time_ids_follow_the_request_size(xl_engine):
    c = SDXLConditioner(xl_engine.model).encode([Prompt("a", False, 48, 80)])[0]
    assert c.added["time_ids"].tolist() == [[48.0, 80.0, 0.0, 0.0, 48.0, 80.0]]


def test_mixed_batch_joining_and_leaving(xl_engine, xl_reference):
    """Different samplers, sizes, steps, guidance and n share forwards, joining at different
    steps; each image still equals its own reference (their size ids differ row by row) and is
    far from another seed's."""
    first = [
        req(sampler="euler", steps=14, seed=21),
        req(sampler="ddim", steps=6, guidance_scale=3.0, seed=22, n=2, height=48, width=80),
        req(sampler="dpmpp_2m", steps=10, guidance_scale=1.0, seed=23, height=48, width=80),
    ]
    later = [
        req(sampler="euler_a", steps=8, seed=24, prompt="a green square", negative_prompt=""),
        req(sampler="dpmpp_2m", steps=5, seed=25, height=48, width=80, guidance_scale=5.0),
        req(sampler="ddim", steps=9, seed=26, guidance_scale=9.0, n=2),
    ]
    results, most = submit_joining(xl_engine, first, later, join_at_step=3)
    assert most >= 4, "requests never shared a forward"
    for r, res in zip(first + later, results, strict=True):
        other = xl_reference(dataclasses.replace(r, seed=r.seed + 100))
        check(res, xl_reference(r), other, label=f"sdxl {r.sampler}/{r.steps} steps/{r.height}x{r.width}/n={r.n}")


def test_force_upcast_keeps_the_vae_in_fp32(xl_dir, tmp_path):
    m = load_model(xl_dir, "cpu", "float16")
    assert m.unet.dtype == torch.float16 and m.text_encoder_2.dtype == torch.float16
    assert m.vae_dtype == torch.float32  # the tiny VAE keeps AutoencoderKL's default force_upcast=True
    import shutil

    shutil.copytree(xl_dir, tmp_path / "m")
    cfg_path = tmp_path / "m" / "vae" / "config.json"
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | {"force_upcast": False}))
    assert load_model(tmp_path / "m", "cpu", "float16").vae_dtype == torch.float16


def test_a_configured_vae_replaces_the_models_own(xl_dir, tmp_path):
    """engine.vae: another AutoencoderKL folder (an fp16-safe VAE: force_upcast false) decodes
    in the model's dtype, and its weights are the ones used, as diffusers' pipeline given that VAE."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    vae = AutoencoderKL.from_pretrained(xl_dir, subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(-1.0)  # decodes visibly unlike the model's own
    vae.register_to_config(force_upcast=False)
    vae.save_pretrained(tmp_path / "vae16")
    m = load_model(xl_dir, "cpu", "float16", vae=tmp_path / "vae16")
    assert m.vae_dtype == torch.float16  # not upcast: the replacement says it is fp16-safe
    assert torch.equal(m.vae.decoder.conv_out.weight.float(), vae.decoder.conv_out.weight.half().float())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionXLPipeline.from_pretrained(xl_dir, local_files_only=True, add_watermarker=False, vae=vae)
    pipe.set_progress_bar_config(disable=True)

    def reference(seed: int) -> torch.Tensor:
        return pipe("a red circle", num_inference_steps=4, generator=torch.Generator("cpu").manual_seed(seed), output_type="pt").images

    eng = Engine(EngineConfig(model=str(xl_dir), vae=str(tmp_path / "vae16"), device="cpu", dtype="float32", warmup=False)).start()
    try:
        res = eng.generate_sync(GenerationRequest(prompt="a red circle", steps=4, guidance_scale=5.0, seed=3, sampler="euler"))
    finally:
        eng.shutdown()
    check(res, reference(3), reference(4), label="sdxl with a configured vae")
    with pytest.raises(ModelLoadError, match="vae .*no config.json"):
        load_model(xl_dir, "cpu", "float32", vae=tmp_path / "nowhere")


def test_vae_latent_statistics_are_applied_as_the_pipeline_does(xl_dir, tmp_path):
    """A VAE config with latents_mean/latents_std: the decode de-normalises by them, as
    StableDiffusionXLPipeline does."""
    import shutil

    from diffusers import StableDiffusionXLPipeline

    shutil.copytree(xl_dir, tmp_path / "m")
    cfg_path = tmp_path / "m" / "vae" / "config.json"
    stats = {"latents_mean": [0.3, -0.2, 0.1, 0.0], "latents_std": [0.8, 1.3, 0.6, 1.1]}
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | stats))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "m", local_files_only=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)

    def reference(seed: int) -> torch.Tensor:
        gen = torch.Generator("cpu").manual_seed(seed)
        return pipe("a red circle", negative_prompt="blurry", num_inference_steps=6, generator=gen, output_type="pt").images

    eng = Engine(EngineConfig(model=str(tmp_path / "m"), device="cpu", dtype="float32", warmup=False)).start()
    try:
        res = eng.generate_sync(GenerationRequest(prompt="a red circle", negative_prompt="blurry", steps=6, guidance_scale=5.0, seed=7, sampler="euler"))
    finally:
        eng.shutdown()
    check(res, reference(7), reference(8), label="sdxl latents_mean/std")


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_img2img_matches_diffusers(xl_dir, xl_engine, sampler):
    """SDXL image-to-image equals StableDiffusionXLImg2ImgPipeline."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from .test_img2img import PICTURE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(xl_dir, local_files_only=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DIFFUSERS_CLASSES[sampler].from_config(dict(pipe.scheduler.config))

    def reference(seed: int) -> torch.Tensor:
        return pipe(
            "a red circle on a blue background",
            image=PICTURE,
            strength=0.6,
            negative_prompt="blurry",
            num_inference_steps=10,
            guidance_scale=7.5,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pt",
        ).images.float()

    r = req(sampler=sampler, seed=61, image=PICTURE, strength=0.6)
    check(xl_engine.generate_sync(r), reference(61), reference(62), label=f"sdxl img2img {sampler}")
