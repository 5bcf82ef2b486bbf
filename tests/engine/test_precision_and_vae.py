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


def test_the_fp8_roofline_keeps_memory_bound_layers_16_bit():
    from synerdiff.models.precision import fp8_pays, gemm_time

    tokens = 64 * 64 * 64  # 64 rows of SD1.5's 64×64 level at 512²
    # SD1.5's 320-wide projections and feed-forward there: bound by memory, the scaling pass on top.
    assert not fp8_pays(tokens, 320, 320)
    assert not fp8_pays(tokens, 1280, 320)
    assert not fp8_pays(tokens, 320, 2560)
    # SD3-medium's (1536 wide) and FLUX's (3072) at 8 rows of 1024²: bound by the tensor cores.
    dit = 8 * 4096
    assert fp8_pays(dit, 1536, 6144) and fp8_pays(dit, 1536, 1536) and fp8_pays(dit, 3072, 3072)
    # A few rows through a wide layer (a time embedding): the kernels' fixed costs make it a tie at
    # best, the scaling one more kernel; a few rows through a very wide one: reading its weights
    # is the cost, and float8 halves it (SD3's adaptive norms, 1536→9216 at 8 rows).
    assert not fp8_pays(64, 1280, 1280)
    assert fp8_pays(8, 1536, 9216) and not fp8_pays(8, 1536, 9216, margin=0.8)
    # The estimate: compute-bound GEMMs halve in float8 up to the scaling; memory-bound ones do not.
    assert gemm_time(dit, 3072, 3072, True) < 0.7 * gemm_time(dit, 3072, 3072, False)
    assert gemm_time(tokens, 320, 320, True) > gemm_time(tokens, 320, 320, False)
    # A GPU with less bandwidth for its FLOPs (a higher ridge) has fewer compute-bound layers.
    assert fp8_pays(dit, 1536, 1536, flops_per_byte=300) and not fp8_pays(dit, 1536, 1536, flops_per_byte=3000)


def test_the_rows_each_linear_layer_multiplies_are_counted_from_one_denoiser_call():
    from synerdiff.engine.executor import StepExecutor, shapes_latent
    from synerdiff.models.loader import load_model
    from synerdiff.models.precision import linear_rows, paying_layers

    model = load_model(str(EngineConfig().model), "cpu", "float32")
    ex = StepExecutor(model)
    (shape,) = shapes_latent(model, [(64, 64)])
    tokens = shape[1] * shape[2]
    x, t = torch.randn(2, *shape), torch.full((2,), 500.0)
    cond = ex.example_conditioning(2, shape)
    rows = linear_rows(model.net, lambda: ex.denoise(x, t, cond))
    linears = {n: m for n, m in model.net.named_modules() if isinstance(m, torch.nn.Linear)}
    assert rows and set(rows) <= set(linears)
    # Self-attention projections see every latent token of both rows at their level of the UNet
    # (a quarter of the tokens a level down); cross-attention's keys the prompt's tokens; the time
    # embedding one vector a row.
    self_q = [rows[n] for n in rows if n.endswith("attn1.to_q")]
    assert self_q and all(2 * tokens // r in (1, 4, 16, 64) and 2 * tokens % r == 0 for r in self_q)
    cross_k = [n for n in rows if n.endswith("attn2.to_k")]
    assert cross_k and all(rows[n] == 2 * cond.context.shape[1] for n in cross_k)
    assert rows["time_embedding.linear_1"] == 2
    assert all(not m._forward_pre_hooks for m in linears.values())  # no hook left behind
    # This tiny model's layers are narrow: bound by memory and the kernels' fixed costs at these
    # rows and at a full step of 64, so none pays.
    assert paying_layers(model.net, rows) == set()
    assert paying_layers(model.net, {n: r * 32 for n, r in rows.items()}) == set()


def test_float8_goes_to_the_wide_layers_the_rows_reach():
    from synerdiff.models.precision import layer_set, paying_layers

    net = torch.nn.ModuleDict(
        {
            "wide": torch.nn.Linear(1536, 6144, device="meta"),
            "narrow": torch.nn.Linear(320, 320, device="meta"),
            "idle": torch.nn.Linear(1536, 6144, device="meta"),
        }
    )
    rows = {"wide": 8 * 4096, "narrow": 64 * 4096}  # "idle" was not reached: no rows to judge it by
    chosen = paying_layers(net, rows)
    assert chosen == {"wide"}
    assert paying_layers(net, {"wide": 16, "narrow": 16}) == set()  # a few rows: the fixed costs rule
    # The key of a layer set: stable, order-free, and "all" for every layer.
    assert layer_set(chosen) == layer_set({"wide"}) != layer_set({"wide", "narrow"})
    assert layer_set({"a", "b"}) == layer_set({"b", "a"}) and layer_set(None) == "all"


def test_the_engine_judges_float8_at_the_rows_of_a_full_step(monkeypatch):
    import synerdiff.engine.executor as executor_module

    seen = []

    def record(net, rows):
        seen.append(dict(rows))
        return set()

    monkeypatch.setattr(executor_module, "paying_layers", record)
    cfg = EngineConfig(device="cpu", dtype="float32", warmup=False, scheduler=SchedulerConfig(policy="continuous", max_rows=8))
    with Engine(cfg).start() as eng:
        linears = {n for n, m in eng.model.net.named_modules() if isinstance(m, torch.nn.Linear)}
        assert eng._fp8_only() == set()
        at_eight = seen[-1]
        assert at_eight and set(at_eight) <= linears  # the names quantize_'s filter sees
        assert at_eight["time_embedding.linear_1"] == 8  # one vector a row, at 8 rows
        eng.config.scheduler.max_step_pixels = 2 * eng.model.default_size**2  # a full step holds 2 rows at the native size
        eng._fp8_only()
        assert seen[-1] == {n: r // 4 for n, r in at_eight.items()}
        eng.config.fp8_layers = "all"
        assert eng._fp8_only() is None and len(seen) == 2
