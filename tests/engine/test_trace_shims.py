"""The compile-time upsampling forward (`engine/trace_shims.py`): one dynamo trace for batches on
both sides of diffusers' 64-row branch, the same values as diffusers' own forward, and eager
calls left to diffusers.

On the CPU with a small SD-shaped UNet built from config and dynamo's eager backend: what is
tested is dynamo's tracing and the values, not inductor's kernels."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from diffusers import UNet2DConditionModel
from diffusers.models.upsampling import Upsample2D
from torch._dynamo.utils import counters

from synerdiff.engine.size_compile import mark_batch_dynamic
from synerdiff.engine.trace_shims import drop_batch_branches


def small_unet() -> UNet2DConditionModel:
    # Narrower than make_tiny's UNet: at 8 and 16 channels the CPU convolution after the
    # upsampling rounds alike in either memory layout, so values compare bit for bit.
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()


def inputs(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 4, 8, 8, generator=g), torch.rand(rows, generator=g) * 1000, torch.randn(rows, 3, 8, generator=g)


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def traces_for(unet: UNet2DConditionModel, sizes: list[int]) -> int:
    """Dynamo graphs made for calls at `sizes` rows, the batch marked dynamic as the fast path does."""

    def forward(x, t, c):
        return unet(x, t, encoder_hidden_states=c, return_dict=False)[0]

    fn = torch.compile(forward, backend="eager", dynamic=False, fullgraph=True)
    with torch.inference_mode():
        for i, rows in enumerate(sizes):
            args = inputs(rows, i)
            mark_batch_dynamic(*args)
            torch.testing.assert_close(fn(*args), forward(*args), atol=1e-5, rtol=1e-5)
    return counters["stats"]["unique_graphs"]


def test_diffusers_branch_splits_the_trace_at_64_rows():
    # The premise: without the stand-in, 64 rows need a second trace. (Sizes from 16: below that
    # the CPU convolution of this small model guards on the batch too.)
    assert traces_for(small_unet(), [16, 24, 64, 80]) == 2


def test_one_trace_serves_both_sides_of_64_rows_with_the_same_values():
    unet = small_unet()
    assert drop_batch_branches(unet) == sum(isinstance(m, Upsample2D) for m in unet.modules()) == 1
    assert traces_for(unet, [16, 24, 64, 80]) == 1


@torch.inference_mode()
def test_the_traced_forward_computes_diffusers_values_and_eager_calls_are_diffusers_own():
    plain, shimmed = small_unet(), small_unet()
    drop_batch_branches(shimmed)
    for rows in (2, 64):
        args = inputs(rows, rows)
        expect = plain(args[0], args[1], encoder_hidden_states=args[2]).sample
        torch.testing.assert_close(shimmed(args[0], args[1], encoder_hidden_states=args[2]).sample, expect, atol=0, rtol=0)
    up = next(m for m in shimmed.modules() if isinstance(m, Upsample2D))
    x = torch.randn(64, up.channels, 4, 4).to(memory_format=torch.channels_last)
    # Eager: diffusers' forward, whose branch makes a 64-row batch contiguous before upsampling.
    assert up(x).is_contiguous()
    # Traced: the stand-in, with the same values (and output size from output_size).
    compiled = torch.compile(up, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), Upsample2D.forward(up, x), atol=0, rtol=0)
    torch.testing.assert_close(compiled(x, (7, 9)), Upsample2D.forward(up, x, (7, 9)), atol=0, rtol=0)


def test_layers_it_cannot_reproduce_are_left_alone():
    transposed = torch.nn.Sequential(Upsample2D(4, use_conv_transpose=True), Upsample2D(4, use_conv=True, norm_type="ln_norm", eps=1e-5))
    assert drop_batch_branches(transposed) == 0
    assert all("forward" not in vars(m) for m in transposed)
