"""The fast path's choice of SDPA backend (`engine/fastpath.py`): the step's own attention calls,
recorded from one forward and timed alone at the rows of the largest graph.

On the CPU with the embedded model: only the backends with a CPU kernel run there, which is
what the refusal paths need."""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention

from synerdiff.engine.executor import StepExecutor
from synerdiff.engine.fastpath import AttentionCall, Operand, attention_calls, fastest_attention, time_attention
from synerdiff.models.loader import load_model
from synerdiff_training.make_tiny import build_flux

from .conftest import make_engine


def _two_rows(ex):
    cond = ex.conditioner.example(2)
    shape = (ex.model.unet_in_channels, 8, 8)
    return shape, torch.randn(2, *shape), torch.full((2,), 500.0), cond


def test_the_recorded_calls_are_every_attention_layer_of_the_denoiser():
    eng = make_engine(max_rows=4)
    try:
        ex = eng.executor
        shape, x, t, cond = _two_rows(ex)
        calls = attention_calls(ex.denoiser, x, t, cond.context, cond.added)
        layers = [m for m in ex.model.net.modules() if isinstance(m, Attention)]
        assert layers
        assert sum(calls.values()) == len(layers)  # one SDPA call per attention layer and forward
        ctx_tokens = cond.context.shape[1]
        for call in calls:
            heads, tokens, dim = call.q.shape
            assert call.k.shape[0] == heads and call.k.shape[2] == dim and call.v.shape[1] == call.k.shape[1]
            # Self-attention over the latent's pixels at some level, or cross-attention to the prompt.
            assert call.k.shape[1] in (tokens, ctx_tokens)
            assert tokens <= shape[1] * shape[2]
            # diffusers splits heads with a transpose: the heads are not the outer dim in memory.
            assert call.q.order == (0, 2, 1, 3) and call.q.batch and call.mask is None and not call.causal
        assert any(c.k.shape[1] == ctx_tokens for c in calls) and any(c.k.shape[1] == c.q.shape[1] != ctx_tokens for c in calls)
    finally:
        eng.shutdown()


def test_timed_inputs_have_the_recorded_layout():
    cpu = torch.device("cpu")
    q = torch.randn(2, 5, 3, 4).transpose(1, 2)  # (B, H, S, D) over (B, S, H, D) memory, as diffusers makes it
    op = Operand.of(q)
    assert op == Operand((3, 5, 4), (0, 2, 1, 3), torch.float32, True)
    t = op.make(6, cpu)
    assert t.shape == (6, 3, 5, 4) and t.transpose(1, 2).is_contiguous() and not t.is_contiguous()
    # A mask shared by every row stays one row; a mask lets every token attend.
    shared = Operand.of(torch.zeros(1, 1, 5, 5, dtype=torch.bool).expand(2, 1, 5, 5))
    assert not shared.batch and shared.make(6, cpu, mask=True).shape == (1, 1, 5, 5) and shared.make(6, cpu, mask=True).all()
    additive = Operand.of(torch.randn(2, 1, 5, 5))
    assert additive.batch and torch.equal(additive.make(6, cpu, mask=True), torch.zeros(6, 1, 5, 5))


def test_arguments_passed_by_name_are_recorded():
    # diffusers' attention dispatcher calls SDPA with keywords only.
    def denoiser(x, t, c, added):
        q = x.flatten(2).unsqueeze(1)  # (B, 1 head, C, h*w)
        return torch.nn.functional.scaled_dot_product_attention(query=q, key=q, value=q, is_causal=True, enable_gqa=False)

    calls = attention_calls(denoiser, torch.randn(2, 4, 2, 2), torch.zeros(2), torch.zeros(2, 1, 1), {})
    (call,) = calls
    assert call.causal and not call.gqa and call.q.shape == (1, 4, 4) and calls[call] == 1


def test_a_mask_of_fewer_dims_than_the_query_is_made_as_it_was():
    def denoiser(x, t, c, added):
        q = x.flatten(2).unsqueeze(1)  # (B, 1 head, C, h*w)
        keep = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
        return torch.nn.functional.scaled_dot_product_attention(q, q, q, keep)

    (call,) = attention_calls(denoiser, torch.randn(2, 4, 2, 2), torch.zeros(2), torch.zeros(2, 1, 1), {})
    assert call.mask == Operand((4, 4), (0, 1), torch.bool, batch=False, batch_dim=False)
    assert call.mask.make(8, torch.device("cpu"), mask=True).shape == (4, 4)
    assert time_attention({call: 1}, 8, "flash", torch.device("cpu")) > 0


def test_flux_attention_is_recorded_and_timed(tmp_path):
    ex = StepExecutor(load_model(build_flux(tmp_path / "flux", seed=0), "cpu", "float32"))
    cond = ex.conditioner.example(2)
    shape = (ex.model.unet_in_channels, 8, 8)
    calls = attention_calls(ex.denoiser, torch.randn(2, *shape), torch.full((2,), 500.0), cond.context, cond.added)
    blocks = len(ex.model.net.transformer_blocks) + len(ex.model.net.single_transformer_blocks)
    assert sum(calls.values()) == blocks
    ctx = tuple(cond.context.shape[1:])
    added = {k: tuple(v.shape[1:]) for k, v in cond.added.items()}
    name, times = fastest_attention(ex.denoiser, shape=shape, rows=4, ctx_shape=ctx, added_shapes=added, dtype=torch.float32, device=torch.device("cpu"))
    assert name == "flash" and set(times) == {"flash"}


def test_a_backend_that_refuses_a_call_raises_and_the_choice_leaves_it_out():
    op = Operand((2, 16, 8), (0, 1, 2, 3), torch.float32)
    call = AttentionCall(q=op, k=op, v=op, mask=Operand((1, 16, 16), (0, 1, 2, 3), torch.bool, batch=False), causal=False, gqa=False)
    cpu = torch.device("cpu")
    # The memory-efficient and cuDNN kernels are CUDA-only: the op refuses them on the CPU.
    for name in ("cudnn", "efficient"):
        try:
            time_attention({call: 1}, 4, name, cpu)
        except RuntimeError:
            pass
        else:
            raise AssertionError(f"{name} ran on the CPU")
    assert time_attention({call: 3}, 4, "flash", cpu) > 0

    eng = make_engine(max_rows=4)
    try:
        ex = eng.executor
        shape, *_ = _two_rows(ex)
        ctx = tuple(ex.conditioner.example(1).context.shape[1:])
        name, times = fastest_attention(ex.denoiser, shape=shape, rows=4, ctx_shape=ctx, dtype=torch.float32, device=cpu)
        assert set(times) == {"flash"} and name == "flash" and times["flash"] > 0
    finally:
        eng.shutdown()


def test_a_denoiser_without_sdpa_calls_leaves_the_choice_to_torch():
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def denoiser(x, t, c, added):
        return conv(x)

    assert fastest_attention(denoiser, shape=(4, 8, 8), rows=4, ctx_shape=(3, 8), dtype=torch.float32, device=torch.device("cpu")) == (None, {})


def test_a_compiled_graph_runs_the_backend_it_was_compiled_under(fresh_dynamo, tmp_path, monkeypatch):
    """torch's compile caches key a graph by its traced code, which names SDPA but not the backend
    it lowers to: a second compile under another backend must not load the first's kernels."""
    from torch._inductor.utils import run_and_get_code

    from synerdiff.engine.fastpath import attention

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # caches on, and empty

    def attend(q):
        return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    q = torch.randn(1, 2, 16, 8)
    order = ("math", "flash", "math", "flash")  # the CPU's two backends, each compiled again from the caches
    for name in order:
        torch._dynamo.reset()
        with attention(name):
            out, sources = run_and_get_code(torch.compile(attend, fullgraph=True), q)
        torch.testing.assert_close(out, attend(q))
        code = "\n".join(sources)
        # flash is one fused kernel; math is SDPA decomposed into batched matmuls and a softmax
        assert ("flash_attention" in code) == (name == "flash"), name
        assert ("bmm" in code) == (name == "math"), name
