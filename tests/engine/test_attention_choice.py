"""The fast path's choice of SDPA backend (`engine/fastpath.py`): the step's own attention calls,
recorded from one forward and timed alone at the rows of the largest graph.

On the CPU with the embedded model: only the backends with a CPU kernel run there, which is
what the refusal paths need."""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention

from synerdiff.engine.fastpath import AttentionCall, _strided, attention_calls, fastest_attention, time_attention

from .conftest import make_engine


def _one_row(ex):
    cond = ex.conditioner.example(1)
    shape = (ex.model.unet_in_channels, 8, 8)
    return shape, torch.randn(1, *shape), torch.full((1,), 500.0), cond


def test_the_recorded_calls_are_every_attention_layer_of_the_denoiser():
    eng = make_engine(max_rows=4)
    try:
        ex = eng.executor
        shape, x, t, cond = _one_row(ex)
        calls = attention_calls(ex.denoiser, x, t, cond.context, cond.added)
        layers = [m for m in ex.model.net.modules() if isinstance(m, Attention)]
        assert layers
        assert sum(calls.values()) == len(layers)  # one SDPA call per attention layer and forward
        ctx_tokens = cond.context.shape[1]
        for call in calls:
            heads, tokens, dim = call.q
            assert call.k[0] == heads and call.k[2] == dim and call.v[1] == call.k[1]
            # Self-attention over the latent's pixels at some level, or cross-attention to the prompt.
            assert call.k[1] in (tokens, ctx_tokens)
            assert tokens <= shape[1] * shape[2]
            # diffusers splits heads with a transpose: the heads are not the outer dim in memory.
            assert call.order == (0, 2, 1, 3)
        assert any(c.k[1] == ctx_tokens for c in calls) and any(c.k[1] == c.q[1] != ctx_tokens for c in calls)
    finally:
        eng.shutdown()


def test_timed_inputs_have_the_recorded_layout():
    t = _strided(3, (2, 5, 4), (0, 2, 1, 3), torch.float32, torch.device("cpu"))
    assert t.shape == (3, 2, 5, 4)
    assert t.transpose(1, 2).is_contiguous() and not t.is_contiguous()
    assert _strided(3, (2, 5, 4), (0, 1, 2, 3), torch.float32, torch.device("cpu")).is_contiguous()


def test_a_backend_that_refuses_a_call_raises_and_the_choice_leaves_it_out():
    call = AttentionCall(q=(2, 16, 8), k=(2, 16, 8), v=(2, 16, 8), order=(0, 1, 2, 3), mask=((1, 16, 16), torch.bool), causal=False, dtype=torch.float32)
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
        shape, *_ = _one_row(ex)
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
