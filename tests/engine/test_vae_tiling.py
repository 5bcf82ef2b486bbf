"""Spatial tiles for large images: diffusers' own tiled decode, as a choice and as the fallback
when a decode runs out of GPU memory (simulated on the CPU by an executor that raises it).

Tiles change pixels. On the embedded model (trained at 64², its VAE tile) a 128² image in
tiles is far from its whole decode (16 dB mean in bench/results/fidelity.json: each tile
decodes on its own and this small VAE's colours come from its global attention). So these tests
pin tiled results to diffusers' tiled decode exactly, not to the whole decode; the fidelity
command reports the PSNR."""

from __future__ import annotations

import pytest
import torch

from synerdiff.contract.config import EngineConfig, SchedulerConfig
from synerdiff.engine import Engine, EngineError, GenerationRequest
from synerdiff_bench.quality import psnr


def req(**kw) -> GenerationRequest:
    base = dict(prompt="a red circle on a blue background", steps=6, guidance_scale=5.0, seed=3, height=128, width=128)
    base.update(kw)
    return GenerationRequest(**base)


def engine(**kw) -> Engine:
    return Engine(EngineConfig(device="cpu", dtype="float32", warmup=False, scheduler=SchedulerConfig(policy="continuous"), **kw)).start()


def test_tiled_decode_is_diffusers_tiled_decode_and_close_to_the_whole(engine_exact):
    ex = engine_exact.executor
    vae = ex.model.vae
    lat = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))  # 128² on the embedded model: 2x2 tiles and more
    assert ex.tiles(lat) and not ex.tiles(lat[..., :16, :16])
    tiled, whole = ex.decode(lat, tiled=True), ex.decode(lat)
    with torch.inference_mode():
        ref = vae.tiled_decode(lat / vae.config.scaling_factor, return_dict=False)[0]
    assert torch.equal(tiled, (ref.float() / 2 + 0.5).clamp(0, 1))
    assert psnr(tiled, whole) < 60  # really tiled: not the whole decode
    one_tile = lat[..., :16, :16]
    assert torch.equal(ex.decode(one_tile, tiled=True), ex.decode(one_tile))  # a tile or less decodes whole


@pytest.fixture(scope="module")
def engine_exact():
    eng = engine()
    yield eng
    eng.shutdown()


class _ShortOfMemory:
    """Wraps the executor's decode like a GPU that fits one 64² image, or one tile, at a time."""

    def __init__(self, executor):
        self.inner = executor.decode
        self.calls: list[tuple[int, bool]] = []
        executor.decode = self

    def __call__(self, latents, tiled=False):
        self.calls.append((latents.shape[0], tiled))
        if latents.shape[0] > 1 or (latents.shape[-1] > 16 and not tiled):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(latents, tiled=tiled)


def test_an_out_of_memory_decode_is_redone_one_image_at_a_time_then_in_tiles(engine_exact):
    from synerdiff.metrics import ServerMetrics

    tiled_eng = engine(vae_tiling="always")
    try:
        tiled = tiled_eng.generate_sync(req(n=2), timeout=120)
    finally:
        tiled_eng.shutdown()
    eng = engine()
    metrics = ServerMetrics(eng)
    metrics.attach()
    short = _ShortOfMemory(eng.executor)
    try:
        res = eng.generate_sync(req(n=2), timeout=120)
        small = eng.generate_sync(req(height=64, width=64, n=1), timeout=120)
    finally:
        eng.shutdown()
    assert short.calls[:3] == [(2, False), (1, False), (1, True)]
    assert metrics.vae_fallbacks._value.get() == 1
    assert res.vae_tiled and tiled.vae_tiled and not small.vae_tiled
    for i in range(2):  # one image at a time vs a batch of two: equal up to fp32 rounding
        assert psnr(res.images[i], tiled.images[i]) > 90
    assert small.images[0].shape[-1] == 64


def test_tiling_never_lets_out_of_memory_fail_the_request_with_its_reason():
    eng = engine(vae_tiling="never")
    _ShortOfMemory(eng.executor)
    try:
        with pytest.raises(EngineError) as err:
            eng.generate_sync(req(n=2), timeout=120)
        ok = eng.generate_sync(req(height=64, width=64), timeout=120)  # the loop lives on
    finally:
        eng.shutdown()
    assert err.value.reason == "out_of_memory"
    assert ok.images[0].shape[-1] == 64 and not ok.vae_tiled


def test_tiling_always_tiles_large_images_only(engine_exact):
    eng = engine(vae_tiling="always")
    try:
        big, small = eng.generate_sync(req(), timeout=120), eng.generate_sync(req(height=64, width=64), timeout=120)
    finally:
        eng.shutdown()
    big_exact, small_exact = engine_exact.generate_sync(req(), timeout=120), engine_exact.generate_sync(req(height=64, width=64), timeout=120)
    assert big.vae_tiled and not big_exact.vae_tiled and not small.vae_tiled
    assert psnr(big.images[0], big_exact.images[0]) < 60
    assert torch.equal(small.images[0], small_exact.images[0])
