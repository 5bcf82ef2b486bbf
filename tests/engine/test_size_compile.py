"""One dynamo trace for every row size, a static inductor compile per size (`engine/size_compile.py`).

On the CPU with a small conv/attention block: inductor builds real kernels for each size from the
one traced graph, and each size's output equals the eager module's."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from synerdiff.engine.size_compile import TOLERANCE, TOLERANCE_FP8, PerSizeBackend, mark_batch_dynamic, relative_error, size_key


class Block(torch.nn.Module):
    """A denoiser's shapes in small: a convolution, group norm, and attention over the pixels
    conditioned on a context, with a per-row timestep."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 32, 3, padding=1)
        self.norm = torch.nn.GroupNorm(4, 32)
        self.q = torch.nn.Linear(32, 32)
        self.kv = torch.nn.Linear(16, 64)
        self.out = torch.nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.norm(self.conv(x))) * (t / 1000).view(-1, 1, 1, 1)
        b, ch, hh, ww = h.shape
        seq = h.flatten(2).transpose(1, 2)
        k, v = self.kv(c).chunk(2, dim=-1)
        att = torch.nn.functional.scaled_dot_product_attention(self.q(seq), k, v)
        return self.out(att.transpose(1, 2).reshape(b, ch, hh, ww)) + x


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def inputs(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 4, 8, 8, generator=g), torch.rand(rows, generator=g) * 1000, torch.randn(rows, 5, 16, generator=g)


@torch.inference_mode()
def test_one_trace_serves_every_size_with_static_kernels_of_its_own():
    block = Block().eval()
    backend = PerSizeBackend()
    fn = torch.compile(block.forward, backend=backend, dynamic=False, fullgraph=True)  # as the fast path compiles it
    first = inputs(2, 0)
    mark_batch_dynamic(*first)
    for args in (first, inputs(4, 1), inputs(3, 2), inputs(2, 3)):
        out = fn(*args)
        torch.testing.assert_close(out, block(*args), atol=1e-4, rtol=1e-4)
    assert backend.traces == 1 and counters["stats"]["unique_graphs"] == 1  # dynamo traced once
    assert len(backend.compiled) == 3  # inductor compiled each size once (2 rows twice: one compile)


def test_size_key_and_agreement():
    p = torch.nn.Parameter(torch.zeros(7, 3))
    key = size_key([p, torch.zeros(5, 2), 5, torch.tensor(1.0), torch.zeros(5)])
    assert key == (((5, 2), (2, 1), torch.float32), 5, ((), (), torch.float32), ((5,), (1,), torch.float32))
    assert size_key([torch.zeros(5, 2).t()]) != size_key([torch.zeros(2, 5)])  # strides count
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(4, 8, generator=gen)
    assert relative_error(ref + 1e-4 * torch.randn(4, 8, generator=gen), ref) < TOLERANCE
    assert relative_error(ref * 1.5, ref) == pytest.approx(0.5)
    assert relative_error(torch.full((4, 8), float("nan")), ref) == float("inf")
    # Rows swapped (a kernel that mixes rows) is far past either tolerance; float8's rounding is not.
    assert relative_error(ref.flip(0), ref) > 10 * TOLERANCE_FP8
    wide = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    assert TOLERANCE < relative_error(wide.to(torch.float8_e4m3fn).float(), wide) < TOLERANCE_FP8


def test_a_compiler_failure_surfaces_on_the_first_call():
    """The fast path falls back to per-size compiles when the one-trace path raises: it must raise, not run eager."""

    def broken(gm, example_inputs):
        raise RuntimeError("no kernels today")

    fn = torch.compile(Block().eval().forward, backend=PerSizeBackend(compiler=broken), fullgraph=True)
    args = inputs(2, 0)
    mark_batch_dynamic(*args)
    with pytest.raises(Exception, match="no kernels today"), torch.inference_mode():
        fn(*args)


def test_unmarked_inputs_compile_static_again():
    """After a failed one-trace start the same buffers go to a static compile: their dynamic mark is gone."""
    from synerdiff.engine.size_compile import unmark_batch

    x = torch.zeros(3, 2)
    mark_batch_dynamic(x)
    assert 0 in x._dynamo_dynamic_indices
    unmark_batch(x, torch.zeros(1))
    assert not hasattr(x, "_dynamo_dynamic_indices")
    backend = PerSizeBackend(compiler=lambda gm, args: gm.forward)
    fn = torch.compile(lambda a: a * 2, backend=backend, dynamic=False, fullgraph=True)
    fn(x)
    fn(torch.zeros(4, 2))
    assert backend.traces == 2  # static: one trace a size, as dynamic=False asks


@torch.inference_mode()
def test_another_latent_shape_is_a_trace_of_its_own_with_its_sides_static():
    block = Block().eval()
    backend = PerSizeBackend()
    fn = torch.compile(block.forward, backend=backend, dynamic=False, fullgraph=True)
    for h, w in ((8, 8), (8, 12)):
        for rows in (2, 4):
            x, t, c = inputs(rows, rows)
            x = torch.randn(rows, 4, h, w)
            if rows == 2:
                mark_batch_dynamic(x, t, c)
            torch.testing.assert_close(fn(x, t, c), block(x, t, c), atol=1e-4, rtol=1e-4)
    assert backend.traces == 2 and len(backend.compiled) == 4  # a trace a shape, a compile a (shape, rows)


@torch.inference_mode()
def test_cache_counts_tell_a_storable_compile_from_a_bypass():
    """The start reports graphs inductor's caches cannot hold: a compile outside any tracing
    context (as a per-size compile was before it got one of its own) is one. The last assertion
    is torch's behaviour, kept as the canary of what the per-size tracing context works around."""
    import torch._inductor.config
    from torch._inductor.compile_fx import compile_fx

    from synerdiff.engine.executor import compile_cache_counts

    with torch._inductor.config.patch(fx_graph_cache=True, force_disable_caches=False):
        block = Block().eval()
        args = inputs(2, 0)
        misses, bypasses = compile_cache_counts()
        hits = counters["inductor"]["fxgraph_cache_hit"]
        fn = torch.compile(block.forward, backend=PerSizeBackend(), dynamic=False, fullgraph=True)
        torch.testing.assert_close(fn(*args), block(*args), atol=1e-4, rtol=1e-4)
        after = compile_cache_counts()
        assert after[1] == bypasses  # each size in its own tracing context: storable
        assert after[0] - misses + counters["inductor"]["fxgraph_cache_hit"] - hits == 1  # compiled and stored, or found
        gm = torch.fx.symbolic_trace(lambda x: torch.sin(x) * 2)
        compile_fx(gm, [torch.randn(4)])  # real inputs, no tracing context: no shape environment
        assert compile_cache_counts()[1] == bypasses + 1
