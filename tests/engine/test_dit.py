"""The DiT families: a request's image equals diffusers' StableDiffusion3Pipeline / FluxPipeline
(and their img2img pipelines), alone and in mixed running batches, on tiny random-weight models
built here; what a family refuses is a RequestError naming the field."""

from __future__ import annotations

import warnings

import pytest
import torch

from synerdiff.contract.config import EngineConfig, LimitsConfig, SchedulerConfig
from synerdiff.engine import Engine, GenerationRequest, RequestError
from synerdiff_training.make_tiny import build_flux, build_sd3

from .conftest import submit_joining
from .test_exactness import check
from .test_img2img import picture

PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
IMG2IMG = {"sd3": "StableDiffusion3Img2ImgPipeline", "flux": "FluxImg2ImgPipeline"}


def make_engine(path, **limits) -> Engine:
    sched = SchedulerConfig(policy="continuous", max_rows=64)
    cfg = EngineConfig(model=str(path), device="cpu", dtype="float32", warmup=False, scheduler=sched, limits=LimitsConfig(**limits))
    return Engine(cfg).start()


class Reference:
    """diffusers' own pipeline for a model folder: reference images of a request (cached)."""

    def __init__(self, path, family: str, **absent):
        import diffusers

        self.family = family
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # A component left out (SD3 without T5) is passed as None, as diffusers asks.
            self.pipe = getattr(diffusers, PIPELINES[family]).from_pretrained(path, local_files_only=True, **absent)
            self.i2i = getattr(diffusers, IMG2IMG[family])(**{**absent, **self.pipe.components})
        for p in (self.pipe, self.i2i):
            p.set_progress_bar_config(disable=True)
        self.cache: dict = {}

    def __call__(self, r: GenerationRequest, seed: int | None = None) -> torch.Tensor:
        seed = r.seed if seed is None else seed
        key = (r.prompt, r.negative_prompt, r.n, r.height, r.width, r.steps, r.guidance_scale, seed, r.strength, id(r.image))
        if key not in self.cache:
            kw = dict(
                num_inference_steps=r.steps,
                guidance_scale=r.guidance_scale,
                num_images_per_prompt=r.n,
                generator=torch.Generator("cpu").manual_seed(seed),
                output_type="pt",
                height=r.height,
                width=r.width,
            )
            if self.family == "sd3":
                kw["negative_prompt"] = r.negative_prompt or None
            if r.image is None:
                out = self.pipe(r.prompt, **kw)
            else:
                out = self.i2i(r.prompt, image=r.image, strength=r.strength, **kw)
            self.cache[key] = out.images.float()
        return self.cache[key]


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return build_sd3(tmp_path_factory.mktemp("tiny-sd3"), seed=0)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return build_flux(tmp_path_factory.mktemp("tiny-flux"), seed=0)


@pytest.fixture(scope="module")
def sd3(sd3_dir):
    eng = make_engine(sd3_dir, max_side=512)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def flux(flux_dir):
    eng = make_engine(flux_dir)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def sd3_ref(sd3_dir):
    return Reference(sd3_dir, "sd3")


@pytest.fixture(scope="module")
def flux_ref(flux_dir):
    return Reference(flux_dir, "flux")


def req(**kw) -> GenerationRequest:
    base = dict(prompt="a red circle on a blue background", steps=5, seed=1, height=32, width=32)
    base.update(kw)
    return GenerationRequest(**base)


def test_families_and_their_defaults(sd3, flux):
    assert (sd3.model.family, flux.model.family) == ("sd3", "flux")
    assert sd3.default_sampler() == flux.default_sampler() == "flow_euler"
    assert (sd3.default_guidance(), flux.default_guidance()) == (7.0, 3.5)  # the pipelines' defaults
    # SD3: the transformer's sample_size in latent pixels; FLUX: the pipeline's 128 latent pixels.
    assert sd3.model.default_size == 32 * sd3.model.vae_scale_factor
    assert flux.model.default_size == 128 * flux.model.vae_scale_factor
    assert sd3.model.text_tokens == 77 + 256 and flux.model.text_tokens == 512


@pytest.mark.parametrize(
    "kw",
    [
        dict(guidance_scale=5.0, negative_prompt="blurry", n=2),
        dict(guidance_scale=1.0, height=48, width=32),  # unguided: one row an image
        dict(guidance_scale=7.0, steps=1),
    ],
    ids=["guided", "unguided", "one-step"],
)
def test_sd3_alone_matches_diffusers(sd3, sd3_ref, kw):
    r = req(**kw)
    check(sd3.generate_sync(r), sd3_ref(r), sd3_ref(r, seed=99), label=f"sd3 {kw}")


@pytest.mark.parametrize("kw", [dict(guidance_scale=3.5, n=2), dict(guidance_scale=8.0, height=64, width=48, steps=3)], ids=["default", "other"])
def test_flux_alone_matches_diffusers(flux, flux_ref, kw):
    r = req(**kw)
    result = flux.generate_sync(r)
    check(result, flux_ref(r), flux_ref(r, seed=99), label=f"flux {kw}")


def test_flux_guidance_is_an_input_not_rows(flux, flux_ref):
    """FLUX-dev's guidance is embedded: one row an image whatever the scale, and the scale changes the image."""
    from synerdiff.engine import EngineObserver

    rows: list[int] = []
    flux.observers.append(EngineObserver(on_iteration=lambda st: rows.append(st.rows)))
    try:
        low = flux.generate_sync(req(guidance_scale=1.5, n=2, seed=4))
    finally:
        flux.observers.pop()
    assert max(rows) == 2  # 2 images, no unconditional rows
    high = req(guidance_scale=9.0, n=2, seed=4)
    check(flux.generate_sync(high), flux_ref(high), torch.stack(low.images), label="flux guidance 9 against 1.5")


def test_sd3_mixed_batch_matches_each_alone(sd3, sd3_ref):
    """Sizes, step counts, guidance and image counts in one running batch: each request's images
    equal the pipeline's for that request alone."""
    first = [req(steps=8, guidance_scale=6.0, seed=2, negative_prompt="dark")]
    later = [
        req(steps=4, guidance_scale=1.0, seed=3, prompt="a green square", n=2),
        req(steps=6, guidance_scale=4.0, seed=5, height=48, width=32),
        req(steps=5, guidance_scale=9.0, seed=6, prompt="a yellow triangle"),
    ]
    results, shared = submit_joining(sd3, first, later, join_at_step=2)
    assert shared > 2  # requests really shared forwards
    for r, res in zip(first + later, results, strict=True):
        check(res, sd3_ref(r), sd3_ref(r, seed=r.seed + 50), label=f"sd3 mixed seed {r.seed}")


def test_flux_mixed_batch_matches_each_alone(flux, flux_ref):
    first = [req(steps=8, guidance_scale=3.5, seed=2)]
    later = [
        req(steps=4, guidance_scale=1.0, seed=3, prompt="a green square", n=2),
        req(steps=6, guidance_scale=5.0, seed=5, height=48, width=32),
        req(steps=5, guidance_scale=3.5, seed=6, prompt="a yellow triangle"),
    ]
    results, shared = submit_joining(flux, first, later, join_at_step=2)
    assert shared > 1
    for r, res in zip(first + later, results, strict=True):
        check(res, flux_ref(r), flux_ref(r, seed=r.seed + 50), label=f"flux mixed seed {r.seed}")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_image_to_image_matches_the_img2img_pipeline(family, sd3, flux, sd3_ref, flux_ref):
    """Edits follow the flow pipelines' strength rule: 5 steps at 0.5 leaves int(2.5) = 2 out and runs 3."""
    eng, ref = (sd3, sd3_ref) if family == "sd3" else (flux, flux_ref)
    pic = picture(32, 32)
    r = req(image=pic, strength=0.5, steps=5, guidance_scale=4.0, seed=7)
    result = eng.generate_sync(r)
    assert result.steps == 3
    check(result, ref(r), ref(r, seed=77), label=f"{family} img2img")
    # Beside a text-to-image request in the same batch.
    edit = req(image=pic, strength=0.9, steps=4, seed=9, n=2)
    results, _ = submit_joining(eng, [req(steps=6, seed=8)], [edit], join_at_step=1)
    check(results[1], ref(edit), label=f"{family} img2img mixed")


def test_sd3_without_t5_encodes_zeros_in_its_place(tmp_path):
    """A pipeline saved without text_encoder_3 (model_index.json null) is served as the pipeline
    serves it: zeros in place of T5's sequence."""
    path = build_sd3(tmp_path / "no-t5", seed=1, t5=False)
    eng = make_engine(path)
    try:
        assert eng.model.text_encoder_3 is None
        ref = Reference(path, "sd3", text_encoder_3=None, tokenizer_3=None)
        r = req(guidance_scale=5.0, seed=3)
        check(eng.generate_sync(r), ref(r), ref(r, seed=33), label="sd3 without T5")
    finally:
        eng.shutdown()


def test_flux_schnell_has_no_guidance_input(tmp_path):
    path = build_flux(tmp_path / "schnell", seed=2, guidance=False)
    eng = make_engine(path)
    try:
        ref = Reference(path, "flux")
        r = req(steps=4, seed=5, guidance_scale=0.0)
        check(eng.generate_sync(r), ref(r), ref(r, seed=55), label="flux schnell")
    finally:
        eng.shutdown()


@pytest.mark.parametrize(
    "family,kw,field,words",
    [
        ("sd3", dict(sampler="euler"), "sampler", "not served for the sd3 family"),
        ("flux", dict(sampler="dpmpp_2m"), "sampler", "flow_euler"),
        ("flux", dict(negative_prompt="blurry"), "negative_prompt", "flux family"),
        ("sd3", dict(image="picture", mask="picture"), "mask", "not served for the sd3 family"),
        ("sd3", dict(height=320, width=32), "size", "position embedding"),
    ],
)
def test_what_a_family_refuses_names_the_field(sd3, flux, family, kw, field, words):
    kw = {k: picture(32, 32) if v == "picture" else v for k, v in kw.items()}
    eng = sd3 if family == "sd3" else flux
    with pytest.raises(RequestError) as err:
        eng.submit(req(**kw))
    assert err.value.field == field and words in str(err.value)


def test_a_row_costs_its_tokens(sd3, flux):
    """Outstanding work weighs a DiT row by its tokens, text included, against a native row's."""
    for eng in (sd3, flux):
        m = eng.model
        n = m.default_size
        native = m.image_tokens(n, n) + m.text_tokens
        assert eng.row_weight(n, n) == 1.0
        assert eng.row_weight(2 * n, 2 * n) == pytest.approx((4 * m.image_tokens(n, n) + m.text_tokens) / native)


def test_a_default_sampler_of_another_family_fails_the_start(sd3_dir):
    """engine.default_sampler names a sampler the model's family does not serve: the start fails
    saying so, instead of every request without a sampler getting a 400 about a field it never sent."""
    cfg = EngineConfig(model=str(sd3_dir), device="cpu", dtype="float32", warmup=False, default_sampler="euler")
    with pytest.raises(ValueError, match="not served for the sd3 family"):
        Engine(cfg).start()
