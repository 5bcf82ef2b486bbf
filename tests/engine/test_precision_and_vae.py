"""The precision setting's refusals, and the compiled VAE's dispatch (CPU, the embedded model)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from synerdiff.contract.config import EngineConfig, SchedulerConfig
from synerdiff.engine import Engine, GenerationRequest
from synerdiff.engine.compiled_vae import CompiledVae
from synerdiff.engine.executor import shapes_latent
from synerdiff.models.precision import PrecisionError, apply_fp8, fp8_unsupported


def test_fp8_loads_bfloat16_and_refuses_other_dtypes():
    assert EngineConfig(precision="fp8").model_dtype() == "bfloat16"
    assert EngineConfig(precision="fp8", dtype="bfloat16").model_dtype() == "bfloat16"
    assert EngineConfig().model_dtype() == "auto"
    assert EngineConfig(dtype="float16").model_dtype() == "float16"
    for dtype in ("float16", "float32"):
        with pytest.raises(ValidationError, match=f"dtype {dtype} cannot be combined"):
            EngineConfig(precision="fp8", dtype=dtype)
    with pytest.raises(ValidationError):
        EngineConfig(precision="int4")


def test_fp8_is_refused_on_a_cpu_before_the_model_loads():
    eng = Engine(EngineConfig(device="cpu", precision="fp8"))
    with pytest.raises(PrecisionError, match="needs a CUDA GPU with FP8 tensor cores.*runs on cpu"):
        eng.start()
    assert eng._model is None  # refused before minutes of loading
    assert "runs on cpu" in (fp8_unsupported(torch.device("cpu")) or "")
    with pytest.raises(PrecisionError, match="FP8 tensor cores"):
        apply_fp8(torch.nn.Linear(32, 32).to(torch.bfloat16), torch.device("cpu"))


class Counting(CompiledVae):
    """The compiled VAE with calls counted, traced by dynamo in full (fullgraph) and run by its eager backend (without
    inductor's C++ build, which a CPU test cannot afford)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, backend="eager", **kw)
        self.decoded = self.encoded = 0

    def decode(self, latents):
        self.decoded += latents.shape[0]
        return super().decode(latents)

    def moments(self, pixels):
        self.encoded += 1
        return super().moments(pixels)


def test_compiled_vae_decodes_image_by_image_and_matches_the_eager_vae():
    cfg = EngineConfig(device="cpu", dtype="float32", warmup=False, scheduler=SchedulerConfig(policy="continuous"))
    reqs = [GenerationRequest(prompt=p, height=64, width=64, steps=3, seed=s, n=n) for p, s, n in (("a cat", 1, 2), ("a dog", 2, 1))]
    odd = GenerationRequest(prompt="wide", height=64, width=96, steps=3, seed=3)
    with Engine(cfg).start() as eng:
        plain = [eng.generate_sync(r, timeout=120).images for r in [*reqs, odd]]
        m = eng.model
        vae = Counting(m.vae, dtype=torch.float32, device=m.device)
        vae.prepare(shapes_latent(m, [(64, 64)]), m.vae_scale_factor)
        f = m.vae_scale_factor
        assert vae.latent_shapes == {(4, 64 // f, 64 // f)} and vae.pixel_shapes == {(64, 64)}
        assert eng.executor is not None
        eng.executor.vae_compiled = vae
        handles = [eng.submit(r) for r in reqs]  # decoded together after their last step
        compiled = [h.wait(timeout=120).images for h in handles]
        wide = eng.generate_sync(odd, timeout=120).images
    assert vae.decoded == 3  # three 64² images through the one-image compile; the 96-wide one eagerly
    for a, b in zip(plain[:2], compiled, strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    assert not torch.equal(compiled[0][0], compiled[0][1])  # n = 2: two different images, each decoded
    torch.testing.assert_close(plain[2][0], wide[0], atol=0, rtol=0)


def test_compiled_vae_encodes_an_edit_like_the_eager_vae():
    cfg = EngineConfig(device="cpu", dtype="float32", warmup=False)
    with Engine(cfg).start() as eng:
        m, ex = eng.model, eng.executor
        assert ex is not None
        pixels = torch.rand(1, 3, 64, 64) * 2 - 1
        eager = ex.encode_image(pixels, torch.Generator().manual_seed(5))
        vae = Counting(m.vae, dtype=torch.float32, device=m.device)
        vae.prepare(shapes_latent(m, [(64, 64)]), m.vae_scale_factor)
        ex.vae_compiled = vae
        got = ex.encode_image(pixels, torch.Generator().manual_seed(5))
        other = ex.encode_image(pixels, torch.Generator().manual_seed(6))
        big = ex.encode_image(torch.zeros(1, 3, 64, 96), torch.Generator().manual_seed(5))
    assert vae.encoded == 2  # the 64x96 picture is encoded eagerly
    torch.testing.assert_close(eager, got, atol=1e-5, rtol=0)
    assert (eager - other).abs().max() > 1e-3  # the sample is drawn from the generator
    assert big.shape == (1, 4, 64 // m.vae_scale_factor, 96 // m.vae_scale_factor)


def test_compiled_vae_never_recompiles_for_channels_last_inputs():
    """An edit's latents and pixels arrive channels_last (the image processor's layout); the compiled
    one-image VAE must take them without a second compile, which on a GPU would stall serving."""
    cfg = EngineConfig(device="cpu", dtype="float32", warmup=False)
    with Engine(cfg).start() as eng:
        m = eng.model
        vae = Counting(m.vae, dtype=torch.float32, device=m.device)
        vae.prepare(shapes_latent(m, [(64, 64)]), m.vae_scale_factor)
        f = m.vae_scale_factor
        z = torch.randn(3, 4, 64 // f, 64 // f).to(memory_format=torch.channels_last)
        x = torch.rand(1, 3, 64, 64).to(memory_format=torch.channels_last)
        assert not z[0:1].is_contiguous() and not x.is_contiguous()
        with torch._dynamo.config.patch(error_on_recompile=True), torch.inference_mode():  # as the executor calls it
            out = vae.decode(z)
            moments = vae.moments(x)
            again = vae.decode(z.contiguous())
        torch.testing.assert_close(out, again, atol=0, rtol=0)
        assert out.shape == (3, 3, 64, 64) and moments.shape[0] == 1


class FakeFloat8(torch.Tensor):
    """Stands for a torchao float8 weight: what the engine checks is that torchao holds it."""


def test_an_fp16_engine_refuses_a_model_an_fp8_engine_quantized():
    from synerdiff.models.loader import load_model
    from synerdiff.models.precision import float8_layers

    model = load_model(str(EngineConfig().model), "cpu", "float32")
    assert float8_layers(model.net) == 0
    lin = next(m for m in model.net.modules() if isinstance(m, torch.nn.Linear))
    lin.weight = torch.nn.Parameter(lin.weight.detach().as_subclass(FakeFloat8), requires_grad=False)
    assert float8_layers(model.net) == 1
    with pytest.raises(PrecisionError, match="give the fp16 engine a model of its own"):
        Engine(EngineConfig(device="cpu", dtype="float32", warmup=False), model=model).start()
