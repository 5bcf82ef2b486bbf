"""The step-kernels benchmark's sorting of GPU kernels into classes, by names CUDA libraries give them."""

from __future__ import annotations

import pytest

from synerdiff_bench.step_kernels import attention_family, kernel_class


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        # cuDNN's fused attention says "fprop" too: attention is matched first.
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0", "attention"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4> >(Flash_fwd_params)", "attention"),
        ("fmha_cutlassF_f16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)", "attention"),
        # An implicit-GEMM convolution is a convolution, not a GEMM.
        ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1", "convolution"),
        ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN", "gemm"),
        # float8 GEMMs: torch._scaled_mm with per-row scales runs CUTLASS kernels.
        (
            "void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<cute::tuple<int, int, int>, cutlass::gemm::collective::CollectiveMma<float_e4m3_t> > >",
            "gemm",
        ),
        ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off", "gemm"),
        ("triton_per_fused_native_group_norm_silu_0", "triton"),
        # Inductor names a kernel after the ops it fuses: a conv's bias add is still its own kernel.
        ("triton_poi_fused_convolution_0", "triton"),
        ("triton_per_fused_convolution_native_group_norm_1", "triton"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::array<char*, 1ul> >", "other"),
    ],
)
def test_kernel_names_sort_into_their_class(name: str, cls: str) -> None:
    assert kernel_class(name) == cls


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x1_kernel0_0", "cudnn"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4> >(Flash_fwd_params)", "flash"),
        ("fmha_cutlassF_f16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)", "efficient"),
    ],
)
def test_attention_kernels_name_their_backend(name: str, family: str) -> None:
    """A compiled graph's attention kernels show which backend it really runs (cuDNN's say "flash" too)."""
    assert attention_family(name) == family


def test_an_output_distance_is_relative_error_and_psnr_over_the_reference_range() -> None:
    import math

    import torch

    from synerdiff_bench.step_kernels import distance

    ref = torch.tensor([-1.0, 1.0, -1.0, 1.0])
    same = distance(ref.clone(), ref)
    assert same["relative_rms"] == 0.0 and math.isinf(same["psnr_db"])
    off = distance(ref + 0.1, ref)  # an error of 0.1 everywhere on a range of 2
    assert off["relative_rms"] == pytest.approx(0.1)
    assert off["psnr_db"] == pytest.approx(10 * math.log10(4 / 0.01))
    assert distance(ref.half(), ref)["relative_rms"] == 0.0  # compared in float32
