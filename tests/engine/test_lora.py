"""Per-request LoRA in the running batch: a served image equals diffusers' pipeline after
`load_lora_weights` + `set_adapters`, alone and in mixed batches (other adapters, two adapters
on one request, none), for SD and SDXL, diffusers/PEFT and kohya files; bad adapters are refused
at submit; a stream of many adapters through few slots loses no request."""

from __future__ import annotations

import shutil
import threading
import warnings
from pathlib import Path

import pytest
import torch

from synerdiff.contract.config import EMBEDDED_MODEL_DIR, EngineConfig, LoraConfig, SchedulerConfig
from synerdiff.engine import Engine, GenerationRequest, RequestError
from synerdiff.samplers import DIFFUSERS_CLASSES
from synerdiff_bench.quality import psnr
from synerdiff_training.make_tiny import build_xl

from .conftest import pipeline_kwargs, submit_joining
from .lora_kit import allow_installed_peft, random_layers, save_kohya, save_peft
from .test_exactness import check


def req(lora=(), **kw) -> GenerationRequest:
    base = dict(prompt="a red circle on a blue background", negative_prompt="blurry", steps=6, guidance_scale=7.5, seed=1, sampler="euler")
    base.update(kw)
    return GenerationRequest(lora=list(lora), **base)


def _load(pipe, folder: Path, names: list[str], scales: list[float]) -> None:
    pipe.unload_lora_weights()
    for n in names:
        if (folder / n).is_dir():
            pipe.load_lora_weights(str(folder / n), adapter_name=n)
        else:
            pipe.load_lora_weights(str(folder), weight_name=f"{n}.safetensors", adapter_name=n)
    if names:
        pipe.set_adapters(names, scales)


def make_reference(pipe, folder: Path):
    """reference(request) -> images of diffusers' pipeline with the request's adapters loaded and set."""
    cache: dict = {}
    base_config = dict(pipe.scheduler.config)

    def run(r: GenerationRequest) -> torch.Tensor:
        key = (tuple(r.lora), r.prompt, r.negative_prompt, r.n, r.height, r.width, r.steps, r.guidance_scale, r.seed, r.sampler)
        if key not in cache:
            _load(pipe, folder, [n for n, _ in r.lora], [s for _, s in r.lora])
            pipe.scheduler = DIFFUSERS_CLASSES[r.sampler].from_config(base_config)
            cache[key] = pipe(r.prompt, height=r.height, width=r.width, **pipeline_kwargs(r)).images.float()
        return cache[key]

    return run


# ---------------------------------------------------------------------------- SD
@pytest.fixture(scope="module")
def sd_pipe():
    from diffusers import StableDiffusionPipeline

    allow_installed_peft()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL_DIR, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def folder(tmp_path_factory, sd_pipe):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("lora")
    comps = {"unet": sd_pipe.unet, "text_encoder": sd_pipe.text_encoder}
    save_peft(StableDiffusionPipeline, d, "style", comps, rank=4, alpha=2.0, seed=1)  # folder layout, alpha/r = 0.5
    save_peft(StableDiffusionPipeline, d, "ink", comps, rank=2, seed=2, file=True)  # NAME.safetensors, alpha = r
    save_peft(StableDiffusionPipeline, d, "unet_only", {"unet": sd_pipe.unet}, rank=3, seed=4, file=True)
    save_kohya(d, "kohya", sd_pipe.unet, sd_pipe.text_encoder, rank=3, alpha=1.5, seed=3)
    save_peft(StableDiffusionPipeline, d, "wide", {"unet": sd_pipe.unet}, rank=8, seed=5, file=True)  # rank > max_rank
    (d / "broken.safetensors").write_bytes(b"not a safetensors file")
    conv = {"unet.conv_in.lora_A.weight": torch.randn(2, 4, 3, 3), "unet.conv_in.lora_B.weight": torch.randn(32, 2, 1, 1)}
    save_file(conv, str(d / "locon.safetensors"))
    # Keys diffusers' readers cannot convert (they raise their own errors, not the pipeline's).
    q = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    save_file({f"{q}.lora_weird.weight": torch.randn(2, 32)}, str(d / "weird.safetensors"))
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora.down.weight": torch.randn(2, 32)}, str(d / "half.safetensors"))
    return d


@pytest.fixture(scope="module")
def lora_engine(folder):
    cfg = EngineConfig(
        device="cpu",
        dtype="float32",
        warmup=False,
        scheduler=SchedulerConfig(policy="continuous", max_rows=64),
        lora=LoraConfig(dir=str(folder), cache_slots=4, max_per_request=2, max_rank=4),
    )
    eng = Engine(cfg).start()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def sd_reference(sd_pipe, folder):
    return make_reference(sd_pipe, folder)


@pytest.mark.parametrize("lora", [[("style", 0.8)], [("ink", 1.0)], [("kohya", 0.7)], [("unet_only", -0.5)], [("style", 0.6), ("kohya", -0.9)], []], ids=str)
def test_alone_matches_diffusers(lora_engine, sd_reference, lora):
    r = req(lora, seed=11)
    check(lora_engine.generate_sync(r), sd_reference(r), sd_reference(req(lora, seed=12)), label=f"lora {lora}")
    if lora:  # the adapter changes the image: the same seed without it is far away
        check(lora_engine.generate_sync(r), sd_reference(r), sd_reference(req((), seed=11)), label=f"lora {lora} vs none")


def test_mixed_batch_matches_diffusers(lora_engine, sd_reference):
    """Requests with different adapters (one with two, one with none, one unguided, n=2) share
    the text encoder batch and the UNet forwards; each equals its own pipeline run."""
    first = [req([("style", 0.8)], n=2, seed=21, steps=8)]
    later = [
        req([("ink", 1.0)], seed=22),
        req([("style", 0.6), ("kohya", -0.9)], seed=23),
        req((), seed=24),
        req([("kohya", 0.7)], seed=25, guidance_scale=1.0),
    ]
    results, shared = submit_joining(lora_engine, first, later, join_at_step=2)
    assert shared >= 5, f"the requests never shared a forward (most images in one iteration: {shared})"
    for r, res in zip(first + later, results, strict=True):
        other = sd_reference(req(r.lora, n=r.n, seed=r.seed + 100, steps=r.steps, guidance_scale=r.guidance_scale))
        check(res, sd_reference(r), other, label=f"mixed {r.lora}")


def test_loaded_adapters_are_listed(lora_engine):
    lora_engine.generate_sync(req([("ink", 1.0)], steps=2))
    assert "ink" in lora_engine.adapters_loaded()
    assert {"style", "ink", "kohya", "unet_only", "wide", "broken", "locon"} <= set(lora_engine.adapters_available())


@pytest.mark.parametrize(
    ("lora", "words"),
    [
        ([("nope", 1.0)], "no adapter 'nope'"),
        ([("style", 1.0), ("ink", 1.0), ("kohya", 1.0)], "at most 2"),
        ([("style", 1.0), ("style", 0.5)], "more than once"),
        ([("broken", 1.0)], "could not read"),
        ([("weird", 1.0)], "could not read"),
        ([("half", 1.0)], "could not read"),
        ([("wide", 1.0)], "rank 8"),
        ([("locon", 1.0)], "conv_in"),
        ([("style", float("nan"))], "finite"),
        ([("style", 1e6)], "between -100 and 100"),
        ([("../style", 1.0)], "not an adapter name"),
    ],
)
def test_bad_adapters_are_refused_at_submit(lora_engine, lora, words):
    with pytest.raises(RequestError) as err:
        lora_engine.submit(req(lora))
    assert err.value.field == "lora"
    assert words in err.value.message, err.value.message


def test_a_request_of_new_adapters_is_not_passed_over(folder):
    """Admission is first come first served for free slots: while a request waits for two slots,
    a later one that would take the one free slot waits behind it; one whose adapters are loaded
    already goes on. A file parsed again (its host copy let go) is still the adapter in its slot."""
    from synerdiff.models.lora import AdapterCache

    engine = Engine(EngineConfig(device="cpu", dtype="float32", warmup=False)).start()
    try:
        cache = AdapterCache(LoraConfig(dir=str(folder), cache_slots=2, max_per_request=2, max_rank=4), engine.model, rows=8)
        for job, names in (("a", ["style"]), ("b", ["ink", "kohya"]), ("c", ["unet_only"]), ("d", ["style"])):
            cache.hold(job, cache.resolve([(n, 1.0) for n in names]))
        cache.pin("a")  # style in a slot, one slot free
        assert cache.admissible(["b", "c", "d"]) == ["d"]
        cache.release("a")
        assert cache.admissible(["b", "c"]) == ["b"]
        cache._parsed.clear()  # the host copy is let go; a new request parses the file again
        cache.hold("e", cache.resolve([("style", 0.5)]))
        cache.pin("e")
        cache.hold("f", cache.resolve([("style", 1.0)]))
        assert cache.pin("f")[0][0] == cache.pin("e")[0][0]  # one slot for one file version
    finally:
        engine.shutdown()


def test_lora_off_refuses_adapters(engine):
    with pytest.raises(RequestError, match="not served here") as err:
        engine.submit(req([("style", 1.0)]))
    assert err.value.field == "lora"


def test_no_layer_is_wrapped_when_lora_is_off(engine):
    from synerdiff.models.lora import BatchedLoraLinear

    assert engine.lora is None
    assert not any(isinstance(m, BatchedLoraLinear) for m in engine.model.unet.modules())
    assert not any(isinstance(m, BatchedLoraLinear) for m in engine.model.text_encoder.modules())


# ---------------------------------------------------------------------------- eviction
def test_stream_of_100_adapters_through_8_slots(tmp_path, sd_pipe, sd_reference):
    """100 distinct adapters, 8 slots, all submitted at once: admission waits for unpinned
    slots, nothing is lost, and every image equals the same request served alone (a few also
    against diffusers)."""
    from safetensors.torch import save_file

    sd_pipe.unload_lora_weights()  # plain linears again, to find the targets
    gen = torch.Generator().manual_seed(7)
    for i in range(100):
        layers = random_layers(sd_pipe.unet, ("to_q", "to_v"), 1, gen)
        save_file({f"unet.{k}": v for k, v in layers.items()}, str(tmp_path / f"a{i:03d}.safetensors"))
    cfg = EngineConfig(
        device="cpu",
        dtype="float32",
        warmup=False,
        scheduler=SchedulerConfig(policy="continuous", max_rows=64),
        lora=LoraConfig(dir=str(tmp_path), cache_slots=8, max_per_request=1, max_rank=2),
    )
    eng = Engine(cfg).start()
    try:
        most = []
        lock = threading.Lock()

        def pinned(_stats) -> None:
            with lock:
                most.append(sum(1 for c in eng.lora._refs.values() if c > 0))

        from synerdiff.engine import EngineObserver

        eng.observers.append(EngineObserver(on_iteration=pinned))
        reqs = [req([(f"a{i:03d}", 1.0)], seed=i, steps=2, guidance_scale=1.0 if i % 2 else 7.5) for i in range(100)]
        handles = [eng.submit(r) for r in reqs]
        results = [h.wait(300) for h in handles]
        eng.observers.pop()
        assert len(results) == 100
        assert eng.lora.stats.loads >= 100 and eng.lora.stats.evictions >= 92, eng.lora.stats
        assert max(most) <= 8
        assert len(eng.adapters_loaded()) == 8
        ref = make_reference(sd_pipe, tmp_path)
        for i in (0, 1, 57, 99):  # against diffusers
            check(results[i], ref(reqs[i]), ref(req((), seed=i, steps=2, guidance_scale=reqs[i].guidance_scale)), label=f"stream {i}")
        for i in range(0, 100, 9):  # the rest: equal to the request served alone
            alone = eng.generate_sync(req([(f"a{i:03d}", 1.0)], seed=i, steps=2, guidance_scale=reqs[i].guidance_scale))
            for a, b in zip(results[i].images, alone.images, strict=True):
                assert psnr(a, b) >= 90.0, f"request {i}: {psnr(a, b):.1f} dB from itself served alone"
    finally:
        eng.shutdown()
        shutil.rmtree(tmp_path, ignore_errors=True)


# ---------------------------------------------------------------------------- SDXL
@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory):
    return build_xl(tmp_path_factory.mktemp("tiny-sdxl-lora"), seed=0)


@pytest.fixture(scope="module")
def xl_pipe(xl_dir):
    from diffusers import StableDiffusionXLPipeline

    allow_installed_peft()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = StableDiffusionXLPipeline.from_pretrained(xl_dir, local_files_only=True, add_watermarker=False)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def xl_folder(tmp_path_factory, xl_pipe):
    from diffusers import StableDiffusionXLPipeline

    d = tmp_path_factory.mktemp("xl-lora")
    comps = {"unet": xl_pipe.unet, "text_encoder": xl_pipe.text_encoder, "text_encoder_2": xl_pipe.text_encoder_2}
    save_peft(StableDiffusionXLPipeline, d, "xa", comps, rank=4, alpha=8.0, seed=1)
    save_peft(StableDiffusionXLPipeline, d, "xb", {"unet": xl_pipe.unet, "text_encoder_2": xl_pipe.text_encoder_2}, rank=2, seed=2, file=True)
    return d


def test_sdxl_both_text_encoders(xl_dir, xl_pipe, xl_folder):
    ref = make_reference(xl_pipe, xl_folder)
    cfg = EngineConfig(
        model=str(xl_dir),
        device="cpu",
        dtype="float32",
        warmup=False,
        scheduler=SchedulerConfig(policy="continuous", max_rows=64),
        lora=LoraConfig(dir=str(xl_folder), cache_slots=2, max_per_request=2, max_rank=4),
    )
    eng = Engine(cfg).start()
    try:
        alone = req([("xa", 0.7)], seed=31)
        check(eng.generate_sync(alone), ref(alone), ref(req([("xa", 0.7)], seed=32)), label="sdxl xa alone")
        first = [req([("xa", 0.7)], seed=33, steps=8)]
        later = [req([("xb", 1.2)], seed=34), req([("xa", 0.5), ("xb", -0.8)], seed=35), req((), seed=36)]
        results, shared = submit_joining(eng, first, later, join_at_step=2)
        assert shared >= 3, shared
        for r, res in zip(first + later, results, strict=True):
            check(res, ref(r), ref(req(r.lora, seed=r.seed + 100, steps=r.steps)), label=f"sdxl mixed {r.lora}")
    finally:
        eng.shutdown()
